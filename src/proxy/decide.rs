//! What to do with an upstream response — relay it, look at its first
//! bytes, rewrite it as a playlist, or fetch it again whole — and the header
//! the client gets. Pure: decided from the upstream header, what was asked,
//! and (when the decision asks for them) the body's first bytes.

use http::header::{self, HeaderValue};
use http::StatusCode;
use pingora_error::Result;
use pingora_http::ResponseHeader;

use crate::content_type;
use crate::headers::{self, ContentRange};
use crate::hls;

/// How a playlist's children are pointed back through the proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Children {
    /// Not at all: the playlist goes out as it is, only its type fixed (an
    /// open static route: players follow its relative URIs through it).
    #[default]
    Untouched,
    /// As signed relay URLs (the relay, `/strm/stream`).
    Relay,
    /// As this static route's own signed URLs where they lie under its
    /// upstream, else as relay URLs (a route with auth).
    Route(usize),
}

/// What the client asked, as far as answering it goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked<'a> {
    /// What a playlist's children become.
    pub children: Children,
    /// The upstream URL's path or the client's `{hint}` names a playlist.
    pub known_playlist: bool,
    /// The relay's cosmetic file name.
    pub hint: Option<&'a str>,
    /// The client sent a `Range`.
    pub range: bool,
    /// The client asked `HEAD`: no body goes out.
    pub head: bool,
    /// The client speaks HTTP/1.1 (chunked framing is possible).
    pub http11: bool,
}

/// The upstream's answer, as far as the decision cares.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub header: &'a ResponseHeader,
    /// The final upstream URL's path (a type is guessed from it when none came).
    pub path: &'a str,
    /// The upstream was sent a HEAD: the response has no body to look at.
    pub head_sent: bool,
    /// The response is a `GET` + `Range` standing in for a HEAD the
    /// upstream refused.
    pub head_fallback: bool,
    /// The header policy is applied already (a stored header: once per
    /// object, not once per answer).
    pub relayable: bool,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Relay the response as it is (its type set to HLS's when `hls`).
    Relay { hls: bool },
    /// Read the body's first bytes (at least [`SNIFF`]) and decide again with them.
    Sniff,
    /// A whole playlist: read it, rewrite it, answer 200 with it.
    Playlist,
    /// A playlist (or maybe one) that this response cannot give whole:
    /// fetch the URL again whole, as a `GET`, and decide again.
    Refetch,
}

/// How many first bytes a sniff needs: `#EXTM3U` after a byte-order mark.
pub const SNIFF: usize = 16;

pub fn decide(asked: &Asked<'_>, answer: &Answer<'_>, first: Option<&[u8]>) -> Decision {
    let up = answer.header;
    let h = &up.headers;
    let ctype = h.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("?"));
    let typed = ctype.is_some_and(content_type::is_hls_type);
    let generic = content_type::is_generic_type(ctype);
    let hinted = asked.known_playlist || typed;
    let encoded = h.get(header::CONTENT_ENCODING).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let status = up.status;
    let relay = Decision::Relay { hls: false };

    if asked.children == Children::Untouched {
        // Static routes: bytes untouched, only the type fixed.
        if status != StatusCode::OK {
            return relay;
        }
        if hinted {
            return Decision::Relay { hls: true };
        }
        if !generic || answer.head_sent || answer.head_fallback || encoded {
            return relay;
        }
        return match first {
            None => Decision::Sniff,
            Some(b) => Decision::Relay { hls: hls::looks_like_playlist(b) },
        };
    }

    if status != StatusCode::OK && status != StatusCode::PARTIAL_CONTENT {
        // 304, 416, errors: passed through as they are.
        return relay;
    }
    if !(hinted || generic) {
        return relay;
    }
    if answer.head_sent || answer.head_fallback {
        // A HEAD reaches the upstream as one HEAD (and the fallback's one
        // byte): only a playlist the URL or the type names is answered from
        // a GET of it (for its rewritten length); a generic type is no
        // reason to start a whole file.
        return if hinted { Decision::Refetch } else { relay };
    }
    let range = headers::content_range(h);
    let at_start =
        status == StatusCode::OK || range.and_then(ContentRange::bytes).is_some_and(|(first, _, _)| first == 0);
    let whole = status == StatusCode::OK || range.is_some_and(ContentRange::is_whole);
    if encoded || !at_start {
        // The first bytes cannot tell: the URL or the type decides.
        return match (hinted, whole) {
            (false, _) => relay,
            (true, true) => Decision::Playlist,
            (true, false) => Decision::Refetch,
        };
    }
    match first {
        None => Decision::Sniff,
        Some(b) if hls::looks_like_playlist(b) => {
            if whole {
                Decision::Playlist
            } else {
                Decision::Refetch
            }
        }
        Some(_) => relay,
    }
}

/// The client's header for a relayed response: the upstream's minus what
/// the header policy drops; for the HEAD fallback the whole resource's
/// status and length; a type when the upstream gave none or an empty one
/// (from the URL's path, else the `{hint}`) unless the status has no
/// content (a 304 names no type: a client's cache would take a guessed one
/// for the type of what it holds, RFC 9111 §4.3.4); HLS's type when `hls`;
/// a sandbox for a hoster's document; chunked framing when there is a body
/// and no length.
pub fn relay_header(asked: &Asked<'_>, answer: &Answer<'_>, hls: bool) -> Result<ResponseHeader> {
    let mut out = if answer.relayable { answer.header.clone() } else { headers::relayed(answer.header) };
    if answer.head_fallback && !asked.range && out.status == StatusCode::PARTIAL_CONTENT {
        // The HEAD answered through `GET` + `Range: bytes=0-0`: report the
        // whole resource, as the HEAD would have.
        headers::whole_of_part(&mut out);
    }
    let contentless = contentless(out.status);
    if hls {
        out.insert_header(header::CONTENT_TYPE, content_type::HLS)?;
    } else if !contentless && out.headers.get(header::CONTENT_TYPE).is_none_or(|t| t.as_bytes().trim_ascii().is_empty())
    {
        // An empty `Content-Type` names no type either.
        out.insert_header(header::CONTENT_TYPE, content_type::guess(answer.path, asked.hint))?;
    }
    let third_party = matches!(asked.children, Children::Relay);
    let document = |out: &ResponseHeader| {
        let t = out.headers.get(header::CONTENT_TYPE);
        t.is_some_and(|t| content_type::is_document(&String::from_utf8_lossy(t.as_bytes())))
    };
    if third_party && document(&out) {
        // A hoster's page (the relay's and `/strm/stream`'s URLs come from
        // anywhere) opened in a browser runs sandboxed, in no origin: where
        // the proxy shares an origin with other apps (a sub-path beside
        // Jellyfin), its scripts would otherwise act there. A static
        // route's upstream is the operator's own, and its pages may run.
        out.append_header("Content-Security-Policy", "sandbox")?;
    }
    let bodyless = asked.head || contentless;
    if !out.headers.contains_key(header::CONTENT_LENGTH) && !bodyless && asked.http11 {
        out.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(out)
}

/// A status whose response has no content: 1xx, 204, 304 (RFC 9110 §6.4.1).
pub fn contentless(status: StatusCode) -> bool {
    matches!(status.as_u16(), 204 | 304) || status.is_informational()
}

/// The client's header for a rewritten playlist of `len` bytes: always a
/// 200 for the whole of it, of HLS's type, without the upstream's
/// `Content-Range`, `Accept-Ranges`, `ETag` and `Last-Modified` (they
/// describe bytes the client does not get) or its `Content-Encoding`.
pub fn playlist_header(up: &ResponseHeader, len: usize) -> Result<ResponseHeader> {
    let mut out = headers::relayed(up);
    out.set_status(StatusCode::OK)?;
    for name in [
        header::CONTENT_RANGE,
        header::ACCEPT_RANGES,
        header::ETAG,
        header::LAST_MODIFIED,
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
    ] {
        out.remove_header(&name);
    }
    out.insert_header(header::CONTENT_TYPE, content_type::HLS)?;
    out.insert_header(header::CONTENT_LENGTH, HeaderValue::from(len))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::test_response as resp;

    const GET: Asked =
        Asked { children: Children::Relay, known_playlist: false, hint: None, range: false, head: false, http11: true };

    /// Decides on a plain upstream answer with `header`.
    fn decide(asked: &Asked, header: &ResponseHeader, first: Option<&[u8]>) -> Decision {
        super::decide(asked, &answer(header), first)
    }

    fn answer(header: &ResponseHeader) -> Answer<'_> {
        Answer { header, path: "/get", head_sent: false, head_fallback: false, relayable: false }
    }
    const HLS: (&str, &str) = ("Content-Type", "application/x-mpegURL");
    const BIN: (&str, &str) = ("Content-Type", "application/octet-stream");
    const MP4: (&str, &str) = ("Content-Type", "video/mp4");
    const PLAYLIST: &[u8] = b"#EXTM3U\n#EXT-X-";
    const VIDEO: &[u8] = b"\0\0\0\x20ftypisom";
    use Decision::*;

    #[test]
    fn media_is_relayed_without_looking() {
        assert_eq!(decide(&GET, &resp(200, &[MP4]), None), Relay { hls: false });
        assert_eq!(decide(&GET, &resp(206, &[MP4, ("Content-Range", "bytes 0-9/100")]), None), Relay { hls: false });
        for status in [304, 403, 404, 416, 500] {
            assert_eq!(decide(&GET, &resp(status, &[HLS]), None), Relay { hls: false }, "{status}");
        }
    }

    #[test]
    fn possible_playlists_are_sniffed_then_decided_by_their_first_bytes() {
        for up in [resp(200, &[BIN]), resp(200, &[]), resp(200, &[HLS]), resp(200, &[("Content-Type", "text/plain")])] {
            assert_eq!(decide(&GET, &up, None), Sniff);
            assert_eq!(decide(&GET, &up, Some(PLAYLIST)), Playlist);
            assert_eq!(decide(&GET, &up, Some(b"\xEF\xBB\xBF#EXTM3U\n")), Playlist);
            assert_eq!(decide(&GET, &up, Some(VIDEO)), Relay { hls: false });
            assert_eq!(decide(&GET, &up, Some(b"")), Relay { hls: false });
        }
        // A known playlist URL whose body is something else is relayed as it is.
        let known = Asked { known_playlist: true, ..GET };
        assert_eq!(decide(&known, &resp(200, &[("Content-Type", "text/html")]), Some(b"<html>")), Relay { hls: false });
    }

    #[test]
    fn a_partial_playlist_is_fetched_again_whole() {
        let whole = resp(206, &[BIN, ("Content-Range", "bytes 0-99/100")]);
        assert_eq!(decide(&GET, &whole, Some(PLAYLIST)), Playlist);
        let head = resp(206, &[BIN, ("Content-Range", "bytes 0-49/100")]);
        assert_eq!(decide(&GET, &head, Some(PLAYLIST)), Refetch);
        let middle = resp(206, &[HLS, ("Content-Range", "bytes 50-99/100")]);
        assert_eq!(decide(&GET, &middle, None), Refetch, "the type says so; the bytes cannot");
        let middle = resp(206, &[BIN, ("Content-Range", "bytes 50-99/100")]);
        assert_eq!(decide(&GET, &middle, None), Relay { hls: false }, "nothing says so");
    }

    #[test]
    fn compressed_bodies_are_judged_by_url_and_type() {
        let gz = ("Content-Encoding", "gzip");
        assert_eq!(decide(&GET, &resp(200, &[HLS, gz]), None), Playlist);
        assert_eq!(decide(&GET, &resp(206, &[HLS, gz, ("Content-Range", "bytes 0-9/99")]), None), Refetch);
        assert_eq!(decide(&GET, &resp(200, &[BIN, gz]), None), Relay { hls: false });
        let known = Asked { known_playlist: true, ..GET };
        assert_eq!(decide(&known, &resp(200, &[BIN, gz]), None), Playlist);
        assert_eq!(decide(&GET, &resp(200, &[HLS, ("Content-Encoding", "identity")]), None), Sniff);
    }

    #[test]
    fn a_head_learns_what_the_get_would_get() {
        let head = |h: &ResponseHeader, first| super::decide(&GET, &Answer { head_sent: true, ..answer(h) }, first);
        assert_eq!(head(&resp(200, &[HLS]), None), Refetch, "a playlist by its type: its rewritten length");
        assert_eq!(head(&resp(200, &[BIN]), None), Relay { hls: false }, "a generic type starts no whole file");
        assert_eq!(head(&resp(200, &[]), None), Relay { hls: false });
        assert_eq!(head(&resp(200, &[MP4]), None), Relay { hls: false });
        assert_eq!(head(&resp(404, &[HLS]), None), Relay { hls: false });
        let known = Asked { known_playlist: true, ..GET };
        let bin = resp(200, &[BIN]);
        assert_eq!(super::decide(&known, &Answer { head_sent: true, ..answer(&bin) }, None), Refetch);
        // The HEAD fallback's one byte is never a reason for a GET either.
        let probe =
            |h: &ResponseHeader, first| super::decide(&GET, &Answer { head_fallback: true, ..answer(h) }, first);
        let byte = resp(206, &[BIN, ("Content-Range", "bytes 0-0/5000")]);
        assert_eq!(probe(&byte, None), Relay { hls: false });
        assert_eq!(probe(&byte, Some(b"#")), Relay { hls: false });
        assert_eq!(probe(&resp(206, &[HLS, ("Content-Range", "bytes 0-0/5000")]), None), Refetch);
        let later = resp(206, &[BIN, ("Content-Range", "bytes 10-19/5000")]);
        assert_eq!(probe(&later, None), Relay { hls: false });
    }

    #[test]
    fn static_routes_only_fix_the_type() {
        let route = Asked { children: Children::Untouched, ..GET };
        assert_eq!(decide(&route, &resp(200, &[HLS]), None), Relay { hls: true });
        assert_eq!(decide(&Asked { known_playlist: true, ..route }, &resp(200, &[BIN]), None), Relay { hls: true });
        assert_eq!(decide(&route, &resp(200, &[BIN]), None), Sniff);
        assert_eq!(decide(&route, &resp(200, &[BIN]), Some(PLAYLIST)), Relay { hls: true });
        assert_eq!(decide(&route, &resp(206, &[HLS, ("Content-Range", "bytes 0-1/9")]), None), Relay { hls: false });
        let bin = resp(200, &[BIN]);
        let head_sent = Answer { head_sent: true, ..answer(&bin) };
        assert_eq!(super::decide(&route, &head_sent, None), Relay { hls: false });
    }

    #[test]
    fn relay_headers() {
        let asked = Asked { hint: Some("x.mkv"), ..GET };
        let relayed = |asked: &Asked, up: &ResponseHeader| relay_header(asked, &answer(up), false).unwrap();
        let up = resp(200, &[("Content-Length", "5"), ("Connection", "X-Hop"), ("X-Hop", "1"), ("ETag", "\"e\"")]);
        let out = relayed(&asked, &up);
        assert_eq!(out.headers["content-type"], "video/x-matroska", "from the hint");
        assert!(!out.headers.contains_key("x-hop") && !out.headers.contains_key("connection"));
        assert_eq!(out.headers["etag"], "\"e\"");
        // No length and a body: chunked (HTTP/1.1 only).
        let up = resp(200, &[MP4]);
        assert_eq!(relayed(&asked, &up).headers["transfer-encoding"], "chunked");
        assert!(!relayed(&Asked { http11: false, ..asked }, &up).headers.contains_key("transfer-encoding"));
        assert!(!relayed(&Asked { head: true, ..asked }, &up).headers.contains_key("transfer-encoding"));
        // The HEAD fallback reports the whole resource.
        let byte = resp(206, &[MP4, ("Content-Range", "bytes 0-0/777"), ("Content-Length", "1")]);
        let fallback = Answer { head_fallback: true, ..answer(&byte) };
        let out = relay_header(&Asked { head: true, ..asked }, &fallback, false).unwrap();
        assert_eq!((out.status.as_u16(), &out.headers["content-length"]), (200, &HeaderValue::from(777)));
        assert!(!out.headers.contains_key("content-range"));
        assert_eq!(out.headers["accept-ranges"], "bytes", "as the GET's 200 would say");
        let ranged = Asked { range: true, head: true, ..asked };
        assert_eq!(
            relay_header(&ranged, &fallback, false).unwrap().status,
            206,
            "the client's own range is answered as it is"
        );
        let typed = relay_header(&asked, &answer(&resp(200, &[BIN])), true).unwrap();
        assert_eq!(typed.headers["content-type"], content_type::HLS);
        // Nothing to type: no guess (a 304's headers update what a client's cache holds).
        for status in [204, 304] {
            let out = relayed(&asked, &resp(status, &[("ETag", "\"e\"")]));
            assert!(!out.headers.contains_key("content-type"), "{status}");
        }
        assert_eq!(
            relayed(&Asked { head: true, ..asked }, &resp(200, &[])).headers["content-type"],
            "video/x-matroska"
        );
        // A page a browser would run scripts in is sandboxed (the hoster's
        // own policy kept beside it); media is not touched.
        let page = resp(404, &[("Content-Type", "text/html; charset=UTF-8"), ("Content-Security-Policy", "img-src *")]);
        for own in [Children::Untouched, Children::Route(0)] {
            let out = relayed(&Asked { children: own, ..asked }, &page);
            let policies: Vec<_> = out.headers.get_all("content-security-policy").iter().collect();
            assert_eq!(policies, ["img-src *"], "a static route's pages are its operator's own");
        }
        let out = relayed(&asked, &page);
        let policies: Vec<_> = out.headers.get_all("content-security-policy").iter().collect();
        assert_eq!(policies, ["img-src *", "sandbox"]);
        assert_eq!(out.status, 404);
        for media in [resp(200, &[MP4]), resp(200, &[BIN]), resp(200, &[("Content-Type", "text/plain")])] {
            assert!(!relayed(&asked, &media).headers.contains_key("content-security-policy"));
        }
    }

    #[test]
    fn playlist_headers_describe_the_rewritten_body() {
        let up = resp(
            206,
            &[
                BIN,
                ("Content-Range", "bytes 0-99/100"),
                ("Content-Length", "100"),
                ("Accept-Ranges", "bytes"),
                ("ETag", "\"e\""),
                ("Last-Modified", "Tue, 01 Jul 2025 10:00:00 GMT"),
                ("Content-Encoding", "gzip"),
                ("Cache-Control", "max-age=2"),
            ],
        );
        let out = playlist_header(&up, 321).unwrap();
        assert_eq!(out.status, 200);
        assert_eq!(out.headers["content-length"], "321");
        assert_eq!(out.headers["content-type"], content_type::HLS);
        assert_eq!(out.headers["cache-control"], "max-age=2");
        for gone in ["content-range", "accept-ranges", "etag", "last-modified", "content-encoding"] {
            assert!(!out.headers.contains_key(gone), "{gone}");
        }
    }
}
