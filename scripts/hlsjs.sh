#!/usr/bin/env bash
# Prints the path of hls.js (pinned) for tests/players.rs, fetched once from
# the npm registry into ~/.cache and checked against its SHA-256. Only the
# package's dist/hls.min.js is kept; nothing is installed.
set -euo pipefail
VERSION=1.6.15
SHA=d1e3fb5d876fae924a1073d8c6cef04c5ccd327a4bddc9e8ece575b0aad68742
dir="${XDG_CACHE_HOME:-$HOME/.cache}/anibridge-proxy/hls.js-$VERSION"
js="$dir/hls.min.js"
if [ ! -s "$js" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching hls.js $VERSION" >&2
  curl -fsSL --retry 3 -o "$tmp/hls.tgz" "https://registry.npmjs.org/hls.js/-/hls.js-$VERSION.tgz"
  echo "$SHA  $tmp/hls.tgz" | sha256sum -c --quiet
  tar -xzf "$tmp/hls.tgz" -C "$tmp" package/dist/hls.min.js
  install -m 0644 "$tmp/package/dist/hls.min.js" "$js"
fi
echo "$js"
