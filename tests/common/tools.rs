//! The programs tests drive (nginx, ffmpeg, mpv, VLC, Chromium, Traefik,
//! microsocks, tinyproxy), found one way for every test.
//!
//! `scripts/test.sh` (what CI runs) installs every one of them and sets
//! `ANIBRIDGE_TEST_TOOLS=required`: there a missing tool fails its test
//! loudly. Run elsewhere (`cargo test` on a developer's machine), a test
//! whose tool is missing says what to install and is skipped.

use std::io::Write;
use std::path::Path;

/// Set by scripts/test.sh: every tool must be there.
pub const REQUIRED_ENV: &str = "ANIBRIDGE_TEST_TOOLS";

fn required() -> bool {
    std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "required")
}

/// Where `program` is: an explicit path, or looked up on PATH and in the
/// sbin directories that a non-root PATH may lack.
fn locate(program: &str) -> Option<String> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| program.to_string());
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin"])
        .map(|dir| format!("{dir}/{program}"))
        .find(|p| Path::new(p).is_file());
    found
}

/// The path of `program` for a test that needs it, or `None` when it is
/// missing and the test is to be skipped (after saying so and what
/// `install` step provides it). Under scripts/test.sh a missing program
/// fails the test instead.
pub fn needs(program: &str, install: &str) -> Option<String> {
    let found = locate(program);
    if found.is_none() {
        missing(program, install);
    }
    found
}

/// Reports a missing prerequisite (`what`): a failure under scripts/test.sh,
/// a skip with what to do elsewhere.
pub fn missing(what: &str, install: &str) {
    if required() {
        panic!("{what} is missing, but scripts/test.sh installs it ({install}): the test cannot run");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {what} is not installed here ({install}); this test's checks did not run"
    );
}

/// The path of a program the test already checked with [`needs`].
pub fn path(program: &str) -> String {
    locate(program).unwrap_or_else(|| panic!("{program} is required for this test (see tests/common/tools.rs)"))
}
