//! Prometheus metrics, registered once per process. Request counts and
//! relayed bytes are added once per request (by the `logging` hook, after
//! the response); the rest where the event happens. Gauges that must
//! balance (`in_flight`, `active_streams`) are raised through a [`Held`]
//! guard, which lowers them when dropped — also when a request panics.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// `requests` children resolved once: a label lookup hashes and locks.
    requests_by: [[IntCounter; CLASSES.len()]; RouteLabel::ALL.len()],
    upstream_by_reuse: [IntCounter; 2],
    pub requests: IntCounterVec,
    pub upstream_header_seconds: Histogram,
    pub bytes_relayed: IntCounter,
    pub active_streams: IntGauge,
    pub in_flight: IntGauge,
    pub upstream_connections: IntCounterVec,
    pub retries: IntCounter,
    pub refreshes: IntCounter,
    pub redirects: IntCounter,
    pub egress_refusals: IntCounter,
    pub auth_failures: IntCounterVec,
    pub resumes_attempted: IntCounter,
    pub resumes_succeeded: IntCounter,
    /// New upstream connections by egress route (`direct` or an egress
    /// proxy's `scheme://host:port`, never its credentials).
    pub egress_connections: IntCounterVec,
    pub egress_failures: IntCounterVec,
    /// `anibridge_cache_requests_total` children, by [`CacheResult`].
    cache_requests_by: [IntCounter; CacheResult::ALL.len()],
    pub cache_bytes: IntGauge,
    pub cache_objects: IntGauge,
    pub cache_saved: IntCounter,
    pub host_cooldowns: IntCounter,
    pub host_queue_waits: IntCounter,
    pub host_refused: IntCounter,
    pub shutdown_cut_streams: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("anibridge_requests_total", "Requests by route and status class"),
            &["route", "status"],
        )
        .unwrap();
        let upstream_header_seconds = Histogram::with_opts(
            HistogramOpts::new("anibridge_upstream_header_seconds", "Time from request to upstream response header")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .unwrap();
        let bytes_relayed =
            IntCounter::new("anibridge_bytes_relayed_total", "Response body bytes sent to clients").unwrap();
        let active_streams = IntGauge::new("anibridge_active_streams", "Responses being streamed now").unwrap();
        let in_flight = IntGauge::new("anibridge_requests_in_flight", "Requests being handled now").unwrap();
        let upstream_connections = IntCounterVec::new(
            Opts::new("anibridge_upstream_connections_total", "Upstream connections by whether they were reused"),
            &["reused"],
        )
        .unwrap();
        let retries = IntCounter::new("anibridge_upstream_retries_total", "Upstream attempts retried").unwrap();
        let refreshes =
            IntCounter::new("anibridge_resolver_refreshes_total", "Resolved URLs refreshed after a failure").unwrap();
        let redirects = IntCounter::new("anibridge_redirects_followed_total", "Upstream redirects followed").unwrap();
        let egress_refusals =
            IntCounter::new("anibridge_egress_refusals_total", "Destinations refused by egress policy").unwrap();
        let auth_failures = IntCounterVec::new(
            Opts::new("anibridge_auth_failures_total", "Requests refused by authentication"),
            &["reason"],
        )
        .unwrap();
        let resumes_attempted = IntCounter::new(
            "anibridge_resume_attempts_total",
            "Reconnections to continue a body whose upstream died or stalled mid-way",
        )
        .unwrap();
        let resumes_succeeded = IntCounter::new(
            "anibridge_resumes_succeeded_total",
            "Bodies continued on a new upstream connection as if nothing happened",
        )
        .unwrap();
        let egress_connections = IntCounterVec::new(
            Opts::new("anibridge_egress_connections_total", "New upstream connections by egress route"),
            &["route"],
        )
        .unwrap();
        let egress_failures = IntCounterVec::new(
            Opts::new("anibridge_egress_failures_total", "Upstream connections that failed, by egress route"),
            &["route"],
        )
        .unwrap();
        let cache_requests = IntCounterVec::new(
            Opts::new("anibridge_cache_requests_total", "Requests by what the cache did for them"),
            &["result"],
        )
        .unwrap();
        let cache_bytes =
            IntGauge::new("anibridge_cache_bytes", "Body bytes the cache holds (stored and being filled)").unwrap();
        let cache_objects = IntGauge::new("anibridge_cache_objects", "Objects stored in the cache").unwrap();
        let cache_saved = IntCounter::new(
            "anibridge_cache_upstream_bytes_saved_total",
            "Body bytes sent to clients from memory that the upstream did not send again",
        )
        .unwrap();
        let host_cooldowns =
            IntCounter::new("anibridge_host_cooldowns_total", "Times an upstream host's refusal started a cooldown")
                .unwrap();
        let host_queue_waits = IntCounter::new(
            "anibridge_host_queue_waits_total",
            "Upstream requests that waited for their host's gate (its limit or cooldown)",
        )
        .unwrap();
        let host_refused = IntCounter::new(
            "anibridge_host_refused_total",
            "Requests answered 503 by a host's gate (upstream busy or cooling down)",
        )
        .unwrap();
        let shutdown_cut_streams = IntCounter::new(
            "anibridge_shutdown_cut_streams_total",
            "Streams still running when the shutdown grace period ended, cut",
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(shutdown_cut_streams.clone()),
            Box::new(host_cooldowns.clone()),
            Box::new(host_queue_waits.clone()),
            Box::new(host_refused.clone()),
            Box::new(cache_requests.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_objects.clone()),
            Box::new(cache_saved.clone()),
            Box::new(upstream_header_seconds.clone()),
            Box::new(bytes_relayed.clone()),
            Box::new(active_streams.clone()),
            Box::new(in_flight.clone()),
            Box::new(upstream_connections.clone()),
            Box::new(retries.clone()),
            Box::new(refreshes.clone()),
            Box::new(redirects.clone()),
            Box::new(egress_refusals.clone()),
            Box::new(auth_failures.clone()),
            Box::new(resumes_attempted.clone()),
            Box::new(resumes_succeeded.clone()),
            Box::new(egress_connections.clone()),
            Box::new(egress_failures.clone()),
        ] {
            registry.register(c).unwrap();
        }
        let requests_by = RouteLabel::ALL.map(|r| CLASSES.map(|c| requests.with_label_values(&[r.as_str(), c])));
        let upstream_by_reuse = ["false", "true"].map(|r| upstream_connections.with_label_values(&[r]));
        let cache_requests_by = CacheResult::ALL.map(|r| cache_requests.with_label_values(&[r.as_str()]));
        Metrics {
            registry,
            requests_by,
            upstream_by_reuse,
            requests,
            upstream_header_seconds,
            bytes_relayed,
            active_streams,
            in_flight,
            upstream_connections,
            retries,
            refreshes,
            redirects,
            egress_refusals,
            auth_failures,
            resumes_attempted,
            resumes_succeeded,
            egress_connections,
            egress_failures,
            cache_requests_by,
            cache_bytes,
            cache_objects,
            cache_saved,
            host_cooldowns,
            host_queue_waits,
            host_refused,
            shutdown_cut_streams,
        }
    }

    /// Counts what the cache did for a request.
    pub fn count_cache(&self, result: CacheResult) {
        self.cache_requests_by[result as usize].inc();
    }

    /// Counts a finished request by route and status class.
    pub fn count_request(&self, route: RouteLabel, status: u16) {
        self.requests_by[route as usize][status_class(status)].inc();
    }

    /// Counts an upstream exchange by whether its connection came from the pool.
    pub fn count_upstream_connection(&self, reused: bool) {
        self.upstream_by_reuse[reused as usize].inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(4096);
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        buf
    }
}

/// A gauge raised for as long as this guard lives.
#[must_use = "the gauge is lowered again when the guard is dropped"]
pub struct Held(IntGauge);

impl Held {
    pub fn new(gauge: &IntGauge) -> Held {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What a request was routed to: the `route` label of the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    /// Refused before routing (an unknown path, a method not served).
    Unrouted,
    Relay,
    Stream,
    Route,
    Preflight,
}

impl RouteLabel {
    /// Every label, in the order of their discriminants (the metrics' table index).
    pub const ALL: [RouteLabel; 5] =
        [RouteLabel::Unrouted, RouteLabel::Relay, RouteLabel::Stream, RouteLabel::Route, RouteLabel::Preflight];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Unrouted => "-",
            RouteLabel::Relay => "relay",
            RouteLabel::Stream => "stream",
            RouteLabel::Route => "route",
            RouteLabel::Preflight => "preflight",
        }
    }
}

/// What the cache did for a request: the `result` label of
/// `anibridge_cache_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Answered from a stored object.
    Hit,
    /// Answered from a fill another request started.
    Coalesced,
    /// Went upstream (starting a fill, or alone).
    Miss,
    /// Not for the cache (it is off, or the request or answer cannot be shared).
    Bypass,
}

impl CacheResult {
    pub const ALL: [CacheResult; 4] =
        [CacheResult::Hit, CacheResult::Coalesced, CacheResult::Miss, CacheResult::Bypass];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Miss => "miss",
            CacheResult::Bypass => "bypass",
        }
    }
}

/// The `status` label values: `2xx`, `4xx`, ... (`none`: nothing was sent).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// The index in [`CLASSES`] of a status code's class.
fn status_class(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100) - 1,
        _ => CLASSES.len() - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_index_their_own_row() {
        for (i, r) in RouteLabel::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let m = Metrics::new();
        m.count_request(RouteLabel::Stream, 206);
        m.count_request(RouteLabel::Unrouted, 0);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("anibridge_requests_total{route=\"stream\",status=\"2xx\"} 1"), "{text}");
        assert!(text.contains("anibridge_requests_total{route=\"-\",status=\"none\"} 1"), "{text}");
        assert_eq!([100, 299, 404, 599, 600].map(|s| CLASSES[status_class(s)]), ["1xx", "2xx", "4xx", "5xx", "none"]);
    }

    #[test]
    fn held_gauges_are_lowered_even_by_a_panic() {
        let m = Metrics::new();
        let a = Held::new(&m.in_flight);
        let b = Held::new(&m.in_flight);
        assert_eq!(m.in_flight.get(), 2);
        drop(a);
        assert_eq!(m.in_flight.get(), 1);
        let gauge = m.in_flight.clone();
        let unwound = std::panic::catch_unwind(move || {
            let _held = b;
            let _more = Held::new(&gauge);
            panic!("a request's bug");
        });
        assert!(unwound.is_err());
        assert_eq!(m.in_flight.get(), 0);
    }
}
