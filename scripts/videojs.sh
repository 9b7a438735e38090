#!/usr/bin/env bash
# Prints the path of video.js (pinned) for tests/players.rs: its
# dist/video.min.js, which bundles its HLS engine (VHS, with its own
# playlist parser and mux.js transmuxer), fetched once from the npm
# registry (scripts/npm-dist.sh).
exec "$(dirname "$0")/npm-dist.sh" video.js 8.24.1 ae4c208cb6e8d1f42af45009bfcaead2e5e6ee2de58cf7a67b9413e7ff87a5fd video.min.js
