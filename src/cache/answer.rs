//! Answering a request from a whole object in memory, as an origin would
//! (RFC 9110): the conditionals first (`If-None-Match`, else
//! `If-Modified-Since`: 304), then one `Range` (206, or 416 past the end),
//! honoured only while `If-Range` matches; otherwise the whole object (200).
//! Pure: from the request's headers, the stored header and the length.

use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use pingora_error::Result;
use pingora_http::ResponseHeader;

/// How to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// 200 and the whole body.
    Whole,
    /// 206 and bytes `first..=last`.
    Part(u64, u64),
    /// 416: the range starts past the end.
    Unsatisfiable,
    /// 304: the client has this version.
    NotModified,
}

impl Plan {
    /// The body bytes to send (`first..end`), for an object of `len` bytes.
    pub fn body(self, len: u64) -> (u64, u64) {
        match self {
            Plan::Whole => (0, len),
            Plan::Part(first, last) => (first, last + 1),
            Plan::Unsatisfiable | Plan::NotModified => (0, 0),
        }
    }
}

/// The plan for a request with headers `req` against a stored `200` whose
/// headers are `stored`, `len` bytes long; `None` when memory cannot answer
/// it as the upstream would (several ranges, another unit, a range that
/// does not parse): such a request goes upstream as it is.
pub fn plan(req: &HeaderMap, stored: &HeaderMap, len: u64) -> Option<Plan> {
    let etag = stored.get(header::ETAG).and_then(|v| v.to_str().ok());
    if req.contains_key(header::IF_NONE_MATCH) {
        // A list, also when sent as several field lines (RFC 9110 §5.3);
        // weak comparison (§13.1.2).
        let mut tags = req.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok());
        // `*` matches any stored representation, with an ETag or not (§13.1.2).
        let hit =
            tags.any(|inm| inm.split(',').map(str::trim).any(|t| t == "*" || etag.is_some_and(|e| weak(t) == weak(e))));
        if hit {
            return Some(Plan::NotModified);
        }
    } else if let Some(ims) =
        req.get(header::IF_MODIFIED_SINCE).and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
    {
        // Parsed only here: most requests carry no conditionals.
        let modified = stored.get(header::LAST_MODIFIED).and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok());
        if modified.is_some_and(|m| m <= ims) {
            return Some(Plan::NotModified);
        }
    }
    let Some(range) = req.get(header::RANGE) else { return Some(Plan::Whole) };
    let range = single_range(range.to_str().ok()?, len)?;
    if let Some(if_range) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()).map(str::trim) {
        let matches = if if_range.starts_with('"') || if_range.starts_with("W/") {
            // Strong comparison: a weak tag never matches.
            !if_range.starts_with("W/") && etag.is_some_and(|e| e == if_range)
        } else {
            stored.get(header::LAST_MODIFIED).and_then(|v| v.to_str().ok()) == Some(if_range)
        };
        if !matches {
            return Some(Plan::Whole);
        }
    }
    Some(range)
}

fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// Whether memory can answer a `Range` value: one `bytes=` range.
pub fn answerable_range(v: &http::HeaderValue) -> bool {
    v.to_str().is_ok_and(|v| single_range(v, u64::MAX).is_some())
}

/// One `bytes=` range of a `len`-byte object: `A-B`, `A-` or `-N`.
///
/// An empty object has no bytes to send in a `206`: a range from its
/// start, or a suffix (which RFC 9110 calls satisfiable there), is answered
/// with the whole (empty) object, as nginx and Apache answer it; one
/// starting later is past the end.
fn single_range(v: &str, len: u64) -> Option<Plan> {
    let spec = v.trim_ascii().strip_prefix("bytes=")?.trim_ascii();
    // Byte searches (every range answered from memory is read twice).
    if spec.as_bytes().contains(&b',') {
        return None;
    }
    let dash = spec.bytes().position(|b| b == b'-')?;
    let (a, raw_b) = (&spec[..dash], &spec[dash + 1..]);
    let (a, b) = (a.trim_ascii(), raw_b.trim_ascii());
    let digits = |s: &str| crate::headers::digits(s);
    match (a.is_empty(), b.is_empty()) {
        (false, _) => {
            let first = digits(a)?;
            let last = if b.is_empty() { None } else { Some(digits(b)?) };
            if last.is_some_and(|l| l < first) {
                return None;
            }
            if first >= len {
                return Some(if len == 0 && first == 0 { Plan::Whole } else { Plan::Unsatisfiable });
            }
            Some(Plan::Part(first, last.map_or(len - 1, |l| l.min(len - 1))))
        }
        (true, false) => {
            // `-N` is one token (RFC 9110 §14.1.1); nginx refuses `- N` too.
            if !raw_b.starts_with(|c: char| c.is_ascii_digit()) {
                return None;
            }
            let n = digits(b)?;
            if len == 0 {
                return Some(Plan::Whole);
            }
            if n == 0 {
                return Some(Plan::Unsatisfiable);
            }
            Some(Plan::Part(len - n.min(len), len - 1))
        }
        (true, true) => None,
    }
}

/// Shapes `out` — the client's header for the whole object (a `200` with
/// its `Content-Length`, after the header policy) — for `plan`, and adds
/// `Age`.
pub fn shape(out: &mut ResponseHeader, plan: Plan, len: u64, age: u64) -> Result<()> {
    match plan {
        Plan::Whole => {}
        Plan::Part(first, last) => {
            out.set_status(StatusCode::PARTIAL_CONTENT)?;
            out.insert_header(CONTENT_RANGE, content_range(first, last, len))?;
            out.insert_header(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1))?;
        }
        Plan::Unsatisfiable => {
            let mut answer = ResponseHeader::build(StatusCode::RANGE_NOT_SATISFIABLE, Some(4))?;
            answer.insert_header(CONTENT_RANGE, format!("bytes */{len}"))?;
            answer.insert_header(header::CONTENT_LENGTH, "0")?;
            if let Some(ranges) = out.headers.get(header::ACCEPT_RANGES).cloned() {
                answer.insert_header(header::ACCEPT_RANGES, ranges)?;
            }
            *out = answer;
        }
        Plan::NotModified => {
            // What a 200 would carry that a cache updates from (RFC 9110 §15.4.5).
            let mut answer = ResponseHeader::build(StatusCode::NOT_MODIFIED, Some(8))?;
            for (name, titled) in [
                (header::CACHE_CONTROL, "Cache-Control"),
                (header::CONTENT_LOCATION, "Content-Location"),
                (header::DATE, "Date"),
                (header::ETAG, "ETag"),
                (header::EXPIRES, "Expires"),
                (header::LAST_MODIFIED, "Last-Modified"),
                (header::VARY, "Vary"),
            ] {
                for v in out.headers.get_all(&name) {
                    answer.append_header(titled, v.clone())?;
                }
            }
            *out = answer;
        }
    }
    out.insert_header(header::AGE, HeaderValue::from(age))?;
    Ok(())
}

/// Names this module adds, in the case origins write them (Pingora writes
/// a `HeaderName` it has no spelling for in lower case; either is valid
/// HTTP, but an answer from memory should read like the upstream's).
const CONTENT_RANGE: &str = "Content-Range";

/// `bytes {first}-{last}/{len}`, written without `fmt`'s machinery: once
/// per answer from memory, where it was a measurable part of a hit.
fn content_range(first: u64, last: u64, len: u64) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    let mut v = Vec::with_capacity(8 + 3 * 20);
    v.extend_from_slice(b"bytes ");
    v.extend_from_slice(digits.format(first).as_bytes());
    v.push(b'-');
    v.extend_from_slice(digits.format(last).as_bytes());
    v.push(b'/');
    v.extend_from_slice(digits.format(len).as_bytes());
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).expect("digits and ASCII are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    const LM: &str = "Tue, 01 Jul 2025 10:00:00 GMT";

    fn stored() -> HeaderMap {
        map(&[("ETag", "\"v1\""), ("Last-Modified", LM)])
    }

    fn plan_for(req: &[(&str, &str)]) -> Option<Plan> {
        plan(&map(req), &stored(), 1000)
    }

    #[test]
    fn ranges_as_rfc_9110_reads_them() {
        assert_eq!(plan_for(&[]), Some(Plan::Whole));
        assert_eq!(plan_for(&[("Range", "bytes=0-")]), Some(Plan::Part(0, 999)));
        assert_eq!(plan_for(&[("Range", "bytes=10-19")]), Some(Plan::Part(10, 19)));
        assert_eq!(plan_for(&[("Range", "bytes=990-5000")]), Some(Plan::Part(990, 999)), "clamped to the end");
        assert_eq!(plan_for(&[("Range", "bytes=-100")]), Some(Plan::Part(900, 999)));
        assert_eq!(plan_for(&[("Range", " bytes= -100 ")]), Some(Plan::Part(900, 999)), "space around is fine");
        assert_eq!(plan_for(&[("Range", "bytes=10 - 19")]), Some(Plan::Part(10, 19)), "as nginx reads it");
        assert_eq!(plan_for(&[("Range", "bytes=-5000")]), Some(Plan::Part(0, 999)));
        assert_eq!(plan_for(&[("Range", "bytes=1000-")]), Some(Plan::Unsatisfiable));
        assert_eq!(plan_for(&[("Range", "bytes=-0")]), Some(Plan::Unsatisfiable));
        // An empty object: no 206 can carry it.
        let empty = |spec| plan(&map(&[("Range", spec)]), &stored(), 0);
        for whole in ["bytes=0-", "bytes=0-0", "bytes=-100", "bytes=-0"] {
            assert_eq!(empty(whole), Some(Plan::Whole), "{whole}");
        }
        assert_eq!(empty("bytes=10-19"), Some(Plan::Unsatisfiable));
        let unread = ["bytes=0-1,5-6", "items=0-1", "bytes=abc", "bytes=5-4", "bytes=-", "bytes=+1-2", "bytes= - 1"];
        for upstream in unread {
            assert_eq!(plan_for(&[("Range", upstream)]), None, "{upstream} goes upstream as it is");
        }
    }

    #[test]
    fn conditionals() {
        assert_eq!(plan_for(&[("If-None-Match", "\"v1\"")]), Some(Plan::NotModified));
        assert_eq!(plan_for(&[("If-None-Match", "\"x\", W/\"v1\"")]), Some(Plan::NotModified), "weak comparison");
        assert_eq!(plan_for(&[("If-None-Match", "*")]), Some(Plan::NotModified));
        assert_eq!(plan_for(&[("If-None-Match", "\"v2\"")]), Some(Plan::Whole));
        // One list, though sent as two field lines (RFC 9110 §5.3).
        let two_lines = [("If-None-Match", "\"x\""), ("If-None-Match", "\"y\", \"v1\"")];
        assert_eq!(plan_for(&two_lines), Some(Plan::NotModified));
        assert_eq!(plan_for(&[("If-None-Match", "\"x\""), ("If-None-Match", "*")]), Some(Plan::NotModified));
        // `*` matches an object stored without an ETag too; a tag does not.
        let untagged = map(&[("Content-Length", "1000")]);
        assert_eq!(plan(&map(&[("If-None-Match", "*")]), &untagged, 1000), Some(Plan::NotModified));
        assert_eq!(plan(&map(&[("If-None-Match", "\"v1\"")]), &untagged, 1000), Some(Plan::Whole));
        // A tag that cannot be read is still a condition: If-Modified-Since is not asked.
        let mut unreadable = map(&[("If-Modified-Since", LM)]);
        unreadable.append(header::IF_NONE_MATCH, HeaderValue::from_bytes(b"\"\xe4\"").unwrap());
        assert_eq!(plan(&unreadable, &stored(), 1000), Some(Plan::Whole));
        // If-None-Match wins over If-Modified-Since.
        assert_eq!(plan_for(&[("If-None-Match", "\"v2\""), ("If-Modified-Since", LM)]), Some(Plan::Whole));
        // Either way (RFC 9110 §13.2.2; nginx alone wants both to match).
        let earlier = "Mon, 30 Jun 2025 10:00:00 GMT";
        assert_eq!(plan_for(&[("If-None-Match", "\"v1\""), ("If-Modified-Since", earlier)]), Some(Plan::NotModified));
        assert_eq!(plan_for(&[("If-Modified-Since", LM)]), Some(Plan::NotModified));
        assert_eq!(plan_for(&[("If-Modified-Since", "Mon, 30 Jun 2025 10:00:00 GMT")]), Some(Plan::Whole));
        // If-Range: the range only for the same version, else the whole object.
        let range = ("Range", "bytes=10-19");
        assert_eq!(plan_for(&[range, ("If-Range", "\"v1\"")]), Some(Plan::Part(10, 19)));
        assert_eq!(plan_for(&[range, ("If-Range", LM)]), Some(Plan::Part(10, 19)));
        assert_eq!(plan_for(&[range, ("If-Range", "\"v0\"")]), Some(Plan::Whole));
        assert_eq!(plan_for(&[range, ("If-Range", "W/\"v1\"")]), Some(Plan::Whole), "never a weak tag");
        assert_eq!(plan_for(&[range, ("If-Range", "Mon, 30 Jun 2025 10:00:00 GMT")]), Some(Plan::Whole));
    }

    #[test]
    fn headers_for_each_plan() {
        let whole = || {
            let mut h = ResponseHeader::build(200, None).unwrap();
            for (k, v) in [
                ("Content-Length", "1000"),
                ("Content-Type", "video/mp4"),
                ("ETag", "\"v1\""),
                ("Accept-Ranges", "bytes"),
            ] {
                h.insert_header(k, v).unwrap();
            }
            h
        };
        let mut out = whole();
        shape(&mut out, Plan::Part(10, 19), 1000, 7).unwrap();
        assert_eq!(out.status, 206);
        assert_eq!(out.headers["content-range"], "bytes 10-19/1000");
        assert_eq!(out.headers["content-length"], "10");
        assert_eq!(
            (&out.headers["content-type"], &out.headers["age"]),
            (&HeaderValue::from_static("video/mp4"), &HeaderValue::from(7))
        );
        let mut out = whole();
        shape(&mut out, Plan::Unsatisfiable, 1000, 0).unwrap();
        assert_eq!(
            (out.status.as_u16(), &out.headers["content-range"]),
            (416, &HeaderValue::from_static("bytes */1000"))
        );
        assert_eq!(out.headers["content-length"], "0");
        let mut out = whole();
        shape(&mut out, Plan::NotModified, 1000, 0).unwrap();
        assert_eq!(out.status, 304);
        assert_eq!(out.headers["etag"], "\"v1\"");
        assert!(!out.headers.contains_key("content-length") && !out.headers.contains_key("content-type"));
        let mut out = whole();
        shape(&mut out, Plan::Whole, 1000, 3).unwrap();
        assert_eq!((out.status.as_u16(), &out.headers["content-length"]), (200, &HeaderValue::from_static("1000")));
        assert_eq!(content_range(0, u64::MAX - 1, u64::MAX), format!("bytes 0-{}/{}", u64::MAX - 1, u64::MAX));
        assert_eq!(Plan::Part(10, 19).body(1000), (10, 20));
        assert_eq!(Plan::Whole.body(1000), (0, 1000));
    }
}
