#!/usr/bin/env bash
# Prints the path of hls.js (pinned) for tests/players.rs, fetched once from
# the npm registry into ~/.cache and checked against its SHA-256. Only the
# package's dist/hls.min.js is unpacked; nothing is installed.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=1.6.15
SHA=d1e3fb5d876fae924a1073d8c6cef04c5ccd327a4bddc9e8ece575b0aad68742
dir="${XDG_CACHE_HOME:-$HOME/.cache}/anibridge-proxy/hls.js-$VERSION"
js="$dir/hls.min.js"
if [ ! -s "$js" ]; then
  ./fetch.sh "https://registry.npmjs.org/hls.js/-/hls.js-$VERSION.tgz" "$SHA" "$dir/hls.js.tgz"
  tar -xzf "$dir/hls.js.tgz" -C "$dir" --strip-components=2 package/dist/hls.min.js
  rm "$dir/hls.js.tgz"
fi
echo "$js"
