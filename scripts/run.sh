#!/usr/bin/env bash
# Runs the proxy with the default configuration (installs cmake if missing:
# pingora-core builds zlib-ng with it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh cmake
exec cargo run --release -- --config "${1:-conf/anibridge-proxy.yaml}"
