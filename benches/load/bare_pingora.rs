//! The load benchmark's reference point: Pingora with nothing on top.
//!
//! A minimal `ProxyHttp` — one fixed plain-HTTP upstream, only `Host` set,
//! Pingora's own `upstream_peer` → `proxy_1to1` pipeline and pool — built
//! with the same release profile and allocator as anibridge-proxy. Measured
//! beside nginx and anibridge-proxy, it separates what Pingora itself costs
//! per request from what anibridge-proxy's auth, routing, header policy and
//! relay add on top (`benches/load/run.py`, phases 1 and 2).
//!
//! With `memory:DIR` for the upstream it is instead the ceiling for any
//! cache answering from memory on Pingora's downstream session: the files
//! of DIR (those of 1 byte to 16 MiB) held in memory, a `GET /NAME` with one `Range: bytes=A-B` answered
//! 206 in `request_filter` (header, then the slice) and nothing else — no
//! auth, no policy, no lookup beyond a map (phase 1, beside anibridge-proxy's
//! cache hits and nginx's `proxy_cache`).
//!
//!     bare_pingora LISTEN UPSTREAM THREADS    e.g. 127.0.0.1:18085 127.0.0.1:18081 1
//!     bare_pingora LISTEN memory:DIR THREADS
//!     bare_pingora LISTEN app-memory:DIR THREADS
//!
//! `app-memory:DIR` answers the same from memory with no pingora-proxy
//! around Pingora's session: a bare `HttpServerApp` (BENCHMARKS.md, the
//! thirty-eighth round, for what the `ProxyHttp` pipeline costs per request).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::ServerConf;
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use pingora::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstream: String,
    /// `memory:DIR`: each file's bytes by request path (`/NAME`).
    memory: Option<HashMap<String, Bytes>>,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _: &mut ()) -> pingora_error::Result<bool> {
        let Some(files) = &self.memory else { return Ok(false) };
        let req = session.req_header();
        let Some(body) = files.get(req.uri.path()).cloned() else {
            let out = ResponseHeader::build(404, Some(1))?;
            session.write_response_header(Box::new(out), true).await?;
            return Ok(true);
        };
        let (out, part) = ranged(&body, req)?;
        session.write_response_header(Box::new(out), false).await?;
        session.write_response_body(Some(part), true).await?;
        Ok(true)
    }

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

/// The 206 for one `Range: bytes=A-B` of `body` (or all of it): the header
/// and the slice, both modes' whole answer.
fn ranged(body: &Bytes, req: &RequestHeader) -> pingora_error::Result<(ResponseHeader, Bytes)> {
    let (first, last) = req
        .headers
        .get("range")
        .and_then(|v| v.to_str().ok()?.strip_prefix("bytes=")?.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        .filter(|&(a, b)| a <= b && b < body.len())
        .unwrap_or((0, body.len().saturating_sub(1)));
    let mut out = ResponseHeader::build(206, Some(4))?;
    out.insert_header("Content-Type", "application/octet-stream")?;
    out.insert_header("Content-Range", format!("bytes {first}-{last}/{}", body.len()))?;
    out.insert_header("Content-Length", last + 1 - first)?;
    Ok((out, body.slice(first..=last)))
}

/// `app-memory:DIR`: the same answers from memory by a bare `HttpServerApp`
/// (Pingora's HTTP/1 session and server loop, no pingora-proxy pipeline
/// around them), to measure what that pipeline costs per request. A path
/// it does not hold closes the connection.
struct App {
    files: HashMap<String, Bytes>,
}

#[async_trait]
impl HttpServerApp for App {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !session.read_request().await.ok()? {
            return None;
        }
        let body = self.files.get(session.req_header().uri.path())?;
        let (out, part) = ranged(body, session.req_header()).ok()?;
        session.write_response_header(Box::new(out)).await.ok()?;
        session.write_response_body(part, true).await.ok()?;
        let persistent = HttpPersistentSettings::for_session(&session);
        session.finish().await.ok()?.map(|s| ReusedHttpStream::from_reusable_stream(s, persistent))
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
    let app = upstream.strip_prefix("app-");
    let memory: Option<HashMap<String, Bytes>> = app.unwrap_or(upstream).strip_prefix("memory:").map(|dir| {
        std::fs::read_dir(dir)
            .expect("memory:DIR is a directory")
            .map(|e| e.expect("a directory entry").path())
            // What a cache would hold (cache.max_object_bytes' default): the
            // ranged files, not the 1 GiB and 100 MiB ones of phases 2 and 3.
            .filter(|p| p.metadata().is_ok_and(|m| m.is_file() && (1..=16 << 20).contains(&m.len())))
            .map(|p| {
                let name = format!("/{}", p.file_name().unwrap().to_string_lossy());
                (name, Bytes::from(std::fs::read(&p).expect("a readable file")))
            })
            .collect()
    });
    if let (Some(_), Some(files)) = (app, &memory) {
        let mut svc = Service::new("bare app".into(), App { files: files.clone() });
        svc.add_tcp(listen);
        server.add_service(svc);
        server.run_forever();
    }
    let bare = Bare { upstream: upstream.clone(), memory };
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, bare);
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
