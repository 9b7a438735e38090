//! The proxy's log lines (it runs in-process), captured for the test
//! process: [`capture`] once before any proxy exists, then [`logs`].

use std::sync::{Mutex, Once};

/// Every log line of this test process, as `LEVEL message`.
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            LOGS.lock().unwrap().push(format!("{} {}", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

/// From now on, log lines of level INFO and above are kept.
pub fn capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// The lines kept so far, one per line.
pub fn logs() -> String {
    LOGS.lock().unwrap().join("\n")
}

/// The access line of the request whose `X-Request-Id` was `id`, once it
/// is written (as the request ends, just after its last byte); at most 10 s.
pub async fn access_line(id: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(line) = logs().lines().find(|l| l.contains(&format!("id={id}"))) {
            return line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no access line with id={id}:\n{}", logs());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
