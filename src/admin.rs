//! The admin listener: `GET /healthz` (503 while draining) and `GET /metrics`
//! (`HEAD` too; another method is 405).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;

/// Connections the admin listener holds at once. Its clients are a few
/// scrapers and health checks; each connection costs Pingora about 40 KiB
/// while it idles, so without a bound anyone who can reach the listener
/// (every address, in the container image) could grow the process as
/// the proxy's own listeners once could. Past it, the connection idle the
/// longest is closed to make room, as on the proxy's listeners
/// (`crate::connections`).
pub const MAX_CONNECTIONS: usize = 64;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Set when shutdown begins.
    pub draining: Arc<AtomicBool>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        crate::header_guard::began(session);
        if crate::header_guard::read_request_body(session).await.is_err() {
            session.set_keepalive(None);
        }
        crate::header_guard::ended(session);
        let req = session.req_header();
        let allowed = req.method == Method::GET || req.method == Method::HEAD;
        let (status, ctype, body) = match req.uri.path() {
            _ if !allowed => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"method not allowed\n".to_vec()),
            "/healthz" if self.draining.load(Ordering::Relaxed) => {
                (StatusCode::SERVICE_UNAVAILABLE, "application/json", br#"{"status":"draining"}"#.to_vec())
            }
            "/healthz" => (StatusCode::OK, "application/json", br#"{"status":"ok"}"#.to_vec()),
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", self.metrics.render()),
            _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        };
        let mut out = Response::builder()
            .status(status)
            .header("Content-Type", ctype)
            .header("Content-Length", body.len())
            .header("Cache-Control", "no-store");
        if !allowed {
            out = out.header("Allow", "GET, HEAD");
        }
        out.body(body).expect("static response parts are valid")
    }
}

/// Asks the admin listener at `addr` for `/healthz` and succeeds on a 200:
/// the container health check (`anibridge-proxy --health`), which must work
/// in an image without curl or a shell. A listener on every address
/// (`0.0.0.0`, `::`) is asked on loopback. Only the status line is read.
pub fn probe(addr: std::net::SocketAddr, timeout: std::time::Duration) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream.take(512)).read_line(&mut line).map_err(|e| format!("{addr}: {e}"))?;
    let line = line.trim_end();
    match line.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ if line.is_empty() => Err(format!("{addr}: no answer")),
        _ => Err(format!("{addr}: /healthz answered {line:?}")),
    }
}
