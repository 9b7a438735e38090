//! Assembling the Pingora server from a [`Config`]: the proxy listener(s),
//! the admin listener, and shutdown. Also an embedded mode that serves on
//! an already-bound socket, for tests and benchmarks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora::services::listening::Service;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::admin::Admin;
use crate::config::{AuthMode, Cidr, Config};
use crate::connections::{bound, too_high, Connections};
use crate::header_guard::HeaderGuard;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, State};

/// Per-connection downstream read buffer: none. Pingora parses request
/// headers in a buffer of its own, and bodies are not proxied, so a second
/// buffer in front of the socket would only copy bytes and hold memory
/// (Pingora's default is 64 KiB per connection; BENCHMARKS.md).
const DOWNSTREAM_READ_BUFFER: usize = 0;
/// Per-connection downstream write buffer: room for the response header
/// plus the body bytes that arrived with the upstream header (Pingora reads
/// headers 4 KiB at a time), so both leave in one send. The relay flushes it
/// whenever it would wait for upstream (`flush_down` in `proxy/relay.rs`),
/// so nothing is held back from a trickling upstream (BENCHMARKS.md has
/// what this saved).
const DOWNSTREAM_WRITE_BUFFER: usize = 8 * 1024;

/// The configured route prefixes (the `route` labels of static routes).
fn route_prefixes(cfg: &Config) -> Vec<&str> {
    cfg.routes.iter().map(|r| r.prefix.0.as_str()).collect()
}

/// Pingora's HTTP application around `proxy`. `CONNECT` is let through to
/// the proxy, which answers it as any method it does not serve (405 with
/// `Allow`, an access line); Pingora's own answer to it is a bare 405.
fn http_app(conf: &Arc<ServerConf>, proxy: Proxy) -> pingora::proxy::HttpProxy<Proxy> {
    let mut app = pingora::proxy::http_proxy(conf, proxy);
    let mut options = pingora::apps::HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    app.server_options = Some(options);
    app
}

/// Builds the proxy application for a loaded config.
pub fn build(cfg: &Config, metrics: Arc<Metrics>) -> Proxy {
    Proxy::new(Arc::new(State::new(cfg, metrics)))
}

/// Whether every listener can be bound now. Pingora, asked to listen on a
/// busy address, retries every second forever without failing: a second
/// instance on a taken port must exit at once instead, with the address and
/// the reason, so systemd and container runtimes see the failure.
fn bindable(cfg: &Config) -> Result<(), String> {
    for addr in cfg.all_listeners() {
        // std binds with SO_REUSEADDR, as Pingora does: a port left in
        // TIME_WAIT by an earlier instance is not mistaken for a busy one.
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    Ok(())
}

/// Whether the IPv6 listener `addr` takes IPv6 only: when IPv4 is listened
/// to on its port too (`0.0.0.0:8080` and `[::]:8080`, as nginx users write
/// it). A dual-stack `[::]` would hold that IPv4 port itself, and Pingora,
/// finding it taken, would retry binding forever and serve neither. Alone,
/// `[::]` keeps the system's dual stack.
fn ipv6_only(addr: std::net::SocketAddr, all: &[std::net::SocketAddr]) -> bool {
    addr.is_ipv6() && all.iter().any(|a| a.is_ipv4() && a.port() == addr.port())
}

/// Runs the server until SIGTERM/SIGINT; returns when it has shut down, or
/// at once when a listener cannot be bound.
pub fn run(cfg: Config) -> Result<(), String> {
    bindable(&cfg)?;
    raise_open_files_limit();
    for warning in warnings(&cfg) {
        log::warn!("{warning}");
    }
    let mut conf = ServerConf { threads: cfg.threads, ..ServerConf::default() };
    // Pingora's own grace period outlasts ours by a second: the watcher in
    // `Signals` reports the streams it cuts and exits first.
    conf.grace_period_seconds = Some(cfg.shutdown_grace.0.as_secs() + 1);
    conf.graceful_shutdown_timeout_seconds = Some(1);
    // One work-stealing runtime per service (BENCHMARKS.md compares the runtimes).
    conf.work_stealing = true;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let metrics = Arc::new(Metrics::with_routes(&route_prefixes(&cfg)));
    let draining = Arc::new(AtomicBool::new(false));
    let proxy = build(&cfg, metrics.clone());
    let state = proxy.state.clone();
    // Both listeners bound how a client sends its request headers and how
    // many connections they hold, each its own (the admin listener's few
    // must get through when the proxy's are full).
    let header_timeout = cfg.downstream.header_timeout.0;
    let most = bound(cfg.downstream.max_connections);
    let app = HeaderGuard::new(http_app(&server.configuration, proxy), header_timeout, &metrics)
        .with_slots(Connections::new(most, header_timeout, &metrics));
    let mut svc = Service::new("anibridge-proxy".to_string(), app);
    for addr in cfg.listen_addrs() {
        let mut listener = ListenerConfig::tcp(addr.to_string())
            .l4_buffer(L4BufferSettings::new(DOWNSTREAM_READ_BUFFER, DOWNSTREAM_WRITE_BUFFER));
        if ipv6_only(*addr, cfg.listen_addrs()) {
            let mut options = TcpSocketOptions::default();
            options.ipv6_only = Some(true);
            listener = listener.tcp_socket_options(options);
        }
        svc.add_listener(listener);
    }
    let admin_app = Admin { metrics: metrics.clone(), draining: draining.clone() };
    let admin_app = HeaderGuard::new(admin_app, header_timeout, &metrics)
        .with_slots(Connections::admin(crate::admin::MAX_CONNECTIONS, header_timeout));
    let mut admin = Service::new("admin".to_string(), admin_app);
    admin.threads = Some(1);
    admin.add_tcp(&cfg.admin_listen.0.to_string());
    server.add_service(svc);
    server.add_service(admin);
    let listeners: Vec<String> = cfg.listen_addrs().iter().map(ToString::to_string).collect();
    log::info!(
        "anibridge-proxy {} listening on {}, admin on {}, auth.mode {}, {} (downstream.max_connections)",
        env!("CARGO_PKG_VERSION"),
        listeners.join(" and "),
        cfg.admin_listen.0,
        cfg.auth.mode.as_str(),
        if most == 0 {
            "client connections unbounded".to_string()
        } else {
            format!("at most {most} client connections")
        }
    );
    server.run(RunArgs { shutdown_signal: Box::new(Signals { draining, state, grace: cfg.shutdown_grace.0 }) });
    Ok(())
}

/// What a valid configuration asks for that is unwise, each a sentence for
/// the operator: logged as warnings at start, and printed by `--check`.
pub fn warnings(cfg: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    // A key a client could guess: (key, value, the least length, what a guess gives).
    let key = match cfg.auth.mode {
        AuthMode::Token => Some(("auth.secret", &cfg.auth.secret, 32, "sign URLs")),
        AuthMode::Apikey => Some(("auth.api_key", &cfg.auth.api_key, 16, "use the proxy")),
        AuthMode::None => None,
    };
    if let Some((name, value, least, gives)) = key {
        let len = value.as_deref().map_or(0, str::len);
        if len < least {
            warnings.push(format!(
                "{name} is only {len} byte{}: anyone who guesses it can {gives}; use at least {least} random \
                 bytes (for example the output of `openssl rand -hex {least}`)",
                if len == 1 { "" } else { "s" }
            ));
        }
    }
    for Cidr(net) in &cfg.egress.allow_cidrs {
        if let Some(at) = CLOUD_METADATA.iter().find(|a| net.contains(*a)) {
            warnings.push(format!(
                "egress.allow_cidrs: {net} lets relayed URLs reach {at}, where a cloud machine hands out its \
                 own credentials; allow only the networks your origins are in"
            ));
        }
    }
    warnings.extend(too_high(cfg.downstream.max_connections, open_files_in_force()));
    warnings
}

/// Where cloud machines answer with their own credentials: AWS, GCP, Azure
/// and most others at 169.254.169.254, AWS over IPv6 too, Alibaba at
/// 100.100.100.200. The egress policy refuses them unless
/// `egress.allow_cidrs` lets them through (`0.0.0.0/0` does).
const CLOUD_METADATA: [std::net::IpAddr; 3] = [
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254)),
    std::net::IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 200)),
];

/// The open-files limit the proxy serves with: the soft limit once
/// [`raise_open_files_limit`] has raised it (what it will be, for `--check`).
fn open_files_in_force() -> u64 {
    rlimit::Resource::NOFILE.get().map_or(1024, |(soft, hard)| soft.max(hard.min(MOST_OPEN_FILES)))
}

/// What the soft open-files limit is raised to at most.
const MOST_OPEN_FILES: u64 = 1 << 20;

/// Every stream holds two sockets (client and upstream), so the common soft
/// limit of 1024 open files would cap the proxy near 500 streams. Like nginx's
/// `worker_rlimit_nofile` (and Go's runtime), the soft limit is raised to the
/// hard limit the operator allows, bounded by the kernel's usual `nr_open`.
fn raise_open_files_limit() {
    let before = rlimit::Resource::NOFILE.get().map(|(soft, _)| soft).unwrap_or(0);
    match rlimit::increase_nofile_limit(MOST_OPEN_FILES) {
        Ok(now) if now > before => log::info!("open files limit raised from {before} to {now}"),
        Ok(_) => {}
        Err(e) => log::warn!("open files limit stays {before}: {e}"),
    }
}

/// Whether SIGHUP is ignored in this process now (as `nohup` starts a
/// program): Linux lists the ignored signals in `/proc/self/status`.
fn hangup_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| ignores_hangup(&status))
}

/// Whether a `/proc/PID/status` text says SIGHUP is ignored: its `SigIgn`
/// mask (hexadecimal, bit N-1 for signal N) has bit 0 set.
fn ignores_hangup(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 != 0)
}

/// How long `/healthz` reports draining before the listeners close.
const NOTICE: std::time::Duration = std::time::Duration::from_secs(1);

/// SIGTERM, SIGINT, SIGQUIT and SIGHUP all drain gracefully: `/healthz` turns 503,
/// the listeners stop accepting, and the process exits 0 as soon as nothing
/// is in flight or the grace period is over. (Pingora's socket-passing
/// upgrade is not wired up: zero-downtime restarts run two instances and
/// restart them one at a time. SIGHUP, which nginx takes as "reload" and a
/// closing terminal sends, would otherwise end the process on the spot,
/// cutting every stream: there is no reload, so it drains too, and says so;
/// unless the proxy was started with it ignored, as `nohup` does.) A second
/// signal during the drain ends it at once, cutting what still runs.
struct Signals {
    draining: Arc<AtomicBool>,
    state: Arc<State>,
    grace: std::time::Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut stops = Stops::new();
        let first = stops.next().await;
        if first == "SIGHUP" {
            log::warn!("SIGHUP: the configuration is not reloaded; the proxy drains and exits (start it again to apply a new one)");
        }
        self.draining.store(true, Ordering::Relaxed);
        log::info!(
            "shutdown requested ({first}): /healthz answers 503, draining for at most {:?}; a second signal ends it at once",
            self.grace
        );
        // Whoever stops a drain they are waiting for (Ctrl-C twice, or a
        // second `kill`) means now: the streams still running are cut.
        let state = self.state.clone();
        tokio::spawn(async move {
            let again = stops.next().await;
            log::warn!("{again} while draining: the drain ends now");
            cut_and_exit(&state);
        });
        // Give load balancers a moment to see /healthz fail before the
        // listeners close (skipped when nothing is in flight).
        let notice = std::time::Instant::now() + NOTICE.min(self.grace);
        while std::time::Instant::now() < notice && self.state.metrics.in_flight.get() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Pingora then sleeps the whole grace period; end it once idle.
        let state = self.state.clone();
        let grace = self.grace;
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + grace;
            // Let the listeners close first.
            std::thread::sleep(std::time::Duration::from_millis(100));
            while std::time::Instant::now() < until {
                if state.metrics.in_flight.get() <= 0 {
                    log::info!("no requests in flight; exiting");
                    log::logger().flush();
                    std::process::exit(0);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            log::warn!("grace period over with {} requests in flight", state.metrics.in_flight.get());
            cut_and_exit(&state);
        });
        ShutdownSignal::GracefulTerminate
    }
}

/// The signals that stop the proxy, each listened to from the start (one
/// that arrives between two waits is kept for the next).
struct Stops {
    term: Signal,
    int: Signal,
    quit: Signal,
    /// `None` when SIGHUP was ignored at start (`nohup`).
    hup: Option<Signal>,
}

impl Stops {
    fn new() -> Stops {
        let listen = |kind: SignalKind| signal(kind).expect("a signal handler");
        // Started under `nohup` (or by anything that ignores hangups on
        // purpose): a closing terminal must not stop it, so SIGHUP stays
        // ignored. Asked before a handler would replace that.
        let hup = if hangup_ignored() {
            log::info!("SIGHUP was ignored when the proxy started (nohup): it stays ignored");
            None
        } else {
            Some(listen(SignalKind::hangup()))
        };
        Stops {
            term: listen(SignalKind::terminate()),
            int: listen(SignalKind::interrupt()),
            quit: listen(SignalKind::quit()),
            hup,
        }
    }

    /// The name of the next one to arrive.
    async fn next(&mut self) -> &'static str {
        let Stops { term, int, quit, hup } = self;
        let hangup = async {
            match hup {
                Some(hup) => hup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = quit.recv() => "SIGQUIT",
            _ = hangup => "SIGHUP",
        }
    }
}

/// Ends the process, cutting the streams still running: each gets its
/// access line (the bytes it sent), a warning, and a count.
fn cut_and_exit(state: &State) -> ! {
    for stream in state.streams.running() {
        log::info!(target: "access", "{}", stream.cut_line(state));
        log::warn!(
            "stream cut by the shutdown after {} body bytes: {} {} (route {})",
            stream.bytes.load(Ordering::Relaxed),
            stream.method,
            stream.uri.path(),
            stream.route(state)
        );
        state.metrics.shutdown_cut_streams.inc();
    }
    log::logger().flush();
    std::process::exit(0)
}

/// The proxy served on a tokio listener inside the caller's runtime; for
/// tests and benchmarks (an ephemeral port, no process-wide server).
pub struct Embedded {
    pub addr: std::net::SocketAddr,
    pub metrics: Arc<Metrics>,
    /// The per-host gate (its state, for tests).
    pub gate: crate::gate::Gate,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Embedded {
    pub async fn start(cfg: &Config) -> Result<Embedded, String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let metrics = Arc::new(Metrics::with_routes(&route_prefixes(cfg)));
        // What it listens on is this port (its own listener, never dialled).
        let mut cfg = cfg.clone();
        cfg.listen = crate::config::Listen(vec![addr]);
        let cfg = &cfg;
        let proxy = build(cfg, metrics.clone());
        let gate = proxy.state.client.gate().clone();
        let conf = Arc::new(ServerConf::default());
        let header_timeout = cfg.downstream.header_timeout.0;
        let app =
            Arc::new(HeaderGuard::new(http_app(&conf, proxy), header_timeout, &metrics).with_slots(Connections::new(
                bound(cfg.downstream.max_connections),
                header_timeout,
                &metrics,
            )));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut stop = rx.clone();
        tokio::spawn(async move {
            // Dropped when stopped: the connections close too, as when an
            // instance goes away.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.changed() => break,
                    Some(_) = connections.join_next() => continue,
                };
                let Ok((tcp, peer)) = accepted else { continue };
                let _ = tcp.set_nodelay(true);
                let app = app.clone();
                let rx = rx.clone();
                connections.spawn(async move {
                    // The client's address, as Pingora's own listener
                    // records it (the access log's client).
                    let mut l4 = L4Stream::from(tcp);
                    let digest = SocketDigest::from_raw_fd(std::os::fd::AsRawFd::as_raw_fd(&l4));
                    let _ = digest.peer_addr.set(Some(peer.into()));
                    l4.set_socket_digest(digest);
                    let mut stream: pingora::protocols::Stream = Box::new(l4);
                    // Keep-alive: serve the connection until it is not reusable.
                    while let Some(next) = app.process_new(stream, &rx).await {
                        stream = next;
                    }
                });
            }
        });
        Ok(Embedded { addr, metrics, gate, shutdown: tx })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_ipv6_listener_sharing_its_port_with_ipv4_takes_ipv6_only() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let dual = [a("0.0.0.0:8080"), a("[::]:8080"), a("[::1]:9000")];
        assert!(super::ipv6_only(dual[1], &dual));
        assert!(!super::ipv6_only(dual[0], &dual), "IPv4 is never v6-only");
        assert!(!super::ipv6_only(dual[2], &dual), "no IPv4 on its port");
        assert!(!super::ipv6_only(a("[::]:8080"), &[a("[::]:8080")]), "alone: the system's dual stack");
    }

    #[test]
    fn a_hangup_is_ignored_when_the_status_says_so() {
        let status = |ign: &str| {
            format!("Name:\tanibridge-proxy\nSigBlk:\t0000000000000000\nSigIgn:\t{ign}\nSigCgt:\t0000000000004a02\n")
        };
        assert!(super::ignores_hangup(&status("0000000000000001")), "nohup");
        assert!(super::ignores_hangup(&status("0000000000001007")), "nohup in a background job");
        assert!(!super::ignores_hangup(&status("0000000000000006")), "SIGINT and SIGQUIT only");
        assert!(!super::ignores_hangup(&status("0000000000000000")));
        assert!(!super::ignores_hangup("Name:\tx\n"), "no mask: not ignored");
        // `hangup_ignored` on a real process: tests/binary.rs starts the
        // binary under the real `nohup`.
    }
}
