#!/usr/bin/env bash
# Prints the path of Shaka Player (pinned) for tests/players.rs: its
# dist/shaka-player.compiled.js, fetched once from the npm registry
# (scripts/npm-dist.sh).
exec "$(dirname "$0")/npm-dist.sh" shaka-player 5.2.12 0c09816ea0b1399434bb6423b6a955f22e75b1886e4d394934ec73b9b38e3018 shaka-player.compiled.js
