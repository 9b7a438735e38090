//! What to fetch, what each hop asks for, and the request header as it
//! goes on the wire.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::Method;
use pingora_http::RequestHeader;
use url::{Position, Url};

use super::FetchError;
use crate::headers::{self, WireHeader};
use crate::providers::Providers;
use crate::resolver::{Again, Resolved};

/// What to fetch. Owned, because the [`Response`](super::Response) keeps
/// it: a body that dies is resumed, and a playlist fetched again, with the
/// same headers.
#[derive(Debug, Clone)]
pub struct Request {
    /// GET or HEAD, as the client asked.
    pub method: Method,
    /// The URL; after [`Client::open`](super::Client::open), the final one (redirects followed).
    pub url: Url,
    /// The client's headers that go upstream ([`headers::forwarded_request_headers`]);
    /// empty until the request path reads them, just before it goes upstream
    /// (never empty then: `Accept-Encoding` is always among them).
    pub forwarded: Vec<WireHeader>,
    /// The resolver's answer, whose headers go with every hop (they win
    /// over provider profiles), its credentials only to its URL's origin.
    pub extra: Option<Arc<Resolved>>,
    /// The one refresh of `extra` this request may still make, used when
    /// the URL has gone stale by the time its body must be resumed.
    pub again: Option<Arc<Again>>,
    /// The operator-trusted origin (a static route's upstream), if any.
    pub trusted: Option<Arc<Url>>,
    /// Fetch it whole: a `GET` without the client's `Range` and
    /// conditionals, whatever the client's method (playlists).
    pub whole: bool,
}

/// The range a hop asks for.
#[derive(Debug, Clone)]
pub(crate) enum Ask {
    /// The client's own `Range` and conditionals, if any.
    Client,
    /// None of them: the whole resource.
    Whole,
    /// The HEAD fallback: the client's `Range`, or `bytes=0-0`.
    HeadProbe,
    /// A resumption: this `Range`, with `If-Range`.
    Resume { range: HeaderValue, if_range: HeaderValue },
}

/// One upstream request as sent on a hop (the method and URL change along
/// redirects and the HEAD fallback).
pub(super) struct Hop<'a> {
    pub method: &'a Method,
    pub url: &'a Url,
    pub req: &'a Request,
    pub ask: &'a Ask,
}

/// The request header for `hop`: `Host`, what the hop asks for, then the
/// client's, the provider profile's and the resolver's headers in order.
pub(super) fn build(hop: &Hop<'_>, providers: &Providers) -> Result<Box<RequestHeader>, FetchError> {
    let url = hop.url;
    let path = &url[Position::BeforePath..Position::AfterQuery];
    let mut req = RequestHeader::build(hop.method.clone(), path.as_bytes(), Some(10))
        .map_err(|_| FetchError::Request("a header Pingora refused"))?;
    req.insert_header("Host", headers::host_header(url))
        .map_err(|_| FetchError::Request("a header Pingora refused"))?;
    // What this hop asks for replaces the client's range and conditionals.
    let client_range = hop.req.forwarded.iter().any(|h| h.name == header::RANGE);
    let own: [Option<(&'static str, HeaderValue)>; 2] = match hop.ask {
        Ask::HeadProbe if !client_range => [Some(("Range", HeaderValue::from_static("bytes=0-0"))), None],
        Ask::Client | Ask::Whole | Ask::HeadProbe => [None, None],
        Ask::Resume { range, if_range } => [Some(("Range", range.clone())), Some(("If-Range", if_range.clone()))],
    };
    let keep_client_range = matches!(hop.ask, Ask::Client | Ask::HeadProbe);
    for (name, value) in own.into_iter().flatten() {
        req.append_header(name, value).map_err(|_| FetchError::Request("a header Pingora refused"))?;
    }
    let profile = providers.headers_for(url.host_str().unwrap_or_default());
    let extra = hop.req.extra.as_deref().map_or(Cow::Borrowed(&[][..]), |r| resolver_headers(r, url));
    for h in headers::upstream_request_headers(&hop.req.forwarded, profile, &extra) {
        if !keep_client_range && headers::is_range_or_conditional(&h.name) {
            continue;
        }
        req.append_header(h.spelling.clone(), h.value.clone())
            .map_err(|_| FetchError::Request("a header Pingora refused"))?;
    }
    Ok(Box::new(req))
}

/// The resolver's headers for a hop to `url`. Its `Cookie` and
/// `Authorization` are for the origin (scheme, host, port) of the URL it
/// returned: a redirect to another origin goes without them, as browsers
/// and curl follow redirects (a hoster's session must not reach its CDN).
/// Any other header (`Referer`, `Origin`) goes with every hop.
fn resolver_headers<'a>(resolved: &'a Resolved, url: &Url) -> Cow<'a, [WireHeader]> {
    let all = &resolved.headers[..];
    let credential = |h: &WireHeader| h.name == header::COOKIE || h.name == header::AUTHORIZATION;
    if same_origin(&resolved.url, url) || !all.iter().any(credential) {
        return Cow::Borrowed(all);
    }
    Cow::Owned(all.iter().filter(|h| !credential(h)).cloned().collect())
}

/// RFC 6454's same origin for http(s) URLs: scheme, host and port.
fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme() && a.host_str() == b.host_str() && a.port_or_known_default() == b.port_or_known_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolvers_credentials_stay_with_its_origin() {
        let r = crate::resolver::parse_answer(
            br#"{"url":"https://hoster.example/v/1","headers":{"Referer":"https://r.example/","Cookie":"s=1","Authorization":"Bearer t"}}"#,
        )
        .unwrap();
        let names = |to: &str| -> Vec<String> {
            let url = Url::parse(to).unwrap();
            resolver_headers(&r, &url).iter().map(|h| h.name.to_string()).collect()
        };
        let all = ["referer", "cookie", "authorization"];
        assert_eq!(names("https://hoster.example/v/1"), all);
        assert_eq!(names("https://hoster.example:443/other?x"), all, "the same origin, another path");
        for elsewhere in ["https://cdn.example/v/1", "http://hoster.example/v/1", "https://hoster.example:8443/v/1"] {
            assert_eq!(names(elsewhere), ["referer"], "{elsewhere}");
        }
    }
}
