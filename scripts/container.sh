#!/usr/bin/env bash
# The container image, built and run the way a user's `docker build`,
# `docker run` and `docker compose up` would, with Debian's Podman:
#   - the Dockerfile builds from the repository as shipped (--locked), and
#     the layers it adds to its runtime base stay within 30 MB;
#   - the README's `podman run` (the shipped config, secret from the
#     environment, read-only, published on 127.0.0.1): it runs as uid 10001,
#     the image's HEALTHCHECK passes, `podman stop` exits 0;
#   - a mounted config and a mounted secret file, against nginx on the host:
#     a signed ranged GET, a signed HLS playlist and its segment, and an
#     HTTPS hoster, byte for byte; `podman stop` during a slow download lets
#     it finish and the container exit 0;
#   - a bad mounted config: a non-zero exit, with the file, the key and the
#     reason in `podman logs`;
#   - compose.yaml with podman-compose.
# Everything runs in a Podman store of its own under a temporary directory,
# removed at the end with every image, container and network it made.
#
# This machine's needs, not the user's (kept out of the commands the README
# shows): no container registry can be reached, so the two base images the
# Dockerfile names are made locally with mmdebstrap (`debian:bookworm-slim`,
# and `rust:1-bookworm` from Debian's gcc and this machine's own Rust
# toolchain); containers start only with runc and no default rlimits
# (CONTAINERS_CONF); and cargo inside the build reaches the crate registry
# only with the host's CA bundle mounted (`-v /etc/ssl/certs:...`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
started=$(date +%s)

say() { printf 'container: %s\n' "$*"; }
fail() {
  printf 'container: FAILED: %s\n' "$*" >&2
  exit 1
}

# --- Prerequisites --------------------------------------------------------
if ! scripts/deps.sh podman runc netavark aardvark-dns iptables catatonit \
  mmdebstrap podman-compose nginx-light curl jq openssl; then
  fail "could not install the prerequisites (podman, runc, mmdebstrap, podman-compose, nginx, curl, jq, openssl): run as root on Debian, or install them"
fi
export PATH="$PATH:/usr/sbin"
for tool in podman runc mmdebstrap podman-compose nginx curl jq openssl rustc; do
  command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install the package of that name; nginx is nginx-light)"
done
sysroot=$(rustc --print sysroot)
[ -x "$sysroot/bin/cargo" ] || fail "no cargo beside rustc in $sysroot (the builder image is made from it)"

# --- A Podman of our own ----------------------------------------------------
work=$(mktemp -d /var/tmp/anibridge-container.XXXXXX)
chmod 755 "$work"
nginx_pid=""
ours="" # set once podman is known to use the store in $work, and only then cleaned
project=$(basename "$repo")
cleanup() {
  local rc=$?
  set +e
  if [ $rc -ne 0 ] && [ -n "$ours" ]; then
    # Podman's own complaints (here: no systemd for health check timers).
    [ -f "$work/podman.err" ] && tail -20 "$work/podman.err" >&2
    for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null); do
      echo "--- podman logs $c (last 30 lines)" >&2
      podman logs --tail 30 "$c" >&2 2>&1
    done
  fi
  if [ -n "$ours" ]; then
    (cd "$repo" && podman-compose down >/dev/null 2>&1)
    podman rm -a -f -t 0 >/dev/null 2>&1
    podman network rm -f "${project}_default" >/dev/null 2>&1
    podman rmi -a -f >/dev/null 2>&1
  fi
  [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
export CONTAINERS_STORAGE_CONF="$work/storage.conf" CONTAINERS_CONF="$work/containers.conf"
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/storage"
runroot = "$work/run"
EOF
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
[ "$(podman info --format '{{.Store.GraphRoot}}')" = "$work/storage" ] || fail "podman does not use the store in $work"
ours=1

# The command lines the README's container section shows, run as shown (with
# a free host port where the README has 8080, and this machine's extras).
readme_shows() {
  grep -qF -- "$1" README.md || fail "README.md no longer shows: $1"
}
build_line='podman build --format docker -t anibridge-proxy .'
run_line='podman run -d --name anibridge-proxy --read-only -p 127.0.0.1:8080:8080 -e ANIBRIDGE_PROXY_SECRET'
health_line='podman healthcheck run anibridge-proxy'
compose_line='podman-compose up -d'
for line in "$build_line" "$run_line" "$health_line" "$compose_line"; do readme_shows "$line"; done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# As the README: the secret in the environment, which `podman run -e` and
# compose.yaml pass on.
export ANIBRIDGE_PROXY_SECRET
ANIBRIDGE_PROXY_SECRET=$(openssl rand -hex 32)
secret=$ANIBRIDGE_PROXY_SECRET

# --- The base images --------------------------------------------------------
t=$(date +%s)
mmdebstrap --quiet --variant=minbase bookworm - | podman import -q - localhost/debian:bookworm-slim >/dev/null
mmdebstrap --quiet --variant=minbase --include=ca-certificates,gcc,libc6-dev,make,pkg-config \
  --customize-hook="copy-in $sysroot/bin $sysroot/lib $sysroot/libexec $sysroot/etc /usr/local" \
  bookworm - | podman import -q - localhost/rust:1-bookworm >/dev/null
say "base images made in $(($(date +%s) - t)) s"

# --- Build ------------------------------------------------------------------
t=$(date +%s)
# shellcheck disable=SC2086 # the README's line, split as the shell would
podman build --network host -v /etc/ssl/certs:/etc/ssl/certs:ro ${build_line#podman build } >"$work/build.log" 2>&1 ||
  {
    tail -40 "$work/build.log" >&2
    fail "podman build failed"
  }
build_s=$(($(date +%s) - t))
base_size=$(podman image inspect --format '{{.Size}}' localhost/debian:bookworm-slim)
image_size=$(podman image inspect --format '{{.Size}}' anibridge-proxy)
added=$((image_size - base_size))
say "image built in $build_s s; its layers add $((added / 1000000)) MB to debian:bookworm-slim ($added bytes)"
[ "$added" -le 30000000 ] || fail "the image adds $added bytes to its base (limit 30 MB)"
[ "$(podman image inspect --format '{{.Config.User}}' anibridge-proxy)" = "10001:10001" ] || fail "the image does not run as 10001:10001"
bundle=$(podman create anibridge-proxy 2>>"$work/podman.err")
podman cp "$bundle:/etc/ssl/certs/ca-certificates.crt" "$work/bundle.crt"
podman rm "$bundle" >/dev/null 2>>"$work/podman.err"
n=$(grep -c 'BEGIN CERTIFICATE' "$work/bundle.crt")
[ "$n" -ge 100 ] || fail "the image's CA bundle holds $n certificates"
say "the image carries a CA bundle of $n certificates"

# Waits until http://127.0.0.1:$1/ answers anything.
wait_http() {
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  fail "nothing answers on 127.0.0.1:$1"
}
exit_code() { podman inspect --format '{{.State.ExitCode}}' "$1"; }
status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
# A signed relay path, as docs/routes-and-signing.md signs one in the shell.
enc() { jq -rn --arg v "$1" '$v|@uri' | sed 's/%20/+/g'; }
relay_path() {
  local name=$1 u=$2 exp query sig
  exp=$(($(date +%s) + 3600))
  query="exp=$exp&u=$(enc "$u")"
  sig=$(printf '%s' "$query" | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)
  printf '/strm/proxy/%s?%s&sig=%s' "$name" "$query" "$sig"
}

# --- The README's run: the shipped config -----------------------------------
port=$(free_port)
run_args=${run_line#podman }
run_args=${run_args//127.0.0.1:8080:/127.0.0.1:$port:}
# shellcheck disable=SC2086
podman $run_args anibridge-proxy >/dev/null 2>>"$work/podman.err"
wait_http "$port"
pid=$(podman inspect --format '{{.State.Pid}}' anibridge-proxy)
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
[ "$uid" = 10001 ] || fail "the proxy runs as uid $uid"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' anibridge-proxy)" = true ] || fail "the root filesystem is writable"
# shellcheck disable=SC2086
podman ${health_line#podman } >/dev/null 2>>"$work/podman.err" || fail "podman healthcheck run failed on the shipped config"
s=$(status "http://127.0.0.1:$port/strm/proxy/x.ts?u=http%3A%2F%2Fexample.com%2Fx.ts")
[ "$s" = 401 ] || fail "an unsigned request got $s, not 401 (token mode)"
s=$(status "http://127.0.0.1:$port$(relay_path x.ts http://127.0.0.1:9/x.ts)")
[ "$s" = 403 ] || fail "a signed request for a loopback address got $s, not 403 (egress policy)"
t=$(date +%s)
podman stop anibridge-proxy >/dev/null 2>>"$work/podman.err"
[ "$(exit_code anibridge-proxy)" = 0 ] || fail "the shipped container exited $(exit_code anibridge-proxy) on podman stop"
podman rm anibridge-proxy >/dev/null 2>>"$work/podman.err"
say "shipped config: uid 10001, read-only, healthy, 401 unsigned, 403 loopback; stopped (exit 0) in $(($(date +%s) - t)) s"

# --- An origin on the host: nginx, plain and TLS ------------------------------
www="$work/www"
mkdir -p "$www/hls" "$work/nginx"
head -c 3145728 /dev/urandom >"$www/media.bin"
head -c 1500000 /dev/urandom >"$www/slow.bin"
head -c 376000 /dev/urandom >"$www/hls/seg0.ts"
head -c 188000 /dev/urandom >"$www/hls/seg1.ts"
printf '#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXTINF:4.0,\nseg0.ts\n#EXTINF:2.0,\nseg1.ts\n#EXT-X-ENDLIST\n' >"$www/hls/index.m3u8"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=anibridge-test-ca \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$work/leaf.key" -out "$work/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
  -extfile "$work/leaf.ext" -out "$work/leaf.pem" 2>/dev/null
chmod 644 "$work/ca.pem"
origin=$(free_port)
origin_tls=$(free_port)
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 256; }
http {
  include /etc/nginx/mime.types;
  default_type application/octet-stream;
  access_log $work/nginx/access.log;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  server {
    listen 127.0.0.1:$origin;
    listen 127.0.0.1:$origin_tls ssl;
    ssl_certificate $work/leaf.pem;
    ssl_certificate_key $work/leaf.key;
    root $www;
    location = /slow.bin { limit_rate 500k; }
  }
}
EOF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
nginx_pid=$!
wait_http "$origin"

# --- A mounted config and secret file, against the host's origin --------------
port=$(free_port)
admin=$(free_port)
sed -e "s/^listen: .*/listen: \"127.0.0.1:$port\"/" -e "s/^admin_listen: .*/admin_listen: \"127.0.0.1:$admin\"/" \
  conf/container.yaml >"$work/proxy.yaml"
printf 'egress:\n  allow_cidrs: ["127.0.0.0/8"]\n' >>"$work/proxy.yaml"
printf '%s\n' "$secret" >"$work/secret"
chmod 644 "$work/proxy.yaml" "$work/secret"
podman run -d --name mounted --read-only --network host \
  -v "$work/proxy.yaml:/etc/anibridge-proxy/anibridge-proxy.yaml:ro" \
  -v "$work/secret:/run/secrets/anibridge_proxy_secret:ro" \
  -e ANIBRIDGE_PROXY_SECRET_FILE=/run/secrets/anibridge_proxy_secret \
  -v "$work/ca.pem:/etc/anibridge-proxy/ca.pem:ro" -e SSL_CERT_FILE=/etc/anibridge-proxy/ca.pem \
  anibridge-proxy >/dev/null 2>>"$work/podman.err"
wait_http "$port"
[ "$(curl -s "http://127.0.0.1:$admin/healthz")" = '{"status":"ok"}' ] || fail "/healthz on the admin port"
podman healthcheck run mounted >/dev/null 2>>"$work/podman.err" || fail "podman healthcheck run failed on a mounted config"
proxy="http://127.0.0.1:$port"

# A signed ranged GET: 206, its Content-Range, the bytes.
code=$(curl -s -D "$work/h" -o "$work/got" -r 1000-200999 -w '%{http_code}' \
  "$proxy$(relay_path media.bin "http://127.0.0.1:$origin/media.bin")")
[ "$code" = 206 ] || fail "a ranged GET got $code"
grep -qi '^content-range: bytes 1000-200999/3145728' "$work/h" || fail "Content-Range: $(grep -i content-range "$work/h")"
[ "$(stat -c %s "$work/got")" = 200000 ] && cmp -s -i 1000:0 -n 200000 "$www/media.bin" "$work/got" ||
  fail "the ranged body differs from the origin's bytes 1000-200999"

# A signed playlist: its type, children through the proxy, a child's bytes.
code=$(curl -s -D "$work/h" -o "$work/index.m3u8" -w '%{http_code}' \
  "$proxy$(relay_path index.m3u8 "http://127.0.0.1:$origin/hls/index.m3u8")")
[ "$code" = 200 ] || fail "the playlist got $code"
grep -qi '^content-type: application/vnd.apple.mpegurl' "$work/h" || fail "playlist $(grep -i content-type "$work/h")"
# (Root-relative: the container config sets no public_base_url.)
children=$(grep -v '^#' "$work/index.m3u8")
[ "$(printf '%s\n' "$children" | grep -c '^/strm/proxy/seg[01].ts?u=.*&sig=')" = 2 ] ||
  fail "children not rewritten through the proxy: $children"
code=$(curl -s -o "$work/seg1.ts" -w '%{http_code}' "$proxy$(printf '%s\n' "$children" | sed -n 2p)")
[ "$code" = 200 ] && cmp -s "$www/hls/seg1.ts" "$work/seg1.ts" || fail "the second segment through the rewritten playlist ($code)"

# An HTTPS hoster, verified against the CA the operator mounted.
code=$(curl -s -o "$work/got" -w '%{http_code}' "$proxy$(relay_path media.bin "https://localhost:$origin_tls/media.bin")")
[ "$code" = 200 ] && cmp -s "$www/media.bin" "$work/got" || fail "the HTTPS hoster's file ($code)"
say "mounted config and secret file: ranged GET, playlist and segment, HTTPS hoster: byte-exact"

# `podman stop` during a 3 s download: it finishes, the container exits 0.
curl -s -o "$work/slow.got" -w '%{http_code}' "$proxy$(relay_path slow.bin "http://127.0.0.1:$origin/slow.bin")" \
  >"$work/slow.code" &
curl_pid=$!
sleep 1
t=$(date +%s)
podman stop mounted >/dev/null 2>>"$work/podman.err"
stop_s=$(($(date +%s) - t))
wait "$curl_pid" || true
[ "$(cat "$work/slow.code")" = 200 ] && cmp -s "$www/slow.bin" "$work/slow.got" ||
  fail "the download under way at podman stop did not finish whole ($(cat "$work/slow.code"))"
[ "$(exit_code mounted)" = 0 ] || fail "the container exited $(exit_code mounted) on podman stop"
# (Into a file first: with pipefail, `podman logs | grep -q` fails whenever grep
# stops reading at its match before podman has written the rest.)
podman logs mounted >"$work/mounted.log" 2>&1
grep -q 'shutdown requested' "$work/mounted.log" || fail "no drain in the logs"
podman rm mounted >/dev/null 2>>"$work/podman.err"
say "podman stop during a download: it finished whole, exit 0 after $stop_s s"

# --- A bad config fails fast, saying where and why ----------------------------
printf 'auth:\n  mode: token\nupstream:\n  read_timout: "5s"\n' >"$work/bad.yaml"
chmod 644 "$work/bad.yaml"
rc=0
podman run --name bad --read-only -e ANIBRIDGE_PROXY_SECRET="$secret" \
  -v "$work/bad.yaml:/etc/anibridge-proxy/anibridge-proxy.yaml:ro" anibridge-proxy >/dev/null 2>&1 || rc=$?
[ "$rc" != 0 ] || fail "a bad config exited 0"
logs=$(podman logs bad 2>&1)
for want in /etc/anibridge-proxy/anibridge-proxy.yaml upstream.read_timout 'unknown field'; do
  grep -qF "$want" <<<"$logs" || fail "podman logs of a bad config lack '$want': $logs"
done
podman rm bad >/dev/null 2>>"$work/podman.err"
say "a bad config: exit $rc, and podman logs say: $logs"

# --- compose.yaml -----------------------------------------------------------
export ANIBRIDGE_PROXY_PORT
ANIBRIDGE_PROXY_PORT=$(free_port)
port=$ANIBRIDGE_PROXY_PORT
$compose_line >"$work/compose.log" 2>&1 ||
  {
    cat "$work/compose.log" >&2
    fail "$compose_line"
  }
wait_http "$port"
name=$(podman ps --format '{{.Names}}' | grep anibridge-proxy | head -1)
[ -n "$name" ] || fail "no anibridge-proxy container after $compose_line"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$name")" = true ] || fail "compose: the root filesystem is writable"
podman healthcheck run "$name" >/dev/null 2>>"$work/podman.err" || fail "podman healthcheck run failed under compose"
s=$(status "http://127.0.0.1:$port$(relay_path x.ts http://127.0.0.1:9/x.ts)")
[ "$s" = 403 ] || fail "compose: a signed loopback request got $s (the secret from the environment did not arrive?)"
podman-compose down >/dev/null 2>&1 || fail "podman-compose down"
say "compose.yaml: up, read-only, healthy, signed with the secret from the environment, down"

say "all checks passed in $(($(date +%s) - started)) s (image build $build_s s)"
