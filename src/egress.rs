//! Egress policy: which addresses the proxy may dial. The check runs on the
//! resolved socket address that is then dialled, so DNS rebinding between
//! check and connect cannot happen.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use crate::dns::Dns;
use crate::hosts::{self, HostPattern};

/// The IPv4 address an IPv6 address carries in the mapped (`::ffff:a.b.c.d`),
/// compatible (`::a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) forms.
fn embedded_v4(ip: &Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        [0, 0, 0, 0, 0, 0, _, _] if !(s[6] == 0 && s[7] <= 1) => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => Some(tail),
        _ => None,
    }
}

/// The address as the policy judges it: embedded IPv4 forms as that IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(&v6).map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Whether an address is outside the public internet (loopback, private,
/// link-local, CGNAT, unique-local, multicast, unspecified, broadcast,
/// documentation, benchmarking, reserved), judging embedded IPv4 forms as
/// the IPv4 they carry.
pub fn is_non_public(ip: IpAddr) -> bool {
    match canonical_ip(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_unspecified()
                || a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_documentation()
                || o[0] == 0                                   // 0.0.0.0/8 "this network"
                || (o[0] == 100 && (o[1] & 0xc0) == 64)        // 100.64.0.0/10 CGNAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)     // 192.0.0.0/24 IETF protocol
                || (o[0] == 198 && (o[1] & 0xfe) == 18)        // 198.18.0.0/15 benchmarking
                || o[0] >= 240 // 240.0.0.0/4 reserved
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00                   // fc00::/7 unique-local
                || (s[0] & 0xffc0) == 0xfe80                   // fe80::/10 link-local
                || (s[0] & 0xffc0) == 0xfec0                   // fec0::/10 site-local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8)          // 2001:db8::/32 documentation
                || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // 100::/64 discard
                || (s[0] == 0x2001 && s[1] < 0x0200)           // 2001::/23 IETF special purpose (incl. Teredo)
                || s[0] == 0x2002 // 6to4 can embed any IPv4
        }
    }
}

/// Why a destination was refused (for logs; the client sees only 403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    DeniedHost(String),
    DeniedAddress(IpAddr),
    NoAddress(String),
    /// A connection that reached one of this proxy's own listeners.
    OwnListener(SocketAddr),
}

impl Refusal {
    /// Every [`Refusal::label`] (the metrics start each at 0).
    pub const LABELS: [&'static str; 4] = ["denied_host", "denied_address", "no_address", "own_listener"];

    /// The `reason` label of `anibridge_egress_refusals_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::DeniedHost(_) => "denied_host",
            Refusal::DeniedAddress(_) => "denied_address",
            Refusal::NoAddress(_) => "no_address",
            Refusal::OwnListener(_) => "own_listener",
        }
    }
}

/// The listener among `own`, this process's listeners, that a connection
/// from `local` to `peer` reached, if any. A proxy that may dial itself (its address allowed,
/// or a route or resolver pointed at it) can be sent in a loop: an upstream
/// that redirects to the proxy's own URL for itself makes every request a
/// new one, without end (measured: one request became 8 486 in flight in
/// 2 s, until the read timeout). No header may mark the proxy's requests
/// (hosters get exactly the headers the contract lists), so the connection
/// itself tells: its peer port is a listener's, and its peer address is that
/// listener's or, for a listener on every address, one of this machine's —
/// a loopback address, or the connection's own source address (a connection
/// to an address of this machine leaves from that address).
pub fn own_listener_reached(own: &[SocketAddr], local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
    let peer_ip = canonical_ip(peer.ip());
    let this_machine = peer_ip.is_loopback() || peer_ip == canonical_ip(local.ip());
    own.iter().copied().find(|l| {
        l.port() == peer.port()
            && match canonical_ip(l.ip()) {
                ip if ip.is_unspecified() => this_machine && (l.is_ipv6() || peer_ip.is_ipv4()),
                ip => ip == peer_ip,
            }
    })
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::DeniedHost(h) => write!(f, "host {h} is in egress.deny_hosts"),
            Refusal::DeniedAddress(ip) => write!(f, "address {ip} is not public and not in egress.allow_cidrs"),
            Refusal::NoAddress(h) => write!(f, "{h} resolved to no address"),
            Refusal::OwnListener(a) => write!(f, "{a} is this proxy's own listener"),
        }
    }
}

/// The configured policy.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    allow: Vec<IpNet>,
    deny_hosts: Vec<HostPattern>,
    /// The addresses among `deny_hosts`: never dialled, also when a name
    /// resolves to one.
    denied_ips: Vec<IpAddr>,
}

impl Egress {
    pub fn new(allow: Vec<IpNet>, deny_hosts: Vec<HostPattern>) -> Egress {
        let denied_ips = deny_hosts
            .iter()
            .filter_map(|p| match p {
                HostPattern::Exact(h) => h.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok(),
                _ => None,
            })
            .map(canonical_ip)
            .collect();
        Egress { allow, deny_hosts, denied_ips }
    }

    pub fn host_allowed(&self, host: &str) -> Result<(), Refusal> {
        if hosts::any_matches(&self.deny_hosts, host) {
            return Err(Refusal::DeniedHost(host.to_string()));
        }
        Ok(())
    }

    /// `deny_hosts` for an address, whether a URL names it or a name
    /// resolved to it: a listed one (an IPv4-mapped one judged as the IPv4
    /// it carries), or any when `"*"` is listed, is never dialled.
    pub fn address_host_allowed(&self, ip: IpAddr) -> Result<(), Refusal> {
        let canon = canonical_ip(ip);
        if self.denied_ips.contains(&canon) || self.deny_hosts.iter().any(|p| matches!(p, HostPattern::Any)) {
            return Err(Refusal::DeniedHost(canon.to_string()));
        }
        Ok(())
    }

    /// Whether an address may be dialled: not refused by `deny_hosts`, and
    /// public or in `allow_cidrs`.
    pub fn ip_allowed(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.address_host_allowed(ip)?;
        let canon = canonical_ip(ip);
        let listed = self.allow.iter().any(|n| n.contains(&canon) || n.contains(&ip));
        if is_non_public(ip) && !listed {
            return Err(Refusal::DeniedAddress(ip));
        }
        Ok(())
    }
}

/// A host as `url` parsed it.
pub enum UrlHost<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

impl<'a> UrlHost<'a> {
    pub fn of(u: &'a url::Url) -> Option<UrlHost<'a>> {
        match u.host()? {
            url::Host::Domain(d) => Some(UrlHost::Name(d)),
            url::Host::Ipv4(a) => Some(UrlHost::Ip(IpAddr::V4(a))),
            url::Host::Ipv6(a) => Some(UrlHost::Ip(IpAddr::V6(a))),
        }
    }
}

/// The most addresses of one host tried in turn when connecting fails
/// (nginx tries every address a name has; four covers a CDN's usual set
/// and bounds how long a client can wait on dead ones).
pub const MAX_DIAL: usize = 4;

/// The addresses a request may dial, in the order to try them: each one
/// passed the egress policy (or belongs to a trusted upstream).
#[derive(Debug, Clone, Copy)]
pub struct Dialable {
    addrs: [SocketAddr; MAX_DIAL],
    len: usize,
}

impl Dialable {
    pub fn as_slice(&self) -> &[SocketAddr] {
        &self.addrs[..self.len]
    }

    /// A host that an egress proxy resolves itself (`socks5h`): one
    /// placeholder address, carrying only the port.
    pub fn unresolved(port: u16) -> Dialable {
        Dialable { addrs: [SocketAddr::from(([0, 0, 0, 0], port)); MAX_DIAL], len: 1 }
    }

    /// Up to [`MAX_DIAL`] of `ips` (at `port`) that `policy` allows (all of them
    /// when `trusted`), or why none is. The resolver's order is kept within
    /// each address family and the two families take turns, starting with
    /// the resolver's first (as RFC 8305 asks), so a host whose IPv6 path is
    /// broken still reaches an IPv4 address however many AAAA records come
    /// first.
    pub fn select(
        policy: &Egress,
        ips: &[IpAddr],
        port: u16,
        trusted: bool,
        host: &UrlHost<'_>,
    ) -> Result<Dialable, Refusal> {
        let empty = Dialable { addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_DIAL], len: 0 };
        // [the first address's family, the other one]
        let mut by_family = [empty, empty];
        let mut first_is_v6 = None;
        let mut first_refusal = None;
        for &ip in ips {
            match if trusted { Ok(()) } else { policy.ip_allowed(ip) } {
                Ok(()) => {
                    let same = *first_is_v6.get_or_insert(ip.is_ipv6()) == ip.is_ipv6();
                    let list = &mut by_family[usize::from(!same)];
                    if list.len < MAX_DIAL {
                        list.addrs[list.len] = SocketAddr::new(ip, port);
                        list.len += 1;
                    }
                }
                Err(r) => {
                    first_refusal.get_or_insert(r);
                }
            }
        }
        let mut out = empty;
        let [first, other] = by_family;
        for k in 0..MAX_DIAL {
            for list in [&first, &other] {
                if k < list.len && out.len < MAX_DIAL {
                    out.addrs[out.len] = list.addrs[k];
                    out.len += 1;
                }
            }
        }
        if out.len > 0 {
            return Ok(out);
        }
        Err(first_refusal.unwrap_or_else(|| Refusal::NoAddress(host_label(host))))
    }
}

/// Resolves `host:port` without blocking the event loop (through `dns`'s
/// short-lived cache) and returns the addresses the policy allows, in order
/// (`trusted` skips the address check, for operator-configured upstreams).
/// `Err(Err(_))` means DNS failed (`TimedOut`: no answer `within`).
pub async fn resolve(
    policy: &Egress,
    dns: &Dns,
    host: &UrlHost<'_>,
    port: u16,
    trusted: bool,
    within: Duration,
) -> Result<Dialable, Result<Refusal, std::io::Error>> {
    match host {
        // `select` judges the address, `deny_hosts` included (unless trusted).
        UrlHost::Ip(ip) => Dialable::select(policy, &[*ip], port, trusted, host).map_err(Ok),
        UrlHost::Name(name) => {
            if !trusted {
                policy.host_allowed(name).map_err(Ok)?;
            }
            let resolved = dns.lookup(name, within).await.map_err(Err)?;
            Dialable::select(policy, &resolved, port, trusted, host).map_err(Ok)
        }
    }
}

fn host_label(h: &UrlHost<'_>) -> String {
    match h {
        UrlHost::Name(n) => n.to_string(),
        UrlHost::Ip(ip) => ip.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_table() {
        for s in [
            "127.0.0.1",
            "127.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.1",
            "240.0.0.1",
            "192.0.0.8",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "fec0::1",
            "100::1",
        ] {
            assert!(is_non_public(ip(s)), "{s} should be denied");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "192.169.0.1",
            "198.20.0.1",
            "2606:4700::1111",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(!is_non_public(ip(s)), "{s} should be allowed");
        }
    }

    #[test]
    fn allow_cidrs_open_holes_and_judge_mapped_forms_as_v4() {
        let e = Egress::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        assert!(e.ip_allowed(ip("127.0.0.1")).is_ok());
        assert!(e.ip_allowed(ip("::ffff:127.0.0.1")).is_ok());
        assert!(e.ip_allowed(ip("::1")).is_err());
        assert!(e.ip_allowed(ip("10.0.0.1")).is_err());
        let none = Egress::default();
        assert_eq!(none.ip_allowed(ip("::ffff:7f00:1")), Err(Refusal::DeniedAddress(ip("::ffff:127.0.0.1"))));
    }

    #[test]
    fn denied_hosts() {
        let e = Egress::new(vec![], vec![HostPattern::parse("*.internal").unwrap()]);
        assert!(e.host_allowed("db.internal").is_err());
        assert!(e.host_allowed("internal.example").is_ok());
        // A listed address refuses a URL that names it, however written.
        let listed = ["203.0.113.7", "2001:db8::1"].map(|p| HostPattern::parse(p).unwrap());
        let e = Egress::new(vec![], listed.to_vec());
        for s in
            ["http://203.0.113.7/", "http://3405803783/", "http://[::ffff:203.0.113.7]/", "http://[2001:DB8:0::1]/"]
        {
            let Some(UrlHost::Ip(a)) = UrlHost::of(&url::Url::parse(s).unwrap()) else { panic!("{s}") };
            assert!(matches!(e.address_host_allowed(a), Err(Refusal::DeniedHost(_))), "{s}");
        }
        assert!(e.address_host_allowed(ip("203.0.113.8")).is_ok());
        let mapped = Egress::new(vec![], vec![HostPattern::parse("::ffff:203.0.113.7").unwrap()]);
        assert!(mapped.address_host_allowed(ip("::ffff:203.0.113.7")).is_err(), "listed as written");
        assert!(Egress::default().address_host_allowed(ip("203.0.113.7")).is_ok());
        // An address a name resolves to: never dialled either, even in allow_cidrs.
        let e = Egress::new(vec!["203.0.113.0/24".parse().unwrap()], listed.to_vec());
        assert_eq!(e.ip_allowed(ip("203.0.113.7")), Err(Refusal::DeniedHost("203.0.113.7".into())));
        assert!(matches!(e.ip_allowed(ip("::ffff:203.0.113.7")), Err(Refusal::DeniedHost(_))));
        assert!(matches!(e.ip_allowed(ip("2001:db8::1")), Err(Refusal::DeniedHost(_))));
        assert!(e.ip_allowed(ip("203.0.113.8")).is_ok());
    }

    #[test]
    fn url_spellings_of_loopback_are_ip_hosts() {
        for s in ["http://2130706433/", "http://0x7f000001/", "http://127.1/", "http://[::ffff:127.0.0.1]/"] {
            let u = url::Url::parse(s).unwrap();
            match UrlHost::of(&u).unwrap() {
                UrlHost::Ip(a) => assert!(is_non_public(a), "{s}"),
                UrlHost::Name(n) => panic!("{s} parsed as name {n}"),
            }
        }
    }

    #[tokio::test]
    async fn resolve_checks_the_dialled_address() {
        let deny = Egress::default();
        let dns = Dns::default();
        let r = resolve(&deny, &dns, &UrlHost::Name("localhost"), 80, false, T).await;
        assert!(matches!(r, Err(Ok(Refusal::DeniedAddress(_)))), "{r:?}");
        let trusted = resolve(&deny, &dns, &UrlHost::Name("localhost"), 80, true, T).await.unwrap();
        assert!(trusted.as_slice().iter().all(|a| a.ip().is_loopback()));
        // A cached lookup is judged again: still refused.
        let r = resolve(&deny, &dns, &UrlHost::Name("localhost"), 80, false, T).await;
        assert!(matches!(r, Err(Ok(Refusal::DeniedAddress(_)))), "{r:?}");
        let allow = Egress::new(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()], vec![]);
        assert!(resolve(&allow, &dns, &UrlHost::Ip(ip("127.0.0.1")), 80, false, T).await.is_ok());
        assert!(resolve(&allow, &dns, &UrlHost::Name("localhost"), 80, false, T).await.is_ok());
    }

    #[test]
    fn every_allowed_address_is_a_candidate_in_order_up_to_max_dial() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ips = |a: &[SocketAddr]| a.iter().map(SocketAddr::ip).collect::<Vec<_>>();
        let policy = Egress::default();
        let host = UrlHost::Name("cdn.example");
        let addrs =
            [sa("10.0.0.1:443"), sa("93.184.216.34:443"), sa("[2606:2800::1]:443"), sa("[::ffff:127.0.0.1]:443")];
        let d = Dialable::select(&policy, &ips(&addrs), addrs[0].port(), false, &host).unwrap();
        assert_eq!(d.as_slice(), &[sa("93.184.216.34:443"), sa("[2606:2800::1]:443")]);
        // Trusted upstreams keep every address; the list is capped.
        let many: Vec<SocketAddr> = (1..=9).map(|i| sa(&format!("10.0.0.{i}:80"))).collect();
        let d = Dialable::select(&policy, &ips(&many), many[0].port(), true, &host).unwrap();
        assert_eq!(d.as_slice(), &many[..MAX_DIAL]);
        // The families take turns, each in the resolver's order.
        let v6: Vec<SocketAddr> = (1..=5).map(|i| sa(&format!("[2606:2800::{i}]:443"))).collect();
        let mixed: Vec<SocketAddr> =
            v6.iter().copied().chain([sa("93.184.216.1:443"), sa("93.184.216.2:443")]).collect();
        let d = Dialable::select(&policy, &ips(&mixed), mixed[0].port(), false, &host).unwrap();
        assert_eq!(d.as_slice(), &[v6[0], sa("93.184.216.1:443"), v6[1], sa("93.184.216.2:443")]);
        let d = Dialable::select(&policy, &ips(&v6), v6[0].port(), false, &host).unwrap();
        assert_eq!(d.as_slice(), &v6[..MAX_DIAL]);
        // None allowed: the first refusal says why.
        let r = Dialable::select(&policy, &ips(&addrs[..1]), 443, false, &host).unwrap_err();
        assert!(matches!(r, Refusal::DeniedAddress(_)), "{r:?}");
        assert!(matches!(Dialable::select(&policy, &[], 443, false, &host), Err(Refusal::NoAddress(_))));
    }

    #[test]
    fn connections_to_the_proxys_own_listeners_are_known() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = [a("127.0.0.1:8080"), a("0.0.0.0:9000"), a("[::]:9100"), a("[2001:db8::5]:9200")];
        let reaches = |local, peer| own_listener_reached(&own, a(local), a(peer)).is_some();
        // A listener on one address: that address and port only.
        assert!(reaches("127.0.0.1:40000", "127.0.0.1:8080"));
        assert!(reaches("127.0.0.1:40000", "[::ffff:127.0.0.1]:8080"), "a mapped address is the IPv4 one");
        assert!(!reaches("127.0.0.1:40000", "127.0.0.2:8080"));
        assert!(!reaches("127.0.0.1:40000", "127.0.0.1:8081"));
        // On every IPv4 address: any loopback address, or an address of
        // this machine (the connection leaves from it), with that port.
        assert!(reaches("127.0.0.1:40000", "127.0.0.2:9000"));
        assert!(reaches("203.0.113.5:40000", "203.0.113.5:9000"));
        assert!(!reaches("203.0.113.5:40000", "203.0.113.6:9000"), "another machine");
        assert!(!reaches("[::1]:40000", "[::1]:9000"), "an IPv4 listener is not an IPv6 one");
        // On every address, dual stack: IPv6 and IPv4.
        assert!(reaches("[::1]:40000", "[::1]:9100"));
        assert!(reaches("[2001:db8::7]:40000", "[2001:db8::7]:9100"));
        assert!(reaches("127.0.0.1:40000", "127.0.0.1:9100"));
        assert!(!reaches("[2001:db8::7]:40000", "[2001:db8::8]:9100"));
        assert!(reaches("[2001:db8::7]:40000", "[2001:db8::5]:9200"));
        // The listener it reached, among several on one port.
        let two = [a("127.0.0.1:8080"), a("127.0.0.2:8080")];
        assert_eq!(own_listener_reached(&two, a("127.0.0.1:1"), a("127.0.0.2:8080")), Some(two[1]));
        // Nothing listed, nothing refused.
        assert_eq!(own_listener_reached(&[], a("127.0.0.1:1"), a("127.0.0.1:8080")), None);
    }
}
