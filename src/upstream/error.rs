//! Why no upstream response could be had: a small typed error the proxy
//! turns into one client-visible failure (`proxy::reply::Failure`).

use std::sync::Arc;

use pingora_error::{Error, ErrorType};

use crate::egress::Refusal;
use crate::tunnel::EGRESS_PROXY_FAILED;

/// Clone: a failure of a fill the cache shares reaches every waiting request.
#[derive(Debug, Clone)]
pub enum FetchError {
    /// The egress policy refused the destination.
    Refused(Refusal),
    /// A redirect to somewhere that is not http(s), or without `Location`.
    BadRedirect,
    /// More than `max_redirects` hops.
    TooManyRedirects,
    /// Looking up the host (named here) failed.
    Dns(String, Arc<std::io::Error>),
    /// Connect refused/reset, TLS failure, malformed response.
    Unreachable(Arc<Error>),
    /// Connect or header read timed out.
    Timeout(Arc<Error>),
    /// The egress proxy was unreachable, refused, or failed its handshake.
    EgressProxy(Arc<Error>),
    /// The host's gate refused: over its limit for the whole queue
    /// timeout, or cooling down longer than that.
    Gate(crate::gate::Refused),
    /// The upstream request could not be built (a URL without a host, a
    /// header Pingora refused): the proxy's own fault, never the upstream's.
    Request(&'static str),
}

impl FetchError {
    /// Worth one refresh of a resolved URL (connect errors and timeouts).
    pub fn is_refreshable(&self) -> bool {
        matches!(
            self,
            FetchError::Dns(..) | FetchError::Unreachable(_) | FetchError::Timeout(_) | FetchError::EgressProxy(_)
        )
    }

    pub fn from_pingora(e: Box<Error>) -> FetchError {
        match e.etype() {
            t if *t == EGRESS_PROXY_FAILED => FetchError::EgressProxy(e.into()),
            ErrorType::ConnectTimedout
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout => FetchError::Timeout(e.into()),
            _ => FetchError::Unreachable(e.into()),
        }
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Refused(r) => write!(f, "egress refused: {r}"),
            FetchError::BadRedirect => f.write_str("redirect to a non-http(s) or missing Location"),
            FetchError::TooManyRedirects => f.write_str("too many redirects"),
            FetchError::Dns(host, e) => write!(f, "DNS lookup of {host}: {e}"),
            FetchError::Unreachable(e) | FetchError::Timeout(e) | FetchError::EgressProxy(e) => write!(f, "{e}"),
            FetchError::Gate(crate::gate::Refused::Busy) => f.write_str("the host's connection limit stayed reached"),
            FetchError::Gate(crate::gate::Refused::CoolingDown(s)) => write!(f, "the host cools down for {s} s more"),
            FetchError::Request(why) => write!(f, "cannot build the upstream request: {why}"),
        }
    }
}
