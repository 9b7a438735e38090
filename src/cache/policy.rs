//! What the cache may share and store, and for how long: pure rules on the
//! upstream's header (and, for playlists, its body), after RFC 9111 as a
//! shared cache reads it, narrowed to what a video proxy needs.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use http::StatusCode;
use pingora_http::ResponseHeader;

use crate::content_type;
use crate::headers::{self, ContentRange};
use crate::hls;

/// The `Cache-Control` directives the cache reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub private: bool,
    pub no_cache: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
}

impl CacheControl {
    pub fn of(h: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in h.get_all(header::CACHE_CONTROL) {
            // Lossy, never skipped: a value with a stray non-ASCII byte
            // (`private, x="ä"`) still says `private`.
            let value = String::from_utf8_lossy(value.as_bytes());
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let seconds = || arg.and_then(headers::digits);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    // `private="Set-Cookie"` names fields; any form keeps it out.
                    "private" => cc.private = true,
                    "no-cache" => cc.no_cache = true,
                    "max-age" => cc.max_age = seconds().or(Some(0)),
                    "s-maxage" => cc.s_maxage = seconds().or(Some(0)),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Whether an answer may be shared with other requests at all: never when
/// it is `no-store`, `private` or sets a cookie (each such request goes
/// upstream itself).
pub fn shareable(h: &HeaderMap) -> bool {
    let cc = CacheControl::of(h);
    !(cc.no_store || cc.private || h.contains_key(header::SET_COOKIE))
}

/// What a fill does with the upstream's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Fill it into memory (`len` body bytes) for every waiting request;
    /// `whole`: a `200` (or a `206` for all of it) that ranges can be
    /// answered from.
    Fill { len: u64, whole: bool },
    /// Hand it to the request that asked; the others go upstream themselves.
    Decline,
}

/// Whether an answer is filled: shareable, of a known length (not chunked)
/// within `max_object`, and either the whole object (`200`, or a `206`
/// covering all of it) or an error status passed through as it is. A
/// partial `206` describes only some bytes of the object: declined.
pub fn admit(up: &ResponseHeader, max_object: u64) -> Admission {
    let h = &up.headers;
    if !shareable(h) || h.contains_key(header::TRANSFER_ENCODING) {
        return Admission::Decline;
    }
    let Some(len) = headers::content_length(h).filter(|n| *n <= max_object) else {
        return Admission::Decline;
    };
    match up.status {
        StatusCode::OK if !h.contains_key(header::CONTENT_RANGE) => Admission::Fill { len, whole: true },
        StatusCode::PARTIAL_CONTENT => match headers::content_range(h) {
            Some(r) if r.is_whole() && r.total == Some(len) => Admission::Fill { len, whole: true },
            _ => Admission::Decline,
        },
        s if s.is_client_error() || s.is_server_error() => Admission::Fill { len, whole: false },
        _ => Admission::Decline,
    }
}

/// Whether a declined answer is a whole object sent without a length
/// (chunked, or until the connection closes) that may be shared: a `200`,
/// not `no-store`, `private` or setting a cookie. A playlist such as this
/// is read whole anyway, so the requests that come meanwhile can share it.
pub fn unsized_whole(up: &ResponseHeader) -> bool {
    let h = &up.headers;
    let no_length = h.contains_key(header::TRANSFER_ENCODING) || headers::content_length(h).is_none();
    up.status == StatusCode::OK && no_length && !h.contains_key(header::CONTENT_RANGE) && shareable(h)
}

/// The header a whole object is stored with: a `206` for all of it becomes
/// the `200` it stands for ([`headers::whole_of_part`]).
pub fn as_whole(mut up: ResponseHeader) -> ResponseHeader {
    if up.status == StatusCode::PARTIAL_CONTENT {
        headers::whole_of_part(&mut up);
    }
    up
}

/// The header a HEAD's answer is kept with, when it is kept: a plain `200`
/// (also the HEAD fallback's, when the upstream ignored its range), or a
/// `206` — to a HEAD with a `Range` (nginx answers those so), or the
/// fallback's one byte — as the `200` it stands for.
pub fn head_only(up: &ResponseHeader) -> Option<ResponseHeader> {
    let mut out = up.clone();
    if up.status == StatusCode::PARTIAL_CONTENT {
        headers::content_range(&up.headers).and_then(ContentRange::bytes)?;
        headers::whole_of_part(&mut out);
    }
    let plain = out.status == StatusCode::OK && !out.headers.contains_key(header::CONTENT_RANGE);
    (plain && headers::content_length(&out.headers).is_some()).then_some(out)
}

/// What the HEADs that waited for a HEAD are answered with, of its answer
/// `up`: the whole object's header (`true`: kept too, see [`head_only`]),
/// or, as it is (`false`), an answer the same for every request — an error
/// status other than `416`, a `200` that is not a whole object's header.
/// `None`: not to be shared (`no-store`, `private`, `Set-Cookie`), or an
/// answer only to that request's own range or conditionals (`304`, `416`,
/// a `206` without the total).
pub fn shared_head(up: &ResponseHeader) -> Option<(ResponseHeader, bool)> {
    if !shareable(&up.headers) {
        return None;
    }
    if let Some(whole) = head_only(up) {
        return Some((whole, true));
    }
    let s = up.status;
    let same_for_all =
        s == StatusCode::OK || s.is_server_error() || (s.is_client_error() && s != StatusCode::RANGE_NOT_SATISFIABLE);
    same_for_all.then(|| (up.clone(), false))
}

/// The freshness settings of `cache:`.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// When the upstream gives none.
    pub ttl: Duration,
    /// VOD and master playlists (live ones: half their target duration).
    pub playlist_ttl: Duration,
}

/// What an object is, for its default lifetime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Media,
    /// A master or VOD playlist (or one whose body cannot be read).
    Playlist,
    /// A media playlist without `#EXT-X-ENDLIST`, with its target duration.
    Live(f64),
}

impl Kind {
    /// From the stored header, the URL's path and the body's first bytes.
    pub fn of(up: &ResponseHeader, path: &str, body: &[u8]) -> Kind {
        let typed =
            up.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(content_type::is_hls_type);
        let encoded =
            up.headers.get(header::CONTENT_ENCODING).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let sniffed = !encoded && hls::looks_like_playlist(body);
        if !(typed || sniffed || content_type::is_playlist_path(path)) {
            return Kind::Media;
        }
        if encoded || !hls::looks_like_playlist(body) {
            return Kind::Playlist;
        }
        let summary = hls::Summary::of(&String::from_utf8_lossy(body));
        match summary.target_duration {
            Some(target) if !summary.master && !summary.ended => Kind::Live(target),
            _ => Kind::Playlist,
        }
    }
}

/// How long a whole object (`200`) stays fresh from when its header
/// arrived, or `None` when it is not stored: `no-store`, `private`,
/// `no-cache`, a zero lifetime, `Set-Cookie`, `Vary: *`, another status.
/// The upstream's `s-maxage`, `max-age` or `Expires` (less its `Age`) win;
/// else a live playlist lives half its target duration, other playlists
/// `playlist_ttl`, the rest `ttl`.
pub fn lifetime(up: &ResponseHeader, kind: Kind, now: SystemTime, cfg: &Lifetimes) -> Option<Duration> {
    let h = &up.headers;
    let cc = CacheControl::of(h);
    let vary_any =
        h.get_all(header::VARY).iter().any(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii() == b"*"));
    if up.status != StatusCode::OK
        || cc.no_store
        || cc.private
        || cc.no_cache
        || vary_any
        || h.contains_key(header::SET_COOKIE)
    {
        return None;
    }
    let age = h.get(header::AGE).and_then(|v| headers::digits(v.to_str().ok()?)).unwrap_or(0);
    let date = |name| h.get(name).and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok());
    let given = cc.s_maxage.or(cc.max_age).map(Duration::from_secs).or_else(|| {
        // An Expires that does not parse is a time in the past (RFC 9111 §5.3).
        let expires = h.get(header::EXPIRES).map(|_| date(header::EXPIRES).unwrap_or(SystemTime::UNIX_EPOCH))?;
        Some(expires.duration_since(date(header::DATE).unwrap_or(now)).unwrap_or_default())
    });
    let lifetime = match given {
        Some(given) => given.saturating_sub(Duration::from_secs(age)),
        None => match kind {
            Kind::Media => cfg.ttl,
            Kind::Playlist => cfg.playlist_ttl,
            Kind::Live(target) => Duration::from_secs_f64((target / 2.0).clamp(0.0, 86_400.0)),
        },
    };
    (!lifetime.is_zero()).then_some(lifetime.min(MAX_LIFETIME))
}

/// The longest an object is kept, whatever the upstream says: a
/// `max-age` of 2^64 - 1 is a number, but no time this process will see
/// (added to the clock, it overflowed). Least recently used goes first
/// long before.
pub const MAX_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::test_response as resp;

    const CFG: Lifetimes = Lifetimes { ttl: Duration::from_secs(600), playlist_ttl: Duration::from_secs(60) };

    fn life(up: &ResponseHeader, kind: Kind) -> Option<u64> {
        lifetime(up, kind, SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000), &CFG).map(|d| d.as_secs())
    }

    #[test]
    fn what_is_read_whole_when_it_has_no_length() {
        assert!(unsized_whole(&resp(200, &[("Transfer-Encoding", "chunked")])));
        assert!(unsized_whole(&resp(200, &[])), "until the connection closes");
        assert!(!unsized_whole(&resp(200, &[("Content-Length", "10")])), "a length: filled as any object");
        assert!(!unsized_whole(&resp(404, &[("Transfer-Encoding", "chunked")])));
        assert!(!unsized_whole(&resp(206, &[("Content-Range", "bytes 0-9/100")])));
        for never in [
            ("Cache-Control", "no-store"),
            ("Cache-Control", "private"),
            ("Cache-Control", "private, x=\"ä\""),
            ("Set-Cookie", "a=b"),
        ] {
            assert!(!unsized_whole(&resp(200, &[never])), "{never:?} is not shared");
        }
    }

    #[test]
    fn what_is_filled() {
        let cl = ("Content-Length", "1000");
        assert_eq!(admit(&resp(200, &[cl]), 1000), Admission::Fill { len: 1000, whole: true });
        assert_eq!(admit(&resp(200, &[cl]), 999), Admission::Decline, "larger than max_object_bytes");
        assert_eq!(admit(&resp(200, &[]), 1000), Admission::Decline, "unknown length");
        assert_eq!(admit(&resp(200, &[("Transfer-Encoding", "chunked")]), 1000), Admission::Decline);
        let whole = resp(206, &[cl, ("Content-Range", "bytes 0-999/1000")]);
        assert_eq!(admit(&whole, 1000), Admission::Fill { len: 1000, whole: true });
        let part = resp(206, &[("Content-Length", "10"), ("Content-Range", "bytes 0-9/1000")]);
        assert_eq!(admit(&part, 1000), Admission::Decline, "a partial 206 is not the object");
        assert_eq!(admit(&resp(404, &[("Content-Length", "9")]), 1000), Admission::Fill { len: 9, whole: false });
        assert_eq!(admit(&resp(304, &[("Content-Length", "0")]), 1000), Admission::Decline);
        for never in [
            ("Cache-Control", "no-store"),
            ("Cache-Control", "private"),
            ("Cache-Control", "private, x=\"ä\""),
            ("Set-Cookie", "a=b"),
        ] {
            assert_eq!(admit(&resp(200, &[cl, never]), 1000), Admission::Decline, "{never:?} is not even shared");
        }
        // no-cache is shared with concurrent requests, but never stored (below).
        assert_eq!(
            admit(&resp(200, &[cl, ("Cache-Control", "no-cache")]), 1000),
            Admission::Fill { len: 1000, whole: true }
        );
        let stored = as_whole(whole);
        assert_eq!(stored.status, 200);
        assert!(!stored.headers.contains_key("content-range"));
        assert_eq!(stored.headers["accept-ranges"], "bytes", "memory answers ranges, and the upstream did");
    }

    #[test]
    fn how_long_it_is_kept() {
        let media = resp(200, &[("Content-Length", "1")]);
        assert_eq!(life(&media, Kind::Media), Some(600));
        assert_eq!(life(&media, Kind::Playlist), Some(60));
        assert_eq!(life(&media, Kind::Live(6.0)), Some(3));
        assert_eq!(life(&resp(200, &[("Cache-Control", "public, max-age=30")]), Kind::Media), Some(30));
        assert_eq!(life(&resp(200, &[("Cache-Control", "max-age=30, s-maxage=90")]), Kind::Live(6.0)), Some(90));
        assert_eq!(life(&resp(200, &[("Cache-Control", "max-age=30"), ("Age", "10")]), Kind::Media), Some(20));
        let forever = resp(200, &[("Cache-Control", "max-age=18446744073709551615")]);
        assert_eq!(life(&forever, Kind::Media), Some(MAX_LIFETIME.as_secs()), "a number, but no time");
        let far = resp(200, &[("Expires", "Fri, 31 Dec 9999 23:59:59 GMT")]);
        assert_eq!(life(&far, Kind::Media), Some(MAX_LIFETIME.as_secs()));
        let dated = [("Date", "Tue, 01 Jul 2025 10:00:00 GMT"), ("Expires", "Tue, 01 Jul 2025 10:05:00 GMT")];
        assert_eq!(life(&resp(200, &dated), Kind::Media), Some(300));
        assert_eq!(life(&resp(200, &[("Expires", "0")]), Kind::Media), None, "an invalid Expires is in the past");
        for never in [
            ("Cache-Control", "no-store"),
            ("Cache-Control", "private"),
            ("Cache-Control", "no-cache"),
            ("Cache-Control", "max-age=0"),
            ("Cache-Control", "s-maxage=0, max-age=60"),
            ("Set-Cookie", "a=b"),
            ("Vary", "Accept, *"),
            // A stray non-ASCII byte hides nothing.
            ("Cache-Control", "no-store, x=\"ä\""),
            ("Vary", "*, ä"),
        ] {
            assert_eq!(life(&resp(200, &[never]), Kind::Media), None, "{never:?}");
        }
        assert_eq!(life(&resp(404, &[]), Kind::Media), None, "only whole objects are stored");
    }

    #[test]
    fn playlists_are_told_apart() {
        let hls = resp(200, &[("Content-Type", "application/vnd.apple.mpegurl")]);
        let bin = resp(200, &[("Content-Type", "application/octet-stream")]);
        let live = b"#EXTM3U\n#EXT-X-TARGETDURATION:6\n#EXTINF:6,\na.ts\n";
        let vod = b"#EXTM3U\n#EXT-X-TARGETDURATION:6\n#EXTINF:6,\na.ts\n#EXT-X-ENDLIST\n";
        let master = b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlow.m3u8\n";
        assert_eq!(Kind::of(&hls, "/x", live), Kind::Live(6.0));
        assert_eq!(Kind::of(&bin, "/x", live), Kind::Live(6.0), "sniffed");
        assert_eq!(Kind::of(&bin, "/v.m3u8", vod), Kind::Playlist);
        assert_eq!(Kind::of(&bin, "/x", master), Kind::Playlist);
        assert_eq!(Kind::of(&bin, "/seg.ts", b"\x47\x40"), Kind::Media);
        let gz = resp(200, &[("Content-Type", "application/x-mpegurl"), ("Content-Encoding", "gzip")]);
        assert_eq!(Kind::of(&gz, "/x", b"\x1f\x8b"), Kind::Playlist);
    }

    #[test]
    fn head_answers_kept() {
        let plain = resp(200, &[("Content-Length", "5000"), ("ETag", "\"e\"")]);
        assert_eq!(head_only(&plain).unwrap().headers["content-length"], "5000");
        let probe = resp(206, &[("Content-Length", "1"), ("Content-Range", "bytes 0-0/5000")]);
        let kept = head_only(&probe).unwrap();
        assert_eq!((kept.status.as_u16(), &kept.headers["content-length"]), (200, &http::HeaderValue::from(5000)));
        assert_eq!(kept.headers["accept-ranges"], "bytes");
        // The fallback GET's range ignored: its 200 is the whole object's header.
        let ignored = resp(200, &[("Content-Length", "5000")]);
        assert_eq!(head_only(&ignored).unwrap().headers["content-length"], "5000");
        let odd = resp(200, &[("Content-Length", "1"), ("Content-Range", "bytes 0-0/5000")]);
        assert!(head_only(&odd).is_none(), "a 200 with a Content-Range is no whole object");
        assert!(head_only(&resp(404, &[("Content-Length", "3")])).is_none());
        assert!(head_only(&resp(200, &[])).is_none(), "no length");
        let unknown = resp(206, &[("Content-Length", "1"), ("Content-Range", "bytes 0-0/*")]);
        assert!(head_only(&unknown).is_none(), "no total, no length");
    }

    #[test]
    fn head_answers_shared() {
        let whole = |r: &ResponseHeader| shared_head(r).map(|(_, whole)| whole);
        assert_eq!(whole(&resp(200, &[("Content-Length", "5000")])), Some(true));
        assert_eq!(whole(&resp(206, &[("Content-Range", "bytes 0-0/5000")])), Some(true));
        assert_eq!(whole(&resp(200, &[])), Some(false), "no length: shared as it is");
        assert_eq!(whole(&resp(404, &[("Content-Length", "9")])), Some(false));
        assert_eq!(whole(&resp(503, &[("Retry-After", "5")])), Some(false));
        assert_eq!(whole(&resp(206, &[("Content-Range", "bytes 0-0/*")])), None, "only that request's range");
        assert_eq!(whole(&resp(416, &[("Content-Range", "bytes */5000")])), None);
        assert_eq!(whole(&resp(304, &[])), None);
        for never in [
            ("Cache-Control", "no-store"),
            ("Cache-Control", "private"),
            ("Cache-Control", "private, x=\"ä\""),
            ("Set-Cookie", "a=b"),
        ] {
            assert_eq!(whole(&resp(200, &[("Content-Length", "5000"), never])), None, "{never:?}");
            assert_eq!(whole(&resp(404, &[never])), None, "{never:?}");
        }
        let (kept, _) = shared_head(&resp(206, &[("Content-Range", "bytes 0-0/5000")])).unwrap();
        assert_eq!((kept.status.as_u16(), &kept.headers["content-length"]), (200, &http::HeaderValue::from(5000)));
    }
}
