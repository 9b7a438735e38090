//! Fetching the answer to a request and answering with it: one upstream
//! attempt ([`Proxy::open`]), then what the response is ([`decide`]) and how
//! it goes out ([`relay`], [`playlist`]).

use std::time::Instant;

use http::header;
use pingora::protocols::http::ServerSession;
use pingora_http::ResponseHeader;

use super::decide::{self, Answer, Asked, Decision};
use super::relay::relay;
use super::reply::{Failure, Outcome};
use super::{playlist, Ctx, Proxy};
use crate::upstream::{FetchError, Request, Response};

impl Proxy {
    /// Opens the upstream response: one attempt, recorded for the log and metrics.
    pub(super) async fn open(&self, ctx: &mut Ctx, req: Request) -> Result<Response<'_>, FetchError> {
        ctx.attempts += 1;
        if ctx.attempts > 1 {
            self.state.metrics.retries.inc();
        }
        let access_log = log::log_enabled!(target: "access", log::Level::Info);
        if access_log {
            ctx.upstream_host = req.url.host_str().unwrap_or_default().to_string();
        }
        let started = Instant::now();
        let resp = self.state.client.open(req).await?;
        self.state.metrics.upstream_header_seconds.observe(started.elapsed().as_secs_f64());
        ctx.upstream_status = resp.header().status.as_u16();
        if access_log && resp.redirects() > 0 {
            ctx.upstream_host = resp.url().host_str().unwrap_or_default().to_string();
        }
        Ok(resp)
    }

    /// The answer for an upstream failure before any response: logged,
    /// counted, one failure.
    pub(super) fn fetch_failed(&self, e: &FetchError) -> Outcome {
        if matches!(e, FetchError::Refused(_)) {
            self.state.metrics.egress_refusals.inc();
        }
        log::warn!("upstream failed: {e}");
        Failure::from(e).into()
    }

    /// A body that failed before anything was sent.
    pub(super) fn body_failed(&self, e: Box<pingora_error::Error>) -> Outcome {
        self.fetch_failed(&FetchError::from_pingora(e))
    }

    /// Decides what the response is and answers with it: relayed as it is,
    /// or, for a playlist, read whole and rewritten — fetched again whole
    /// when this response cannot give it so (a partial answer to a range, a
    /// HEAD). `client_key` is handed on to a playlist's children.
    pub(super) async fn respond(
        &self,
        down: &mut ServerSession,
        ctx: &mut Ctx,
        mut resp: Response<'_>,
        asked: &Asked<'_>,
        client_key: Option<&str>,
    ) -> Result<(), Outcome> {
        let st = &*self.state;
        let mut first: Option<Vec<u8>> = None;
        // A HEAD fetched again as a GET that then was no playlist is
        // answered with its own first response's header.
        let mut own: Option<(ResponseHeader, bool)> = None;
        let mut refetched = false;
        loop {
            let answer = answer_of(&resp);
            match decide::decide(asked, &answer, first.as_deref()) {
                Decision::Sniff => {
                    let head = resp.peek(decide::SNIFF).await.map_err(|e| self.body_failed(e))?;
                    first = Some(head);
                }
                Decision::Playlist => {
                    let first = first.unwrap_or_default();
                    // Boxed: the rare playlist path must not inflate every request's future.
                    return Box::pin(playlist::answer(st, down, ctx, resp, first, client_key)).await;
                }
                Decision::Refetch if refetched => {
                    log::warn!("{} gave no whole playlist when asked again", resp.url().host_str().unwrap_or("-"));
                    return Err(Failure::PlaylistUnavailable.into());
                }
                Decision::Refetch => {
                    if asked.head {
                        own = Some((resp.header().clone(), resp.head_fallback()));
                    }
                    resp = Box::pin(resp.refetch_whole()).await.map_err(|e| self.fetch_failed(&e))?;
                    refetched = true;
                    first = None;
                }
                Decision::Relay { hls } => {
                    let answer = match &own {
                        Some((header, head_fallback)) => Answer { header, head_fallback: *head_fallback, ..answer },
                        None => answer,
                    };
                    let mut out = decide::relay_header(asked, &answer, hls)?;
                    st.cors.apply(down.req_header().headers.get(header::ORIGIN), &mut out)?;
                    return relay(st, down, ctx, resp, out, first.unwrap_or_default(), asked.head).await;
                }
            }
        }
    }
}

/// What the decision needs to know of an upstream response.
fn answer_of<'r>(resp: &'r Response<'_>) -> Answer<'r> {
    Answer {
        header: resp.header(),
        path: resp.url().path(),
        head_sent: resp.sent_head(),
        head_fallback: resp.head_fallback(),
    }
}
