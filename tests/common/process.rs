//! Real servers the tests start (nginx, Traefik, SOCKS and HTTP proxies):
//! a child process with its files in a temporary directory, stopped when
//! dropped, so no test leaves one running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A running server process and its directory.
pub struct Spawned {
    child: Mutex<Child>,
    pub dir: tempfile::TempDir,
}

impl Spawned {
    /// Spawns `cmd` (stdout discarded, stderr to the test's).
    pub fn start(cmd: &mut Command, dir: tempfile::TempDir) -> Spawned {
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
        Spawned { child: Mutex::new(child), dir }
    }

    /// Spawns `cmd` with its standard output and error written to `log`
    /// in `dir` (for servers that log there).
    pub fn start_logging(cmd: &mut Command, dir: tempfile::TempDir, log: &str) -> Spawned {
        let file = std::fs::File::create(dir.path().join(log)).unwrap();
        let child = cmd.stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        Spawned { child: Mutex::new(child), dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file of its directory (a log), empty when missing.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// The file once `done` holds for it, or as it is after 2 s: nginx
    /// writes an access line just after its answer, so a client can have
    /// the last answer a moment before the log has its line.
    pub async fn read_when(&self, name: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let text = self.read(name);
            if done(&text) || Instant::now() > deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until it listens on `addr` itself (its `log` is shown when it
    /// does not). Another process listening there (one that took the port
    /// first) does not count: the server then fails here, once it gives up
    /// binding and exits, rather than leave the test talking to another.
    pub async fn wait_listening(&self, addr: SocketAddr, log: &str) {
        if let Err(exited) = self.listening(addr, log).await {
            panic!("{exited}");
        }
    }

    /// [`wait_listening`](Self::wait_listening), with the server's exit
    /// (and its `log`) as the error instead of a panic.
    async fn listening(&self, addr: SocketAddr, log: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (exited, pid) = {
                let mut child = self.child.lock().unwrap();
                (child.try_wait().unwrap(), child.id())
            };
            if let Some(status) = exited {
                return Err(format!("the server exited ({status}): {}", self.read(log)));
            }
            if listens(pid, addr.port()) && tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "the server did not start: {}", self.read(log));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether process `pid` holds a listening TCP socket on `port` (from
/// `/proc/net/tcp{,6}` and the process's file descriptors).
fn listens(pid: u32, port: u16) -> bool {
    // Each table line: sl local_address rem_address st ... inode (field 9);
    // st 0A is LISTEN.
    let listening_inode = |line: &str| -> Option<String> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
        (local_port == port && *f.get(3)? == "0A").then(|| f.get(9).map(|i| format!("socket:[{i}]")))?
    };
    let sockets: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| table.lines().skip(1).filter_map(listening_inode).collect::<Vec<_>>())
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Spawns Caddy on the Caddyfile `config`, with its storage (`HOME`, XDG
/// directories) in `dir` and its output in `caddy.log` there.
pub fn spawn_caddy(config: &std::path::Path, dir: tempfile::TempDir) -> Spawned {
    let d = dir.path().to_path_buf();
    Spawned::start_logging(
        Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(config)
            .env("HOME", &d)
            .env("XDG_DATA_HOME", &d)
            .env("XDG_CONFIG_HOME", &d),
        dir,
        "caddy.log",
    )
}

/// HAProxy in the foreground on the config text `conf`, its log
/// `haproxy.log` in its directory.
pub fn spawn_haproxy(conf: &str) -> Spawned {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("haproxy.cfg");
    std::fs::write(&file, conf).unwrap();
    Spawned::start_logging(
        Command::new(super::tools::path("haproxy")).arg("-db").arg("-f").arg(&file),
        dir,
        "haproxy.log",
    )
}

/// A real nginx serving the files under `root` on a fresh loopback port,
/// as a hoster would: `types` is its `types {}` block, `log` the format of
/// its `access.log` (read back with [`Spawned::read`]), `server` more of
/// its `server {}` block. Returns once it listens.
pub async fn nginx_hoster(root: &std::path::Path, types: &str, log: &str, server: &str) -> (Spawned, SocketAddr) {
    let (nginx, port) = nginx_on_a_free_port(|port| {
        format!(
            "log_format hoster '{log}';\ntypes {{ {types} }}\n\
             server {{ listen 127.0.0.1:{port}; root {}; access_log {{dir}}/access.log hoster;\n{server} }}\n",
            root.display()
        )
    })
    .await;
    (nginx, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// nginx with `http(port)` as the body of its `http {}` block (see
/// [`spawn_nginx`]), listening on `127.0.0.1:port`, a port found free;
/// returned once it listens (see [`on_a_free_port`]).
pub async fn nginx_on_a_free_port(http: impl Fn(u16) -> String) -> (Spawned, u16) {
    on_a_free_port(|port| spawn_nginx(&http(port)), "error.log").await
}

/// A server `start`ed to listen on `127.0.0.1:port`, a port found free,
/// returned once it listens. A port found free can be taken by a test
/// beside this one before the server binds it (seen in CI): the server
/// then exits (not all say why: tinyproxy "Could not create listening
/// sockets"), and another port is tried; after five exits, the last one's
/// `log` is the panic.
pub async fn on_a_free_port(start: impl Fn(u16) -> Spawned, log: &str) -> (Spawned, u16) {
    let mut last = String::new();
    for _ in 0..5 {
        let port = super::unused_addr().port();
        let server = start(port);
        match server.listening(([127, 0, 0, 1], port).into(), log).await {
            Ok(()) => return (server, port),
            Err(exited) => last = exited,
        }
    }
    panic!("the server exited at start on five free ports: {last}");
}

/// The nginx binary (tests check for it with `tools::needs` first).
pub fn nginx_bin() -> String {
    super::tools::path("nginx")
}

/// Spawns nginx with `http` as the body of its `http {}` block; `{dir}`
/// in it stands for nginx's directory. One process, no master: killing
/// the child stops nginx outright (a killed master would leave its worker
/// running). Its errors go to `error.log`.
pub fn spawn_nginx(http: &str) -> Spawned {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(
        dir.path().join("main.conf"),
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 512; }}\n\
             http {{ client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n{} }}\n",
            http.replace("{dir}", &d)
        ),
    )
    .unwrap();
    Spawned::start(Command::new(nginx_bin()).args(["-c", &format!("{d}/main.conf"), "-p", &d]), dir)
}
