//! Content-Type from a file extension, used only when the upstream sent none.

pub const HLS: &str = "application/vnd.apple.mpegurl";
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The extension of the last segment of a URL path, lower-cased.
pub fn extension(path: &str) -> Option<String> {
    let last = path.rsplit('/').next()?;
    let (_, ext) = last.rsplit_once('.')?;
    (!ext.is_empty() && ext.len() <= 8).then(|| ext.to_ascii_lowercase())
}

/// The media type for an extension, if it is one players care about.
pub fn for_extension(ext: &str) -> Option<&'static str> {
    Some(match ext {
        "mp4" | "m4v" => "video/mp4",
        "m4s" => "video/iso.segment",
        "mkv" => "video/x-matroska",
        "webm" => "video/webm",
        "ts" | "m2ts" | "mts" => "video/mp2t",
        "mov" => "video/quicktime",
        "avi" => "video/x-msvideo",
        "flv" => "video/x-flv",
        "mpd" => "application/dash+xml",
        "m3u8" | "m3u" => HLS,
        "mp3" => "audio/mpeg",
        "aac" => "audio/aac",
        "m4a" => "audio/mp4",
        "ogg" | "oga" => "audio/ogg",
        "opus" => "audio/opus",
        "flac" => "audio/flac",
        "wav" => "audio/wav",
        "vtt" => "text/vtt",
        "srt" => "application/x-subrip",
        "ass" | "ssa" => "text/x-ssa",
        "key" => OCTET_STREAM,
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "webp" => "image/webp",
        _ => return None,
    })
}

/// The type to send when upstream gave none: from the upstream URL's path,
/// else from the client's `{hint}`, else `application/octet-stream`.
pub fn guess(upstream_path: &str, hint: Option<&str>) -> &'static str {
    extension(upstream_path)
        .and_then(|e| for_extension(&e))
        .or_else(|| hint.and_then(extension).and_then(|e| for_extension(&e)))
        .unwrap_or(OCTET_STREAM)
}

/// Whether a media type names an HLS playlist (case-insensitive, with
/// parameters).
pub fn is_hls_type(ct: &str) -> bool {
    let base = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    matches!(
        base.as_str(),
        "application/vnd.apple.mpegurl" | "application/x-mpegurl" | "audio/mpegurl" | "audio/x-mpegurl"
    )
}

/// Types under which a playlist may hide: generic ones, where the body
/// decides.
pub fn is_generic_type(ct: Option<&str>) -> bool {
    match ct {
        None => true,
        Some(ct) => {
            let base = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            matches!(base.as_str(), "" | "text/plain" | "application/octet-stream" | "binary/octet-stream")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn hls_types() {
        assert!(is_hls_type("application/vnd.apple.mpegurl"));
        assert!(is_hls_type("Application/X-MpegURL; charset=utf-8"));
        assert!(is_hls_type("audio/mpegurl"));
        assert!(!is_hls_type("video/mp2t"));
        assert!(is_generic_type(None));
        assert!(is_generic_type(Some("text/plain; charset=UTF-8")));
        assert!(!is_generic_type(Some("video/mp4")));
    }
}
