//! What every request shares, built once from a loaded [`Config`] (which
//! holds its values parsed and checked already, so this cannot fail).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::live::Streams;
use super::verified::Verified;
use crate::access;
use crate::auth::Auth;
use crate::cache::{self, Cache};
use crate::config::Config;
use crate::cors::Cors;
use crate::egress::Egress;
use crate::gate;
use crate::hosts::HostTable;
use crate::metrics::{Metrics, RouteLabel};
use crate::providers::Providers;
use crate::resolver::Resolver;
use crate::routing::Route;
use crate::tunnel::EgressProxies;
use crate::upstream::{Client, Settings, Timeouts};

pub struct State {
    pub auth: Auth,
    pub client: Client,
    pub routes: Vec<Route>,
    pub cors: Cors,
    /// `public_base_url` without its trailing `/`; empty: root-relative.
    pub public_base: String,
    pub max_playlist_bytes: usize,
    pub downstream_write_timeout: Duration,
    /// Whole seconds an idle keep-alive client connection is kept.
    pub downstream_keepalive_secs: u64,
    pub resolver: Option<Resolver>,
    /// The shared cache (`None`: `cache.max_bytes: 0`).
    pub cache: Option<Cache>,
    pub metrics: Arc<Metrics>,
    /// `log.format` and `log.trusted_proxies`.
    pub log_format: access::Format,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The streams being relayed now (for the shutdown report).
    pub streams: Streams,
    /// Relay queries already checked (token mode and auth off).
    pub verified: Verified,
}

impl State {
    /// The `route` of an access line: `relay`, `stream`, a route's prefix, ...
    pub fn route_name(&self, label: RouteLabel, index: Option<usize>) -> &str {
        match index.and_then(|i| self.routes.get(i)) {
            Some(r) => &r.prefix,
            None => label.as_str(),
        }
    }

    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> State {
        // Never dialled, by the upstream client or the resolver's.
        let own_listeners: Arc<[SocketAddr]> = cfg.all_listeners().into();
        let settings = Settings {
            egress: Egress::new(cfg.egress.allow_cidrs.iter().map(|c| c.0).collect(), cfg.egress.deny_hosts.clone()),
            providers: Providers::new(&cfg.providers),
            timeouts: Timeouts {
                connect: cfg.upstream.connect_timeout.0,
                read: cfg.upstream.read_timeout.0,
                write: cfg.upstream.write_timeout.0,
            },
            max_redirects: cfg.upstream.max_redirects,
            default_ua: cfg.upstream.user_agent.as_ref().map(|v| v.0.clone()),
            pool_size: 128 * cfg.threads,
            resume_attempts: cfg.upstream.resume_attempts,
            proxies: EgressProxies::new(&cfg.egress.proxies),
            gate: gate::Settings {
                per_host: cfg.upstream.max_connections_per_host,
                providers: HostTable::new(cfg.providers.iter().map(|p| (p.hosts.clone(), p.max_connections))),
                queue_timeout: cfg.upstream.queue_timeout.0,
                max_cooldown: cfg.upstream.max_cooldown.0,
                quiet: gate::QUIET,
            },
            own_listeners: own_listeners.clone(),
        };
        State {
            auth: Auth::new(
                cfg.auth.mode,
                cfg.auth.secret.as_deref(),
                cfg.auth.api_key.as_deref(),
                cfg.auth.token_ttl.0.as_secs().max(1),
                cfg.auth.session_ttl.0.as_secs().max(1),
            ),
            client: Client::new(settings, Some(metrics.clone())),
            routes: cfg.routes.iter().map(|r| Route::new(&r.prefix.0, r.upstream.0.clone(), r.auth)).collect(),
            cors: Cors::new(cfg.cors.allow_origins.iter().map(|o| o.0.as_str())),
            public_base: cfg
                .public_base_url
                .as_ref()
                .map_or(String::new(), |b| b.0.as_str().trim_end_matches('/').into()),
            max_playlist_bytes: cfg.stream.max_playlist_bytes,
            downstream_write_timeout: cfg.downstream.write_timeout.0,
            downstream_keepalive_secs: cfg.downstream.keepalive_timeout.0.as_secs(),
            resolver: cfg
                .resolver
                .url
                .as_ref()
                .map(|u| Resolver::new(u.0.clone(), cfg.resolver.timeout.0, cfg.resolver.cache_entries, own_listeners)),
            cache: Cache::new(
                cache::Settings {
                    max_bytes: cfg.cache.max_bytes,
                    max_object_bytes: cfg.cache.max_object_bytes(),
                    lifetimes: cache::policy::Lifetimes {
                        ttl: cfg.cache.ttl.0,
                        playlist_ttl: cfg.cache.playlist_ttl.0,
                    },
                    chunk: cfg.stream.chunk_size,
                    max_playlist: cfg.stream.max_playlist_bytes,
                },
                metrics.clone(),
            ),
            metrics,
            log_format: cfg.log.format,
            trusted_proxies: cfg.log.trusted_proxies.iter().map(|c| c.0).collect(),
            streams: Streams::default(),
            verified: Verified::new(cfg.auth.mode),
        }
    }
}
