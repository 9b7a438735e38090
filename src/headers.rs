//! Header policy: the exact request headers sent upstream (an allow-list, so
//! hosters never learn who watches) and the response headers relayed back
//! (hop-by-hop and origin-scoped headers dropped, the rest preserved).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Request headers copied from the client, when present.
pub const FORWARDED_REQUEST_HEADERS: [HeaderName; 5] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::ACCEPT,
];

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies strip.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether `Connection` (any of its values) lists `name` — such headers are
/// hop-by-hop too. Checked in place: no allocation per response.
fn nominates(connection: &header::GetAll<'_, HeaderValue>, name: &str) -> bool {
    connection
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(name))
}

/// The names of an upstream response's headers that are not relayed to the
/// client: hop-by-hop headers (fixed ones and those `Connection` names) and
/// what only makes sense on the hoster's own origin — its CORS headers (the
/// proxy sets its own), cookies, HSTS and Alt-Svc (which would otherwise
/// apply to the proxy's host name). `Connection` is looked up once per
/// response, not once per header.
pub fn dropped_response_headers(response: &HeaderMap) -> impl Iterator<Item = &HeaderName> {
    let connection = response.get_all(header::CONNECTION);
    let nominating = connection.iter().next().is_some();
    response
        .keys()
        .filter(move |name| dropped_by_name(name) || (nominating && nominates(&connection, name.as_str())))
}

/// Dropped whatever `Connection` says.
fn dropped_by_name(name: &HeaderName) -> bool {
    // `HeaderName`s are lower-case already.
    let n = name.as_str();
    is_hop_by_hop(n)
        || n.starts_with("access-control-")
        || n == "set-cookie"
        || n == "set-cookie2"
        || n == "alt-svc"
        || n == "strict-transport-security"
}

/// The upstream request headers, in order and complete, except `Host`.
///
/// Precedence (later wins): client's forwarded headers and `User-Agent`
/// (or `default_ua`), then the provider profile's, then the resolver's.
/// `Accept-Encoding: identity` keeps bodies byte-exact and playlists plain.
pub fn upstream_request_headers(
    client: &HeaderMap,
    default_ua: Option<&HeaderValue>,
    profile: &[(HeaderName, HeaderValue)],
    resolver: &[(HeaderName, HeaderValue)],
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(8);
    for name in &FORWARDED_REQUEST_HEADERS {
        // Range and friends are forwarded byte for byte, all values in order.
        for v in client.get_all(name) {
            out.push((name.clone(), v.clone()));
        }
    }
    out.push((header::ACCEPT_ENCODING, HeaderValue::from_static("identity")));
    if let Some(ua) = client.get(header::USER_AGENT).or(default_ua) {
        out.push((header::USER_AGENT, ua.clone()));
    }
    for (name, value) in profile.iter().chain(resolver) {
        if name == header::HOST || is_hop_by_hop(name.as_str()) || name == header::CONTENT_LENGTH {
            continue;
        }
        out.retain(|(n, _)| n != name);
        out.push((name.clone(), value.clone()));
    }
    out
}

/// `Host` value for a URL: the host, plus the port when not the default.
pub fn host_header(u: &url::Url) -> String {
    let host = u.host_str().unwrap_or_default();
    match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// Parses `name: value` pairs from config or a resolver answer, skipping
/// (and reporting) the invalid ones.
pub fn parse_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    pairs
        .into_iter()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name {k:?}"))?;
            let value = HeaderValue::from_str(v).map_err(|_| format!("bad value for header {k}"))?;
            Ok((name, value))
        })
        .collect()
}

/// The total length from `Content-Range: bytes a-b/TOTAL` (not `*`).
pub fn content_range_total(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let rest = s.strip_prefix("bytes")?.trim_start();
    let (_, total) = rest.rsplit_once('/')?;
    total.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn names(v: &[(HeaderName, HeaderValue)]) -> Vec<String> {
        v.iter().map(|(n, v)| format!("{}: {}", n, v.to_str().unwrap())).collect()
    }

    #[test]
    fn request_is_an_allow_list() {
        let client = map(&[
            ("Range", "bytes=0-99"),
            ("Cookie", "session=1"),
            ("Authorization", "Bearer x"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("Via", "1.1 nginx"),
            ("Accept-Encoding", "gzip"),
            ("If-None-Match", "\"abc\""),
            ("User-Agent", "mpv/0.36"),
            ("Referer", "https://my.jellyfin/"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Api-Key", "k"),
        ]);
        let out = upstream_request_headers(&client, None, &[], &[]);
        assert_eq!(
            names(&out),
            vec![
                "range: bytes=0-99",
                "if-none-match: \"abc\"",
                "accept-encoding: identity",
                "user-agent: mpv/0.36",
            ]
        );
    }

    #[test]
    fn range_is_never_invented_and_kept_verbatim() {
        let out = upstream_request_headers(&HeaderMap::new(), None, &[], &[]);
        assert!(out.iter().all(|(n, _)| n != header::RANGE));
        let odd = map(&[("Range", "bytes=abc, 0-0,-0")]);
        let out = upstream_request_headers(&odd, None, &[], &[]);
        assert_eq!(out[0].1, "bytes=abc, 0-0,-0");
    }

    #[test]
    fn precedence_resolver_over_profile_over_client() {
        let client = map(&[("User-Agent", "vlc"), ("Accept", "*/*")]);
        let ua = HeaderValue::from_static("default-ua");
        let profile = parse_pairs([("Referer", "https://voe.sx/"), ("User-Agent", "Mozilla/5.0")]).unwrap();
        let resolver = parse_pairs([("Referer", "https://resolved/"), ("Host", "evil"), ("Connection", "x")]).unwrap();
        let out = upstream_request_headers(&client, Some(&ua), &profile, &resolver);
        assert_eq!(
            names(&out),
            vec![
                "accept: */*",
                "accept-encoding: identity",
                "user-agent: Mozilla/5.0",
                "referer: https://resolved/",
            ]
        );
        let out = upstream_request_headers(&HeaderMap::new(), Some(&ua), &[], &[]);
        assert_eq!(names(&out), vec!["accept-encoding: identity", "user-agent: default-ua"]);
    }

    /// Headers the policy always drops, and always keeps.
    const ALWAYS_DROPPED: [&str; 13] = [
        "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
        "Proxy-Authenticate", "Proxy-Authorization", "Access-Control-Allow-Origin", "Set-Cookie",
        "Alt-Svc", "Strict-Transport-Security", "Connection",
    ];
    const ALWAYS_KEPT: [&str; 13] = [
        "Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "ETag",
        "Last-Modified", "Cache-Control", "Expires", "Content-Disposition",
        "Content-Encoding", "Vary", "Age", "Date",
    ];

    /// Drops hop-by-hop, origin-scoped and `Connection`-nominated headers
    /// (`Connection` absent, or listing some of them, in any case and spacing).
    #[test]
    fn response_drops_hop_by_hop_and_nominated() {
        for (connection, nominated) in [
            (None, &[][..]),
            (Some("close, X-Custom"), &["x-custom", "close"][..]),
            (Some("keep-alive"), &[][..]),
            (Some("X-Other,  x-custom "), &["x-other", "x-custom"][..]),
        ] {
            let mut pairs: Vec<(&str, &str)> = ALWAYS_DROPPED
                .iter()
                .chain(&ALWAYS_KEPT)
                .chain(&["X-Custom", "X-Other", "Close"])
                .filter(|h| **h != "Connection")
                .map(|h| (*h, "v"))
                .collect();
            pairs.extend(connection.map(|c| ("Connection", c)));
            let resp = map(&pairs);
            let dropped: Vec<&str> = dropped_response_headers(&resp).map(HeaderName::as_str).collect();
            for h in ALWAYS_DROPPED.iter().filter(|h| connection.is_some() || **h != "Connection") {
                assert!(dropped.contains(&h.to_ascii_lowercase().as_str()), "{h} must be dropped ({connection:?})");
            }
            for h in ALWAYS_KEPT {
                assert!(!dropped.contains(&h.to_ascii_lowercase().as_str()), "{h} must be kept ({connection:?})");
            }
            for h in ["x-custom", "x-other", "close"] {
                assert_eq!(dropped.contains(&h), nominated.contains(&h), "{h} with Connection {connection:?}");
            }
        }
    }

    #[test]
    fn content_range_totals() {
        assert_eq!(content_range_total(b"bytes 0-0/12345"), Some(12345));
        assert_eq!(content_range_total(b"bytes */500"), Some(500));
        assert_eq!(content_range_total(b"bytes 0-0/*"), None);
        assert_eq!(content_range_total(b"items 0-0/3"), None);
    }

    #[test]
    fn host_header_keeps_non_default_port() {
        assert_eq!(host_header(&url::Url::parse("https://a.example/x").unwrap()), "a.example");
        assert_eq!(host_header(&url::Url::parse("http://a.example:8080/x").unwrap()), "a.example:8080");
        assert_eq!(host_header(&url::Url::parse("http://[::1]:81/").unwrap()), "[::1]:81");
    }
}
