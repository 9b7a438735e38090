//! Host name patterns (`example.com`, `*.example.com`, `*`) and the
//! first-match table that provider profiles, egress proxies and the
//! per-host gate's configured limits are looked up in.

/// A host name pattern: `example.com` (exact), `*.example.com` (any
/// subdomain, not the apex) or `*` (every host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    Suffix(String), // ".example.com"
    Any,
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        let bare = s.strip_prefix("*.").unwrap_or(&s);
        if bare.is_empty()
            || bare.contains('*')
            || !bare.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err("not a host name or *.suffix pattern".into());
        }
        Ok(match s.strip_prefix('*') {
            Some(suffix) => HostPattern::Suffix(suffix.to_string()),
            None => HostPattern::Exact(s),
        })
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
