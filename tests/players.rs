//! Real players on a progressive MP4 through the relay: ffprobe reads its
//! duration and a seeking ffmpeg decodes from the middle. The file keeps its
//! index (moov) at the end, as ffmpeg writes it by default, so both must
//! jump around the file with Range requests, as players do on every hoster.

mod common;

use std::sync::Arc;

use common::*;

/// A 6 s H.264 MP4 with its moov atom after the media data.
fn make_mp4() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v.mp4");
    let status = std::process::Command::new(tool("ffmpeg"))
        .args(["-v", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc=duration=6:size=320x240:rate=25"])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "25"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "ffmpeg could not generate the test file");
    let data = std::fs::read(&out).unwrap();
    let (moov, mdat) = (find(&data, b"moov").unwrap(), find(&data, b"mdat").unwrap());
    assert!(moov > mdat, "the test needs the index at the end of the file");
    data
}

async fn run(program: &'static str, args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || std::process::Command::new(tool(program)).args(&args).output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffprobe_and_a_seeking_ffmpeg_read_a_progressive_mp4_through_the_relay() {
    let data = Arc::new(make_mp4());
    let d = data.clone();
    // No Content-Type upstream: the hint's extension names it.
    let o = Origin::start(move |req| serve_bytes(req, &d, None).into()).await;
    let p = Proxy::start("auth: {mode: token}\negress: {allow_cidrs: [\"127.0.0.1/32\"]}\n").await;
    let path = signed_relay_path("episode.mp4", &o.url("/v"), Some(now() + 300));
    let url = format!("http://{}{path}", p.addr());

    let got = get(p.addr(), "HEAD", &path, &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("video/mp4"));
    assert_eq!(got.header("content-length"), Some(data.len().to_string().as_str()));

    let probe = run(
        "ffprobe",
        ["-v", "error", "-show_entries", "format=duration:stream=codec_name,width,height", "-of", "default=nw=1"]
            .iter()
            .map(|s| s.to_string())
            .chain([url.clone()])
            .collect(),
    )
    .await;
    let text = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.status.success(), "ffprobe failed: {}", String::from_utf8_lossy(&probe.stderr));
    assert!(text.contains("codec_name=h264") && text.contains("width=320") && text.contains("height=240"), "{text}");
    let duration: f64 =
        text.lines().find_map(|l| l.strip_prefix("duration=")).and_then(|v| v.parse().ok()).expect("a duration");
    assert!((duration - 6.0).abs() < 0.1, "duration {duration}");
    // To find the index at the end, ffprobe had to ask for a later range.
    let ranged_past_start = |reqs: &[SeenRequest]| {
        reqs.iter().filter_map(|r| r.header("range")).any(|r| !r.starts_with("bytes=0-") && r.starts_with("bytes="))
    };
    assert!(
        ranged_past_start(&o.requests()),
        "{:?}",
        o.requests().iter().map(|r| r.header("range")).collect::<Vec<_>>()
    );

    // Seek to 4 s and decode one second: every frame must decode cleanly.
    let before = o.requests().len();
    let decode = run(
        "ffmpeg",
        ["-v", "error", "-xerror", "-ss", "4", "-i", &url, "-t", "1", "-f", "framemd5", "-"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    )
    .await;
    assert!(decode.status.success(), "ffmpeg failed: {}", String::from_utf8_lossy(&decode.stderr));
    let frames = String::from_utf8_lossy(&decode.stdout).lines().filter(|l| !l.starts_with('#')).count();
    assert!((24..=26).contains(&frames), "decoded {frames} frames of one second at 25 fps");
    assert!(ranged_past_start(&o.requests()[before..]));
}
