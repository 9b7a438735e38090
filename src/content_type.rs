//! Content-Type from a file extension, used only when the upstream sent none.

pub const HLS: &str = "application/vnd.apple.mpegurl";
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The extension of the last segment of a URL path, as written (compare
/// it case-insensitively). Runs on every request: no allocation.
pub fn extension(path: &str) -> Option<&str> {
    let last = path.rsplit('/').next()?;
    let (_, ext) = last.rsplit_once('.')?;
    (!ext.is_empty() && ext.len() <= MAX_EXT).then_some(ext)
}

/// Whether a URL path names a playlist: it ends in `.m3u8` or `.m3u` (any case).
pub fn is_playlist_path(path: &str) -> bool {
    // What `extension` would find, read from the end only: every request's
    // path (and hint) is asked.
    let ends_with = |suffix: &[u8]| {
        let p = path.as_bytes();
        p.len() >= suffix.len() && p[p.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
    };
    ends_with(b".m3u8") || ends_with(b".m3u")
}

const MAX_EXT: usize = 8;

/// The media type for an extension (any case), if it is one players care about.
pub fn for_extension(ext: &str) -> Option<&'static str> {
    let mut buf = [0u8; MAX_EXT];
    let lower = buf.get_mut(..ext.len())?;
    lower.copy_from_slice(ext.as_bytes());
    lower.make_ascii_lowercase();
    Some(match &*lower {
        b"mp4" | b"m4v" => "video/mp4",
        b"m4s" => "video/iso.segment",
        b"mkv" => "video/x-matroska",
        b"webm" => "video/webm",
        b"ts" | b"m2ts" | b"mts" => "video/mp2t",
        b"mov" => "video/quicktime",
        b"avi" => "video/x-msvideo",
        b"flv" => "video/x-flv",
        b"mpd" => "application/dash+xml",
        b"m3u8" | b"m3u" => HLS,
        b"mp3" => "audio/mpeg",
        b"aac" => "audio/aac",
        b"m4a" => "audio/mp4",
        b"ogg" | b"oga" => "audio/ogg",
        b"opus" => "audio/opus",
        b"flac" => "audio/flac",
        b"wav" => "audio/wav",
        b"vtt" => "text/vtt",
        b"srt" => "application/x-subrip",
        b"ass" | b"ssa" => "text/x-ssa",
        b"key" => OCTET_STREAM,
        b"jpg" | b"jpeg" => "image/jpeg",
        b"png" => "image/png",
        b"webp" => "image/webp",
        _ => return None,
    })
}

/// The type to send when upstream gave none: from the upstream URL's path,
/// else from the client's `{hint}`, else `application/octet-stream`.
pub fn guess(upstream_path: &str, hint: Option<&str>) -> &'static str {
    extension(upstream_path)
        .and_then(for_extension)
        .or_else(|| hint.and_then(extension).and_then(for_extension))
        .unwrap_or(OCTET_STREAM)
}

/// Whether a media type names an HLS playlist (case-insensitive, with
/// parameters).
pub fn is_hls_type(ct: &str) -> bool {
    base_type_is(
        ct,
        &[
            "application/vnd.apple.mpegurl",
            "application/x-mpegurl",
            "application/mpegurl",
            "audio/mpegurl",
            "audio/x-mpegurl",
        ],
    )
}

/// The media type without its parameters.
fn base_type(ct: &str) -> &str {
    // A byte search, not `split`: every answer's type is asked.
    let end = ct.bytes().position(|b| b == b';').unwrap_or(ct.len());
    ct[..end].trim()
}

/// Whether the media type without parameters is one of `types` (lower-case).
fn base_type_is(ct: &str, types: &[&str]) -> bool {
    let base = base_type(ct);
    types.iter().any(|t| t.eq_ignore_ascii_case(base))
}

/// Whether a browser opening an answer of this type would render it as a
/// document that can run scripts (HTML, XHTML, SVG, XML with a stylesheet).
pub fn is_document(ct: &str) -> bool {
    base_type_is(
        ct,
        &["text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml", "text/xsl"],
    )
}

/// Types under which a playlist may hide, where the body decides: none,
/// generic binary ones and any text type.
pub fn is_generic_type(ct: Option<&str>) -> bool {
    match ct {
        None => true,
        // Any text type: a script's default (PHP and CGI say `text/html`)
        // or a plain-text server's. A disguised segment typed `text/html`
        // only costs its first bytes read before they are relayed.
        Some(ct) => {
            base_type(ct).as_bytes().get(..5).is_some_and(|t| t.eq_ignore_ascii_case(b"text/"))
                || base_type_is(ct, &["", "application/octet-stream", "binary/octet-stream"])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents() {
        for doc in ["text/html", "Text/HTML; charset=utf-8", "image/svg+xml", "application/xhtml+xml", "text/xml"] {
            assert!(is_document(doc), "{doc}");
        }
        for media in ["video/mp4", "text/plain", "text/vtt", HLS, OCTET_STREAM, "application/json", ""] {
            assert!(!is_document(media), "{media}");
        }
    }

    #[test]
    fn table() {
        assert_eq!(guess("/v/ep1.MP4", None), "video/mp4");
        assert_eq!(guess("/v/ep1.mkv", Some("x.mp4")), "video/x-matroska");
        assert_eq!(guess("/get", Some("seg-001.ts")), "video/mp2t");
        assert_eq!(guess("/get", Some("index.m3u8")), HLS);
        assert_eq!(guess("/get", Some("x.m4s")), "video/iso.segment");
        assert_eq!(guess("/a.b/get", None), OCTET_STREAM);
        assert_eq!(guess("/x.webm", None), "video/webm");
        assert_eq!(guess("/x.mp3", None), "audio/mpeg");
        assert_eq!(guess("/x.aac", None), "audio/aac");
        assert_eq!(guess("/x.vtt", None), "text/vtt");
        assert_eq!(guess("/x.unknownext", Some("noext")), OCTET_STREAM);
        assert_eq!(guess("/x.TS", None), "video/mp2t");
        assert!(is_playlist_path("/a/Index.M3U8"));
        assert!(is_playlist_path("/radio/list.m3u"));
        assert!(!is_playlist_path("/a/index.m3u8/seg.ts"));
        assert!(!is_playlist_path("/a/m3u8"));
        assert!(is_playlist_path("/.m3u8") && !is_playlist_path("") && !is_playlist_path("m3u"));
    }

    proptest::proptest! {
        /// Read from the end, it agrees with the extension of the last segment.
        #[test]
        fn playlist_paths_are_those_of_a_playlist_extension(path in "[/a-zA-Z.]{0,4}(\\.[mM]3[uU]8?)?[/.a-z]{0,3}") {
            let by_extension = extension(&path).is_some_and(|e| e.eq_ignore_ascii_case("m3u8") || e.eq_ignore_ascii_case("m3u"));
            proptest::prop_assert_eq!(is_playlist_path(&path), by_extension);
        }
    }

    #[test]
    fn hls_types() {
        assert!(is_hls_type("application/vnd.apple.mpegurl"));
        assert!(is_hls_type("Application/X-MpegURL; charset=utf-8"));
        assert!(is_hls_type("audio/mpegurl"));
        assert!(is_hls_type("application/mpegurl"), "what some streaming servers send");
        assert!(!is_hls_type("video/mp2t"));
        assert!(is_generic_type(None));
        assert!(is_generic_type(Some("text/plain; charset=UTF-8")));
        assert!(is_generic_type(Some("Text/HTML; charset=UTF-8")), "a PHP endpoint's default");
        assert!(!is_generic_type(Some("textual/x")));
        assert!(!is_generic_type(Some("video/mp4")));
    }
}
