//! Real servers the tests start (nginx, Traefik, SOCKS and HTTP proxies):
//! a child process with its files in a temporary directory, stopped when
//! dropped, so no test leaves one running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server process and its directory.
pub struct Spawned {
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Spawned {
    /// Spawns `cmd` (stdout discarded, stderr to the test's).
    pub fn start(cmd: &mut Command, dir: tempfile::TempDir) -> Spawned {
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
        Spawned { child, dir }
    }

    /// Spawns `cmd` with its standard output and error written to `log`
    /// in `dir` (for servers that log there).
    pub fn start_logging(cmd: &mut Command, dir: tempfile::TempDir, log: &str) -> Spawned {
        let file = std::fs::File::create(dir.path().join(log)).unwrap();
        let child = cmd.stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        Spawned { child, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file of its directory (a log), empty when missing.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Waits until it accepts connections on `addr` (its `log` is shown
    /// when it does not).
    pub async fn wait_listening(&self, addr: SocketAddr, log: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "the server did not start: {}", self.read(log));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
