//! Relay queries that passed every check, remembered by their exact bytes.
//!
//! A player reading a file in ranges sends one signed URL again and again.
//! Decoding its query, checking its signature and parsing its `u=` was a
//! fifth of the work of a range answered from the cache; a lookup by the
//! query's bytes replaces it. What makes that safe:
//! - only a query that passed the signature and `u=` checks is remembered,
//!   and only the exact same bytes find it (a changed byte is checked in full);
//! - its `exp` is checked again on every use (an expired one is checked in
//!   full, which refuses it and counts the refusal);
//! - only where the answer depends on the query alone: token mode and auth
//!   off. An API key can come from a header, so that mode checks every time;
//! - bounded in bytes (moka, least recently used out first).

use std::sync::Arc;

use url::Url;

use crate::auth::Query;
use crate::config::AuthMode;

/// Bytes kept: thousands of distinct signed URLs.
const MAX_BYTES: u64 = 4 << 20;

/// What one remembered query costs beside its bytes and its URL's: the
/// entry, its `Url` and moka's bookkeeping. Measured: 50 000 distinct
/// queries of about 80 bytes grew the process by 17.7 MB with 64 counted
/// here (four times the bound); with 512, by 6.3 MB.
const ENTRY_COST: usize = 512;

struct Entry {
    url: Url,
    /// The query's `exp`, if it has one.
    exp: Option<u64>,
}

pub struct Verified {
    /// `None` in API-key mode.
    /// Hashed with aHash (keyed per process): a signed query is a hundred
    /// bytes or more, and SipHash of it was most of a lookup.
    seen: Option<moka::sync::Cache<Box<str>, Arc<Entry>, ahash::RandomState>>,
}

impl Verified {
    pub fn new(mode: AuthMode) -> Verified {
        let seen = matches!(mode, AuthMode::Token | AuthMode::None).then(|| {
            moka::sync::Cache::<Box<str>, Arc<Entry>>::builder()
                .max_capacity(MAX_BYTES)
                .weigher(|k, v| u32::try_from(k.len() + v.url.as_str().len() + ENTRY_COST).unwrap_or(u32::MAX))
                .build_with_hasher(ahash::RandomState::new())
        });
        Verified { seen }
    }

    /// The upstream URL of `raw`, if that exact query passed before and has
    /// not expired by `now` (unix seconds).
    pub fn get(&self, raw: &str, now: u64) -> Option<Url> {
        let entry = self.seen.as_ref()?.get(raw)?;
        match entry.exp {
            Some(exp) if now > exp => None,
            _ => Some(entry.url.clone()),
        }
    }

    /// Remembers `raw` (decoded as `query`) once its credentials and its
    /// `u=` (`url`) have passed.
    pub fn remember(&self, raw: &str, query: &Query, url: &Url) {
        let Some(seen) = &self.seen else { return };
        let exp = match query.get("exp").map(str::parse) {
            None => None,
            Some(Ok(exp)) => Some(exp),
            // Cannot have passed the signature check; never remembered.
            Some(Err(_)) => return,
        };
        seen.insert(raw.into(), Arc::new(Entry { url: url.clone(), exp }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> Url {
        Url::parse("http://h.example/a.mp4").unwrap()
    }

    #[test]
    fn only_the_same_bytes_before_their_expiry_are_found() {
        let v = Verified::new(AuthMode::Token);
        let raw = "u=http%3A%2F%2Fh.example%2Fa.mp4&exp=100&sig=ab";
        assert_eq!(v.get(raw, 50), None, "nothing before it passed");
        v.remember(raw, &Query::parse(Some(raw)), &url());
        assert_eq!(v.get(raw, 50), Some(url()));
        assert_eq!(v.get(raw, 100), Some(url()), "valid through its exp second, like the check");
        assert_eq!(v.get(raw, 101), None, "expired: checked in full again");
        assert_eq!(v.get("u=http%3A%2F%2Fh.example%2Fa.mp4&exp=100&sig=ac", 50), None);
        assert_eq!(v.get("u=http%3A%2F%2Fh.example%2Fa.mp4&exp=100&sig=ab&x", 50), None);
    }

    #[test]
    fn a_query_without_exp_stays_and_an_unparsable_exp_is_never_kept() {
        let v = Verified::new(AuthMode::None);
        v.remember("u=x", &Query::parse(Some("u=x")), &url());
        assert_eq!(v.get("u=x", u64::MAX), Some(url()));
        v.remember("u=x&exp=soon", &Query::parse(Some("u=x&exp=soon")), &url());
        assert_eq!(v.get("u=x&exp=soon", 0), None);
    }

    #[test]
    fn api_key_mode_remembers_nothing() {
        let v = Verified::new(AuthMode::Apikey);
        v.remember("u=x&apikey=k", &Query::parse(Some("u=x&apikey=k")), &url());
        assert_eq!(v.get("u=x&apikey=k", 0), None);
    }
}
