//! Where log lines go: standard output (the access log) and standard error
//! (the proxy's own messages), each written by a thread of its own. A
//! request hands its line over and goes on; it never waits for either.
//! Written in the request's own thread, a line is a `write` per request,
//! and a reader that stops reading (a stalled log shipper, a container
//! runtime's full log pipe) blocks every worker at its next line: the proxy
//! stops answering at all (it did: 353 requests, then none, with a
//! standard output nobody read; a hoster outage writes a warning per
//! request to standard error). Here each stream's lines queue up to
//! [`QUEUE_BYTES`] and are written in batches (one `write` for all that
//! arrive within [`LINGER`] of the first); past that they are dropped,
//! counted ([`DROPPED`], `anibridge_log_lines_dropped_total{stream}`) and,
//! once the stream takes lines again, reported in a warning on standard
//! error (standard output keeps to access lines, JSON ones included).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, Opts};

/// How much text may wait for its stream (queued, or taken by the writer
/// and not written yet); more is dropped.
pub const QUEUE_BYTES: usize = 4 << 20;

/// How long the writer waits, after a line wakes it, for more to write
/// with it: under load one `write` (and one wake-up) per this long, not per
/// request; when idle, a line's delay.
const LINGER: Duration = Duration::from_millis(5);

/// Lines dropped because their stream did not keep up or refused them, by
/// stream (`stdout`: the access log, `stderr`: the proxy's messages).
pub static DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "anibridge_log_lines_dropped_total",
            "Log lines dropped because their stream did not take them in time (its reader stalled) or refused \
             them (closed), by stream (stdout: the access log; stderr: the proxy's messages)",
        ),
        &["stream"],
    )
    .expect("a valid metric")
});

/// A stream's queue of lines and its writer thread, shared by the logger.
pub struct LogWriter {
    /// `stdout` or `stderr`, as the metric and the warning name it.
    stream: &'static str,
    dropped: IntCounter,
    queue: Mutex<Queue>,
    /// The writer waits here for lines; `flush` waits here for the writer.
    changed: Condvar,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<String>,
    bytes: usize,
    /// Dropped since the writer last said so.
    dropped: u64,
    /// The writer holds lines it took and has not written yet.
    writing: bool,
}

impl LogWriter {
    /// Starts the writer thread of `stream` (`stdout` or `stderr`), writing
    /// to `out` (that stream in the proxy, anything in tests).
    pub fn start(stream: &'static str, out: impl Write + Send + 'static) -> &'static LogWriter {
        let writer: &'static LogWriter = Box::leak(Box::new(LogWriter {
            stream,
            dropped: DROPPED.with_label_values(&[stream]),
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name(format!("log-{stream}"))
            .spawn(move || writer.run(out))
            .expect("a log writer's thread starts");
        writer
    }

    /// Queues `line` (without its newline), or drops it when the queue is
    /// full. Never waits for the stream.
    pub fn push(&self, line: String) {
        let mut q = self.lock();
        if q.bytes + line.len() > QUEUE_BYTES {
            q.dropped += 1;
            self.dropped.inc();
            return;
        }
        let was_idle = q.lines.is_empty();
        q.bytes += line.len();
        q.lines.push_back(line);
        drop(q);
        // The writer takes every queued line each time it wakes, so only
        // the first line after it emptied the queue needs to wake it.
        if was_idle {
            self.changed.notify_all();
        }
    }

    /// Waits until every line queued so far is written, at most `limit`
    /// (the stream may be blocked for good). True when it was.
    pub fn flush(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        let mut q = self.lock();
        while !q.lines.is_empty() || q.writing {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self.changed.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    fn run(&self, mut out: impl Write) {
        let mut text = Vec::new();
        // The stream refused the last batch (closed: a log reader that
        // went away), so the failure has been reported.
        let mut failing = false;
        loop {
            {
                let mut q = self.lock();
                while q.lines.is_empty() {
                    q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            }
            // Woken by a first line: the lines of the next moment come with
            // it, in one write (and the requests meanwhile wake nobody).
            std::thread::sleep(LINGER);
            let (lines, dropped) = {
                let mut q = self.lock();
                q.writing = true;
                (std::mem::take(&mut q.lines), std::mem::take(&mut q.dropped))
            };
            text.clear();
            for line in &lines {
                text.extend_from_slice(line.as_bytes());
                text.push(b'\n');
            }
            // A failed write loses these lines: counted as dropped, and said
            // once until the stream takes lines again (a closed standard
            // output must not look like a quiet proxy).
            match out.write_all(&text).and_then(|()| out.flush()) {
                Ok(()) => failing = false,
                Err(e) => {
                    self.dropped.inc_by(lines.len() as u64);
                    if !failing && self.stream == "stdout" {
                        log::warn!("standard output refused the access log ({e}): its lines are lost until it takes them again");
                    }
                    failing = true;
                }
            }
            if dropped > 0 {
                // On standard error: standard output holds access lines only
                // (JSON ones for log shippers).
                let what = if self.stream == "stdout" { "access log lines" } else { "log lines" };
                log::warn!("{dropped} {what} dropped: standard {} did not take them in time", self.stream_name());
            }
            {
                // Counted until written: what waits, taken or not, stays
                // within QUEUE_BYTES.
                let mut q = self.lock();
                q.bytes -= lines.iter().map(String::len).sum::<usize>();
                q.writing = false;
            }
            // Not kept large after a burst.
            text.shrink_to(64 << 10);
            self.changed.notify_all();
        }
    }

    fn stream_name(&self) -> &'static str {
        if self.stream == "stdout" {
            "output"
        } else {
            "error"
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `env_logger`'s output, handed to a [`LogWriter`] line by line
/// (env_logger writes each record whole, ending in a newline).
pub struct LineSink {
    writer: &'static LogWriter,
    partial: Vec<u8>,
}

impl LineSink {
    pub fn new(writer: &'static LogWriter) -> LineSink {
        LineSink { writer, partial: Vec::new() }
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).take(end).collect();
            self.writer.push(String::from_utf8_lossy(&line).into_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lets a line that could come once per client through at most once a
/// minute: the operator hears of it without a flood (the rest are counted
/// in a metric by the caller).
#[derive(Debug)]
pub struct OnceAMinute {
    /// When one was last let through (milliseconds since `epoch`, plus one;
    /// 0: never).
    last: AtomicU64,
    epoch: Instant,
}

impl OnceAMinute {
    pub fn new() -> OnceAMinute {
        OnceAMinute { last: AtomicU64::new(0), epoch: Instant::now() }
    }

    /// Whether this one is to be said: none was in the last minute.
    pub fn due(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        // Another thread may have let one through since `now` was taken.
        (last == 0 || now >= last + 60_000)
            && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

impl Default for OnceAMinute {
    fn default() -> OnceAMinute {
        OnceAMinute::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    #[test]
    fn once_a_minute_lets_the_first_through_and_not_the_next() {
        let gate = OnceAMinute::new();
        assert!(gate.due(), "the first is said");
        assert!(!gate.due() && !gate.due(), "the next ones this minute are not");
        // More than a minute after the last one was said: said again.
        gate.last.store(1, Ordering::Relaxed);
        let gate = OnceAMinute { epoch: Instant::now() - Duration::from_secs(61), ..gate };
        assert!(gate.due());
    }

    /// An output that takes bytes only while `open`, blocking otherwise
    /// (a pipe nobody reads).
    #[derive(Clone)]
    struct Gate {
        taken: Arc<StdMutex<Vec<u8>>>,
        open: Arc<(StdMutex<bool>, Condvar)>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.open;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            self.taken.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn gate(open: bool) -> Gate {
        Gate { taken: Arc::default(), open: Arc::new((StdMutex::new(open), Condvar::new())) }
    }

    #[test]
    fn lines_come_out_whole_and_in_order() {
        let out = gate(true);
        let w = LogWriter::start("test-order", out.clone());
        for i in 0..1000 {
            w.push(format!("line {i}"));
        }
        assert!(w.flush(Duration::from_secs(10)));
        let text = String::from_utf8(out.taken.lock().unwrap().clone()).unwrap();
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, want);
    }

    #[test]
    fn a_blocked_output_never_blocks_the_caller_and_what_is_lost_is_counted() {
        let out = gate(false);
        let w = LogWriter::start("test-loss", out.clone());
        let before = DROPPED.with_label_values(&["test-loss"]).get();
        // Three times what the queue holds, while nothing is taken: every
        // push returns (the test would hang otherwise), and what waits
        // stays within the queue.
        let (line, total) = ("x".repeat(1000), 3 * QUEUE_BYTES / 1000);
        for _ in 0..total {
            w.push(line.clone());
        }
        assert!(!w.flush(Duration::from_millis(50)), "nothing can be written yet");
        let dropped = DROPPED.with_label_values(&["test-loss"]).get() - before;
        assert!(dropped >= 2 * (QUEUE_BYTES / 1000) as u64, "{dropped} dropped");
        // Standard output takes lines again: what waited comes out, then
        // the lines after it; every line is written or counted.
        let (open, cv) = &*out.open;
        *open.lock().unwrap() = true;
        cv.notify_all();
        w.push("after".into());
        assert!(w.flush(Duration::from_secs(10)));
        let text = String::from_utf8(out.taken.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let written = lines.iter().filter(|l| **l == line).count();
        assert_eq!(written as u64 + dropped, total as u64, "every line written or counted");
        assert_eq!(lines.last(), Some(&"after"));
        assert_eq!(lines.len(), written + 1, "nothing but the lines");
    }

    /// A stream that refuses every write (a pipe whose reader is gone).
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_a_closed_output_refuses_are_counted() {
        let w = LogWriter::start("test-closed", Closed);
        let dropped = || DROPPED.with_label_values(&["test-closed"]).get();
        for i in 0..100 {
            w.push(format!("line {i}"));
        }
        assert!(w.flush(Duration::from_secs(10)));
        assert_eq!(dropped(), 100);
    }
}
