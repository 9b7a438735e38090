//! A TCP relay that cuts responses mid-body: the drop a hoster makes that
//! nginx does not make by itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A TCP relay to `upstream` that cuts the response on each of the next
/// `armed` connections after `after` bytes, alternately with a FIN and a
/// reset; other connections are relayed untouched.
pub struct Cutter {
    pub addr: std::net::SocketAddr,
    armed: Arc<AtomicUsize>,
}

impl Cutter {
    pub async fn start(upstream: std::net::SocketAddr, after: usize) -> Cutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicUsize::new(0));
        let left = armed.clone();
        tokio::spawn(async move {
            for i in 0usize.. {
                let (client, _) = listener.accept().await.unwrap();
                let cut = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    Self::relay(client, server, cut.then_some(after), i % 2 == 1).await;
                });
            }
        });
        Cutter { addr, armed }
    }

    /// One request through (nginx asked to close after it, so the proxy
    /// pools nothing and every request meets a fresh decision), then its
    /// answer: all of it, or `after` bytes and the end.
    async fn relay(
        mut client: tokio::net::TcpStream,
        mut server: tokio::net::TcpStream,
        after: Option<usize>,
        reset: bool,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        head.splice(end + 2..end + 2, b"Connection: close\r\n".iter().copied());
        server.write_all(&head).await.unwrap();
        let limit = after.unwrap_or(usize::MAX);
        let mut sent = 0;
        while sent < limit {
            let n = match server.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n.min(limit - sent),
            };
            if client.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n;
        }
        if after.is_some() && reset {
            client.set_zero_linger().unwrap();
        } else {
            let _ = client.shutdown().await;
        }
    }

    pub fn arm(&self, n: usize) {
        self.armed.store(n, Ordering::SeqCst);
    }
}
