//! HLS playlist rewriting: every URI a player would follow is pointed back
//! through the proxy, so segments, keys and renditions never bypass it.

use url::Url;

/// Whether a body is an HLS playlist (`#EXTM3U`, optionally after a BOM).
pub fn looks_like_playlist(body: &[u8]) -> bool {
    let b = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    b.starts_with(b"#EXTM3U")
}

/// The cosmetic file name for a child URL: its last path segment, so
/// `seg001.ts` keeps its extension.
pub fn hint_for(u: &Url) -> &str {
    let seg = u.path_segments().and_then(|mut s| s.next_back()).unwrap_or("");
    if seg.is_empty() || seg == "." || seg == ".." {
        "stream"
    } else {
        seg
    }
}

/// Rewrites a playlist. `base` is the final upstream URL (after redirects);
/// `proxied` turns an absolute child URL into the URL the client should
/// use. Lines keep their endings; comments, tags without URIs, blank lines
/// and URIs that are not http(s) after resolution (`skd://`, `data:`) are
/// left exactly as they were. The output has as many lines as the input.
pub fn rewrite(playlist: &str, base: &Url, mut proxied: impl FnMut(&Url) -> String) -> String {
    let mut out = String::with_capacity(playlist.len() + playlist.len() / 2);
    // A byte-order mark is kept, and does not make `#EXTM3U` a URI line.
    let playlist = match playlist.strip_prefix('\u{feff}') {
        Some(rest) => {
            out.push('\u{feff}');
            rest
        }
        None => playlist,
    };
    for line in playlist.split_inclusive('\n') {
        let (content, ending) = split_ending(line);
        let trimmed = content.trim();
        if trimmed.is_empty() {
            out.push_str(line);
        } else if trimmed.starts_with('#') {
            if trimmed.starts_with("#EXT") && content.contains("URI=\"") {
                rewrite_uri_attributes(content, base, &mut proxied, &mut out);
                out.push_str(ending);
            } else {
                out.push_str(line);
            }
        } else {
            match resolve(trimmed, base) {
                Some(child) => {
                    // Keep surrounding whitespace; replace only the URI.
                    let start = content.find(trimmed).unwrap_or(0);
                    out.push_str(&content[..start]);
                    out.push_str(&proxied(&child));
                    out.push_str(&content[start + trimmed.len()..]);
                    out.push_str(ending);
                }
                None => out.push_str(line),
            }
        }
    }
    out
}

fn split_ending(line: &str) -> (&str, &str) {
    if let Some(c) = line.strip_suffix("\r\n") {
        (c, "\r\n")
    } else if let Some(c) = line.strip_suffix('\n') {
        (c, "\n")
    } else {
        (line, "")
    }
}

/// A URI resolved against the playlist URL, if the player would fetch it
/// over http(s).
fn resolve(uri: &str, base: &Url) -> Option<Url> {
    let u = base.join(uri).ok()?;
    matches!(u.scheme(), "http" | "https").then_some(u)
}

/// Rewrites each `URI="..."` attribute of a tag line into `out`.
fn rewrite_uri_attributes(line: &str, base: &Url, proxied: &mut impl FnMut(&Url) -> String, out: &mut String) {
    let mut rest = line;
    while let Some(pos) = rest.find("URI=\"") {
        let attr_start = pos == 0 || matches!(rest.as_bytes()[pos - 1], b':' | b',' | b' ');
        let value_start = pos + 5;
        let Some(len) = rest[value_start..].find('"') else { break };
        out.push_str(&rest[..value_start]);
        let value = &rest[value_start..value_start + len];
        match resolve(value, base).filter(|_| attr_start) {
            Some(child) => out.push_str(&proxied(&child)),
            None => out.push_str(value),
        }
        rest = &rest[value_start + len..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://cdn.example/hls/v1/index.m3u8?tok=abc").unwrap()
    }

    fn mark(u: &Url) -> String {
        format!("P[{}|{}]", hint_for(u), u)
    }

    #[test]
    fn master_playlist_with_renditions() {
        let src = "#EXTM3U\n\
#EXT-X-VERSION:6\n\
#EXT-X-SESSION-KEY:METHOD=AES-128,URI=\"/keys/session.key\"\n\
#EXT-X-SESSION-DATA:DATA-ID=\"com.example.title\",URI=\"meta.json\"\n\
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"Deutsch\",URI=\"audio/de.m3u8\"\n\
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID=\"sub\",NAME=\"English\",URI=\"https://subs.example/en.m3u8\"\n\
#EXT-X-MEDIA:TYPE=CLOSED-CAPTIONS,GROUP-ID=\"cc\",NAME=\"CC\",INSTREAM-ID=\"CC1\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=1280000,RESOLUTION=1280x720,AUDIO=\"aud\"\n\
720p/index.m3u8\n\
#EXT-X-STREAM-INF:BANDWIDTH=2560000,RESOLUTION=1920x1080\n\
../1080p/index.m3u8?x=1\n\
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=86000,URI=\"iframes.m3u8\"\n";
        let out = rewrite(src, &base(), mark);
        let expect = "#EXTM3U\n\
#EXT-X-VERSION:6\n\
#EXT-X-SESSION-KEY:METHOD=AES-128,URI=\"P[session.key|https://cdn.example/keys/session.key]\"\n\
#EXT-X-SESSION-DATA:DATA-ID=\"com.example.title\",URI=\"P[meta.json|https://cdn.example/hls/v1/meta.json]\"\n\
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"Deutsch\",URI=\"P[de.m3u8|https://cdn.example/hls/v1/audio/de.m3u8]\"\n\
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID=\"sub\",NAME=\"English\",URI=\"P[en.m3u8|https://subs.example/en.m3u8]\"\n\
#EXT-X-MEDIA:TYPE=CLOSED-CAPTIONS,GROUP-ID=\"cc\",NAME=\"CC\",INSTREAM-ID=\"CC1\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=1280000,RESOLUTION=1280x720,AUDIO=\"aud\"\n\
P[index.m3u8|https://cdn.example/hls/v1/720p/index.m3u8]\n\
#EXT-X-STREAM-INF:BANDWIDTH=2560000,RESOLUTION=1920x1080\n\
P[index.m3u8|https://cdn.example/hls/1080p/index.m3u8?x=1]\n\
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=86000,URI=\"P[iframes.m3u8|https://cdn.example/hls/v1/iframes.m3u8]\"\n";
        assert_eq!(out, expect);
    }

    #[test]
    fn media_playlist_keys_maps_byteranges_crlf() {
        let src = "#EXTM3U\r\n#EXT-X-TARGETDURATION:4\r\n\
#EXT-X-KEY:METHOD=AES-128,URI=\"key.bin\",IV=0x0123\r\n\
#EXT-X-MAP:URI=\"init.mp4\",BYTERANGE=\"720@0\"\r\n\
# a comment with URI=\"nope\"\r\n\
\r\n\
#EXTINF:4.0,\r\n#EXT-X-BYTERANGE:1000@720\r\nmain.mp4\r\n\
#EXT-X-KEY:METHOD=SAMPLE-AES,URI=\"skd://key-id\",KEYFORMAT=\"com.apple.streamingkeydelivery\"\r\n\
#EXTINF:4.0,\r\nhttp://other.example/seg2.ts\r\n#EXT-X-ENDLIST";
        let out = rewrite(src, &base(), mark);
        let expect = "#EXTM3U\r\n#EXT-X-TARGETDURATION:4\r\n\
#EXT-X-KEY:METHOD=AES-128,URI=\"P[key.bin|https://cdn.example/hls/v1/key.bin]\",IV=0x0123\r\n\
#EXT-X-MAP:URI=\"P[init.mp4|https://cdn.example/hls/v1/init.mp4]\",BYTERANGE=\"720@0\"\r\n\
# a comment with URI=\"nope\"\r\n\
\r\n\
#EXTINF:4.0,\r\n#EXT-X-BYTERANGE:1000@720\r\nP[main.mp4|https://cdn.example/hls/v1/main.mp4]\r\n\
#EXT-X-KEY:METHOD=SAMPLE-AES,URI=\"skd://key-id\",KEYFORMAT=\"com.apple.streamingkeydelivery\"\r\n\
#EXTINF:4.0,\r\nP[seg2.ts|http://other.example/seg2.ts]\r\n#EXT-X-ENDLIST";
        assert_eq!(out, expect);
        assert_eq!(out.lines().count(), src.lines().count());
    }

    #[test]
    fn ll_hls_tags() {
        let src = "#EXTM3U\n\
#EXT-X-PART:DURATION=0.33,URI=\"part1.m4s\",INDEPENDENT=YES\n\
#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part2.m4s\"\n\
#EXT-X-RENDITION-REPORT:URI=\"../low/index.m3u8\",LAST-MSN=10\n";
        let out = rewrite(src, &base(), mark);
        assert!(out.contains("URI=\"P[part1.m4s|https://cdn.example/hls/v1/part1.m4s]\",INDEPENDENT=YES"));
        assert!(out.contains("PRELOAD-HINT:TYPE=PART,URI=\"P[part2.m4s|https://cdn.example/hls/v1/part2.m4s]\""));
        assert!(out.contains("URI=\"P[index.m3u8|https://cdn.example/hls/low/index.m3u8]\",LAST-MSN=10"));
    }

    #[test]
    fn data_uris_and_detection() {
        let src = "#EXTM3U\n#EXT-X-KEY:METHOD=AES-128,URI=\"data:text/plain;base64,AAAA\"\ndata:,x\n";
        assert_eq!(rewrite(src, &base(), mark), src);
        let bom = "\u{feff}#EXTM3U\nseg.ts\n";
        assert_eq!(rewrite(bom, &base(), mark), "\u{feff}#EXTM3U\nP[seg.ts|https://cdn.example/hls/v1/seg.ts]\n");
        assert!(looks_like_playlist(b"#EXTM3U\n"));
        assert!(looks_like_playlist(b"\xEF\xBB\xBF#EXTM3U\r\n"));
        assert!(!looks_like_playlist(b"\x47\x40\x00"));
        assert!(!looks_like_playlist(b" #EXTM3U"));
    }

    #[test]
    fn hints() {
        assert_eq!(hint_for(&Url::parse("https://a/b/seg001.ts?x=1").unwrap()), "seg001.ts");
        assert_eq!(hint_for(&Url::parse("https://a/b/").unwrap()), "stream");
        assert_eq!(hint_for(&Url::parse("https://a").unwrap()), "stream");
        assert_eq!(hint_for(&Url::parse("https://a/x%20y.ts").unwrap()), "x%20y.ts");
    }
}
