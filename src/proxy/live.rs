//! The streams being relayed right now, so that when the shutdown grace
//! period ends with some still running, each one cut gets its access line
//! (with the bytes it sent) and a warning, instead of vanishing with the
//! runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::access::{Format, Line};

/// What a stream's access line says, fixed when its body starts; `bytes`
/// grows as it is sent.
#[derive(Debug, Default)]
pub struct Stream {
    pub at: Option<SystemTime>,
    pub started: Option<Instant>,
    pub ttfb_ms: Option<u64>,
    pub client: String,
    pub method: String,
    pub path: String,
    pub route: String,
    pub status: u16,
    pub upstream_host: String,
    pub upstream_status: u16,
    pub cache: &'static str,
    pub user_agent: String,
    pub request_id: String,
    /// Body bytes sent so far.
    pub bytes: AtomicU64,
}

impl Stream {
    /// Its access line as of now, marked cut.
    pub fn cut_line(&self, format: Format) -> String {
        Line {
            at: self.at,
            client: &self.client,
            method: &self.method,
            path: &self.path,
            route: &self.route,
            status: self.status,
            bytes: self.bytes.load(Ordering::Relaxed),
            ms: self.started.map_or(0, |s| s.elapsed().as_millis() as u64),
            ttfb_ms: self.ttfb_ms,
            upstream_host: &self.upstream_host,
            upstream_status: self.upstream_status,
            cache: self.cache,
            resumed: 0,
            user_agent: &self.user_agent,
            request_id: &self.request_id,
            error: Some("shutdown grace period over"),
            cut: true,
        }
        .render(format)
    }
}

/// The registry (shared by every request and the shutdown watcher).
#[derive(Debug, Default)]
pub struct Streams {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Stream>>>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Stream>>> {
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
