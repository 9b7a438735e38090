//! `/strm/stream`: resolve (cached), stream, and when the resolved URL has
//! gone stale (connect error, timeout, 403/404/410/429/451) evict it,
//! resolve once more and retry once — never more than two attempts.

use std::sync::Arc;

use pingora::protocols::http::ServerSession;

use super::serve::How;
use super::{Ctx, Outcome, Proxy, Reply};
use crate::auth::Query;
use crate::content_type::is_playlist_path;
use crate::headers::WireHeader;
use crate::resolver::Resolved;
use crate::upstream::Request;

/// Statuses that say a resolved hoster URL went stale.
const STALE: [u16; 5] = [403, 404, 410, 429, 451];

impl Proxy {
    pub(super) async fn stream(
        &self,
        down: &mut ServerSession,
        ctx: &mut Ctx,
        query: &Query,
        client_key: Option<String>,
        forwarded: Vec<WireHeader>,
    ) -> Result<(), Outcome> {
        let resolver = self.state.resolver.as_ref().ok_or(Reply(404, "not found"))?;
        for (param, reason) in [("site", "missing parameter site"), ("slug", "missing parameter slug")] {
            if query.get(param).is_none_or(str::is_empty) {
                return Err(Reply(400, reason).into());
            }
        }
        let params = query.without(&["sig"]);
        let method = down.req_header().method.clone();
        let mut refresh = false;
        loop {
            let resolved: Arc<Resolved> = resolver.resolve(&params, refresh).await.map_err(|e| {
                log::warn!("resolver unavailable: {e}");
                Reply(502, "resolver unavailable")
            })?;
            let known_playlist = is_playlist_path(resolved.url.path());
            let request = Request {
                method: method.clone(),
                url: resolved.url.clone(),
                forwarded: forwarded.clone(),
                extra: Some(resolved.headers.clone()),
                trusted: None,
                whole: known_playlist,
            };
            let outcome = self.open(ctx, request).await;
            let stale = match &outcome {
                Ok(r) => STALE.contains(&r.header().status.as_u16()),
                Err(e) => e.is_refreshable(),
            };
            if stale && !refresh {
                refresh = true;
                ctx.refreshed = true;
                self.state.metrics.refreshes.inc();
                match outcome {
                    Ok(r) => {
                        log::info!("resolved URL answered {}; refreshing once", r.header().status.as_u16());
                        r.finish().await;
                    }
                    Err(e) => log::info!("resolved URL failed ({e}); refreshing once"),
                }
                continue;
            }
            let resp = outcome.map_err(|e| self.fetch_failed(&e))?;
            let how = How { rewrite: true, hint: None, known_playlist, client_key };
            return self.respond(down, ctx, resp, &how).await;
        }
    }
}
