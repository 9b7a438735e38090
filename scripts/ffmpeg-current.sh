#!/usr/bin/env bash
# Prints the path of a current FFmpeg (9.0.2) for tests/players.rs, beside
# Debian's 5.1: Jellyfin plays through its own recent build, not Debian's.
# PyPI's imageio-ffmpeg wheel carries a static build (scripts/wheel-bin.sh:
# pinned, checked, only the binary unpacked).
set -euo pipefail
VERSION=0.8.1
case "$(uname -m)" in
  x86_64)
    url=https://files.pythonhosted.org/packages/de/0f/49292fbef69ee10ebcf97bb741602521caafcc6966d5fa1a2b868cc15655/imageio_ffmpeg-0.8.1-py3-none-manylinux_2_28_x86_64.whl
    sha=050d6850601c3b3890bd2b28306f3b842b3daea390a561101174375a1c460bda
    file=ffmpeg-linux-x86_64-v9.0.2 ;;
  *)
    echo "no imageio-ffmpeg $VERSION wheel pinned for $(uname -m)" >&2
    exit 1 ;;
esac
exec "$(dirname "$0")/wheel-bin.sh" "$url" "$sha" "imageio_ffmpeg/binaries/$file" "imageio-ffmpeg-$VERSION" ffmpeg
