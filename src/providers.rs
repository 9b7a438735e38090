//! Provider profiles: the headers a hoster insists on (Referer, Origin,
//! User-Agent, ...), matched on the upstream host of every hop.

use crate::config::ProviderConf;
use crate::egress::HostPattern;
use crate::headers::WireHeader;

/// Host patterns and the headers they get.
type Profile = (Vec<HostPattern>, Vec<WireHeader>);

#[derive(Debug, Clone, Default)]
pub struct Providers {
    profiles: Vec<Profile>,
}

impl Providers {
    pub fn new(conf: &[ProviderConf]) -> Result<Providers, String> {
        let mut profiles = Vec::with_capacity(conf.len());
        for p in conf {
            let hosts = p.hosts.iter().map(|h| HostPattern::parse(h)).collect::<Result<Vec<_>, _>>()?;
            let headers = crate::headers::parse_pairs(p.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
            profiles.push((hosts, headers));
        }
        Ok(Providers { profiles })
    }

    /// The headers of the first profile matching `host` (lower-case).
    pub fn headers_for(&self, host: &str) -> &[WireHeader] {
        self.profiles
            .iter()
            .find(|(hosts, _)| hosts.iter().any(|p| p.matches(host)))
            .map(|(_, h)| h.as_slice())
            .unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_profile_wins() {
        let conf: Vec<ProviderConf> = serde_yaml::from_str(
            "- hosts: [\"voe.sx\", \"*.voe.sx\"]\n  headers: {Referer: \"https://voe.sx/\"}\n\
             - hosts: [\"*.sx\"]\n  headers: {Referer: \"https://other/\"}\n",
        )
        .unwrap();
        let p = Providers::new(&conf).unwrap();
        assert_eq!(p.headers_for("voe.sx")[0].value, "https://voe.sx/");
        assert_eq!(p.headers_for("cdn.voe.sx")[0].value, "https://voe.sx/");
        assert_eq!(p.headers_for("x.sx")[0].value, "https://other/");
        assert!(p.headers_for("example.com").is_empty());
    }
}
