//! Which route a request path names, and how a static route maps a request
//! onto its upstream.

use std::sync::Arc;

use url::Url;

pub const RELAY_PREFIX: &str = "/strm/proxy/";
/// The relay without a `{hint}`: AniBridge's own URL builder writes
/// `/strm/proxy?u=...`, and the Python data plane served it.
const RELAY_PATH: &str = "/strm/proxy";
pub const STREAM_PATH: &str = "/strm/stream";

/// The relay query parameter naming (by its prefix) the static route whose
/// playlist a relay child came from: signed with the rest, it makes the
/// relay trust the child as that route would ([`route_trust`]).
pub const ROUTE_PARAM: &str = "_route";

/// Query parameters that carry credentials and are never forwarded upstream.
pub const CREDENTIAL_PARAMS: [&str; 4] = ["sig", "exp", "apikey", "api_key"];

/// A configured static route.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    /// Always ends with '/'.
    pub upstream: Arc<Url>,
    pub auth: bool,
}

impl Route {
    /// `upstream` is an http(s) base URL (config checked it).
    pub fn new(prefix: &str, mut upstream: Url, auth: bool) -> Route {
        if !upstream.path().ends_with('/') {
            let p = format!("{}/", upstream.path());
            upstream.set_path(&p);
        }
        Route { prefix: prefix.to_string(), upstream: Arc::new(upstream), auth }
    }

    /// The upstream URL for `rest` (the raw path after the prefix, still
    /// percent-encoded) and the raw client query minus credentials.
    pub fn target(&self, rest: &str, raw_query: Option<&str>) -> Result<Url, RouteError> {
        let mut s = String::with_capacity(self.upstream.as_str().len() + rest.len() + 32);
        s.push_str(self.upstream.as_str());
        s.push_str(rest.trim_start_matches('/'));
        if let Some(q) = raw_query.map(strip_credentials).filter(|q| !q.is_empty()) {
            s.push('?');
            s.push_str(&q);
        }
        let u = Url::parse(&s).map_err(|_| RouteError::NotAUrl)?;
        // `..` segments must not climb out of the route's base path: neither
        // as the URL reads them, nor as an upstream that decodes `%2F`
        // before it resolves dot segments reads them (nginx serves
        // `/base/..%2Fsecret` as `/secret`).
        if !u.path().starts_with(self.upstream.path()) || u.origin() != self.upstream.origin() || climbs(rest) {
            return Err(RouteError::Escapes);
        }
        Ok(u)
    }
}

impl Route {
    /// The route's own path and query for an absolute upstream URL `child`
    /// under its upstream (a playlist's child), or `None`: elsewhere, or
    /// with a query parameter the route would take as a credential (such a
    /// child goes through the relay instead).
    pub fn child<'c>(&self, child: &'c str) -> Option<(String, &'c str)> {
        let rest = child.strip_prefix(self.upstream.as_str())?;
        let (path, query) = rest.split_once('?').map_or((rest, ""), |(p, q)| (p, q));
        let (path, query) = (path.split('#').next().unwrap_or(path), query.split('#').next().unwrap_or(query));
        if climbs(path) {
            // The route would refuse it (see `target`): the relay fetches it.
            return None;
        }
        let reserved = url::form_urlencoded::parse(query.as_bytes())
            .any(|(k, _)| CREDENTIAL_PARAMS.contains(&k.as_ref()) || k == "_path");
        (!reserved).then(|| (format!("{}{path}", self.prefix), query))
    }

    /// Whether `url` is one this route would fetch: under its upstream base
    /// (the same scheme, host and port), not climbing out of it.
    pub fn covers(&self, url: &Url) -> bool {
        url.as_str().starts_with(self.upstream.as_str()) && !climbs(&url.path()[self.upstream.path().len()..])
    }
}

/// The origin a relay request may trust: the upstream of the static route
/// its (authenticated) query names in [`ROUTE_PARAM`], when that route would
/// fetch `url` itself. A route playlist's child that must go through the
/// relay (a disguised segment, which needs the relay's `{hint}`) so reaches
/// a private upstream the route trusts; a relay URL without it, or naming a
/// route that would not fetch its `u`, is judged like any other.
pub fn route_trust(routes: &[Route], raw_query: &str, url: &Url) -> Option<Arc<Url>> {
    if routes.is_empty() || !raw_query.contains(ROUTE_PARAM) {
        return None;
    }
    let named = url::form_urlencoded::parse(raw_query.as_bytes()).find(|(k, _)| k == ROUTE_PARAM)?.1;
    let route = routes.iter().find(|r| r.prefix == named)?;
    route.covers(url).then(|| route.upstream.clone())
}

/// Whether a raw path has a `..` segment once percent-decoded, with `/` or
/// `\` (which Windows servers read as `/`) between segments; `..;x` counts
/// too (Java servers drop `;` path parameters before resolving `..`).
fn climbs(raw: &str) -> bool {
    if !raw.contains(['%', ';']) {
        // The URL's own reading (a raw `\` is a `/` to it) is checked already.
        return false;
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    decoded.split(|b| *b == b'/' || *b == b'\\').any(|segment| segment == b".." || segment.starts_with(b"..;"))
}

/// Why a request path cannot be mapped onto a route's upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// The path and query make no URL under the upstream.
    NotAUrl,
    /// The path climbs out of the upstream's base path (`..`).
    Escapes,
}

/// Drops credential parameters from a raw query, keeping the rest byte for
/// byte.
pub fn strip_credentials(raw: &str) -> String {
    raw.split('&')
        .filter(|part| {
            let key = part.split('=').next().unwrap_or("");
            let key =
                url::form_urlencoded::parse(key.as_bytes()).next().map(|(k, _)| k.into_owned()).unwrap_or_default();
            !part.is_empty() && !CREDENTIAL_PARAMS.contains(&key.as_str())
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The percent-decoded request path, as bound into route signatures.
pub fn decoded_path(path: &str) -> String {
    percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned()
}

/// What a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// `/strm/proxy/{hint}`
    Relay { hint: &'a str },
    /// `/strm/stream`
    Stream,
    /// A static route and the path after its prefix.
    Route { index: usize, rest: &'a str },
}

/// Classifies a path; static routes match by longest prefix.
pub fn classify<'a>(path: &'a str, routes: &[Route]) -> Option<Target<'a>> {
    if let Some(hint) = path.strip_prefix(RELAY_PREFIX) {
        return Some(Target::Relay { hint });
    }
    if path == RELAY_PATH {
        return Some(Target::Relay { hint: "" });
    }
    if path == STREAM_PATH {
        return Some(Target::Stream);
    }
    routes
        .iter()
        .enumerate()
        .filter(|(_, r)| path.starts_with(&r.prefix))
        .max_by_key(|(_, r)| r.prefix.len())
        .map(|(index, r)| Target::Route { index, rest: &path[r.prefix.len()..] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_paths() {
        let routes = vec![
            Route::new("/cdn/", Url::parse("https://cdn.example.com/").unwrap(), true),
            Route::new("/cdn/special/", Url::parse("http://10.0.0.5:8080/base").unwrap(), false),
        ];
        assert_eq!(classify("/strm/proxy/seg-001.ts", &routes), Some(Target::Relay { hint: "seg-001.ts" }));
        assert_eq!(classify("/strm/proxy/", &routes), Some(Target::Relay { hint: "" }));
        assert_eq!(classify("/strm/proxy", &routes), Some(Target::Relay { hint: "" }), "AniBridge writes it so");
        assert_eq!(classify("/strm/proxyx", &routes), None);
        assert_eq!(classify("/strm/stream", &routes), Some(Target::Stream));
        assert_eq!(classify("/strm/streamx", &routes), None);
        assert_eq!(classify("/cdn/a/b.mp4", &routes), Some(Target::Route { index: 0, rest: "a/b.mp4" }));
        assert_eq!(classify("/cdn/special/x.ts", &routes), Some(Target::Route { index: 1, rest: "x.ts" }));
        assert_eq!(classify("/other", &routes), None);
    }

    #[test]
    fn route_children() {
        let r = Route::new("/cdn/", Url::parse("http://10.0.0.5:8080/base").unwrap(), true);
        assert_eq!(
            r.child("http://10.0.0.5:8080/base/hls/a%20b.ts?t=1&x=%2F"),
            Some(("/cdn/hls/a%20b.ts".into(), "t=1&x=%2F"))
        );
        assert_eq!(r.child("http://10.0.0.5:8080/base/k.bin"), Some(("/cdn/k.bin".into(), "")));
        assert_eq!(r.child("http://10.0.0.5:8080/other/k.bin"), None, "outside the base path");
        assert_eq!(r.child("https://10.0.0.5:8080/base/k.bin"), None, "another origin");
        assert_eq!(r.child("http://10.0.0.5:8080/base/s.ts?sig=abc"), None, "a credential name in its query");
        assert_eq!(r.child("http://10.0.0.5:8080/base/s.ts?_path=/x"), None);
        assert_eq!(r.child("http://10.0.0.5:8080/base/..%2Fs.ts"), None, "out of the base once decoded");
    }

    #[test]
    fn a_route_covers_what_it_would_fetch() {
        let r = Route::new("/cdn/", Url::parse("http://10.0.0.5:8080/base").unwrap(), true);
        let covers = |u: &str| r.covers(&Url::parse(u).unwrap());
        assert!(covers("http://10.0.0.5:8080/base/hls/seg1.jpg?t=1"));
        assert!(covers("http://10.0.0.5:8080/base/"));
        assert!(!covers("http://10.0.0.5:8080/other/seg1.jpg"), "outside the base path");
        assert!(!covers("http://10.0.0.5:8080/basement/seg1.jpg"));
        assert!(!covers("https://10.0.0.5:8080/base/seg1.jpg"), "another scheme");
        assert!(!covers("http://10.0.0.5:8081/base/seg1.jpg"), "another port");
        assert!(!covers("http://10.0.0.6:8080/base/seg1.jpg"), "another host");
        assert!(!covers("http://user@10.0.0.5:8080/base/seg1.jpg"), "credentials of its own");
        assert!(!covers("http://10.0.0.5:8080/base/..%2Fsecret"), "out of the base once decoded");
        assert!(!covers("http://10.0.0.5:8080/base/../secret"), "out of the base as the URL reads it");
    }

    #[test]
    fn a_relay_query_naming_a_route_is_trusted_for_what_that_route_fetches() {
        let routes = vec![
            Route::new("/cdn/", Url::parse("http://10.0.0.5:8080/base/").unwrap(), true),
            Route::new("/other/", Url::parse("http://10.0.0.6/").unwrap(), true),
        ];
        let seg = Url::parse("http://10.0.0.5:8080/base/seg1.jpg").unwrap();
        let trust = |q: &str, u: &Url| route_trust(&routes, q, u).map(|t| t.to_string());
        assert_eq!(trust("u=x&_route=%2Fcdn%2F&exp=1&sig=a", &seg).as_deref(), Some("http://10.0.0.5:8080/base/"));
        assert_eq!(trust("u=x&exp=1&sig=a", &seg), None, "a relay URL that names no route");
        assert_eq!(trust("u=x&_route=%2Fother%2F", &seg), None, "a route that would not fetch it");
        assert_eq!(trust("u=x&_route=%2Fnone%2F", &seg), None, "no such route");
        let outside = Url::parse("http://10.0.0.5:8080/secret").unwrap();
        assert_eq!(trust("u=x&_route=%2Fcdn%2F", &outside), None, "outside the route's base");
        assert_eq!(route_trust(&[], "_route=%2Fcdn%2F", &seg), None);
    }

    #[test]
    fn route_targets() {
        let r = Route::new("/cdn/", Url::parse("http://10.0.0.5:8080/base").unwrap(), true);
        assert_eq!(r.upstream.as_str(), "http://10.0.0.5:8080/base/");
        let t = r.target("dir/a%20b.ts", Some("x=1&sig=ab&exp=2&apikey=k&api_key=k&y=%2F")).unwrap();
        assert_eq!(t.as_str(), "http://10.0.0.5:8080/base/dir/a%20b.ts?x=1&y=%2F");
        assert_eq!(r.target("../../etc/passwd", None), Err(RouteError::Escapes));
        assert_eq!(r.target("%2e%2e/secret", None), Err(RouteError::Escapes));
        // As an upstream that decodes `%2F` first would read them.
        for climbing in [
            "..%2Fsecret",
            "..%2fsecret",
            "%2E%2E%2Fsecret",
            "dir/..%2F..%2Fsecret",
            "..%5Csecret",
            "dir%2F..%2F..",
            "..;/secret",
            "a/..;x=1/s",
        ] {
            assert_eq!(r.target(climbing, None), Err(RouteError::Escapes), "{climbing}");
        }
        for fine in ["a..b.ts", "..a/b.ts", "dir%2Fa.ts", "%2E/a.ts", "a/...ts", "a;b/c.ts", "..a;b.ts"] {
            assert!(r.target(fine, None).is_ok(), "{fine}");
        }
        assert_eq!(strip_credentials("sig=1&exp=2"), "");
        assert_eq!(decoded_path("/cdn/a%20b%2Fc.ts"), "/cdn/a b/c.ts");
    }
}
