//! The access log: one line per request, as operators of nginx and Traefik
//! expect — who asked (the client's address, through trusted proxies'
//! `X-Forwarded-For`), what, how it was answered (status, body bytes sent,
//! duration, time to the first byte, the upstream's host and status, the
//! cache's result, resumptions), the user agent and a request id — as text
//! or JSON. Never a query string: `u=`, `sig=` and keys live there.
//!
//! Lines go to standard output (the `access` log target, on by default;
//! `RUST_LOG=access=off` silences them), the proxy's own messages to
//! standard error.

use std::collections::hash_map::RandomState;
use std::fmt::Write;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use serde::Deserialize;

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// One request, as logged.
#[derive(Debug, Default)]
pub struct Line<'a> {
    pub at: Option<SystemTime>,
    pub client: &'a str,
    pub method: &'a str,
    /// The path only, never the query.
    pub path: &'a str,
    /// `relay`, `stream`, a route's prefix, `preflight`, or `-`.
    pub route: &'a str,
    pub status: u16,
    /// Body bytes actually sent.
    pub bytes: u64,
    pub ms: u64,
    /// Until the response header went out, when it did.
    pub ttfb_ms: Option<u64>,
    pub upstream_host: &'a str,
    pub upstream_status: u16,
    /// `hit`, `coalesced`, `miss`, `bypass`; empty with the cache off.
    pub cache: &'a str,
    pub resumed: u32,
    pub user_agent: &'a str,
    pub request_id: &'a str,
    /// Pingora's error type, when the request failed.
    pub error: Option<&'a str>,
    /// The stream was cut when the shutdown grace period ended.
    pub cut: bool,
}

impl Line<'_> {
    pub fn render(&self, format: Format) -> String {
        let at = humantime::format_rfc3339_millis(self.at.unwrap_or_else(SystemTime::now)).to_string();
        match format {
            Format::Json => {
                let mut v = serde_json::json!({
                    "time": at,
                    "client": self.client,
                    "method": self.method,
                    "path": self.path,
                    "route": self.route,
                    "status": self.status,
                    "bytes": self.bytes,
                    "ms": self.ms,
                    "ttfb_ms": self.ttfb_ms,
                    "upstream_host": none_if_empty(self.upstream_host),
                    "upstream_status": (self.upstream_status > 0).then_some(self.upstream_status),
                    "cache": none_if_empty(self.cache),
                    "resumed": self.resumed,
                    "user_agent": none_if_empty(self.user_agent),
                    "request_id": self.request_id,
                });
                if let Some(e) = self.error {
                    v["error"] = e.into();
                }
                if self.cut {
                    v["cut"] = true.into();
                }
                v.to_string()
            }
            Format::Text => {
                let mut s = String::with_capacity(200);
                let dash = |v: &str| if v.is_empty() { "-".to_string() } else { v.to_string() };
                let _ = write!(
                    s,
                    "{at} {} \"{} {}\" {} {} {}ms ttfb={} route={} upstream={} upstream_status={} cache={} resumed={} ua=\"{}\" id={}",
                    self.client,
                    self.method,
                    self.path,
                    self.status,
                    self.bytes,
                    self.ms,
                    self.ttfb_ms.map_or("-".to_string(), |t| format!("{t}ms")),
                    self.route,
                    dash(self.upstream_host),
                    if self.upstream_status > 0 { self.upstream_status.to_string() } else { "-".into() },
                    dash(self.cache),
                    self.resumed,
                    escaped(self.user_agent),
                    self.request_id,
                );
                if let Some(e) = self.error {
                    let _ = write!(s, " error=\"{}\"", escaped(e));
                }
                if self.cut {
                    s.push_str(" cut=true");
                }
                s
            }
        }
    }
}

fn none_if_empty(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// A value inside double quotes: quotes, backslashes and control bytes escaped.
fn escaped(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A request header as the log shows it: its bytes as text, a byte that
/// is not UTF-8 as U+FFFD. `HeaderValue::to_str` takes visible ASCII only,
/// so a player whose `User-Agent` has one accented letter would be logged
/// with none at all.
pub fn header_text(v: Option<&HeaderValue>) -> std::borrow::Cow<'_, str> {
    v.map_or(std::borrow::Cow::Borrowed(""), |v| String::from_utf8_lossy(v.as_bytes()))
}

/// The client's address: the peer, or — when the peer is one of
/// `trusted` (a reverse proxy in front) — the last address in
/// `X-Forwarded-For` ([`forwarded_for`]) that is not a trusted proxy
/// itself. Read from the right, as nginx's `real_ip_recursive` reads it: an
/// entry that is not an address (`unknown`, a name) ends the walk at the
/// trusted hop that wrote it, so whatever a client put further left is
/// never taken for it. An address with a port (`203.0.113.9:5123`,
/// `[2001:db8::1]:443`, as some load balancers write them) is the address.
/// An IPv4-mapped address (`::ffff:a.b.c.d`: an IPv4 peer of a dual-stack
/// listener such as `[::]:8080`) is the IPv4 address it carries, for
/// `trusted` and in the log, as the egress policy judges it.
pub fn client_address(peer: Option<IpAddr>, forwarded_for: Option<&HeaderValue>, trusted: &[IpNet]) -> String {
    let Some(peer) = peer.map(|p| p.to_canonical()) else { return "-".into() };
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer.to_string();
    }
    let Some(hops) = forwarded_for.and_then(|v| v.to_str().ok()) else { return peer.to_string() };
    let mut client = peer;
    for hop in hops.rsplit(',').map(str::trim).filter(|h| !h.is_empty()) {
        let Some(ip) = hop_address(hop) else { break };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client.to_string()
}

/// One `X-Forwarded-For` entry's address: `a.b.c.d`, an IPv6 address, in
/// brackets or not, either with a port.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let ip: IpAddr = hop
        .parse()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(ip.to_canonical())
}

/// The request's `X-Forwarded-For` as one list: its field lines in order,
/// joined. nginx and Traefik append their hop to the one line; HAProxy's
/// `option forwardfor` sends its hop as a line of its own, after any the
/// client sent — reading the first line alone would name whatever the
/// client wrote there.
pub fn forwarded_for(h: &HeaderMap) -> Option<HeaderValue> {
    let mut lines = h.get_all(X_FORWARDED_FOR).iter();
    let first = lines.next()?;
    let mut rest = lines.peekable();
    if rest.peek().is_none() {
        return Some(first.clone());
    }
    let mut joined = first.as_bytes().to_vec();
    for line in rest {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(line.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

tokio::task_local! {
    /// The id of the request being answered on this task.
    static REQUEST_ID: String;
}

/// Answers a request (`answering`) with `id` as the request id of the log
/// lines said meanwhile ([`current_request_id`]). Not an `async fn`: one
/// would hold `answering` twice in every request's future (6 KiB more,
/// `a_streaming_request_stays_small` in `src/proxy/serve.rs`).
pub fn with_request_id<F: std::future::Future>(
    id: String,
    answering: F,
) -> impl std::future::Future<Output = F::Output> {
    REQUEST_ID.scope(id, answering)
}

/// The id of the request this task is answering, if it has one: a warning
/// said while answering it carries it, so it can be found beside the
/// request's access line. A cache fill serves many requests and runs on a
/// task of its own: its lines carry none.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| (!id.is_empty()).then(|| id.clone())).ok().flatten()
}

/// The request id: the client's `X-Request-Id` when it is a sane token (1 to
/// 128 of `A-Z a-z 0-9 . _ : -`), else a new one (16 hex digits).
pub fn request_id(client: Option<&HeaderValue>) -> String {
    if let Some(id) = client.map(HeaderValue::as_bytes) {
        let sane = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
        if (1..=128).contains(&id.len()) && id.iter().all(sane) {
            return String::from_utf8_lossy(id).into_owned();
        }
    }
    static KEY: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let key = *KEY.get_or_init(|| RandomState::new().hash_one(0u64));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // SplitMix64 of a keyed counter: a bijection, so no id repeats within a
    // process, and the per-process key makes runs differ. Every request
    // without an id of its own gets one: no SipHash, no formatter.
    let mut z = key.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hex::encode((z ^ (z >> 31)).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.1/32".parse().unwrap()];
        let xff = HeaderValue::from_static("198.51.100.7, 203.0.113.9, 10.0.0.2");
        assert_eq!(client_address(Some(ip("10.0.0.1")), Some(&xff), &trusted), "203.0.113.9");
        assert_eq!(
            client_address(Some(ip("192.0.2.1")), Some(&xff), &trusted),
            "192.0.2.1",
            "an untrusted peer's header is ignored"
        );
        assert_eq!(client_address(Some(ip("10.0.0.1")), None, &trusted), "10.0.0.1");
        let all_trusted = HeaderValue::from_static("10.1.1.1, 10.2.2.2");
        assert_eq!(client_address(Some(ip("127.0.0.1")), Some(&all_trusted), &trusted), "10.1.1.1");
        assert_eq!(
            client_address(Some(ip("127.0.0.1")), Some(&HeaderValue::from_static("junk")), &trusted),
            "127.0.0.1"
        );
        assert_eq!(client_address(None, None, &trusted), "-");
    }

    #[test]
    fn what_a_client_writes_left_of_a_trusted_hop_is_never_taken_for_it() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let from =
            |xff: &str| client_address(Some(ip("10.0.0.1")), Some(&HeaderValue::from_str(xff).unwrap()), &trusted);
        // Not an address: the walk ends at the trusted hop that wrote it.
        assert_eq!(from("6.6.6.6, unknown, 10.0.0.2"), "10.0.0.2");
        assert_eq!(from("6.6.6.6, 10.0.0.2, not-an-ip"), "10.0.0.1");
        // Addresses with ports, and empty list elements.
        assert_eq!(from("6.6.6.6, 203.0.113.9:5123, 10.0.0.2"), "203.0.113.9");
        assert_eq!(from("6.6.6.6, [2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(from("6.6.6.6, [2001:db8::1]"), "2001:db8::1");
        assert_eq!(from("198.51.100.7, , 10.0.0.2,"), "198.51.100.7");
        // IPv4-mapped: the IPv4 address it carries.
        assert_eq!(from("6.6.6.6, ::ffff:203.0.113.9, ::ffff:10.0.0.2"), "203.0.113.9");
    }

    #[test]
    fn an_ipv4_peer_of_a_dual_stack_listener_is_its_ipv4_address() {
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        let xff = HeaderValue::from_static("203.0.113.5");
        assert_eq!(client_address(Some(ip("::ffff:127.0.0.1")), Some(&xff), &trusted), "203.0.113.5", "trusted");
        assert_eq!(client_address(Some(ip("::ffff:192.0.2.1")), Some(&xff), &trusted), "192.0.2.1", "logged as IPv4");
        assert_eq!(client_address(Some(ip("::1")), Some(&xff), &trusted), "::1");
    }

    #[test]
    fn the_forwarded_for_list_is_every_line_in_order() {
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for(&h), None);
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        assert_eq!(forwarded_for(&h).unwrap(), "6.6.6.6");
        // HAProxy's `option forwardfor`: the hop it saw, as a line of its own.
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        let list = forwarded_for(&h).unwrap();
        assert_eq!(list, "6.6.6.6, 203.0.113.9");
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        assert_eq!(client_address(Some(ip("127.0.0.1")), Some(&list), &trusted), "203.0.113.9");
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        assert_eq!(request_id(Some(&HeaderValue::from_static("abc-123_x.y:z"))), "abc-123_x.y:z");
        for bad in ["has space", "quo\"te", ""] {
            let made = request_id(Some(&HeaderValue::from_str(bad).unwrap()));
            assert_eq!(made.len(), 16, "{bad:?} -> {made}");
        }
        let long = "a".repeat(129);
        assert_eq!(request_id(Some(&HeaderValue::from_str(&long).unwrap())).len(), 16);
        let made: std::collections::HashSet<String> = (0..10_000).map(|_| request_id(None)).collect();
        assert_eq!(made.len(), 10_000, "new ids never repeat");
        assert!(made.iter().all(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())));
    }

    #[test]
    fn lines_in_both_formats() {
        let line = Line {
            at: Some(SystemTime::UNIX_EPOCH),
            client: "203.0.113.9",
            method: "GET",
            path: "/strm/proxy/ep1.mp4",
            route: "relay",
            status: 206,
            bytes: 65536,
            ms: 12,
            ttfb_ms: Some(3),
            upstream_host: "cdn.example",
            upstream_status: 206,
            cache: "miss",
            resumed: 0,
            user_agent: "mpv \"0.35\"",
            request_id: "r1",
            error: None,
            cut: false,
        };
        assert_eq!(
            line.render(Format::Text),
            "1970-01-01T00:00:00.000Z 203.0.113.9 \"GET /strm/proxy/ep1.mp4\" 206 65536 12ms ttfb=3ms route=relay \
             upstream=cdn.example upstream_status=206 cache=miss resumed=0 ua=\"mpv \\\"0.35\\\"\" id=r1"
        );
        let json: serde_json::Value = serde_json::from_str(&line.render(Format::Json)).unwrap();
        assert_eq!(json["status"], 206);
        assert_eq!(json["user_agent"], "mpv \"0.35\"");
        assert_eq!(json["ttfb_ms"], 3);
        let ua = HeaderValue::from_bytes("Lavf/60 Schöne\u{200b}\tx".as_bytes()).unwrap();
        assert_eq!(header_text(Some(&ua)), "Lavf/60 Schöne\u{200b}\tx");
        assert_eq!(header_text(Some(&HeaderValue::from_bytes(b"a\xffb").unwrap())), "a\u{fffd}b");
        assert_eq!(header_text(None), "");
        let line = Line { user_agent: &header_text(Some(&ua)), ..Line::default() };
        let json: serde_json::Value = serde_json::from_str(&line.render(Format::Json)).unwrap();
        assert_eq!(json["user_agent"], "Lavf/60 Schöne\u{200b}\tx");
        assert!(line.render(Format::Text).contains("ua=\"Lavf/60 Schöne\u{200b}\\x09x\""));
        let cut = Line { cut: true, error: Some("ConnectionClosed"), ..Line::default() }.render(Format::Text);
        assert!(cut.ends_with(" error=\"ConnectionClosed\" cut=true"), "{cut}");
    }
}
