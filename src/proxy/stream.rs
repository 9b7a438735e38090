//! `/strm/stream`: resolve (cached), stream, and when the resolved URL has
//! gone stale (connect error, timeout, 403/404/410/429/451) evict it,
//! resolve once more and retry once — never more than two attempts. If
//! another request has already replaced the failed answer, the retry uses
//! that one instead of asking the resolver again. A request whose first
//! answer was fine keeps its one refresh for a resumption of its body
//! ([`crate::resolver::Again`]).

use std::sync::Arc;

use pingora::protocols::http::ServerSession;

use super::decide::Asked;
use super::reply::{Failure, Outcome, Param};
use super::{Ctx, Proxy};
use crate::auth::Query;
use crate::content_type::is_playlist_path;
use crate::headers::WireHeader;
use crate::resolver::{Again, Resolved, STALE};
use crate::upstream::Request;

impl Proxy {
    pub(super) async fn stream(
        &self,
        down: &mut ServerSession,
        ctx: &mut Ctx,
        query: &Query,
        asked: &Asked<'_>,
        client_key: Option<&str>,
        forwarded: Vec<WireHeader>,
    ) -> Result<(), Outcome> {
        let resolver = self.state.resolver.as_ref().ok_or(Failure::NotFound)?;
        for (param, missing) in [("site", Param::Site), ("slug", Param::Slug)] {
            if query.get(param).is_none_or(str::is_empty) {
                return Err(Failure::Missing(missing).into());
            }
        }
        let params = query.without(&["sig"]);
        let method = down.req_header().method.clone();
        // The answer that failed, once one has: the retry resolves again.
        let mut stale: Option<Arc<Resolved>> = None;
        loop {
            let resolved: Arc<Resolved> = resolver.resolve(&params, stale.as_ref()).await.map_err(|e| {
                log::warn!("resolver unavailable: {e}");
                Failure::ResolverUnavailable
            })?;
            let known_playlist = is_playlist_path(resolved.url.path());
            // The one refresh, while this request has not used it.
            let again = stale.is_none().then(|| Arc::new(Again::new(resolver, params.clone())));
            let request = Request {
                method: method.clone(),
                url: resolved.url.clone(),
                forwarded: forwarded.clone(),
                extra: Some(resolved.clone()),
                again,
                trusted: None,
                whole: known_playlist,
            };
            self.attempt(ctx);
            let outcome = self.fetch(down, ctx, request).await?;
            let failed = match &outcome {
                Ok(src) => STALE.contains(&src.header().status.as_u16()),
                Err(e) => e.is_refreshable(),
            };
            if failed && stale.is_none() {
                stale = Some(resolved);
                ctx.refreshed = true;
                self.state.metrics.refreshes.inc();
                match outcome {
                    Ok(src) => {
                        log::info!("resolved URL answered {}; refreshing once", src.header().status.as_u16());
                        src.finish().await;
                    }
                    Err(e) => log::info!("resolved URL failed ({e}); refreshing once"),
                }
                continue;
            }
            let src = outcome.map_err(|e| self.fetch_failed(ctx, &e))?;
            let asked = Asked { known_playlist, ..*asked };
            return self.respond(down, ctx, src, &asked, client_key).await;
        }
    }
}
