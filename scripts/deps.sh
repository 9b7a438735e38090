#!/usr/bin/env bash
# Installs the Debian packages named as arguments when their command is
# missing. Usage: scripts/deps.sh cmake [ffmpeg nginx ...]
set -euo pipefail
missing=()
for pkg in "$@"; do
  cmd="$pkg"
  case "$pkg" in
    nginx-light) cmd=nginx ;;
    ca-certificates) cmd=update-ca-certificates ;;
  esac
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing: ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
