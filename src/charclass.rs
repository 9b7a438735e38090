//! Byte-class tables for the hand-written URL scanners (`auth`, `hls`),
//! built at compile time: a byte is in the class when it is an ASCII letter
//! or digit, or one of `extra`.

pub const fn alnum_and(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (i as u8).is_ascii_alphanumeric();
        i += 1;
    }
    let mut j = 0;
    while j < extra.len() {
        t[extra[j] as usize] = true;
        j += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn classes() {
        let t = super::alnum_and(b"-.");
        assert!(t[b'a' as usize] && t[b'Z' as usize] && t[b'7' as usize] && t[b'-' as usize] && t[b'.' as usize]);
        assert!(!t[b' ' as usize] && !t[b'/' as usize] && !t[0xC3]);
    }
}
