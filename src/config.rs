//! YAML configuration: every key defaulted, unknown keys and impossible values
//! refused at start with the file, the key and the reason.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::Deserialize;

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

/// A duration written with a unit: `"500ms"`, `"10s"`, `"15m"`, `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

/// Parses `<integer><unit>` with unit `ms`, `s`, `m` or `h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split =
        s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("duration {s:?} must start with a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("duration {s:?} has unknown unit {unit:?} (ms, s, m, h)")),
    }
    .ok_or_else(|| format!("duration {s:?} is too large"))?;
    Ok(Duration::from_millis(ms))
}

/// One address or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Token,
    Apikey,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConf {
    pub mode: AuthMode,
    pub secret: Option<String>,
    pub api_key: Option<String>,
    pub token_ttl: Dur,
    pub allow_open: bool,
}

impl Default for AuthConf {
    fn default() -> Self {
        Self {
            mode: AuthMode::Token,
            secret: None,
            api_key: None,
            token_ttl: Dur(Duration::from_secs(15 * 60)),
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
    pub user_agent: Option<String>,
}

impl Default for UpstreamConf {
    fn default() -> Self {
        Self {
            connect_timeout: Dur(Duration::from_secs(10)),
            read_timeout: Dur(Duration::from_secs(60)),
            write_timeout: Dur(Duration::from_secs(30)),
            max_redirects: 5,
            user_agent: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamConf {
    pub write_timeout: Dur,
}

impl Default for DownstreamConf {
    fn default() -> Self {
        Self { write_timeout: Dur(Duration::from_secs(60)) }
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

/// Pingora's upstream body buffer (`BODY_BUFFER_SIZE`), the size of every relay read.
pub const MIN_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConf {
    pub allow_cidrs: Vec<String>,
    pub deny_hosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConf {
    pub url: Option<String>,
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
    pub allow_origins: Vec<String>,
}

impl Default for CorsConf {
    fn default() -> Self {
        Self { allow_origins: vec!["*".into()] }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConf {
    pub hosts: Vec<String>,
    /// In the order written: they go upstream in that order.
    #[serde(default)]
    pub headers: indexmap::IndexMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConf {
    pub prefix: String,
    pub upstream: String,
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
    pub listen: OneOrMany,
    pub admin_listen: String,
    pub threads: usize,
    pub public_base_url: Option<String>,
    pub shutdown_grace: Dur,
    pub auth: AuthConf,
    pub upstream: UpstreamConf,
    pub downstream: DownstreamConf,
    pub stream: StreamConf,
    pub egress: EgressConf,
    pub resolver: ResolverConf,
    pub cors: CorsConf,
    pub providers: Vec<ProviderConf>,
    pub routes: Vec<RouteConf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: OneOrMany::One("127.0.0.1:8080".into()),
            admin_listen: "127.0.0.1:9090".into(),
            threads: 2,
            public_base_url: None,
            shutdown_grace: Dur(Duration::from_secs(30)),
            auth: AuthConf::default(),
            upstream: UpstreamConf::default(),
            downstream: DownstreamConf::default(),
            stream: StreamConf::default(),
            egress: EgressConf::default(),
            resolver: ResolverConf::default(),
            cors: CorsConf::default(),
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
        // An empty file (or one with only comments) means all defaults.
        let mut cfg: Config =
            if text.trim().is_empty() || text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
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
                    err(if key == "." { "" } else { &key }, reason)
                })?
            };
        if cfg.auth.secret.is_none() {
            cfg.auth.secret = from_env(&env, SECRET_ENV).map_err(|r| err("auth.secret", r))?;
        }
        if cfg.auth.api_key.is_none() {
            cfg.auth.api_key = from_env(&env, API_KEY_ENV).map_err(|r| err("auth.api_key", r))?;
        }
        cfg.validate().map_err(|(key, reason)| err(key, reason))?;
        Ok(cfg)
    }

    /// Listener addresses, parsed.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        let list = match &self.listen {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        list.iter().filter_map(|s| s.parse().ok()).collect()
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let listens = match &self.listen {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        if listens.is_empty() {
            return Err(("listen", "needs at least one address".into()));
        }
        for l in &listens {
            l.parse::<SocketAddr>().map_err(|_| ("listen", format!("{l:?} is not an IP:port address")))?;
        }
        self.admin_listen
            .parse::<SocketAddr>()
            .map_err(|_| ("admin_listen", format!("{:?} is not an IP:port address", self.admin_listen)))?;
        if self.threads == 0 || self.threads > 1024 {
            return Err(("threads", "must be between 1 and 1024".into()));
        }
        if let Some(base) = &self.public_base_url {
            let u = url::Url::parse(base).map_err(|e| ("public_base_url", format!("{base:?} is not a URL: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") || u.query().is_some() {
                return Err(("public_base_url", "must be an http(s) URL without a query".into()));
            }
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
        if self.shutdown_grace.0 > Duration::from_secs(3600) {
            return Err(("shutdown_grace", "must be at most 1h".into()));
        }
        if self.auth.token_ttl.0.is_zero() {
            return Err(("auth.token_ttl", "must be greater than 0".into()));
        }
        for (key, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.read_timeout", self.upstream.read_timeout),
            ("upstream.write_timeout", self.upstream.write_timeout),
            ("downstream.write_timeout", self.downstream.write_timeout),
            ("resolver.timeout", self.resolver.timeout),
        ] {
            if d.0.is_zero() {
                return Err((key, "must be greater than 0 (timeouts cannot be disabled)".into()));
            }
        }
        if self.upstream.max_redirects > 20 {
            return Err(("upstream.max_redirects", "must be at most 20".into()));
        }
        if let Some(ua) = &self.upstream.user_agent {
            if http::HeaderValue::from_str(ua).is_err() {
                return Err(("upstream.user_agent", "is not a valid header value".into()));
            }
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
        for c in &self.egress.allow_cidrs {
            c.parse::<IpNet>().map_err(|_| ("egress.allow_cidrs", format!("{c:?} is not a CIDR (e.g. 10.0.0.0/8)")))?;
        }
        for h in &self.egress.deny_hosts {
            crate::egress::HostPattern::parse(h).map_err(|r| ("egress.deny_hosts", format!("{h:?}: {r}")))?;
        }
        if let Some(u) = &self.resolver.url {
            let parsed = url::Url::parse(u).map_err(|e| ("resolver.url", format!("{u:?} is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(("resolver.url", "must be an http or https URL".into()));
            }
        }
        if self.resolver.cache_entries == 0 {
            return Err(("resolver.cache_entries", "must be at least 1".into()));
        }
        for o in &self.cors.allow_origins {
            if o != "*" && !is_origin(o) {
                return Err((
                    "cors.allow_origins",
                    format!("{o:?} is not an origin (\"*\" or scheme://host[:port], as browsers send it)"),
                ));
            }
        }
        for p in &self.providers {
            if p.hosts.is_empty() {
                return Err(("providers.hosts", "each provider needs at least one host".into()));
            }
            for h in &p.hosts {
                crate::egress::HostPattern::parse(h).map_err(|r| ("providers.hosts", format!("{h:?}: {r}")))?;
            }
            crate::headers::parse_pairs(p.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|e| ("providers.headers", e))?;
        }
        for r in &self.routes {
            if !r.prefix.starts_with('/') || !r.prefix.ends_with('/') {
                return Err(("routes.prefix", format!("{:?} must start and end with '/'", r.prefix)));
            }
            if r.prefix.starts_with("/strm/") || r.prefix == "/" {
                return Err(("routes.prefix", format!("{:?} would shadow the built-in routes", r.prefix)));
            }
            let u = url::Url::parse(&r.upstream)
                .map_err(|e| ("routes.upstream", format!("{:?} is not a URL: {e}", r.upstream)))?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(("routes.upstream", format!("{:?} must be an http(s) URL", r.upstream)));
            }
            if u.query().is_some() {
                return Err(("routes.upstream", format!("{:?} must not have a query", r.upstream)));
            }
        }
        Ok(())
    }
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
        && url::Url::parse(bare).is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()))
        && http::HeaderValue::from_str(bare).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml("t.yaml", text, |_| None)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
    }

    #[test]
    fn defaults_need_a_secret_in_token_mode() {
        let e = load("").unwrap_err();
        assert_eq!(e.key, "auth.secret");
        assert!(e.to_string().starts_with("t.yaml: auth.secret: token mode needs a secret"));
        let c = Config::from_yaml("t.yaml", "", |k| (k == SECRET_ENV).then(|| "s3".into())).unwrap();
        assert_eq!(c.auth.secret.as_deref(), Some("s3"));
        assert_eq!(c.upstream.read_timeout.0, Duration::from_secs(60));
        assert_eq!(c.stream.chunk_size, 65536);
        assert_eq!(c.listen_addrs(), vec!["127.0.0.1:8080".parse().unwrap()]);
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

    #[test]
    fn wrong_type_and_impossible_values() {
        let e = load("auth: {mode: none}\nthreads: lots\n").unwrap_err();
        assert_eq!(e.key, "threads", "{e}");
        let e = load("auth: {mode: none}\nupstream: {read_timeout: \"0s\"}\n").unwrap_err();
        assert_eq!(e.key, "upstream.read_timeout");
        let e = load("auth: {mode: none}\nupstream: {connect_timeout: 10}\n").unwrap_err();
        assert_eq!(e.key, "upstream.connect_timeout", "{e}");
        let e = load("auth: {mode: none}\nstream: {chunk_size: 0}\n").unwrap_err();
        assert_eq!(e.key, "stream.chunk_size");
        let e = load("auth: {mode: none}\nstream: {chunk_size: 16384}\n").unwrap_err();
        assert!(e.to_string().contains("64 KiB"), "{e}");
        let e = load("auth: {mode: none}\nstream: {chunk_size: 262145}\n").unwrap_err();
        assert_eq!(e.key, "stream.chunk_size");
        assert_eq!(load("auth: {mode: none}\nstream: {chunk_size: 262144}\n").unwrap().stream.chunk_size, 262144);
        let e = load("auth: {mode: none}\nroutes: [{prefix: /cdn/, upstream: \"ftp://x/\"}]\n").unwrap_err();
        assert_eq!(e.key, "routes.upstream");
        let e = load("auth: {mode: none}\negress: {allow_cidrs: [\"10.0.0.0/33\"]}\n").unwrap_err();
        assert_eq!(e.key, "egress.allow_cidrs");
        let e = load("auth: {mode: sometimes}\n").unwrap_err();
        assert_eq!(e.key, "auth.mode", "{e}");
        let e = load("auth: {mode: none}\nlisten: \"nowhere\"\n").unwrap_err();
        assert_eq!(e.key, "listen");
        let e = load("auth: {mode: none}\nproviders: [{hosts: [a.com], headers: {\"Bad Name\": x}}]\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.reason.as_str()), ("providers.headers", "bad header name \"Bad Name\""));
        let e = load("auth: {mode: none}\nproviders: [{hosts: [a.com], headers: {Referer: \"x\\ny\"}}]\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.reason.as_str()), ("providers.headers", "bad value for header Referer"));
    }

    #[test]
    fn cors_origins_must_be_origins() {
        for good in
            ["*", "https://app.example", "https://app.example/", "http://127.0.0.1:8096", "capacitor://localhost"]
        {
            let cfg = format!("auth: {{mode: none}}\ncors: {{allow_origins: [\"{good}\"]}}\n");
            assert!(load(&cfg).is_ok(), "{good}");
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
            assert_eq!(e.key, "cors.allow_origins", "{bad}: {e}");
            assert!(e.to_string().contains("is not an origin"), "{e}");
        }
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
        let dir = std::env::temp_dir().join(format!("anibridge-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
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
        std::fs::remove_dir_all(&dir).unwrap();
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
        assert_eq!(c.listen_addrs(), vec!["127.0.0.1:8080".parse().unwrap()]);
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
