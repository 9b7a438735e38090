//! Answering with a playlist: read it whole (bounded by
//! `stream.max_playlist_bytes`), undo a `Content-Encoding` the origin
//! applied anyway, point every URI back through the proxy with credentials
//! that live as long as playback needs, and answer 200 with an exact length.

use bytes::Bytes;
use http::header;
use pingora::protocols::http::ServerSession;
use url::Url;

use super::decide::playlist_header;
use super::reply::{Failure, Outcome};
use super::source::Source;
use super::{Ctx, State};
use crate::auth::{self, Auth, ChildSigner};
use crate::headers;
use crate::hls;
use crate::routing;
use crate::upstream::{BodyError, FetchError};

/// Answers with the playlist `resp` carries (`first`: its bytes read
/// already), rewritten.
pub(super) async fn answer(
    st: &State,
    down: &mut ServerSession,
    ctx: &mut Ctx,
    mut resp: Source,
    first: Vec<u8>,
    client_key: Option<&str>,
) -> Result<(), Outcome> {
    let max = st.max_playlist_bytes;
    if let Some(declared) = headers::content_length(&resp.header().headers).filter(|n| *n > max as u64) {
        log::warn!("playlist of {declared} bytes exceeds stream.max_playlist_bytes ({max})");
        return Err(Failure::PlaylistTooLarge.into());
    }
    let body = resp.read_to_vec(first, max).await.map_err(|e| match e {
        BodyError::TooLarge => {
            log::warn!("playlist exceeds stream.max_playlist_bytes ({max})");
            Failure::PlaylistTooLarge
        }
        BodyError::Failed(e) => {
            let e = FetchError::from_pingora(e);
            log::warn!("playlist body failed: {e}");
            Failure::from(&e)
        }
    })?;
    let encoding = resp.header().headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    let text = decode(body, encoding, max).map_err(|why| {
        log::warn!("cannot decode playlist: {why}");
        Failure::BadPlaylistEncoding
    })?;
    let rewritten = rewrite_playlist(&st.auth, &st.public_base, &text, resp.url(), client_key, auth::now_unix());
    let mut out = playlist_header(resp.header(), rewritten.len())?;
    resp.finish().await;
    st.cors.apply(down.req_header().headers.get(header::ORIGIN), &mut out)?;
    ctx.status = 200;
    down.write_response_header(Box::new(out)).await?;
    if down.req_header().method != http::Method::HEAD {
        ctx.body_bytes += rewritten.len() as u64;
        down.write_response_body(Bytes::from(rewritten), true).await?;
    }
    Ok(())
}

/// Rewrites a playlist so each child is `{prefix}/strm/proxy/{hint}?u=...`
/// with the credentials `auth` hands out, valid for as long as the
/// playlist's playback needs ([`hls::child_lifetime`]) from `now`.
pub fn rewrite_playlist(
    auth: &Auth,
    prefix: &str,
    text: &str,
    base: &Url,
    client_key: Option<&str>,
    now: u64,
) -> String {
    let summary = hls::Summary::of(text);
    let exp = now.saturating_add(hls::child_lifetime(&summary, auth.token_ttl, auth.session_ttl));
    let signer = ChildSigner::new(auth, client_key, exp);
    hls::rewrite(text, &summary, base, |child, segment, out| {
        out.push_str(prefix);
        out.push_str(routing::RELAY_PREFIX);
        hls::push_hint(child, segment, summary.fmp4, out);
        out.push('?');
        signer.push_query(child, out);
    })
}

/// Undoes a `Content-Encoding` (servers may ignore our `identity`), bounded.
fn decode(body: Vec<u8>, encoding: Option<&str>, max: usize) -> Result<String, String> {
    use std::io::Read;
    let raw = match encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => body,
        Some(e) if e.is_empty() || e == "identity" => body,
        Some(e) => {
            let mut out = Vec::new();
            let limit = (max + 1) as u64;
            let n = match e.as_str() {
                "gzip" | "x-gzip" => flate2::read::MultiGzDecoder::new(&body[..]).take(limit).read_to_end(&mut out),
                "deflate" => flate2::read::ZlibDecoder::new(&body[..]).take(limit).read_to_end(&mut out),
                other => return Err(format!("unsupported content-encoding {other}")),
            }
            .map_err(|e| e.to_string())?;
            if n > max {
                return Err("decoded playlist exceeds stream.max_playlist_bytes".into());
            }
            out
        }
    };
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{verify_token, Query};
    use crate::config::AuthMode;

    fn children(playlist: &str) -> Vec<Query> {
        playlist
            .lines()
            .filter(|l| l.starts_with('/'))
            .map(|l| Query::parse(l.split_once('?').map(|(_, q)| q)))
            .collect()
    }

    #[test]
    fn children_expire_with_the_playback_they_serve() {
        let auth = Auth::new(AuthMode::Token, Some("k"), None, 60, 3600);
        let base = Url::parse("https://cdn.example/v/index.m3u8").unwrap();
        let now = 1_000_000;
        let exp = |text: &str| -> Vec<u64> {
            let out = rewrite_playlist(&auth, "", text, &base, None, now);
            children(&out)
                .iter()
                .map(|q| {
                    assert_eq!(verify_token(b"k", q, now), Ok(()));
                    q.get("exp").unwrap().parse().unwrap()
                })
                .collect()
        };
        assert_eq!(exp("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlow.m3u8\n"), [now + 3600]);
        let vod = "#EXTM3U\n#EXTINF:100.5,\na.ts\n#EXTINF:100,\nb.ts\n#EXT-X-ENDLIST\n";
        assert_eq!(exp(vod), [now + 60 + 201, now + 60 + 201]);
        assert_eq!(exp("#EXTM3U\n#EXTINF:100,\na.ts\n"), [now + 60]);
    }

    #[test]
    fn decodes_what_origins_compress_anyway() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"#EXTM3U\n").unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decode(gz.clone(), Some("gzip"), 100).unwrap(), "#EXTM3U\n");
        assert!(decode(gz, Some("gzip"), 4).is_err(), "bounded after decoding too");
        assert!(decode(b"x".to_vec(), Some("br"), 100).is_err());
        assert_eq!(decode(b"x".to_vec(), Some("identity"), 100).unwrap(), "x");
    }
}
