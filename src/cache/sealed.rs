//! A body kept in an in-memory file (`memfd`) rather than the heap, so that
//! an answer from memory can be sent with `sendfile`: the kernel hands the
//! file's pages to the socket by reference, where a body in the heap is
//! copied into the socket's buffers first. For 64 KiB ranges that copy was
//! a quarter of a cache hit's CPU (BENCHMARKS.md); nginx avoids it the same
//! way (`sendfile on`).
//!
//! A fill writes its body into the file as it arrives (readers follow with
//! `pread`), then seals it (no write, no resize): what was stored is what
//! is sent, for as long as a socket still holds its pages. Each file is a
//! descriptor: at most a quarter of the process's descriptor limit are used
//! for this, so a cache of many objects cannot starve the listener of
//! sockets; past that, and under [`SMALLEST`], bodies stay in the heap.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use rustix::fs::{MemfdFlags, SealFlags};

/// Bodies shorter than this stay in the heap: a file costs a descriptor
/// and whole pages, and a short body's copy costs little.
pub const SMALLEST: u64 = 64 * 1024;

/// Body files open now, across every cache of the process.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// At most this many body files: a quarter of the descriptor limit, as
/// raised at start.
fn most() -> usize {
    static MOST: OnceLock<usize> = OnceLock::new();
    *MOST.get_or_init(|| {
        let soft = rlimit::Resource::NOFILE.get().map_or(1024, |(soft, _)| soft);
        usize::try_from(soft / 4).unwrap_or(usize::MAX)
    })
}

/// A body of `len` bytes in an in-memory file (the length bounds writes).
#[derive(Debug)]
pub struct BodyFile {
    file: File,
    len: u64,
}

impl BodyFile {
    /// An empty file for a body of `len` bytes; `None` when the body is
    /// short, the descriptors for this are used up, or the kernel refused
    /// (the body then goes to the heap).
    pub fn new(len: u64) -> Option<BodyFile> {
        if len < SMALLEST {
            return None;
        }
        if OPEN.fetch_add(1, Ordering::Relaxed) >= most() {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match rustix::fs::memfd_create("anibridge-cache", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING) {
            Ok(fd) => Some(BodyFile { file: File::from(fd), len }),
            Err(e) => {
                OPEN.fetch_sub(1, Ordering::Relaxed);
                // Once: a sandbox that refuses memfd refuses every one.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| log::warn!("cache: no in-memory files ({e}): stored bodies stay in the heap"));
                None
            }
        }
    }

    /// Writes `bytes` at `pos`, never past `len` (the fill's side, in
    /// order; and a range fetched ahead of it, the body's tail).
    pub fn write_at(&self, bytes: &[u8], pos: u64) -> std::io::Result<()> {
        debug_assert!(pos + bytes.len() as u64 <= self.len);
        self.file.write_all_at(bytes, pos)
    }

    /// Complete: no byte of it changes from now on.
    pub fn seal(&self) -> std::io::Result<()> {
        let seals = SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL;
        rustix::fs::fcntl_add_seals(&self.file, seals).map_err(Into::into)
    }

    /// Fills `buf` from byte `pos` on (bytes that were written).
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, pos)
    }

    /// The file, for `sendfile`.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for BodyFile {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_file_reads_back_and_once_sealed_refuses_writes() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let f = BodyFile::new(200_000).expect("a file");
        for (i, piece) in body.chunks(65_536).enumerate() {
            f.write_at(piece, i as u64 * 65_536).unwrap();
        }
        f.seal().unwrap();
        let mut buf = vec![0; 1000];
        f.read_at(&mut buf, 99_500).unwrap();
        assert_eq!(buf, &body[99_500..100_500]);
        assert!(f.read_at(&mut buf, 199_500).is_err(), "past the end");
        assert!(f.file().write_at(b"x", 0).is_err(), "sealed against writes");
        assert!(f.file().set_len(1).is_err(), "sealed against resizing");
        assert!(BodyFile::new(SMALLEST - 1).is_none(), "a short body stays in the heap");
    }
}
