//! Egress through another proxy (`egress.proxies`): a SOCKS5 (RFC 1928,
//! with RFC 1929 user/password) or HTTP `CONNECT` tunnel to the upstream,
//! opened as Pingora's custom layer-4 connection, so Pingora's own TLS (with
//! the upstream's name for SNI and verification) and HTTP/1.1 client run
//! through it end to end like over a direct connection.
//!
//! `socks5` and `http` tunnels are asked for an address the egress policy
//! has already checked; `socks5h` hands the host name over for the proxy to
//! resolve (then only `deny_hosts` and IP literals are judged here).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use base64::Engine;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr as L4Addr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect;
use pingora::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use tokio::net::TcpStream;

use crate::config::{EgressProxyConf, ProxyKind, ProxyUrl};
use crate::egress::HostPattern;

/// The error type of a tunnel that could not be opened: 502 `egress proxy failed`.
pub const EGRESS_PROXY_FAILED: ErrorType = ErrorType::Custom("EgressProxyFailed");

/// One configured egress proxy.
pub struct EgressProxy {
    url: ProxyUrl,
    /// `scheme://host:port`, never the credentials: for logs and metrics.
    pub name: String,
    /// Keeps this proxy's pooled connections apart from others' (and from
    /// direct ones): Pingora's `group_key`.
    pub group: u64,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl EgressProxy {
    pub fn new(url: ProxyUrl) -> EgressProxy {
        let name = url.name();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ("egress-proxy", &name).hash(&mut h);
        // Never 0, which is every direct connection's group.
        EgressProxy { url, name, group: h.finish() | 1 }
    }

    /// The proxy resolves host names itself (`socks5h`).
    pub fn resolves_names(&self) -> bool {
        self.url.kind == ProxyKind::Socks5h
    }
}

/// The `egress.proxies` list: the first entry whose hosts match is used.
#[derive(Debug, Default)]
pub struct EgressProxies(Vec<(Vec<HostPattern>, Arc<EgressProxy>)>);

impl EgressProxies {
    pub fn new(conf: &[EgressProxyConf]) -> EgressProxies {
        EgressProxies(conf.iter().map(|p| (p.hosts.clone(), Arc::new(EgressProxy::new(p.url.clone())))).collect())
    }

    /// The proxy for an upstream `host` (lower-case), or `None`: direct.
    pub fn pick(&self, host: &str) -> Option<&Arc<EgressProxy>> {
        self.0.iter().find(|(hosts, _)| hosts.iter().any(|p| p.matches(host))).map(|(_, p)| p)
    }
}

/// Where the tunnel leads.
#[derive(Debug, Clone)]
pub enum Target {
    /// An address checked by the egress policy.
    Addr(SocketAddr),
    /// A host name for the proxy to resolve (`socks5h`).
    Name(String, u16),
}

/// A tunnel to open, as Pingora's custom layer-4 connector for one peer.
#[derive(Debug)]
pub struct Tunnel {
    pub via: Arc<EgressProxy>,
    pub to: Target,
    /// The connection (proxy and handshake included) must be up by then.
    pub deadline: Instant,
}

#[async_trait]
impl L4Connect for Tunnel {
    async fn connect(&self, _placeholder: &L4Addr) -> Result<L4Stream> {
        let opened = tokio::time::timeout_at(self.deadline.into(), self.open()).await;
        let failure = match opened {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(why)) => why,
            Err(_) => "no answer within upstream.connect_timeout".to_string(),
        };
        log::warn!("egress proxy {} failed: {failure}", self.via.name);
        Error::e_explain(EGRESS_PROXY_FAILED, format!("egress proxy {}: {failure}", self.via.name))
    }
}

impl Tunnel {
    /// Connects to the proxy and asks it for the target. Errors are reasons
    /// for the log: they never carry the credentials.
    async fn open(&self) -> std::result::Result<L4Stream, String> {
        let url = &self.via.url;
        let tcp = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match url.kind {
            ProxyKind::Socks5 | ProxyKind::Socks5h => self.socks5(tcp).await,
            ProxyKind::Http => self.http_connect(tcp).await,
        }
    }

    async fn socks5(&self, tcp: TcpStream) -> std::result::Result<L4Stream, String> {
        use tokio_socks::tcp::Socks5Stream;
        let creds = self.via.url.credentials.as_ref();
        let tunnel = match (&self.to, creds) {
            (Target::Addr(a), None) => Socks5Stream::connect_with_socket(tcp, *a).await,
            (Target::Addr(a), Some(c)) => {
                Socks5Stream::connect_with_password_and_socket(tcp, *a, &c.user, &c.password).await
            }
            (Target::Name(h, p), None) => Socks5Stream::connect_with_socket(tcp, (h.as_str(), *p)).await,
            (Target::Name(h, p), Some(c)) => {
                Socks5Stream::connect_with_password_and_socket(tcp, (h.as_str(), *p), &c.user, &c.password).await
            }
        };
        let tunnel = tunnel.map_err(|e| format!("SOCKS5: {e}"))?;
        Ok(L4Stream::from(tunnel.into_inner()))
    }

    async fn http_connect(&self, tcp: TcpStream) -> std::result::Result<L4Stream, String> {
        let (host, port) = match &self.to {
            Target::Addr(a) => (a.ip().to_string(), a.port()),
            Target::Name(h, p) => (h.clone(), *p),
        };
        let auth: Option<(&str, Vec<u8>)> = self.via.url.credentials.as_ref().map(|c| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
            ("Proxy-Authorization", format!("Basic {token}").into_bytes())
        });
        let request = raw_connect::generate_connect_header(&host, port, auth.iter().map(|(k, v)| (*k, v)))
            .map_err(|e| format!("CONNECT request: {e}"))?;
        // Pingora's CONNECT client needs a peer only for a hook we do not set.
        let peer = HttpPeer::new((std::net::Ipv4Addr::UNSPECIFIED, port), false, String::new());
        let stream: pingora::protocols::Stream = Box::new(L4Stream::from(tcp));
        let (stream, _) = raw_connect::connect(stream, &request, &peer).await.map_err(|e| {
            // The status of a refusal, not Pingora's whole error chain (its
            // cause is the proxy's answer, boxed once more by `e_because`).
            let cause = e.cause.as_deref();
            let refusal = cause.and_then(|c| c.downcast_ref::<Box<raw_connect::ConnectProxyError>>());
            match refusal {
                Some(r) => format!("CONNECT answered {}", r.response.status),
                None => format!("CONNECT: {}", e.etype().as_str()),
            }
        })?;
        stream.into_any().downcast::<L4Stream>().map(|s| *s).map_err(|_| "CONNECT: not a TCP stream".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(yaml: &str) -> EgressProxies {
        let conf: Vec<EgressProxyConf> = serde_yaml::from_str(yaml).unwrap();
        EgressProxies::new(&conf)
    }

    #[test]
    fn the_first_matching_entry_is_used() {
        let p = proxies(
            "- {hosts: [\"*.debrid.example\"], url: \"socks5://u:p@127.0.0.1:1080\"}\n\
             - {hosts: [\"cdn.example\", \"*.cdn.example\"], url: \"http://127.0.0.1:3128\"}\n\
             - {hosts: [\"*\"], url: \"socks5h://warp:1080\"}\n",
        );
        assert_eq!(p.pick("a.debrid.example").unwrap().name, "socks5://127.0.0.1:1080");
        assert_eq!(p.pick("cdn.example").unwrap().name, "http://127.0.0.1:3128");
        assert_eq!(p.pick("elsewhere.example").unwrap().name, "socks5h://warp:1080");
        assert!(p.pick("elsewhere.example").unwrap().resolves_names());
        assert!(proxies("- {hosts: [\"a.example\"], url: \"socks5://h:1\"}\n").pick("b.example").is_none());
        // Each proxy pools apart, and apart from direct connections (group 0).
        let groups: Vec<u64> = p.0.iter().map(|(_, e)| e.group).collect();
        assert!(groups.iter().all(|g| *g != 0));
        assert!(groups[0] != groups[1] && groups[1] != groups[2]);
        assert!(!format!("{:?}", p).contains("u:p"), "never the credentials");
    }
}
