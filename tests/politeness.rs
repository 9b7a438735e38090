//! DESIGN "Hoster politeness (per-host gate)", judged from the hoster's
//! side: how many requests it had at once, how many it refused, and when
//! requests arrived after a refusal.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process;
use common::*;

const SEG: u64 = 128 * 1024;

/// A hoster that allows `allowed` requests at once and answers the one
/// over with `429` and `retry_after` (if any); segments trickle for ~80 ms.
async fn throttling(allowed: usize, retry_after: Option<&'static str>) -> Origin {
    Origin::start(move |req| {
        if req.in_flight > allowed {
            let refusal = Resp::new(429, Body::Bytes(b"slow down\n".to_vec()));
            return match retry_after {
                Some(ra) => refusal.header("Retry-After", ra).into(),
                None => refusal.into(),
            };
        }
        let i: u64 = req.path().trim_start_matches("/seg").trim_end_matches(".ts").parse().unwrap_or(0);
        // Each answer holds the hoster for a while.
        Action::Delayed(Duration::from_millis(80), serve_bytes(req, &pattern(i * SEG, SEG), Some("video/mp2t")))
    })
    .await
}

async fn proxy(extra: &str) -> Proxy {
    Proxy::open_with(extra).await
}

/// How a player reacts to a refusal: retry after 0.2 s whatever it was
/// told (most players), or wait `Retry-After` as told.
#[derive(Clone, Copy)]
enum Player {
    Impatient,
    Obedient,
}

/// 24 players fetch 48 distinct segments (two each) through the proxy,
/// retrying refusals as `player` does; every file is checked byte for byte.
async fn crowd(p: &Proxy, o: &Origin, player: Player) {
    crowd_of(p, &o.url(""), player).await
}

/// [`crowd`], of the segments `{base}/seg{i}.ts`.
async fn crowd_of(p: &Proxy, base: &str, player: Player) {
    let players: Vec<_> = (0..24u64)
        .map(|n| {
            let (addr, base) = (p.addr(), base.to_string());
            tokio::spawn(async move {
                for i in [2 * n, 2 * n + 1] {
                    let path = relay_path("s.ts", &format!("{base}/seg{i}.ts"));
                    let started = Instant::now();
                    loop {
                        let got = get(addr, "GET", &path, &[]).await;
                        if got.status == 200 {
                            assert_body(&got.body, &pattern(i * SEG, SEG));
                            break;
                        }
                        assert!(matches!(got.status, 429 | 503 | 509), "{}", got.status);
                        assert!(started.elapsed() < Duration::from_secs(60), "segment {i} never arrived");
                        let wait = match player {
                            Player::Impatient => Duration::from_millis(200),
                            Player::Obedient => {
                                Duration::from_secs(got.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(1))
                            }
                        };
                        tokio::time::sleep(wait).await;
                    }
                }
            })
        })
        .collect();
    for pl in players {
        pl.await.unwrap();
    }
}

fn refusals(o: &Origin) -> Vec<SeenRequest> {
    o.requests().into_iter().filter(|r| r.in_flight > 4).collect()
}

/// With `max_connections: 4` for the hoster, it never sees more than 4 at
/// once and never refuses; all 48 files arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_limit_keeps_the_hoster_within_it() {
    let o = throttling(4, Some("2")).await;
    let p = proxy("providers: [{hosts: [\"127.0.0.1\"], max_connections: 4}]\n").await;
    crowd(&p, &o, Player::Impatient).await;
    assert!(
        o.max_in_flight.load(Ordering::SeqCst) <= 4,
        "at most 4 at once: {}",
        o.max_in_flight.load(Ordering::SeqCst)
    );
    assert!(refusals(&o).is_empty(), "the hoster never refused");
    assert_eq!(o.requests().len(), 48);
    assert!(p.server.metrics.render().windows(32).any(|w| w == b"anibridge_host_queue_waits_total"));
    assert_eq!(p.server.gate.state("127.0.0.1"), (0, None, None, 0), "no slot left held");
}

/// Without a configured limit, players that retry at once and players that
/// wait as told: after a refusal nothing reaches the hoster before its
/// `Retry-After` is over (but what was already on the way), the hoster
/// refuses about one wave and then no more, all 48 files arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_limit_the_gate_learns_it_and_honours_retry_after() {
    for player in [Player::Impatient, Player::Obedient] {
        let o = throttling(4, Some("2")).await;
        let p = proxy("").await;
        crowd(&p, &o, player).await;
        let seen = o.requests();
        let refused = refusals(&o);
        assert!(!refused.is_empty(), "the hoster was asked too much at first");
        assert!(refused.len() <= 48, "about one wave of refusals, not {}", refused.len());
        // Nothing arrives inside a pause the hoster asked for, except what
        // was on its way when the refusal went out (50 ms on loopback).
        for r in &refused {
            let early: Vec<_> = seen
                .iter()
                .filter(|s| s.at > r.at + Duration::from_millis(50) && s.at < r.at + Duration::from_millis(1950))
                .collect();
            assert!(early.is_empty(), "{} requests arrived inside a Retry-After pause", early.len());
        }
        let ok = seen.iter().filter(|s| s.in_flight <= 4).count();
        assert_eq!(ok, 48, "every file once, then no more refusals");
        let (_, learned, _, _) = p.server.gate.state("127.0.0.1");
        assert_eq!(learned, Some(4), "the limit learned");
        eprintln!("{} refusals for 48 files", refused.len());
    }
}

/// Hosters allowing 1, 4 and 16 at once: the gate settles on exactly that,
/// after the first wave of refusals (and perhaps one refused probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learned_limit_settles_near_what_the_hoster_allows() {
    for allowed in [1usize, 4, 16] {
        let o = Origin::start(move |req| {
            if req.in_flight > allowed {
                return Resp::new(429, Body::Bytes(Vec::new())).header("Retry-After", "1").into();
            }
            Action::Delayed(Duration::from_millis(60), serve_file(req, 10_000, Some("video/mp2t")))
        })
        .await;
        let p = proxy("").await;
        // 32 clients, three files each: demand stays above the limit, so
        // the gate's probes above it are tried.
        let fetches: Vec<_> = (0..32)
            .map(|c| {
                let (addr, base) = (p.addr(), o.url(""));
                tokio::spawn(async move {
                    for i in 0..3 {
                        let url = relay_path("f.ts", &format!("{base}/f{c}-{i}"));
                        while get(addr, "GET", &url, &[]).await.status != 200 {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                })
            })
            .collect();
        for f in fetches {
            f.await.unwrap();
        }
        let refused = o.requests().iter().filter(|r| r.in_flight > allowed).count();
        let (_, learned, _, _) = p.server.gate.state("127.0.0.1");
        eprintln!("hoster allows {allowed}: the gate settled on {learned:?} after {refused} refusals");
        assert_eq!(learned, Some(allowed as u32), "settled on what the hoster allows");
        // The first wave, and at most one probe above the limit learned.
        assert!(refused <= 32 - allowed + 1, "one wave of refusals, then none: {refused}");
        assert!(o.max_in_flight.load(Ordering::SeqCst) <= 32);
    }
}

/// Each form of `Retry-After` (and none), measured from the hoster's side:
/// the gap between the refusal and the next request it sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldowns_last_what_the_hoster_asked_within_bounds() {
    let in_2s = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
    // (status, Retry-After, the shortest and longest gap allowed)
    let cases: Vec<(u16, Option<String>, f64, f64)> = vec![
        (429, Some(in_2s), 1.0, 3.6),
        (429, Some("3600".into()), 2.0, 2.9), // clamped to max_cooldown: 2 s
        (429, Some("soon".into()), 1.0, 1.9), // garbage: as if absent, 1 s
        (509, None, 1.0, 1.9),
        (503, Some("1".into()), 1.0, 1.9),
    ];
    for (status, retry_after, least, most) in cases {
        let first = Arc::new(AtomicUsize::new(0));
        let f = first.clone();
        let ra = retry_after.clone();
        let o = Origin::start(move |req| {
            if f.fetch_add(1, Ordering::SeqCst) == 0 {
                let refusal = Resp::new(status, Body::Bytes(Vec::new()));
                return match ra.as_deref() {
                    Some(v) => refusal.header("Retry-After", v).into(),
                    None => refusal.into(),
                };
            }
            serve_file(req, 100, None).into()
        })
        .await;
        let p = proxy("upstream: {max_cooldown: \"2s\", queue_timeout: \"5s\"}\n").await;
        let refused = get(p.addr(), "GET", &relay_path("x", &o.url("/a")), &[]).await;
        assert_eq!(refused.status, status, "the refusal reaches its client as it is");
        let next = get(p.addr(), "GET", &relay_path("x", &o.url("/b")), &[]).await;
        assert_eq!(next.status, 200, "it waited out the cooldown, then went");
        let seen = o.requests();
        let gap = (seen[1].at - seen[0].at).as_secs_f64();
        assert!(gap >= least && gap <= most, "{status} {retry_after:?}: {gap:.2} s, not {least}..{most}");
        assert_eq!(p.server.metrics.host_cooldowns.get(), 1);
    }
}

/// A request whose wait would outlast the queue timeout is refused at once
/// with the seconds left; a saturated or cooling host does not delay
/// another host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_cooldown_is_503_at_once_and_other_hosts_go_on() {
    common::logs::capture();
    let o = Origin::start(|req| match req.path() {
        "/refuse" => Resp::new(429, Body::Bytes(Vec::new())).header("Retry-After", "30").into(),
        _ => serve_file(req, 100, None).into(),
    })
    .await;
    let p = proxy("upstream: {queue_timeout: \"1s\", max_connections_per_host: 1}\n").await;
    // Host A is 127.0.0.1, host B "localhost" (the same origin, another gate).
    assert_eq!(get(p.addr(), "GET", &relay_path("x", &o.url("/refuse")), &[]).await.status, 429);
    let started = Instant::now();
    let cooling = get(p.addr(), "GET", &relay_path("x", &o.url("/a")), &[]).await;
    assert_eq!(cooling.status, 503);
    assert_eq!(cooling.text(), "upstream cooling down\n");
    let left: u64 = cooling.header("retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&left), "{left}");
    assert!(started.elapsed() < Duration::from_millis(500), "refused at once, not after waiting");
    let b = o.url("/b").replace("127.0.0.1", "localhost");
    let other = get(p.addr(), "GET", &relay_path("x", &b), &[]).await;
    assert_eq!(other.status, 200, "host B is not cooling");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(o.requests().len(), 2, "nothing was sent to the cooling host");
    assert_eq!(p.server.metrics.host_refused.with_label_values(&["cooling_down"]).get(), 1);
    // The log: the cooldown, once, naming the host; its 503s only counted.
    // (The other tests of this file run beside this one and log too: only
    // lines that can be this test's are looked at.)
    let said = common::logs::logs();
    let cooldowns = said.lines().filter(|l| l.ends_with("cooling down for 30 s")).collect::<Vec<_>>();
    assert_eq!(cooldowns, ["WARN upstream host 127.0.0.1 refused (429): cooling down for 30 s"], "{said}");
    assert!(!said.contains("upstream failed: the host"), "no line per refused request: {said}");

    // Saturated: B's one slot is held by a slow body; A's requests wait, B's too, separately.
    let slow = Origin::start(|_| {
        Resp::new(200, Body::Slow { len: 400_000, piece: 20_000, pause: Duration::from_millis(100) }).into()
    })
    .await;
    let held = tokio::spawn({
        let (addr, url) = (p.addr(), slow.url("/long").replace("127.0.0.1", "localhost"));
        async move { get(addr, "GET", &relay_path("x", &url), &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Two at once: both wait out the queue timeout behind the held slot.
    let both: Vec<_> = ["/x", "/y"]
        .into_iter()
        .map(|path| {
            let (addr, url) = (p.addr(), slow.url(path).replace("127.0.0.1", "localhost"));
            tokio::spawn(async move { get(addr, "GET", &relay_path("x", &url), &[]).await })
        })
        .collect();
    let mut refused = Vec::new();
    for r in both {
        refused.push(r.await.unwrap());
    }
    let busy = &refused[0];
    assert_eq!((busy.status, busy.header("retry-after")), (503, Some("1")));
    assert_eq!(busy.text(), "upstream busy\n");
    assert!(busy.spelled.iter().any(|s| s == "Retry-After"), "{:?}", busy.spelled);
    assert_eq!(refused[1].status, 503);
    assert_eq!(p.server.metrics.host_refused.with_label_values(&["busy"]).get(), 2);
    // Said once a minute per host, naming it; the other is only counted.
    let said = common::logs::logs();
    let busy_lines: Vec<_> = said.lines().filter(|l| l.contains("upstream host localhost: ")).collect();
    assert_eq!(
        busy_lines,
        ["WARN upstream host localhost: a request waited upstream.queue_timeout (1s) for a slot (1 at once) and \
             was answered 503 (more this minute are only counted in anibridge_host_refused_total)"],
        "{said}"
    );
    assert!(!said.contains("upstream failed: the host"), "{said}");
    assert_eq!(held.await.unwrap().body.len(), 400_000);
}

/// Waits (up to 2 s) until nothing is in flight at 127.0.0.1.
async fn released(p: &Proxy) {
    for _ in 0..100 {
        if p.server.gate.state("127.0.0.1").0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No slot leaks: a request cancelled mid-body (its client gone), one
/// resumed mid-body (on its own slot: with a limit of 1 it does not wait
/// for itself), and a coalesced reader holding none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_released_however_a_request_ends() {
    let dies_once = Arc::new(AtomicUsize::new(0));
    let d = dies_once.clone();
    let o = Origin::start(move |req| match req.path() {
        "/slow" => Resp::new(200, Body::Slow { len: 2_000_000, piece: 20_000, pause: Duration::from_millis(20) })
            .header("Cache-Control", "no-store")
            .into(),
        "/resumed" if d.fetch_add(1, Ordering::SeqCst) == 0 => {
            let mut r = serve_file(req, 300_000, Some("video/mp4"));
            r.body = Body::DieAfter { declared: 300_000, sent: pattern(0, 50_000) };
            r.into()
        }
        _ => serve_file(req, 300_000, Some("video/mp4")).into(),
    })
    .await;
    // The cache on whatever the run says: its answers are part of the check.
    let p = proxy("upstream: {max_connections_per_host: 1}\ncache: {}\n").await;
    // Cancelled mid-body.
    let mut c = Client::connect(p.addr()).await;
    c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", relay_path("x", &o.url("/slow"))).as_bytes()).await;
    let mut sock = c.into_inner();
    let mut some = [0u8; 30_000];
    use tokio::io::AsyncReadExt;
    sock.read_exact(&mut some).await.unwrap();
    assert_eq!(p.server.gate.state("127.0.0.1").0, 1, "the stream holds its slot");
    drop(sock);
    released(&p).await;
    assert_eq!(p.server.gate.state("127.0.0.1"), (0, None, None, 0), "released when the client left");
    // Resumed on its own slot.
    let got = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/resumed")), &[]).await;
    assert!(got.complete);
    assert_body(&got.body, &pattern(0, 300_000));
    assert_eq!(o.count("/resumed"), 2);
    // (The fill gives its connection back after its readers have the last byte.)
    released(&p).await;
    assert_eq!(p.server.gate.state("127.0.0.1").0, 0);
    // Answered from the cache: no slot at all, even with the host's one slot taken.
    let hold = tokio::spawn({
        let (addr, url) = (p.addr(), o.url("/slow"));
        async move { get(addr, "GET", &relay_path("x", &url), &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(p.server.gate.state("127.0.0.1").0, 1);
    let started = Instant::now();
    let cached = get(p.addr(), "GET", &relay_path("v.mp4", &o.url("/resumed")), &[]).await;
    assert_eq!(cached.status, 200);
    assert!(started.elapsed() < Duration::from_millis(500), "not queued behind the held slot");
    assert_eq!(o.count("/resumed"), 2, "from memory");
    hold.abort();
}

/// `/strm/stream`: a 429 still re-resolves once, and the retry passes the
/// gate like any request (it waits out the cooldown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolved_url_refused_429_is_refreshed_and_the_retry_waits_its_turn() {
    let o = Origin::start(|req| match req.path() {
        "/old" => Resp::new(429, Body::Bytes(Vec::new())).header("Retry-After", "1").into(),
        _ => serve_file(req, 1000, Some("video/mp4")).into(),
    })
    .await;
    let calls = Arc::new(Mutex::new(0));
    let (c, old, new) = (calls.clone(), o.url("/old"), o.url("/new"));
    let r = Origin::start(move |_| {
        let mut n = c.lock().unwrap();
        *n += 1;
        let url = if *n == 1 { &old } else { &new };
        Resp::new(200, Body::Bytes(format!("{{\"url\":\"{url}\",\"ttl_seconds\":60}}").into_bytes()))
            .header("Content-Type", "application/json")
            .into()
    })
    .await;
    let p = proxy(&format!("resolver: {{url: \"{}\"}}\n", r.url("/resolve"))).await;
    let got = get(p.addr(), "GET", "/strm/stream?site=s&slug=x&s=1&e=1", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(*calls.lock().unwrap(), 2, "resolved once more");
    let seen = o.requests();
    assert_eq!(seen.iter().map(|r| r.path().to_string()).collect::<Vec<_>>(), ["/old", "/new"]);
    assert!(seen[1].at - seen[0].at >= Duration::from_millis(950), "the retry waited out the cooldown");
}

/// A hoster that allows one connection per address (some answer 509 to a
/// second one, open or idle): with `max_connections_per_host: 1`, requests
/// taking turns for the one slot share one upstream connection. The slot
/// is handed on only once the connection is back in the pool, so the next
/// request reuses it rather than dialling a second one — also when giving
/// it back means reading a small rest first (a HEAD answered by a GET the
/// hoster sends whole and slowly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_slot_the_hoster_sees_one_connection() {
    let o = Origin::start(|req| {
        if req.path() == "/refuses-head" {
            return match req.method.as_str() {
                "HEAD" => Resp::new(405, Body::Empty { content_length: Some(0) }).into(),
                // The range ignored, the whole small body sent slowly.
                _ => Resp::new(200, Body::Slow { len: 12_000, piece: 3_000, pause: Duration::from_millis(60) })
                    .header("Content-Type", "video/mp4")
                    .header("Cache-Control", "no-store")
                    .into(),
            };
        }
        let i: u64 = req.path().trim_start_matches("/seg").trim_end_matches(".ts").parse().unwrap_or(0);
        serve_bytes(req, &pattern(i * SEG, SEG), Some("video/mp2t")).header("Cache-Control", "no-store").into()
    })
    .await;
    let p = proxy("upstream: {max_connections_per_host: 1}\n").await;
    let head = get(p.addr(), "HEAD", &relay_path("v.mp4", &o.url("/refuses-head")), &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("12000"));
    let players: Vec<_> = (0..6u64)
        .map(|n| {
            let (addr, base) = (p.addr(), o.url(""));
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                for i in (0..8).map(|k| n * 8 + k) {
                    let got = c.request("GET", &relay_path("s.ts", &format!("{base}/seg{i}.ts")), &[]).await;
                    assert_eq!(got.status, 200);
                    assert_body(&got.body, &pattern(i * SEG, SEG));
                }
            })
        })
        .collect();
    for pl in players {
        pl.await.unwrap();
    }
    assert_eq!(o.requests().len(), 2 + 48);
    assert_eq!(o.max_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(o.connections.load(Ordering::SeqCst), 1, "one connection, reused by every request");
}

/// Hosters throttle with nginx's own modules, so here nginx is the hoster:
/// `limit_conn` (4 requests at once, the rest refused with `509`, each
/// answer sent at 1 MiB/s so that requests overlap) and `limit_req` (10 a
/// second with a burst of 5, the rest refused with `429`), neither sending
/// `Retry-After`. For each, 24 players fetch 48 files through the proxy
/// (both kinds of player of [`crowd`]); nginx's own access log must show
/// every file served once, nothing arriving inside a pause (but what was
/// on its way), and for `limit_conn` at most one wave of refusals (one per
/// player). A rate limit cannot be learned as a number of connections: each
/// pause's burst ends in a refusal or a few (14-36 refusals in all in our runs),
/// bounded at 72. For scale, with the gate ignoring refusals (no pause, no
/// limit learned) nginx refused 60 (`limit_conn`) and 126-280 (`limit_req`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_limit_conn_and_limit_req_are_met_with_pauses() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    for i in 0..48 {
        std::fs::write(root.path().join(format!("seg{i}.ts")), pattern(i * SEG, SEG)).unwrap();
    }
    let (nginx, port) = process::nginx_on_a_free_port(|port| {
        format!(
            "limit_conn_zone $binary_remote_addr zone=conns:1m;\n\
         limit_req_zone $binary_remote_addr zone=rate:1m rate=10r/s;\n\
         log_format hoster '$msec $request_time $uri $status';\n\
         server {{ listen 127.0.0.1:{port}; access_log {{dir}}/access.log hoster;\n\
           location /conn/ {{ alias {root}/; limit_conn conns 4; limit_conn_status 509; limit_rate 1m; }}\n\
           location /rate/ {{ alias {root}/; limit_req zone=rate burst=5 nodelay; limit_req_status 429; }}\n\
         }}\n",
            root = root.path().display()
        )
    })
    .await;
    for (kind, refusal, most) in [("conn", 509, 24), ("rate", 429, 72)] {
        for player in [Player::Impatient, Player::Obedient] {
            let before = nginx.read("access.log").lines().count();
            let p = proxy("").await;
            crowd_of(&p, &format!("http://127.0.0.1:{port}/{kind}"), player).await;
            // Every player has its files; nginx logs each just after its answer.
            let served = |log: &str| log.lines().skip(before).filter(|l| l.ends_with(" 200")).count();
            let log = nginx.read_when("access.log", |log| served(log) >= 48).await;
            // (when it arrived, the file, the status)
            let seen: Vec<(f64, String, u16)> = log
                .lines()
                .skip(before)
                .map(|l| {
                    let f: Vec<_> = l.split(' ').collect();
                    let (end, took): (f64, f64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
                    (end - took, f[2].to_string(), f[3].parse().unwrap())
                })
                .collect();
            let mut served = std::collections::BTreeMap::new();
            for (_, file, _) in seen.iter().filter(|s| s.2 == 200) {
                *served.entry(file.as_str()).or_insert(0) += 1;
            }
            assert_eq!(served.len(), 48, "{kind}: every file served");
            assert!(served.values().all(|n| *n == 1), "{kind}: each file once: {served:?}");
            let refused: Vec<f64> = seen.iter().filter(|s| s.2 == refusal).map(|s| s.0).collect();
            assert_eq!(seen.len(), 48 + refused.len(), "{kind}: nothing but files and refusals: {seen:?}");
            assert!(!refused.is_empty(), "{kind}: nginx was asked too much at first");
            assert!(refused.len() <= most, "{kind}: at most {most} refusals, not {}", refused.len());
            for r in &refused {
                let early = seen.iter().filter(|s| s.0 > r + 0.05 && s.0 < r + 0.95).count();
                assert_eq!(early, 0, "{kind}: requests arrived inside the pause after a refusal");
            }
            eprintln!("nginx {kind}: {} refusals for 48 files", refused.len());
        }
    }
}

/// A crowd joins a fill that the hoster refuses. nginx allows one
/// request at a time from an address (`limit_conn 1`, `509`), and another
/// program on the same address is downloading from it. A first request
/// through the proxy is refused (its client gets that `509`), which starts
/// a cooldown and teaches the limit of one. Viewers who come meanwhile join
/// one fill, which waits out the cooldown, goes, and is refused again (the
/// other download still runs). That refusal is its own client's answer;
/// the viewers who joined the fill did not ask the hoster anything, so
/// they look again: one leads a new fill through the gate (after the
/// longer second cooldown) and the rest share it. So of those five, one
/// gets the `509` and four the file, which nginx sends once. HEADs waiting
/// for a HEAD the hoster refused likewise ask again in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_who_joined_a_refused_fill_get_the_file_from_the_next_one() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none() {
        return;
    }
    const LEN: u64 = 500_000;
    let root = pattern_files(&["ep.mp4", "head.mp4", "other.mp4"], LEN);
    let (nginx, port) = process::nginx_on_a_free_port(|port| {
        format!(
            "limit_conn_zone $binary_remote_addr zone=one:1m;\n\
             log_format hoster '$uri $request_method $status';\ntypes {{ video/mp4 mp4; }}\n\
             server {{ listen 127.0.0.1:{port}; root {root}; access_log {{dir}}/access.log hoster;\n\
               limit_conn one 1; limit_conn_status 509;\n\
               location = /other.mp4 {{ limit_rate 200k; }} }}\n",
            root = root.path().display()
        )
    })
    .await;
    let origin = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for (name, method) in [("ep.mp4", "GET"), ("head.mp4", "HEAD")] {
        // The cache's coalescing is what is checked: on in both runs of the suite.
        let p = proxy("cache: {}").await;
        let path = relay_path(name, &format!("http://{origin}/{name}"));
        // Another program on this address: nginx's one connection for 2.5 s.
        let other = tokio::spawn(async move { get(origin, "GET", "/other.mp4", &[]).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let first = get(p.addr(), method, &path, &[]).await;
        assert_eq!(first.status, 509, "{method}: the first request's own answer");
        let viewers: Vec<_> = (0..5u64)
            .map(|i| {
                let (addr, path) = (p.addr(), path.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50 * i)).await;
                    get(addr, method, &path, &[]).await
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for v in viewers {
            let got = v.await.unwrap();
            if got.status == 200 {
                assert_eq!(got.header("content-length"), Some(LEN.to_string().as_str()), "{method}");
                if method == "GET" {
                    assert_body(&got.body, &pattern(0, LEN));
                }
            }
            statuses.push(got.status);
        }
        statuses.sort();
        assert_eq!(statuses, [200, 200, 200, 200, 509], "{method}: one refusal, its own client's");
        assert_body(&other.await.unwrap().body, &pattern(0, LEN));
        let answered = format!("/{name} {method} 200");
        let log = nginx.read_when("access.log", |l| l.contains(&answered)).await;
        let asked: Vec<&str> = log.lines().filter(|l| l.starts_with(&format!("/{name} "))).collect();
        let refused = format!("/{name} {method} 509");
        assert_eq!(asked, [&refused, &refused, &answered], "{method}: refused twice, then answered once:\n{log}");
    }
}

/// A connection the proxy closes mid-body (its client left) still counts
/// at the hoster until the hoster sees it close, and behind a relay —
/// here HAProxy in TCP mode, as hosters put in front of nginx — a request
/// sent at once in its place on an idle kept-alive connection can get
/// there first. nginx allows one connection per address (`limit_conn 1`,
/// `509`). Eight rounds, each with a fresh proxy (cache off): a slow
/// download; a second file beside it is refused (the gate learns the
/// limit, and keeps the refused connection for reuse); a range waits its
/// turn; after the cooldown the download's client, which read everything
/// as it came, hangs up, and the range goes on the idle connection. It
/// must never be refused: the slot is given back once the close has
/// settled. (Without that, HAProxy in front of nginx refused 10-11 of 30
/// requests sent so.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_mid_body_settles_before_its_slot_is_reused() {
    if tools::needs("nginx", "apt-get install nginx-light").is_none()
        || tools::needs("haproxy", "apt-get install haproxy").is_none()
    {
        return;
    }
    const BIG: u64 = 4 << 20;
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("big.mp4"), pattern(0, BIG)).unwrap();
    std::fs::write(root.path().join("small.mp4"), pattern(7, 300_000)).unwrap();
    let (nginx, port) = process::nginx_on_a_free_port(|port| {
        format!(
            "limit_conn_zone $binary_remote_addr zone=one:1m;\n\
             log_format hoster '$uri $status \"$http_range\" c$connection';\n\
             server {{ listen 127.0.0.1:{port}; root {root}; access_log {{dir}}/access.log hoster;\n\
               limit_conn one 1; limit_conn_status 509; limit_rate 1m; }}\n",
            root = root.path().display()
        )
    })
    .await;
    let (_haproxy, hop) = process::on_a_free_port(
        |hop| {
            process::spawn_haproxy(&format!(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 listen hop\n  bind 127.0.0.1:{hop}\n  server nginx 127.0.0.1:{port}\n"
            ))
        },
        "haproxy.log",
    )
    .await;
    let url = |f: &str| relay_path(f, &format!("http://127.0.0.1:{hop}/{f}"));
    for round in 0..8 {
        let p = proxy("cache: {max_bytes: 0}\n").await;
        // The download, read as it comes (as a player fills its buffer),
        // so nginx paces it (`limit_rate`) rather than waits for the reader.
        let mut c = Client::connect(p.addr()).await;
        c.send_raw(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", url("big.mp4")).as_bytes()).await;
        let mut sock = c.into_inner();
        let download = tokio::spawn(async move {
            let mut buf = [0u8; 65536];
            let until = Instant::now() + Duration::from_millis(1300);
            while Instant::now() < until {
                let n = tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await.unwrap();
                assert!(n > 0, "the download ended early");
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Beside it: refused, and the gate learns the host's limit of one.
        let refused = get(p.addr(), "GET", &url("small.mp4"), &[]).await;
        assert_eq!(refused.status, 509, "round {round}");
        // A range waits its turn behind the download.
        let range = tokio::spawn({
            let (addr, path) = (p.addr(), url("small.mp4"));
            async move { get(addr, "GET", &path, &[("Range", "bytes=1000-1999")]).await }
        });
        // Past the cooldown, the download's client hangs up.
        download.await.unwrap();
        let got = range.await.unwrap();
        assert_eq!(got.status, 206, "round {round}: the range, sent where the download was, was refused");
        assert_body(&got.body, &pattern(7 + 1000, 1000));
    }
    // Per round: the download, one refusal, the range.
    let log = nginx.read_when("access.log", |l| l.lines().count() >= 24).await;
    let refusals = log.lines().filter(|l| l.contains(" 509 ")).count();
    assert_eq!(refusals, 8, "{log}");
}
