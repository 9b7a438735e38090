//! Provider profiles: the headers a hoster insists on (Referer, Origin,
//! User-Agent, ...), matched on the upstream host of every hop.

use crate::config::ProviderConf;
use crate::headers::WireHeader;
use crate::hosts::HostTable;

#[derive(Debug, Clone, Default)]
pub struct Providers(HostTable<Vec<WireHeader>>);

impl Providers {
    pub fn new(conf: &[ProviderConf]) -> Providers {
        Providers(HostTable::new(conf.iter().map(|p| (p.hosts.clone(), p.headers.0.clone()))))
    }

    /// The headers of the first profile matching `host` (lower-case).
    pub fn headers_for(&self, host: &str) -> &[WireHeader] {
        self.0.first(host).map_or(&[], Vec::as_slice)
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
