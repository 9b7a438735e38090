#!/usr/bin/env bash
# Resumption soak: nginx behind a connection-cutting TCP proxy, the release
# binary in front, every byte checked (see benches/load/cut_soak.py).
#   benches/load/cut_soak.sh [--seconds 60] [--clients 40] [--cut-rate 0.5] [--max-cut BYTES] [--cache on|small|off]
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/deps.sh cmake nginx-light
export PATH="$PATH:/usr/sbin"
cargo build --release --locked --bin anibridge-proxy
exec python3 benches/load/cut_soak.py "$@"
