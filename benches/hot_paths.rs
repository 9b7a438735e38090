//! Micro benchmarks of the per-request pure work: routing + signature
//! verification, header policy, content-type lookup, rewriting a
//! 5 000-segment playlist (target: ≤ 2 ms), and a cached host name lookup.

use std::hint::black_box;

// As in the binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anibridge_proxy::auth::{sign, verify_token, Query};
use anibridge_proxy::proxy::rewrite_playlist;
use anibridge_proxy::{content_type, headers, routing};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};

fn signed_query() -> String {
    let mut q = Query(vec![
        (
            "u".into(),
            "https://cdn.hoster.example/v/0123456789abcdef/ep-12.mp4?token=abcDEF123&expires=1900000000".into(),
        ),
        ("exp".into(), "4102444800".into()),
    ]);
    let s = sign(b"bench-secret", &q);
    q.0.push(("sig".into(), s));
    q.encode()
}

fn playlist(segments: usize) -> String {
    let mut s = String::from("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXT-X-KEY:METHOD=AES-128,URI=\"https://keys.example/k.bin\"\n");
    for i in 0..segments {
        s.push_str(&format!("#EXTINF:4.000,\nhttps://cdn.hoster.example/hls/v1/720p/seg-{i:05}.ts?token=abcDEF123\n"));
    }
    s.push_str("#EXT-X-ENDLIST\n");
    s
}

fn bench(c: &mut Criterion) {
    let raw = signed_query();
    let routes = vec![routing::Route::new("/cdn/", url::Url::parse("https://cdn.example.com/").unwrap(), true)];
    c.bench_function("route + parse + verify signature", |b| {
        b.iter(|| {
            let t = routing::classify(black_box("/strm/proxy/ep-12.mp4"), &routes);
            let q = Query::parse(Some(black_box(&raw)));
            (t, verify_token(b"bench-secret", &q, 1_900_000_000))
        })
    });

    let mut client = HeaderMap::new();
    for (k, v) in [
        ("host", "proxy"),
        ("user-agent", "Lavf/60.3.100"),
        ("accept", "*/*"),
        ("range", "bytes=0-65535"),
        ("connection", "keep-alive"),
        ("icy-metadata", "1"),
        ("x-forwarded-for", "10.0.0.1"),
    ] {
        client.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    let profile = headers::parse_pairs([("Referer", "https://voe.sx/"), ("Origin", "https://voe.sx")]).unwrap();
    let mut response = HeaderMap::new();
    for name in ["content-type", "content-length", "etag", "keep-alive", "set-cookie", "accept-ranges"] {
        response.insert(HeaderName::from_static(name), HeaderValue::from_static("v"));
    }
    c.bench_function("header policy (request + response)", |b| {
        b.iter(|| {
            let forwarded = headers::forwarded_request_headers(black_box(&client), None);
            let out = headers::upstream_request_headers(&forwarded, &profile, &[]).count();
            let dropped = headers::dropped_response_headers(black_box(&response)).count();
            (out, dropped)
        })
    });

    c.bench_function("content-type lookup", |b| {
        b.iter(|| content_type::guess(black_box("/hls/v1/720p/seg-00012.ts"), Some(black_box("x.mp4"))))
    });

    let text = playlist(5000);
    c.bench_function("summary of a 5000-segment playlist (child lifetime, fMP4)", |b| {
        b.iter(|| anibridge_proxy::hls::Summary::of(black_box(&text)))
    });
    let base = url::Url::parse("https://cdn.hoster.example/hls/v1/720p/index.m3u8").unwrap();
    let auth = anibridge_proxy::auth::Auth::new(
        anibridge_proxy::config::AuthMode::Token,
        Some("bench-secret"),
        None,
        900,
        6 * 3600,
    );
    for (name, text) in
        [("absolute URIs", &text), ("relative URIs", &text.replace("https://cdn.hoster.example/hls/v1/720p/", ""))]
    {
        c.bench_function(&format!("rewrite 5000-segment playlist, token mode, {name}"), |b| {
            b.iter(|| rewrite_playlist(&auth, "", black_box(text), &base, None, 1_900_000_000))
        });
    }

    // Every request to a named upstream (cache hits included: the egress
    // check comes first) asks the DNS cache.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dns = anibridge_proxy::dns::Dns::default();
    let within = std::time::Duration::from_secs(5);
    rt.block_on(dns.lookup("localhost", within)).unwrap();
    c.bench_function("host name lookup, cached", |b| {
        b.iter(|| rt.block_on(dns.lookup(black_box("localhost"), within)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
