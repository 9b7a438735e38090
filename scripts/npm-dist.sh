#!/usr/bin/env bash
# Prints the path of one file of a pinned npm package's dist/ directory,
# fetched once from the npm registry into ~/.cache and checked against the
# package's SHA-256. Only that file is unpacked; nothing is installed.
# Usage: scripts/npm-dist.sh PACKAGE VERSION SHA256 FILE
set -euo pipefail
cd "$(dirname "$0")"
name=$1 version=$2 sha=$3 file=$4
dir="${XDG_CACHE_HOME:-$HOME/.cache}/anibridge-proxy/$name-$version"
out="$dir/$file"
if [ ! -s "$out" ]; then
  ./fetch.sh "https://registry.npmjs.org/$name/-/$name-$version.tgz" "$sha" "$dir/$name.tgz"
  tar -xzf "$dir/$name.tgz" -C "$dir" --strip-components=2 "package/dist/$file"
  rm "$dir/$name.tgz"
fi
echo "$out"
