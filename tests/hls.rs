//! HLS playlists relayed through the proxy: detection, rewriting, bounded
//! buffering, and a real player (ffmpeg) end to end.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anibridge_proxy::auth::{verify_token, Query};
use common::*;

const MASTER: &str = "#EXTM3U\n#EXT-X-VERSION:3\n\
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"de\",URI=\"audio/de.m3u8\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=800000,AUDIO=\"aud\"\nlow/index.m3u8\n\
#EXT-X-STREAM-INF:BANDWIDTH=1600000\nhttps://other.example/hi/index.m3u8?t=1\n";

const MEDIA: &str = "#EXTM3U\r\n#EXT-X-TARGETDURATION:2\r\n#EXT-X-KEY:METHOD=AES-128,URI=\"../key.bin\"\r\n\
#EXTINF:2.0,\r\nseg000.ts\r\n#EXTINF:2.0,\r\nseg001.ts\r\n#EXT-X-ENDLIST\r\n";

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
        "/hls/moved.m3u8" => Resp::new(302, Body::Bytes(Vec::new())).header("Location", "/hls/low/index.m3u8").into(),
        "/hls/notreally.m3u8" => {
            Resp::new(200, Body::Bytes(b"<html>error</html>".to_vec())).header("Content-Type", "text/html").into()
        }
        "/hls/low/seg000.ts" => serve_file(req, 5000, Some("video/mp2t")).into(),
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
    for path in ["/hls/plain", "/hls/bom", "/hls/low/index.m3u8", "/hls/gz.m3u8"] {
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
    let o = origin().await;
    let p = Proxy::start(
        "auth: {mode: none}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\nstream: {max_playlist_bytes: 10000}\n",
    )
    .await;
    let got = get(p.addr(), "GET", &relay_path("x.m3u8", &o.url("/hls/big.m3u8")), &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.text(), "playlist too large\n");
    // A small one still works on the same proxy.
    let got = get(p.addr(), "GET", &relay_path("x.m3u8", &o.url("/hls/master.m3u8")), &[]).await;
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

// ---- a real player, end to end ------------------------------------------

/// Generates a 2-variant AES-128 HLS stream into a temp dir.
fn make_hls() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("key.bin"), b"0123456789abcdef").unwrap();
    std::fs::write(d.join("key.info"), format!("../key.bin\n{}\n", d.join("key.bin").display())).unwrap();
    let status = std::process::Command::new(tool("ffmpeg"))
        .current_dir(d)
        .args(["-v", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc=duration=4:size=320x240:rate=25"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:duration=4"])
        .args(["-map", "0:v", "-map", "1:a", "-map", "0:v", "-map", "1:a"])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-c:a", "aac"])
        .args(["-s:v:1", "160x120", "-b:v:0", "300k", "-b:v:1", "100k"])
        .args(["-f", "hls", "-hls_time", "1", "-hls_playlist_type", "vod", "-hls_key_info_file", "key.info"])
        .args(["-master_pl_name", "master.m3u8", "-var_stream_map", "v:0,a:0 v:1,a:1"])
        .args(["-hls_segment_filename", "v%v/seg%03d.ts", "v%v/index.m3u8"])
        .status()
        .unwrap();
    assert!(status.success(), "ffmpeg could not generate the test stream");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_plays_an_encrypted_two_variant_stream_through_the_proxy() {
    let dir = make_hls();
    let root: Arc<PathBuf> = Arc::new(dir.path().to_path_buf());
    let files: Vec<String> = walk(&root);
    assert!(files.iter().filter(|f| f.ends_with(".ts")).count() >= 6, "{files:?}");
    let r = root.clone();
    // Served as octet-stream, so the proxy must sniff playlists.
    let o = Origin::start(move |req| {
        let rel = req.path().trim_start_matches('/');
        match std::fs::read(r.join(rel)) {
            Ok(bytes) if !rel.contains("..") => {
                Resp::new(200, Body::Bytes(bytes)).header("Content-Type", "application/octet-stream").into()
            }
            _ => Resp::new(404, Body::Bytes(Vec::new())).into(),
        }
    })
    .await;
    // Every request the proxy makes carries X-Through-Proxy (a profile).
    let p = Proxy::start(
        "auth: {mode: token}\negress: {allow_cidrs: [\"127.0.0.0/8\"]}\nproviders: [{hosts: [\"127.0.0.1\"], headers: {X-Through-Proxy: \"1\"}}]\n",
    )
    .await;
    let url =
        format!("http://{}{}", p.addr(), signed_relay_path("master.m3u8", &o.url("/master.m3u8"), Some(now() + 300)));
    let out = dir.path().join("out.ts");
    let addr = p.addr();
    let result = tokio::task::spawn_blocking(move || {
        std::process::Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-y",
                "-allowed_extensions",
                "ALL",
                "-i",
                &url,
                "-map",
                "0",
                "-c",
                "copy",
                "-f",
                "mpegts",
            ])
            .arg(&out)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(result.status.success(), "ffmpeg failed via {addr}: {}", String::from_utf8_lossy(&result.stderr));
    assert!(std::fs::metadata(dir.path().join("out.ts")).unwrap().len() > 10_000);

    let seen = o.requests();
    assert!(seen.iter().all(|r| r.header("x-through-proxy") == Some("1")), "a request bypassed the proxy");
    for f in files.iter().filter(|f| f.ends_with(".ts") || f.ends_with(".m3u8") || f.ends_with("key.bin")) {
        assert!(
            seen.iter().any(|r| r.path() == format!("/{f}")),
            "{f} was never fetched; seen {:?}",
            seen.iter().map(|r| r.path().to_string()).collect::<Vec<_>>()
        );
    }
}

fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().to_string());
            }
        }
    }
    out
}

/// A playlist whose upstream refuses HEAD: the HEAD fallback's one byte
/// shows a playlist, which is then fetched whole, so the HEAD reports the
/// rewritten length, exactly what the GET sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_playlist_whose_upstream_refuses_head_has_the_rewritten_length() {
    let o = Origin::start(|req| {
        if req.method == "HEAD" {
            Resp::new(405, Body::Bytes(Vec::new())).into()
        } else {
            serve_bytes(req, MEDIA.as_bytes(), Some("application/octet-stream")).into()
        }
    })
    .await;
    let p = Proxy::open().await;
    let path = relay_path("list", &o.url("/get?id=1"));
    let g = get(p.addr(), "GET", &path, &[]).await;
    assert_eq!(g.header("content-type"), Some("application/vnd.apple.mpegurl"));
    assert_ne!(g.body.len(), MEDIA.len(), "rewritten");
    let before = o.requests().len();
    let h = get(p.addr(), "HEAD", &path, &[]).await;
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
