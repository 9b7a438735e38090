//! Egress through another proxy (`egress.proxies`): a SOCKS5 (RFC 1928,
//! with RFC 1929 user/password) or HTTP `CONNECT` tunnel to the upstream,
//! opened as Pingora's custom layer-4 connection, so Pingora's own TLS (with
//! the upstream's name for SNI and verification) and HTTP/1.1 client run
//! through it end to end like over a direct connection.
//!
//! `socks5` and `http` tunnels are asked for an address the egress policy
//! has already checked; `socks5h` hands the host name over for the proxy to
//! resolve (then only `deny_hosts` and IP literals are judged here).

use std::fmt;
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
use url::Url;

use crate::config::EgressProxyConf;
use crate::hosts::HostTable;

/// An egress proxy URL: `socks5://`, `socks5h://` or `http://` (CONNECT),
/// with optional `user:password@`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub kind: ProxyKind,
    pub host: String,
    pub port: u16,
    pub credentials: Option<Credentials>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// SOCKS5; the destination is resolved and checked here, the tunnel asked for the IP.
    Socks5,
    /// SOCKS5 with the host name handed to the proxy to resolve.
    Socks5h,
    /// HTTP `CONNECT`.
    Http,
}

/// A user name and password (RFC 1929 for SOCKS5, Basic for CONNECT).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl ProxyUrl {
    /// The proxy's name for logs and metrics: scheme, host and port, never
    /// the credentials.
    pub fn name(&self) -> String {
        let scheme = match self.kind {
            ProxyKind::Socks5 => "socks5",
            ProxyKind::Socks5h => "socks5h",
            ProxyKind::Http => "http",
        };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    pub fn parse(s: &str) -> Result<ProxyUrl, String> {
        let u = Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
        let kind = match u.scheme() {
            "socks5" => ProxyKind::Socks5,
            "socks5h" => ProxyKind::Socks5h,
            "http" => ProxyKind::Http,
            other => return Err(format!("unsupported scheme {other:?} (socks5, socks5h or http)")),
        };
        let host = match u.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            _ => return Err("needs a host".into()),
        };
        if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
            return Err("must be scheme://[user:password@]host:port with nothing after the port".into());
        }
        // `url` hides a scheme's default port; an HTTP proxy has no usual
        // one, so it must be written (SOCKS defaults to 1080).
        let written = s
            .trim_end_matches('/')
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let port = match (u.port_or_known_default(), kind) {
            (Some(p), _) if written => p,
            (_, ProxyKind::Socks5 | ProxyKind::Socks5h) => u.port().unwrap_or(1080),
            (_, ProxyKind::Http) => return Err("needs a port".into()),
        };
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8().map(|c| c.into_owned());
        let credentials = match (u.username(), u.password()) {
            ("", None) => None,
            (user, Some(password)) => Some(Credentials::new(
                &decode(user).map_err(|_| "the user name is not UTF-8")?,
                &decode(password).map_err(|_| "the password is not UTF-8")?,
            )?),
            (_, None) => return Err("credentials need user:password".into()),
        };
        Ok(ProxyUrl { kind, host, port, credentials })
    }
}

impl Credentials {
    /// RFC 1929 carries each of user name and password in 1..=255 bytes,
    /// and Basic auth cannot carry a ':' in the user name.
    pub fn new(user: &str, password: &str) -> Result<Credentials, String> {
        if user.is_empty() || user.len() > 255 || password.len() > 255 {
            return Err("user name must be 1 to 255 bytes and password at most 255".into());
        }
        if user.contains(':') {
            return Err("the user name must not contain ':'".into());
        }
        Ok(Credentials { user: user.to_string(), password: password.to_string() })
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the credentials.
        write!(f, "ProxyUrl({}{})", self.name(), if self.credentials.is_some() { ", with credentials" } else { "" })
    }
}

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
pub struct EgressProxies(HostTable<Arc<EgressProxy>>);

impl EgressProxies {
    pub fn new(conf: &[EgressProxyConf]) -> EgressProxies {
        EgressProxies(HostTable::new(conf.iter().map(|p| (p.hosts.clone(), Arc::new(EgressProxy::new(p.url.clone()))))))
    }

    /// The proxy for an upstream `host` (lower-case), or `None`: direct.
    pub fn pick(&self, host: &str) -> Option<&Arc<EgressProxy>> {
        self.0.first(host)
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

/// Why a tunnel could not be opened (for the log: never the credentials).
#[derive(Debug)]
pub enum TunnelError {
    /// The egress proxy itself could not be reached.
    Connect(std::io::Error),
    /// The SOCKS5 handshake or request failed (refusal, wrong credentials).
    Socks5(tokio_socks::Error),
    /// The HTTP proxy answered `CONNECT` with this status.
    Refused(http::StatusCode),
    /// The `CONNECT` exchange failed (Pingora's error type).
    Exchange(&'static str),
    /// No tunnel within `upstream.connect_timeout`.
    Deadline,
}

impl fmt::Display for TunnelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelError::Connect(e) => write!(f, "connect: {e}"),
            TunnelError::Socks5(e) => write!(f, "SOCKS5: {e}"),
            TunnelError::Refused(status) => write!(f, "CONNECT answered {status}"),
            TunnelError::Exchange(what) => write!(f, "CONNECT: {what}"),
            TunnelError::Deadline => f.write_str("no answer within upstream.connect_timeout"),
        }
    }
}

#[async_trait]
impl L4Connect for Tunnel {
    async fn connect(&self, _placeholder: &L4Addr) -> Result<L4Stream> {
        let opened = tokio::time::timeout_at(self.deadline.into(), self.open()).await;
        let failure = match opened {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(why)) => why,
            Err(_) => TunnelError::Deadline,
        };
        // Said once, by the request that fails, with the upstream it was for.
        Error::e_explain(EGRESS_PROXY_FAILED, format!("egress proxy {}: {failure}", self.via.name))
    }
}

impl Tunnel {
    /// Connects to the proxy and asks it for the target.
    async fn open(&self) -> std::result::Result<L4Stream, TunnelError> {
        let url = &self.via.url;
        let tcp = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(TunnelError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match url.kind {
            ProxyKind::Socks5 | ProxyKind::Socks5h => self.socks5(tcp).await,
            ProxyKind::Http => self.http_connect(tcp).await,
        }
    }

    async fn socks5(&self, tcp: TcpStream) -> std::result::Result<L4Stream, TunnelError> {
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
        Ok(L4Stream::from(tunnel.map_err(TunnelError::Socks5)?.into_inner()))
    }

    async fn http_connect(&self, tcp: TcpStream) -> std::result::Result<L4Stream, TunnelError> {
        let (host, port) = match &self.to {
            Target::Addr(a) => (a.ip().to_string(), a.port()),
            Target::Name(h, p) => (h.clone(), *p),
        };
        let auth: Option<(&str, Vec<u8>)> = self.via.url.credentials.as_ref().map(|c| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
            ("Proxy-Authorization", format!("Basic {token}").into_bytes())
        });
        let request = raw_connect::generate_connect_header(&host, port, auth.iter().map(|(k, v)| (*k, v)))
            .map_err(|e| TunnelError::Exchange(e.etype().as_str()))?;
        // Pingora's CONNECT client needs a peer only for a hook we do not set.
        let peer = HttpPeer::new((std::net::Ipv4Addr::UNSPECIFIED, port), false, String::new());
        let stream: pingora::protocols::Stream = Box::new(L4Stream::from(tcp));
        let (stream, _) = raw_connect::connect(stream, &request, &peer).await.map_err(|e| {
            // The status of a refusal, not Pingora's whole error chain (its
            // cause is the proxy's answer, boxed once more by `e_because`).
            let cause = e.cause.as_deref();
            match cause.and_then(|c| c.downcast_ref::<Box<raw_connect::ConnectProxyError>>()) {
                Some(r) => TunnelError::Refused(r.response.status),
                None => TunnelError::Exchange(e.etype().as_str()),
            }
        })?;
        stream.into_any().downcast::<L4Stream>().map(|s| *s).map_err(|_| TunnelError::Exchange("not a TCP stream"))
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
        // Picked by the host as a URL writes it: an IPv6 address in brackets.
        let v6 = proxies("- {hosts: [\"2001:db8::1\"], url: \"socks5://h:1\"}\n");
        let url = url::Url::parse("http://[2001:DB8:0::1]:8080/x").unwrap();
        assert!(v6.pick(url.host_str().unwrap()).is_some());
        // Each proxy pools apart, and apart from direct connections (group 0).
        let groups: Vec<u64> = p.0.values().map(|e| e.group).collect();
        assert!(groups.iter().all(|g| *g != 0));
        assert!(groups[0] != groups[1] && groups[1] != groups[2]);
        assert!(!format!("{:?}", p).contains("u:p"), "never the credentials");
    }
}
