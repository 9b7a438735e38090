//! Prometheus metrics, registered once per process (docs/metrics.md lists
//! them all). Request counts and relayed bytes are added once per request
//! (by the `logging` hook, after the response); the rest where the event
//! happens. Gauges that must balance (`in_flight`, `active_streams`) are
//! raised through a [`Held`] guard, which lowers them when dropped — also
//! when a request panics.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// `requests` children by (route row, status), resolved on first use: a
    /// label lookup hashes and locks. Rows: the built-in routes, then the
    /// configured route prefixes.
    requests_by: Vec<Box<[OnceLock<IntCounter>]>>,
    route_names: Vec<String>,
    /// Every metric's name, as registered.
    names: Vec<String>,
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
    pub egress_refusals: IntCounterVec,
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
    pub host_refused: IntCounterVec,
    pub shutdown_cut_streams: IntCounter,
    /// Client connections closed for how they sent a request header
    /// ([`crate::header_guard`]), by why.
    pub client_headers_refused: IntCounterVec,
    /// Client connections held now, and those closed by
    /// `downstream.max_connections` ([`crate::connections`]), by why.
    pub client_connections: IntGauge,
    pub client_connections_closed: IntCounterVec,
}

/// Status codes counted apart (0: no response was sent).
const STATUSES: usize = 600;

impl Metrics {
    /// The metrics of a proxy without static routes.
    pub fn new() -> Metrics {
        Metrics::with_routes(&[])
    }

    /// The metrics of a proxy with these static route prefixes (each a
    /// `route` label of the request counts).
    pub fn with_routes(prefixes: &[&str]) -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("anibridge_requests_total", "Requests by route and response status"),
            &["route", "status"],
        )
        .unwrap();
        let build_info =
            IntGaugeVec::new(Opts::new("anibridge_build_info", "The running build (always 1)"), &["version"]).unwrap();
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
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
        let egress_refusals = IntCounterVec::new(
            Opts::new("anibridge_egress_refusals_total", "Destinations refused by the egress policy, by why"),
            &["reason"],
        )
        .unwrap();
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
        let cache_bytes = IntGauge::new(
            "anibridge_cache_bytes",
            "Bytes the cache holds: bodies and their headers (stored, being filled, or still being read)",
        )
        .unwrap();
        let cache_objects = IntGauge::new("anibridge_cache_objects", "Objects stored in the cache").unwrap();
        let cache_saved = IntCounter::new(
            "anibridge_cache_upstream_bytes_saved_total",
            "Body bytes sent to clients from memory that the upstream did not send again",
        )
        .unwrap();
        let host_cooldowns = IntCounter::new(
            "anibridge_host_cooldowns_total",
            "Times an upstream host's refusal started (or lengthened) a cooldown",
        )
        .unwrap();
        let host_queue_waits = IntCounter::new(
            "anibridge_host_queue_waits_total",
            "Upstream requests that waited for their host's gate (its limit or cooldown)",
        )
        .unwrap();
        let host_refused = IntCounterVec::new(
            Opts::new(
                "anibridge_host_refused_total",
                "Requests answered 503 by a host's gate, by why (busy: its limit stayed reached; cooling_down)",
            ),
            &["reason"],
        )
        .unwrap();
        let shutdown_cut_streams = IntCounter::new(
            "anibridge_shutdown_cut_streams_total",
            "Streams still running when the shutdown grace period ended, cut",
        )
        .unwrap();
        let client_headers_refused = IntCounterVec::new(
            Opts::new(
                "anibridge_client_headers_refused_total",
                "Client connections closed over their request header, by why (timeout: not whole within \
                 downstream.header_timeout; too_large: over 64 KiB, answered 400; malformed: not parsable, answered 400)",
            ),
            &["reason"],
        )
        .unwrap();
        let client_connections =
            IntGauge::new("anibridge_client_connections", "Client connections open on the proxy's listeners").unwrap();
        let client_connections_closed = IntCounterVec::new(
            Opts::new(
                "anibridge_client_connections_closed_total",
                "Client connections closed by downstream.max_connections, by why (idle_for_room: idle, closed \
                 to make room for a new one; no_room: new, closed unanswered after waiting downstream.header_timeout, \
                 or at once with as many waiting as there are slots)",
            ),
            &["reason"],
        )
        .unwrap();
        let mut names = Vec::new();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
            Box::new(shutdown_cut_streams.clone()),
            Box::new(log_lines_dropped()),
            Box::new(host_cooldowns.clone()),
            Box::new(host_queue_waits.clone()),
            Box::new(host_refused.clone()),
            Box::new(client_headers_refused.clone()),
            Box::new(client_connections.clone()),
            Box::new(client_connections_closed.clone()),
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
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c).unwrap();
        }
        let route_names: Vec<String> = RouteLabel::BUILT_IN
            .iter()
            .map(|r| r.as_str().to_string())
            .chain(prefixes.iter().map(|p| p.to_string()))
            .collect();
        let requests_by = route_names.iter().map(|_| (0..STATUSES).map(|_| OnceLock::new()).collect()).collect();
        let upstream_by_reuse = ["false", "true"].map(|r| upstream_connections.with_label_values(&[r]));
        let cache_requests_by = CacheResult::ALL.map(|r| cache_requests.with_label_values(&[r.as_str()]));
        // Every known reason is there from the start at 0, as a scrape
        // (and `rate()`, or an alert on the series) expects, not only after
        // its first event.
        for reason in crate::gate::Refused::LABELS {
            host_refused.with_label_values(&[reason]);
        }
        for reason in crate::header_guard::Refused::LABELS {
            client_headers_refused.with_label_values(&[reason]);
        }
        for reason in crate::connections::CLOSED_LABELS {
            client_connections_closed.with_label_values(&[reason]);
        }
        for reason in crate::egress::Refusal::LABELS {
            egress_refusals.with_label_values(&[reason]);
        }
        for e in crate::auth::AuthError::ALL {
            auth_failures.with_label_values(&[e.reason()]);
        }
        Metrics {
            registry,
            requests_by,
            route_names,
            names,
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
            client_headers_refused,
            client_connections,
            client_connections_closed,
        }
    }

    /// Counts what the cache did for a request.
    pub fn count_cache(&self, result: CacheResult) {
        self.cache_requests_by[result as usize].inc();
    }

    /// Counts a finished request by route (`index`: a static route's) and status.
    pub fn count_request(&self, route: RouteLabel, index: Option<usize>, status: u16) {
        let row = match (route, index) {
            (RouteLabel::Route, Some(i)) => RouteLabel::BUILT_IN.len() + i,
            (r, _) => RouteLabel::BUILT_IN.iter().position(|b| *b == r).unwrap_or(0),
        };
        let status = usize::from(status).min(STATUSES - 1);
        let (Some(cells), Some(name)) = (self.requests_by.get(row), self.route_names.get(row)) else {
            return self.requests.with_label_values(&[route.as_str(), &status.to_string()]).inc();
        };
        cells[status].get_or_init(|| self.requests.with_label_values(&[name, &status.to_string()])).inc();
    }

    /// Counts an upstream exchange by whether its connection came from the pool.
    pub fn count_upstream_connection(&self, reused: bool) {
        self.upstream_by_reuse[reused as usize].inc();
    }

    /// Every metric's name.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(4096);
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        buf
    }
}

/// `anibridge_log_lines_dropped_total`, both streams shown from the start
/// (at 0 until a stream stalls; src/log_writer.rs).
fn log_lines_dropped() -> prometheus::IntCounterVec {
    let dropped = crate::log_writer::DROPPED.clone();
    for stream in ["stdout", "stderr"] {
        dropped.with_label_values(&[stream]);
    }
    dropped
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
    /// The labels that are their own `route` value (a static route's is its prefix).
    pub const BUILT_IN: [RouteLabel; 4] =
        [RouteLabel::Unrouted, RouteLabel::Relay, RouteLabel::Stream, RouteLabel::Preflight];

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

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/metrics.md documents every metric there is, and only those.
    #[test]
    fn every_metric_is_documented() {
        let docs = include_str!("../docs/metrics.md");
        let documented: std::collections::BTreeSet<&str> = docs
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .map(|n| n.split('{').next().unwrap_or(n))
            .collect();
        let m = Metrics::new();
        let registered: std::collections::BTreeSet<&str> = m.names().iter().map(String::as_str).collect();
        assert!(registered.len() > 30, "{registered:?}");
        let undocumented: Vec<_> = registered.difference(&documented).collect();
        let gone: Vec<_> = documented.difference(&registered).collect();
        assert!(undocumented.is_empty(), "not in docs/metrics.md: {undocumented:?}");
        assert!(gone.is_empty(), "documented but not registered: {gone:?}");
    }

    #[test]
    fn requests_are_counted_by_route_and_status_code() {
        let m = Metrics::with_routes(&["/cdn/", "/tv/"]);
        m.count_request(RouteLabel::Stream, None, 206);
        m.count_request(RouteLabel::Stream, None, 206);
        m.count_request(RouteLabel::Unrouted, None, 0);
        m.count_request(RouteLabel::Route, Some(1), 404);
        m.count_request(RouteLabel::Route, Some(7), 200);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            "anibridge_requests_total{route=\"stream\",status=\"206\"} 2",
            "anibridge_requests_total{route=\"-\",status=\"0\"} 1",
            "anibridge_requests_total{route=\"/tv/\",status=\"404\"} 1",
            "anibridge_requests_total{route=\"route\",status=\"200\"} 1",
            "anibridge_build_info{version=\"",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_cpu_seconds_total ",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn reasons_are_there_from_the_start() {
        let text = String::from_utf8(Metrics::new().render()).unwrap();
        for line in [
            "anibridge_host_refused_total{reason=\"busy\"} 0",
            "anibridge_host_refused_total{reason=\"cooling_down\"} 0",
            "anibridge_egress_refusals_total{reason=\"denied_address\"} 0",
            "anibridge_auth_failures_total{reason=\"invalid signature\"} 0",
            "anibridge_cache_requests_total{result=\"hit\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
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
