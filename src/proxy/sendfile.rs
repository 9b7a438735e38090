//! Answers from a stored body kept in a sealed file
//! ([`crate::cache::BodyFile`]), sent with `sendfile`: the kernel hands the
//! file's pages to the socket by reference, as nginx's `sendfile on` does,
//! where a body in the heap is first copied into the socket's buffers.
//!
//! The header goes out through Pingora's session as always; only the body
//! bypasses it, on the session's own socket. Pingora counts the body bytes
//! it writes against the header's `Content-Length` and refuses to finish
//! short, so while the header is written its writer is told there is no
//! body (as for a `HEAD`, which also flushes the header at once); the
//! request's method is put back right after. The session then finishes and
//! keeps its connection as after any answer (tests/cache.rs reuses it).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use pingora::protocols::http::ServerSession;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::cache::BodyFile;

/// Whether this session has a plain socket to send on (not HTTP/2, not TLS).
pub(super) fn possible(down: &ServerSession) -> bool {
    match down {
        ServerSession::H1(s) => s.stream().get_ssl().is_none() && s.stream().get_ssl_digest().is_none(),
        _ => false,
    }
}

/// Sends `header` for a body [`send_body`] sends. Only where [`possible`].
pub(super) async fn write_header(down: &mut ServerSession, header: ResponseHeader) -> Result<()> {
    let ServerSession::H1(s) = down else {
        return Error::e_explain(ErrorType::InternalError, "sendfile needs an HTTP/1 session");
    };
    let method = s.req_header().method.clone();
    s.req_header_mut().set_method(Method::HEAD);
    let written = s.write_response_header(Box::new(header)).await;
    s.req_header_mut().set_method(method);
    written
}

/// Sends bytes `from..to` of `body` after [`write_header`], counting them
/// into `sent`, and finishes the response.
pub(super) async fn send_body(
    down: &mut ServerSession,
    body: &BodyFile,
    (from, to): (u64, u64),
    write_timeout: Duration,
    sent: &AtomicU64,
) -> Result<()> {
    let ServerSession::H1(s) = down else {
        return Error::e_explain(ErrorType::InternalError, "sendfile needs an HTTP/1 session");
    };
    // Pingora's `UniqueID` of a socket stream is its descriptor, open for
    // as long as the session (borrowed here throughout).
    let fd = s.stream().id();
    send(fd, body.file().as_fd(), from, to, write_timeout, sent).await.map_err(|e| e.into_down())?;
    down.finish_body().await
}

/// `sendfile` of `from..to` of `file` into socket `fd`, waiting while the
/// socket's buffer is full; an error once `timeout` passed without a byte
/// sent.
async fn send(
    fd: i32,
    file: BorrowedFd<'_>,
    mut from: u64,
    to: u64,
    timeout: Duration,
    sent: &AtomicU64,
) -> Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: `fd` is the session's socket, open while the caller borrows
    // the session, which it does for all of this call.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    // Registered with the runtime only when the socket is first full (a
    // duplicate of it: the session's own registration is Pingora's).
    let mut ready: Option<AsyncFd<OwnedFd>> = None;
    // Since when nothing could be sent.
    let mut stuck: Option<Instant> = None;
    while from < to {
        let want = usize::try_from(to - from).unwrap_or(usize::MAX).min(1 << 30);
        match rustix::fs::sendfile(sock, file, Some(&mut from), want) {
            Ok(0) => return Error::e_explain(ErrorType::WriteError, "the stored body is shorter than its length"),
            Ok(n) => {
                sent.fetch_add(n as u64, Ordering::Relaxed);
                stuck = None;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                let since = *stuck.get_or_insert_with(Instant::now);
                let left = timeout.saturating_sub(since.elapsed());
                if left.is_zero() {
                    return Error::e_explain(ErrorType::WriteTimedout, "writing to the client");
                }
                let waiter = match ready {
                    Some(ref w) => w,
                    None => ready.insert(register(sock)?),
                };
                // Woken when the socket has room; and, should that wakeup
                // never come, tried again a moment later anyway (a stall of
                // seconds was seen once in a load run and never again).
                match tokio::time::timeout(left.min(RECHECK), waiter.writable()).await {
                    // Cleared before the next try: readiness that comes
                    // after it is seen by the wait after that.
                    Ok(Ok(mut guard)) => guard.clear_ready(),
                    Ok(Err(e)) => return Err(Error::because(ErrorType::WriteError, "waiting to write", e)),
                    Err(_) => {}
                }
            }
            Err(e) => return Err(Error::because(ErrorType::WriteError, "sending a stored body", e)),
        }
    }
    Ok(())
}

/// The longest wait for room in the socket before trying again unasked.
const RECHECK: Duration = Duration::from_millis(200);

/// A duplicate of `sock`, registered for writability.
fn register(sock: BorrowedFd<'_>) -> Result<AsyncFd<OwnedFd>> {
    let dup = rustix::io::dup(sock).map_err(|e| Error::because(ErrorType::WriteError, "duplicating the socket", e))?;
    #[allow(unsafe_code)]
    // SAFETY: an `OwnedFd` is open, and the same descriptor, for as long as
    // it is owned.
    let registered = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) };
    registered.map_err(|e| Error::because(ErrorType::WriteError, "waiting to write", e.into_parts().1))
}
