#!/usr/bin/env bash
# The whole test suite: unit, integration (real proxy, real local origins,
# real players: ffmpeg, mpv, VLC, GStreamer, Kodi, hls.js, Shaka Player
# and video.js in Chromium, streamlink, yt-dlp), property tests, and the
# criterion benches run once as tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh cmake ffmpeg nginx-light ca-certificates openssl curl unzip \
  mpv vlc-bin vlc-plugin-base chromium streamlink yt-dlp microsocks tinyproxy haproxy caddy \
  gstreamer1.0-tools gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav \
  kodi kodi-inputstream-adaptive xvfb strace firefox-esr
# Traefik, for tests/reverse_proxies.rs (not packaged by Debian), and
# hls.js, Shaka Player and video.js for tests/players.rs (from the npm
# registry), all pinned.
TRAEFIK="${TRAEFIK:-$(scripts/traefik.sh)}"
HLSJS="${HLSJS:-$(scripts/hlsjs.sh)}"
SHAKA="${SHAKA:-$(scripts/shaka.sh)}"
VIDEOJS="${VIDEOJS:-$(scripts/videojs.sh)}"
# A current FFmpeg beside Debian's, for tests/players.rs (from PyPI, pinned).
FFMPEG_CURRENT="${FFMPEG_CURRENT:-$(scripts/ffmpeg-current.sh)}"
export TRAEFIK HLSJS SHAKA VIDEOJS FFMPEG_CURRENT
# Everything the tests run was installed above: a missing tool is a failure
# here, not a skip (tests/common/tools.rs).
export ANIBRIDGE_TEST_TOOLS=required
# Loopback only: make sure no proxy variable sends test traffic elsewhere.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy
export PATH="$PATH:/usr/sbin"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Formatting (rustfmt.toml), lints and the developer docs' links, then
# benches (each runs once, as a smoke test), then every test target.
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked --document-private-items
cargo test --benches --locked
cargo test --lib --bins --tests --locked 2>&1 | tee "$log"
# The integration tests once more with the shared cache off (every proxy
# they start gets cache.max_bytes: 0, tests/common): without it the proxy
# behaves exactly as it did before the cache.
ANIBRIDGE_TEST_CACHE=off cargo test --tests --locked 2>&1 | tee -a "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
# The container image: the Dockerfile built and run with Podman as a user's
# docker build / docker run / docker compose up would (scripts/container.sh).
scripts/container.sh
