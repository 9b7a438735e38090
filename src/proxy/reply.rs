//! How a request ends when it does not end well, decided in one place:
//! nothing sent yet means a status and a one-line reason; a response
//! under way (or a client gone) means the response is aborted.

use bytes::Bytes;
use http::header;
use http::Method;
use pingora::protocols::http::ServerSession;
use pingora_error::Error;
use pingora_http::ResponseHeader;

use crate::auth::AuthError;
use crate::cors::{self, Cors};
use crate::upstream::FetchError;

/// A response the proxy generates itself: status and one-line reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply(pub u16, pub &'static str);

/// How handling a request ends when it does not complete normally.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing was sent yet: answer with this status and reason.
    Reply(Reply),
    /// The response is under way (or the client is gone): abort it.
    Abort(Box<Error>),
}

impl From<Reply> for Outcome {
    fn from(r: Reply) -> Outcome {
        Outcome::Reply(r)
    }
}

impl From<AuthError> for Outcome {
    fn from(e: AuthError) -> Outcome {
        Outcome::Reply(Reply(401, e.reason()))
    }
}

impl From<&FetchError> for Reply {
    fn from(e: &FetchError) -> Reply {
        let (status, reason) = e.status_and_reason();
        Reply(status, reason)
    }
}

/// Errors of writing to the client, or of building a header: the response
/// cannot go on.
impl From<Box<Error>> for Outcome {
    fn from(e: Box<Error>) -> Outcome {
        Outcome::Abort(e)
    }
}

/// Writes a generated answer: status, one-line reason, no caching.
pub async fn reply(down: &mut ServerSession, cors: &Cors, Reply(status, reason): Reply) -> pingora_error::Result<()> {
    let body = Bytes::from(format!("{reason}\n"));
    let mut out = ResponseHeader::build(status, Some(6))?;
    out.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    out.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    out.insert_header(header::CACHE_CONTROL, "no-store")?;
    if status == 405 {
        out.insert_header("Allow", cors::ALLOW_METHODS)?;
    }
    cors.apply(down.req_header().headers.get(header::ORIGIN), &mut out)?;
    let head = down.req_header().method == Method::HEAD;
    down.write_response_header(Box::new(out)).await?;
    if !head {
        down.write_response_body(body, true).await?;
    }
    Ok(())
}
