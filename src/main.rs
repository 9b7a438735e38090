//! `anibridge-proxy --config FILE [--check | --health]`

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use anibridge_proxy::config::Config;
use anibridge_proxy::log_writer::{LineSink, LogWriter};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streaming HTTP video proxy: range-exact relay, HLS rewriting, signed URLs.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The YAML configuration file (a relative path is taken from the
    /// directory the proxy is started in).
    #[arg(long, short, default_value = "conf/anibridge-proxy.yaml")]
    config: PathBuf,
    /// Validate the configuration and exit: 0 when valid, 1 with the reason.
    #[arg(long)]
    check: bool,
    /// Ask the running proxy (the admin listener of this configuration) for
    /// /healthz and exit: 0 when it answers 200, 1 with the reason. For
    /// container health checks; the image needs no curl or shell.
    #[arg(long, conflicts_with = "check")]
    health: bool,
}

/// The access log (target `access`) goes to standard output, one line per
/// request as it is; everything else to standard error through env_logger.
/// Each stream is written by a thread of its own ([`LogWriter`]): no
/// request waits for whatever reads them. `RUST_LOG` filters both
/// (`access=off` silences the access log).
struct Logs {
    logger: env_logger::Logger,
    /// Standard output's queue, for the access lines.
    access: &'static LogWriter,
    /// Standard error's queue, which `logger` writes into (its `Pipe`).
    messages: &'static LogWriter,
}

/// Pingora's trace lines print whole request and response heads: the
/// client's `sig` and `u`, the hoster's tokenised path, the resolver's
/// headers — what the proxy itself never logs. They are dropped whatever
/// `RUST_LOG` asks; Pingora's debug lines and everything else still pass.
fn leaks_secrets(m: &log::Metadata<'_>) -> bool {
    m.level() == log::Level::Trace && m.target().starts_with("pingora")
}

/// Pingora's ERROR for a client that went away (or stalled past the read
/// timeout, or was cut by `crate::header_guard`) before its request
/// header was whole: a scanner, a health check that only connects, a
/// player closing a connection it had just opened. Pingora prints it
/// before any request exists, so the proxy's `suppress_error_log` is
/// never asked; the admin listener's (Pingora's `HttpServer`) prints it in
/// words of its own.
fn client_left_early(r: &log::Record<'_>) -> bool {
    if r.level() != log::Level::Error {
        return false;
    }
    let text = r.args().to_string();
    (r.target() == "pingora_proxy" && text.starts_with("Fail to proxy: Downstream "))
        || (r.target() == "pingora_core::apps::http_app"
            && text.starts_with("HTTP server fails to read from downstream"))
}

/// `r` said again at `level` with `args`: the same target and source place.
fn restated<'a>(r: &log::Record<'a>, level: log::Level, args: std::fmt::Arguments<'a>) -> log::Record<'a> {
    log::Record::builder()
        .level(level)
        .target(r.target())
        .args(args)
        .module_path(r.module_path())
        .file(r.file())
        .line(r.line())
        .build()
}

impl log::Log for Logs {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        self.logger.enabled(m) && !leaks_secrets(m)
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.logger.matches(r) || leaks_secrets(r.metadata()) {
            return;
        }
        if client_left_early(r) {
            // As ordinary as a client leaving mid-body, which the proxy
            // does not report either: a debug line, not an ERROR.
            let debug = restated(r, log::Level::Debug, *r.args());
            if self.logger.matches(&debug) {
                self.logger.log(&debug);
            }
            return;
        }
        if r.target() == "access" {
            // Queued for standard output's own thread: a stalled reader of
            // it must not stall the requests (src/log_writer.rs).
            self.access.push(r.args().to_string());
        } else if let Some(id) = anibridge_proxy::access::current_request_id() {
            // Said while answering a request: its id, as its access line has it.
            self.logger.log(&restated(r, r.level(), format_args!("{} id={id}", r.args())));
        } else {
            self.logger.log(r);
        }
    }

    /// Waits (a moment at most) for the queued lines to be written.
    fn flush(&self) {
        self.logger.flush();
        self.access.flush(std::time::Duration::from_secs(2));
        self.messages.flush(std::time::Duration::from_secs(2));
    }
}

fn main() -> ExitCode {
    // Colours only on a terminal (RUST_LOG_STYLE may say otherwise): the
    // lines reach standard error through a queue, which env_logger cannot
    // tell apart from a file.
    let style = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { "always" } else { "never" };
    let messages = LogWriter::start("stderr", std::io::stderr());
    let logs = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info").default_write_style_or(style),
    )
    .target(env_logger::Target::Pipe(Box::new(LineSink::new(messages))))
    .build();
    log::set_max_level(logs.filter());
    let access = LogWriter::start("stdout", std::io::stdout());
    let _ = log::set_boxed_logger(Box::new(Logs { logger: logs, access, messages }));
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(1);
        }
    };
    if cli.health {
        return match anibridge_proxy::admin::probe(cfg.admin_listen.0, std::time::Duration::from_secs(3)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("unhealthy: {why}");
                ExitCode::from(1)
            }
        };
    }
    if cli.check {
        println!("{}: configuration is valid", cli.config.display());
        for warning in anibridge_proxy::server::warnings(&cfg) {
            eprintln!("warning: {warning}");
        }
        return ExitCode::SUCCESS;
    }
    let ran = anibridge_proxy::server::run(cfg);
    log::logger().flush();
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("anibridge-proxy: {why}");
            ExitCode::from(1)
        }
    }
}
