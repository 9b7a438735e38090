//! The load benchmark's reference point: Pingora with nothing on top.
//!
//! A minimal `ProxyHttp` — one fixed plain-HTTP upstream, only `Host` set,
//! Pingora's own `upstream_peer` → `proxy_1to1` pipeline and pool — built
//! with the same release profile and allocator as anibridge-proxy. Measured
//! beside nginx and anibridge-proxy, it separates what Pingora itself costs
//! per request from what anibridge-proxy's auth, routing, header policy and
//! relay add on top (`benches/load/run.py`, phases 1 and 2).
//!
//!     bare_pingora LISTEN UPSTREAM THREADS    e.g. 127.0.0.1:18085 127.0.0.1:18081 1

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream.as_str(), false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _: &mut Session,
        req: &mut RequestHeader,
        _: &mut (),
    ) -> pingora_error::Result<()> {
        req.insert_header("Host", self.upstream.as_str())?;
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, threads] = &args[..] else {
        eprintln!("usage: bare_pingora LISTEN UPSTREAM THREADS");
        std::process::exit(2);
    };
    let conf = ServerConf { threads: threads.parse().expect("THREADS is a number"), ..ServerConf::default() };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, Bare { upstream: upstream.clone() });
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
