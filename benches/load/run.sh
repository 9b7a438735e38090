#!/usr/bin/env bash
# Load benchmark: a static nginx origin, nginx as a tuned reverse proxy, and
# anibridge-proxy, side by side in one run on 127.0.0.1. Writes BENCHMARKS.md.
#   benches/load/run.sh [--quick] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps.sh cmake nginx-light wrk curl
export PATH="$PATH:/usr/sbin"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --locked --bin anibridge-proxy --example bare_pingora
exec python3 benches/load/run.py "$@"
