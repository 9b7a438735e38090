//! The resolver behind `/strm/stream`: turns episode parameters into a
//! hoster URL (+ headers) via `GET {resolver.url}?{query}`. Answers are kept
//! for their `ttl_seconds` in a bounded cache (moka), and concurrent requests
//! for one key share one resolver call; failures are never kept.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::Method;
use serde::Deserialize;
use url::Url;

use crate::auth::{canonical_query, Query};
use crate::headers::WireHeader;
use crate::upstream::{BodyError, Client, Request, Settings, Timeouts};

/// The largest resolver answer accepted.
const MAX_ANSWER: usize = 256 * 1024;

/// A resolved hoster URL.
#[derive(Debug)]
pub struct Resolved {
    pub url: Url,
    /// Sent upstream with every request for this URL, on every hop (they
    /// win over profiles); a `Cookie` or `Authorization` among them only to
    /// this URL's origin (see `upstream::request`).
    pub headers: Arc<[WireHeader]>,
    ttl: Duration,
}

#[derive(Deserialize)]
struct Answer {
    url: String,
    /// In the answer's order: they go upstream in that order. `null` is
    /// none, as Python's `None` serialises.
    #[serde(default)]
    headers: Option<indexmap::IndexMap<String, String>>,
    /// Any JSON number (Python computes it as a float as often as not;
    /// whole seconds are kept, a negative one is 0) or `null` (0).
    #[serde(default)]
    ttl_seconds: Option<f64>,
}

/// Each answer lives for its own `ttl_seconds` (0: not kept at all).
struct AnswerTtl;

impl moka::Expiry<String, Arc<Resolved>> for AnswerTtl {
    fn expire_after_create(&self, _key: &String, value: &Arc<Resolved>, _now: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

#[derive(Clone)]
pub struct Resolver {
    base: Arc<Url>,
    client: Client,
    timeout: Duration,
    cache: moka::future::Cache<String, Arc<Resolved>>,
}

impl Resolver {
    /// `own_listeners`: the proxy's, never dialled (a resolver URL pointing
    /// at the proxy itself would send every resolution round in a loop).
    pub fn new(base: Url, timeout: Duration, capacity: usize, own_listeners: Arc<[SocketAddr]>) -> Resolver {
        // `resolver.timeout` bounds the whole call (`lookup`); the client's
        // own timeouts are only a backstop behind it, so that a slow
        // resolver is said to be over `resolver.timeout`, not over the
        // upstream timeouts their messages name.
        let backstop = timeout + Duration::from_secs(1);
        let timeouts = Timeouts { connect: backstop, read: backstop, write: backstop };
        // resolver.url is operator config: no egress proxy, no profile.
        let settings = Settings { max_redirects: 3, own_listeners, ..Settings::plain(timeouts) };
        let cache = moka::future::Cache::builder().max_capacity(capacity as u64).expire_after(AnswerTtl).build();
        Resolver { base: Arc::new(base), client: Client::new(settings, None), timeout, cache }
    }

    /// Resolves `params` (the client query minus `sig`). With `stale` (an
    /// answer whose URL failed), that answer is evicted first — only if it
    /// is still the one held: when another request has already refreshed
    /// it, the refreshed answer is used, so a crowd that finds a link dead
    /// asks the resolver once, not once per viewer. Concurrent refreshes
    /// share one call.
    pub async fn resolve(&self, params: &Query, stale: Option<&Arc<Resolved>>) -> Result<Arc<Resolved>, String> {
        let key = canonical_query(&params.without(&["exp"]));
        if let Some(stale) = stale {
            // One step under the key's lock: no refreshed answer is lost
            // between looking and evicting.
            let evict = |held: Option<moka::Entry<String, Arc<Resolved>>>| async move {
                match held {
                    Some(held) if Arc::ptr_eq(held.value(), stale) => moka::ops::compute::Op::Remove,
                    _ => moka::ops::compute::Op::Nop,
                }
            };
            self.cache.entry(key.clone()).and_compute_with(evict).await;
        }
        self.cache.try_get_with(key, self.lookup(params)).await.map_err(|e| e.to_string())
    }

    async fn lookup(&self, params: &Query) -> Result<Arc<Resolved>, String> {
        match tokio::time::timeout(self.timeout, self.call(params)).await {
            Ok(r) => r.map(Arc::new),
            Err(_) => Err(format!("no answer within resolver.timeout ({:?})", self.timeout)),
        }
    }

    async fn call(&self, params: &Query) -> Result<Resolved, String> {
        let mut url = (*self.base).clone();
        let q = params.encode();
        url.set_query((!q.is_empty()).then_some(q.as_str()));
        let mut asked = http::HeaderMap::new();
        asked.insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
        let req = Request {
            method: Method::GET,
            url,
            forwarded: self.client.forwarded(&asked),
            extra: None,
            again: None,
            trusted: Some(self.base.clone()),
            whole: false,
        };
        let mut resp = self.client.open(req).await.map_err(|e| e.to_string())?;
        let status = resp.header().status;
        let body = resp.read_to_vec(Vec::new(), MAX_ANSWER).await.map_err(|e| match e {
            BodyError::TooLarge => "answer too large".to_string(),
            BodyError::Failed(e) => e.to_string(),
        })?;
        resp.finish().await;
        if !status.is_success() {
            return Err(format!("status {}", status.as_u16()));
        }
        parse_answer(&body)
    }
}

/// The upstream statuses that say a resolved URL has gone stale (an expired
/// or revoked link): worth resolving it once more.
pub const STALE: [u16; 5] = [403, 404, 410, 429, 451];

/// What a request from a resolved URL needs to resolve it once more, when
/// the URL has gone stale by the time its body must be resumed: a relayed
/// film keeps its upstream connection for the whole playback, so a drop an
/// hour in meets a link that may have expired. A request has one refresh:
/// one whose first answer was stale has used it already.
pub struct Again {
    resolver: Resolver,
    params: Query,
}

impl Again {
    pub fn new(resolver: &Resolver, params: Query) -> Again {
        Again { resolver: resolver.clone(), params }
    }

    /// A fresh answer in place of `stale` ([`Resolver::resolve`]).
    pub async fn resolve(&self, stale: &Arc<Resolved>) -> Result<Arc<Resolved>, String> {
        self.resolver.resolve(&self.params, Some(stale)).await
    }
}

impl std::fmt::Debug for Again {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The query may carry what the client signed: never in a debug line.
        f.write_str("Again")
    }
}

/// Parses and checks a resolver answer.
pub fn parse_answer(body: &[u8]) -> Result<Resolved, String> {
    let a: Answer = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let url = Url::parse(&a.url).map_err(|_| "answer url is not a URL".to_string())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("answer url is not http(s)".into());
    }
    let pairs = a.headers.iter().flatten().map(|(k, v)| (k.as_str(), v.as_str()));
    let headers = crate::headers::parse_pairs(pairs)?;
    // `as` saturates: negative is 0, beyond u64 is u64::MAX.
    let ttl = Duration::from_secs(a.ttl_seconds.unwrap_or(0.0) as u64);
    Ok(Resolved { url, headers: headers.into(), ttl })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let r = parse_answer(
            br#"{"url":"https://cdn.example/v.mp4","headers":{"Referer":"https://voe.sx/"},"ttl_seconds":60}"#,
        )
        .unwrap();
        assert_eq!(r.url.as_str(), "https://cdn.example/v.mp4");
        assert_eq!(r.headers[0].value, "https://voe.sx/");
        assert_eq!(&r.headers[0].spelling[..], b"Referer");
        assert_eq!(r.ttl, Duration::from_secs(60));
        assert!(parse_answer(br#"{"url":"https://x/"}"#).unwrap().ttl.is_zero());
        // What a Python resolver may send: a float, null, a negative number.
        let ttl = |json: &str| parse_answer(json.as_bytes()).map(|r| r.ttl.as_secs());
        assert_eq!(ttl(r#"{"url":"https://x/","ttl_seconds":299.7}"#), Ok(299));
        assert_eq!(ttl(r#"{"url":"https://x/","ttl_seconds":null,"headers":null}"#), Ok(0));
        assert_eq!(ttl(r#"{"url":"https://x/","ttl_seconds":-5}"#), Ok(0));
        assert_eq!(ttl(r#"{"url":"https://x/","ttl_seconds":1e300}"#), Ok(u64::MAX));
        assert!(ttl(r#"{"url":"https://x/","ttl_seconds":"60"}"#).is_err(), "a string is not a number");
        assert!(parse_answer(b"not json").is_err());
        assert!(parse_answer(br#"{"url":"file:///etc/passwd"}"#).is_err());
        assert!(parse_answer(br#"{"headers":{}}"#).is_err());
        assert!(parse_answer(br#"{"url":"https://x/","headers":{"Bad Name":"v"}}"#).is_err());
    }

    #[test]
    fn answer_headers_keep_their_order() {
        let r =
            parse_answer(br#"{"url":"https://x/","headers":{"Referer":"r","Origin":"o","Cookie":"c","Accept":"a"}}"#)
                .unwrap();
        let names: Vec<&[u8]> = r.headers.iter().map(|h| &h.spelling[..]).collect();
        assert_eq!(names, [&b"Referer"[..], b"Origin", b"Cookie", b"Accept"]);
    }
}
