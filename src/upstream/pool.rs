//! Idle upstream connections, kept here instead of in Pingora's pool.
//!
//! Pingora 0.9's connection pool spawns a watcher task for every connection
//! it takes back and hands a reused one over through a lock that task holds:
//! each reuse costs two extra task switches, a `getpeername` system call and
//! a handful of allocations, on every request (BENCHMARKS.md). Here an idle
//! connection is a stream in a list. Taking one checks, without waiting,
//! that the server has neither closed it nor sent anything unasked; one
//! sweeper task per pool closes connections that idled too long or that the
//! server closed meanwhile. Connecting and the HTTP/1.1 exchange stay
//! Pingora's (`TransportConnector`, `v1::client::HttpSession`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

/// How often the sweeper looks at idle connections.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Idle connections by peer (Pingora's `reuse_hash`), newest last.
pub struct Pool {
    inner: Mutex<Inner>,
    idle_timeout: Duration,
    capacity: usize,
}

#[derive(Default)]
struct Inner {
    by_peer: HashMap<u64, Vec<Idle>>,
    len: usize,
    sweeping: bool,
}

struct Idle {
    stream: Stream,
    since: Instant,
}

impl Pool {
    /// A pool that holds at most `capacity` idle connections in all, each
    /// for at most `idle_timeout`.
    pub fn new(capacity: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool { inner: Mutex::default(), idle_timeout, capacity })
    }

    /// The most recently returned live connection to `peer`, if any.
    /// Connections found closed or expired on the way are dropped.
    pub fn take(&self, peer: u64) -> Option<Stream> {
        loop {
            let idle = {
                let mut inner = self.lock();
                let list = inner.by_peer.get_mut(&peer)?;
                let idle = list.pop();
                if list.is_empty() {
                    inner.by_peer.remove(&peer);
                }
                let idle = idle?;
                inner.len -= 1;
                idle
            };
            if idle.since.elapsed() >= self.idle_timeout {
                // The rest of this peer's list is older still.
                let expired = {
                    let mut inner = self.lock();
                    let expired = inner.by_peer.remove(&peer).unwrap_or_default();
                    inner.len -= expired.len();
                    expired
                };
                drop(expired);
                return None;
            }
            let mut stream = idle.stream;
            if is_quiet(&mut stream) {
                return Some(stream);
            }
        }
    }

    /// Keeps `stream`, a connection to `peer` with a fully read response,
    /// for reuse. Over capacity, the longest-idle connection is closed.
    pub fn put(self: &Arc<Self>, peer: u64, mut stream: Stream) {
        if self.capacity == 0 || !is_quiet(&mut stream) {
            return;
        }
        let evicted;
        {
            let mut inner = self.lock();
            evicted = if inner.len >= self.capacity { inner.pop_oldest() } else { None };
            inner.by_peer.entry(peer).or_default().push(Idle { stream, since: Instant::now() });
            inner.len += 1;
            if !inner.sweeping {
                inner.sweeping = true;
                tokio::spawn(sweep_forever(Arc::downgrade(self)));
            }
        }
        drop(evicted);
    }

    /// Closes connections that idled past the timeout or that the server
    /// closed (or wrote to) while they were idle.
    pub fn sweep(&self) {
        let mut closed = Vec::new();
        {
            let mut inner = self.lock();
            let timeout = self.idle_timeout;
            for list in inner.by_peer.values_mut() {
                let mut i = 0;
                while i < list.len() {
                    let keep = list[i].since.elapsed() < timeout && is_quiet(&mut list[i].stream);
                    if keep {
                        i += 1;
                    } else {
                        closed.push(list.remove(i));
                    }
                }
            }
            inner.by_peer.retain(|_, list| !list.is_empty());
            inner.len -= closed.len();
        }
        drop(closed);
    }

    /// Idle connections held now.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing here panics while holding the lock; a poisoned lock
        // still holds a consistent list.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn pop_oldest(&mut self) -> Option<Idle> {
        let peer = *self.by_peer.iter().min_by_key(|(_, list)| list.first().map(|i| i.since))?.0;
        let list = self.by_peer.get_mut(&peer)?;
        let oldest = list.remove(0);
        if list.is_empty() {
            self.by_peer.remove(&peer);
        }
        self.len -= 1;
        Some(oldest)
    }
}

async fn sweep_forever(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// Whether an idle connection has nothing to read: no end of stream, no
/// error, no unasked bytes. Never waits; the read is polled once.
fn is_quiet(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let read = pin!(tokio::task::unconstrained(stream.read(&mut byte)));
    matches!(read.poll(&mut Context::from_waker(Waker::noop())), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: the pool's side as a Pingora stream, and the
    /// server's side.
    async fn pair() -> (Stream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Box::new(pingora::protocols::l4::stream::Stream::from(client)), server)
    }

    /// Lets the reactor see what the peer did.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Which connection this is (its descriptor; all are open meanwhile).
    fn conn_id(s: &Stream) -> i32 {
        s.id()
    }

    #[tokio::test]
    async fn newest_connection_first_and_per_peer() {
        let pool = Pool::new(8, Duration::from_secs(30));
        let (a, _sa) = pair().await;
        let (b, _sb) = pair().await;
        let (c, _sc) = pair().await;
        let (pa, pb, pc) = (conn_id(&a), conn_id(&b), conn_id(&c));
        pool.put(1, a);
        pool.put(1, b);
        pool.put(2, c);
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.take(1).map(|s| conn_id(&s)), Some(pb));
        assert_eq!(pool.take(2).map(|s| conn_id(&s)), Some(pc));
        assert!(pool.take(2).is_none());
        assert_eq!(pool.take(1).map(|s| conn_id(&s)), Some(pa));
        assert!(pool.take(1).is_none());
        assert!(pool.is_empty());
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_handed_out() {
        let pool = Pool::new(8, Duration::from_secs(30));
        let (a, _sa) = pair().await;
        let (b, sb) = pair().await;
        let pa = conn_id(&a);
        pool.put(1, a);
        pool.put(1, b);
        drop(sb);
        settle().await;
        // The newer one was closed by the server: skipped, the older one given.
        assert_eq!(pool.take(1).map(|s| conn_id(&s)), Some(pa));
        assert!(pool.is_empty());
    }

    #[tokio::test]
    async fn a_connection_with_unasked_bytes_is_not_handed_out() {
        let pool = Pool::new(8, Duration::from_secs(30));
        let (a, mut sa) = pair().await;
        pool.put(1, a);
        sa.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        settle().await;
        assert!(pool.take(1).is_none());
        assert!(pool.is_empty());
    }

    #[tokio::test]
    async fn a_closed_connection_is_not_kept() {
        let pool = Pool::new(8, Duration::from_secs(30));
        let (a, sa) = pair().await;
        drop(sa);
        settle().await;
        pool.put(1, a);
        assert!(pool.is_empty());
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let pool = Pool::new(8, Duration::from_millis(100));
        let (a, _sa) = pair().await;
        let (b, _sb) = pair().await;
        pool.put(1, a);
        pool.put(1, b);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(pool.take(1).is_none());
        assert!(pool.is_empty(), "expired connections are closed, not kept");
    }

    #[tokio::test]
    async fn over_capacity_the_longest_idle_goes() {
        let pool = Pool::new(2, Duration::from_secs(30));
        let (a, _sa) = pair().await;
        let (b, _sb) = pair().await;
        let (c, _sc) = pair().await;
        let (pb, pc) = (conn_id(&b), conn_id(&c));
        pool.put(1, a);
        pool.put(2, b);
        pool.put(3, c);
        assert_eq!(pool.len(), 2);
        assert!(pool.take(1).is_none());
        assert_eq!(pool.take(2).map(|s| conn_id(&s)), Some(pb));
        assert_eq!(pool.take(3).map(|s| conn_id(&s)), Some(pc));
    }

    #[tokio::test]
    async fn sweep_closes_what_the_server_closed_and_what_expired() {
        let pool = Pool::new(8, Duration::from_millis(300));
        let (a, sa) = pair().await;
        let (b, _sb) = pair().await;
        let (c, mut sc) = pair().await;
        pool.put(1, a);
        pool.put(2, b);
        pool.put(3, c);
        drop(sa);
        settle().await;
        pool.sweep();
        assert_eq!(pool.len(), 2, "the one the server closed is gone");
        // The server side of a swept connection sees it closed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.sweep();
        assert!(pool.is_empty(), "expired ones are gone");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), sc.read(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn zero_capacity_keeps_nothing() {
        let pool = Pool::new(0, Duration::from_secs(30));
        let (a, _sa) = pair().await;
        pool.put(1, a);
        assert!(pool.is_empty());
    }
}
