//! The real binary: `--check`, start-up errors, serving, memory bounded on
//! a slow 200 MB download, admin endpoints and graceful shutdown.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;

const BIN: &str = env!("CARGO_BIN_EXE_anibridge-proxy");

/// `f` opened again for appending.
fn appending(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new().append(true).open(path).unwrap()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn check(text: &str, env_secret: Option<&str>) -> (bool, String) {
    let f = config_file(text);
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(f.path())
        .arg("--check")
        .env_remove("ANIBRIDGE_PROXY_SECRET")
        .env_remove("ANIBRIDGE_PROXY_SECRET_FILE");
    if let Some(s) = env_secret {
        cmd.env("ANIBRIDGE_PROXY_SECRET", s);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn check_accepts_the_shipped_config_and_refuses_bad_ones_by_key() {
    let out = Command::new(BIN).args(["--config", "conf/anibridge-proxy.yaml", "--check"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let container = std::fs::read_to_string("conf/container.yaml").unwrap();
    assert!(check(&container, Some("x")).0, "conf/container.yaml is valid with a secret");
    assert!(!check(&container, None).0, "and refused without one");
    let (ok, msg) = check("auth: {mode: token}\n", None);
    assert!(!ok);
    assert!(msg.contains("auth.secret") && msg.contains("ANIBRIDGE_PROXY_SECRET"), "{msg}");
    let (ok, _) = check("auth: {mode: token}\n", Some("from-env"));
    assert!(ok);
    for (text, key) in [
        ("auth: {mode: none}\nupstream: {read_timout: \"5s\"}\n", "upstream.read_timout"),
        ("auth: {mode: none}\nstream: {chunk_size: 0}\n", "stream.chunk_size"),
        ("auth: {mode: none}\nupstream: {connect_timeout: \"0s\"}\n", "upstream.connect_timeout"),
        ("auth: {mode: none}\nthreads: \"two\"\n", "threads"),
        ("auth: {mode: none}\nroutes: [{prefix: \"/x/\", upstream: \"not a url\"}]\n", "routes[0].upstream"),
        ("auth: {mode: none}\nlisten: \"0.0.0.0:8080\"\n", "auth.mode"),
        ("auth: [\n", ""),
    ] {
        let (ok, msg) = check(text, None);
        assert!(!ok, "{text}");
        assert!(msg.contains(".yaml"), "names the file: {msg}");
        assert!(msg.contains(key), "names {key}: {msg}");
    }
    let out = Command::new(BIN).args(["--config", "/nonexistent/x.yaml", "--check"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.yaml"));
}

/// `--check` says what start-up would warn of, and still passes: a short
/// secret or api key, egress let through to cloud credentials, and a
/// connection bound over a quarter of the open-files limit the proxy would
/// serve with (at most 2^20, so ten million always is).
#[test]
fn check_says_the_warnings_of_a_valid_config() {
    let (ok, said) = check("auth: {mode: token, secret: short}\ndownstream: {max_connections: 10000000}\n", None);
    assert!(ok, "{said}");
    assert!(said.contains("configuration is valid"), "{said}");
    assert!(said.contains("warning: auth.secret is only 5 bytes"), "{said}");
    assert!(
        said.contains("warning: downstream.max_connections is 10000000, over a quarter of the open-files limit"),
        "{said}"
    );
    let (ok, said) = check(&format!("auth: {{mode: token, secret: {}}}\n", "s".repeat(32)), None);
    assert!(ok && !said.contains("warning"), "{said}");
    // A short api key; egress let through to where cloud machines hand
    // out their credentials (a private network of one's own is no warning).
    let (ok, said) = check(
        "auth: {mode: apikey, api_key: k3y}\n\
         egress: {allow_cidrs: [\"10.0.0.0/8\", \"0.0.0.0/0\", \"fd00::/8\", \"127.0.0.0/8\"]}\n",
        None,
    );
    assert!(ok, "{said}");
    assert!(said.contains("warning: auth.api_key is only 3 bytes"), "{said}");
    for (net, at) in [("0.0.0.0/0", "169.254.169.254"), ("fd00::/8", "fd00:ec2::254")] {
        let line = format!("warning: egress.allow_cidrs: {net} lets relayed URLs reach {at}, where a cloud machine");
        assert!(said.contains(&line), "{line:?} not in {said}");
    }
    assert_eq!(said.matches("warning").count(), 3, "{said}");
    let (ok, said) = check(&format!("auth: {{mode: apikey, api_key: {}}}\n", "k".repeat(16)), None);
    assert!(ok && !said.contains("warning"), "{said}");
}

struct Running {
    child: Child,
    log: Option<tempfile::NamedTempFile>,
    port: u16,
    admin: u16,
    cfg: tempfile::NamedTempFile,
}

impl Running {
    async fn start(extra: &str) -> Running {
        Self::start_logging(extra, None, &[]).await
    }

    /// With `RUST_LOG=rust_log` written to a file, and extra environment.
    async fn start_logging(extra: &str, rust_log: Option<&str>, env: &[(&str, &str)]) -> Running {
        Self::spawn(extra, rust_log, env, Command::new(BIN)).await
    }

    /// Runs `cmd` (the binary, perhaps with more set up) as [`Self::start_logging`] does.
    async fn spawn(extra: &str, rust_log: Option<&str>, env: &[(&str, &str)], cmd: Command) -> Running {
        let log = rust_log.map(|_| tempfile::NamedTempFile::new().unwrap());
        // The access log (standard output) and the rest (standard error),
        // in one file, both appending (two plain opens would each write
        // from offset 0, over each other's lines).
        let path = log.as_ref().map(|f| f.path().to_path_buf());
        let output = move || match &path {
            Some(p) => (Stdio::from(appending(p)), Stdio::from(appending(p))),
            None => (Stdio::null(), Stdio::inherit()),
        };
        Self::spawn_to(extra, rust_log, env, cmd, output, log).await
    }

    /// With `RUST_LOG` unset (the binary's default) and standard output and
    /// error piped, for the test to read or to leave unread.
    async fn start_piped(extra: &str) -> Running {
        Self::spawn_to(extra, Some(""), &[], Command::new(BIN), || (Stdio::piped(), Stdio::piped()), None).await
    }

    /// [`Self::spawn`] with standard output and error going to what
    /// `output` opens. The ports come from [`unused_addr`], which only
    /// finds them free: a test running beside this one may take one before
    /// the proxy binds it (the proxy then exits at once, as it should), so
    /// a proxy that exits at start is run again on other ports.
    async fn spawn_to(
        extra: &str,
        rust_log: Option<&str>,
        env: &[(&str, &str)],
        mut cmd: Command,
        output: impl Fn() -> (Stdio, Stdio),
        log: Option<tempfile::NamedTempFile>,
    ) -> Running {
        let grace = if extra.contains("shutdown_grace:") { "" } else { "shutdown_grace: \"10s\"\n" };
        let cfg = config_file("");
        // `Some("")`: RUST_LOG unset, the binary's own default.
        match rust_log {
            Some("") => cmd.env_remove("RUST_LOG"),
            other => cmd.env("RUST_LOG", other.unwrap_or("warn")),
        };
        cmd.arg("--config").arg(cfg.path()).envs(env.iter().copied());
        for _ in 0..3 {
            let (port, admin) = (unused_addr().port(), unused_addr().port());
            let text = with_run_cache(&format!(
                "listen: \"127.0.0.1:{port}\"\nadmin_listen: \"127.0.0.1:{admin}\"\n{grace}{extra}"
            ));
            std::fs::write(cfg.path(), text).unwrap();
            if let Some(f) = &log {
                // What a run that could not start said is not this run's.
                f.as_file().set_len(0).unwrap();
            }
            let (stdout, stderr) = output();
            let mut child = cmd.stdout(stdout).stderr(stderr).spawn().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
                    && tokio::net::TcpStream::connect(("127.0.0.1", admin)).await.is_ok()
                {
                    return Running { child, log, port, admin, cfg };
                }
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!("the proxy exited at start ({status}) on ports {port} and {admin}; trying others");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let said = log.as_ref().map(|f| std::fs::read_to_string(f.path()).unwrap_or_default());
                    panic!("proxy did not start within 20 s; its log: {}", said.unwrap_or_default());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("the proxy exited at start three times");
    }

    fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// Resident memory now (VmRSS), bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// Bytes of the cache's sealed in-memory files (stored bodies kept for
    /// `sendfile`): memory the process holds that its RSS does not show.
    fn sealed(&self) -> u64 {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.child.id())) else { return 0 };
        fds.flatten()
            .filter(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:anibridge-cache"))
            })
            .filter_map(|fd| std::fs::metadata(fd.path()).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Peak resident memory (VmHWM), bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    fn terminate(&mut self) {
        unsafe_kill(self.child.id(), "TERM");
    }

    /// How the process ended, once it has (at most `within`; past that
    /// the test fails with `stuck`, what should have ended it).
    async fn exit_status(&mut self, within: Duration, stuck: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "{stuck}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What it logged (started with a `RUST_LOG`).
    fn logged(&self) -> String {
        std::fs::read_to_string(self.log.as_ref().unwrap().path()).unwrap()
    }

    /// What it logged, once that holds `needle` (at most 10 s): a running
    /// proxy writes its lines a few milliseconds after it makes them.
    async fn logged_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.logged();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit_is_raised_to_the_hard_limit() {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the hook.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 256, rlim_max: 4096 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let r = Running::spawn("auth: {mode: none}\n", Some("info"), &[], cmd).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", r.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["4096", "4096"], "{line}");
    let log = r.logged_with("open files limit raised").await;
    assert!(log.contains("open files limit raised from 256 to 4096"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_of_a_200mb_body_keeps_memory_bounded_and_paces_the_upstream() {
    let total = 200 * MB;
    let o =
        Origin::start_with_sndbuf(move |req| serve_file(req, total, Some("video/mp4")).into(), Some(64 * 1024)).await;
    let p = Running::start("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("v.mp4", &o.url("/v.mp4"))).as_bytes()).await;
    let mut sock = c.into_inner();
    socket2::SockRef::from(&sock).set_recv_buffer_size(64 * 1024).unwrap();

    let mut buf = vec![0u8; 64 * 1024];
    let mut read: u64 = 0;
    let mut max_lead: u64 = 0;
    let mut next_pause = 10 * MB;
    let mut body_hash = sha2::Sha256::default();
    let mut header_done = false;
    let mut pending = Vec::new();
    while read < total {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed early after {read} bytes");
        let mut data = &buf[..n];
        if !header_done {
            pending.extend_from_slice(data);
            let Some(end) = find(&pending, b"\r\n\r\n") else { continue };
            header_done = true;
            let rest = pending.split_off(end + 4);
            assert!(pending.starts_with(b"HTTP/1.1 200"));
            use sha2::Digest;
            body_hash.update(&rest);
            read += rest.len() as u64;
            continue;
        }
        use sha2::Digest;
        body_hash.update(data);
        read += data.len() as u64;
        data = &[];
        let _ = data;
        if read >= next_pause {
            // The client stalls: the origin must stall soon after.
            next_pause += 20 * MB;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let lead = o.body_bytes_written.load(Ordering::SeqCst) - read;
            max_lead = max_lead.max(lead);
        }
    }
    use sha2::Digest;
    let mut want = sha2::Sha256::default();
    let mut off = 0;
    while off < total {
        let n = (total - off).min(MB);
        want.update(pattern(off, n));
        off += n;
    }
    assert_eq!(read, total);
    assert_eq!(hex::encode(body_hash.finalize()), hex::encode(want.finalize()), "body bytes differ");
    // The upstream was never read far ahead of the client: only socket
    // buffers (a few MiB) lie between them, not the 200 MB file.
    assert!(max_lead < 24 * MB, "upstream ran {} MiB ahead of the client", max_lead / MB);
    let peak = p.peak_rss();
    assert!(peak < 64 * MB, "proxy peak RSS {} MiB for a 200 MB body", peak / MB);
    eprintln!("max lead {} KiB, proxy peak RSS {} MiB", max_lead / 1024, peak / MB);
}

/// The admin listener (on every address in the container image) bounds
/// request headers as the proxy's does: one trickled in is cut and
/// counted (no ERROR line: as ordinary as a client that leaves early); a
/// keep-alive connection idle for longer is still answered, also after a
/// request with a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_bounds_request_headers_too() {
    let mut p =
        Running::start_logging("auth: {mode: none}\ndownstream: {header_timeout: 1s}\n", Some("warn"), &[]).await;
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], p.admin).into();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: one-byte-at-a-time\r\n\r\n";
    let mut slow = Client::connect(admin).await;
    let mut sent = 0;
    for b in request {
        if slow.is_closed(Duration::from_millis(50)).await {
            break;
        }
        slow.send_raw(&[*b]).await;
        sent += 1;
    }
    assert!(sent < request.len(), "cut after {sent} of {} bytes", request.len());
    let mut kept = Client::connect(admin).await;
    assert_eq!(kept.request("GET", "/healthz", &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kept.send_raw(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n").await;
    kept.send_raw(&[b'p'; 100]).await;
    assert_eq!(kept.read_response(false).await.status, 405);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = kept.request("GET", "/metrics", &[]).await.text();
    assert!(metrics.contains("anibridge_client_headers_refused_total{reason=\"timeout\"} 1\n"), "{metrics}");
    // One that leaves mid-header: no ERROR either.
    Client::connect(admin).await.send_raw(b"GET /hea").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.terminate();
    let _ = p.child.wait();
    let log = p.logged();
    assert!(!log.contains("ERROR"), "{log}");
}

/// The admin listener holds a bounded number of connections, as the
/// proxy's listeners do (each costs Pingora about 40 KiB while it idles):
/// past `admin::MAX_CONNECTIONS`, the one idle the longest is closed to
/// make room, and the newcomer is answered. They are not counted among
/// the proxy's client connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_holds_a_bounded_number_of_connections() {
    let p = Running::start("auth: {mode: none}\n").await;
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], p.admin).into();
    let most = anibridge_proxy::admin::MAX_CONNECTIONS;
    let mut idle = Vec::new();
    for i in 0..most {
        let mut c = Client::connect(admin).await;
        assert_eq!(c.request("GET", "/healthz", &[]).await.status, 200);
        idle.push(c);
        if i == 0 {
            // Idle the longest by more than the bound's clock (1 ms) tells apart.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut newcomer = Client::connect(admin).await;
    let metrics = newcomer.request("GET", "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("anibridge_client_connections 0\n"), "{}", metrics.text());
    assert!(idle[0].is_closed(Duration::from_secs(2)).await, "the longest idle made room");
    assert!(!idle[1].is_closed(Duration::from_millis(200)).await, "one was enough");
    assert_eq!(idle[1].request("GET", "/healthz", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_graceful_shutdown_during_a_download() {
    let o = Origin::start(|req| {
        if req.path() == "/slow.ts" {
            // 40 pieces of 25 KiB, 50 ms apart: about 2 s.
            let body = Body::Slow { len: 40 * 25 * 1024, piece: 25 * 1024, pause: Duration::from_millis(50) };
            return Resp::new(200, body).header("Content-Type", "video/mp2t").into();
        }
        serve_file(req, 1000, Some("video/mp4")).into()
    })
    .await;
    let mut p = Running::start("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], p.admin).into();
    let h = get(admin, "GET", "/healthz", &[]).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.text(), r#"{"status":"ok"}"#);
    // The container health check: the binary asks its own admin listener.
    let (ok, msg) = health(&p);
    assert!(ok, "{msg}");
    for path in ["/healthz", "/metrics"] {
        let refused = get(admin, "POST", path, &[("Content-Length", "0")]).await;
        assert_eq!((refused.status, refused.header("allow")), (405, Some("GET, HEAD")), "POST {path}");
        assert_eq!(get(admin, "HEAD", path, &[]).await.status, 200, "HEAD {path}");
    }
    let before = get(admin, "GET", "/metrics", &[]).await.text();
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
    assert_eq!(got.status, 200);
    let count = |text: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with("anibridge_requests_total{route=\"relay\",status=\"200\"}"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .unwrap_or(0.0)
    };
    // The client has every byte before the proxy's logging hook runs:
    // wait (bounded) for the counters to settle, then read them all once
    // more. One scrape is no snapshot: it reads the metrics one after
    // another, so the one that showed the request done may have read
    // `anibridge_bytes_relayed_total` (earlier in the alphabet) before the
    // hook counted the bytes (seen once in CI).
    let mut after = String::new();
    for _ in 0..100 {
        after = get(admin, "GET", "/metrics", &[]).await.text();
        if count(&after) > count(&before) && after.contains("anibridge_requests_in_flight 0") {
            after = get(admin, "GET", "/metrics", &[]).await.text();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(&after) - count(&before), 1.0, "{after}");
    assert!(after.contains("anibridge_bytes_relayed_total 1000"), "{after}");

    // A slow download is under way when SIGTERM arrives.
    let addr = p.addr();
    let path = relay_path("s.ts", &o.url("/slow.ts"));
    let download = tokio::spawn(async move { get(addr, "GET", &path, &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let h = get(admin, "GET", "/healthz", &[]).await;
    assert_eq!(h.status, 503, "draining");
    let (ok, msg) = health(&p);
    assert!(!ok && msg.contains("/healthz answered \"HTTP/1.1 503 Service Unavailable\""), "{msg}");
    let got = download.await.unwrap();
    assert_eq!(got.status, 200);
    assert!(got.complete, "the download finished within the grace period");
    assert_body(&got.body, &pattern(0, 40 * 25 * 1024));
    let status = p.exit_status(Duration::from_secs(8), "did not exit once drained").await;
    assert!(status.success(), "exit status {status:?}");
    let (ok, msg) = health(&p);
    assert!(!ok && msg.starts_with(&format!("unhealthy: 127.0.0.1:{}: ", p.admin)), "{msg}");
}

/// The start-up line says the version, where the proxy and its admin
/// listen, the auth mode and the connection bound, as the config writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_line_says_where_and_how_it_serves() {
    let mut p =
        Running::start_logging("auth: {mode: none}\ndownstream: {max_connections: 300}\n", Some("info"), &[]).await;
    let line = format!(
        "anibridge-proxy {} listening on 127.0.0.1:{}, admin on 127.0.0.1:{}, auth.mode none, at most 300 client \
         connections (downstream.max_connections)",
        env!("CARGO_PKG_VERSION"),
        p.port,
        p.admin
    );
    let log = p.logged_with(&line).await;
    assert!(log.contains(&line), "{line:?} not in {log}");
    p.terminate();
    let _ = p.child.wait();
}

/// SIGHUP (nginx's "reload", a closing terminal's hangup) drains like
/// SIGTERM and says why, instead of ending the process on the spot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_drains_and_exits_instead_of_dying_on_the_spot() {
    let o = Origin::start(|req| serve_file(req, 1000, Some("video/mp4")).into()).await;
    // Started with SIGHUP at its default, as from an interactive shell or a
    // service manager, even when this test runs under `nohup` (whose ignore
    // the proxy would keep: see the next test).
    let mut default_hup = Command::new("env");
    default_hup.args(["--default-signal=HUP", BIN]);
    let mut p = Running::spawn(
        "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n",
        Some("info"),
        &[],
        default_hup,
    )
    .await;
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/v.mp4")), &[]).await;
    assert_eq!(got.status, 200);
    unsafe_kill(p.child.id(), "HUP");
    let status = p.exit_status(Duration::from_secs(8), "did not exit after SIGHUP").await;
    assert!(status.success(), "exits 0 once drained, not killed by the signal: {status:?}");
    let log = p.logged();
    assert!(log.contains("SIGHUP: the configuration is not reloaded"), "{log}");
    assert!(log.contains("no requests in flight; exiting"), "{log}");
}

/// Started under `nohup`, as people start a server from a shell they will
/// close: the terminal's hangup does not stop it (SIGHUP stays ignored, as
/// it was before the proxy had a handler for it); SIGTERM still drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_with_nohup_outlives_the_hangup() {
    let o = Origin::start(|req| serve_file(req, 1000, Some("video/mp4")).into()).await;
    let mut nohup = Command::new("nohup");
    nohup.arg(BIN);
    let mut p =
        Running::spawn("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n", Some("info"), &[], nohup)
            .await;
    let path = relay_path("v.mp4", &o.url("/v.mp4"));
    assert_eq!(get(p.addr(), "GET", &path, &[]).await.status, 200);
    unsafe_kill(p.child.id(), "HUP");
    // A handled SIGHUP turns /healthz 503 at once; an ignored one never
    // does: it keeps answering and serving for a while after.
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], p.admin));
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(p.child.try_wait().unwrap().is_none(), "the hangup ended the process");
        assert_eq!(get(admin, "GET", "/healthz", &[]).await.status, 200, "the hangup started a drain");
    }
    let got = get(p.addr(), "GET", &path, &[]).await;
    assert_eq!((got.status, got.body.len()), (200, 1000));
    p.terminate();
    let status = p.exit_status(Duration::from_secs(8), "did not exit after SIGTERM").await;
    assert!(status.success(), "{status:?}");
    let log = p.logged();
    assert!(log.contains("SIGHUP was ignored when the proxy started (nohup): it stays ignored"), "{log}");
    assert!(!log.contains("SIGHUP: the configuration is not reloaded"), "{log}");
}

/// `--health` with the configuration `p` runs with: (exit 0, its output).
fn health(p: &Running) -> (bool, String) {
    let out = Command::new(BIN).arg("--config").arg(p.cfg.path()).arg("--health").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_secrets_or_upstream_urls() {
    let resumed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = resumed.clone();
    let o = Origin::start(move |req| match req.path() {
        "/die-secret-path.mp4" => Resp::new(200, Body::DieAfter { declared: 100_000, sent: pattern(0, 1000) }).into(),
        // Dies once, then is resumed: the log says so, without the path or query.
        "/resume-secret-path.mp4" if !once.swap(true, std::sync::atomic::Ordering::SeqCst) => {
            let mut r = serve_file(req, 100_000, Some("video/mp4"));
            r.body = Body::DieAfter { declared: 100_000, sent: pattern(0, 1000) };
            r.into()
        }
        "/resume-secret-path.mp4" => serve_file(req, 100_000, Some("video/mp4")).into(),
        "/throttled-secret-path.mp4" => Resp::new(429, Body::Bytes(Vec::new())).header("Retry-After", "1").into(),
        _ => serve_file(req, 1000, Some("video/mp4")).into(),
    })
    .await;
    let secret = "s3cr3t-VALUE-42";
    let mut p = Running::start_logging(
        "auth: {mode: token}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n",
        // The most a user can ask for: Pingora's trace lines print whole heads.
        Some("trace,access=info"),
        &[("ANIBRIDGE_PROXY_SECRET", secret)],
    )
    .await;
    let signed = |path: &str| {
        let mut q = anibridge_proxy::auth::Query(vec![("u".into(), o.url(path))]);
        let s = anibridge_proxy::auth::sign(secret.as_bytes(), &q);
        q.0.push(("sig".into(), s));
        (format!("/strm/proxy/v.mp4?{}", q.encode()), q.get("sig").unwrap().to_string())
    };
    let (ok, sig_ok) = signed("/secret-path.mp4");
    assert_eq!(get(p.addr(), "GET", &ok, &[]).await.status, 200);
    let (dies, sig_dies) = signed("/die-secret-path.mp4");
    assert!(!get(p.addr(), "GET", &dies, &[]).await.complete);
    // A ranged request for all of it: the upstream's 206 is what the line
    // reports, also when the cache keeps it as the whole object's 200.
    let (ranged, _) = signed("/ranged-secret-path.mp4");
    assert_eq!(get(p.addr(), "GET", &ranged, &[("Range", "bytes=0-")]).await.status, 206);
    let (resumes, sig_resumes) = signed("/resume-secret-path.mp4?token=TOKEN-in-query");
    assert!(get(p.addr(), "GET", &resumes, &[]).await.complete);
    let bad = format!("{}&sig=0123456789abcdef-BADSIG", relay_path("v.mp4", &o.url("/secret-path.mp4")));
    assert_eq!(get(p.addr(), "GET", &bad, &[("X-Api-Key", "KEY-should-not-log")]).await.status, 401);
    let (throttled, sig_throttled) = signed("/throttled-secret-path.mp4?token=TOKEN-in-query");
    assert_eq!(get(p.addr(), "GET", &throttled, &[]).await.status, 429);
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.terminate();
    let _ = p.child.wait();
    let log = p.logged();
    assert!(log.contains("\"GET /strm/proxy/v.mp4\" 200 1000 ") && log.contains("route=relay"), "access lines: {log}");
    assert!(
        log.contains("after 1000 body bytes (ConnectionClosed); resuming at byte 1000"),
        "one line per resumption: {log}"
    );
    assert!(
        log.lines().any(|l| l.contains("\"GET /strm/proxy/v.mp4\" 206 1000 ") && l.contains(" upstream_status=206 ")),
        "the upstream's own status: {log}"
    );
    // With the cache on, the body came through a fill that was resumed: the
    // client's line says so as a relay's does.
    assert!(
        log.lines().any(|l| l.contains("\"GET /strm/proxy/v.mp4\" 200 100000 ") && l.contains(" resumed=1 ")),
        "the resumed body's access line counts the resumption: {log}"
    );
    assert!(
        log.contains("WARN  anibridge_proxy::gate] upstream host 127.0.0.1 refused (429): cooling down for 1 s"),
        "a WARN line when a host enters cooldown, with host and seconds: {log}"
    );
    let needles = [
        secret,
        &sig_ok,
        &sig_dies,
        &sig_resumes,
        &sig_throttled,
        "BADSIG",
        "secret-path",
        "KEY-should-not-log",
        "u=http",
    ];
    for needle in needles.into_iter().chain(["TOKEN-in-query"]) {
        assert!(!log.contains(needle), "log contains {needle:?}:\n{log}");
    }
}

/// Soak: two rounds of 10 000+ mixed requests (random ranges, full bodies, HEADs,
/// playlists, slow readers, early disconnects, injected upstream faults)
/// from 32 concurrent clients against the real binary. Every completed
/// body is checked byte for byte; RSS and open fds are reported before and
/// after. Bounded (a few minutes); run it with
///   cargo test --release --test binary soak -- --ignored --nocapture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long-running soak; run explicitly (see BENCHMARKS.md)"]
async fn soak_mixed_requests_with_faults() {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    const FILE: u64 = 4 * MB;
    let o = Origin::start(|req| match req.path() {
        "/list.m3u8" => {
            let mut s = String::from("#EXTM3U\n#EXT-X-TARGETDURATION:2\n");
            for i in 0..200 {
                s.push_str(&format!("#EXTINF:2.0,\nseg{i:03}.ts\n"));
            }
            Resp::new(200, Body::Bytes(s.into_bytes())).header("Content-Type", "application/vnd.apple.mpegurl").into()
        }
        "/die.mp4" => Resp::new(200, Body::DieAfter { declared: 1_000_000, sent: pattern(0, 50_000) }).into(),
        "/busy" => Resp::new(503, Body::Bytes(b"busy".to_vec())).into(),
        _ => serve_file(req, FILE, Some("video/mp4")).into(),
    })
    .await;
    let p = Running::start("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    let pid = p.child.id();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let rss = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
            / 1024
    };
    let (fds0, rss0) = (fds(), rss());
    let addr = p.addr();
    let file = Arc::new(o.url("/v.mp4"));
    let list = Arc::new(o.url("/list.m3u8"));
    let die = Arc::new(o.url("/die.mp4"));
    let busy = Arc::new(o.url("/busy"));
    let dead_port = RefusedPort::bind();
    let dead = dead_port.addr();
    let counts: Arc<[AtomicU64; 8]> = Arc::new(Default::default());
    // 0 ok, 1 corrupted, 2 unexpected status, 3 disconnects, 4 faults seen as expected, 5 aborted (expected), 6 bytes
    let mut after_round = Vec::new();
    for _round in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(150);
        let per_worker = 330;
        let mut tasks = Vec::new();
        for w in 0..32u64 {
            let (file, list, die, busy, counts) =
                (file.clone(), list.clone(), die.clone(), busy.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = w.wrapping_mul(0x9e3779b97f4a7c15) | 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for _ in 0..per_worker {
                    if Instant::now() > deadline {
                        break;
                    }
                    let kind = next() % 10;
                    let c = &counts;
                    match kind {
                        0..=3 => {
                            let start = next() % (FILE - 1);
                            let len = 1 + next() % (256 * 1024).min(FILE - start);
                            let range = format!("bytes={}-{}", start, start + len - 1);
                            let got = get(addr, "GET", &relay_path("v.mp4", &file), &[("Range", &range)]).await;
                            if got.status != 206 {
                                c[2].fetch_add(1, Ordering::Relaxed);
                            } else if got.complete && got.body == pattern(start, len) {
                                c[0].fetch_add(1, Ordering::Relaxed);
                                c[6].fetch_add(len, Ordering::Relaxed);
                            } else {
                                c[1].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        4 => {
                            let got = get(addr, "HEAD", &relay_path("v.mp4", &file), &[]).await;
                            let ok = got.status == 200 && got.header("content-length") == Some(&*FILE.to_string());
                            c[if ok { 0 } else { 2 }].fetch_add(1, Ordering::Relaxed);
                        }
                        5 => {
                            let got = get(addr, "GET", &relay_path("list.m3u8", &list), &[]).await;
                            let ok = got.status == 200
                                && got.complete
                                && got.text().lines().filter(|l| l.starts_with("/strm/proxy/seg")).count() == 200;
                            c[if ok { 0 } else { 1 }].fetch_add(1, Ordering::Relaxed);
                        }
                        6 => {
                            // Early disconnect after the first bytes.
                            let mut cl = Client::connect(addr).await;
                            cl.send_raw(
                                format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("v.mp4", &file)).as_bytes(),
                            )
                            .await;
                            let mut sock = cl.into_inner();
                            let mut buf = vec![0u8; 16 * 1024];
                            let _ = sock.read(&mut buf).await;
                            drop(sock);
                            c[3].fetch_add(1, Ordering::Relaxed);
                        }
                        7 => {
                            // Slow reader of 512 KiB.
                            let start = next() % (FILE - 512 * 1024);
                            let range = format!("bytes={}-{}", start, start + 512 * 1024 - 1);
                            let mut cl = Client::connect(addr).await;
                            cl.send_raw(
                                format!(
                                    "GET {} HTTP/1.1\r\nHost: x\r\nRange: {range}\r\n\r\n",
                                    relay_path("v.mp4", &file)
                                )
                                .as_bytes(),
                            )
                            .await;
                            let mut sock = cl.into_inner();
                            let mut data = Vec::new();
                            let mut buf = vec![0u8; 32 * 1024];
                            loop {
                                tokio::time::sleep(Duration::from_millis(2)).await;
                                match sock.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => data.extend_from_slice(&buf[..n]),
                                }
                                if let Some(h) = find(&data, b"\r\n\r\n") {
                                    if data.len() >= h + 4 + 512 * 1024 {
                                        break;
                                    }
                                }
                            }
                            let h = find(&data, b"\r\n\r\n").map(|h| h + 4).unwrap_or(data.len());
                            let body = &data[h..];
                            c[if body == pattern(start, 512 * 1024).as_slice() { 0 } else { 1 }]
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        8 => {
                            // Upstream dies mid-body: the client must see an aborted response.
                            let got = get(addr, "GET", &relay_path("d.mp4", &die), &[]).await;
                            let prefix_ok = got.body == pattern(0, got.body.len() as u64);
                            c[if got.status == 200 && !got.complete && prefix_ok { 5 } else { 1 }]
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            let (target, want) = if next() % 2 == 0 {
                                (busy.to_string(), 503)
                            } else {
                                (format!("http://{dead}/x"), 502)
                            };
                            let got = get(addr, "GET", &relay_path("x", &target), &[]).await;
                            c[if got.status == want { 4 } else { 2 }].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        after_round.push((fds(), rss()));
    }
    let (fds1, rss1) = after_round[1];

    let c: Vec<u64> = counts.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let total: u64 = c[..6].iter().sum();
    eprintln!(
        "SOAK requests={total} ok={} corrupted={} unexpected_status={} early_disconnects={} expected_fault_statuses={} expected_aborts={} verified_bytes={} fds {fds0} -> {} -> {fds1} rss_mib {rss0} -> {} -> {rss1}",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], after_round[0].0, after_round[0].1
    );
    assert!(total >= 20_000, "only {total} requests ran before the time bound");
    assert_eq!(c[1], 0, "corrupted responses");
    assert_eq!(c[2], 0, "unexpected statuses");
    assert!(fds1 <= fds0 + 80, "fds grew {fds0} -> {fds1}");
    // The second round (same load) must not grow memory beyond the first's
    // warm-up by more than noise.
    assert!(rss1 <= after_round[0].1 + 16, "RSS grew between identical rounds: {:?}", after_round);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upstream_is_never_held_back() {
    // 1000-byte pieces, 2 s apart: each must reach the client while the
    // origin is still pausing, not wait in the proxy's write buffer.
    let o = Origin::start(|_| {
        let body = Body::Slow { len: 3000, piece: 1000, pause: Duration::from_secs(2) };
        Resp::new(200, body).header("Content-Type", "video/mp2t").into()
    })
    .await;
    let p = Running::start("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("live.ts", &o.url("/live.ts"))).as_bytes())
        .await;
    let mut sock = c.into_inner();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 8192];
    for want in [1000usize, 2000] {
        loop {
            if let Some(h) = find(&seen, b"\r\n\r\n") {
                if seen.len() - (h + 4) >= want {
                    break;
                }
            }
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            seen.extend_from_slice(&buf[..n]);
        }
        // The origin has not sent the next piece yet: what the client holds
        // was flushed while the upstream paused.
        assert_eq!(o.body_bytes_written.load(Ordering::SeqCst), want as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    // ~200 KB/s for ~4 minutes, in small pieces (the relay flushes between them).
    let o = Origin::start(|_| {
        let body = Body::Slow { len: 50 * MB, piece: 2000, pause: Duration::from_millis(10) };
        Resp::new(200, body).header("Content-Type", "video/mp2t").into()
    })
    .await;
    let p = Running::start(
        "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\ndownstream: {write_timeout: \"1s\"}\n",
    )
    .await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(p.addr()).await.unwrap();
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("live.ts", &o.url("/live.ts"))).as_bytes())
        .await
        .unwrap();
    // Never read. The proxy must give up on this client and drop the upstream.
    let deadline = Instant::now() + Duration::from_secs(60);
    while o.connections.load(Ordering::SeqCst) == 0 || o.open_connections.load(Ordering::SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "stalled client still held after 60 s ({} bytes sent by the origin)",
            o.body_bytes_written.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(o.body_bytes_written.load(Ordering::SeqCst) < 40 * MB);
    drop(stream);
}

/// The test servers' nginx takes a port found free; when another process
/// takes it first (here: the first port, bound before nginx starts), nginx
/// exits, and the next port is tried instead of the test failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_nginx_moves_to_another_port_when_its_port_is_taken() {
    if common::tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    let taken = std::sync::Mutex::new(Vec::new());
    let (_nginx, port) = common::process::nginx_on_a_free_port(|port| {
        let mut taken = taken.lock().unwrap();
        if taken.is_empty() {
            taken.push((port, std::net::TcpListener::bind(("127.0.0.1", port)).unwrap()));
        }
        format!("server {{ listen 127.0.0.1:{port}; access_log off; return 204; }}\n")
    })
    .await;
    let first = taken.lock().unwrap()[0].0;
    assert_ne!(port, first, "the taken port was not kept");
    let got = get(([127, 0, 0, 1], port).into(), "GET", "/", &[]).await;
    assert_eq!(got.status, 204);
}

/// A real nginx serving the files in `root` on an ephemeral port.
async fn nginx_serving(root: &std::path::Path) -> (common::process::Spawned, u16) {
    common::process::nginx_on_a_free_port(|port| {
        format!("server {{ listen 127.0.0.1:{port}; root {}; access_log off; }}\n", root.display())
    })
    .await
}

/// DESIGN "Many viewers, one hoster fetch" — memory: 2 GiB of distinct
/// cacheable objects (128 of 16 MiB, from nginx) streamed through the
/// binary with the default config (cache.max_bytes 128 MiB) keep its peak
/// RSS within idle + max_bytes + 15 %; an object over max_object_bytes then
/// passes through without growing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_keeps_memory_within_max_bytes() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let obj = pattern(0, 16 * MB);
    std::fs::write(root.path().join("obj.bin"), &obj).unwrap();
    std::fs::write(root.path().join("big.bin"), pattern(0, 64 * MB)).unwrap();
    let (nginx, port) = nginx_serving(root.path()).await;
    let p = Running::start("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\ncache: {}\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = p.rss();
    /// Reads a response to the end, returning its status and body length.
    async fn drain(addr: std::net::SocketAddr, path: &str) -> (u16, u64, Vec<u8>) {
        let mut c = Client::connect(addr).await;
        c.send_raw(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await;
        let mut sock = c.into_inner();
        let mut buf = vec![0u8; 256 * 1024];
        let mut head = Vec::new();
        let (mut status, mut body, mut first) = (0, 0u64, Vec::new());
        loop {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                return (status, body, first);
            }
            if status == 0 {
                head.extend_from_slice(&buf[..n]);
                let Some(end) = find(&head, b"\r\n\r\n") else { continue };
                status = std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap();
                first = head[end + 4..].to_vec();
                body += first.len() as u64;
            } else {
                body += n as u64;
            }
        }
    }
    let url = |name: &str, i: usize| relay_path("o.bin", &format!("http://127.0.0.1:{port}/{name}?i={i}"));
    // Stored bodies live in sealed files, outside the RSS: the memory held
    // is the RSS plus them, sampled while the objects stream through.
    let p = Arc::new(p);
    let held = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let (p, held) = (p.clone(), held.clone());
        async move {
            loop {
                held.fetch_max(p.rss() + p.sealed(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    for batch in 0..64 {
        let (one, two) = (url("obj.bin", 2 * batch), url("obj.bin", 2 * batch + 1));
        let (a, b) = tokio::join!(drain(p.addr(), &one), drain(p.addr(), &two));
        for (status, len, first) in [a, b] {
            assert_eq!((status, len), (200, 16 * MB));
            assert!(obj.starts_with(&first), "the first bytes are the file's");
        }
    }
    sampler.abort();
    let after_cache = p.peak_rss();
    let most_held = held.load(Ordering::Relaxed);
    let bound = idle + (128 * MB) * 115 / 100;
    eprintln!(
        "idle {} MiB, peak RSS after 2 GiB through the cache {} MiB, most held (RSS + sealed, sampled) {} MiB, \
         sealed now {} MiB (bound {} MiB)",
        idle / MB,
        after_cache / MB,
        most_held / MB,
        p.sealed() / MB,
        bound / MB
    );
    assert!(p.sealed() > 64 * MB, "stored bodies are in sealed files, and counted here");
    for (what, bytes) in [("peak RSS", after_cache), ("RSS + sealed files", most_held)] {
        assert!(bytes <= bound, "{what} {} MiB over idle {} MiB + cache.max_bytes + 15 %", bytes / MB, idle / MB);
    }
    for i in 0..2 {
        assert_eq!(drain(p.addr(), &url("big.bin", i)).await.0, 200);
    }
    let after_big = p.peak_rss();
    assert!(
        after_big <= after_cache + 8 * MB,
        "a 64 MiB object passed through: peak {} -> {} MiB",
        after_cache / MB,
        after_big / MB
    );
    drop(nginx);
    drop(p);
}

/// A rewritten playlist can be many times its upstream's size: one of a
/// million one-letter URIs (2 MB, from nginx) becomes 55 MB of proxy URLs.
/// It is sent as it is made, a piece at a time, with its exact length:
/// the proxy's peak RSS grows by a small part of that. (It grew by more
/// than the whole rewrite when the rewrite was made whole first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_playlist_many_times_larger_rewritten_goes_out_without_being_held() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let lines = 1_000_000;
    let playlist = format!("#EXTM3U\n#EXT-X-TARGETDURATION:4\n{}#EXT-X-ENDLIST\n", "a\n".repeat(lines));
    std::fs::write(root.path().join("list.m3u8"), &playlist).unwrap();
    let (_nginx, port) = nginx_serving(root.path()).await;
    let p = Running::start("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = p.rss();
    let path = relay_path("list.m3u8", &format!("http://127.0.0.1:{port}/list.m3u8"));
    let child = format!("/strm/proxy/a.ts?u=http%3A%2F%2F127.0.0.1%3A{port}%2Fa\n");
    let want = playlist.len() - 2 * lines + lines * child.len();
    let head = get(p.addr(), "HEAD", &path, &[]).await;
    assert_eq!(head.header("content-length"), Some(&*want.to_string()));
    let got = get(p.addr(), "GET", &path, &[]).await;
    assert_eq!((got.status, got.header("content-length")), (200, Some(&*want.to_string())));
    assert!(got.complete);
    let text = got.text();
    assert!(text.starts_with(&format!("#EXTM3U\n#EXT-X-TARGETDURATION:4\n{child}")), "{}", &text[..200]);
    assert_eq!(text.matches(&*child).count(), lines);
    let grown = p.peak_rss().saturating_sub(idle);
    eprintln!(
        "a {} MB playlist rewritten to {} MB: peak RSS grew by {} MiB",
        playlist.len() / 1_000_000,
        want / 1_000_000,
        grown / MB
    );
    assert!(grown < 24 * MB, "peak RSS grew by {} MiB for a {} MiB rewrite", grown / MB, want as u64 / MB);
}

/// A second instance on a taken port exits at once, non-zero, naming the
/// address and the reason (Pingora alone would retry every second, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_fails_at_once_with_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    for (listen, admin) in [(busy, unused_addr()), (unused_addr(), busy)] {
        let cfg = config_file(&format!("listen: \"{listen}\"\nadmin_listen: \"{admin}\"\nauth: {{mode: none}}\n"));
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(cfg.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("still running 10 s after it could not listen on {busy}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut err = String::new();
        use std::io::Read;
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("cannot listen on {busy}")) && err.contains("in use"), "{err}");
        assert!(!err.contains("listening on"), "it never says it listens: {err}");
    }
}

/// A short token-mode secret is accepted, with a warning saying how to make
/// a good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_secret_is_warned_about() {
    let mut p =
        Running::start_logging("auth: {mode: token}\n", Some("warn"), &[("ANIBRIDGE_PROXY_SECRET", "abc")]).await;
    p.terminate();
    let _ = p.child.wait();
    let log = p.logged();
    assert!(log.contains("auth.secret is only 3 bytes") && log.contains("openssl rand -hex 32"), "{log}");
    assert!(!log.contains("abc"), "never the secret itself: {log}");
}

/// The access log: on by default (no `RUST_LOG`), one line per request on
/// standard output, text or JSON; the client from trusted proxies'
/// `X-Forwarded-For` only; the request id kept or made, and returned; the
/// body bytes actually sent (a 401's too); never a query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_says_who_asked_what_and_how_it_went() {
    let o = Origin::start(|req| serve_file(req, 5000, Some("video/mp4")).into()).await;
    let path = signed_relay_path("ep1.mp4", &o.url("/v.mp4?token=SECRET-TOKEN"), None);
    let asked =
        [("X-Forwarded-For", "198.51.100.7, 10.9.9.9"), ("X-Request-Id", "req-42"), ("User-Agent", "mpv/0.35 Schöne")];
    for (format, trusted) in [("json", "[\"127.0.0.1/32\", \"10.0.0.0/8\"]"), ("text", "[]")] {
        let extra = format!(
            "auth: {{mode: token}}\negress: {{allow_cidrs: [\"127.0.0.0/8\"]}}\nlog: {{format: {format}, trusted_proxies: {trusted}}}\n"
        );
        let mut p = Running::spawn(&extra, Some(""), &[("ANIBRIDGE_PROXY_SECRET", SECRET)], Command::new(BIN)).await;
        let ok = get(p.addr(), "GET", &path, &asked).await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("x-request-id"), Some("req-42"), "returned");
        let refused = get(p.addr(), "GET", "/strm/proxy/x.mp4?u=http%3A%2F%2Fa.example%2F&sig=00", &[]).await;
        assert_eq!(refused.status, 401);
        let made = refused.header("x-request-id").unwrap().to_string();
        assert_eq!(made.len(), 16, "a new id when the client sends none");
        p.terminate();
        let _ = p.child.wait();
        let log = p.logged();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("/strm/proxy/")).collect();
        assert_eq!(lines.len(), 2, "one line per request, with RUST_LOG unset: {log}");
        // Each is written as its request ends, which for the first can come
        // after the second has been answered: find them by path.
        let by_path =
            |p: &str| *lines.iter().find(|l| l.contains(p)).unwrap_or_else(|| panic!("no line for {p}: {log}"));
        let lines = [by_path("/strm/proxy/ep1.mp4"), by_path("/strm/proxy/x.mp4")];
        for needle in ["token=", "SECRET-TOKEN", "sig=", "u=", SECRET, "?"] {
            assert!(lines.iter().all(|l| !l.contains(needle)), "{needle:?} in {lines:?}");
        }
        if format == "json" {
            let ok: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
            assert_eq!(ok["client"], "198.51.100.7", "the first untrusted hop: {ok}");
            assert_eq!((ok["method"].as_str(), ok["path"].as_str()), (Some("GET"), Some("/strm/proxy/ep1.mp4")));
            assert_eq!(
                (ok["route"].as_str(), ok["status"].as_u64(), ok["bytes"].as_u64()),
                (Some("relay"), Some(200), Some(5000))
            );
            assert_eq!((ok["upstream_host"].as_str(), ok["upstream_status"].as_u64()), (Some("127.0.0.1"), Some(200)));
            assert_eq!(
                (ok["user_agent"].as_str(), ok["request_id"].as_str()),
                (Some("mpv/0.35 Schöne"), Some("req-42"))
            );
            assert!(ok["ms"].is_u64() && ok["ttfb_ms"].is_u64() && ok["resumed"] == 0, "{ok}");
            // `miss`, or null with the cache off.
            assert!(if cache_on() { ok["cache"] == "miss" } else { ok["cache"].is_null() }, "{ok}");
            let refused: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
            assert_eq!((refused["status"].as_u64(), refused["bytes"].as_u64()), (Some(401), Some(18)), "{refused}");
            assert_eq!(refused["request_id"].as_str(), Some(made.as_str()));
        } else {
            assert!(
                lines[0].contains(" 127.0.0.1 \"GET /strm/proxy/ep1.mp4\" 200 5000 "),
                "an untrusted peer's XFF is ignored: {}",
                lines[0]
            );
            assert!(lines[0].contains("ua=\"mpv/0.35 Schöne\" id=req-42"), "{}", lines[0]);
            assert!(lines[1].contains("\" 401 18 "), "{}", lines[1]);
        }
        // The proxy's own messages are not on standard output's lines.
        assert!(log.lines().filter(|l| l.contains(" INFO ")).all(|l| !l.contains("/strm/proxy/")));
    }
}

/// Readers of standard output and standard error that stop reading (a
/// stalled log shipper, a container runtime's full log pipe) do not stop
/// the proxy: its lines wait in queues of their own. Before, each request
/// wrote its lines itself, and once a pipe was full every worker blocked at
/// its next line: about 350 requests were answered, then none. Here 1 000
/// requests to a hoster that refuses connections (each an access line on
/// standard output and a warning on standard error: some 200 KB and 80 KB,
/// more than either pipe holds) are all answered while nobody reads, and
/// then every line arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_of_the_logs_do_not_stall_the_proxy() {
    const REQUESTS: usize = 1000;
    let refusing = unused_addr();
    let mut p = Running::start_piped("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    let addr = p.addr();
    let path = |i: usize| relay_path(&format!("line{i:04}.txt"), &format!("http://{refusing}/a.txt"));
    for i in 0..REQUESTS {
        let got = tokio::time::timeout(Duration::from_secs(10), get(addr, "GET", &path(i), &[]))
            .await
            .unwrap_or_else(|_| panic!("request {i} got no answer: the proxy waits for its logs to be read"));
        assert_eq!(got.status, 502);
    }
    // Now read both: every line comes out.
    let read_until = |mut from: Box<dyn std::io::Read + Send>, needle: &'static str| {
        tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            let mut buf = [0u8; 65536];
            while text.matches(needle).count() < REQUESTS {
                let n = from.read(&mut buf).unwrap();
                assert!(n > 0, "the stream ended early");
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            text
        })
    };
    let out = read_until(Box::new(p.child.stdout.take().unwrap()), "/strm/proxy/line");
    let err = read_until(Box::new(p.child.stderr.take().unwrap()), "upstream failed");
    let (out, err) = tokio::time::timeout(Duration::from_secs(20), async { (out.await, err.await) })
        .await
        .expect("the lines arrive");
    let (out, err) = (out.unwrap(), err.unwrap());
    // (In the order the requests ended, which for two in a row may not be
    // the order they were answered.)
    let mut seen: Vec<usize> =
        out.lines().filter_map(|l| l.split("/strm/proxy/line").nth(1)).map(|rest| rest[..4].parse().unwrap()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..REQUESTS).collect::<Vec<_>>(), "one access line for every request");
    assert!(out.lines().all(|l| l.contains(" 502 ")), "standard output holds access lines only");
    assert_eq!(err.matches("upstream failed").count(), REQUESTS, "one warning for every request");
    assert!(!err.contains("dropped"), "the queues held them all");
}

/// A proxy (logging, `shutdown_grace: grace`) half a second into a long
/// stream of `upstream_path` (a 50 MB body at about 500 KB/s, never
/// stored: still running whenever the test stops the proxy), and the
/// download (to see it cut); the origin lives as long as the returned value.
async fn streaming(grace: &str, upstream_path: &str) -> (Running, Origin, tokio::task::JoinHandle<Got>) {
    let o = Origin::start(|_| {
        Resp::new(200, Body::Slow { len: 50_000_000, piece: 10_000, pause: Duration::from_millis(20) })
            .header("Cache-Control", "no-store")
            .into()
    })
    .await;
    let p = Running::start_logging(
        &format!("auth: {{mode: none}}\negress: {{allow_cidrs: [\"127.0.0.0/8\"]}}\nshutdown_grace: \"{grace}\"\n"),
        Some("info"),
        &[],
    )
    .await;
    let addr = p.addr();
    let path = relay_path("long.ts", &o.url(upstream_path));
    let download = tokio::spawn(async move { get(addr, "GET", &path, &[]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    (p, o, download)
}

/// A stream still running when `shutdown_grace` ends is cut, and says so:
/// its access line (with the bytes it sent, marked cut) and a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_by_the_shutdown_leave_a_trace() {
    let (mut p, _origin, download) = streaming("1s", "/long.ts?secret-query").await;
    p.terminate();
    let status = p.exit_status(Duration::from_secs(10), "did not exit after the grace period").await;
    assert!(status.success(), "{status:?}");
    let got = download.await.unwrap();
    assert!(!got.complete, "the stream was cut");
    let log = p.logged();
    let line = log
        .lines()
        .find(|l| l.contains("cut=true"))
        .unwrap_or_else(|| panic!("no access line for the cut stream: {log}"));
    assert!(line.contains("\"GET /strm/proxy/long.ts\" 200 ") && line.contains("route=relay"), "{line}");
    let sent: u64 = line.split("\" 200 ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(sent > 0 && sent <= got.body.len() as u64 + 256 * 1024, "{sent} bytes logged, {} received", got.body.len());
    assert!(log.contains("WARN  anibridge_proxy::server] stream cut by the shutdown after"), "{log}");
    assert!(!log.contains("secret-query"), "{log}");
}

/// Ctrl-C pressed twice (or a second `kill`) while streams drain ends the
/// drain at once instead of waiting out `shutdown_grace`: what still runs
/// is cut, with its access line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_the_drain_at_once() {
    let (mut p, _origin, download) = streaming("5m", "/long.ts").await;
    unsafe_kill(p.child.id(), "INT");
    // The first is taken once /healthz says so; the stream keeps the
    // process draining.
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], p.admin));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(admin, "GET", "/healthz", &[]).await.status != 503 {
        assert!(Instant::now() < deadline, "the first SIGINT did not start a drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(p.child.try_wait().unwrap().is_none(), "a stream is running: the drain waits for it");
    unsafe_kill(p.child.id(), "INT");
    let status = p.exit_status(Duration::from_secs(10), "still draining after a second SIGINT").await;
    assert!(status.success(), "{status:?}");
    assert!(!download.await.unwrap().complete, "the stream was cut");
    let log = p.logged();
    assert!(log.contains("SIGINT while draining: the drain ends now"), "{log}");
    assert!(log.lines().any(|l| l.contains("cut=true") && l.contains("\"GET /strm/proxy/long.ts\" 200 ")), "{log}");
    assert!(log.contains("stream cut by the shutdown after"), "{log}");
}

/// Each upstream failure's log line names the host and port and the cause
/// in plain words; the client's reason stays the short one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_name_the_place_and_the_cause() {
    let hangs = Origin::start(|_| Action::Hang).await;
    let closed_port = RefusedPort::bind();
    let closed = closed_port.addr();
    // Answers a TLS hello with plain text.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_addr = plain.local_addr().unwrap();
    std::thread::spawn(move || {
        while let Ok((mut s, _)) = plain.accept() {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let mut p = Running::start_logging(
        "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\nupstream: {read_timeout: \"500ms\"}\n",
        Some("warn"),
        &[],
    )
    .await;
    for (url, status, reason) in [
        (format!("http://{closed}/x.mp4"), 502, "upstream unreachable"),
        (hangs.url("/x.mp4"), 504, "upstream timeout"),
        (format!("https://{plain_addr}/x.mp4"), 502, "upstream unreachable"),
    ] {
        let got = get(p.addr(), "GET", &relay_path("x.mp4", &url), &[]).await;
        assert_eq!((got.status, got.text()), (status, format!("{reason}\n")), "{url}");
    }
    p.terminate();
    let _ = p.child.wait();
    let log = p.logged();
    for line in [
        format!("upstream failed: {closed}: connection refused"),
        format!("upstream failed: 127.0.0.1:{}: no response within upstream.read_timeout", hangs.addr.port()),
        format!(
            "upstream failed: {plain_addr}: TLS handshake failed (received corrupt message of type InvalidContentType)"
        ),
    ] {
        assert!(log.contains(&line), "{line:?} not in {log}");
    }
}

/// A fill that dies for good (no validator: it cannot be resumed) is
/// logged once, not once per reader it aborts, nor once by the upstream's
/// read and again by the fill: five viewers of one dying file leave one
/// WARN (why) and, at INFO, the fill's line (what it cost), no ERROR
/// lines, and each viewer's access line says its response failed. The
/// WARN carries no request id: the fill served five.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_dies_is_logged_once_not_once_per_reader() {
    let o = Origin::start(|_| {
        let dies = Body::DieAfter { declared: 100_000, sent: pattern(0, 1000) };
        Action::Delayed(Duration::from_millis(300), Resp::new(200, dies).header("Content-Type", "video/mp4"))
    })
    .await;
    let mut p = Running::start_logging(
        "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\ncache: {}\n",
        Some("info"),
        &[],
    )
    .await;
    for r in spawn_gets(5, p.addr(), "GET", &relay_path("x.mp4", &o.url("/dies.mp4"))) {
        assert!(!r.await.unwrap().complete);
    }
    assert_eq!(o.requests().len(), 1, "one fill for the five");
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.terminate();
    let _ = p.child.wait();
    let log = p.logged();
    let warned = log.lines().filter(|l| l.contains("WARN")).collect::<Vec<_>>();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("upstream 127.0.0.1 failed mid-body (ConnectionClosed)"), "{log}");
    assert!(!warned[0].contains(" id="), "a fill serves many requests: {log}");
    let fill = log.lines().filter(|l| l.contains("cache fill from 127.0.0.1 failed mid-body")).collect::<Vec<_>>();
    assert_eq!(fill.len(), 1, "{log}");
    assert!(fill[0].contains("INFO") && fill[0].contains("nothing stored, its readers aborted"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    let failed = log.lines().filter(|l| l.contains("\"GET /strm/proxy/x.mp4\" 200 1000 ")).collect::<Vec<_>>();
    assert_eq!(failed.len(), 5, "{log}");
    assert!(failed.iter().all(|l| l.contains("error=\"ConnectionClosed\"")), "{log}");
}

/// A fill that fails before its header (the hoster does not answer) is
/// said once, by the request that started it, not once per viewer that
/// joined it: five viewers, one WARN, five access lines with the 504. The
/// WARN ends with the id of the request that said it, as one of the
/// access lines has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_fails_before_its_header_is_logged_once() {
    let o = Origin::start(|_| Action::Hang).await;
    let mut p = Running::start_logging(
        "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\ncache: {}\nupstream: {read_timeout: \"1s\"}\n",
        Some("info"),
        &[],
    )
    .await;
    for r in spawn_gets(5, p.addr(), "GET", &relay_path("x.mp4", &o.url("/hangs.mp4"))) {
        assert_eq!(r.await.unwrap().status, 504);
    }
    assert_eq!(o.requests().len(), 1, "one fill for the five");
    p.terminate();
    let _ = p.child.wait();
    let log = p.logged();
    let warned = log.lines().filter(|l| l.contains("WARN")).collect::<Vec<_>>();
    assert_eq!(warned.len(), 1, "{log}");
    let port = o.addr.port();
    let (said, id) = warned[0].rsplit_once(" id=").unwrap_or_else(|| panic!("no request id: {log}"));
    assert!(said.ends_with(&format!("upstream failed: 127.0.0.1:{port}: no response within upstream.read_timeout")));
    let answered: Vec<&str> = log.lines().filter(|l| l.contains("\"GET /strm/proxy/x.mp4\" 504 ")).collect();
    assert_eq!(answered.len(), 5, "{log}");
    assert_eq!(answered.iter().filter(|l| l.contains(&format!(" id={id}"))).count(), 1, "{log}");
}

/// A relayed body whose upstream dies for good (no validator: it cannot be
/// resumed) is logged once, as the WARN that says why, not again as an
/// ERROR of Pingora's; the access line says the response failed. The WARN
/// ends with the request's id (the client's own `X-Request-Id`), as the
/// access line does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_upstream_dies_is_logged_once_without_an_error() {
    let o = Origin::start(|_| {
        let dies = Body::DieAfter { declared: 100_000, sent: pattern(0, 1000) };
        Resp::new(200, dies).header("Content-Type", "video/mp4").into()
    })
    .await;
    let mut p = Running::start_logging(
        "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\ncache: {max_bytes: 0}\n",
        Some("warn,access=info"),
        &[],
    )
    .await;
    let path = relay_path("x.mp4", &o.url("/dies.mp4"));
    let got = get(p.addr(), "GET", &path, &[("X-Request-Id", "player-7")]).await;
    assert!(!got.complete);
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.terminate();
    let _ = p.child.wait();
    let log = p.logged();
    let why = "upstream 127.0.0.1 failed mid-body (ConnectionClosed); the response cannot be resumed: \
               it has no strong ETag or Last-Modified";
    assert_eq!(log.matches(why).count(), 1, "{log}");
    assert!(log.lines().any(|l| l.contains("WARN") && l.ends_with(&format!("{why} id=player-7"))), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    let line =
        log.lines().find(|l| l.contains("\"GET /strm/proxy/x.mp4\" 200 1000 ")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("error=\"ConnectionClosed\"") && line.contains(" id=player-7 "), "{line}");
}

/// A client that hangs up before its request header is whole (a scanner, a
/// health check that only connects, a player dropping a connection it had
/// just opened) is no error: Pingora's ERROR line for it becomes a debug
/// line, and the next request is served and logged as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_request_header_leaves_no_error_line() {
    let mut p = Running::start_logging("auth: {mode: none}\n", Some("info"), &[]).await;
    for partial in [&b"GET /strm/proxy/x.mp4 HTTP/1.1\r\nHost: x\r\n"[..], b"GET /strm/pro"] {
        let mut c = Client::connect(p.addr()).await;
        c.send_raw(partial).await;
        drop(c);
    }
    let got = get(p.addr(), "GET", "/nope", &[]).await;
    assert_eq!(got.status, 404);
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.terminate();
    let _ = p.child.wait();
    let log = p.logged();
    assert!(log.contains("\"GET /nope\" 404 "), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// A DNS server that stops answering (a VPN or DNS container that went
/// away) holds a request no longer than `upstream.connect_timeout`: a 504,
/// not the resolver's own 10 s (two tries of 5 s) and a 502. The binary
/// runs in a mount namespace of its own whose /etc/resolv.conf names a
/// silent server on 127.0.0.153 (loopback: no query leaves the machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_dns_server_is_a_timeout_within_the_connect_timeout() {
    let dns = std::net::UdpSocket::bind("127.0.0.153:53").expect("port 53 on 127.0.0.153 (the suite runs as root)");
    let queries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = queries.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while dns.recv_from(&mut buf).is_ok() {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    });
    let (cmd, _resolv) = with_resolv_conf("nameserver 127.0.0.153\noptions timeout:5 attempts:2\n");
    let r = Running::spawn("auth: {mode: none}\nupstream: {connect_timeout: \"1s\"}\n", Some("warn"), &[], cmd).await;
    let started = Instant::now();
    let got = get(r.addr(), "GET", "/strm/proxy/x.mp4?u=http://video.hoster.example/x.mp4", &[]).await;
    let took = started.elapsed();
    assert_eq!((got.status, got.text().trim()), (504, "upstream timeout"));
    assert!(took < Duration::from_secs(5), "took {took:?}: the lookup outlived the connect timeout");
    assert!(queries.load(Ordering::Relaxed) > 0, "the lookup went to the silent server");
    let log = r.logged_with("no answer to the name lookup").await;
    assert!(
        log.contains("video.hoster.example:80: no answer to the name lookup within upstream.connect_timeout"),
        "{log}"
    );
}

/// The binary in a mount namespace of its own whose /etc/resolv.conf is
/// `text` (the file lives as long as the returned handle): the system
/// resolver then asks a DNS server the test runs on loopback, and nothing
/// else on the machine changes.
fn with_resolv_conf(text: &str) -> (Command, tempfile::NamedTempFile) {
    use std::os::unix::process::CommandExt;
    let mut resolv = tempfile::NamedTempFile::new().unwrap();
    resolv.write_all(text.as_bytes()).unwrap();
    let source = std::ffi::CString::new(resolv.path().to_str().unwrap()).unwrap();
    let mut cmd = Command::new(BIN);
    // SAFETY: unshare and mount are async-signal-safe system calls; the
    // strings were made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let none = std::ptr::null();
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, none as _) != 0
                || libc::mount(source.as_ptr(), c"/etc/resolv.conf".as_ptr(), none, libc::MS_BIND, none as _) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    (cmd, resolv)
}

/// A DNS server on `addr` (port 53) that answers each A question with
/// 127.0.0.1 after `delay` and each other question with no records; counts
/// the A questions.
fn slow_dns(addr: &str, delay: Duration) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let socket = std::net::UdpSocket::bind(addr).expect("port 53 on loopback (the suite runs as root)");
    let questions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = questions.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let query = &buf[..n];
            // The question: labels up to the root's 0, then type and class.
            let mut end = 12;
            while end < n && query[end] != 0 {
                end += 1 + query[end] as usize;
            }
            let end = end + 5;
            if end > n {
                continue;
            }
            let is_a = query[end - 4..end - 2] == [0, 1];
            let mut answer = query[..2].to_vec(); // the id
            answer.extend_from_slice(&[0x81, 0x80, 0, 1, 0, is_a as u8, 0, 0, 0, 0]);
            answer.extend_from_slice(&query[12..end]);
            if is_a {
                counted.fetch_add(1, Ordering::SeqCst);
                // Name: pointer to the question's; A, IN, TTL 30, 4 bytes.
                answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 127, 0, 0, 1]);
            }
            let socket = socket.try_clone().unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = socket.send_to(&answer, from);
            });
        }
    });
    questions
}

/// Release day on a new hoster: a crowd's requests for a name the proxy
/// has not looked up yet share one lookup (one question to the DNS server),
/// where each used to run its own.
#[tokio::test]
async fn a_crowd_for_a_new_host_name_asks_the_dns_server_once() {
    let questions = slow_dns("127.0.0.154:53", Duration::from_millis(300));
    let (cmd, _resolv) = with_resolv_conf("nameserver 127.0.0.154\n");
    let o = Origin::start(|req| serve_file(req, 10_000, Some("video/mp2t")).into()).await;
    let r = Running::spawn("auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n", None, &[], cmd).await;
    let port = o.addr.port();
    let addr = r.addr();
    let viewers: Vec<_> = (0..20)
        .map(|i| {
            let target = format!("/strm/proxy/s{i}.ts?u=http://release.hoster.example:{port}/s{i}.ts");
            tokio::spawn(async move { get(addr, "GET", &target, &[]).await })
        })
        .collect();
    for v in viewers {
        let got = v.await.unwrap();
        assert_eq!((got.status, got.body.len()), (200, 10_000));
    }
    assert_eq!(questions.load(Ordering::SeqCst), 1, "one A question for 20 concurrent requests");
    assert_eq!(o.requests().len(), 20);
    drop(r);
}
