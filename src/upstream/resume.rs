//! When a body that died mid-way may be continued from another connection,
//! and whether the answer to that continuation is the same file: pure
//! rules, so they can be tested without a network.
//!
//! Safe means: the first response said how long it was (200 or 206 with
//! `Content-Length`, not chunked) and named its version (a strong `ETag`,
//! else `Last-Modified`). The continuation asks `Range: bytes=NEXT-LAST`
//! with `If-Range` carrying that validator, and is accepted only as a 206
//! for exactly those bytes of a representation of the same complete length
//! (and the same `ETag`, when there was one). Anything else could splice
//! bytes of another file into the client's body.

use http::header::{self, HeaderValue};
use http::StatusCode;
use pingora_http::ResponseHeader;

use crate::headers::{self, ContentRange};

/// Where the first response's bytes sit in the representation, and what
/// identifies the representation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Offset of the first body byte in the representation.
    pub first: u64,
    /// Offset of the last body byte (inclusive).
    pub last: u64,
    /// The complete length of the representation.
    pub total: u64,
    /// The `ETag`, strong or weak, that a continuation must repeat.
    pub etag: Option<HeaderValue>,
    /// What `If-Range` carries: the strong `ETag`, else `Last-Modified`.
    pub if_range: HeaderValue,
}

/// What to make of the answer to a continuation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The rest of the same file: splice it on.
    Continue,
    /// No answer worth judging (an error status): try again if attempts are left.
    Retry(&'static str),
    /// Another file, or other bytes: the client's response must be aborted.
    Changed(&'static str),
}

impl Window {
    /// The window of a response, or why it cannot be resumed safely (for
    /// the log line that says the client's body is cut).
    pub fn of(resp: &ResponseHeader) -> Result<Window, &'static str> {
        let h = &resp.headers;
        if h.contains_key(header::TRANSFER_ENCODING) {
            return Err("it was sent chunked, with no length");
        }
        let length = headers::content_length(h).ok_or("it has no Content-Length")?;
        let (first, last, total) = match resp.status {
            StatusCode::OK if !h.contains_key(header::CONTENT_RANGE) => {
                (0, length.checked_sub(1).ok_or("it is empty")?, length)
            }
            StatusCode::PARTIAL_CONTENT => {
                let (first, last, total) = headers::content_range(h)
                    .and_then(ContentRange::bytes)
                    .ok_or("it is not one byte range of a known length")?;
                (last - first + 1 == length)
                    .then_some((first, last, total))
                    .ok_or("its Content-Range and Content-Length disagree")?
            }
            _ => return Err("its status is not 200 or 206"),
        };
        let etag = h.get(header::ETAG).cloned();
        let strong = etag.as_ref().filter(|e| !e.as_bytes().starts_with(b"W/"));
        let if_range = strong.or(h.get(header::LAST_MODIFIED)).ok_or("it has no strong ETag or Last-Modified")?.clone();
        Ok(Window { first, last, total, etag, if_range })
    }

    /// The `Range` that asks for the rest after `received` body bytes, or
    /// `None` when nothing is left to ask for.
    pub fn rest(&self, received: u64) -> Option<HeaderValue> {
        let next = self.first.checked_add(received)?;
        (next <= self.last).then(|| {
            HeaderValue::from_str(&format!("bytes={next}-{}", self.last)).expect("digits are a valid header value")
        })
    }

    /// Judges the answer to the continuation that asked from byte `next`.
    pub fn judge(&self, next: u64, resp: &ResponseHeader) -> Verdict {
        match resp.status {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => {
                // Told apart for the log: a server that ignores `Range` is
                // not a file that changed.
                let (name, was) = match &self.etag {
                    Some(etag) => (header::ETAG, etag),
                    None => (header::LAST_MODIFIED, &self.if_range),
                };
                return Verdict::Changed(if resp.headers.get(name) == Some(was) {
                    "the upstream sent the whole file again (it ignored the Range)"
                } else {
                    "the upstream sent the whole file (it changed: another validator)"
                });
            }
            StatusCode::RANGE_NOT_SATISFIABLE => return Verdict::Changed("the rest is not there any more (416)"),
            s if s.is_client_error() || s.is_server_error() => return Verdict::Retry("an error status"),
            _ => return Verdict::Changed("an unexpected status"),
        }
        let h = &resp.headers;
        let Some((first, last, total)) = headers::content_range(h).and_then(ContentRange::bytes) else {
            return Verdict::Changed("a 206 without one byte range");
        };
        if total != self.total {
            return Verdict::Changed("another complete length");
        }
        if self.etag.is_some() && h.get(header::ETAG) != self.etag.as_ref() {
            return Verdict::Changed("another ETag");
        }
        if (first, last) != (next, self.last) {
            return Verdict::Changed("other bytes than asked for");
        }
        let length = headers::content_length(h);
        if length != Some(last - first + 1) || h.contains_key(header::TRANSFER_ENCODING) {
            return Verdict::Changed("a length that does not match the range");
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::test_response as resp;

    const ETAG: (&str, &str) = ("ETag", "\"v1\"");
    const LM: (&str, &str) = ("Last-Modified", "Tue, 01 Jul 2025 10:00:00 GMT");

    #[test]
    fn which_responses_can_be_resumed() {
        let w = Window::of(&resp(200, &[("Content-Length", "1000"), ETAG])).unwrap();
        assert_eq!((w.first, w.last, w.total), (0, 999, 1000));
        assert_eq!(w.if_range, "\"v1\"");
        // A client range bytes=100-199, and an open one answered as 100-999.
        let w =
            Window::of(&resp(206, &[("Content-Length", "100"), ("Content-Range", "bytes 100-199/1000"), LM])).unwrap();
        assert_eq!((w.first, w.last, w.total, w.etag.is_none()), (100, 199, 1000, true));
        assert_eq!(w.if_range, LM.1);
        // A weak ETag cannot go into If-Range, but must still match.
        let w = Window::of(&resp(200, &[("Content-Length", "10"), ("ETag", "W/\"w\""), LM])).unwrap();
        assert_eq!((w.if_range.to_str().unwrap(), w.etag.unwrap().to_str().unwrap()), (LM.1, "W/\"w\""));

        let validator = "it has no strong ETag or Last-Modified";
        let not_one = "it is not one byte range of a known length";
        for (status, headers, why) in [
            (200, &[("Content-Length", "1000")][..], validator),
            (200, &[("ETag", "W/\"w\""), ("Content-Length", "1000")][..], validator),
            (200, &[ETAG][..], "it has no Content-Length"),
            (200, &[ETAG, ("Content-Length", "0")][..], "it is empty"),
            (
                200,
                &[ETAG, ("Content-Length", "10"), ("Transfer-Encoding", "chunked")][..],
                "it was sent chunked, with no length",
            ),
            (206, &[ETAG, ("Content-Length", "10"), ("Content-Range", "bytes 0-9/*")][..], not_one),
            (
                206,
                &[ETAG, ("Content-Length", "11"), ("Content-Range", "bytes 0-9/100")][..],
                "its Content-Range and Content-Length disagree",
            ),
            (
                206,
                &[ETAG, ("Content-Type", "multipart/byteranges; boundary=x"), ("Content-Length", "500")][..],
                not_one,
            ),
            (404, &[ETAG, ("Content-Length", "10")][..], "its status is not 200 or 206"),
        ] {
            assert_eq!(Window::of(&resp(status, headers)), Err(why), "{status} {headers:?}");
        }
    }

    #[test]
    fn the_rest_is_asked_from_the_next_byte_to_the_last() {
        let w = Window::of(&resp(206, &[("Content-Length", "100"), ("Content-Range", "bytes 100-199/1000"), ETAG]))
            .unwrap();
        assert_eq!(w.rest(0).unwrap(), "bytes=100-199");
        assert_eq!(w.rest(42).unwrap(), "bytes=142-199");
        assert_eq!(w.rest(99).unwrap(), "bytes=199-199");
        assert_eq!(w.rest(100), None);
    }

    #[test]
    fn only_the_same_bytes_of_the_same_file_continue() {
        let w = Window::of(&resp(200, &[("Content-Length", "1000"), ETAG, LM])).unwrap();
        let ok = resp(206, &[("Content-Length", "600"), ("Content-Range", "bytes 400-999/1000"), ETAG]);
        assert_eq!(w.judge(400, &ok), Verdict::Continue);
        assert_eq!(w.judge(401, &ok), Verdict::Changed("other bytes than asked for"));
        type Case<'a> = (u16, &'a [(&'a str, &'a str)], Verdict);
        let cases: [Case; 8] = [
            (
                200,
                &[("Content-Length", "1000"), ETAG],
                Verdict::Changed("the upstream sent the whole file again (it ignored the Range)"),
            ),
            (
                200,
                &[("Content-Length", "1000"), ("ETag", "\"v2\"")],
                Verdict::Changed("the upstream sent the whole file (it changed: another validator)"),
            ),
            (
                206,
                &[("Content-Length", "600"), ("Content-Range", "bytes 400-999/1001"), ETAG],
                Verdict::Changed("another complete length"),
            ),
            (
                206,
                &[("Content-Length", "600"), ("Content-Range", "bytes 400-999/1000"), ("ETag", "\"v2\"")],
                Verdict::Changed("another ETag"),
            ),
            (
                206,
                &[("Content-Length", "600"), ("Content-Range", "bytes 400-999/1000")],
                Verdict::Changed("another ETag"),
            ),
            (
                206,
                &[("Content-Length", "599"), ("Content-Range", "bytes 400-999/1000"), ETAG],
                Verdict::Changed("a length that does not match the range"),
            ),
            (416, &[("Content-Range", "bytes */400")], Verdict::Changed("the rest is not there any more (416)")),
            (503, &[("Content-Length", "4")], Verdict::Retry("an error status")),
        ];
        for (status, headers, verdict) in cases {
            assert_eq!(w.judge(400, &resp(status, headers)), verdict, "{status} {headers:?}");
        }
        // Without an ETag first, only the length and range are compared.
        let lm_only = Window::of(&resp(200, &[("Content-Length", "1000"), LM])).unwrap();
        let other =
            resp(206, &[("Content-Length", "600"), ("Content-Range", "bytes 400-999/1000"), ("ETag", "\"new\"")]);
        assert_eq!(lm_only.judge(400, &other), Verdict::Continue);
        let whole = |lm: &'static str| resp(200, &[("Content-Length", "1000"), ("Last-Modified", lm)]);
        assert_eq!(
            lm_only.judge(400, &whole(LM.1)),
            Verdict::Changed("the upstream sent the whole file again (it ignored the Range)")
        );
        assert_eq!(
            lm_only.judge(400, &whole("Thu, 01 Jan 2026 00:00:00 GMT")),
            Verdict::Changed("the upstream sent the whole file (it changed: another validator)")
        );
    }
}
