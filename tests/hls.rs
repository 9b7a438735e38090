//! HLS playlists relayed through the proxy: detection, rewriting, answered
//! whole, children that live as long as playback needs, bounded buffering.
//! (Real players on real origins: tests/players.rs.)

mod common;

use std::io::Write;
use std::time::Duration;

use anibridge_proxy::auth::{verify_token, Query};
use common::*;

const MASTER: &str = "#EXTM3U\n#EXT-X-VERSION:3\n\
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"de\",URI=\"audio/de.m3u8\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=800000,AUDIO=\"aud\"\nlow/index.m3u8\n\
#EXT-X-STREAM-INF:BANDWIDTH=1600000\nhttps://other.example/hi/index.m3u8?t=1\n";

const MEDIA: &str = "#EXTM3U\r\n#EXT-X-TARGETDURATION:2\r\n#EXT-X-KEY:METHOD=AES-128,URI=\"../key.bin\"\r\n\
#EXTINF:2.0,\r\nseg000.ts\r\n#EXTINF:2.0,\r\nseg001.ts\r\n#EXT-X-ENDLIST\r\n";

/// A live media playlist: no `#EXT-X-ENDLIST`, reloaded by players.
const LIVE: &str =
    "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:7\n#EXTINF:2.0,\nseg7.ts\n#EXTINF:2.0,\nseg8.ts\n";

/// A live LL-HLS playlist as such origins write it: blocking reloads and
/// delta updates offered, parts announced.
const LL_HLS: &str = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-PART-INF:PART-TARGET=0.5\n\
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12.0,PART-HOLD-BACK=1.5,HOLD-BACK=6.0\n\
#EXT-X-MEDIA-SEQUENCE:7\n#EXTINF:2.0,\nseg7.ts\n#EXT-X-PART:DURATION=0.5,URI=\"seg8.0.ts\"\n\
#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"seg8.1.ts\"\n";

/// A master with content steering and a VOD media playlist with
/// interstitials: each names a URL the player would fetch from the hoster
/// itself (`SERVER-URI`, `X-ASSET-URI`, `X-ASSET-LIST`).
const STEERED: &str = "#EXTM3U\n\
#EXT-X-CONTENT-STEERING:SERVER-URI=\"/steer.json\",PATHWAY-ID=\"A\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=800000,PATHWAY-ID=\"A\"\nlow/index.m3u8\n\
#EXT-X-STREAM-INF:BANDWIDTH=800000,PATHWAY-ID=\"B\"\nhttps://b.example/low/index.m3u8\n";
const WITH_ADS: &str = "#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXT-X-PROGRAM-DATE-TIME:2026-01-01T00:00:00Z\n\
#EXT-X-DATERANGE:ID=\"ad\",CLASS=\"com.apple.hls.interstitial\",START-DATE=\"2026-01-01T00:00:04Z\",X-ASSET-URI=\"ad/index.m3u8\"\n\
#EXT-X-DATERANGE:ID=\"ads\",CLASS=\"com.apple.hls.interstitial\",START-DATE=\"2026-01-01T00:00:08Z\",X-ASSET-LIST=\"ads.json\"\n\
#EXTINF:4,\nseg1.ts\n#EXTINF:4,\nseg2.ts\n#EXTINF:4,\nseg3.ts\n#EXT-X-ENDLIST\n";

/// Playlists with variables: the master takes the hoster's token from its
/// own URL (`QUERYPARAM`), the media playlist names its directory.
const DEFINED_MASTER: &str =
    "#EXTM3U\n#EXT-X-DEFINE:QUERYPARAM=\"tok\"\n#EXT-X-STREAM-INF:BANDWIDTH=800000\nmedia.m3u8?tok={$tok}\n";
const DEFINED_MEDIA: &str = "#EXTM3U\n#EXT-X-DEFINE:NAME=\"dir\",VALUE=\"low\"\n#EXT-X-TARGETDURATION:2\n\
#EXTINF:2.0,\n{$dir}/seg000.ts\n#EXT-X-ENDLIST\n";

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn origin() -> Origin {
    Origin::start(|req| match req.path() {
        "/hls/master.m3u8" => {
            Resp::new(200, Body::Bytes(MASTER.into())).header("Content-Type", "application/vnd.apple.mpegurl").into()
        }
        "/hls/low/index.m3u8" => {
            Resp::new(200, Body::Chunked(MEDIA.into())).header("Content-Type", "application/x-mpegURL").into()
        }
        "/hls/plain" => {
            Resp::new(200, Body::Bytes(MASTER.into())).header("Content-Type", "text/plain; charset=utf-8").into()
        }
        // A PHP endpoint's default type.
        "/hls/playlist.php" => {
            Resp::new(200, Body::Bytes(MEDIA.into())).header("Content-Type", "text/html; charset=UTF-8").into()
        }
        "/hls/bom" => Resp::new(200, Body::Bytes([&b"\xEF\xBB\xBF"[..], MEDIA.as_bytes()].concat())).into(),
        "/hls/gz.m3u8" => Resp::new(200, Body::Bytes(gzip(MEDIA.as_bytes())))
            .header("Content-Type", "application/vnd.apple.mpegurl")
            .header("Content-Encoding", "gzip")
            .into(),
        "/hls/big.m3u8" => {
            let mut s = String::from("#EXTM3U\n");
            while s.len() < 20_000 {
                s.push_str("#EXTINF:2.0,\nsegment.ts\n");
            }
            Resp::new(200, Body::Bytes(s.into_bytes())).header("Content-Type", "application/vnd.apple.mpegurl").into()
        }
        "/hls/hostile.m3u8" => Resp::new(200, Body::Bytes(hostile_playlist().into_bytes()))
            .header("Content-Type", "application/vnd.apple.mpegurl")
            .into(),
        "/hls/moved.m3u8" => Resp::new(302, Body::Bytes(Vec::new())).header("Location", "/hls/low/index.m3u8").into(),
        "/hls/notreally.m3u8" => {
            Resp::new(200, Body::Bytes(b"<html>error</html>".to_vec())).header("Content-Type", "text/html").into()
        }
        "/hls/low/seg000.ts" => serve_file(req, 5000, Some("video/mp2t")).into(),
        // Like nginx or an object store: ranges, validators, any type.
        "/hls/ranged" => serve_bytes(req, MEDIA.as_bytes(), Some("application/octet-stream")).into(),
        "/hls/live.m3u8" => serve_bytes(req, LIVE.as_bytes(), Some("application/vnd.apple.mpegurl")).into(),
        "/hls/ll.m3u8" => serve_bytes(req, LL_HLS.as_bytes(), Some("application/vnd.apple.mpegurl")).into(),
        "/hls/steered.m3u8" => serve_bytes(req, STEERED.as_bytes(), Some("application/vnd.apple.mpegurl")).into(),
        "/hls/ads.m3u8" => serve_bytes(req, WITH_ADS.as_bytes(), Some("application/vnd.apple.mpegurl")).into(),
        "/hls/def/master.m3u8" => serve_bytes(req, DEFINED_MASTER.as_bytes(), None).into(),
        "/hls/def/media.m3u8" if req.target.ends_with("?tok=t0k") => {
            serve_bytes(req, DEFINED_MEDIA.as_bytes(), None).into()
        }
        "/hls/def/low/seg000.ts" => serve_file(req, 5000, Some("video/mp2t")).into(),
        "/hls/known.m3u8" => serve_bytes(req, MEDIA.as_bytes(), Some("application/vnd.apple.mpegurl")).into(),
        _ => Resp::new(404, Body::Bytes(Vec::new())).into(),
    })
    .await
}

/// The proxied URIs of a playlist (lines and URI="..." values).
fn uris(playlist: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in playlist.trim_start_matches('\u{feff}').lines() {
        if line.starts_with('#') {
            let mut rest = line;
            while let Some(i) = rest.find("URI=\"") {
                let v = &rest[i + 5..];
                let end = v.find('"').unwrap();
                out.push(v[..end].to_string());
                rest = &v[end..];
            }
        } else if !line.trim().is_empty() {
            out.push(line.trim().to_string());
        }
    }
    out
}

fn child_query(uri: &str) -> Query {
    Query::parse(uri.split_once('?').map(|(_, q)| q))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_playlist_is_rewritten_with_signed_children() {
    let o = origin().await;
    let p = Proxy::token().await;
    let got = get(p.addr(), "GET", &signed_relay_path("master.m3u8", &o.url("/hls/master.m3u8"), None), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/vnd.apple.mpegurl"));
    assert_eq!(got.header("content-length"), Some(&*got.body.len().to_string()));
    let text = got.text();
    assert_eq!(text.lines().count(), MASTER.lines().count());
    let children = uris(&text);
    assert_eq!(children.len(), 3);
    let expected = [
        ("/strm/proxy/de.m3u8?", o.url("/hls/audio/de.m3u8")),
        ("/strm/proxy/index.m3u8?", o.url("/hls/low/index.m3u8")),
        ("/strm/proxy/index.m3u8?", "https://other.example/hi/index.m3u8?t=1".to_string()),
    ];
    for (uri, (prefix, upstream)) in children.iter().zip(expected) {
        assert!(uri.starts_with(prefix), "{uri}");
        let q = child_query(uri);
        assert_eq!(q.get("u"), Some(upstream.as_str()));
        let exp: u64 = q.get("exp").unwrap().parse().unwrap();
        // A master's children live for the session (auth.session_ttl, 6 h).
        assert!(exp >= now() + 6 * 3600 - 60 && exp <= now() + 6 * 3600 + 60, "exp = now + session_ttl");
        assert_eq!(verify_token(SECRET.as_bytes(), &q, now()), Ok(()));
    }
    // Tags and comments are untouched.
    assert!(text.contains("#EXT-X-STREAM-INF:BANDWIDTH=800000,AUDIO=\"aud\"\n"));

    // Following a child works: the media playlist, then a segment.
    let media = get(p.addr(), "GET", &children[1], &[]).await;
    assert_eq!(media.status, 200);
    let media_text = media.text();
    assert!(media_text.contains("\r\n"), "CRLF line endings kept");
    let segs = uris(&media_text);
    assert_eq!(segs.len(), 3);
    // A VOD media playlist's children live for its playback (2 × 2 s) plus token_ttl.
    for s in &segs {
        let exp: u64 = child_query(s).get("exp").unwrap().parse().unwrap();
        assert!(exp >= now() + 15 * 60 + 4 - 60 && exp <= now() + 15 * 60 + 4 + 60, "{s}");
    }
    assert_eq!(child_query(&segs[0]).get("u"), Some(o.url("/hls/key.bin").as_str()));
    assert!(segs[1].starts_with("/strm/proxy/seg000.ts?"));
    let seg = get(p.addr(), "GET", &segs[1], &[("Range", "bytes=0-99")]).await;
    assert_eq!(seg.status, 206);
    assert_body(&seg.body, &pattern(0, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playlists_are_detected_by_url_type_or_body() {
    let o = origin().await;
    let p = Proxy::open().await;
    for path in ["/hls/plain", "/hls/playlist.php", "/hls/bom", "/hls/low/index.m3u8", "/hls/gz.m3u8"] {
        let got = get(p.addr(), "GET", &relay_path("x", &o.url(path)), &[]).await;
        assert_eq!(got.status, 200, "{path}");
        assert_eq!(got.header("content-type"), Some("application/vnd.apple.mpegurl"), "{path}");
        assert!(!got.has("content-encoding"), "{path}: decoded before rewriting");
        let text = got.text();
        assert!(text.trim_start_matches('\u{feff}').starts_with("#EXTM3U"), "{path}");
        for u in uris(&text) {
            assert!(u.starts_with("/strm/proxy/"), "{path}: {u}");
            // none mode: no credentials added
            assert!(!u.contains("sig=") && !u.contains("exp="), "{u}");
        }
    }
    // An .m3u8 URL whose body is not a playlist is relayed as it is.
    let got = get(p.addr(), "GET", &relay_path("x.m3u8", &o.url("/hls/notreally.m3u8")), &[]).await;
    assert_eq!(got.text(), "<html>error</html>");
    assert_eq!(got.header("content-type"), Some("text/html"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_uris_resolve_against_the_final_url_after_redirects() {
    let o = origin().await;
    let p = Proxy::open().await;
    let got = get(p.addr(), "GET", &relay_path("x.m3u8", &o.url("/hls/moved.m3u8")), &[]).await;
    let segs = uris(&got.text());
    assert_eq!(child_query(&segs[1]).get("u"), Some(o.url("/hls/low/seg000.ts").as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_playlists_are_refused_not_buffered() {
    common::logs::capture();
    let o = origin().await;
    let p = Proxy::open_with("stream: {max_playlist_bytes: 10000}\n").await;
    let got = get(p.addr(), "GET", &relay_path("x.m3u8", &o.url("/hls/big.m3u8")), &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.text(), "playlist too large\n");
    // The log names the hoster whose playlist it was.
    let said = common::logs::logs();
    assert!(
        said.lines().any(|l| l.starts_with("WARN playlist from 127.0.0.1 ")
            && l.ends_with("exceeds stream.max_playlist_bytes (10000)")),
        "{said}"
    );
    // A small one still works on the same proxy.
    let got = get(p.addr(), "GET", &relay_path("x.m3u8", &o.url("/hls/master.m3u8")), &[]).await;
    assert_eq!(got.status, 200);
}

/// A hoster's playlist made to cost its square in time: 20 000 variable
/// definitions and as many references, then one line of 2 million
/// unclosed references (under the default 8 MiB limit).
fn hostile_playlist() -> String {
    let mut s = String::from("#EXTM3U\n#EXT-X-TARGETDURATION:4\n");
    for i in 0..20_000 {
        s.push_str(&format!("#EXT-X-DEFINE:NAME=\"v{i}\",VALUE=\"d{i}\"\n"));
    }
    for i in 0..20_000 {
        s.push_str(&format!("#EXTINF:4,\n{{$v0}}/s{i}.ts\n"));
    }
    s.push_str("#EXTINF:4,\n");
    s.push_str(&"{$".repeat(2_000_000));
    s.push_str("\n#EXT-X-ENDLIST\n");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_playlist_cannot_stall_the_proxy() {
    let o = origin().await;
    let p = Proxy::open().await;
    let path = relay_path("x.m3u8", &o.url("/hls/hostile.m3u8"));
    // Rewritten in moments; before variables were looked up by name and
    // unclosed references read once, this took many minutes of a worker's CPU.
    let got = tokio::time::timeout(Duration::from_secs(60), get(p.addr(), "GET", &path, &[]))
        .await
        .expect("the rewrite takes time in proportion to the playlist");
    assert_eq!(got.status, 200);
    let children = uris(&got.text());
    assert_eq!(children.len(), 20_001);
    assert!(children[..20_000].iter().all(|u| child_query(u).get("u").unwrap().contains("/hls/d0/s")));
    // Still answering others at once.
    let got = get(p.addr(), "GET", &relay_path("m.m3u8", &o.url("/hls/master.m3u8")), &[]).await;
    assert_eq!(got.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_playlist_has_the_get_headers() {
    let o = origin().await;
    let p = Proxy::open().await;
    let path = relay_path("master.m3u8", &o.url("/hls/master.m3u8"));
    let g = get(p.addr(), "GET", &path, &[]).await;
    let h = get(p.addr(), "HEAD", &path, &[]).await;
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    assert_eq!(h.header("content-length"), Some(&*g.body.len().to_string()));
    assert_eq!(h.header("content-type"), g.header("content-type"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_base_url_and_apikey_children() {
    let o = origin().await;
    let p = Proxy::start(
        "auth: {mode: apikey, api_key: \"key-9\"}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\npublic_base_url: \"https://media.example.org/anibridge/\"\n",
    )
    .await;
    let got = get(p.addr(), "GET", &relay_path("m.m3u8", &o.url("/hls/master.m3u8")), &[("X-Api-Key", "key-9")]).await;
    assert_eq!(got.status, 200);
    for u in uris(&got.text()) {
        assert!(u.starts_with("https://media.example.org/anibridge/strm/proxy/"), "{u}");
        assert_eq!(child_query(&u).get("apikey"), Some("key-9"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_only_fix_the_type() {
    let o = origin().await;
    let yaml = format!("auth: {{mode: none}}\nroutes: [{{prefix: \"/r/\", upstream: \"{}\"}}]\n", o.url("/hls/"));
    let p = Proxy::start(&yaml).await;
    let got = get(p.addr(), "GET", "/r/plain", &[]).await;
    assert_eq!(got.header("content-type"), Some("application/vnd.apple.mpegurl"));
    assert_eq!(got.text(), MASTER, "routes relay playlists unchanged");
}

/// A playlist whose upstream refuses HEAD: the HEAD fallback's one byte
/// shows a playlist, which is then fetched whole, so the HEAD reports the
/// rewritten length, exactly what the GET sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_playlist_whose_upstream_refuses_head_has_the_rewritten_length() {
    // Typed a playlist only in the GET's answer: the HEAD fallback's byte
    // says so, and the HEAD is answered from a GET of the whole playlist.
    let o = Origin::start(|req| {
        if req.method == "HEAD" {
            Resp::new(405, Body::Bytes(Vec::new())).into()
        } else {
            serve_bytes(req, MEDIA.as_bytes(), Some("application/vnd.apple.mpegurl")).into()
        }
    })
    .await;
    let p = Proxy::open().await;
    let g = get(p.addr(), "GET", &relay_path("list", &o.url("/get?id=1")), &[]).await;
    assert_eq!(g.header("content-type"), Some("application/vnd.apple.mpegurl"));
    assert_ne!(g.body.len(), MEDIA.len(), "rewritten");
    // Another URL of the same playlist: nothing in the cache answers it.
    let before = o.requests().len();
    let h = get(p.addr(), "HEAD", &relay_path("list", &o.url("/get?id=2")), &[]).await;
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    assert_eq!(h.header("content-length"), Some(g.body.len().to_string().as_str()));
    assert_eq!(h.header("content-type"), Some("application/vnd.apple.mpegurl"));
    let seen: Vec<(String, Option<String>)> =
        o.requests()[before..].iter().map(|r| (r.method.clone(), r.header("range").map(str::to_string))).collect();
    assert_eq!(
        seen,
        [("HEAD".into(), None), ("GET".into(), Some("bytes=0-0".into())), ("GET".into(), None)],
        "HEAD, the fallback's byte, then the whole playlist"
    );
}

/// DESIGN's HEAD row: a HEAD reaches the upstream as exactly one HEAD (plus
/// the fallback's one-byte GET when HEAD is refused); a generic type is no
/// reason to GET the body — a hoster's octet-stream MP4 is never started
/// whole (and cut) to answer a HEAD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_generic_type_is_one_head_upstream() {
    let refuses = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = refuses.clone();
    let o = Origin::start(move |req| {
        if req.method == "HEAD" && r.load(std::sync::atomic::Ordering::SeqCst) {
            return Resp::new(405, Body::Bytes(Vec::new())).into();
        }
        serve_file(req, 50_000_000, Some("application/octet-stream")).into()
    })
    .await;
    let p = Proxy::open().await;
    for (i, refused) in [false, true].into_iter().enumerate() {
        refuses.store(refused, std::sync::atomic::Ordering::SeqCst);
        let before = o.requests().len();
        let h = get(p.addr(), "HEAD", &relay_path("episode", &o.url(&format!("/dl/{i}"))), &[]).await;
        assert_eq!((h.status, h.header("content-length")), (200, Some("50000000")));
        assert_eq!(h.header("content-type"), Some("application/octet-stream"));
        let seen: Vec<(String, Option<String>)> =
            o.requests()[before..].iter().map(|r| (r.method.clone(), r.header("range").map(str::to_string))).collect();
        let want: Vec<(String, Option<String>)> = if refused {
            vec![("HEAD".into(), None), ("GET".into(), Some("bytes=0-0".into()))]
        } else {
            vec![("HEAD".into(), None)]
        };
        assert_eq!(seen, want, "one HEAD (and the fallback's byte), never a whole GET");
        // Asked again: the HEAD's answer is kept (cache on), or it is one HEAD again.
        let again = get(p.addr(), "HEAD", &relay_path("episode", &o.url(&format!("/dl/{i}"))), &[]).await;
        assert_eq!(again.header("content-length"), Some("50000000"));
        let more = o.requests().len() - before - want.len();
        assert_eq!(more, if cache_on() { 0 } else { want.len() }, "the second HEAD");
    }
}

/// DESIGN "Playlists are answered whole": a request known to be for a
/// playlist goes upstream without the client's Range and conditionals (and
/// as a GET for a HEAD); the client gets 200 and the whole rewritten
/// playlist, without the headers that describe the upstream's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_playlists_are_fetched_and_answered_whole() {
    let o = origin().await;
    let p = Proxy::open().await;
    let path = relay_path("index.m3u8", &o.url("/hls/known.m3u8"));
    let conditional = [
        ("Range", "bytes=0-"),
        ("If-Range", "\"v1\""),
        ("If-None-Match", "\"v1\""),
        ("If-Modified-Since", "Tue, 01 Jul 2025 10:00:00 GMT"),
    ];
    let got = get(p.addr(), "GET", &path, &conditional).await;
    assert_eq!(got.status, 200);
    for gone in ["content-range", "accept-ranges", "etag", "last-modified"] {
        assert!(!got.has(gone), "{gone}: {:?}", got.headers);
    }
    assert_eq!(got.header("content-length"), Some(got.body.len().to_string().as_str()));
    assert!(got.text().contains("/strm/proxy/seg000.ts?u="));
    let seen = o.requests();
    let up = seen.last().unwrap();
    assert_eq!(up.method, "GET");
    for h in ["range", "if-range", "if-none-match", "if-modified-since"] {
        assert!(up.header(h).is_none(), "{h} went upstream: {up:?}");
    }
    // A HEAD is a GET upstream (only the body gives the length), answered
    // with the GET's headers.
    let head = get(p.addr(), "HEAD", &path, &[("Range", "bytes=0-")]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), got.header("content-length"));
    let up = o.requests().last().unwrap().clone();
    assert_eq!((up.method.as_str(), up.header("range")), ("GET", None));
}

/// A playlist recognised only from its response that came back as a partial
/// 206 is fetched once more, whole; a 206 covering the whole file is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_playlist_is_fetched_again_whole() {
    let o = origin().await;
    let p = Proxy::open().await;
    // One URL per step, so what the origin sees does not depend on the cache.
    let path = |n: u32| relay_path("stream", &o.url(&format!("/hls/ranged?n={n}")));
    let whole = get(p.addr(), "GET", &path(1), &[]).await;
    assert_eq!((whole.status, whole.header("content-type")), (200, Some("application/vnd.apple.mpegurl")));
    assert_eq!(o.count("/hls/ranged"), 1);

    let got = get(p.addr(), "GET", &path(2), &[("Range", "bytes=0-9")]).await;
    assert_eq!(got.status, 200, "never the upstream's raw bytes");
    assert_eq!(got.body, whole.body);
    assert!(!got.has("content-range") && !got.has("etag"));
    let ranges: Vec<Option<String>> = o.requests()[1..].iter().map(|r| r.header("range").map(str::to_string)).collect();
    assert_eq!(ranges, [Some("bytes=0-9".to_string()), None], "the partial answer, then the whole playlist");

    // `bytes=0-` (what players send) gets a 206 of the whole file: used as it is.
    let got = get(p.addr(), "GET", &path(3), &[("Range", "bytes=0-")]).await;
    assert_eq!((got.status, &got.body), (200, &whole.body));
    assert_eq!(o.count("/hls/ranged"), 4);
}

/// Children of a live playlist (no #EXT-X-ENDLIST) live for auth.token_ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_playlist_children_live_for_token_ttl() {
    let o = origin().await;
    let p = Proxy::start("auth: {mode: token, token_ttl: \"2m\"}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\n").await;
    let got = get(p.addr(), "GET", &signed_relay_path("live.m3u8", &o.url("/hls/live.m3u8"), None), &[]).await;
    let children = uris(&got.text());
    assert_eq!(children.len(), 2);
    for c in children {
        let exp: u64 = child_query(&c).get("exp").unwrap().parse().unwrap();
        assert!(exp >= now() + 110 && exp <= now() + 130, "{c}");
    }
}

/// LL-HLS players (hls.js, AVPlayer) append `_HLS_msn`/`_HLS_part`/`_HLS_skip`
/// to a playlist's URL when it offers blocking reloads or delta updates; a
/// signed URL with a parameter added is refused, so every reload was a 401.
/// The rewritten playlist no longer offers them (the relay never passed the
/// directives upstream): players reload it as any live playlist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ll_hls_playlists_offer_no_delivery_directives() {
    let o = origin().await;
    let p = Proxy::token().await;
    let path = signed_relay_path("ll.m3u8", &o.url("/hls/ll.m3u8"), None);
    let got = get(p.addr(), "GET", &path, &[]).await;
    assert_eq!(got.status, 200);
    let text = got.text();
    assert_eq!(text.lines().count(), LL_HLS.lines().count());
    assert!(text.contains("\n#EXT-X-SERVER-CONTROL:PART-HOLD-BACK=1.5,HOLD-BACK=6.0\n"), "{text}");
    assert!(!text.contains("CAN-BLOCK-RELOAD") && !text.contains("CAN-SKIP"), "{text}");
    assert_eq!(uris(&text).len(), 3, "segment, part and preload hint still go through the proxy: {text}");
    // What a player would have sent: the directive breaks the signature.
    assert_eq!(get(p.addr(), "GET", &format!("{path}&_HLS_msn=9&_HLS_part=0"), &[]).await.status, 401);
    assert_eq!(get(p.addr(), "GET", &path, &[]).await.status, 200);
}

/// Content steering and interstitials would send the player to the hoster
/// with URLs the proxy cannot sign for it (players append `_HLS_pathway`,
/// `_HLS_primary_id`): those tags are left out (blank lines), everything
/// else is kept, and every URL left in the playlists goes through the proxy.
#[tokio::test]
async fn steering_and_interstitials_never_send_the_player_to_the_hoster() {
    let o = origin().await;
    let p = Proxy::token().await;
    for (name, src, dropped) in
        [("steered.m3u8", STEERED, "#EXT-X-CONTENT-STEERING"), ("ads.m3u8", WITH_ADS, "X-ASSET-")]
    {
        let path = signed_relay_path(name, &o.url(&format!("/hls/{name}")), None);
        let got = get(p.addr(), "GET", &path, &[]).await;
        assert_eq!(got.status, 200);
        let text = got.text();
        assert_eq!(text.lines().count(), src.lines().count(), "{text}");
        assert!(!text.contains(dropped) && !text.contains("json"), "{text}");
        let kept: Vec<&str> = src.lines().filter(|l| !l.contains(dropped)).collect();
        let left: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(left.len(), kept.len(), "{text}");
        for (line, was) in left.iter().zip(&kept) {
            if line.starts_with('#') {
                assert_eq!(line, was);
            } else {
                assert!(line.starts_with("/strm/proxy/"), "{line}");
            }
        }
        assert!(uris(&text).iter().all(|u| u.starts_with("/strm/proxy/")), "{text}");
    }
}

/// `#EXT-X-DEFINE` variables are substituted in the URIs the proxy rewrites
/// (a player cannot: the upstream URL is encoded in the proxy's query), and
/// a `QUERYPARAM` definition — a parameter of the playlist's own URL, which
/// the player now sees as the proxy's — becomes the value it had upstream.
/// hls.js refused such a master before (`manifestParsingError`).
#[tokio::test]
async fn playlist_variables_are_substituted_in_rewritten_uris() {
    let o = origin().await;
    let p = Proxy::token().await;
    let master =
        get(p.addr(), "GET", &signed_relay_path("master.m3u8", &o.url("/hls/def/master.m3u8?tok=t0k"), None), &[])
            .await;
    assert_eq!(master.status, 200);
    let text = master.text();
    assert!(text.contains("\n#EXT-X-DEFINE:NAME=\"tok\",VALUE=\"t0k\"\n"), "{text}");
    let variant = &uris(&text)[0];
    assert_eq!(child_query(variant).get("u"), Some(o.url("/hls/def/media.m3u8?tok=t0k").as_str()));
    let media = get(p.addr(), "GET", variant, &[]).await;
    assert_eq!(media.status, 200);
    let text = media.text();
    assert!(text.contains("\n#EXT-X-DEFINE:NAME=\"dir\",VALUE=\"low\"\n"), "{text}");
    let seg = &uris(&text)[0];
    assert!(seg.starts_with("/strm/proxy/seg000.ts?"), "{seg}");
    assert_eq!(child_query(seg).get("u"), Some(o.url("/hls/def/low/seg000.ts").as_str()));
    let got = get(p.addr(), "GET", seg, &[]).await;
    assert_eq!(got.status, 200);
    assert_body(&got.body, &pattern(0, 5000));
}

/// A signed route in front of a hoster that disguises its segments
/// (`seg0.jpg`, typed `image/jpeg`): the route's own URL would keep the
/// name ffmpeg refuses for a segment, so such a segment's child is the
/// relay's URL with `.ts` appended, naming the route under its signature;
/// the relay trusts it as the route does (the route's upstream is private
/// here, and no `allow_cidrs` lets it in), but nothing else: not the same
/// URL without the route named, nor one outside the route's base. Keys and
/// ordinary segments stay the route's own URLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_routes_disguised_segments_get_names_players_accept() {
    let o = Origin::start(|req| match req.path() {
        "/base/index.m3u8" => Resp::new(
            200,
            Body::Bytes(
                b"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-KEY:METHOD=AES-128,URI=\"key.bin\"\n\
                  #EXTINF:2.0,\nseg0.jpg\n#EXTINF:2.0,\nseg1.ts\n#EXT-X-ENDLIST\n"
                    .to_vec(),
            ),
        )
        .header("Content-Type", "application/vnd.apple.mpegurl")
        .into(),
        "/base/seg0.jpg" => Resp::new(200, Body::Bytes(pattern(0, 5000))).header("Content-Type", "image/jpeg").into(),
        _ => Resp::new(200, Body::Bytes(pattern(7, 100))).header("Content-Type", "video/mp2t").into(),
    })
    .await;
    // Token mode; loopback is not in `allow_cidrs`: only the route trusts it.
    let yaml = format!("auth: {{mode: token}}\nroutes: [{{prefix: \"/cdn/\", upstream: \"{}\"}}]\n", o.url("/base/"));
    let p = Proxy::start(&yaml).await;
    let master = signed_route_path("/cdn/index.m3u8", &[("exp", &(now() + 600).to_string())]);
    let list = get(p.addr(), "GET", &master, &[]).await;
    assert_eq!(list.status, 200, "{}", list.text());
    let text = list.text();
    let children: Vec<&str> = text.lines().filter(|l| l.starts_with('/')).collect();
    let key = text.lines().find_map(|l| l.split("URI=\"").nth(1)).unwrap().trim_end_matches('"');
    assert!(key.starts_with("/cdn/key.bin?exp="), "a key stays the route's: {text}");
    assert!(
        children[0].starts_with("/strm/proxy/seg0.jpg.ts?u=") && children[0].contains("&_route=%2Fcdn%2F&"),
        "{text}"
    );
    assert!(children[1].starts_with("/cdn/seg1.ts?exp="), "an ordinary segment stays the route's: {text}");
    let seg = get(p.addr(), "GET", children[0], &[]).await;
    assert_eq!((seg.status, seg.header("content-type")), (200, Some("image/jpeg")), "{}", seg.text());
    assert_body(&seg.body, &pattern(0, 5000));
    for path in [key, children[1]] {
        assert_eq!(get(p.addr(), "GET", path, &[]).await.status, 200, "{path}");
    }
    // The relay trusts only what a route it names would fetch.
    let naming = |u: &str, route: &str| {
        let mut q = Query(vec![("u".into(), u.into()), ("_route".into(), route.into())]);
        q.0.push(("sig".into(), anibridge_proxy::auth::sign(SECRET.as_bytes(), &q)));
        format!("/strm/proxy/x.ts?{}", q.encode())
    };
    let seg0 = o.url("/base/seg0.jpg");
    for refused in [
        signed_relay_path("x.ts", &seg0, None),
        naming(&seg0, "/elsewhere/"),
        naming(&o.url("/secret.bin"), "/cdn/"),
        naming(&o.url("/basement.bin"), "/cdn/"),
        naming(&format!("{}..%2Fsecret.bin", o.url("/base/")), "/cdn/"),
    ] {
        let got = get(p.addr(), "GET", &refused, &[]).await;
        assert_eq!((got.status, got.text()), (403, "destination not allowed\n".to_string()), "{refused}");
    }
    assert_eq!(get(p.addr(), "GET", &naming(&seg0, "/cdn/"), &[]).await.status, 200);
}
