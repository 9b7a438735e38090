//! CORS for browser players (hls.js and friends): preflight answers and the
//! headers on GET/HEAD answers.

use http::HeaderValue;
use pingora_http::ResponseHeader;

pub const ALLOW_METHODS: &str = "GET, HEAD, OPTIONS";
pub const ALLOW_HEADERS: &str =
    "Range, If-Range, If-None-Match, If-Modified-Since, Accept, X-Api-Key, Origin, Content-Type";
pub const EXPOSE_HEADERS: &str = "Content-Length, Content-Range, Accept-Ranges, ETag";
pub const MAX_AGE: &str = "86400";

#[derive(Debug, Clone, Default)]
pub struct Cors {
    any: bool,
    origins: Vec<String>,
}

impl Cors {
    /// From `cors.allow_origins` entries: `*` or origins.
    pub fn new<'a>(allow_origins: impl IntoIterator<Item = &'a str>) -> Cors {
        let mut cors = Cors::default();
        for o in allow_origins {
            if o == "*" {
                cors.any = true;
            } else {
                cors.origins.push(o.trim_end_matches('/').to_string());
            }
        }
        cors
    }

    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`:
    /// the origin itself when the list names it, else `*` when allowed.
    pub fn allow_origin(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        let origin = origin?;
        let o = origin.to_str().ok()?;
        if self.origins.iter().any(|a| a.eq_ignore_ascii_case(o)) {
            return Some(origin.clone());
        }
        self.any.then(|| HeaderValue::from_static("*"))
    }

    /// Whether answers echo origins from a list, so they differ by the
    /// request's `Origin`: then every answer says `Vary: Origin` — also one
    /// to a request without an allowed `Origin`, or a browser's cache could
    /// hand that answer (no `Access-Control-Allow-Origin`) to a player's
    /// CORS request for the same URL (the Fetch standard, "CORS protocol and
    /// HTTP caches").
    fn echoes(&self) -> bool {
        !self.origins.is_empty()
    }

    /// Adds the headers a GET/HEAD answer carries for a request from `origin`.
    pub fn apply(&self, origin: Option<&HeaderValue>, out: &mut ResponseHeader) -> pingora_error::Result<()> {
        if let Some(allow) = self.allow_origin(origin) {
            out.insert_header("Access-Control-Allow-Origin", allow)?;
            out.insert_header("Access-Control-Expose-Headers", EXPOSE_HEADERS)?;
        }
        if self.echoes() {
            let vary = match out.headers.get(http::header::VARY).and_then(|v| v.to_str().ok()) {
                Some(v) if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("origin")) => v.to_string(),
                Some(v) => format!("{v}, Origin"),
                None => "Origin".to_string(),
            };
            out.insert_header("Vary", vary)?;
        }
        Ok(())
    }

    /// The answer to a preflight (`OPTIONS`) from `origin`: 204, no body.
    pub fn preflight(&self, origin: Option<&HeaderValue>) -> pingora_error::Result<ResponseHeader> {
        let mut out = ResponseHeader::build(http::StatusCode::NO_CONTENT, Some(8))?;
        if let Some(allow) = self.allow_origin(origin) {
            out.insert_header("Access-Control-Allow-Origin", allow)?;
        }
        if self.echoes() {
            out.insert_header("Vary", "Origin")?;
        }
        out.insert_header("Access-Control-Allow-Methods", ALLOW_METHODS)?;
        out.insert_header("Access-Control-Allow-Headers", ALLOW_HEADERS)?;
        out.insert_header("Access-Control-Max-Age", MAX_AGE)?;
        out.insert_header("Allow", ALLOW_METHODS)?;
        out.insert_header(http::header::CONTENT_LENGTH, "0")?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let any = Cors::new(["*"]);
        let o = HeaderValue::from_static("https://app.example");
        assert_eq!(any.allow_origin(Some(&o)), Some(HeaderValue::from_static("*")));
        assert!(!any.echoes(), "`*` is the same answer for every origin");
        assert_eq!(any.allow_origin(None), None);
        let list = Cors::new(["https://app.example/"]);
        assert_eq!(list.allow_origin(Some(&o)), Some(o.clone()));
        assert!(list.echoes(), "a list echoes the origin");
        assert_eq!(list.allow_origin(Some(&HeaderValue::from_static("https://evil.example"))), None);
        assert!(!Cors::new([]).enabled());
    }

    #[test]
    fn echoed_origins_vary_once() {
        let list = Cors::new(["https://app.example"]);
        let o = HeaderValue::from_static("https://app.example");
        let mut out = ResponseHeader::build(200, None).unwrap();
        out.insert_header("Vary", "Accept-Encoding").unwrap();
        list.apply(Some(&o), &mut out).unwrap();
        assert_eq!(out.headers["vary"], "Accept-Encoding, Origin");
        assert_eq!(out.headers["access-control-expose-headers"], EXPOSE_HEADERS);
        list.apply(Some(&o), &mut out).unwrap();
        assert_eq!(out.headers["vary"], "Accept-Encoding, Origin");
        let pre = list.preflight(Some(&o)).unwrap();
        assert_eq!(pre.status, 204);
        assert_eq!(pre.headers["vary"], "Origin");
        assert!(!pre.headers.contains_key("access-control-expose-headers"));
        // Not allowed, or no Origin at all: no CORS headers, but the answer
        // still varies by Origin.
        for origin in [Some(HeaderValue::from_static("https://evil.example")), None] {
            let mut out = ResponseHeader::build(200, None).unwrap();
            list.apply(origin.as_ref(), &mut out).unwrap();
            assert_eq!(out.headers["vary"], "Origin", "{origin:?}");
            assert!(!out.headers.contains_key("access-control-allow-origin"), "{origin:?}");
            assert_eq!(list.preflight(origin.as_ref()).unwrap().headers["vary"], "Origin");
        }
        // `*` is one answer for every origin: no Vary.
        let mut out = ResponseHeader::build(200, None).unwrap();
        Cors::new(["*"]).apply(Some(&o), &mut out).unwrap();
        assert_eq!(out.headers["access-control-allow-origin"], "*");
        assert!(!out.headers.contains_key("vary"));
    }
}
