//! DESIGN "Egress through another proxy": upstream connections through real
//! SOCKS5 (microsocks) and HTTP CONNECT (tinyproxy) servers from Debian,
//! started here on loopback, with and without credentials; the egress
//! policy intact through the tunnel; failures answered 502 `egress proxy
//! failed` with a log line and never a credential anywhere.

mod common;

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::logs::logs;
use common::process::{on_a_free_port, Spawned};
use common::tls::{tls_origin, TestCa};
use common::*;

const PASSWORD: &str = "pa55-w0rd-SECRET";

/// Once per process, before any proxy exists: capture the logs, and trust
/// the test CA (rustls reads it when a proxy builds its TLS connector).
fn setup() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        common::logs::capture();
        let ca = TestCa::new();
        ca.trust();
        ca
    })
}

// ---- the egress proxies ------------------------------------------------------------

/// A real egress proxy on loopback, and what it was asked to tunnel to.
struct EgressServer {
    process: Spawned,
    port: u16,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// microsocks
    Socks,
    /// tinyproxy
    Connect,
}

/// microsocks and tinyproxy, which every test here runs.
fn have_servers() -> bool {
    let socks = tools::needs("microsocks", "apt-get install microsocks").is_some();
    tools::needs("tinyproxy", "apt-get install tinyproxy").is_some() && socks
}

impl EgressServer {
    async fn microsocks(credentials: bool) -> EgressServer {
        let start = |port: u16| {
            let mut cmd = Command::new(tools::path("microsocks"));
            cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
            if credentials {
                cmd.args(["-u", "alice", "-P", PASSWORD]);
            }
            Spawned::start_logging(&mut cmd, tempfile::tempdir().unwrap(), "log")
        };
        let (process, port) = on_a_free_port(start, "log").await;
        EgressServer { process, port, kind: Kind::Socks }
    }

    async fn tinyproxy(credentials: bool) -> EgressServer {
        let start = |port: u16| {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display().to_string();
            let auth = if credentials { format!("BasicAuth alice {PASSWORD}\n") } else { String::new() };
            std::fs::write(
                dir.path().join("tinyproxy.conf"),
                format!(
                    "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{d}/tinyproxy.log\"\nLogLevel Info\n\
                     MaxClients 50\nAllow 127.0.0.1\nDisableViaHeader Yes\n{auth}"
                ),
            )
            .unwrap();
            let mut cmd = Command::new(tools::path("tinyproxy"));
            cmd.args(["-d", "-c", &format!("{d}/tinyproxy.conf")]);
            Spawned::start_logging(&mut cmd, dir, "out.log")
        };
        let (process, port) = on_a_free_port(start, "out.log").await;
        EgressServer { process, port, kind: Kind::Connect }
    }

    /// Its URL for `egress.proxies` (`scheme` chooses socks5 or socks5h).
    fn url(&self, scheme: &str, user: Option<&str>, password: &str) -> String {
        let creds = user.map(|u| format!("{u}:{password}@")).unwrap_or_default();
        format!("{scheme}://{creds}127.0.0.1:{}", self.port)
    }

    /// The destinations it opened tunnels to, in order.
    fn tunnels(&self) -> Vec<String> {
        match self.kind {
            // "client[4] 127.0.0.1: connected to 127.0.0.1:8767"
            Kind::Socks => self
                .process
                .read("log")
                .lines()
                .filter_map(|l| l.split_once("connected to ").map(|(_, d)| d.trim().to_string()))
                .collect(),
            // "Request (file descriptor 5): CONNECT 127.0.0.1:8767 HTTP/1.1"
            Kind::Connect => self
                .process
                .read("tinyproxy.log")
                .lines()
                .filter_map(|l| l.split_once(": CONNECT ").map(|(_, d)| d.split(' ').next().unwrap().to_string()))
                .collect(),
        }
    }
}

async fn origin() -> Origin {
    Origin::start(|req| match req.path() {
        "/list.m3u8" => {
            let body = format!("#EXTM3U\n#EXTINF:2,\nhttp://{}/seg0.ts\n#EXT-X-ENDLIST\n", req.header("host").unwrap());
            Resp::new(200, Body::Bytes(body.into_bytes()))
                .header("Content-Type", "application/vnd.apple.mpegurl")
                .into()
        }
        // Somewhere the egress entry does not cover.
        "/elsewhere" => {
            let port = req.header("host").unwrap().rsplit_once(':').unwrap().1.to_string();
            Resp::new(302, Body::Bytes(Vec::new())).header("Location", &format!("http://localhost:{port}/v.mp4")).into()
        }
        _ => serve_file(req, 10_000, Some("video/mp4")).into(),
    })
    .await
}

async fn proxy(extra: &str) -> Proxy {
    setup();
    Proxy::start(&format!("auth: {{mode: none}}\n{extra}")).await
}

fn counter(p: &Proxy, name: &str, route: &str) -> u64 {
    let m = &p.server.metrics;
    let vec = if name == "connections" { &m.egress_connections } else { &m.egress_failures };
    vec.with_label_values(&[route]).get()
}

// ---- the checks ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_heads_playlists_and_redirects_through_each_kind_of_egress_proxy() {
    if !have_servers() {
        return;
    }
    let o = origin().await;
    let target = o.addr.to_string();
    for (server, scheme, user) in [
        (EgressServer::microsocks(false).await, "socks5", None),
        (EgressServer::microsocks(true).await, "socks5", Some("alice")),
        (EgressServer::microsocks(true).await, "socks5h", Some("alice")),
        (EgressServer::tinyproxy(false).await, "http", None),
        (EgressServer::tinyproxy(true).await, "http", Some("alice")),
    ] {
        let url = server.url(scheme, user, PASSWORD);
        let name = server.url(scheme, None, "");
        let p = proxy(&format!(
            "egress: {{allow_cidrs: [\"127.0.0.0/8\", \"::1/128\"], proxies: [{{hosts: [\"127.0.0.1\"], url: \"{url}\"}}]}}\n"
        ))
        .await;
        let what = format!("{name} ({user:?})");
        // One player's requests, one after another on its keep-alive
        // connection (each one's upstream connection is back in the pool
        // before the next is read).
        let mut player = Client::connect(p.addr()).await;
        let got = player.request("GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[("Range", "bytes=100-199")]).await;
        assert_eq!(got.status, 206, "{what}: {}", got.text());
        assert_body(&got.body, &pattern(100, 100));
        let head = player.request("HEAD", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
        assert_eq!((head.status, head.header("content-length")), (200, Some("10000")), "{what}");
        // A playlist, and its child, which goes through the tunnel too.
        let list = player.request("GET", &relay_path("list.m3u8", &o.url("/list.m3u8")), &[]).await;
        let child = list.text().lines().find(|l| l.starts_with("/strm/proxy/seg0.ts?")).unwrap().to_string();
        let seg = player.request("GET", &child, &[("Range", "bytes=0-9")]).await;
        assert_eq!(seg.status, 206, "{what}");
        // Four requests, one tunnel: pooled per (egress proxy, upstream).
        assert_eq!(server.tunnels(), std::slice::from_ref(&target), "{what}");
        assert_eq!((counter(&p, "connections", &name), counter(&p, "connections", "direct")), (1, 0), "{what}");
        // A redirect to a host the entry does not cover goes direct.
        let moved = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/elsewhere")), &[]).await;
        assert_eq!(moved.status, 200, "{what}");
        assert_eq!(server.tunnels().len(), 1, "{what}: no tunnel for localhost");
        assert_eq!(counter(&p, "connections", "direct"), 1, "{what}");
        assert_eq!(o.requests().last().unwrap().target, "/v.mp4");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_runs_end_to_end_through_the_tunnel_and_is_verified() {
    if !have_servers() {
        return;
    }
    let ca = setup();
    let (good, _) = tls_origin(ca.leaf.clone(), ca.leaf_key(), b"secure bytes").await;
    let (rogue_cert, rogue_key) = TestCa::rogue();
    let (rogue, _) = tls_origin(rogue_cert, rogue_key, b"should never arrive").await;
    for server in [EgressServer::microsocks(true).await, EgressServer::tinyproxy(true).await] {
        let scheme = if server.kind == Kind::Socks { "socks5" } else { "http" };
        let url = server.url(scheme, Some("alice"), PASSWORD);
        let p = proxy(&format!(
            "egress: {{allow_cidrs: [\"127.0.0.0/8\", \"::1/128\"], proxies: [{{hosts: [\"localhost\"], url: \"{url}\"}}]}}\n"
        ))
        .await;
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &format!("https://localhost:{good}/v.mp4")), &[]).await;
        assert_eq!((got.status, got.body.as_slice()), (200, &b"secure bytes"[..]), "{scheme}: {}", got.text());
        let bad = get(p.addr(), "GET", &relay_path("v.mp4", &format!("https://localhost:{rogue}/v.mp4")), &[]).await;
        assert_eq!(bad.status, 502, "{scheme}: a self-signed certificate is refused through the tunnel too");
        assert!(!bad.text().contains("should never arrive"));
        // The tunnels went to the checked address, not to the name.
        let tunnels = server.tunnels();
        assert_eq!(tunnels.len(), 2, "{scheme}: {tunnels:?}");
        assert!(tunnels.iter().all(|t| t.starts_with("127.0.0.1:") || t.starts_with("[::1]:")), "{tunnels:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_policy_holds_and_the_tunnel_is_never_asked_for_a_denied_address() {
    if !have_servers() {
        return;
    }
    let o = origin().await;
    let socks = EgressServer::microsocks(false).await;
    let connect = EgressServer::tinyproxy(false).await;
    for (server, scheme) in [(&socks, "socks5"), (&connect, "http")] {
        let url = server.url(scheme, None, "");
        // No allow_cidrs: loopback is denied.
        let p = proxy(&format!("egress: {{proxies: [{{hosts: [\"*\"], url: \"{url}\"}}]}}\n")).await;
        for u in [o.url("/v.mp4"), format!("http://localhost:{}/v.mp4", o.addr.port()), "http://10.1.2.3/x".into()] {
            let got = get(p.addr(), "GET", &relay_path("v.mp4", &u), &[]).await;
            assert_eq!((got.status, got.text().as_str()), (403, "destination not allowed\n"), "{scheme} {u}");
        }
        assert!(server.tunnels().is_empty(), "{scheme}: the tunnel was asked: {:?}", server.tunnels());
    }
    // socks5h: IP literals and deny_hosts are judged here; names are not.
    let url = socks.url("socks5h", None, "");
    let p = proxy(&format!(
        "egress: {{deny_hosts: [\"blocked.example\"], proxies: [{{hosts: [\"*\"], url: \"{url}\"}}]}}\n"
    ))
    .await;
    for u in [
        o.url("/v.mp4"),
        "http://10.1.2.3/x".into(),
        "http://[::ffff:127.0.0.1]/x".into(),
        "http://blocked.example/x".into(),
    ] {
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &u), &[]).await;
        assert_eq!(got.status, 403, "socks5h {u}");
    }
    assert!(socks.tunnels().is_empty(), "{:?}", socks.tunnels());
    // A name goes to the proxy unresolved (the README says so plainly).
    let got =
        get(p.addr(), "GET", &relay_path("v.mp4", &format!("http://localhost:{}/v.mp4", o.addr.port())), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(socks.tunnels(), [format!("localhost:{}", o.addr.port())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_egress_proxies_are_502_with_a_log_line_and_no_credentials_anywhere() {
    if !have_servers() {
        return;
    }
    let o = origin().await;
    let origin = o.url("").trim_start_matches("http://").to_string();
    let socks = EgressServer::microsocks(true).await;
    let connect = EgressServer::tinyproxy(true).await;
    // Accepts connections and never answers a handshake.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let closed_port = RefusedPort::bind();
    let closed = closed_port.addr().port();
    let cases = [
        (format!("socks5://alice:{PASSWORD}@127.0.0.1:{closed}"), "connect: Connection refused"),
        (socks.url("socks5", Some("alice"), "wrong-WRONG-pw"), "SOCKS5: "),
        (connect.url("http", Some("alice"), "wrong-WRONG-pw"), "CONNECT answered 401 Unauthorized"),
        (format!("http://alice:{PASSWORD}@127.0.0.1:{silent_port}"), "no answer within upstream.connect_timeout"),
        (format!("socks5://alice:{PASSWORD}@127.0.0.1:{silent_port}"), "no answer within upstream.connect_timeout"),
    ];
    for (url, why) in cases {
        let name = url
            .split_once('@')
            .map_or(url.clone(), |(scheme, host)| format!("{}://{host}", scheme.split_once("://").unwrap().0));
        let p = proxy(&format!(
            "upstream: {{connect_timeout: \"700ms\"}}\negress: {{allow_cidrs: [\"127.0.0.0/8\"], proxies: [{{hosts: [\"*\"], url: \"{url}\"}}]}}\n"
        ))
        .await;
        let started = std::time::Instant::now();
        let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
        assert_eq!((got.status, got.text().as_str()), (502, "egress proxy failed\n"), "{url}");
        assert!(started.elapsed() < Duration::from_secs(10), "within connect_timeout (and its grace)");
        // One line, naming the upstream and the egress proxy it went through.
        let line = format!("WARN upstream failed: {origin} through egress proxy {name}: {why}");
        let said: Vec<_> =
            logs().lines().filter(|l| l.contains(&format!("egress proxy {name}"))).map(str::to_string).collect();
        assert!(said.len() == 1 && said[0].starts_with(&line), "not one log line {line:?} in:\n{}", logs());
        assert_eq!(counter(&p, "failures", &name), 1, "{url}");
        let metrics = String::from_utf8(p.server.metrics.render()).unwrap();
        for secret in [PASSWORD, "wrong-WRONG-pw"] {
            assert!(!metrics.contains(secret) && !got.text().contains(secret), "{url}");
        }
    }
    assert_eq!(o.requests().len(), 0, "nothing reached the origin");
    for secret in [PASSWORD, "wrong-WRONG-pw"] {
        assert!(!logs().contains(secret), "a credential in the log:\n{}", logs());
    }
}
