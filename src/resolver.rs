//! The resolver behind `/strm/stream`: turns episode parameters into a
//! hoster URL (+ headers) via `GET {resolver.url}?{query}`, with a bounded
//! cache and single-flight lookups (concurrent requests for one key share
//! one resolver call).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderValue};
use http::Method;
use serde::Deserialize;
use tokio::sync::OnceCell;
use url::Url;

use crate::auth::{canonical_query, Query};
use crate::egress::Egress;
use crate::headers::WireHeader;
use crate::providers::Providers;
use crate::upstream::{Client, Request, Timeouts};

/// The largest resolver answer accepted.
const MAX_ANSWER: usize = 256 * 1024;

/// A resolved hoster URL.
#[derive(Debug)]
pub struct Resolved {
    pub url: Url,
    pub headers: Vec<WireHeader>,
    ttl: Duration,
}

#[derive(Deserialize)]
struct Answer {
    url: String,
    /// In the answer's order: they go upstream in that order.
    #[serde(default)]
    headers: indexmap::IndexMap<String, String>,
    #[serde(default)]
    ttl_seconds: u64,
}

type Cell = Arc<OnceCell<Result<Arc<Resolved>, String>>>;

struct Slot {
    cell: Cell,
    /// Set once the lookup finished successfully.
    expires: Option<Instant>,
}

pub struct Resolver {
    base: Url,
    client: Client,
    timeout: Duration,
    capacity: usize,
    cache: Mutex<HashMap<String, Slot>>,
}

impl Resolver {
    pub fn new(url: &str, timeout: Duration, capacity: usize) -> Result<Resolver, String> {
        let base = Url::parse(url).map_err(|e| format!("resolver.url: {e}"))?;
        let timeouts = Timeouts { connect: timeout, read: timeout, write: timeout };
        let client = Client::new(Egress::default(), Providers::default(), timeouts, 3, None, 64);
        Ok(Resolver { base, client, timeout, capacity, cache: Mutex::new(HashMap::new()) })
    }

    /// Resolves `params` (the client query minus `sig`). With `refresh`,
    /// the cached answer is evicted first (concurrent refreshes still share
    /// one call).
    pub async fn resolve(&self, params: &Query, refresh: bool) -> Result<Arc<Resolved>, String> {
        let key = canonical_query(&params.without(&["exp"]));
        let cell = self.slot(&key, refresh);
        let result = cell.get_or_init(|| self.lookup(params)).await.clone();
        let mut cache = self.cache.lock().unwrap();
        let ours = cache.get(&key).is_some_and(|s| Arc::ptr_eq(&s.cell, &cell));
        if ours {
            match &result {
                Ok(r) if !r.ttl.is_zero() => {
                    if let Some(slot) = cache.get_mut(&key) {
                        slot.expires.get_or_insert_with(|| Instant::now() + r.ttl);
                    }
                }
                // Failures and TTL 0 are not kept for later requests.
                _ => {
                    cache.remove(&key);
                }
            }
        }
        result
    }

    /// The cell for `key`: a live cached or in-flight one, or a new one.
    fn slot(&self, key: &str, refresh: bool) -> Cell {
        let mut cache = self.cache.lock().unwrap();
        let now = Instant::now();
        if let Some(slot) = cache.get(key) {
            let fresh = slot.expires.is_none_or(|e| e > now);
            // A refresh evicts a finished answer; one in flight is shared.
            let finished = slot.cell.initialized();
            if fresh && !(refresh && finished) {
                return slot.cell.clone();
            }
            cache.remove(key);
        }
        if cache.len() >= self.capacity {
            cache.retain(|_, s| s.expires.is_none_or(|e| e > now));
            while cache.len() >= self.capacity {
                let Some(k) = cache.keys().next().cloned() else { break };
                cache.remove(&k);
            }
        }
        let cell: Cell = Arc::new(OnceCell::new());
        cache.insert(key.to_string(), Slot { cell: cell.clone(), expires: None });
        cell
    }

    async fn lookup(&self, params: &Query) -> Result<Arc<Resolved>, String> {
        match tokio::time::timeout(self.timeout, self.call(params)).await {
            Ok(r) => r.map(Arc::new),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    async fn call(&self, params: &Query) -> Result<Resolved, String> {
        let mut url = self.base.clone();
        let q = params.encode();
        url.set_query((!q.is_empty()).then_some(q.as_str()));
        let accept =
            [WireHeader::conventional(&http::header::ACCEPT, "Accept", HeaderValue::from_static("application/json"))];
        let empty = HeaderMap::new();
        let req = Request {
            method: Method::GET,
            url,
            client_headers: &empty,
            extra_headers: &accept,
            trusted: Some(&self.base),
        };
        let mut resp = self.client.open(req).await.map_err(|e| e.to_string())?;
        let status = resp.header().status;
        let mut body = Vec::new();
        while let Some(chunk) = resp.session.read_body_ref().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err("answer too large".into());
            }
            body.extend_from_slice(chunk);
        }
        self.client.release(resp.session, &resp.peer).await;
        if !status.is_success() {
            return Err(format!("status {}", status.as_u16()));
        }
        parse_answer(&body)
    }
}

/// Parses and checks a resolver answer.
pub fn parse_answer(body: &[u8]) -> Result<Resolved, String> {
    let a: Answer = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let url = Url::parse(&a.url).map_err(|_| "answer url is not a URL".to_string())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("answer url is not http(s)".into());
    }
    let headers = crate::headers::parse_pairs(a.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    Ok(Resolved { url, headers, ttl: Duration::from_secs(a.ttl_seconds) })
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
