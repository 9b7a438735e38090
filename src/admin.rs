//! The admin listener: `/healthz` (503 while draining) and `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Set when shutdown begins.
    pub draining: Arc<AtomicBool>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let (status, ctype, body) = match path.as_str() {
            "/healthz" if self.draining.load(Ordering::Relaxed) => {
                (StatusCode::SERVICE_UNAVAILABLE, "application/json", br#"{"status":"draining"}"#.to_vec())
            }
            "/healthz" => (StatusCode::OK, "application/json", br#"{"status":"ok"}"#.to_vec()),
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", self.metrics.render()),
            _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header("Content-Type", ctype)
            .header("Content-Length", body.len())
            .header("Cache-Control", "no-store")
            .body(body)
            .expect("static response parts are valid")
    }
}
