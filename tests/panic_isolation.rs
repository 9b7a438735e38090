//! A panic while handling one request takes down that connection only:
//! Pingora runs every connection as its own task and the build unwinds
//! (`panic = "unwind"`), so other requests, on other and later connections,
//! are served as before. The real proxy is wrapped in a `ProxyHttp` that
//! panics on one path and delegates everything else.

mod common;

use std::sync::Arc;

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
    let o = Origin::start(|req| serve_file(req, 1000, Some("video/mp4")).into()).await;
    let cfg = Config::from_yaml("t.yaml", "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n", |_| None)
        .unwrap();
    let metrics = Arc::new(Metrics::new());
    let proxy = anibridge_proxy::server::build(&cfg, metrics.clone());
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
}
