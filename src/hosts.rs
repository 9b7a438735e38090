//! Host name patterns (`example.com`, `*.example.com`, `*`) and the
//! first-match table that provider profiles, egress proxies and the
//! per-host gate's configured limits are looked up in.

/// A host name pattern: `example.com` (exact), `*.example.com` (any
/// subdomain, not the apex) or `*` (every host). Names and addresses are
/// kept as a URL writes its host — lower case, international names in
/// their `xn--` form, IPv6 addresses in brackets — so a pattern matches
/// whatever spelling of the host a URL used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    Suffix(String), // ".example.com"
    Any,
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        let (suffix, bare) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let bare = bare.trim_end_matches('.');
        let bad = || "not a host name, IP address or *.suffix pattern".to_string();
        if bare.is_empty() || bare.contains('*') {
            return Err(bad());
        }
        // An IPv6 address may be written with or without its brackets.
        let host = match bare.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => url::Host::Ipv6(v6),
            Err(_) => url::Host::parse(bare).map_err(|_| bad())?,
        };
        match host {
            url::Host::Domain(name) if name.split('.').any(str::is_empty) => {
                Err("has an empty label (for every subdomain of a name, write *.name)".into())
            }
            url::Host::Domain(name) if suffix => Ok(HostPattern::Suffix(format!(".{name}"))),
            url::Host::Domain(name) => Ok(HostPattern::Exact(name)),
            _ if suffix => Err("*. goes before a host name, not an address".into()),
            address => Ok(HostPattern::Exact(address.to_string())),
        }
    }

    /// `host` must already be lower-case (as `url` normalises it).
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        match self {
            HostPattern::Exact(h) => host == h,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            HostPattern::Any => true,
        }
    }
}

/// Whether any of `patterns` matches `host`.
pub fn any_matches(patterns: &[HostPattern], host: &str) -> bool {
    patterns.iter().any(|p| p.matches(host))
}

/// Entries, each with the host patterns it serves; a host gets the first
/// entry whose patterns match it (the order written in the config).
#[derive(Debug, Clone)]
pub struct HostTable<T>(Vec<(Vec<HostPattern>, T)>);

impl<T> Default for HostTable<T> {
    fn default() -> Self {
        HostTable(Vec::new())
    }
}

impl<T> HostTable<T> {
    pub fn new(entries: impl IntoIterator<Item = (Vec<HostPattern>, T)>) -> HostTable<T> {
        HostTable(entries.into_iter().collect())
    }

    /// The first entry matching `host` (lower-case).
    pub fn first(&self, host: &str) -> Option<&T> {
        self.0.iter().find(|(hosts, _)| any_matches(hosts, host)).map(|(_, t)| t)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        let exact = HostPattern::parse("VOE.sx").unwrap();
        let sub = HostPattern::parse("*.voe.sx").unwrap();
        assert!(exact.matches("voe.sx"));
        assert!(exact.matches("voe.sx."));
        assert!(!exact.matches("a.voe.sx"));
        assert!(sub.matches("a.voe.sx"));
        assert!(sub.matches("a.b.voe.sx"));
        assert!(!sub.matches("voe.sx"));
        assert!(!sub.matches("evilvoe.sx"));
        assert_eq!(HostPattern::parse("*"), Ok(HostPattern::Any));
        assert!(HostPattern::Any.matches("anything.example"));
        assert!(HostPattern::parse("*.*").is_err());
        assert!(HostPattern::parse("a.*.b").is_err());
        assert!(HostPattern::parse("").is_err());
        // Written as a URL writes its host, whatever the spelling.
        let same = |pattern: &str, host: &str| HostPattern::parse(pattern).unwrap() == HostPattern::Exact(host.into());
        assert!(same("Bücher.Example", "xn--bcher-kva.example"));
        assert!(same("::1", "[::1]"));
        assert!(same("[0:0::1]", "[::1]"));
        assert!(same("0x7f.1", "127.0.0.1"));
        assert!(same("10.0.0.1.", "10.0.0.1"));
        assert_eq!(HostPattern::parse("*.bücher.example"), Ok(HostPattern::Suffix(".xn--bcher-kva.example".into())));
        // Never matching anything: refused, not kept.
        for never in
            ["voe.sx:443", "https://voe.sx", "voe.sx/", "voe sx", ".voe.sx", "a..b", "*.1.2.3.4", "*.[::1]", "*voe.sx"]
        {
            assert!(HostPattern::parse(never).is_err(), "{never}");
        }
    }

    #[test]
    fn the_first_matching_entry_wins() {
        let p = |s: &str| HostPattern::parse(s).unwrap();
        let t = HostTable::new([(vec![p("voe.sx"), p("*.voe.sx")], 1), (vec![p("*.sx")], 2), (vec![p("*")], 3)]);
        assert_eq!(t.first("voe.sx"), Some(&1));
        assert_eq!(t.first("cdn.voe.sx"), Some(&1));
        assert_eq!(t.first("x.sx"), Some(&2));
        assert_eq!(t.first("example.com"), Some(&3));
        let narrow = HostTable::new([(vec![p("a.example")], ())]);
        assert_eq!(narrow.first("b.example"), None);
        assert_eq!(t.values().copied().collect::<Vec<_>>(), [1, 2, 3]);
    }
}
