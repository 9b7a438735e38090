//! Scaling out (DESIGN "Running it"): three proxy instances sharing one
//! secret behind a real balancer hashing consistently, nginx running
//! conf/nginx-fleet.conf and HAProxy running conf/haproxy-fleet.cfg.
//! Viewers through the balancer fetch an HLS stream and `/strm/stream`
//! episodes and files of a signed route (each viewer with its own
//! signature), and the origin (nginx) serves each file once across the
//! fleet, the files spread over it; a URL signed by one instance
//! plays through any; stopping an instance moves only its share of the
//! URLs.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anibridge_proxy::auth::{sign, Query};
use common::process::{on_a_free_port, spawn_nginx, Spawned};
use common::*;

const SEGMENTS: u64 = 12;
const SEG: u64 = 64 << 10;
const EPISODES: u64 = 6;
/// Files behind the instances' route (`/lib/`), as a route's paths name them.
const ROUTED: u64 = 12;

/// The origin: an HLS stream and some episodes on disk, served by nginx,
/// logging which instance fetched each file (`X-Instance`, a
/// provider-profile header).
async fn origin(root: &std::path::Path) -> (Spawned, u16) {
    let mut list = String::from("#EXTM3U\n#EXT-X-TARGETDURATION:4\n");
    for i in 0..SEGMENTS {
        std::fs::write(root.join(format!("seg{i:02}.ts")), pattern(i * 1000, SEG)).unwrap();
        list.push_str(&format!("#EXTINF:4.0,\nseg{i:02}.ts\n"));
    }
    list.push_str("#EXT-X-ENDLIST\n");
    std::fs::write(root.join("index.m3u8"), list).unwrap();
    for e in 1..=EPISODES {
        std::fs::write(root.join(format!("ep{e}.mp4")), pattern(e * 7, SEG)).unwrap();
    }
    std::fs::create_dir(root.join("lib")).unwrap();
    for i in 0..ROUTED {
        std::fs::write(root.join(format!("lib/f{i}.bin")), pattern(i * 11, SEG)).unwrap();
    }
    let (nginx, port) = common::process::nginx_on_a_free_port(|port| {
        format!(
            "log_format fleet '$request_method $uri $status $http_x_instance';\n\
         types {{ application/vnd.apple.mpegurl m3u8; video/mp2t ts; video/mp4 mp4; }}\n\
         server {{ listen 127.0.0.1:{port}; root {}; access_log {{dir}}/access.log fleet; }}\n",
            root.display()
        )
    })
    .await;
    (nginx, port)
}

/// The resolver every instance asks (operator config): episode `e` is
/// `ep{e}.mp4` on the origin. Counts its calls.
async fn resolver(origin_port: u16) -> (Origin, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let o = Origin::start(move |req| {
        c.fetch_add(1, Ordering::SeqCst);
        let q = Query::parse(req.target.split_once('?').map(|(_, q)| q));
        let e = q.0.iter().find(|(k, _)| k == "e").map(|(_, v)| v.clone()).unwrap_or_default();
        let body = format!(r#"{{"url":"http://127.0.0.1:{origin_port}/ep{e}.mp4","ttl_seconds":600}}"#);
        Resp::new(200, Body::Bytes(body.into_bytes())).header("Content-Type", "application/json").into()
    })
    .await;
    (o, calls)
}

/// Which instance fetched each path, as the origin logged it, in order.
fn fetched(origin: &Spawned) -> Vec<(String, String)> {
    origin
        .read("access.log")
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[1].to_string(), f[3].to_string())
        })
        .collect()
}

/// File `i` of the route through the balancer, signed for its path (the
/// path as the instance receives it, the balancer's prefix gone) with the
/// viewer's own expiry.
async fn fetch_routed(front: u16, i: u64, viewer: u64) {
    let path = signed_route_path(&format!("/lib/f{i}.bin"), &[("exp", &(now() + 600 + viewer).to_string())]);
    let got = get(([127, 0, 0, 1], front).into(), "GET", &format!("/anibridge{path}"), &[]).await;
    assert_eq!((got.status, got.complete), (200, true), "routed file {i}: {}", got.text());
    assert_body(&got.body, &pattern(i * 11, SEG));
}

/// A viewer through the balancer: the playlist, then every segment, bytes checked.
async fn watch(front: u16, master: &str) {
    let base = format!("http://127.0.0.1:{front}");
    let mut c = Client::connect(([127, 0, 0, 1], front).into()).await;
    let got = c.request("GET", master, &[("Range", "bytes=0-")]).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let segs: Vec<String> = got.text().lines().filter(|l| l.starts_with(&base)).map(str::to_string).collect();
    assert_eq!(segs.len(), SEGMENTS as usize, "children point back through the balancer: {}", got.text());
    for (i, s) in segs.iter().enumerate() {
        let got = c.request("GET", s.trim_start_matches(&base), &[]).await;
        assert_eq!((got.status, got.complete), (200, true), "{s}");
        assert_body(&got.body, &pattern(i as u64 * 1000, SEG));
    }
}

/// `/strm/stream` for episode `e` through the balancer, signed with the
/// viewer's own expiry (so every viewer's query differs in `exp` and `sig`).
async fn stream_episode(front: u16, e: u64, viewer: u64) {
    let mut q = Query::parse(Some(&format!(
        "site=aniworld.to&slug=frieren&s=1&e={e}&lang=German+Sub&provider=VOE&exp={}",
        now() + 600 + viewer
    )));
    let s = sign(SECRET.as_bytes(), &q);
    q.0.push(("sig".into(), s));
    let got = get(([127, 0, 0, 1], front).into(), "GET", &format!("/anibridge/strm/stream?{}", q.encode()), &[]).await;
    assert_eq!((got.status, got.complete), (200, true), "episode {e}: {}", got.text());
    assert_body(&got.body, &pattern(e * 7, SEG));
}

#[derive(Clone, Copy, Debug)]
enum Balancer {
    Nginx,
    Haproxy,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_nginx_fetches_each_file_once() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    fleet_fetches_each_file_once(Balancer::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_haproxy_fetches_each_file_once() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none()
        || tools::needs("haproxy", "apt-get install haproxy").is_none()
    {
        return;
    }
    fleet_fetches_each_file_once(Balancer::Haproxy).await;
}

async fn fleet_fetches_each_file_once(kind: Balancer) {
    let root = tempfile::tempdir().unwrap();
    let (origin, origin_port) = origin(root.path()).await;
    let (resolver, resolutions) = resolver(origin_port).await;
    // The balancer's port, held until the balancer starts: the instances
    // (and other tests' servers) bind ports of their own meanwhile, and one
    // of them taking this one would answer in the balancer's place.
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let front_port = front.local_addr().unwrap().port();
    let mut fleet = Vec::new();
    for n in 1..=3 {
        fleet.push(Some(
            Proxy::start(&format!(
                "auth: {{mode: token}}\negress: {{allow_cidrs: [\"127.0.0.0/8\"]}}\n\
                 public_base_url: \"http://127.0.0.1:{front_port}/anibridge\"\n\
                 resolver: {{url: \"{}\"}}\n\
                 routes: [{{prefix: \"/lib/\", upstream: \"http://127.0.0.1:{origin_port}/lib/\"}}]\n\
                 providers: [{{hosts: [\"127.0.0.1\"], headers: {{X-Instance: \"i{n}\"}}}}]\ncache: {{}}\n",
                resolver.url("/resolve")
            ))
            .await,
        ));
    }
    let addrs: Vec<_> = fleet.iter().map(|p| p.as_ref().unwrap().addr()).collect();
    // The balancer listens where the instances' public_base_url says.
    drop(front);
    let front = kind.start(&addrs, front_port).await;
    let master = format!(
        "/anibridge{}",
        signed_relay_path("index.m3u8", &format!("http://127.0.0.1:{origin_port}/index.m3u8"), Some(now() + 600))
    );

    let mut viewers: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn({
                let m = master.clone();
                async move { watch(front_port, &m).await }
            })
        })
        .collect();
    // /strm/stream: three viewers per episode, each with its own signature.
    for e in 1..=EPISODES {
        for v in 0..3 {
            viewers.push(tokio::spawn(stream_episode(front_port, e, v)));
        }
    }
    // The route: three viewers per file.
    for i in 0..ROUTED {
        for v in 0..3 {
            viewers.push(tokio::spawn(fetch_routed(front_port, i, v)));
        }
    }
    for v in viewers {
        v.await.unwrap();
    }
    let want = (SEGMENTS + 1 + EPISODES + ROUTED) as usize;
    let paths = |log: &str| log.lines().map(|l| l.split(' ').nth(1)).collect::<std::collections::BTreeSet<_>>().len();
    origin.read_when("access.log", |log| paths(log) >= want).await;
    let first = fetched(&origin);
    let mut owner = BTreeMap::new();
    for (path, instance) in &first {
        assert!(
            owner.insert(path.clone(), instance.clone()).is_none(),
            "{kind:?}: {path} fetched twice across the fleet: {first:?}"
        );
    }
    assert_eq!(owner.len(), want, "{first:?}");
    assert_eq!(
        resolutions.load(Ordering::SeqCst),
        EPISODES as usize,
        "{kind:?}: one resolution per episode across the fleet"
    );
    let shares: BTreeMap<&String, usize> = owner.values().fold(BTreeMap::new(), |mut m, i| {
        *m.entry(i).or_default() += 1;
        m
    });
    assert!(shares.len() >= 2, "{kind:?}: the URLs spread over the fleet: {shares:?}");
    // A route's files too: hashed by path, not all onto one instance.
    let routed: std::collections::BTreeSet<&String> =
        owner.iter().filter(|(p, _)| p.starts_with("/lib/")).map(|(_, i)| i).collect();
    assert!(routed.len() >= 2, "{kind:?}: a route's files spread over the fleet: {owner:?}");

    // Stop the instance with the largest share: only its URLs move.
    let (gone, _) = shares.iter().max_by_key(|(_, n)| **n).map(|(i, n)| ((*i).clone(), *n)).unwrap();
    let k: usize = gone.trim_start_matches('i').parse::<usize>().unwrap() - 1;
    let before = fetched(&origin).len();
    fleet[k] = None;
    match kind {
        Balancer::Nginx => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        // HAProxy takes it out of the ring when its health check fails
        // (until then a retry goes to another instance, not always the one
        // the ring will choose without it).
        Balancer::Haproxy => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !front.read("haproxy.log").contains(&format!("/{gone} is DOWN")) {
                assert!(std::time::Instant::now() < deadline, "HAProxy saw no DOWN: {}", front.read("haproxy.log"));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    watch(front_port, &master).await;
    watch(front_port, &master).await;
    let expected: Vec<&String> = owner
        .iter()
        .filter(|(p, i)| **i == gone && !p.starts_with("/ep") && !p.starts_with("/lib/"))
        .map(|(p, _)| p)
        .collect();
    origin.read_when("access.log", |log| log.lines().count() >= before + expected.len()).await;
    let moved: Vec<(String, String)> = fetched(&origin)[before..].to_vec();
    let mut refetched: Vec<&String> = moved.iter().map(|(p, _)| p).collect();
    refetched.sort();
    assert_eq!(refetched, expected, "{kind:?}: exactly the stopped instance's URLs were fetched again, once each");
    assert!(moved.iter().all(|(_, i)| *i != gone), "{moved:?}");
    // A URL signed by one instance (a segment of the playlist it rewrote)
    // plays through every one still running (checked last: it fills their
    // caches).
    let signer = fleet.iter().flatten().next().unwrap().addr();
    let list = get(signer, "GET", master.trim_start_matches("/anibridge"), &[]).await.text();
    let child = list.lines().find(|l| l.contains("seg03.ts")).unwrap();
    let child = child.trim_start_matches(&format!("http://127.0.0.1:{front_port}/anibridge"));
    for p in fleet.iter().flatten() {
        let (a, got) = (p.addr(), get(p.addr(), "GET", child, &[]).await);
        assert_eq!(got.status, 200, "instance {a}");
        assert_body(&got.body, &pattern(3000, SEG));
    }

    drop(front);
}

/// Behind either balancer, an instance that lists it in
/// `log.trusted_proxies` logs the viewer's own address, never what the
/// viewer wrote in an `X-Forwarded-For` of its own. nginx appends its hop to
/// that line; HAProxy's `option forwardfor` sends its hop as a second line,
/// and reading the first line alone logged the viewer's forgery. The viewer
/// connects from 127.0.0.2 so that its address differs from the balancer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_viewer_behind_either_balancer() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none()
        || tools::needs("haproxy", "apt-get install haproxy").is_none()
    {
        return;
    }
    common::logs::capture();
    let o = Origin::start(|req| serve_file(req, 1000, Some("video/mp4")).into()).await;
    let p = Proxy::open_with("log: {trusted_proxies: [\"127.0.0.1/32\"]}\n").await;
    let viewer = std::net::IpAddr::from([127, 0, 0, 2]);
    for kind in [Balancer::Nginx, Balancer::Haproxy] {
        let (_front, port) = on_a_free_port(|port| kind.spawn(&[p.addr(); 3], port), kind.log()).await;
        let id = format!("forged-{kind:?}");
        let mut c = Client::connect_from(([127, 0, 0, 1], port).into(), viewer).await;
        let path = format!("/anibridge{}", relay_path("v.mp4", &o.url("/v.mp4")));
        let got = c.request("GET", &path, &[("X-Forwarded-For", "6.6.6.6"), ("X-Request-Id", &id)]).await;
        assert_eq!(got.status, 200, "{kind:?}");
        let line = common::logs::access_line(&id).await;
        assert!(line.contains(" 127.0.0.2 \"GET /strm/proxy/v.mp4\" 200 1000 "), "{kind:?}: {line}");
    }
}

/// The instances' addresses the fleet configs name, replaced by the test's.
const DEFAULTS: [&str; 3] = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"];

impl Balancer {
    /// The balancer's fleet config from `conf/` listening on `port`, with
    /// the instances' addresses replaced, started (not yet listening).
    fn spawn(self, instances: &[std::net::SocketAddr], port: u16) -> Spawned {
        match self {
            Balancer::Nginx => nginx_balancer(instances, port),
            Balancer::Haproxy => haproxy_balancer(instances, port),
        }
    }

    /// Where it says why it stopped.
    fn log(self) -> &'static str {
        match self {
            Balancer::Nginx => "error.log",
            Balancer::Haproxy => "haproxy.log",
        }
    }

    /// Started on `port` (held by the caller until now), once it listens.
    async fn start(self, instances: &[std::net::SocketAddr], port: u16) -> Spawned {
        let balancer = self.spawn(instances, port);
        balancer.wait_listening(([127, 0, 0, 1], port).into(), self.log()).await;
        balancer
    }
}

/// conf/nginx-fleet.conf listening on `port`, with the instances'
/// addresses and its log path replaced.
fn nginx_balancer(instances: &[std::net::SocketAddr], port: u16) -> Spawned {
    let conf = std::fs::read_to_string("conf/nginx-fleet.conf").unwrap();
    assert!(conf.contains("listen 80;") && DEFAULTS.iter().all(|d| conf.contains(&format!("server {d} "))));
    let mut conf = conf
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        .replace("/var/log/nginx/anibridge.log", "{dir}/fleet.log");
    for (d, a) in DEFAULTS.iter().zip(instances) {
        conf = conf.replace(&format!("server {d} "), &format!("server {a} "));
    }
    spawn_nginx(&conf)
}

/// conf/haproxy-fleet.cfg listening on `port`, with the instances'
/// addresses replaced, HAProxy in the foreground.
fn haproxy_balancer(instances: &[std::net::SocketAddr], port: u16) -> Spawned {
    let conf = std::fs::read_to_string("conf/haproxy-fleet.cfg").unwrap();
    assert!(conf.contains("bind :80\n") && DEFAULTS.iter().all(|d| conf.contains(&format!(" {d} check"))));
    let mut conf = conf.replace("bind :80\n", &format!("bind 127.0.0.1:{port}\n"));
    for (d, a) in DEFAULTS.iter().zip(instances) {
        conf = conf.replace(&format!(" {d} check"), &format!(" {a} check"));
    }
    common::process::spawn_haproxy(&conf)
}
