//! Request authentication: HMAC-signed query strings (byte-compatible with
//! AniBridge's Python `urlencode(sorted(params.items()))`) and API keys.

use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::AuthMode;

/// Query parameters in the order they arrived, decoded like Python's
/// `parse_qsl(keep_blank_values=True)`: `+` is a space, `%XX` is a byte,
/// invalid UTF-8 is replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        Query(
            url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    /// The parameters minus those named, in arrival order.
    pub fn without(&self, names: &[&str]) -> Query {
        Query(self.0.iter().filter(|(k, _)| !names.contains(&k.as_str())).cloned().collect())
    }

    /// Form-urlencoded in arrival order (Python `urlencode(list)`).
    pub fn encode(&self) -> String {
        encode_pairs(self.0.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

/// What Python's `quote_plus` leaves bare: `A-Za-z0-9_.-~`.
const PY_QUOTE_PLUS: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'.').remove(b'-').remove(b'~');

/// Python `quote_plus(s, safe='')`.
pub fn quote_plus(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PY_QUOTE_PLUS).to_string().replace("%20", "+")
}

/// `k=v&k=v` with Python's `urlencode` escaping.
pub fn encode_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&quote_plus(k));
        out.push('=');
        out.push_str(&quote_plus(v));
    }
    out
}

/// The string that is signed: every parameter except `sig`, sorted by name
/// then value, urlencoded like Python.
pub fn canonical_query(q: &Query) -> String {
    let mut pairs: Vec<(&str, &str)> =
        q.0.iter().filter(|(k, _)| k != "sig").map(|(k, v)| (k.as_str(), v.as_str())).collect();
    pairs.sort_unstable();
    encode_pairs(pairs.into_iter())
}

/// Lowercase hex HMAC-SHA256 of `message`.
pub fn hmac_hex(secret: &[u8], message: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The signature for a query (its `sig`, if any, is ignored).
pub fn sign(secret: &[u8], q: &Query) -> String {
    hmac_hex(secret, &canonical_query(q))
}

/// Why a request was refused; the `Display` text is the one-line 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    MissingSignature,
    InvalidSignature,
    TokenExpired,
    InvalidExpiry,
    InvalidApiKey,
}

impl AuthError {
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::MissingSignature => "missing signature",
            AuthError::InvalidSignature => "invalid signature",
            AuthError::TokenExpired => "token expired",
            AuthError::InvalidExpiry => "invalid token expiry",
            AuthError::InvalidApiKey => "invalid api key",
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Verifies `sig` (and `exp`, when present) of a query at unix time `now`.
pub fn verify_token(secret: &[u8], q: &Query, now: u64) -> Result<(), AuthError> {
    let sig = q.get("sig").filter(|s| !s.is_empty()).ok_or(AuthError::MissingSignature)?;
    let expected = sign(secret, q);
    // Accept upper-case hex too: the bytes are what matter.
    if !ct_eq(expected.as_bytes(), sig.to_ascii_lowercase().as_bytes()) {
        return Err(AuthError::InvalidSignature);
    }
    if let Some(exp) = q.get("exp") {
        let exp: u64 = exp.parse().map_err(|_| AuthError::InvalidExpiry)?;
        if now > exp {
            return Err(AuthError::TokenExpired);
        }
    }
    Ok(())
}

/// Verifies an API key from `apikey`/`api_key` or the `X-Api-Key` header.
pub fn verify_api_key(expected: &str, q: &Query, header: Option<&[u8]>) -> Result<(), AuthError> {
    let given = q.get("apikey").or_else(|| q.get("api_key")).map(str::as_bytes).or(header);
    match given {
        Some(k) if ct_eq(k, expected.as_bytes()) => Ok(()),
        _ => Err(AuthError::InvalidApiKey),
    }
}

/// The configured authenticator.
#[derive(Clone)]
pub struct Auth {
    pub mode: AuthMode,
    secret: Vec<u8>,
    api_key: String,
    pub token_ttl: u64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(mode: AuthMode, secret: Option<&str>, api_key: Option<&str>, token_ttl: u64) -> Auth {
        Auth {
            mode,
            secret: secret.unwrap_or_default().as_bytes().to_vec(),
            api_key: api_key.unwrap_or_default().to_string(),
            token_ttl,
        }
    }

    /// Checks a request's credentials. `q` must already contain any bound
    /// pseudo-parameters (`_path` on routes).
    pub fn check(&self, q: &Query, api_key_header: Option<&[u8]>, now: u64) -> Result<(), AuthError> {
        match self.mode {
            AuthMode::None => Ok(()),
            AuthMode::Token => verify_token(&self.secret, q, now),
            AuthMode::Apikey => verify_api_key(&self.api_key, q, api_key_header),
        }
    }

    /// Credentials for a URL the proxy hands out (playlist children): in
    /// token mode `exp` and `sig` over `params`; in apikey mode the key the
    /// client itself used; nothing in none mode. Returns the full query.
    pub fn credentials_for(&self, mut params: Query, client_key: Option<&str>, now: u64) -> Query {
        match self.mode {
            AuthMode::None => params,
            AuthMode::Apikey => {
                if let Some(k) = client_key {
                    params.0.push(("apikey".into(), k.into()));
                }
                params
            }
            AuthMode::Token => {
                params.0.push(("exp".into(), (now + self.token_ttl).to_string()));
                let sig = sign(&self.secret, &params);
                params.0.push(("sig".into(), sig));
                params
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Query {
        Query(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    // Vectors computed with CPython 3.11:
    //   from urllib.parse import urlencode; import hmac, hashlib
    //   c = urlencode(sorted(params)); hmac.new(b"s3cret", c.encode(), hashlib.sha256).hexdigest()
    // The files in tests/fixtures/python_signatures.json hold more.
    #[test]
    fn canonical_matches_python_urlencode() {
        let p = q(&[("u", "https://h.example/a b/c?x=1&y=%2F"), ("exp", "1700000000"), ("sig", "zz")]);
        assert_eq!(
            canonical_query(&p),
            "exp=1700000000&u=https%3A%2F%2Fh.example%2Fa+b%2Fc%3Fx%3D1%26y%3D%252F"
        );
        // `~` stays bare (Python 3.7+), `*` is escaped, non-ASCII is UTF-8 escaped.
        let p = q(&[("b", "~*"), ("a", "é ü")]);
        assert_eq!(canonical_query(&p), "a=%C3%A9+%C3%BC&b=~%2A");
        // Repeated keys sort by value.
        let p = q(&[("k", "2"), ("k", "1"), ("a", "")]);
        assert_eq!(canonical_query(&p), "a=&k=1&k=2");
    }

    #[test]
    fn parse_is_parse_qsl() {
        let p = Query::parse(Some("u=a%20b+c&x=&y=%E2%82%AC&z"));
        assert_eq!(p.get("u"), Some("a b c"));
        assert_eq!(p.get("x"), Some(""));
        assert_eq!(p.get("y"), Some("€"));
        assert_eq!(p.get("z"), Some(""));
    }

    #[test]
    fn token_roundtrip_and_failures() {
        let secret = b"s3cret";
        let base = q(&[("u", "https://cdn.example/v.mp4"), ("exp", "2000")]);
        let sig = sign(secret, &base);
        let mut good = base.clone();
        good.0.push(("sig".into(), sig.clone()));
        assert_eq!(verify_token(secret, &good, 1999), Ok(()));
        assert_eq!(verify_token(secret, &good, 2000), Ok(()));
        assert_eq!(verify_token(secret, &good, 2001), Err(AuthError::TokenExpired));
        assert_eq!(verify_token(secret, &base, 0), Err(AuthError::MissingSignature));

        let mut tampered = good.clone();
        tampered.0[0].1.push('x');
        assert_eq!(verify_token(secret, &tampered, 0), Err(AuthError::InvalidSignature));
        assert_eq!(verify_token(b"other", &good, 0), Err(AuthError::InvalidSignature));

        let mut bad_exp = q(&[("u", "x"), ("exp", "soon")]);
        let s = sign(secret, &bad_exp);
        bad_exp.0.push(("sig".into(), s));
        assert_eq!(verify_token(secret, &bad_exp, 0), Err(AuthError::InvalidExpiry));
    }

    #[test]
    fn api_key_sources() {
        let k = "key-1";
        assert!(verify_api_key(k, &q(&[("apikey", "key-1")]), None).is_ok());
        assert!(verify_api_key(k, &q(&[("api_key", "key-1")]), None).is_ok());
        assert!(verify_api_key(k, &q(&[]), Some(b"key-1")).is_ok());
        assert_eq!(verify_api_key(k, &q(&[("apikey", "key-2")]), None), Err(AuthError::InvalidApiKey));
        assert_eq!(verify_api_key(k, &q(&[]), None), Err(AuthError::InvalidApiKey));
    }

    #[test]
    fn credentials_for_children() {
        let a = Auth::new(AuthMode::Token, Some("s"), None, 900);
        let c = a.credentials_for(q(&[("u", "https://x/y.ts")]), None, 1000);
        assert_eq!(c.get("exp"), Some("1900"));
        assert_eq!(a.check(&c, None, 1000), Ok(()));
        let a = Auth::new(AuthMode::Apikey, None, Some("k"), 900);
        let c = a.credentials_for(q(&[("u", "x")]), Some("k"), 0);
        assert_eq!(c.encode(), "u=x&apikey=k");
        let a = Auth::new(AuthMode::None, None, None, 900);
        assert_eq!(a.credentials_for(q(&[("u", "x")]), None, 0).encode(), "u=x");
    }
}
