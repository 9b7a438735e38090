//! The real nginx (conf/nginx.conf), the real Traefik (conf/traefik-static.yml
//! with conf/traefik.yml) and the real Caddy (conf/Caddyfile) in front of the
//! proxy: Range, HEAD and playlists come through unchanged, and bodies are not
//! buffered.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;

/// A reverse proxy running in front of the proxy, stopped when dropped.
struct Front {
    process: process::Spawned,
    port: u16,
}

/// Runs conf/nginx.conf with its listen port and upstream address replaced.
async fn nginx_in_front_of(proxy: std::net::SocketAddr) -> Front {
    let snippet = std::fs::read_to_string("conf/nginx.conf").unwrap();
    assert!(snippet.contains("listen 80;") && snippet.contains("server 127.0.0.1:8080;"));
    let (nginx, port) = process::nginx_on_a_free_port(|port| {
        let snippet = snippet
            .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
            .replace("server 127.0.0.1:8080;", &format!("server {proxy};"))
            .replace("/var/log/nginx/anibridge.log", "{dir}/anibridge.log");
        format!("access_log off;\n{snippet}")
    })
    .await;
    Front::start(nginx, port, "error.log").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_logs_paths_never_queries() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    let o = Origin::start(|req| serve_file(req, 1000, Some("video/mp4")).into()).await;
    let p = Proxy::open().await;
    let front = nginx_in_front_of(p.addr()).await;
    // Signed (sig= in the query), though the proxy is open here.
    let path = signed_relay_path("v.mp4", &o.url("/v.mp4?token=HOSTER-TOKEN"), None);
    assert_eq!(get(front.addr(), "GET", &format!("/anibridge{path}"), &[]).await.status, 200);
    // nginx writes the line as it finishes the request, which can be just
    // after the client has read the last byte.
    let line = "\"GET /anibridge/strm/proxy/v.mp4 HTTP/1.1\" 200 1000";
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = front.process.read("anibridge.log");
        if log.contains(line) || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(log.contains(line), "{log}");
    for secret in ["sig=", "u=", "HOSTER-TOKEN", "?"] {
        assert!(!log.contains(secret), "{secret:?} in nginx's log: {log}");
    }
}

/// TLS and HTTP/2 at the front: conf/nginx-tls.conf in front of the proxy,
/// curl over HTTP/2 with the test CA: a Range, a HEAD and a playlist whose
/// children point back through the https front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_http2_are_terminated_by_nginx_in_front() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none()
        || tools::needs("curl", "apt-get install curl").is_none()
    {
        return;
    }
    let o = Origin::start(|req| match req.path() {
        "/live/index.m3u8" => {
            Resp::new(200, Body::Bytes(PLAYLIST.into())).header("Content-Type", "application/vnd.apple.mpegurl").into()
        }
        _ => serve_file(req, 2_000_000, Some("video/mp4")).into(),
    })
    .await;
    let port = unused_addr().port();
    common::logs::capture();
    let p = Proxy::open_with(&format!(
        "public_base_url: \"https://localhost:{port}/anibridge\"\nlog: {{trusted_proxies: [\"127.0.0.1/32\"]}}\n"
    ))
    .await;
    let ca = tls::TestCa::new();
    let (cert, key) = ca.write_leaf();
    let snippet = std::fs::read_to_string("conf/nginx-tls.conf").unwrap();
    for needle in ["listen 443 ssl http2;", "server 127.0.0.1:8080;", "/etc/ssl/media.example.org/fullchain.pem"] {
        assert!(snippet.contains(needle), "{needle}");
    }
    let snippet = snippet
        .replace("listen 443 ssl http2;", &format!("listen 127.0.0.1:{port} ssl http2;"))
        .replace("server 127.0.0.1:8080;", &format!("server {};", p.addr()))
        .replace("/etc/ssl/media.example.org/fullchain.pem", &cert.display().to_string())
        .replace("/etc/ssl/media.example.org/privkey.pem", &key.display().to_string())
        .replace("/var/log/nginx/anibridge.log", "{dir}/anibridge.log");
    let nginx = process::spawn_nginx(&format!("access_log off;\n{snippet}"));
    nginx.wait_listening(([127, 0, 0, 1], port).into(), "error.log").await;
    let ca_pem = ca.dir.path().join("ca.pem");
    let curl = |args: Vec<String>| {
        let ca_pem = ca_pem.clone();
        async move {
            let mut c = tokio::process::Command::new("curl");
            c.args(["-s", "--http2", "--cacert"]).arg(&ca_pem);
            c.args(["--resolve", &format!("localhost:{port}:127.0.0.1"), "-w", "\n%{http_version} %{http_code}"]);
            c.args(args);
            let out = c.output().await.unwrap();
            let text = out.stdout;
            let split = text.iter().rposition(|b| *b == b'\n').unwrap();
            (text[..split].to_vec(), String::from_utf8_lossy(&text[split + 1..]).to_string())
        }
    };
    let https = |path: String| format!("https://localhost:{port}/anibridge{path}");
    let (body, how) =
        curl(vec!["-H".into(), "Range: bytes=1000-1999".into(), https(relay_path("v.mp4", &o.url("/v.mp4")))]).await;
    assert_eq!(how, "2 206", "HTTP/2 to nginx, a 206 from the proxy");
    assert_body(&body, &pattern(1000, 1000));
    let (_, how) = curl(vec!["-I".into(), https(relay_path("v.mp4", &o.url("/v.mp4")))]).await;
    assert_eq!(how, "2 200");
    let (list, how) = curl(vec![https(relay_path("index.m3u8", &o.url("/live/index.m3u8")))]).await;
    assert_eq!(how, "2 200");
    let list = String::from_utf8(list).unwrap();
    let child = list.lines().find(|l| l.contains("seg0.ts")).unwrap();
    assert!(child.starts_with(&format!("https://localhost:{port}/anibridge/strm/proxy/seg0.ts?u=")), "{child}");
    let (_, how) = curl(vec!["-H".into(), "Range: bytes=0-9".into(), child.to_string()]).await;
    assert_eq!(how, "2 206", "the child plays through the https front");
    // The access log names the viewer (connecting from 127.0.0.2), not nginx.
    let id = "behind-the-tls-front";
    let asked = ["--interface", "127.0.0.2", "-H", &format!("X-Request-Id: {id}"), "-o", "/dev/null"];
    let mut args: Vec<String> = asked.iter().map(|a| a.to_string()).collect();
    args.push(https(relay_path("v.mp4", &o.url("/v.mp4"))));
    assert_eq!(curl(args).await.1, "2 200");
    let line = common::logs::access_line(id).await;
    assert!(line.contains(" 127.0.0.2 \"GET /strm/proxy/v.mp4\" 200 "), "{line}");
}

/// Traefik: `TRAEFIK` (what scripts/test.sh fetches), else on PATH.
fn traefik_bin() -> Option<String> {
    let bin = std::env::var("TRAEFIK").unwrap_or_else(|_| "traefik".into());
    tools::needs(&bin, "scripts/traefik.sh fetches it; set TRAEFIK to its path")
}

/// Runs conf/traefik-static.yml and conf/traefik.yml with the entry point,
/// the dynamic file's path and the proxy's address replaced.
async fn traefik_in_front_of(proxy: std::net::SocketAddr, traefik: String) -> Front {
    let stat = std::fs::read_to_string("conf/traefik-static.yml").unwrap();
    let dynamic = std::fs::read_to_string("conf/traefik.yml").unwrap();
    assert!(stat.contains("address: \":80\"") && stat.contains("filename: /etc/traefik/anibridge.yml"));
    assert!(stat.contains("\nlog:\n"));
    assert!(dynamic.contains("url: \"http://127.0.0.1:8080\""));
    let port = unused_addr().port();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(
        dir.path().join("traefik.yml"),
        stat.replace("address: \":80\"", &format!("address: \"127.0.0.1:{port}\""))
            .replace("filename: /etc/traefik/anibridge.yml", &format!("filename: {d}/anibridge.yml"))
            .replace("\nlog:\n", &format!("\nlog:\n  filePath: {d}/traefik.log\n")),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("anibridge.yml"),
        dynamic.replace("url: \"http://127.0.0.1:8080\"", &format!("url: \"http://{proxy}\"")),
    )
    .unwrap();
    let traefik = process::Spawned::start(Command::new(traefik).arg(format!("--configFile={d}/traefik.yml")), dir);
    Front::start(traefik, port, "traefik.log").await
}

/// Runs conf/Caddyfile with its site address (plain HTTP on loopback) and
/// upstream address replaced; Caddy's storage in its own directory.
async fn caddy_in_front_of(proxy: std::net::SocketAddr) -> Front {
    let file = std::fs::read_to_string("conf/Caddyfile").unwrap();
    assert!(file.contains("\n:80 {\n") && file.contains("reverse_proxy 127.0.0.1:8080 {"));
    let start = |port: u16| {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("Caddyfile");
        std::fs::write(
            &config,
            file.replace("\n:80 {\n", &format!("\nhttp://:{port} {{\n\tbind 127.0.0.1\n"))
                .replace("reverse_proxy 127.0.0.1:8080 {", &format!("reverse_proxy {proxy} {{")),
        )
        .unwrap();
        process::spawn_caddy(&config, dir)
    };
    let (caddy, port) = process::on_a_free_port(start, "caddy.log").await;
    Front::start(caddy, port, "caddy.log").await
}

impl Front {
    /// Waits until `process`, configured to listen on `port` and to log to
    /// `log` in its directory, routes to the proxy.
    async fn start(process: process::Spawned, port: u16, log: &str) -> Front {
        let front = Front { process, port };
        front.wait_until_routing(log).await;
        front
    }

    fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Waits until a request under /anibridge/ reaches the proxy (which
    /// answers 400 without `u=`), not the front's own 404 or 502.
    async fn wait_until_routing(&self, log: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok()
                && get(self.addr(), "GET", "/anibridge/strm/proxy/x.ts", &[]).await.status == 400
            {
                return;
            }
            assert!(Instant::now() < deadline, "the front did not start routing: {}", self.process.read(log));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const PLAYLIST: &str = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nseg0.ts\n#EXT-X-ENDLIST\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_head_and_playlists_pass_through_nginx_unbuffered() {
    if tools::needs("nginx", "apt-get install nginx-light").is_some() {
        streams_through(nginx_in_front_of).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_head_and_playlists_pass_through_traefik_unbuffered() {
    if let Some(traefik) = traefik_bin() {
        streams_through(|proxy| traefik_in_front_of(proxy, traefik)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_head_and_playlists_pass_through_caddy_unbuffered() {
    if tools::needs("caddy", "apt-get install caddy").is_some() {
        streams_through(caddy_in_front_of).await;
    }
}

/// Range, HEAD, a rewritten playlist and its child, and an unbuffered slow
/// body, all through the front that `start` puts before the proxy.
async fn streams_through<F, Fut>(start: F)
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Front>,
{
    let o = Origin::start(|req| match req.path() {
        "/live/index.m3u8" => {
            Resp::new(200, Body::Bytes(PLAYLIST.into())).header("Content-Type", "application/vnd.apple.mpegurl").into()
        }
        "/slow.ts" => Resp::new(200, Body::Slow { len: 8 * 65536, piece: 65536, pause: Duration::from_millis(400) })
            .header("Content-Type", "video/mp2t")
            .into(),
        _ => serve_file(req, 2_000_000, Some("video/mp4")).into(),
    })
    .await;
    // The proxy learns the public URL nginx serves it under, and trusts the
    // front's X-Forwarded-For.
    common::logs::capture();
    let p = Proxy::open_with(
        "public_base_url: \"http://nginx.test/anibridge\"\nlog: {trusted_proxies: [\"127.0.0.1/32\"]}\n",
    )
    .await;
    let f = start(p.addr()).await;
    let front = f.addr();
    let via = |path: String| format!("/anibridge{path}");

    let got = get(front, "GET", &via(relay_path("v.mp4", &o.url("/v.mp4"))), &[("Range", "bytes=1000-1999")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.header("content-range"), Some("bytes 1000-1999/2000000"));
    assert_body(&got.body, &pattern(1000, 1000));
    assert_eq!(o.requests().last().unwrap().header("range"), Some("bytes=1000-1999"));

    let got = get(front, "HEAD", &via(relay_path("v.mp4", &o.url("/v.mp4"))), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some("2000000"));
    assert_eq!(o.requests().last().unwrap().method, "HEAD");

    let got = get(front, "GET", &via(relay_path("index.m3u8", &o.url("/live/index.m3u8"))), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/vnd.apple.mpegurl"));
    let child = got.text().lines().find(|l| l.contains("seg0.ts")).unwrap().to_string();
    assert!(child.starts_with("http://nginx.test/anibridge/strm/proxy/seg0.ts?u="), "{child}");
    // The child URL works through nginx too.
    let child_path = child.trim_start_matches("http://nginx.test");
    let seg = get(front, "GET", child_path, &[("Range", "bytes=0-9")]).await;
    assert_eq!(seg.status, 206);

    // Unbuffered: the first bytes arrive while the origin is still sending.
    let mut c = Client::connect(front).await;
    c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", via(relay_path("s.ts", &o.url("/slow.ts")))).as_bytes())
        .await;
    let mut sock = c.into_inner();
    let mut buf = vec![0u8; 65536];
    let mut seen = Vec::new();
    while find(&seen, b"\r\n\r\n").is_none_or(|h| seen.len() < h + 4 + 1000) {
        let k = sock.read(&mut buf).await.unwrap();
        assert!(k > 0);
        seen.extend_from_slice(&buf[..k]);
    }
    let written = o.body_bytes_written.load(Ordering::SeqCst);
    assert!(
        written < 8 * 65536,
        "the front or the proxy buffered the whole body before sending ({written} bytes written)"
    );

    // The access log names the viewer (connecting from 127.0.0.2), not the
    // front: each sends X-Forwarded-For.
    let id = format!("behind-{}", f.port);
    let mut viewer = Client::connect_from(front, [127, 0, 0, 2].into()).await;
    let got = viewer.request("GET", &via(relay_path("v.mp4", &o.url("/v.mp4"))), &[("X-Request-Id", &id)]).await;
    assert_eq!(got.status, 200);
    let line = common::logs::access_line(&id).await;
    assert!(line.contains(" 127.0.0.2 \"GET /strm/proxy/v.mp4\" 200 "), "{line}");
}
