#!/usr/bin/env bash
# Downloads URL to OUT unless OUT is there already, and checks its SHA-256.
# Usage: scripts/fetch.sh URL SHA256 OUT
set -euo pipefail
url=$1 sha=$2 out=$3
if [ ! -s "$out" ]; then
  mkdir -p "$(dirname "$out")"
  echo "fetching $url" >&2
  curl -fsSL --retry 3 -o "$out.part" "$url"
  mv "$out.part" "$out"
fi
if ! echo "$sha  $out" | sha256sum -c --quiet; then
  rm -f "$out"
  echo "checksum mismatch: $url" >&2
  exit 1
fi
