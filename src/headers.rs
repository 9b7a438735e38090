//! Header policy: the exact request headers sent upstream (an allow-list, so
//! hosters never learn who watches) and the response headers relayed back
//! (hop-by-hop and origin-scoped headers dropped, the rest preserved).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use pingora_http::ResponseHeader;

/// Request headers copied from the client, when present, with the spelling
/// they are sent with.
pub const FORWARDED_REQUEST_HEADERS: [(HeaderName, &str); 5] = [
    (header::RANGE, "Range"),
    (header::IF_RANGE, "If-Range"),
    (header::IF_NONE_MATCH, "If-None-Match"),
    (header::IF_MODIFIED_SINCE, "If-Modified-Since"),
    (header::ACCEPT, "Accept"),
];

/// A request header as it goes upstream. HTTP/1.1 header names are
/// case-insensitive, but browsers, curl and nginx all send `Range` and
/// `User-Agent`, and a request in lower case stands out to a hoster; so
/// `spelling` is what goes on the wire — the conventional spelling for the
/// headers this proxy sets or forwards, the given one for headers from a
/// provider profile or the resolver — and `name` is what compares.
#[derive(Debug, Clone)]
pub struct WireHeader {
    pub name: HeaderName,
    pub spelling: Bytes,
    pub value: HeaderValue,
}

impl WireHeader {
    pub fn conventional(name: &HeaderName, spelling: &'static str, value: HeaderValue) -> WireHeader {
        WireHeader { name: name.clone(), spelling: Bytes::from_static(spelling.as_bytes()), value }
    }
}

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
    // As bytes: a value with a stray non-ASCII byte still nominates the
    // names it lists.
    connection
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// The names of an upstream response's headers that are not relayed to the
/// client: hop-by-hop headers (fixed ones and those `Connection` names) and
/// what only makes sense on the hoster's own origin, and would otherwise
/// apply to the proxy's host name — its CORS headers (the proxy sends its
/// own), `Cross-Origin-Resource-Policy` (a hoster's `same-origin` would make
/// browsers refuse the media on every page of another origin), cookies,
/// HSTS, Alt-Svc, `Clear-Site-Data` and `Service-Worker-Allowed` (which
/// would let a hoster's script be a service worker for every path of the
/// proxy's host) — and `X-Content-Type-Options`:
/// hosters type disguised segments `image/png` or `text/html`, and with
/// their `nosniff` a browser's own HLS player refuses the bytes the
/// proxy relays for a `.ts` (the type itself is the hoster's and kept).
/// `Connection` is looked up once per response, not once per header.
pub fn dropped_response_headers(response: &HeaderMap) -> impl Iterator<Item = &HeaderName> {
    let connection = response.get_all(header::CONNECTION);
    let nominating = connection.iter().next().is_some();
    response.keys().filter(move |name| dropped_by_name(name) || (nominating && nominates(&connection, name.as_str())))
}

/// The upstream's header as the client may see it: minus what
/// [`dropped_response_headers`] names, and in this proxy's own HTTP version
/// (RFC 9110 §6.2), whatever the upstream's: an `HTTP/1.0` status line
/// would make a client distrust the chunked framing a close-delimited body
/// is relayed with (RFC 9112 §6.1), and end keep-alive. A length the
/// upstream repeated (`Content-Length: 5` twice, or `5, 5`, which
/// Pingora's framing accepts) goes out once, as RFC 9112 §6.3 allows: some
/// clients refuse a repeated length outright.
pub fn relayed(up: &ResponseHeader) -> ResponseHeader {
    let mut out = up.clone();
    out.set_version(http::Version::HTTP_11);
    let dropped: Vec<HeaderName> = dropped_response_headers(&up.headers).cloned().collect();
    for name in &dropped {
        out.remove_header(name);
    }
    if up.status == http::StatusCode::NO_CONTENT {
        // RFC 9110 §8.6: a server MUST NOT send a length with a 204 (some
        // upstreams do, and nginx 1.22 as a proxy relays it).
        out.remove_header(&header::CONTENT_LENGTH);
        return out;
    }
    let mut lengths = up.headers.get_all(header::CONTENT_LENGTH).iter();
    let repeated = lengths.next().is_some_and(|v| v.as_bytes().contains(&b',') || lengths.next().is_some());
    if repeated {
        if let Some(n) = content_length(&up.headers) {
            let _ = out.insert_header(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    out
}

/// The bytes of a header's names and values.
pub fn byte_len(h: &ResponseHeader) -> usize {
    h.headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum()
}

/// A copy of `h` that owns its bytes, all names and values in one buffer.
/// A header Pingora parsed shares its whole read buffer (4 KiB or more,
/// often with the first body bytes) through every name and value: kept as
/// it is, a stored header of a few hundred bytes holds that buffer too.
pub fn compact(h: &ResponseHeader) -> pingora_error::Result<ResponseHeader> {
    let mut buf = bytes::BytesMut::with_capacity(byte_len(h));
    let mut spans = Vec::with_capacity(h.headers.len());
    h.map(|name, value| {
        let name = match name {
            pingora_http::HeaderNameVariant::Case(c) => c.as_slice(),
            pingora_http::HeaderNameVariant::Titled(t) => t.as_bytes(),
        };
        let (n, v) = (buf.len(), buf.len() + name.len());
        buf.extend_from_slice(name);
        buf.extend_from_slice(value.as_bytes());
        spans.push((n..v, v..buf.len()));
        Ok(())
    })?;
    let buf = buf.freeze();
    let mut out = ResponseHeader::build(h.status, Some(spans.len()))?;
    out.set_version(h.version);
    out.set_reason_phrase(h.get_reason_phrase())?;
    for (name, value) in spans {
        let value = HeaderValue::from_maybe_shared(buf.slice(value))
            .map_err(|_| pingora_error::Error::new_str("a stored header value is not valid"))?;
        out.append_header(buf.slice(name), value)?;
    }
    Ok(out)
}

/// Dropped whatever `Connection` says.
fn dropped_by_name(name: &HeaderName) -> bool {
    // `HeaderName`s are lower-case already.
    let n = name.as_str();
    is_hop_by_hop(n)
        || n.starts_with("access-control-")
        || n == "set-cookie"
        || n == "set-cookie2"
        || n == "cross-origin-resource-policy"
        || n == "alt-svc"
        || n == "strict-transport-security"
        || n == "clear-site-data"
        || n == "service-worker-allowed"
        || n == "x-content-type-options"
}

/// What is wrong with a request's `Host` (RFC 9112 §3.2: a server must
/// answer 400 to an HTTP/1.1 request without one, and to any with several
/// or with an invalid value), or `None`. Pingora refuses several itself. A
/// valid value is `host[:port]`: letters, digits, `-._~`, the sub-delims,
/// `%`, `:` and the brackets of an IPv6 literal; no user, path or space.
pub fn host_problem(req: &pingora_http::RequestHeader) -> Option<HostProblem> {
    match req.headers.get(header::HOST) {
        None if req.version == http::Version::HTTP_11 => Some(HostProblem::Missing),
        None => None,
        Some(v) if v.is_empty() || !v.as_bytes().iter().all(|b| HOST_BYTES[*b as usize]) => Some(HostProblem::Invalid),
        Some(_) => None,
    }
}

/// See [`host_problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostProblem {
    Missing,
    Invalid,
}

const HOST_BYTES: [bool; 256] = crate::charclass::alnum_and(b"-._~!$&'()*+,;=%:[]");

/// Removes from a client's request the end-to-end headers this proxy would
/// otherwise act on or send upstream (`Range`, the conditionals, `Accept`,
/// `User-Agent`) when its `Connection` names them: the client made them
/// hop-by-hop (RFC 9110 §7.6.1), so they end here and the request is
/// answered as one without them. `Connection` itself stays (Pingora reads
/// keep-alive from it) and is never sent upstream. Costs one lookup when
/// there is no `Connection`, as for most players.
pub fn drop_nominated(req: &mut pingora_http::RequestHeader) {
    let connection = req.headers.get_all(header::CONNECTION);
    if connection.iter().next().is_none() {
        return;
    }
    let nominated: Vec<HeaderName> = FORWARDED_REQUEST_HEADERS
        .into_iter()
        .map(|(name, _)| name)
        .chain([header::USER_AGENT])
        .filter(|name| req.headers.contains_key(name) && nominates(&connection, name.as_str()))
        .collect();
    for name in &nominated {
        req.remove_header(name);
    }
}

/// The client's headers that go upstream, in the order they are sent:
/// `Range` and the conditionals byte for byte (all values, in order),
/// `Accept`, `Accept-Encoding: identity` (bodies stay byte-exact and
/// playlists plain), and the client's `User-Agent` (or `default_ua`).
pub fn forwarded_request_headers(client: &HeaderMap, default_ua: Option<&HeaderValue>) -> Vec<WireHeader> {
    let mut out: Vec<WireHeader> = Vec::with_capacity(4);
    for (name, spelling) in &FORWARDED_REQUEST_HEADERS {
        for v in client.get_all(name) {
            out.push(WireHeader::conventional(name, spelling, v.clone()));
        }
    }
    out.push(WireHeader::conventional(
        &header::ACCEPT_ENCODING,
        "Accept-Encoding",
        HeaderValue::from_static("identity"),
    ));
    if let Some(ua) = client.get(header::USER_AGENT).or(default_ua) {
        out.push(WireHeader::conventional(&header::USER_AGENT, "User-Agent", ua.clone()));
    }
    out
}

/// `Range` and the conditionals: what a whole fetch (a playlist) or a
/// resumption leaves out of the client's headers.
pub fn is_range_or_conditional(name: &HeaderName) -> bool {
    *name == header::RANGE
        || *name == header::IF_RANGE
        || *name == header::IF_NONE_MATCH
        || *name == header::IF_MODIFIED_SINCE
}

/// The upstream request headers after `Host`, in order: the `forwarded`
/// ones, then the provider profile's, then the resolver's; a header of a
/// name that comes again later gives way to the later one, so the
/// resolver's win over the profile's and both over the client's. Profiles
/// and resolvers never set `Host`, `Content-Length` or hop-by-hop headers.
pub fn upstream_request_headers<'a>(
    forwarded: &'a [WireHeader],
    profile: &'a [WireHeader],
    resolver: &'a [WireHeader],
) -> impl Iterator<Item = &'a WireHeader> {
    let settable = |h: &&WireHeader| not_settable(&h.name).is_none();
    let overrides = profile.iter().chain(resolver).filter(settable);
    let (later, again) = (overrides.clone(), overrides.clone());
    forwarded.iter().filter(move |h| !later.clone().any(|o| o.name == h.name)).chain(
        overrides
            .enumerate()
            .filter(move |(i, h)| !again.clone().skip(i + 1).any(|o| o.name == h.name))
            .map(|(_, h)| h),
    )
}

/// Why a provider profile or the resolver cannot set the upstream request
/// header `name` (`None`: it can). Config naming one is refused at start;
/// a resolver answer's is left out.
pub fn not_settable(name: &HeaderName) -> Option<&'static str> {
    if *name == header::HOST {
        Some("the proxy sends the upstream URL's host")
    } else if *name == header::CONTENT_LENGTH {
        Some("the proxy sends no request body")
    } else if is_range_or_conditional(name) {
        Some("each request's range and conditionals are the client's own")
    } else if *name == header::ACCEPT_ENCODING {
        Some("the proxy asks for identity, so bodies stay byte for byte")
    } else if is_hop_by_hop(name.as_str()) {
        Some("it is hop-by-hop and never goes upstream")
    } else {
        None
    }
}

/// `Host` value for a URL: the host, plus the port when not the default.
pub fn host_header(u: &url::Url) -> String {
    let host = u.host_str().unwrap_or_default();
    match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// Parses `name: value` pairs from config or a resolver answer, keeping
/// each name's spelling; the first invalid pair is reported.
pub fn parse_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Vec<WireHeader>, String> {
    pairs
        .into_iter()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name {k:?}"))?;
            let value = HeaderValue::from_str(v).map_err(|_| format!("bad value for header {k}"))?;
            Ok(WireHeader { name, spelling: Bytes::copy_from_slice(k.as_bytes()), value })
        })
        .collect()
}

/// A `Content-Range` value (RFC 9110 §14.4): `bytes FIRST-LAST/TOTAL`,
/// `bytes FIRST-LAST/*` (length unknown) or `bytes */TOTAL` (a 416's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First and last byte (inclusive), `None` for `*`.
    pub range: Option<(u64, u64)>,
    /// The complete length, `None` for `*`.
    pub total: Option<u64>,
}

impl ContentRange {
    /// Parses a value; digits only, FIRST <= LAST, and LAST < TOTAL when
    /// both are known. `bytes */*` is not a content range.
    pub fn parse(v: &[u8]) -> Option<ContentRange> {
        let s = std::str::from_utf8(v).ok()?.trim();
        let rest = s.strip_prefix("bytes")?;
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        let (range, total) = rest.trim_start().split_once('/')?;
        let total = match total.trim() {
            "*" => None,
            t => Some(digits(t)?),
        };
        let range = match range.trim() {
            "*" => None,
            r => {
                let (first, last) = r.split_once('-')?;
                let (first, last) = (digits(first)?, digits(last)?);
                (first <= last && total.is_none_or(|t| last < t)).then_some((first, last))?;
                Some((first, last))
            }
        };
        (range.is_some() || total.is_some()).then_some(ContentRange { range, total })
    }

    /// `(first, last, total)` when all three are known.
    pub fn bytes(self) -> Option<(u64, u64, u64)> {
        let (first, last) = self.range?;
        Some((first, last, self.total?))
    }

    /// The range covers the whole representation (`bytes 0-(N-1)/N`).
    pub fn is_whole(self) -> bool {
        self.bytes().is_some_and(|(first, last, total)| first == 0 && last + 1 == total)
    }
}

/// Turns a `206` the upstream gave for some bytes into the `200` for the
/// whole object it stands for (the HEAD fallback's one byte, a fill's range
/// that covered everything): no `Content-Range`, the whole length when the
/// range named it (else none), and `Accept-Ranges: bytes` unless the
/// upstream said otherwise — it has just answered a byte range, and
/// players read a HEAD's `Accept-Ranges` to know they can seek (nginx, for
/// one, sends it with its `200`s but not with its `206`s).
pub fn whole_of_part(out: &mut ResponseHeader) {
    let total = content_range(&out.headers).and_then(|r| r.total);
    let _ = out.set_status(http::StatusCode::OK);
    out.remove_header(&header::CONTENT_RANGE);
    match total {
        Some(t) => {
            let _ = out.insert_header(header::CONTENT_LENGTH, HeaderValue::from(t));
        }
        None => {
            out.remove_header(&header::CONTENT_LENGTH);
        }
    }
    if !out.headers.contains_key(header::ACCEPT_RANGES) {
        let _ = out.insert_header(header::ACCEPT_RANGES, "bytes");
    }
}

/// The `Content-Range` of a header map, parsed.
pub fn content_range(h: &HeaderMap) -> Option<ContentRange> {
    ContentRange::parse(h.get(header::CONTENT_RANGE)?.as_bytes())
}

/// The `Content-Length` of a header map: one number, or one number
/// repeated (in several fields or a list: RFC 9110 §8.6); `None` when there
/// is none or the values differ.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut fields = h.get_all(header::CONTENT_LENGTH).iter();
    let first = fields.next()?.to_str().ok()?;
    if let (Some(n), None) = (digits(first), fields.next()) {
        return Some(n);
    }
    let mut length = None;
    for field in h.get_all(header::CONTENT_LENGTH) {
        for v in field.to_str().ok()?.split(',') {
            let n = digits(v)?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    length
}

/// A non-negative decimal number of digits only (no sign, no spaces inside).
pub fn digits(s: &str) -> Option<u64> {
    // HTTP's whitespace is ASCII (a space or a tab around a number).
    let s = s.trim_ascii();
    if s.is_empty() {
        return None;
    }
    // By hand, not `parse`: every range answered from memory reads four.
    s.bytes().try_fold(0u64, |n, b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// A response header with `headers` appended in order (unit tests).
#[cfg(test)]
pub(crate) fn test_response(status: u16, headers: &[(&str, &str)]) -> pingora_http::ResponseHeader {
    let mut r = pingora_http::ResponseHeader::build(status, None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
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

    #[test]
    fn digits_at_the_edges_of_u64() {
        assert_eq!(digits(" 18446744073709551615\t"), Some(u64::MAX));
        assert_eq!(digits("18446744073709551616"), None);
        assert_eq!(digits("00042"), Some(42));
        for bad in ["", " ", "+1", "-1", "1 2", "١"] {
            assert_eq!(digits(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Digits only, spaces or tabs around, any number that fits in u64
        /// (one more digit overflows: `None`).
        #[test]
        fn digits_reads_what_parse_reads_of_digits_alone(s in "[ \t]{0,2}[0-9+\\- ]{0,21}[ \t]{0,2}") {
            let t = s.trim_matches([' ', '\t']);
            let want = (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse::<u64>().ok()).flatten();
            proptest::prop_assert_eq!(digits(&s), want);
        }
    }

    #[test]
    fn a_compact_header_owns_its_bytes_and_keeps_their_spelling() {
        // As Pingora parses one: every name and value a view of one read buffer.
        let wire = Bytes::from(format!("ETag\"v1\"x-Odd-Name1Content-Length5{}", "body".repeat(1000)));
        let mut h = ResponseHeader::build(206, None).unwrap();
        h.set_reason_phrase(Some("Partial")).unwrap();
        h.append_header(wire.slice(0..4), HeaderValue::from_maybe_shared(wire.slice(4..8)).unwrap()).unwrap();
        h.append_header(wire.slice(8..18), HeaderValue::from_maybe_shared(wire.slice(18..19)).unwrap()).unwrap();
        h.append_header(wire.slice(19..33), HeaderValue::from_maybe_shared(wire.slice(33..34)).unwrap()).unwrap();
        let c = compact(&h).unwrap();
        assert_eq!((c.status.as_u16(), c.get_reason_phrase()), (206, Some("Partial")));
        let spelled = |h: &ResponseHeader| {
            let mut out = Vec::new();
            h.map(|n, v| {
                let n = match n {
                    pingora_http::HeaderNameVariant::Case(c) => c.as_slice().to_vec(),
                    pingora_http::HeaderNameVariant::Titled(t) => t.as_bytes().to_vec(),
                };
                out.push((n, v.as_bytes().to_vec()));
                Ok(())
            })
            .unwrap();
            out
        };
        assert_eq!(spelled(&c), spelled(&h));
        let inside = |p: *const u8| wire.as_ptr_range().contains(&p);
        assert!(c.headers.values().all(|v| !inside(v.as_bytes().as_ptr())));
        assert!(h.headers.values().all(|v| inside(v.as_bytes().as_ptr())));
    }

    #[test]
    fn headers_named_by_the_clients_connection_end_here() {
        let mut req = pingora_http::RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in [
            ("Range", "bytes=0-1"),
            ("User-Agent", "mpv"),
            ("Accept", "*/*"),
            ("X-Api-Key", "k"),
            ("Connection", "keep-alive, RANGE"),
            ("Connection", " user-agent ,X-Api-Key"),
        ] {
            req.append_header(k, v).unwrap();
        }
        drop_nominated(&mut req);
        let mut left: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        // X-Api-Key is for this hop and never forwarded: it stays for the check.
        assert_eq!(left, vec!["accept", "connection", "x-api-key"]);
        // Without `Connection`, nothing changes.
        let mut plain = pingora_http::RequestHeader::build("GET", b"/", None).unwrap();
        plain.append_header("Range", "bytes=0-1").unwrap();
        drop_nominated(&mut plain);
        assert!(plain.headers.contains_key(header::RANGE));
    }

    /// The whole upstream list, as the client builds it.
    fn headers(
        client: &HeaderMap,
        ua: Option<&HeaderValue>,
        profile: &[WireHeader],
        resolver: &[WireHeader],
    ) -> Vec<WireHeader> {
        let forwarded = forwarded_request_headers(client, ua);
        upstream_request_headers(&forwarded, profile, resolver).cloned().collect()
    }

    /// As they go on the wire: spelling, value.
    fn names(v: &[WireHeader]) -> Vec<String> {
        v.iter().map(|h| format!("{}: {}", String::from_utf8_lossy(&h.spelling), h.value.to_str().unwrap())).collect()
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
        let out = headers(&client, None, &[], &[]);
        assert_eq!(
            names(&out),
            vec!["Range: bytes=0-99", "If-None-Match: \"abc\"", "Accept-Encoding: identity", "User-Agent: mpv/0.36",]
        );
    }

    #[test]
    fn range_is_never_invented_and_kept_verbatim() {
        let out = headers(&HeaderMap::new(), None, &[], &[]);
        assert!(out.iter().all(|h| h.name != header::RANGE));
        let odd = map(&[("rANGE", "bytes=abc, 0-0,-0")]);
        let out = headers(&odd, None, &[], &[]);
        assert_eq!(names(&out[..1]), vec!["Range: bytes=abc, 0-0,-0"]);
    }

    #[test]
    fn precedence_resolver_over_profile_over_client() {
        let client = map(&[("User-Agent", "vlc"), ("Accept", "*/*")]);
        let ua = HeaderValue::from_static("default-ua");
        let profile = parse_pairs([("Referer", "https://voe.sx/"), ("User-Agent", "Mozilla/5.0")]).unwrap();
        // The resolver's spelling of a name goes out, whatever the profile's was.
        let resolver = parse_pairs([("referer", "https://resolved/"), ("Host", "evil"), ("Connection", "x")]).unwrap();
        let out = headers(&client, Some(&ua), &profile, &resolver);
        assert_eq!(
            names(&out),
            vec!["Accept: */*", "Accept-Encoding: identity", "User-Agent: Mozilla/5.0", "referer: https://resolved/",]
        );
        let out = headers(&HeaderMap::new(), Some(&ua), &[], &[]);
        assert_eq!(names(&out), vec!["Accept-Encoding: identity", "User-Agent: default-ua"]);
        // A profile's own spelling is kept too, even an unusual one.
        let odd = parse_pairs([("X-CDN-Token", "t")]).unwrap();
        let out = headers(&HeaderMap::new(), None, &odd, &[]);
        assert_eq!(names(&out), vec!["Accept-Encoding: identity", "X-CDN-Token: t"]);
        // A later header of a name wins within the profile too, in its place.
        let twice = parse_pairs([("Referer", "a"), ("Origin", "o"), ("Referer", "b")]).unwrap();
        let out = headers(&HeaderMap::new(), None, &twice, &[]);
        assert_eq!(names(&out), vec!["Accept-Encoding: identity", "Origin: o", "Referer: b"]);
    }

    /// Headers the policy always drops, and always keeps.
    const ALWAYS_DROPPED: [&str; 17] = [
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Access-Control-Allow-Origin",
        "Set-Cookie",
        "Alt-Svc",
        "Strict-Transport-Security",
        "Cross-Origin-Resource-Policy",
        "Clear-Site-Data",
        "Service-Worker-Allowed",
        "X-Content-Type-Options",
        "Connection",
    ];
    const ALWAYS_KEPT: [&str; 13] = [
        "Content-Type",
        "Content-Length",
        "Content-Range",
        "Accept-Ranges",
        "ETag",
        "Last-Modified",
        "Cache-Control",
        "Expires",
        "Content-Disposition",
        "Content-Encoding",
        "Vary",
        "Age",
        "Date",
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
            // A token with a byte above ASCII does not hide the others.
            (Some("X-Custom, x-ä"), &["x-custom"][..]),
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
    fn hosts_as_rfc_9112_reads_them() {
        let req = |version, host: Option<&[u8]>| {
            let mut r = pingora_http::RequestHeader::build("GET", b"/", None).unwrap();
            r.set_version(version);
            if let Some(h) = host {
                r.insert_header("Host", HeaderValue::from_bytes(h).unwrap()).unwrap();
            }
            host_problem(&r)
        };
        use http::Version as V;
        for good in
            [&b"proxy.test"[..], b"proxy.test:8080", b"127.0.0.1:18090", b"[::1]:8080", b"xn--bcher-kva.example"]
        {
            assert_eq!(req(V::HTTP_11, Some(good)), None, "{good:?}");
        }
        assert_eq!(req(V::HTTP_11, None), Some(HostProblem::Missing));
        assert_eq!(req(V::HTTP_10, None), None, "HTTP/1.0 has no Host to miss");
        for bad in [&b""[..], b"a b", b"user@proxy.test", b"proxy.test/x", b"b\xc3\xbccher.example", b"a\tb"] {
            assert_eq!(req(V::HTTP_11, Some(bad)), Some(HostProblem::Invalid), "{bad:?}");
            assert_eq!(req(V::HTTP_10, Some(bad)), Some(HostProblem::Invalid), "{bad:?}");
        }
    }

    /// The relayed header is in this proxy's HTTP version, not the upstream's.
    #[test]
    fn relayed_is_http_1_1_whatever_the_upstream_spoke() {
        let mut up = ResponseHeader::build(200, None).unwrap();
        up.set_version(http::Version::HTTP_10);
        up.insert_header("Connection", "X-Hop").unwrap();
        up.insert_header("X-Hop", "1").unwrap();
        up.insert_header("Content-Type", "video/mp4").unwrap();
        let out = relayed(&up);
        assert_eq!(out.version, http::Version::HTTP_11);
        assert_eq!(out.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["content-type"]);
    }

    #[test]
    fn a_repeated_length_is_one_length() {
        let with = |values: &[&str]| {
            let mut up = ResponseHeader::build(200, None).unwrap();
            for v in values {
                up.append_header("Content-Length", *v).unwrap();
            }
            up
        };
        for (values, want) in [
            (&["5"][..], Some(5)),
            (&["5", "5"][..], Some(5)),
            (&["5, 5"][..], Some(5)),
            (&[" 5 ,5", "5"][..], Some(5)),
            (&["5", "6"][..], None),
            (&["5, 6"][..], None),
            (&["5,"][..], None),
            (&["+5"][..], None),
        ] {
            let up = with(values);
            assert_eq!(content_length(&up.headers), want, "{values:?}");
            let out = relayed(&up);
            let sent: Vec<_> = out.headers.get_all("content-length").iter().collect();
            match want {
                Some(n) => assert_eq!(sent, [&HeaderValue::from(n)], "{values:?}: sent once"),
                // Pingora refuses these before they reach the policy; left as they are.
                None => assert_eq!(sent.len(), values.len(), "{values:?}"),
            }
        }
    }

    #[test]
    fn a_part_stands_for_the_whole() {
        let part = |extra: &[(&str, &str)]| {
            let mut h = ResponseHeader::build(206, None).unwrap();
            for (k, v) in [("Content-Length", "1"), ("Content-Type", "video/mp4")].iter().chain(extra) {
                h.insert_header(k.to_string(), *v).unwrap();
            }
            h
        };
        let mut out = part(&[("Content-Range", "bytes 0-0/5000")]);
        whole_of_part(&mut out);
        assert_eq!(out.status, 200);
        assert_eq!(out.headers["content-length"], "5000");
        assert_eq!(out.headers["accept-ranges"], "bytes", "it has just answered a byte range");
        assert!(!out.headers.contains_key("content-range"));
        let mut unknown = part(&[("Content-Range", "bytes 0-0/*"), ("Accept-Ranges", "bytes")]);
        whole_of_part(&mut unknown);
        assert!(!unknown.headers.contains_key("content-length"), "no total, no length");
        assert_eq!(unknown.headers.get_all("accept-ranges").iter().count(), 1);
    }

    #[test]
    fn content_ranges() {
        let cr = |v: &str| ContentRange::parse(v.as_bytes());
        let full = |first, last, total| Some(ContentRange { range: Some((first, last)), total: Some(total) });
        assert_eq!(cr("bytes 0-0/12345"), full(0, 0, 12345));
        assert_eq!(cr("bytes 0-0/12345").unwrap().bytes(), Some((0, 0, 12345)));
        assert_eq!(cr("bytes */500"), Some(ContentRange { range: None, total: Some(500) }));
        assert_eq!(cr("bytes */500").unwrap().bytes(), None);
        assert_eq!(cr("bytes 0-1/*"), Some(ContentRange { range: Some((0, 1)), total: None }));
        assert!(cr("bytes 0-99/100").unwrap().is_whole());
        assert!(!cr("bytes 0-98/100").unwrap().is_whole());
        assert!(!cr("bytes 1-99/100").unwrap().is_whole());
        for bad in
            ["bytes 5-4/10", "bytes 0-10/10", "bytes */*", "bytes +1-2/3", "items 0-0/3", "bytes0-1/2", "bytes 1/2"]
        {
            assert_eq!(cr(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_header_keeps_non_default_port() {
        assert_eq!(host_header(&url::Url::parse("https://a.example/x").unwrap()), "a.example");
        assert_eq!(host_header(&url::Url::parse("http://a.example:8080/x").unwrap()), "a.example:8080");
        assert_eq!(host_header(&url::Url::parse("http://[::1]:81/").unwrap()), "[::1]:81");
    }
}
