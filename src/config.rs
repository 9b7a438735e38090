//! YAML configuration: every key defaulted, unknown keys and impossible values
//! refused at start with the file, the key and the reason.
//!
//! Values are parsed into their typed form while the file is read
//! (addresses, CIDRs, host patterns, header lists, URLs, durations), so a
//! [`Config`] that loaded is usable as it is: building the proxy from it
//! cannot fail, and nothing is parsed a second time.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use url::Url;

use crate::headers::WireHeader;
use crate::hosts::HostPattern;
use crate::tunnel::{Credentials, ProxyUrl};

/// Environment variable that supplies `auth.secret` when the file does not.
pub const SECRET_ENV: &str = "ANIBRIDGE_PROXY_SECRET";
/// Environment variable that supplies `auth.api_key` when the file does not.
pub const API_KEY_ENV: &str = "ANIBRIDGE_PROXY_API_KEY";
/// `<VAR>_FILE` names a file holding the value instead (Docker/Kubernetes
/// secrets); a trailing newline is ignored.
pub const FILE_SUFFIX: &str = "_FILE";

/// A configuration problem, reported as `file: key: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Implements `Deserialize` for a type parsed from one YAML string by `$parse`
/// (`fn(&str) -> Result<Self, String>`); the error becomes the key's reason.
macro_rules! from_str {
    ($ty:ty, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                ($parse)(s.as_str()).map_err(de::Error::custom)
            }
        }
    };
}

/// A duration written with a unit: `"500ms"`, `"10s"`, `"15m"`, `"1h"`
/// (humantime's units; combinations like `"1h 30m"` work too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

from_str!(Dur, |s| {
    let d = parse_duration(s)?;
    // Longer is never reached, and added to the clock it would overflow.
    if d > MAX_DURATION {
        return Err(format!("duration {s:?} is more than a year"));
    }
    Ok(Dur(d))
});

/// The longest duration any key accepts.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Parses a duration with a unit (`ms`, `s`, `m`, `h`, ...).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("duration {s:?}: {e} (write e.g. \"500ms\", \"10s\", \"15m\")"))
}

/// An `IP:port` socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr(pub SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl de::Visitor<'_> for Visit {
            type Value = Addr;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an IP:port address")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Addr, E> {
                parse_addr(s).map_err(E::custom)
            }
            // `listen: 8080`: a port alone, read by YAML as a number.
            fn visit_u64<E: de::Error>(self, port: u64) -> Result<Addr, E> {
                Err(E::custom(format!("{port} is a port alone; {}", where_to_listen(&port.to_string()))))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Addr, E> {
                Err(E::custom(format!("{n} is not an IP:port address")))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// An `IP:port`; what else people write (`:8080` as Go and Traefik do,
/// `localhost:8080`, `0.0.0.0`) is refused with the spelling to use.
fn parse_addr(s: &str) -> Result<Addr, String> {
    if let Ok(a) = s.trim().parse() {
        return Ok(Addr(a));
    }
    let port = s.trim().rsplit_once(':').map(|(_, p)| p).filter(|p| p.parse::<u16>().is_ok());
    Err(match port {
        Some(p) => format!("{s:?} is not an IP:port address; {}", where_to_listen(p)),
        None => format!("{s:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")"),
    })
}

fn where_to_listen(port: &str) -> String {
    format!("write \"127.0.0.1:{port}\" (this machine only) or \"0.0.0.0:{port}\" (every IPv4 address)")
}

/// One listen address or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen(pub Vec<SocketAddr>);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Read as a plain value first: an untagged enum would hide the reason.
        let one = |v: serde_yaml::Value| Addr::deserialize(v).map(|a| a.0).map_err(de::Error::custom);
        let list = match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::Sequence(items) => items.into_iter().map(one).collect::<Result<Vec<_>, _>>()?,
            other => vec![one(other)?],
        };
        if list.is_empty() {
            return Err(de::Error::custom("needs at least one address"));
        }
        Ok(Listen(list))
    }
}

/// A CIDR such as `10.0.0.0/8`, or one address (`172.17.0.1`: the range of
/// that address alone, as nginx's `allow` and `set_real_ip_from` read it).
/// A CIDR with host bits set (`192.168.1.10/24`) is refused, as Python's
/// `ipaddress.ip_network` refuses it: it reads as one address but allows
/// the whole network, and these lists widen what the proxy may reach or
/// whom it believes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

from_str!(Cidr, |s: &str| {
    let net = s
        .parse()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is neither a CIDR (e.g. 10.0.0.0/8) nor an address"))?;
    if net != net.trunc() {
        return Err(format!(
            "{s:?} has host bits set: write {} for the network, or {} for that one address",
            net.trunc(),
            net.addr()
        ));
    }
    Ok(Cidr(net))
});

from_str!(HostPattern, |s: &str| HostPattern::parse(s).map_err(|r| format!("{s:?}: {r}")));

/// An absolute http(s) URL with a host and nothing the proxy would leave
/// unused: no query, fragment or `user:password@`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub Url);

from_str!(HttpUrl, |s: &str| {
    let u = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{s:?} must be an http(s) URL"));
    }
    if u.query().is_some() {
        return Err(format!("{s:?} must not have a query"));
    }
    if u.fragment().is_some() {
        return Err(format!("{s:?} must not have a fragment (#...)"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        // Named without them: the error is printed.
        let mut shown = u.clone();
        let _ = (shown.set_username(""), shown.set_password(None));
        return Err(format!(
            "{shown} must not hold credentials (user:password@): they are never sent; \
             for a route, set an Authorization header in a provider profile for its host"
        ));
    }
    Ok(HttpUrl(u))
});

/// A header value (e.g. a User-Agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value(pub HeaderValue);

from_str!(Value, |s: &str| HeaderValue::from_str(s).map(Value).map_err(|_| "is not a valid header value".to_string()));

/// Header `name: value` pairs in the order written (they go upstream in that order).
#[derive(Debug, Clone, Default)]
pub struct HeaderList(pub Vec<WireHeader>);

impl<'de> Deserialize<'de> for HeaderList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = indexmap::IndexMap::<String, String>::deserialize(d)?;
        let list = crate::headers::parse_pairs(map.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(de::Error::custom)?;
        // Refused rather than left out unseen.
        for h in &list {
            if let Some(why) = crate::headers::not_settable(&h.name) {
                let name = String::from_utf8_lossy(&h.spelling);
                return Err(de::Error::custom(format!("{name:?} cannot be set here: {why}")));
            }
        }
        Ok(HeaderList(list))
    }
}

/// An origin as a browser sends it in `Origin` (`scheme://host[:port]`), or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin(pub String);

from_str!(AllowedOrigin, |s: &str| {
    if s == "*" {
        Ok(AllowedOrigin(s.into()))
    } else if is_origin(s) {
        Ok(AllowedOrigin(serialized_origin(s.trim_end_matches('/'))))
    } else {
        Err(format!("{s:?} is not an origin (\"*\" or scheme://host[:port], as browsers send it)"))
    }
});

/// A static route's path prefix: starts and ends with `/`, not shadowing
/// the built-in routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePrefix(pub String);

from_str!(RoutePrefix, |s: &str| {
    if !s.starts_with('/') || !s.ends_with('/') {
        return Err(format!("{s:?} must start and end with '/'"));
    }
    if s.starts_with("/strm/") || s == "/" {
        return Err(format!("{s:?} would shadow the built-in routes"));
    }
    // Compared with the path as clients send it: a prefix no request path
    // can start with would leave the route unused.
    let hex = |b: Option<&u8>| b.is_some_and(u8::is_ascii_hexdigit);
    let bytes = s.as_bytes();
    let sendable = bytes.iter().enumerate().all(|(i, b)| match b {
        b'%' => hex(bytes.get(i + 1)) && hex(bytes.get(i + 2)),
        b => b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(b),
    });
    if !sendable {
        return Err(format!(
            "{s:?} can never match a request path: write it as clients send it, percent-encoded (a space is %20)"
        ));
    }
    if s.split('/').any(|segment| segment == "." || segment == "..") {
        return Err(format!("{s:?} can never match a request path: clients resolve '.' and '..' segments"));
    }
    Ok(RoutePrefix(s.to_string()))
});

from_str!(ProxyUrl, |s: &str| ProxyUrl::parse(s).map_err(|e| e.to_string()));

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Token,
    Apikey,
    None,
}

impl AuthMode {
    /// As the configuration writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Token => "token",
            AuthMode::Apikey => "apikey",
            AuthMode::None => "none",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConf {
    pub mode: AuthMode,
    pub secret: Option<String>,
    pub api_key: Option<String>,
    pub token_ttl: Dur,
    pub session_ttl: Dur,
    pub allow_open: bool,
}

impl Default for AuthConf {
    fn default() -> Self {
        Self {
            mode: AuthMode::Token,
            secret: None,
            api_key: None,
            token_ttl: Dur(Duration::from_secs(15 * 60)),
            session_ttl: Dur(Duration::from_secs(6 * 3600)),
            allow_open: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConf {
    pub connect_timeout: Dur,
    pub read_timeout: Dur,
    pub write_timeout: Dur,
    pub max_redirects: u32,
    pub resume_attempts: u32,
    /// Concurrent upstream requests per host (0: unlimited).
    pub max_connections_per_host: u32,
    /// Longest wait for a host's slot or cooldown, then 503.
    pub queue_timeout: Dur,
    /// Longest cooldown taken from `Retry-After`.
    pub max_cooldown: Dur,
    pub user_agent: Option<Value>,
}

impl Default for UpstreamConf {
    fn default() -> Self {
        Self {
            connect_timeout: Dur(Duration::from_secs(10)),
            read_timeout: Dur(Duration::from_secs(60)),
            write_timeout: Dur(Duration::from_secs(30)),
            max_redirects: 5,
            resume_attempts: 3,
            max_connections_per_host: 0,
            queue_timeout: Dur(Duration::from_secs(10)),
            max_cooldown: Dur(Duration::from_secs(120)),
            user_agent: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamConf {
    pub write_timeout: Dur,
    /// How long a client's idle keep-alive connection is kept open for its
    /// next request (whole seconds).
    pub keepalive_timeout: Dur,
    /// How long a request's header may take from its first byte
    /// ([`crate::header_guard`]).
    pub header_timeout: Dur,
    /// Client connections held at once on the proxy's listeners; 0: as
    /// many as the open-files limit allows; unset: see
    /// [`crate::connections::bound`].
    pub max_connections: Option<usize>,
}

impl Default for DownstreamConf {
    fn default() -> Self {
        // 75 s: nginx's `keepalive_timeout`.
        // 60 s: nginx's `client_header_timeout`.
        Self {
            write_timeout: Dur(Duration::from_secs(60)),
            keepalive_timeout: Dur(Duration::from_secs(75)),
            header_timeout: Dur(Duration::from_secs(60)),
            max_connections: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConf {
    pub chunk_size: usize,
    pub max_playlist_bytes: usize,
}

impl Default for StreamConf {
    fn default() -> Self {
        Self { chunk_size: 64 * 1024, max_playlist_bytes: 8 * 1024 * 1024 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConf {
    /// Stored and filling bodies together; 0 turns storing and coalescing off.
    pub max_bytes: u64,
    /// Larger responses are relayed, never stored. Unset: 16 MiB, or
    /// `max_bytes` when that is smaller (see [`CacheConf::max_object_bytes`]).
    #[serde(rename = "max_object_bytes")]
    pub max_object: Option<u64>,
    /// Freshness when the upstream gives none.
    pub ttl: Dur,
    /// VOD and master playlists (live ones: half their target duration).
    pub playlist_ttl: Dur,
}

impl Default for CacheConf {
    fn default() -> Self {
        Self {
            max_bytes: 128 << 20,
            max_object: None,
            ttl: Dur(Duration::from_secs(600)),
            playlist_ttl: Dur(Duration::from_secs(60)),
        }
    }
}

impl CacheConf {
    /// `max_object_bytes`: as set, else 16 MiB, or all of `max_bytes`
    /// when that is smaller (a small cache needs one key changed, not two).
    pub fn max_object_bytes(&self) -> u64 {
        self.max_object.unwrap_or(self.max_bytes.min(16 << 20))
    }
}

/// Pingora's upstream body buffer (`BODY_BUFFER_SIZE`), the size of every relay read.
pub const MIN_CHUNK: usize = 64 * 1024;

/// One `egress.proxies` entry: the hosts it serves and the proxy to use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressProxyConf {
    pub hosts: Vec<HostPattern>,
    pub url: ProxyUrl,
    /// An environment variable holding `user:password` (or `<VAR>_FILE`
    /// naming a file that does), instead of credentials in the URL.
    #[serde(default)]
    pub credentials_env: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConf {
    pub allow_cidrs: Vec<Cidr>,
    pub deny_hosts: Vec<HostPattern>,
    pub proxies: Vec<EgressProxyConf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConf {
    pub url: Option<HttpUrl>,
    pub timeout: Dur,
    pub cache_entries: usize,
}

impl Default for ResolverConf {
    fn default() -> Self {
        Self { url: None, timeout: Dur(Duration::from_secs(15)), cache_entries: 10_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConf {
    pub allow_origins: Vec<AllowedOrigin>,
}

impl Default for CorsConf {
    fn default() -> Self {
        Self { allow_origins: vec![AllowedOrigin("*".into())] }
    }
}

/// `log:` — the access log.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConf {
    /// `text` or `json`.
    pub format: crate::access::Format,
    /// Reverse proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<Cidr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConf {
    pub hosts: Vec<HostPattern>,
    #[serde(default)]
    pub headers: HeaderList,
    /// Concurrent upstream requests to these hosts (0: the per-host default).
    #[serde(default)]
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConf {
    pub prefix: RoutePrefix,
    pub upstream: HttpUrl,
    #[serde(default = "yes")]
    pub auth: bool,
}

fn yes() -> bool {
    true
}

/// The whole file, as written (after defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Listen,
    pub admin_listen: Addr,
    pub threads: usize,
    pub public_base_url: Option<HttpUrl>,
    pub shutdown_grace: Dur,
    pub auth: AuthConf,
    pub upstream: UpstreamConf,
    pub downstream: DownstreamConf,
    pub stream: StreamConf,
    pub cache: CacheConf,
    pub egress: EgressConf,
    pub resolver: ResolverConf,
    pub cors: CorsConf,
    pub log: LogConf,
    pub providers: Vec<ProviderConf>,
    pub routes: Vec<RouteConf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Listen(vec![SocketAddr::from(([127, 0, 0, 1], 8080))]),
            admin_listen: Addr(SocketAddr::from(([127, 0, 0, 1], 9090))),
            threads: 2,
            public_base_url: None,
            shutdown_grace: Dur(Duration::from_secs(30)),
            auth: AuthConf::default(),
            upstream: UpstreamConf::default(),
            downstream: DownstreamConf::default(),
            stream: StreamConf::default(),
            cache: CacheConf::default(),
            egress: EgressConf::default(),
            resolver: ResolverConf::default(),
            cors: CorsConf::default(),
            log: LogConf::default(),
            providers: Vec::new(),
            routes: Vec::new(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a file; secrets missing from it are taken
    /// from the environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::from_yaml(&file, &text, |k| std::env::var(k).ok())
    }

    /// Parses and validates YAML text; `env` looks up environment variables
    /// (a parameter so tests need not touch the process environment).
    pub fn from_yaml(file: &str, text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError { file: file.to_string(), key: key.to_string(), reason };
        // A byte order mark (editors on Windows write one) is not content;
        // serde_yaml takes it for the start of a second document.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // An empty file (or one with only comments) means all defaults.
        let mut cfg: Config = if text.trim().is_empty()
            || text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            Config::default()
        } else {
            serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(|e| {
                let key = e.path().to_string();
                let reason = e.into_inner().to_string();
                // serde_yaml prefixes (part of) the path itself to some errors.
                let reason = match reason.split_once(": ") {
                    Some((p, rest)) if key.starts_with(p) && !p.contains(' ') => rest.to_string(),
                    _ => reason,
                };
                // The parser's words for a tab say nothing of tabs.
                let reason = match indented_with_a_tab(text, &reason) {
                    Some(line) => format!("{reason} (line {line} is indented with a tab: YAML takes spaces only)"),
                    None => reason,
                };
                // Where the parser lost its place there is no key ("?"):
                // the YAML itself is broken.
                if key == "." || key.contains('?') {
                    return err("", format!("not valid YAML: {reason}"));
                }
                // "64k" or "128MiB" (nginx's way): say how a size is written.
                let reason =
                    if (key.ends_with("_bytes") || key.ends_with("chunk_size")) && reason.starts_with("invalid type") {
                        format!("{reason} (a size is a whole number of bytes: 134217728 for 128 MiB)")
                    } else {
                        reason
                    };
                // Values checked after parsing (addresses, URLs) carry no
                // position of their own: name the key's line.
                let reason = match (reason.contains(" at line "), line_of(text, &key)) {
                    (false, Some(line)) => format!("{reason} (at line {line})"),
                    _ => reason,
                };
                err(&key, reason)
            })?
        };
        if cfg.auth.secret.is_none() {
            cfg.auth.secret = from_env(&env, SECRET_ENV).map_err(|r| err("auth.secret", r))?;
        }
        if cfg.auth.api_key.is_none() {
            cfg.auth.api_key = from_env(&env, API_KEY_ENV).map_err(|r| err("auth.api_key", r))?;
        }
        for (i, p) in cfg.egress.proxies.iter_mut().enumerate() {
            let key = format!("egress.proxies[{i}].credentials_env");
            if let Some(var) = p.credentials_env.as_deref() {
                if p.url.credentials.is_some() {
                    return Err(err(&key, "the URL has credentials already".into()));
                }
                let text = from_env(&env, var)
                    .map_err(|r| err(&key, r))?
                    .ok_or_else(|| err(&key, format!("{var} (or {var}{FILE_SUFFIX}) is not set")))?;
                let (user, password) =
                    text.split_once(':').ok_or_else(|| err(&key, format!("{var} must hold user:password")))?;
                p.url.credentials = Some(Credentials::new(user, password).map_err(|r| err(&key, r))?);
            }
        }
        // Named with the entry's index, as a parse error would be.
        if let Some(i) = cfg.providers.iter().position(|p| p.hosts.is_empty()) {
            return Err(err(&format!("providers[{i}].hosts"), "each provider needs at least one host".into()));
        }
        if let Some(i) = cfg.egress.proxies.iter().position(|p| p.hosts.is_empty()) {
            let reason = "each proxy needs at least one host (\"*\" for all)".into();
            return Err(err(&format!("egress.proxies[{i}].hosts"), reason));
        }
        cfg.validate().map_err(|(key, reason)| err(key, reason))?;
        Ok(cfg)
    }

    /// Listener addresses.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen.0
    }

    /// Every address this process listens on: the proxy's listeners, then
    /// the admin listener.
    pub fn all_listeners(&self) -> Vec<SocketAddr> {
        self.listen.0.iter().copied().chain([self.admin_listen.0]).collect()
    }

    /// What no single key can say: limits and the combinations of keys.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.threads == 0 || self.threads > 1024 {
            return Err(("threads", "must be between 1 and 1024".into()));
        }
        match self.auth.mode {
            AuthMode::Token => {
                if self.auth.secret.as_deref().is_none_or(str::is_empty) {
                    return Err((
                        "auth.secret",
                        format!(
                            "token mode needs a secret (set auth.secret, {SECRET_ENV} or {SECRET_ENV}{FILE_SUFFIX})"
                        ),
                    ));
                }
            }
            AuthMode::Apikey => {
                if self.auth.api_key.as_deref().is_none_or(str::is_empty) {
                    return Err((
                        "auth.api_key",
                        format!("apikey mode needs a key (set auth.api_key or {API_KEY_ENV})"),
                    ));
                }
            }
            AuthMode::None => {
                let all_loopback = self.listen_addrs().iter().all(|a| a.ip().is_loopback());
                if !all_loopback && !self.auth.allow_open {
                    return Err((
                        "auth.mode",
                        "none is only allowed on loopback listeners unless auth.allow_open: true".into(),
                    ));
                }
            }
        }
        // Two entries of one family on one port: Pingora would find the
        // port taken by the first and retry binding forever, serving none
        // (an IPv6 and an IPv4 entry are bound apart, the IPv6 one v6-only).
        let listen = self.listen_addrs();
        for (i, b) in listen.iter().enumerate() {
            if let Some(a) = listen[..i].iter().find(|a| a.is_ipv4() == b.is_ipv4() && overlaps(**a, *b)) {
                let why = if a == b { "listed twice".to_string() } else { format!("overlaps {a}") };
                return Err(("listen", format!("{b} {why}: one address per port and family")));
            }
        }
        // Pingora binds with SO_REUSEPORT: an admin listener on a proxy
        // address would not fail, the kernel would split connections
        // between the two services at random.
        let admin = self.admin_listen.0;
        if let Some(both) = self.listen_addrs().iter().find(|a| overlaps(**a, admin)) {
            return Err((
                "admin_listen",
                format!(
                    "{admin} overlaps the proxy listener {both} (listen): connections would go to either at random"
                ),
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(j) = self.routes[..i].iter().position(|o| o.prefix == r.prefix) {
                return Err((
                    "routes",
                    format!(
                        "routes[{j}] and routes[{i}] have the same prefix {:?}: one would never be used",
                        r.prefix.0
                    ),
                ));
            }
        }
        // An upstream at one of the proxy's own listeners would be a loop,
        // refused on every request: said at start instead. Only what the
        // URL itself tells is judged (a loopback address, `localhost`, or a
        // listener's own address); a name is resolved at each request.
        let own = self.all_listeners();
        let at_own = |u: &Url| own_listener_of(&own, u);
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(a) = at_own(&r.upstream.0) {
                return Err((
                    "routes",
                    format!("routes[{i}].upstream {} is this proxy's own listener {a}", r.upstream.0),
                ));
            }
        }
        if let Some(a) = self.resolver.url.as_ref().and_then(|u| at_own(&u.0)) {
            return Err(("resolver.url", format!("{a} is this proxy's own listener")));
        }
        if self.shutdown_grace.0 > Duration::from_secs(3600) {
            return Err(("shutdown_grace", "must be at most 1h".into()));
        }
        for (key, d) in [("auth.token_ttl", self.auth.token_ttl), ("auth.session_ttl", self.auth.session_ttl)] {
            if d.0 < Duration::from_secs(1) {
                return Err((
                    key,
                    "must be at least 1s (`exp` is in whole seconds: signed playlist children would expire as they are handed out)".into(),
                ));
            }
        }
        if self.downstream.keepalive_timeout.0 < Duration::from_secs(1) {
            // Counted in whole seconds, where 0 would mean for ever.
            return Err(("downstream.keepalive_timeout", "must be at least 1s".into()));
        }
        if self.upstream.max_cooldown.0 < Duration::from_secs(1) {
            return Err(("upstream.max_cooldown", "must be at least 1s (the shortest cooldown)".into()));
        }
        for (key, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.read_timeout", self.upstream.read_timeout),
            ("upstream.write_timeout", self.upstream.write_timeout),
            ("downstream.write_timeout", self.downstream.write_timeout),
            ("downstream.header_timeout", self.downstream.header_timeout),
            ("resolver.timeout", self.resolver.timeout),
            ("upstream.queue_timeout", self.upstream.queue_timeout),
        ] {
            if d.0.is_zero() {
                return Err((key, "must be greater than 0 (timeouts cannot be disabled)".into()));
            }
        }
        if self.upstream.max_redirects > 20 {
            return Err(("upstream.max_redirects", "must be at most 20".into()));
        }
        if self.upstream.resume_attempts > 100 {
            return Err(("upstream.resume_attempts", "must be at most 100".into()));
        }
        // The bound a stream's relay buffer keeps. Pingora 0.9 reads upstream
        // bodies through a fixed 64 KiB buffer, so 64 KiB is the smallest bound
        // that can be kept; a smaller value would be a promise not honoured.
        if !(MIN_CHUNK..=256 * 1024).contains(&self.stream.chunk_size) {
            return Err((
                "stream.chunk_size",
                format!("must be between {MIN_CHUNK} and 262144 bytes (upstream bodies are read in Pingora's 64 KiB buffers)"),
            ));
        }
        if self.stream.max_playlist_bytes == 0 || self.stream.max_playlist_bytes > 256 << 20 {
            return Err(("stream.max_playlist_bytes", "must be between 1 and 268435456 bytes".into()));
        }
        if self.cache.max_bytes > 1 << 50 {
            // The budget is counted in a signed 64-bit gauge: room for it twice.
            return Err(("cache.max_bytes", "must be at most 1125899906842624 (1 PiB)".into()));
        }
        if self.cache.max_bytes > 0 {
            let c = &self.cache;
            if c.max_object.is_some_and(|m| m == 0 || m > c.max_bytes) {
                return Err((
                    "cache.max_object_bytes",
                    "must be between 1 and cache.max_bytes (set cache.max_bytes: 0 to turn the cache off)".into(),
                ));
            }
            for (key, d) in [("cache.ttl", c.ttl), ("cache.playlist_ttl", c.playlist_ttl)] {
                if d.0.is_zero() {
                    return Err((key, "must be greater than 0 (set cache.max_bytes: 0 to turn the cache off)".into()));
                }
            }
        }
        if self.resolver.cache_entries == 0 {
            return Err(("resolver.cache_entries", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The line a YAML error points at (`at line N column M`), when that line
/// is indented with a tab.
fn indented_with_a_tab(text: &str, reason: &str) -> Option<usize> {
    let (_, at) = reason.split_once(" at line ")?;
    let line: usize = at.split(' ').next()?.parse().ok()?;
    let mut indent = text.lines().nth(line.checked_sub(1)?)?.chars().take_while(|c| c.is_whitespace());
    indent.any(|c| c == '\t').then_some(line)
}

/// The line (1-based) where the setting `key` (`a.b`, `a[0].b`) is written,
/// best effort: the top-level key's line, then the first line after it
/// that names the last part of the key.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let mut parts = key.split('.').map(|p| p.split('[').next().unwrap_or(p));
    let top = parts.next()?;
    let last = key.rsplit('.').next().unwrap_or(key).split('[').next().unwrap_or(key);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.starts_with(&format!("{top}:")))?;
    if last == top {
        return Some(start + 1);
    }
    let found = lines[start..].iter().position(|l| {
        let t = l.trim_start().trim_start_matches(['-', '{', ' ']);
        t.starts_with(&format!("{last}:")) || l.contains(&format!("{{{last}:")) || l.contains(&format!(" {last}:"))
    });
    Some(start + found.unwrap_or(0) + 1)
}

/// A secret from `VAR`, or from the file `VAR_FILE` names.
fn from_env(env: &impl Fn(&str) -> Option<String>, var: &str) -> Result<Option<String>, String> {
    if let Some(v) = env(var).filter(|s| !s.is_empty()) {
        return Ok(Some(v));
    }
    let file_var = format!("{var}{FILE_SUFFIX}");
    match env(&file_var).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {file_var} ({path}): {e}"))?;
            let v = text.trim_end_matches(['\n', '\r']).to_string();
            if v.is_empty() {
                return Err(format!("{file_var} ({path}) is empty"));
            }
            Ok(Some(v))
        }
    }
}

/// Whether `o` is an origin as a browser sends it in `Origin`: scheme and
/// host, an optional port, nothing else (a trailing `/` is tolerated). Any
/// other entry could never match a request, so it is refused rather than
/// silently never allowing anything.
fn is_origin(o: &str) -> bool {
    let bare = o.strip_suffix('/').unwrap_or(o);
    let Some((_, authority)) = bare.split_once("://") else { return false };
    !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@'])
        && Url::parse(bare).is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()))
        && HeaderValue::from_str(bare).is_ok()
}

/// An http(s) origin written as browsers write `Origin`: host in lower
/// case (an international name in its ASCII form), no default port
/// (`https://Bücher.example:443` is `https://xn--bcher-kva.example`); an
/// entry spelled otherwise would never match. Other schemes (an app's
/// `capacitor://localhost`) are kept as they are written.
fn serialized_origin(o: &str) -> String {
    match Url::parse(o) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => u.origin().ascii_serialization(),
        _ => o.to_string(),
    }
}

/// The listener among `own` that `url` names, as far as the URL alone
/// tells: its address literally, or a loopback address or `localhost` on
/// the port of a listener on every address.
fn own_listener_of(own: &[SocketAddr], url: &Url) -> Option<SocketAddr> {
    let ip = match url.host()? {
        url::Host::Ipv4(a) => a.into(),
        url::Host::Ipv6(a) => a.into(),
        url::Host::Domain(d) if d.eq_ignore_ascii_case("localhost") => std::net::IpAddr::from([127, 0, 0, 1]),
        url::Host::Domain(_) => return None,
    };
    let to = SocketAddr::new(ip, url.port_or_known_default()?);
    // The URL alone cannot tell whether another address is this machine's:
    // only loopback ones count (and 0.0.0.0, which reaches this machine).
    let from = SocketAddr::from(([0, 0, 0, 0], 0));
    crate::egress::own_listener_reached(own, from, to)
}

/// Whether listeners on `a` and `b` take the same connections: the same
/// port on the same address, or on a wildcard address (`0.0.0.0`, `[::]`).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::ProxyKind;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml("t.yaml", text, |_| None)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        // Written as a number, but never reached: refused by key, not a panic per request.
        for never in ["18446744073709551615s", "99999999999999h", "366d"] {
            let e = load(&format!("auth: {{mode: none}}\nupstream: {{connect_timeout: \"{never}\"}}\n")).unwrap_err();
            assert_eq!(e.key, "upstream.connect_timeout", "{never}");
            assert!(e.reason.contains("more than a year"), "{e}");
        }
        assert!(load("auth: {mode: none}\ncache: {ttl: \"365d\"}\n").is_ok());
    }

    #[test]
    fn defaults_need_a_secret_in_token_mode() {
        let e = load("").unwrap_err();
        assert_eq!(e.key, "auth.secret");
        assert!(e.to_string().starts_with("t.yaml: auth.secret: token mode needs a secret"));
        let c = Config::from_yaml("t.yaml", "", |k| (k == SECRET_ENV).then(|| "s3".into())).unwrap();
        assert_eq!(c.auth.secret.as_deref(), Some("s3"));
        assert_eq!(c.upstream.read_timeout.0, Duration::from_secs(60));
        assert_eq!(c.upstream.resume_attempts, 3);
        assert_eq!(c.auth.session_ttl.0, Duration::from_secs(6 * 3600));
        assert_eq!(c.stream.chunk_size, 65536);
        assert_eq!(c.listen_addrs(), &["127.0.0.1:8080".parse().unwrap()]);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load("auth:\n  mode: none\n  colour: blue\n").unwrap_err();
        assert_eq!(e.key, "auth.colour");
        assert!(e.reason.contains("unknown field `colour`"), "{e}");
        assert!(e.to_string().starts_with("t.yaml: auth.colour: unknown field"), "{e}");
        let e = load("listn: 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `listn`"), "{e}");
    }

    /// The key (with the list index where there is one) and the reason
    /// (without the position in the file that follows it).
    fn refused(text: &str) -> (String, String) {
        let e = load(&format!("auth: {{mode: none}}\n{text}")).unwrap_err();
        let reason = match e.reason.rsplit_once(" at line ") {
            Some((r, _)) => r.to_string(),
            None => e.reason,
        };
        (e.key, reason)
    }

    #[test]
    fn a_byte_order_mark_and_crlf_line_ends_are_read() {
        let cfg = load("\u{feff}auth: {mode: none}\r\nlisten: \"127.0.0.1:8081\"\r\n").unwrap();
        assert_eq!(cfg.listen_addrs(), ["127.0.0.1:8081".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn a_line_indented_with_a_tab_is_named() {
        let e = load("listen: \"127.0.0.1:8081\"\nauth:\n\tmode: none\n").unwrap_err();
        assert!(e.reason.contains("(line 3 is indented with a tab: YAML takes spaces only)"), "{e}");
        let e = load("auth:\n  mode: none\nthreads: [\n").unwrap_err();
        assert!(!e.reason.contains("tab"), "{e}");
    }

    #[test]
    fn a_size_with_a_unit_says_how_sizes_are_written() {
        for (yaml, key) in [
            ("cache: {max_bytes: 128MiB}", "cache.max_bytes"),
            ("cache: {max_object_bytes: \"16m\"}", "cache.max_object_bytes"),
            ("stream: {chunk_size: 64k}", "stream.chunk_size"),
            ("stream: {max_playlist_bytes: 8e6}", "stream.max_playlist_bytes"),
        ] {
            let e = load(&format!("auth: {{mode: none}}\n{yaml}\n")).unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.reason.ends_with("(a size is a whole number of bytes: 134217728 for 128 MiB)"), "{yaml}: {e}");
        }
        let e = load("auth: {mode: none}\nthreads: lots\n").unwrap_err();
        assert!(e.key == "threads" && !e.reason.contains("bytes"), "a count is no size: {e}");
    }

    #[test]
    fn wrong_type_and_impossible_values() {
        let e = load("auth: {mode: none}\nthreads: lots\n").unwrap_err();
        assert_eq!(e.key, "threads", "{e}");
        assert_eq!(refused("upstream: {read_timeout: \"0s\"}\n").0, "upstream.read_timeout");
        assert_eq!(refused("upstream: {connect_timeout: 10}\n").0, "upstream.connect_timeout");
        let e = load("auth: {mode: none, session_ttl: \"0s\"}\n").unwrap_err();
        assert_eq!(e.key, "auth.session_ttl");
        assert!(e.reason.contains("children would expire"), "not called a timeout: {e}");
        let e = load("auth: {mode: none, token_ttl: \"500ms\"}\n").unwrap_err();
        assert_eq!(e.key, "auth.token_ttl", "exp is in whole seconds");
        assert_eq!(refused("stream: {chunk_size: 0}\n").0, "stream.chunk_size");
        assert!(refused("stream: {chunk_size: 16384}\n").1.contains("64 KiB"));
        assert_eq!(refused("stream: {chunk_size: 262145}\n").0, "stream.chunk_size");
        assert_eq!(load("auth: {mode: none}\nstream: {chunk_size: 262144}\n").unwrap().stream.chunk_size, 262144);
        assert_eq!(refused("upstream: {resume_attempts: 1000}\n").0, "upstream.resume_attempts");
        assert_eq!(refused("cache: {max_object_bytes: 0}\n").0, "cache.max_object_bytes");
        assert_eq!(refused("log: {format: xml}\n").0, "log.format");
        assert_eq!(refused("log: {trusted_proxies: [\"10.0.0.0/33\"]}\n").0, "log.trusted_proxies[0]");
        assert_eq!(refused("upstream: {queue_timeout: \"0s\"}\n").0, "upstream.queue_timeout");
        assert_eq!(refused("downstream: {header_timeout: \"0s\"}\n").0, "downstream.header_timeout");
        assert_eq!(refused("upstream: {max_cooldown: \"0s\"}\n").0, "upstream.max_cooldown");
        assert_eq!(refused("downstream: {keepalive_timeout: \"500ms\"}\n").0, "downstream.keepalive_timeout");
        let kept = load("auth: {mode: none}\ndownstream: {keepalive_timeout: \"2m\"}\n").unwrap();
        assert_eq!(kept.downstream.keepalive_timeout.0, Duration::from_secs(120));
        assert_eq!(kept.downstream.max_connections, None, "worked out at start");
        assert_eq!(refused("downstream: {max_connections: -1}\n").0, "downstream.max_connections");
        let unbounded = load("auth: {mode: none}\ndownstream: {max_connections: 0}\n").unwrap();
        assert_eq!(unbounded.downstream.max_connections, Some(0));
        assert_eq!(refused("upstream: {max_connections_per_host: -1}\n").0, "upstream.max_connections_per_host");
        assert_eq!(refused("providers: [{hosts: [a.com], max_connections: x}]\n").0, "providers[0].max_connections");
        assert_eq!(refused("cache: {max_bytes: 1000, max_object_bytes: 1001}\n").0, "cache.max_object_bytes");
        // Unset, it is 16 MiB, or all of a smaller max_bytes.
        let object =
            |yaml: &str| load(&format!("auth: {{mode: none}}\ncache: {yaml}\n")).unwrap().cache.max_object_bytes();
        assert_eq!(object("{}"), 16 << 20);
        assert_eq!(object("{max_bytes: 8388608}"), 8 << 20);
        assert_eq!(object("{max_bytes: 8388608, max_object_bytes: 1000000}"), 1_000_000);
        assert_eq!(object("{max_bytes: 1073741824, max_object_bytes: 104857600}"), 100 << 20);
        assert_eq!(refused("cache: {ttl: \"0s\"}\n").0, "cache.ttl");
        assert_eq!(refused("cache: {playlist_ttl: \"0s\"}\n").0, "cache.playlist_ttl");
        assert_eq!(refused("cache: {max_bytes: -1}\n").0, "cache.max_bytes");
        assert_eq!(refused("cache: {max_bytes: 18446744073709551615}\n").0, "cache.max_bytes");
        assert!(
            load("auth: {mode: none}\ncache: {max_bytes: 0, max_object_bytes: 0}\n").is_ok(),
            "off: the rest is unused"
        );
        let (key, reason) = refused("routes: [{prefix: /cdn/, upstream: \"ftp://x/\"}]\n");
        assert_eq!((key.as_str(), reason.as_str()), ("routes[0].upstream", "\"ftp://x/\" must be an http(s) URL"));
        let (key, reason) = refused("routes: [{prefix: /cdn/, upstream: \"http://x/?a=1\"}]\n");
        assert_eq!((key.as_str(), reason.as_str()), ("routes[0].upstream", "\"http://x/?a=1\" must not have a query"));
        // Never used: a fragment would swallow the path appended to it.
        let (key, reason) = refused("routes: [{prefix: /cdn/, upstream: \"http://x/base/#f\"}]\n");
        assert_eq!(
            (key.as_str(), reason.as_str()),
            ("routes[0].upstream", "\"http://x/base/#f\" must not have a fragment (#...)")
        );
        for key in ["public_base_url: \"https://x.example/a#", "resolver: {url: \"http://r/x#y"] {
            assert!(
                refused(&format!("{key}\"{}\n", if key.starts_with("res") { "}" } else { "" })).1.contains("fragment"),
                "{key}"
            );
        }
        let (key, reason) = refused("resolver: {url: \"http://anibridge:s3cret@r:8000/api\"}\n");
        assert_eq!(key, "resolver.url");
        assert!(reason.starts_with("http://r:8000/api must not hold credentials"), "{reason}");
        assert!(!reason.contains("s3cret") && !reason.contains("anibridge"), "never printed: {reason}");
        assert_eq!(refused("routes: [{prefix: /nas/, upstream: \"http://u@nas/\"}]\n").0, "routes[0].upstream");
        assert_eq!(refused("routes: [{prefix: cdn, upstream: \"http://x/\"}]\n").0, "routes[0].prefix");
        assert_eq!(refused("routes: [{prefix: /strm/x/, upstream: \"http://x/\"}]\n").0, "routes[0].prefix");
        for never in ["/my cdn/", "/ä/", "/a?b/", "/a#b/", "/a%2/", "/a%zz/", "/../", "/a/./b/"] {
            let (key, reason) = refused(&format!("routes: [{{prefix: \"{never}\", upstream: \"http://x/\"}}]\n"));
            assert_eq!(key, "routes[0].prefix", "{never}");
            assert!(reason.contains("can never match a request path"), "{never}: {reason}");
        }
        for fine in ["/my%20cdn/", "/a-b_c.d~e/", "/v1/media/", "/a:b@c/"] {
            assert!(
                load(&format!("auth: {{mode: none}}\nroutes: [{{prefix: \"{fine}\", upstream: \"http://x/\"}}]\n"))
                    .is_ok(),
                "{fine}"
            );
        }
        assert_eq!(refused("egress: {allow_cidrs: [\"10.0.0.0/33\"]}\n").0, "egress.allow_cidrs[0]");
        assert_eq!(refused("egress: {allow_cidrs: [\"10.0.0\"]}\n").0, "egress.allow_cidrs[0]");
        // Host bits set: refused with both readings, never widened silently.
        let (key, reason) = refused("egress: {allow_cidrs: [\"127.0.0.0/8\", \"192.168.1.10/24\"]}\n");
        assert_eq!(key, "egress.allow_cidrs[1]");
        assert!(reason.contains("192.168.1.0/24") && reason.contains("192.168.1.10 for that one"), "{reason}");
        let (key, reason) = refused("log: {trusted_proxies: [\"fd00::1/64\"]}\n");
        assert_eq!(key, "log.trusted_proxies[0]");
        assert!(reason.contains("fd00::/64"), "{reason}");
        // One address is the range of that address alone.
        let c = load("auth: {mode: none}\negress: {allow_cidrs: [\"10.0.0.5\", \"::1\"]}\nlog: {trusted_proxies: [\"172.17.0.1\"]}\n")
            .unwrap();
        assert_eq!(c.egress.allow_cidrs[0].0, "10.0.0.5/32".parse::<IpNet>().unwrap());
        assert_eq!(c.egress.allow_cidrs[1].0, "::1/128".parse::<IpNet>().unwrap());
        assert_eq!(c.log.trusted_proxies[0].0, "172.17.0.1/32".parse::<IpNet>().unwrap());
        assert_eq!(refused("egress: {deny_hosts: [\"a.*.b\"]}\n").0, "egress.deny_hosts[0]");
        let e = load("auth: {mode: sometimes}\n").unwrap_err();
        assert_eq!(e.key, "auth.mode", "{e}");
        let (key, reason) = refused("listen: \"nowhere\"\n");
        assert_eq!(
            (key.as_str(), reason.as_str()),
            ("listen", "\"nowhere\" is not an IP:port address (e.g. \"127.0.0.1:8080\") (at line 2)")
        );
        // What people write for "every address on port 8080", told how to say it.
        for (yaml, key) in [
            ("listen: 8080\n", "listen"),
            ("listen: \":8080\"\n", "listen"),
            ("listen: [\"127.0.0.1:8081\", \"localhost:8080\"]\n", "listen"),
            ("admin_listen: \":8080\"\n", "admin_listen"),
        ] {
            let (k, reason) = refused(yaml);
            assert_eq!(k, key, "{yaml}");
            assert!(
                reason.contains("write \"127.0.0.1:8080\" (this machine only) or \"0.0.0.0:8080\""),
                "{yaml}: {reason}"
            );
        }
        assert!(refused("listen: -1\n").1.contains("-1 is not an IP:port address"));
        assert!(load("auth: {mode: none}\nlisten: \" 127.0.0.1:8081 \"\n").is_ok(), "spaces around are tolerated");
        let e = load("auth: {mode: none}\nthreads: 2\npublic_base_url: \"/relative\"\n").unwrap_err();
        assert!(e.to_string().ends_with("(at line 3)"), "the line of a value checked after parsing: {e}");
        // Broken YAML names no key, and says so.
        for broken in ["auth: {mode: none}\n- x\n", "{\n", "auth: {mode: none}\n: x\n"] {
            let e = load(broken).unwrap_err();
            assert_eq!(e.key, "", "{broken:?}: {e}");
            assert!(e.reason.starts_with("not valid YAML: ") && e.reason.contains(" at line "), "{e}");
        }
        let e = load("auth: {mode: none}\nroutes: [{prefix: /cdn/, upstream: \"ftp://x/\"}]\n").unwrap_err();
        assert!(e.to_string().ends_with("at line 2 column 10"), "the position in the file is named: {e}");
        assert_eq!(refused("listen: []\n").0, "listen");
        assert_eq!(refused("listen: [\"127.0.0.1:1\", \"x\"]\n").0, "listen");
        assert_eq!(refused("admin_listen: \"x:1\"\n").0, "admin_listen");
        for same in ["127.0.0.1:8080", "0.0.0.0:8080", "[::]:8080"] {
            let (key, reason) =
                refused(&format!("listen: [\"[::1]:1\", \"127.0.0.1:8080\"]\nadmin_listen: \"{same}\"\n"));
            assert_eq!(key, "admin_listen", "{same}");
            assert!(reason.contains("overlaps the proxy listener 127.0.0.1:8080"), "{reason}");
        }
        for (listen, reason) in [
            ("[\"127.0.0.1:8080\", \"127.0.0.1:8080\"]", "127.0.0.1:8080 listed twice"),
            ("[\"0.0.0.0:8080\", \"127.0.0.1:8080\"]", "127.0.0.1:8080 overlaps 0.0.0.0:8080"),
            ("[\"[::1]:8080\", \"[::]:8080\"]", "[::]:8080 overlaps [::1]:8080"),
        ] {
            let e = load(&format!("listen: {listen}\nauth: {{mode: none, allow_open: true}}\n")).unwrap_err();
            assert_eq!((e.key.as_str(), e.reason), ("listen", format!("{reason}: one address per port and family")));
        }
        let dual = "auth: {mode: none, allow_open: true}\nlisten: [\"0.0.0.0:8080\", \"[::]:8080\", \"127.0.0.1:9\"]\n";
        assert!(load(dual).is_ok(), "IPv4 and IPv6 on one port: the IPv6 listener is bound v6-only");
        let apart = "auth: {mode: none}\nlisten: \"127.0.0.1:8080\"\nadmin_listen: \"127.0.0.2:8080\"\n";
        assert!(load(apart).is_ok(), "another address on the same port");
        let (key, reason) = refused("routes: [{prefix: /a/, upstream: \"http://x/\"}, {prefix: /b/, upstream: \"http://y/\"}, {prefix: /a/, upstream: \"http://z/\"}]\n");
        assert_eq!(
            (key.as_str(), reason.as_str()),
            ("routes", "routes[0] and routes[2] have the same prefix \"/a/\": one would never be used")
        );
        let (key, reason) = refused(
            "routes: [{prefix: /a/, upstream: \"http://x/\"}, {prefix: /b/, upstream: \"http://localhost:8080/b/\"}]\n",
        );
        assert_eq!(
            (key.as_str(), reason.as_str()),
            ("routes", "routes[1].upstream http://localhost:8080/b/ is this proxy's own listener 127.0.0.1:8080")
        );
        let own = |more: &str| load(&format!("auth: {{mode: none, allow_open: true}}\n{more}")).map_err(|e| e.key);
        let any = "listen: \"0.0.0.0:8080\"\n";
        assert_eq!(own(&format!("{any}resolver: {{url: \"http://127.0.0.2:8080/r\"}}\n")).unwrap_err(), "resolver.url");
        assert_eq!(
            own("resolver: {url: \"http://[::1]:9090/r\"}\nadmin_listen: \"[::]:9090\"\n").unwrap_err(),
            "resolver.url"
        );
        assert!(own("resolver: {url: \"http://127.0.0.1:8081/r\"}\n").is_ok(), "another port");
        assert!(own(&format!("{any}resolver: {{url: \"http://10.0.0.5:8080/r\"}}\n")).is_ok(), "maybe another machine");
        assert!(own("resolver: {url: \"http://127.0.0.2:8080/r\"}\n").is_ok(), "the listener is on 127.0.0.1 only");
        // Of two listeners on one port, the one the URL names.
        let (_, reason) =
            refused("listen: [\"127.0.0.1:8080\", \"127.0.0.2:8080\"]\nresolver: {url: \"http://127.0.0.2:8080/r\"}\n");
        assert!(reason.starts_with("127.0.0.2:8080 is this proxy's own listener"), "{reason}");
        assert_eq!(refused("public_base_url: \"/relative\"\n").0, "public_base_url");
        assert_eq!(refused("resolver: {url: \"file:///etc/passwd\"}\n").0, "resolver.url");
        assert_eq!(refused("upstream: {user_agent: \"a\\nb\"}\n").0, "upstream.user_agent");
        let (key, reason) = refused("providers: [{hosts: [a.com], headers: {\"Bad Name\": x}}]\n");
        assert_eq!((key.as_str(), reason.as_str()), ("providers[0].headers", "bad header name \"Bad Name\""));
        let (key, reason) = refused("providers: [{hosts: [a.com], headers: {Referer: \"x\\ny\"}}]\n");
        assert_eq!((key.as_str(), reason.as_str()), ("providers[0].headers", "bad value for header Referer"));
        for (name, why) in [
            ("Host", "the proxy sends the upstream URL's host"),
            ("content-length", "the proxy sends no request body"),
            ("Connection", "it is hop-by-hop and never goes upstream"),
            ("Proxy-Authorization", "it is hop-by-hop and never goes upstream"),
            ("Range", "each request's range and conditionals are the client's own"),
            ("If-Range", "each request's range and conditionals are the client's own"),
            ("If-None-Match", "each request's range and conditionals are the client's own"),
            ("If-Modified-Since", "each request's range and conditionals are the client's own"),
            ("Accept-Encoding", "the proxy asks for identity, so bodies stay byte for byte"),
        ] {
            let (key, reason) =
                refused(&format!("providers: [{{hosts: [a.com], headers: {{Referer: r, {name}: x}}}}]\n"));
            assert_eq!((key.as_str(), reason), ("providers[0].headers", format!("{name:?} cannot be set here: {why}")));
        }
        assert_eq!(refused("providers: [{hosts: [], headers: {}}]\n").0, "providers[0].hosts");
        let second = "providers: [{hosts: [a.example]}, {hosts: []}]\n";
        assert_eq!(refused(second).0, "providers[1].hosts");
    }

    #[test]
    fn typed_values_are_parsed_once() {
        let c = load(
            "auth: {mode: none}\nlisten: [\"127.0.0.1:1\", \"[::1]:2\"]\negress: {allow_cidrs: [\"127.0.0.0/8\"], deny_hosts: [\"*.internal\"]}\n\
             providers: [{hosts: [\"*\"], headers: {Referer: r, Origin: o}}]\nroutes: [{prefix: /cdn/, upstream: \"http://10.0.0.5:8080/base\"}]\n",
        )
        .unwrap();
        assert_eq!(c.listen_addrs().len(), 2);
        assert_eq!(c.egress.allow_cidrs[0].0, "127.0.0.0/8".parse::<IpNet>().unwrap());
        assert!(c.egress.deny_hosts[0].matches("db.internal"));
        assert!(c.providers[0].hosts[0].matches("any.example"));
        let names: Vec<&[u8]> = c.providers[0].headers.0.iter().map(|h| &h.spelling[..]).collect();
        assert_eq!(names, [&b"Referer"[..], b"Origin"]);
        assert_eq!(c.routes[0].upstream.0.as_str(), "http://10.0.0.5:8080/base");
        assert!(c.routes[0].auth);
    }

    #[test]
    fn cors_origins_must_be_origins() {
        for good in
            ["*", "https://app.example", "https://app.example/", "http://127.0.0.1:8096", "capacitor://localhost"]
        {
            let cfg = format!("auth: {{mode: none}}\ncors: {{allow_origins: [\"{good}\"]}}\n");
            assert!(load(&cfg).is_ok(), "{good}");
        }
        // Kept as browsers send `Origin`, which is what a request is matched against.
        for (written, sent) in [
            ("https://App.Example:443/", "https://app.example"),
            ("http://127.0.0.1:80", "http://127.0.0.1"),
            ("http://[::1]:8096", "http://[::1]:8096"),
            ("https://bücher.example", "https://xn--bcher-kva.example"),
            ("capacitor://localhost", "capacitor://localhost"),
        ] {
            let cfg = format!("auth: {{mode: none}}\ncors: {{allow_origins: [\"{written}\"]}}\n");
            assert_eq!(load(&cfg).unwrap().cors.allow_origins, [AllowedOrigin(sent.into())], "{written}");
        }
        for bad in [
            "not an origin",
            "app.example",
            "https://app.example/player",
            "https://app.example?x=1",
            "https://u@app.example",
            "https://app.example//",
            "null",
            "",
        ] {
            let cfg = format!("auth: {{mode: none}}\ncors: {{allow_origins: [\"{bad}\"]}}\n");
            let e = load(&cfg).unwrap_err();
            assert_eq!(e.key, "cors.allow_origins[0]", "{bad}: {e}");
            assert!(e.to_string().contains("is not an origin"), "{e}");
        }
    }

    #[test]
    fn egress_proxies() {
        let c = load(
            "auth: {mode: none}\negress: {proxies: [{hosts: [\"*.debrid.example\"], url: \"socks5://u%40x:p%3Aw@127.0.0.1:1080\"}, \
             {hosts: [\"*\"], url: \"http://[::1]:3128\"}, {hosts: [a.b], url: \"socks5h://gluetun\"}]}\n",
        )
        .unwrap();
        let p = &c.egress.proxies;
        assert_eq!(p[0].url.kind, ProxyKind::Socks5);
        let creds = p[0].url.credentials.as_ref().unwrap();
        assert_eq!((creds.user.as_str(), creds.password.as_str()), ("u@x", "p:w"));
        assert_eq!(p[0].url.name(), "socks5://127.0.0.1:1080");
        assert!(!format!("{:?}", p[0]).contains("p:w"), "Debug never shows the password");
        assert_eq!(p[1].url.name(), "http://[::1]:3128");
        assert_eq!(ProxyUrl::parse("http://h:80").unwrap().port, 80);
        assert_eq!((p[2].url.kind, p[2].url.port), (ProxyKind::Socks5h, 1080));
        for (url, why) in [
            ("ftp://h:1", "unsupported scheme"),
            ("socks5://:1080", "host"),
            ("http://h", "needs a port"),
            ("http://h:80x", "not a URL"),
            ("socks5://user@h:1", "user:password"),
            ("socks5://h:1/path", "nothing after the port"),
        ] {
            let (key, reason) = refused(&format!("egress: {{proxies: [{{hosts: [\"*\"], url: \"{url}\"}}]}}\n"));
            assert_eq!(key, "egress.proxies[0].url", "{url}");
            assert!(reason.contains(why), "{url}: {reason}");
        }
        assert_eq!(refused("egress: {proxies: [{hosts: [], url: \"socks5://h:1\"}]}\n").0, "egress.proxies[0].hosts");
        // Credentials from the environment (or a file it names).
        let yaml =
            "auth: {mode: none}\negress: {proxies: [{hosts: [\"*\"], url: \"socks5://h:1\", credentials_env: WARP}]}\n";
        let c = Config::from_yaml("t.yaml", yaml, |k| (k == "WARP").then(|| "me:secret".into())).unwrap();
        assert_eq!(c.egress.proxies[0].url.credentials.as_ref().unwrap().password, "secret");
        let e = Config::from_yaml("t.yaml", yaml, |_| None).unwrap_err();
        assert_eq!(e.key, "egress.proxies[0].credentials_env");
        assert!(e.reason.contains("WARP"), "{e}");
        let e = Config::from_yaml("t.yaml", yaml, |k| (k == "WARP").then(|| "no-colon".into())).unwrap_err();
        assert!(e.reason.contains("user:password") && !e.reason.contains("no-colon"), "{e}");
    }

    #[test]
    fn open_mode_only_on_loopback() {
        assert!(load("auth: {mode: none}\n").is_ok());
        let e = load("listen: \"0.0.0.0:8080\"\nauth: {mode: none}\n").unwrap_err();
        assert_eq!(e.key, "auth.mode");
        assert!(load("listen: [\"0.0.0.0:8080\"]\nauth: {mode: none, allow_open: true}\n").is_ok());
    }

    #[test]
    fn secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "from-a-file\n").unwrap();
        let path = f.display().to_string();
        let c =
            Config::from_yaml("t.yaml", "", |k| (k == "ANIBRIDGE_PROXY_SECRET_FILE").then(|| path.clone())).unwrap();
        assert_eq!(c.auth.secret.as_deref(), Some("from-a-file"));
        let e =
            Config::from_yaml("t.yaml", "", |k| (k == "ANIBRIDGE_PROXY_SECRET_FILE").then(|| "/nonexistent/s".into()))
                .unwrap_err();
        assert_eq!(e.key, "auth.secret");
        assert!(e.reason.contains("ANIBRIDGE_PROXY_SECRET_FILE"), "{e}");
        std::fs::write(&f, "\n").unwrap();
        assert!(
            Config::from_yaml("t.yaml", "", |k| (k == "ANIBRIDGE_PROXY_SECRET_FILE").then(|| path.clone())).is_err()
        );
    }

    #[test]
    fn apikey_mode_needs_a_key() {
        let e = load("auth: {mode: apikey}\n").unwrap_err();
        assert_eq!(e.key, "auth.api_key");
        assert!(load("auth: {mode: apikey, api_key: k}\n").is_ok());
    }

    #[test]
    fn shipped_default_config_is_valid() {
        let text = include_str!("../conf/anibridge-proxy.yaml");
        let c = Config::from_yaml("conf/anibridge-proxy.yaml", text, |_| None).unwrap();
        assert_eq!(c.listen_addrs(), &["127.0.0.1:8080".parse().unwrap()]);
    }

    proptest::proptest! {
        /// Loading never panics, whatever the text: it is a config or an
        /// error naming the file.
        #[test]
        fn loading_never_panics(text in "[ -~\\n]{0,200}") {
            if let Err(e) = load(&text) {
                proptest::prop_assert!(e.to_string().starts_with("t.yaml"));
            }
        }

        #[test]
        fn durations_round_trip(n in 0u64..1_000_000, unit in proptest::sample::select(vec!["ms", "s", "m", "h"])) {
            let d = parse_duration(&format!("{n}{unit}")).unwrap();
            let ms = match unit { "ms" => n, "s" => n * 1000, "m" => n * 60_000, _ => n * 3_600_000 };
            proptest::prop_assert_eq!(d, Duration::from_millis(ms));
        }
    }
}
