#!/usr/bin/env bash
# Prints the path of Shaka Player (pinned) for tests/players.rs, fetched once
# from the npm registry into ~/.cache and checked against its SHA-256. Only
# the package's dist/shaka-player.compiled.js is unpacked; nothing is
# installed.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=5.2.12
SHA=0c09816ea0b1399434bb6423b6a955f22e75b1886e4d394934ec73b9b38e3018
dir="${XDG_CACHE_HOME:-$HOME/.cache}/anibridge-proxy/shaka-player-$VERSION"
js="$dir/shaka-player.compiled.js"
if [ ! -s "$js" ]; then
  ./fetch.sh "https://registry.npmjs.org/shaka-player/-/shaka-player-$VERSION.tgz" "$SHA" "$dir/shaka-player.tgz"
  tar -xzf "$dir/shaka-player.tgz" -C "$dir" --strip-components=2 package/dist/shaka-player.compiled.js
  rm "$dir/shaka-player.tgz"
fi
echo "$js"
