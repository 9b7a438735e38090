//! CORS for browser players (hls.js and friends): preflight answers and the
//! headers on GET/HEAD answers.

use http::HeaderValue;

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
    pub fn new(allow_origins: &[String]) -> Cors {
        Cors {
            any: allow_origins.iter().any(|o| o == "*"),
            origins: allow_origins.iter().filter(|o| *o != "*").map(|o| o.trim_end_matches('/').to_string()).collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, and
    /// whether it echoes the origin (then `Vary: Origin` is due).
    pub fn allow_origin(&self, origin: Option<&HeaderValue>) -> Option<(HeaderValue, bool)> {
        let origin = origin?;
        let o = origin.to_str().ok()?;
        if self.origins.iter().any(|a| a.eq_ignore_ascii_case(o)) {
            return Some((origin.clone(), true));
        }
        self.any.then(|| (HeaderValue::from_static("*"), false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let any = Cors::new(&["*".into()]);
        let o = HeaderValue::from_static("https://app.example");
        assert_eq!(any.allow_origin(Some(&o)), Some((HeaderValue::from_static("*"), false)));
        assert_eq!(any.allow_origin(None), None);
        let list = Cors::new(&["https://app.example/".into()]);
        assert_eq!(list.allow_origin(Some(&o)), Some((o.clone(), true)));
        assert_eq!(list.allow_origin(Some(&HeaderValue::from_static("https://evil.example"))), None);
        assert!(!Cors::new(&[]).enabled());
    }
}
