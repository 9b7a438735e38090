//! Why no upstream response could be had: a small typed error the proxy
//! turns into one client-visible failure (`proxy::reply::Failure`).

use std::sync::Arc;

use pingora_core::connectors::l4::ConnectErrorExt;
use pingora_error::{Error, ErrorType};

use crate::egress::Refusal;
use crate::tunnel::EGRESS_PROXY_FAILED;

/// The name lookup got no answer before `upstream.connect_timeout`.
const LOOKUP_TIMEDOUT: ErrorType = ErrorType::Custom("LookupTimedout");

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
    /// Connect refused/reset, TLS failure, malformed response (told apart
    /// by [`Cause::is_malformed_answer`]).
    Unreachable(Cause),
    /// Connect or header read timed out.
    Timeout(Cause),
    /// The egress proxy was unreachable, refused, or failed its handshake.
    EgressProxy(Cause),
    /// The host's gate refused: over its limit for the whole queue
    /// timeout, or cooling down longer than that.
    Gate(crate::gate::Refused),
    /// The upstream request could not be built (a URL without a host, a
    /// header Pingora refused): the proxy's own fault, never the upstream's.
    Request(&'static str),
    /// A playlist the cache read for the requests sharing it was longer
    /// than `stream.max_playlist_bytes` (this many bytes): each of them gets
    /// what the relay answers such a playlist with.
    PlaylistTooLarge(usize),
}

/// What failed, and where: Pingora's error, and the `host:port` it happened
/// at (when known), for a log line that names both in plain words.
#[derive(Debug, Clone)]
pub struct Cause {
    pub error: Arc<Error>,
    pub at: Option<Arc<str>>,
    /// The place is https: connecting includes the TLS handshake.
    pub tls: bool,
}

impl Cause {
    fn new(error: Box<Error>) -> Cause {
        Cause { error: error.into(), at: None, tls: false }
    }

    /// The upstream answered, but with no HTTP/1.x response header the
    /// proxy can read (Pingora's parse errors and this crate's own bounds
    /// on a header are `InvalidHTTPHeader`).
    pub fn is_malformed_answer(&self) -> bool {
        matches!(self.error.etype(), ErrorType::InvalidHTTPHeader)
    }
}

impl FetchError {
    /// The same error, saying it happened at `url`'s host and port (if it
    /// does not say where already).
    pub fn at(mut self, url: &url::Url) -> FetchError {
        if let FetchError::Unreachable(c) | FetchError::Timeout(c) | FetchError::EgressProxy(c) = &mut self {
            if c.at.is_none() {
                let host = url.host_str().unwrap_or("-");
                c.at = Some(format!("{host}:{}", url.port_or_known_default().unwrap_or(0)).into());
                c.tls = url.scheme() == "https";
            }
        }
        self
    }

    /// Worth one refresh of a resolved URL (connect errors and timeouts).
    pub fn is_refreshable(&self) -> bool {
        matches!(
            self,
            FetchError::Dns(..) | FetchError::Unreachable(_) | FetchError::Timeout(_) | FetchError::EgressProxy(_)
        )
    }

    /// The host's name got no answer before the connect timeout: a timeout
    /// before any header, like a connect that never completes.
    pub fn lookup_timed_out(url: &url::Url) -> FetchError {
        FetchError::Timeout(Cause::new(Error::new(LOOKUP_TIMEDOUT))).at(url)
    }

    pub fn from_pingora(e: Box<Error>) -> FetchError {
        match e.etype() {
            t if *t == EGRESS_PROXY_FAILED => FetchError::EgressProxy(Cause::new(e)),
            ErrorType::ConnectTimedout
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout => FetchError::Timeout(Cause::new(e)),
            _ => FetchError::Unreachable(Cause::new(e)),
        }
    }
}

impl std::fmt::Display for FetchError {
    /// One line for the log: where, then what, in plain words (the
    /// client's reason stays the short one of the failure table).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Refused(r) => write!(f, "refused by the egress policy: {r}"),
            FetchError::BadRedirect => f.write_str("redirected to a non-http(s) URL or without a Location"),
            FetchError::TooManyRedirects => f.write_str("too many redirects"),
            FetchError::Dns(host, e) => write!(f, "{host}: cannot resolve the name: {e}"),
            FetchError::Unreachable(c) | FetchError::Timeout(c) => {
                write!(f, "{}: {}", c.at.as_deref().unwrap_or("the upstream"), plain(&c.error, c.tls))
            }
            // Names the egress proxy itself (`scheme://host:port`, never credentials).
            FetchError::EgressProxy(c) => write!(
                f,
                "{} through {}",
                c.at.as_deref().unwrap_or("the upstream"),
                c.error.context.as_ref().map_or("an egress proxy", |c| c.as_str())
            ),
            FetchError::Gate(crate::gate::Refused::Busy) => f.write_str("the host's connection limit stayed reached"),
            FetchError::Gate(crate::gate::Refused::CoolingDown(s)) => write!(f, "the host cools down for {s} s more"),
            FetchError::Request(why) => write!(f, "cannot build the upstream request: {why}"),
            FetchError::PlaylistTooLarge(max) => write!(f, "the playlist exceeds stream.max_playlist_bytes ({max})"),
        }
    }
}

/// What went wrong, in the words an operator would use, with the detail
/// the lower layers gave (a certificate's problem, the OS's error).
fn plain(e: &Error, tls: bool) -> String {
    let detail = |what: &str| {
        let d = reason(e);
        let d = d.trim();
        if d.is_empty() {
            what.to_string()
        } else {
            format!("{what} ({d})")
        }
    };
    match e.etype() {
        t if *t == LOOKUP_TIMEDOUT => "no answer to the name lookup within upstream.connect_timeout".into(),
        ErrorType::ConnectRefused => "connection refused".into(),
        ErrorType::ConnectNoRoute => "no route to the address".into(),
        // Pingora's connect timeout covers the TLS handshake too, without
        // saying which one ran out: a server that accepts and never
        // handshakes must not read as a firewall dropping the connect.
        ErrorType::ConnectTimedout if tls => {
            "no answer to connect or to the TLS handshake within upstream.connect_timeout".into()
        }
        ErrorType::ConnectTimedout => "no answer to connect within upstream.connect_timeout".into(),
        ErrorType::TLSHandshakeTimedout => "TLS handshake timed out".into(),
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
            detail("TLS handshake failed")
        }
        ErrorType::ReadTimedout => "no response within upstream.read_timeout".into(),
        ErrorType::WriteTimedout => "the request was not taken within upstream.write_timeout".into(),
        ErrorType::ConnectionClosed => "the connection closed before a response".into(),
        ErrorType::InvalidHTTPHeader | ErrorType::H1Error => detail("malformed response"),
        ErrorType::ConnectError | ErrorType::SocketError | ErrorType::ReadError | ErrorType::WriteError => {
            detail("connection failed")
        }
        other => detail(other.as_str()),
    }
}

/// The lower layer's own words for `e`: its cause (the OS's error), else
/// the reason its context carries.
///
/// Pingora gives an error from a connection's set-up (a TLS handshake) the
/// connection's local address as its cause, and keeps the reason in the
/// context, with the inner error's whole chain and the SNI name in it:
/// `TLS connect() failed:  TLSHandshakeFailure context: tls connect error
/// cause: invalid peer certificate: UnknownIssuer, SNI: cdn.example`. The
/// reason is that chain's last cause.
fn reason(e: &Error) -> String {
    let bare_address = e.connect_local_addr().map(|a| format!("local address {a}"));
    if let Some(cause) = e.cause.as_ref().map(|c| c.to_string()).filter(|c| Some(c) != bare_address.as_ref()) {
        return cause;
    }
    let context = e.context.as_ref().map_or("", |c| c.as_str());
    let context = context.rsplit_once(", SNI: ").map_or(context, |(c, _)| c);
    context.rsplit_once(" cause: ").map_or(context, |(_, c)| c).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_place_and_the_cause_in_plain_words() {
        let url = url::Url::parse("https://cdn.example/v.mp4").unwrap();
        let at = |t| FetchError::from_pingora(Error::explain(t, "raw library text")).at(&url).to_string();
        assert_eq!(at(ErrorType::ConnectRefused), "cdn.example:443: connection refused");
        assert_eq!(
            at(ErrorType::ConnectTimedout),
            "cdn.example:443: no answer to connect or to the TLS handshake within upstream.connect_timeout"
        );
        let plain_http = url::Url::parse("http://cdn.example/v.mp4").unwrap();
        assert_eq!(
            FetchError::from_pingora(Error::explain(ErrorType::ConnectTimedout, "x")).at(&plain_http).to_string(),
            "cdn.example:80: no answer to connect within upstream.connect_timeout"
        );
        assert_eq!(at(ErrorType::ReadTimedout), "cdn.example:443: no response within upstream.read_timeout");
        let tls =
            Error::because(ErrorType::TLSHandshakeFailure, "handshake", "invalid peer certificate: UnknownIssuer");
        assert_eq!(
            FetchError::from_pingora(tls).at(&url).to_string(),
            "cdn.example:443: TLS handshake failed (invalid peer certificate: UnknownIssuer)"
        );
        // Pingora's own shape: the reason inside the context's chain (its
        // cause, the local address, is tests/tls.rs's to check).
        let tls = Error::explain(
            ErrorType::TLSHandshakeFailure,
            "TLS connect() failed:  TLSHandshakeFailure context: tls connect error cause: \
             received corrupt message of type InvalidContentType, SNI: cdn.example",
        );
        assert_eq!(
            FetchError::from_pingora(tls).at(&url).to_string(),
            "cdn.example:443: TLS handshake failed (received corrupt message of type InvalidContentType)"
        );
        assert_eq!(
            FetchError::lookup_timed_out(&url).to_string(),
            "cdn.example:443: no answer to the name lookup within upstream.connect_timeout"
        );
        let dns = FetchError::Dns("nowhere.example".into(), std::io::Error::other("no such host").into());
        assert_eq!(dns.to_string(), "nowhere.example: cannot resolve the name: no such host");
        // The first place named stays.
        let other = url::Url::parse("http://other.example:8080/").unwrap();
        let e = FetchError::from_pingora(Error::explain(ErrorType::ConnectRefused, "x")).at(&url).at(&other);
        assert!(e.to_string().starts_with("cdn.example:443:"), "{e}");
    }
}
