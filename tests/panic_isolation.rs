//! A panic while handling one request takes down that connection only:
//! Pingora runs every connection as its own task and the build unwinds
//! (`panic = "unwind"`), so other requests, on other and later connections,
//! are served as before. The real proxy is wrapped in a `ProxyHttp` that
//! panics on one path and delegates everything else.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anibridge_proxy::config::Config;
use anibridge_proxy::metrics::Metrics;
use anibridge_proxy::proxy::{Ctx, Proxy};
use async_trait::async_trait;
use common::*;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

struct Panicky(Proxy);

#[async_trait]
impl ProxyHttp for Panicky {
    type CTX = Ctx;
    fn new_ctx(&self) -> Ctx {
        self.0.new_ctx()
    }
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora_error::Result<bool> {
        if session.req_header().uri.path() == "/boom" {
            panic!("simulated bug while handling a request");
        }
        if session.req_header().uri.path().ends_with("/boom-mid-body.ts") {
            // The real request runs until its body streams, then a bug
            // strikes: the unwinding drops whatever the request held.
            let serving = self.0.request_filter(session, ctx);
            tokio::select! {
                r = serving => return r,
                _ = tokio::time::sleep(std::time::Duration::from_millis(300)) => panic!("simulated bug mid-body"),
            }
        }
        self.0.request_filter(session, ctx).await
    }
    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> pingora_error::Result<Box<HttpPeer>> {
        self.0.upstream_peer(session, ctx).await
    }
    async fn logging(&self, session: &mut Session, e: Option<&pingora_error::Error>, ctx: &mut Ctx) {
        self.0.logging(session, e, ctx).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_does_not_take_the_server_down() {
    let o = Origin::start(|req| match req.path() {
        // Not shared: this request's own stream holds the host's slot (a
        // cache fill would hold it for everyone, panic or not).
        "/slow.ts" => Resp::new(200, Body::Slow { len: 5_000_000, piece: 10_000, pause: Duration::from_millis(20) })
            .header("Cache-Control", "no-store")
            .into(),
        _ => serve_file(req, 1000, Some("video/mp4")).into(),
    })
    .await;
    let cfg = Config::from_yaml(
        "t.yaml",
        &with_run_cache(
            "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\nupstream: {max_connections_per_host: 1}\n",
        ),
        |_| None,
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let proxy = anibridge_proxy::server::build(&cfg, metrics.clone());
    let gate = proxy.state.client.gate().clone();
    let app = Arc::new(pingora::proxy::http_proxy(&Arc::new(ServerConf::default()), Panicky(proxy)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (app, rx) = (app.clone(), rx.clone());
            // One task per connection, as Pingora's listener does.
            tokio::spawn(async move {
                let mut stream: pingora::protocols::Stream = Box::new(L4Stream::from(tcp));
                while let Some(next) = app.process_new(stream, &rx).await {
                    stream = next;
                }
            });
        }
    });

    // A long-running download on its own connection, in flight during the panic.
    let path = relay_path("v.mp4", &o.url("/v.mp4"));
    let mut before = Client::connect(addr).await;
    assert_eq!(before.request("GET", &path, &[]).await.status, 200);

    let mut boom = Client::connect(addr).await;
    boom.send_raw(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(boom.is_closed(std::time::Duration::from_secs(5)).await, "the panicking connection is dropped");

    // The earlier keep-alive connection and new ones still work.
    let again = before.request("GET", &path, &[("Range", "bytes=0-9")]).await;
    assert_eq!(again.status, 206);
    assert_body(&again.body, &pattern(0, 10));
    for _ in 0..3 {
        assert_eq!(get(addr, "GET", &path, &[]).await.status, 200);
    }
    // The panicking request is not left counted as in flight (graceful
    // shutdown waits for that count to reach zero).
    let mut in_flight = metrics.in_flight.get();
    for _ in 0..100 {
        if in_flight == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        in_flight = metrics.in_flight.get();
    }
    assert_eq!(in_flight, 0, "requests counted in flight after all were answered");

    // A bug while a body streams: the host's one slot is given back.
    let mut mid = Client::connect(addr).await;
    mid.send_raw(
        format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("boom-mid-body.ts", &o.url("/slow.ts"))).as_bytes(),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert_eq!(gate.state("127.0.0.1").0, 1, "the stream holds the host's slot");
    // What was sent before the bug, then the end of the connection.
    let mut sock = mid.into_inner();
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt;
    let ended = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the panicking connection is dropped");
    assert!(rest.len() < 5_000_000, "an aborted body: {} bytes", rest.len());
    // Given back once its connection, closed mid-body, has settled (50 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while gate.state("127.0.0.1").0 > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gate.state("127.0.0.1"), (0, None, None, 0), "no slot leaked by the panic");
    assert_eq!(get(addr, "GET", &path, &[("Range", "bytes=0-9")]).await.status, 206, "the host is usable at once");
}
