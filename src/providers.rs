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
    pub fn new(conf: &[ProviderConf]) -> Providers {
        Providers { profiles: conf.iter().map(|p| (p.hosts.clone(), p.headers.0.clone())).collect() }
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
             - hosts: [\"*.sx\"]\n  headers: {Referer: \"https://other/\"}\n\
             - hosts: [\"*\"]\n  headers: {Referer: \"https://any/\"}\n",
        )
        .unwrap();
        let p = Providers::new(&conf);
        assert_eq!(p.headers_for("voe.sx")[0].value, "https://voe.sx/");
        assert_eq!(p.headers_for("cdn.voe.sx")[0].value, "https://voe.sx/");
        assert_eq!(p.headers_for("x.sx")[0].value, "https://other/");
        assert_eq!(p.headers_for("example.com")[0].value, "https://any/");
        assert!(Providers::new(&conf[..2]).headers_for("example.com").is_empty());
    }
}
