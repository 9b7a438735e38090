//! The streams being relayed right now, so that when the shutdown grace
//! period ends with some still running, each one cut gets its access line
//! (with the bytes it sent) and a warning, instead of vanishing with the
//! runtime.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use http::{HeaderValue, Method, Uri};

use super::State;
use crate::access::Line;
use crate::metrics::RouteLabel;

/// What a stream's access line says, fixed when its body starts; `bytes`
/// grows as it is sent. Every stream registers one, and almost none is
/// ever cut, so it holds the request's own cheap handles (shared bytes)
/// and the line is only worked out when the shutdown cuts it.
#[derive(Debug)]
pub struct Stream {
    pub at: SystemTime,
    pub started: Instant,
    pub ttfb_ms: Option<u64>,
    /// The peer, and the `X-Forwarded-For` it sent (the client is worked
    /// out from both as for any access line).
    pub peer: Option<IpAddr>,
    pub forwarded_for: Option<HeaderValue>,
    pub method: Method,
    pub uri: Uri,
    pub route: RouteLabel,
    pub route_index: Option<usize>,
    pub status: u16,
    pub upstream_host: String,
    pub upstream_status: u16,
    pub cache: &'static str,
    pub user_agent: Option<HeaderValue>,
    pub request_id: String,
    /// Body bytes sent so far.
    pub bytes: AtomicU64,
}

impl Stream {
    /// Its access line as of now, marked cut.
    pub fn cut_line(&self, st: &State) -> String {
        let client = crate::access::client_address(self.peer, self.forwarded_for.as_ref(), &st.trusted_proxies);
        Line {
            at: Some(self.at),
            client: &client,
            method: self.method.as_str(),
            path: self.uri.path(),
            route: self.route(st),
            status: self.status,
            bytes: self.bytes.load(Ordering::Relaxed),
            ms: self.started.elapsed().as_millis() as u64,
            ttfb_ms: self.ttfb_ms,
            upstream_host: &self.upstream_host,
            upstream_status: self.upstream_status,
            cache: self.cache,
            resumed: 0,
            user_agent: &crate::access::header_text(self.user_agent.as_ref()),
            request_id: &self.request_id,
            error: Some("shutdown grace period over"),
            cut: true,
        }
        .render(st.log_format)
    }

    /// The `route` of its access line.
    pub fn route<'a>(&self, st: &'a State) -> &'a str {
        st.route_name(self.route, self.route_index)
    }
}

/// The registry (shared by every request and the shutdown watcher).
#[derive(Debug, Default)]
pub struct Streams {
    next: AtomicU64,
    /// aHash: the ids are this process's own counter, no one else's input.
    open: Mutex<HashMap<u64, Arc<Stream>, ahash::RandomState>>,
}

/// A stream's place in the registry, given up when dropped (the stream
/// ended, well or not).
pub struct Open<'a> {
    streams: &'a Streams,
    id: u64,
    pub stream: Arc<Stream>,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.id);
    }
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Stream>, ahash::RandomState>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn open(&self, stream: Stream) -> Open<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stream = Arc::new(stream);
        self.lock().insert(id, stream.clone());
        Open { streams: self, id, stream }
    }

    /// The streams running now.
    pub fn running(&self) -> Vec<Arc<Stream>> {
        self.lock().values().cloned().collect()
    }
}
