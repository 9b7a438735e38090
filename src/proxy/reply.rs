//! How a request ends when it does not end well, decided in one place:
//! every answer the proxy makes up itself is a [`Failure`] (one table of
//! statuses and the one-line reasons clients read); a response already
//! under way (or a client gone) is aborted instead.

use bytes::Bytes;
use http::header;
use http::{Method, StatusCode};
use pingora::protocols::http::ServerSession;
use pingora_error::Error;
use pingora_http::ResponseHeader;

use crate::auth::AuthError;
use crate::cors::{self, Cors};
use crate::upstream::FetchError;

/// A query parameter a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    U,
    Site,
    Slug,
}

/// Every answer the proxy generates itself: a status and the one-line
/// reason in the body. Lower layers keep their own small errors
/// ([`FetchError`], [`AuthError`], ...); they become one of these here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 405: only GET, HEAD (and OPTIONS with CORS) are served.
    MethodNotAllowed,
    /// 404: no route serves the path (or `/strm/stream` without a resolver).
    NotFound,
    /// 401: the credentials were refused.
    Auth(AuthError),
    /// 400: a client sent the pseudo-parameter `_path` itself.
    ReservedPath,
    /// 400: a route's path is no URL under its upstream.
    InvalidPath,
    /// 400: a route's path climbs out of its upstream's base (`..`).
    PathEscapesRoute,
    /// 400: a required parameter is missing or empty.
    Missing(Param),
    /// 400: `u` is not an absolute http(s) URL, or has control characters.
    InvalidU,
    /// 400: `u` names a scheme other than http or https.
    UnsupportedScheme,
    /// 400: an HTTP/1.1 request without `Host` (RFC 9112 §3.2 says so).
    MissingHost,
    /// 400: a `Host` that is no `host[:port]` (RFC 9112 §3.2 again).
    InvalidHost,
    /// 403: the egress policy refused the destination.
    DestinationNotAllowed,
    /// 502: a redirect without a usable http(s) `Location`.
    BadRedirect,
    /// 502: more than `upstream.max_redirects` hops.
    TooManyRedirects,
    /// 502: DNS failed, the connection was refused or reset, or TLS failed.
    Unreachable,
    /// 502: the upstream answered, but not with an HTTP/1.x header the
    /// proxy can relay (unparsable, ambiguous framing, over 64 KiB, interim
    /// answers without end).
    InvalidResponse,
    /// 504: connecting or waiting for the upstream's header timed out.
    Timeout,
    /// 502: the configured egress proxy failed.
    EgressProxy,
    /// 502: the resolver was down, answered non-2xx or malformed JSON.
    ResolverUnavailable,
    /// 502: the upstream playlist is larger than `stream.max_playlist_bytes`.
    PlaylistTooLarge,
    /// 502: the playlist's `Content-Encoding` could not be undone.
    BadPlaylistEncoding,
    /// 502: the upstream gave no whole playlist even when asked again.
    PlaylistUnavailable,
    /// 502: the proxy failed before answering (Pingora's last resort).
    UpstreamFailed,
    /// 500: a request the proxy could not build (a bug, never the client's).
    Internal,
    /// 503 with `Retry-After: 1`: the host's connection limit stayed
    /// reached for `upstream.queue_timeout`.
    Busy,
    /// 503 with `Retry-After`: the host cools down this many more seconds.
    CoolingDown(u64),
}

impl Failure {
    pub fn status(self) -> StatusCode {
        use Failure::*;
        match self {
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            NotFound => StatusCode::NOT_FOUND,
            Auth(_) => StatusCode::UNAUTHORIZED,
            ReservedPath | InvalidPath | PathEscapesRoute | Missing(_) | InvalidU | UnsupportedScheme | MissingHost
            | InvalidHost => StatusCode::BAD_REQUEST,
            DestinationNotAllowed => StatusCode::FORBIDDEN,
            BadRedirect | TooManyRedirects | Unreachable | InvalidResponse | EgressProxy | ResolverUnavailable
            | PlaylistTooLarge | BadPlaylistEncoding | PlaylistUnavailable | UpstreamFailed => StatusCode::BAD_GATEWAY,
            Timeout => StatusCode::GATEWAY_TIMEOUT,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Busy | CoolingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `Retry-After` seconds a 503 carries.
    pub fn retry_after(self) -> Option<u64> {
        match self {
            Failure::Busy => Some(1),
            Failure::CoolingDown(s) => Some(s.max(1)),
            _ => None,
        }
    }

    /// The body's one line (never a secret, a URL or an internal address).
    pub fn reason(self) -> &'static str {
        use Failure::*;
        match self {
            MethodNotAllowed => "method not allowed",
            NotFound => "not found",
            Auth(e) => e.reason(),
            ReservedPath => "reserved parameter _path",
            InvalidPath => "invalid path",
            PathEscapesRoute => "path escapes the route",
            Missing(Param::U) => "missing parameter u",
            Missing(Param::Site) => "missing parameter site",
            Missing(Param::Slug) => "missing parameter slug",
            InvalidU => "invalid parameter u",
            UnsupportedScheme => "unsupported scheme",
            MissingHost => "missing Host header",
            InvalidHost => "invalid Host header",
            DestinationNotAllowed => "destination not allowed",
            BadRedirect => "bad redirect",
            TooManyRedirects => "too many redirects",
            Unreachable => "upstream unreachable",
            InvalidResponse => "invalid upstream response",
            Timeout => "upstream timeout",
            EgressProxy => "egress proxy failed",
            ResolverUnavailable => "resolver unavailable",
            PlaylistTooLarge => "playlist too large",
            BadPlaylistEncoding => "bad playlist encoding",
            PlaylistUnavailable => "playlist unavailable",
            UpstreamFailed => "upstream failed",
            Internal => "internal error",
            Busy => "upstream busy",
            CoolingDown(_) => "upstream cooling down",
        }
    }
}

impl From<&FetchError> for Failure {
    fn from(e: &FetchError) -> Failure {
        match e {
            FetchError::Refused(_) => Failure::DestinationNotAllowed,
            FetchError::BadRedirect => Failure::BadRedirect,
            FetchError::TooManyRedirects => Failure::TooManyRedirects,
            FetchError::Unreachable(c) if c.is_malformed_answer() => Failure::InvalidResponse,
            FetchError::Dns(..) | FetchError::Unreachable(_) => Failure::Unreachable,
            FetchError::Timeout(_) => Failure::Timeout,
            FetchError::EgressProxy(_) => Failure::EgressProxy,
            FetchError::Request(_) => Failure::Internal,
            FetchError::PlaylistTooLarge(_) => Failure::PlaylistTooLarge,
            FetchError::Gate(crate::gate::Refused::Busy) => Failure::Busy,
            FetchError::Gate(crate::gate::Refused::CoolingDown(s)) => Failure::CoolingDown(*s),
        }
    }
}

/// How handling a request ends when it does not complete normally.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing was sent yet: answer with this failure.
    Reply(Failure),
    /// The response is under way (or the client is gone): abort it.
    Abort(Box<Error>),
}

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Outcome {
        Outcome::Reply(f)
    }
}

impl From<AuthError> for Outcome {
    fn from(e: AuthError) -> Outcome {
        Outcome::Reply(Failure::Auth(e))
    }
}

/// Errors of writing to the client, or of building a header: the response
/// cannot go on.
impl From<Box<Error>> for Outcome {
    fn from(e: Box<Error>) -> Outcome {
        Outcome::Abort(e)
    }
}

/// Writes a generated answer: status, one-line reason, no caching.
pub async fn reply(
    down: &mut ServerSession,
    ctx: &mut super::Ctx,
    cors: &Cors,
    failure: Failure,
) -> pingora_error::Result<()> {
    let body = Bytes::from(format!("{}\n", failure.reason()));
    let mut out = ResponseHeader::build(failure.status(), Some(6))?;
    out.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    out.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    out.insert_header(header::CACHE_CONTROL, "no-store")?;
    if failure == Failure::MethodNotAllowed {
        out.insert_header("Allow", cors::ALLOW_METHODS)?;
    }
    if let Some(secs) = failure.retry_after() {
        out.insert_header("Retry-After", secs.to_string())?;
    }
    cors.apply(down.req_header().headers.get(header::ORIGIN), &mut out)?;
    ctx.status = failure.status().as_u16();
    ctx.sending(&mut out)?;
    let head = down.req_header().method == Method::HEAD;
    down.write_response_header(Box::new(out)).await?;
    if !head {
        ctx.body_bytes += body.len() as u64;
        down.write_response_body(body, true).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table DESIGN's routes and response semantics name, row by row.
    #[test]
    fn every_failure_has_its_status_and_reason() {
        use Failure::*;
        let table: [(Failure, u16, &str); 27] = [
            (MethodNotAllowed, 405, "method not allowed"),
            (NotFound, 404, "not found"),
            (Auth(AuthError::TokenExpired), 401, "token expired"),
            (ReservedPath, 400, "reserved parameter _path"),
            (InvalidPath, 400, "invalid path"),
            (PathEscapesRoute, 400, "path escapes the route"),
            (Missing(Param::U), 400, "missing parameter u"),
            (Missing(Param::Slug), 400, "missing parameter slug"),
            (InvalidU, 400, "invalid parameter u"),
            (UnsupportedScheme, 400, "unsupported scheme"),
            (MissingHost, 400, "missing Host header"),
            (InvalidHost, 400, "invalid Host header"),
            (DestinationNotAllowed, 403, "destination not allowed"),
            (BadRedirect, 502, "bad redirect"),
            (TooManyRedirects, 502, "too many redirects"),
            (Unreachable, 502, "upstream unreachable"),
            (InvalidResponse, 502, "invalid upstream response"),
            (Timeout, 504, "upstream timeout"),
            (EgressProxy, 502, "egress proxy failed"),
            (ResolverUnavailable, 502, "resolver unavailable"),
            (PlaylistTooLarge, 502, "playlist too large"),
            (BadPlaylistEncoding, 502, "bad playlist encoding"),
            (PlaylistUnavailable, 502, "playlist unavailable"),
            (UpstreamFailed, 502, "upstream failed"),
            (Internal, 500, "internal error"),
            (Busy, 503, "upstream busy"),
            (CoolingDown(7), 503, "upstream cooling down"),
        ];
        for (f, status, reason) in table {
            assert_eq!((f.status().as_u16(), f.reason()), (status, reason), "{f:?}");
        }
        assert_eq!((Busy.retry_after(), CoolingDown(7).retry_after(), Timeout.retry_after()), (Some(1), Some(7), None));
    }

    #[test]
    fn upstream_errors_are_filed_where_they_belong() {
        let io = || std::io::Error::other("x");
        let pingora = |t| Error::explain(t, "x");
        use pingora_error::ErrorType as T;
        assert_eq!(Failure::from(&FetchError::Dns("h.example".into(), io().into())), Failure::Unreachable);
        assert_eq!(Failure::from(&FetchError::from_pingora(pingora(T::ConnectTimedout))), Failure::Timeout);
        // A name lookup without an answer is a timeout before any header, as a silent connect is.
        let url = url::Url::parse("http://h.example/").unwrap();
        assert_eq!(Failure::from(&FetchError::lookup_timed_out(&url)), Failure::Timeout);
        assert_eq!(Failure::from(&FetchError::from_pingora(pingora(T::ReadTimedout))), Failure::Timeout);
        assert_eq!(Failure::from(&FetchError::from_pingora(pingora(T::ConnectRefused))), Failure::Unreachable);
        assert_eq!(Failure::from(&FetchError::from_pingora(pingora(T::ConnectionClosed))), Failure::Unreachable);
        // It answered, but nothing the proxy can relay.
        assert_eq!(Failure::from(&FetchError::from_pingora(pingora(T::InvalidHTTPHeader))), Failure::InvalidResponse);
        // Building the upstream request is the proxy's own business, never an unreachable upstream.
        assert_eq!(Failure::from(&FetchError::Request("no host")), Failure::Internal);
        // A shared playlist too long for any of its readers: what the relay answers.
        assert_eq!(Failure::from(&FetchError::PlaylistTooLarge(8)), Failure::PlaylistTooLarge);
    }
}
