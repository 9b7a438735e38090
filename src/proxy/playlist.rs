//! Answering with a playlist: read it whole (bounded by
//! `stream.max_playlist_bytes`), undo a `Content-Encoding` the origin
//! applied anyway, point every URI back through the proxy with credentials
//! that live as long as playback needs, and answer 200 with an exact length.

use bytes::Bytes;
use http::header;
use pingora::protocols::http::ServerSession;
use pingora_error::{Error, ErrorType};
use url::Url;

use super::decide::playlist_header;
use super::reply::{Failure, Outcome};
use super::source::Source;
use super::{Ctx, State};
use crate::auth::{self, Auth, ChildSigner};
use crate::headers;
use crate::hls;
use crate::routing::{self, Route};
use crate::upstream::{BodyError, FetchError};

/// Answers with the playlist `resp` carries (`first`: its bytes read
/// already), rewritten so its children come back through the proxy: as
/// relay URLs, or (`route`: a static route with auth) as that route's own
/// URLs where they lie under its upstream.
pub(super) async fn answer(
    st: &State,
    down: &mut ServerSession,
    ctx: &mut Ctx,
    mut resp: Source,
    first: Vec<u8>,
    client_key: Option<&str>,
    route: Option<&Route>,
) -> Result<(), Outcome> {
    let max = st.max_playlist_bytes;
    // Each warning names the hoster whose playlist it was.
    if let Some(declared) = headers::content_length(&resp.header().headers).filter(|n| *n > max as u64) {
        let host = resp.url().host_str().unwrap_or("-");
        log::warn!("playlist from {host} of {declared} bytes exceeds stream.max_playlist_bytes ({max})");
        return Err(Failure::PlaylistTooLarge.into());
    }
    let body = resp.read_to_vec(first, max).await.map_err(|e| match e {
        BodyError::TooLarge => {
            log::warn!(
                "playlist from {} exceeds stream.max_playlist_bytes ({max})",
                resp.url().host_str().unwrap_or("-")
            );
            Failure::PlaylistTooLarge
        }
        BodyError::Failed(e) => {
            let e = FetchError::from_pingora(e).at(resp.url());
            log::warn!("playlist body failed: {e}");
            Failure::from(&e)
        }
    })?;
    let encoding = resp.header().headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    let text = decode(body, encoding, max).map_err(|why| {
        log::warn!("cannot decode the playlist from {}: {why}", resp.url().host_str().unwrap_or("-"));
        Failure::BadPlaylistEncoding
    })?;
    let now = auth::now_unix();
    let (summary, signer) = signer_for(&st.auth, &text, client_key, now);
    let children = |child: &str, segment: bool, out: &mut String| {
        push_child(&st.public_base, route, child, segment, summary.fmp4, &signer, out)
    };
    // The base outlives the upstream response, which goes back now: a slow
    // client must not hold the hoster's connection.
    let base = resp.url().clone();
    let (len, whole) = measure(hls::Rewrite::new(&text, &summary, &base, &children), text.len()).await;
    let mut out = playlist_header(resp.header(), len)?;
    if let Source::Memory(m) = &resp {
        // From memory, as every answer from it: how long it has been held.
        out.insert_header(header::AGE, http::HeaderValue::from(m.head().age()))?;
    }
    resp.finish().await;
    st.cors.apply(down.req_header().headers.get(header::ORIGIN), &mut out)?;
    ctx.status = 200;
    ctx.sending(&mut out)?;
    down.write_response_header(Box::new(out)).await?;
    if down.req_header().method == http::Method::HEAD {
        return Ok(());
    }
    if let Some(whole) = whole {
        down.write_response_body(Bytes::from(whole), true).await?;
        ctx.body_bytes += len as u64;
        return Ok(());
    }
    // Made again as it goes out, a piece at a time: the same bytes, as
    // the rewrite is the same and `now` with it.
    let mut again = hls::Rewrite::new(&text, &summary, &base, &children);
    let (mut piece, mut sent) = (String::with_capacity(2 * PIECE), 0);
    loop {
        let more = again.next_piece(&mut piece, PIECE);
        sent += piece.len();
        if sent > len || (!more && sent != len) {
            return Err(Error::explain(ErrorType::InternalError, "a playlist rewrote to another length").into());
        }
        down.write_response_body(Bytes::copy_from_slice(piece.as_bytes()), !more).await?;
        // What was sent, for the access log, also when the client leaves.
        ctx.body_bytes += piece.len() as u64;
        piece.clear();
        if !more {
            return Ok(());
        }
    }
}

/// Pieces of a large rewritten playlist go out at about this size.
const PIECE: usize = 64 * 1024;

/// A rewritten playlist up to this size (nearly all of them) is made once
/// and sent as it is; a larger one is measured, then made again as it is
/// sent, so it never exists whole: one of short URIs can be sixty times its
/// upstream's size once each is a signed URL.
const WHOLE: usize = 1024 * 1024;

/// The length of what `rewrite` writes, and the whole of it when that is at
/// most [`WHOLE`]. A large one gives the worker back between pieces.
async fn measure<F: FnMut(&str, bool, &mut String)>(
    mut rewrite: hls::Rewrite<'_, F>,
    upstream_len: usize,
) -> (usize, Option<String>) {
    // URI lines roughly double or triple (signed query); avoid regrowth.
    let mut kept = String::with_capacity(upstream_len.saturating_mul(3).min(WHOLE + PIECE));
    let mut more = true;
    while more && kept.len() <= WHOLE {
        let at_least = kept.len() + PIECE;
        more = rewrite.next_piece(&mut kept, at_least);
    }
    if kept.len() <= WHOLE {
        return (kept.len(), Some(kept));
    }
    let mut len = kept.len();
    drop(kept);
    let mut piece = String::with_capacity(2 * PIECE);
    while more {
        tokio::task::yield_now().await;
        more = rewrite.next_piece(&mut piece, PIECE);
        len += piece.len();
        piece.clear();
    }
    (len, None)
}

/// What a playlist holds, and the signer for its children: credentials valid
/// for as long as its playback needs ([`hls::child_lifetime`]) from `now`.
fn signer_for<'a>(
    auth: &'a Auth,
    text: &str,
    client_key: Option<&'a str>,
    now: u64,
) -> (hls::Summary, ChildSigner<'a>) {
    let summary = hls::Summary::of(text);
    let exp = now.saturating_add(hls::child_lifetime(&summary, auth.token_ttl, auth.session_ttl));
    let signer = ChildSigner::new(auth, client_key, exp);
    (summary, signer)
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
    rewrite_whole(auth, prefix, None, text, base, client_key, now)
}

/// Rewrites a playlist a static route with auth serves: a child under the
/// route's upstream becomes the route's own URL for it (`prefix` + the rest
/// of its path, its query kept) with the credentials `auth` hands out — in
/// token mode `exp` and a `sig` that binds the path (`_path`, as the proxy
/// will receive it); in apikey mode the client's key — valid for as long as
/// the playlist's playback needs. Any other child becomes a signed relay
/// URL, as [`rewrite_playlist`] makes them.
pub fn rewrite_route_playlist(
    auth: &Auth,
    prefix: &str,
    route: &Route,
    text: &str,
    base: &Url,
    client_key: Option<&str>,
    now: u64,
) -> String {
    rewrite_whole(auth, prefix, Some(route), text, base, client_key, now)
}

fn rewrite_whole(
    auth: &Auth,
    prefix: &str,
    route: Option<&Route>,
    text: &str,
    base: &Url,
    client_key: Option<&str>,
    now: u64,
) -> String {
    let (summary, signer) = signer_for(auth, text, client_key, now);
    hls::rewrite(text, &summary, base, |child, segment, out| {
        push_child(prefix, route, child, segment, summary.fmp4, &signer, out)
    })
}

/// Writes the URL a client gets for a child: under a static route's
/// upstream (`route`: one with auth), that route's own URL with its query
/// kept; anywhere else the relay's. A disguised segment (`seg1.jpg`) under
/// the route goes through the relay too: the route's URL must keep the
/// upstream's file name, which ffmpeg refuses for a segment, while the
/// relay's `{hint}` gets an extension it accepts. Such a relay URL names
/// the route (signed), so the relay trusts it as the route would
/// ([`routing::route_trust`]).
fn push_child(
    prefix: &str,
    route: Option<&Route>,
    child: &str,
    segment: bool,
    fmp4: bool,
    signer: &ChildSigner<'_>,
    out: &mut String,
) {
    let own = route.filter(|_| !(segment && hls::disguised(hls::hint_for(child)))).and_then(|r| r.child(child));
    if let Some((path, query)) = own {
        out.push_str(prefix);
        out.push_str(&path);
        out.push('?');
        signer.push_route_query(&routing::decoded_path(&path), query, out);
        return;
    }
    out.push_str(prefix);
    out.push_str(routing::RELAY_PREFIX);
    hls::push_hint(child, segment, fmp4, out);
    out.push('?');
    match route.filter(|r| child.starts_with(r.upstream.as_str())) {
        Some(r) => signer.push_query_for_route(child, &r.prefix, out),
        None => signer.push_query(child, out),
    }
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
    // Valid UTF-8 (nearly always) is taken as it is, without a copy.
    Ok(String::from_utf8(raw).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
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
    fn route_children_are_the_routes_own_signed_urls() {
        let auth = Auth::new(AuthMode::Token, Some("k"), None, 60, 3600);
        let route = Route::new("/cdn/", Url::parse("http://10.0.0.5:8080/base/").unwrap(), true);
        let base = Url::parse("http://10.0.0.5:8080/base/hls/index.m3u8").unwrap();
        let now = 1_000_000;
        let list = "#EXTM3U\n#EXT-X-KEY:METHOD=AES-128,URI=\"../key.bin?k=1\"\n#EXTINF:4,\nseg%201.ts?t=a+b\n\
                    #EXTINF:4,\nhttp://elsewhere.example/x.ts\n#EXTINF:4,\nseg2.jpg?t=b\n#EXT-X-ENDLIST\n";
        let out = rewrite_route_playlist(&auth, "", &route, list, &base, None, now);
        let lines: Vec<&str> = out.lines().collect();
        let key = lines[1].split("URI=\"").nth(1).unwrap().trim_end_matches('"');
        let seg = lines[3];
        // Under the route: its own path, the query kept, then exp and sig
        // over the query with the path bound, exactly as a request verifies.
        for (url, path) in [(key, "/cdn/key.bin"), (seg, "/cdn/hls/seg%201.ts")] {
            let (p, q) = url.split_once('?').unwrap();
            assert_eq!(p, path);
            let mut bound = Query::parse(Some(q));
            bound.0.push(("_path".into(), routing::decoded_path(p)));
            assert_eq!(verify_token(b"k", &bound, now), Ok(()), "{url}");
            assert_eq!(bound.get("exp").unwrap(), (now + 60 + 12).to_string(), "VOD: token_ttl + duration");
        }
        assert!(seg.starts_with("/cdn/hls/seg%201.ts?t=a+b&exp="), "{seg}");
        // Elsewhere: a signed relay URL.
        assert!(lines[5].starts_with("/strm/proxy/x.ts?u=http%3A%2F%2Felsewhere.example%2Fx.ts&exp="), "{}", lines[5]);
        // A disguised segment under the route: the relay's URL, whose name
        // ffmpeg accepts (the route's would keep `.jpg`), naming the route
        // under the signature.
        let relayed = "/strm/proxy/seg2.jpg.ts?u=http%3A%2F%2F10.0.0.5%3A8080%2Fbase%2Fhls%2Fseg2.jpg%3Ft%3Db\
                       &_route=%2Fcdn%2F&exp=";
        assert!(lines[7].starts_with(relayed), "{}", lines[7]);
        let q = Query::parse(lines[7].split_once('?').map(|(_, q)| q));
        assert_eq!(verify_token(b"k", &q, now), Ok(()), "{}", lines[7]);
        assert_eq!(q.get("_route"), Some("/cdn/"));
        // Apikey mode hands on the client's key; none mode adds nothing.
        let apikey = Auth::new(AuthMode::Apikey, None, Some("key"), 60, 3600);
        let out = rewrite_route_playlist(&apikey, "", &route, list, &base, Some("key"), now);
        assert!(out.contains("\n/cdn/hls/seg%201.ts?t=a+b&apikey=key\n"), "{out}");
        assert!(out.contains("seg2.jpg%3Ft%3Db&_route=%2Fcdn%2F&apikey=key\n"), "{out}");
        let open = Auth::new(AuthMode::None, None, None, 60, 3600);
        let out = rewrite_route_playlist(&open, "https://media.example/ab", &route, list, &base, None, now);
        assert!(out.contains("URI=\"https://media.example/ab/cdn/key.bin?k=1\""), "{out}");
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
