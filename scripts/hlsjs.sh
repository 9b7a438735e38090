#!/usr/bin/env bash
# Prints the path of hls.js (pinned) for tests/players.rs: its
# dist/hls.min.js, fetched once from the npm registry (scripts/npm-dist.sh).
exec "$(dirname "$0")/npm-dist.sh" hls.js 1.6.15 d1e3fb5d876fae924a1073d8c6cef04c5ccd327a4bddc9e8ece575b0aad68742 hls.min.js
