#!/usr/bin/env python3
"""Side-by-side load benchmark: direct origin vs nginx proxy vs anibridge-proxy,
with a bare Pingora proxy (benches/load/bare_pingora.rs) as the reference
for what Pingora itself costs in phases 1 and 2.

Everything runs on 127.0.0.1 in one run, every phase bounded (<= 60 s):
  1. small Range GETs (64 KiB of 1 MiB files, random offsets), 64 connections;
     anibridge-proxy with the cache off (the relay, the same job as nginx
     without a cache), with the cache on and nothing cacheable (the miss
     path: origin says no-store), and answering from its cache against
     nginx answering from proxy_cache; then whole 1 MiB files from memory
     (stored HLS segments), anibridge-proxy's cache against proxy_cache
  2. one 1 GiB download (interleaved rounds, median)
  3. 500 slow clients (~64 KiB/s each) of 100 MiB files for 30 s: peak RSS
     and the upstream read rate seen at the origin side
  4. CPU seconds per GB relayed (from phase 2)
  5. a crowd: 50 viewers x 20 segments of 1 MiB from a slow origin (first
     byte after 200 ms, 4 MiB/s per connection): GETs the origin served per
     segment and the time to each viewer's first body byte, for
     anibridge-proxy's cache, nginx with proxy_cache_lock, and no cache
Prints the tables and writes BENCHMARKS.md (run from the repository root).
"""
import argparse, asyncio, hashlib, hmac, json, os, platform, re, shutil, signal
import socket, statistics, subprocess, tempfile, time
from urllib.parse import urlencode

ROOT = os.getcwd()
BIN = os.path.join(ROOT, "target/release/anibridge-proxy")
BARE = os.path.join(ROOT, "target/release/examples/bare_pingora")
SECRET = "bench-secret"
ORIGIN, NGINX, PROXY, ADMIN, PINGORA = 18081, 18082, 18083, 18084, 18085
COMPARE, COMPARE_ADMIN = 18086, 18087
MISS, MISS_ADMIN, CACHED, CACHED_ADMIN, NGINX_CACHE = 18088, 18089, 18090, 18091, 18092
SLOW_ORIGIN, NGINX_LOCK = 18093, 18094
PINGORA_MEMORY = 18095
# The cache hits and the ceiling once more with two workers, nginx's count.
CACHED2, CACHED2_ADMIN, PINGORA_MEMORY2 = 18096, 18097, 18098
# Phase 6: a hoster behind one shared 50 MiB/s uplink, and nginx's
# proxy_cache_lock in front of it.
UPLINK_ORIGIN, NGINX_UPLINK = 18099, 18100
# nginx's proxy_cache once more with Debian's shipped `tcp_nopush on`
# (whole files only: it makes every ranged reply wait ~40 ms).
NGINX_CACHE_NOPUSH = 18101
N_FILES = 16


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, **kw).stdout


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def signed(path, origin=ORIGIN):
    params = [("u", f"http://127.0.0.1:{origin}{path}")]
    sig = hmac.new(SECRET.encode(), urlencode(sorted(params)).encode(), hashlib.sha256).hexdigest()
    hint = path.split("?")[0].rsplit("/", 1)[-1]
    return f"/strm/proxy/{hint}?" + urlencode(params + [("sig", sig)])


def cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except FileNotFoundError:
            pass
    return total


def rss(pids):
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def children(pid):
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except FileNotFoundError:
        return []


class Target:
    def __init__(self, name, port, path_for, pids):
        self.name, self.port, self.path_for, self.pids = name, port, path_for, pids

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{self.path_for(path)}"


def wrk(target, seconds, lua_dir, whole=False):
    """Random 64 KiB ranges of the 1 MiB files, or (`whole`) the files whole."""
    paths = [target.path_for(f"/f{i}.bin") for i in range(N_FILES)]
    script = os.path.join(lua_dir, f"{target.name}{'_whole' if whole else ''}.lua")
    with open(script, "w") as f:
        f.write("local paths = {" + ",".join(json.dumps(p) for p in paths) + "}\n")
        f.write(
            "math.randomseed(os.time())\n"
            "request = function()\n"
            "  local p = paths[math.random(#paths)]\n"
            "  local n = math.random(0, 1048576 - 65536)\n"
            + ('  return wrk.format("GET", p)\n' if whole else
               '  return wrk.format("GET", p, {["Range"] = "bytes=" .. n .. "-" .. (n + 65535)})\n')
            + "end\n"
            "response = function(status, headers, body)\n"
            f'  if status ~= {200 if whole else 206} then error("status " .. status) end\n'
            "end\n"
        )
    cpu0 = cpu_seconds(target.pids())
    out = sh(f"wrk -t2 -c64 -d{seconds}s --latency -s {script} http://127.0.0.1:{target.port}")
    cpu = cpu_seconds(target.pids()) - cpu0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {"rps": rps, "p50": pct(50), "p99": pct(99), "cpu_us": cpu / max(requests, 1) * 1e6,
            "errors": errors.group(0) if errors else ""}


def download(target, path):
    cpu0 = cpu_seconds(target.pids())
    out = sh(f"curl -s -o /dev/null -w '%{{size_download}} %{{time_total}}' '{target.url(path)}'")
    cpu1 = cpu_seconds(target.pids())
    size, secs = out.split()
    return int(size), float(secs), cpu1 - cpu0


async def slow_client(target, path, rate, stop_at, counters):
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port, limit=1 << 16)
    writer.write(f"GET {target.path_for(path)} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    start, got = time.monotonic(), 0
    try:
        while time.monotonic() < stop_at:
            allowed = (time.monotonic() - start) * rate - got
            if allowed < 16384:
                await asyncio.sleep(0.1)
                continue
            data = await reader.read(int(min(allowed, 65536)))
            if not data:
                counters["closed"] += 1
                break
            got += len(data)
    finally:
        counters["bytes"] += got
        writer.close()


def origin_bytes_sent(work, tag):
    """What the origin wrote for the slow requests tagged `tag` (logged by
    nginx when each request ends, aborted ones included)."""
    total = 0
    try:
        for line in open(os.path.join(work, "origin_slow.log")):
            t, n = line.split()
            if t == tag:
                total += int(n)
    except FileNotFoundError:
        pass
    return total


async def slow_phase(target, clients, seconds, rate, work):
    counters = {"bytes": 0, "closed": 0}
    stop_at = time.monotonic() + seconds
    samples = []
    tasks = [asyncio.create_task(slow_client(target, f"/h{i % 4}.bin?t={target.name}", rate, stop_at, counters))
             for i in range(clients)]
    while time.monotonic() < stop_at:
        await asyncio.sleep(0.5)
        samples.append(rss(target.pids()))
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(2)  # let the proxy abort its upstream requests
    upstream = origin_bytes_sent(work, target.name)
    third = max(1, len(samples) // 3)
    return {
        "peak_rss": max(samples),
        "rss_first": sum(samples[:third]) / third,
        "rss_last": sum(samples[-third:]) / third,
        "client_rate": counters["bytes"] / seconds / clients,
        "upstream_rate": upstream / seconds / clients,
        "closed": counters["closed"],
    }


async def crowd_viewer(port, paths, jitter, ttfbs, sizes):
    """One viewer: the segments in order on one keep-alive connection; the
    time from each request to its first body byte."""
    await asyncio.sleep(jitter)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        for path in paths:
            sent = time.monotonic()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            first = await reader.read(min(length, 65536))
            ttfbs.append(time.monotonic() - sent)
            got = len(first)
            while got < length:
                got += len(await reader.readexactly(min(length - got, 1 << 20)))
            sizes.append(got)
    finally:
        writer.close()


def crowd(target, viewers, segments, work, log="slow_origin.log", tag="c"):
    """Phases 5 and 6 for one target: `viewers` viewers of `segments`
    segments of 1 MiB from a slow origin (its request log: `log`); the
    origin's GETs per segment and the median and p90 time to first body
    byte."""
    prefix = f"/{tag}/{target.name}"
    paths = [target.path_for(f"{prefix}/seg{i:02}.ts") for i in range(segments)]
    ttfbs, sizes = [], []
    started = time.monotonic()

    async def run():
        await asyncio.gather(*[crowd_viewer(target.port, paths, (v * 7 % 200) / 1000, ttfbs, sizes)
                               for v in range(viewers)])
    asyncio.run(run())
    took = time.monotonic() - started
    assert len(sizes) == viewers * segments and all(n == 1 << 20 for n in sizes), f"{target.name}: short bodies"
    gets = [l.strip() for l in open(os.path.join(work, log)) if l.startswith(prefix + "/")]
    ttfbs.sort()
    return {"gets_per_segment": len(gets) / segments, "ttfb_p50_ms": 1000 * ttfbs[len(ttfbs) // 2],
            "ttfb_p90_ms": 1000 * ttfbs[len(ttfbs) * 9 // 10], "seconds": took}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    # 1 by default: on this 2-core box, shared with wrk and the origin, one
    # worker relays a big stream at nginx's CPU cost while two work-stealing
    # workers move the stream between cores and pay ~25 % more; small-request
    # rates are within noise of each other (see BENCHMARKS.md, "threads").
    ap.add_argument("--threads", type=int, default=1, help="anibridge-proxy worker threads")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per target in phases 1 and 2")
    ap.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--phases", default="1,2,3,5,6", help="which phases to run (a partial run never writes)")
    ap.add_argument("--compare", metavar="BIN", help="also measure this anibridge-proxy binary (e.g. an earlier "
                    "build, run with the config it knows) in the same interleaved rounds, as target 'compare'")
    args = ap.parse_args()
    round_secs = 2 if args.quick else 3
    slow_secs = 8 if args.quick else 30
    clients = 100 if args.quick else 500

    work = tempfile.mkdtemp(prefix="anibridge-bench-")
    os.chmod(work, 0o755)  # nginx workers run as nobody
    data = os.path.join(work, "data")
    os.makedirs(data)
    for i in range(N_FILES):
        with open(os.path.join(data, f"f{i}.bin"), "wb") as f:
            f.write(os.urandom(1 << 20))
    with open(os.path.join(data, "big.bin"), "wb") as f:  # 1 GiB of real bytes
        block = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(block)
    for i in range(4):  # 100 MiB each
        with open(os.path.join(data, f"h{i}.bin"), "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(100):
                f.write(block)

    procs = []
    try:
        run_phases(args, work, data, procs, round_secs, slow_secs, clients)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def run_phases(args, work, data, procs, round_secs, slow_secs, clients):
    def anibridge(binary, port, admin, extra="", threads=None):
        cfg = os.path.join(work, f"anibridge-{port}.yaml")
        with open(cfg, "w") as f:
            f.write(f"""listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
threads: {threads or args.threads}
auth: {{mode: token, secret: "{SECRET}"}}
egress: {{allow_cidrs: ["127.0.0.0/8"]}}
{extra}""")
        p = subprocess.Popen([binary, "--config", cfg], env={**os.environ, "RUST_LOG": "warn"})
        procs.append(p)
        wait_port(port)
        return p

    def nginx(name, port, workers, body):
        conf = os.path.join(work, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes {workers};
pid {work}/{name}.pid;
error_log {work}/{name}.err warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  tcp_nodelay on;
  keepalive_requests 100000;
  client_body_temp_path {work}/{name}_body;
  proxy_temp_path {work}/{name}_proxy;
  {body}
}}""")
        p = subprocess.Popen(["nginx", "-c", conf, "-p", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        wait_port(port)
        return p

    origin = nginx("origin", ORIGIN, 1, f"""
  sendfile on; tcp_nopush off;  # TCP_CORK stalls ranged replies 40 ms
  log_format bytes '$arg_t $bytes_sent';
  server {{
    listen 127.0.0.1:{ORIGIN}; root {data};
    location ~ ^/h {{ access_log {work}/origin_slow.log bytes; }}
    # The same files, marked not cacheable (the cache's miss path).
    location /ns/ {{ alias {data}/; add_header Cache-Control "no-store"; }}
  }}""")
    ngx = nginx("nginx", NGINX, 2, f"""
  upstream origin {{ server 127.0.0.1:{ORIGIN}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{NGINX};
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_buffer_size 64k;
      proxy_buffers 8 64k;
    }}
  }}""")
    # nginx answering from proxy_cache (phase 1's hits), and with
    # proxy_cache_lock in front of the slow origins (phases 5 and 6).
    lock_servers = "".join(f"""
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://{upstream};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache lock;
      proxy_cache_key $uri;
      proxy_cache_valid 200 60m;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 60s;
      proxy_cache_lock_age 60s;
    }}
  }}""" for port, upstream in [(NGINX_LOCK, "slow"), (NGINX_UPLINK, "uplink")])
    # Its hits are sent from the cache files with sendfile, as Debian's
    # shipped nginx.conf has it (nginx's own default is off). Debian also
    # ships `tcp_nopush on`: the best of nginx for ranges is off (on stalls
    # each ranged reply ~40 ms), for whole files on (its header rides with
    # the body); whole files are measured against both, one shared cache.
    hit_servers = "".join(f"""
  server {{
    listen 127.0.0.1:{port};{nopush}
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache hits;
      proxy_cache_key $uri;
      proxy_cache_valid 200 206 60m;
    }}
  }}""" for port, nopush in [(NGINX_CACHE, ""), (NGINX_CACHE_NOPUSH, "\n    tcp_nopush on;")])
    ngx_cache = nginx("nginx_cache", NGINX_CACHE, 2, f"""
  sendfile on; tcp_nopush off;
  upstream origin {{ server 127.0.0.1:{ORIGIN}; keepalive 64; }}
  upstream slow {{ server 127.0.0.1:{SLOW_ORIGIN}; keepalive 64; }}
  upstream uplink {{ server 127.0.0.1:{UPLINK_ORIGIN}; keepalive 64; }}
  proxy_cache_path {work}/nginx_hits levels=1:2 keys_zone=hits:10m max_size=1g inactive=60m use_temp_path=off;
  proxy_cache_path {work}/nginx_lock levels=1:2 keys_zone=lock:10m max_size=1g inactive=60m use_temp_path=off;
{hit_servers}
{lock_servers}""")
    slow_origin = subprocess.Popen(["python3", os.path.join(ROOT, "benches/load/slow_origin.py"), str(SLOW_ORIGIN),
                                    os.path.join(work, "slow_origin.log")])
    procs.append(slow_origin)
    wait_port(SLOW_ORIGIN)
    # A quick hoster (first byte after 20 ms, no per-connection limit) whose
    # uplink is shared by every connection at 50 MiB/s: a real hoster's
    # per-address limit.
    uplink_origin = subprocess.Popen(["python3", os.path.join(ROOT, "benches/load/slow_origin.py"), str(UPLINK_ORIGIN),
                                      os.path.join(work, "uplink_origin.log"), "--first-byte", "0.02",
                                      "--rate", "0", "--uplink", str(50 << 20)])
    procs.append(uplink_origin)
    wait_port(UPLINK_ORIGIN)
    # The relay: cache off, the same job as nginx without a cache.
    ab = anibridge(BIN, PROXY, ADMIN, "cache: {max_bytes: 0}\n")
    # The shipped default (cache on): nothing cacheable, then from memory.
    miss = anibridge(BIN, MISS, MISS_ADMIN)
    cached = anibridge(BIN, CACHED, CACHED_ADMIN)
    cached2 = anibridge(BIN, CACHED2, CACHED2_ADMIN, threads=2)
    # Same worker count as anibridge-proxy, same origin.
    bare = subprocess.Popen([BARE, f"127.0.0.1:{PINGORA}", f"127.0.0.1:{ORIGIN}", str(args.threads)],
                            env={**os.environ, "RUST_LOG": "warn"})
    procs.append(bare)
    wait_port(PINGORA)
    # The ceiling for a cache on Pingora's downstream session: the files held
    # in memory, each ranged GET answered with a header and a slice, nothing else.
    bare_memory = subprocess.Popen([BARE, f"127.0.0.1:{PINGORA_MEMORY}", f"memory:{data}", str(args.threads)],
                                   env={**os.environ, "RUST_LOG": "warn"})
    procs.append(bare_memory)
    wait_port(PINGORA_MEMORY)
    bare_memory2 = subprocess.Popen([BARE, f"127.0.0.1:{PINGORA_MEMORY2}", f"memory:{data}", "2"],
                                    env={**os.environ, "RUST_LOG": "warn"})
    procs.append(bare_memory2)
    wait_port(PINGORA_MEMORY2)

    targets = [
        Target("direct", ORIGIN, lambda p: p, lambda: [origin.pid] + children(origin.pid)),
        Target("nginx", NGINX, lambda p: p, lambda: [ngx.pid] + children(ngx.pid)),
        Target("pingora", PINGORA, lambda p: p, lambda: [bare.pid]),
        Target("anibridge", PROXY, signed, lambda: [ab.pid]),
    ]
    if args.compare:
        cmp = anibridge(args.compare, COMPARE, COMPARE_ADMIN)
        targets.append(Target("compare", COMPARE, signed, lambda: [cmp.pid]))
    # Phase 1 only: the cache's miss path and its hits, beside nginx's hits.
    cache_targets = [
        Target("anibridge_miss", MISS, lambda p: signed("/ns" + p), lambda: [miss.pid]),
        Target("nginx_cache", NGINX_CACHE, lambda p: p, lambda: [ngx_cache.pid] + children(ngx_cache.pid)),
        Target("anibridge_cache", CACHED, signed, lambda: [cached.pid]),
        Target("pingora_memory", PINGORA_MEMORY, lambda p: p, lambda: [bare_memory.pid]),
        # nginx runs two workers: the same hits and ceiling with two threads
        # (anibridge-proxy's shipped default), like for like.
        Target("anibridge_cache_t2", CACHED2, signed, lambda: [cached2.pid]),
        Target("pingora_memory_t2", PINGORA_MEMORY2, lambda p: p, lambda: [bare_memory2.pid]),
    ]
    # Phase 5: the crowd, from the slow origin.
    crowd_targets = [
        Target("anibridge_cache", CACHED, lambda p: signed(p, SLOW_ORIGIN), lambda: [cached.pid]),
        Target("nginx_lock", NGINX_LOCK, lambda p: p, lambda: [ngx_cache.pid] + children(ngx_cache.pid)),
        Target("anibridge", PROXY, lambda p: signed(p, SLOW_ORIGIN), lambda: [ab.pid]),
    ]
    # Phase 6: the same crowd shape behind the shared uplink.
    uplink_targets = [
        Target("anibridge_cache", CACHED, lambda p: signed(p, UPLINK_ORIGIN), lambda: [cached.pid]),
        Target("nginx_lock", NGINX_UPLINK, lambda p: p, lambda: [ngx_cache.pid] + children(ngx_cache.pid)),
        Target("anibridge", PROXY, lambda p: signed(p, UPLINK_ORIGIN), lambda: [ab.pid]),
    ]
    results = {t.name: {} for t in targets + cache_targets}
    results["crowd"] = {}
    results["uplink"] = {}
    # Sanity: identical bytes through every target.
    want = hashlib.sha256(open(os.path.join(data, "f3.bin"), "rb").read()[100:200]).hexdigest()
    for t in targets + cache_targets:
        body = subprocess.run(["curl", "-s", "-H", "Range: bytes=100-199", t.url("/f3.bin")], capture_output=True).stdout
        assert hashlib.sha256(body).hexdigest() == want, f"{t.name} returned wrong bytes"
    # The caches hold every file before phase 1 (whole GETs fill them).
    for t in [t for t in cache_targets if not t.name.startswith("pingora")]:
        for i in range(N_FILES):
            subprocess.run(["curl", "-s", "-o", "/dev/null", t.url(f"/f{i}.bin")], check=True)

    phases = set(args.phases.split(","))
    if "1" in phases:
        # Interleaved rounds (direct, nginx, pingora, anibridge, direct, ...): drift
        # on the shared machine hits every target alike; each figure is the
        # median of its rounds.
        for t in targets + cache_targets:
            wrk(t, 3, work)  # warm-up
        rounds = {t.name: [] for t in targets + cache_targets}
        for i in range(args.rounds):
            for t in targets + cache_targets:
                r = wrk(t, round_secs, work)
                rounds[t.name].append(r)
                print(f"[1] round {i + 1} {t.name}: {r}", flush=True)
        for t in targets + cache_targets:
            rs = rounds[t.name]
            results[t.name].update({k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "cpu_us")})
            results[t.name]["errors"] = " ".join(r["errors"] for r in rs if r["errors"])
            results[t.name]["rps_rounds"] = [round(r["rps"]) for r in rs]
        # Whole 1 MiB files from memory: what players ask of stored HLS
        # segments (a GET without a range, or `bytes=0-`).
        # nginx with `tcp_nopush on` answers from the same cache zone.
        nopush = Target("nginx_cache_nopush", NGINX_CACHE_NOPUSH, lambda p: p,
                        lambda: [ngx_cache.pid] + children(ngx_cache.pid))
        whole_targets = [t for t in cache_targets if t.name in ("nginx_cache", "anibridge_cache", "anibridge_cache_t2")]
        whole_targets.insert(1, nopush)
        whole = {t.name: [] for t in whole_targets}
        for i in range(args.rounds):
            for t in whole_targets:
                r = wrk(t, round_secs, work, whole=True)
                whole[t.name].append(r)
                print(f"[1w] round {i + 1} {t.name}: {r}", flush=True)
        for t in whole_targets:
            rs = whole[t.name]
            results[t.name + "_whole"] = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "cpu_us")}
            results[t.name + "_whole"]["rps_rounds"] = [round(r["rps"]) for r in rs]
    if "2" in phases:
        for t in targets:
            download(t, "/big.bin")  # warm the page cache and pools
        # One download takes under a second and swings by +-30 % on a shared
        # machine: interleaved rounds, median per target.
        runs = {t.name: [] for t in targets}
        for i in range(args.rounds):
            for t in targets:
                size, secs, cpu = download(t, "/big.bin")
                assert size == 1 << 30, f"{t.name}: got {size} bytes"
                runs[t.name].append((secs, cpu))
                print(f"[2] round {i + 1} {t.name}: {secs:.2f}s cpu {cpu:.2f}s", flush=True)
        for t in targets:
            secs = statistics.median(r[0] for r in runs[t.name])
            cpu = statistics.median(r[1] for r in runs[t.name])
            results[t.name].update({"gib_s": 1 / secs, "cpu_per_gb": cpu / ((1 << 30) / 1e9)})
    # Slow clients: nginx and anibridge, with its cache off and on (the
    # 100 MiB files are over cache.max_object_bytes: relayed either way).
    # Bare Pingora's read-ahead is known (PINGORA-NOTES 10) and would add 30 s.
    slow_targets = [t for t in targets + cache_targets if t.name in ("nginx", "anibridge", "compare", "anibridge_cache")]
    for t in slow_targets if "3" in phases else []:
        r = asyncio.run(slow_phase(t, clients, slow_secs, 64 * 1024, work))
        results[t.name].update(r)
        print(f"[3] {t.name}: {r}", flush=True)
    for t in crowd_targets if "5" in phases else []:
        r = crowd(t, 10 if args.quick else 50, 5 if args.quick else 20, work)
        results["crowd"][t.name] = r
        print(f"[5] {t.name}: {r}", flush=True)
    for t in uplink_targets if "6" in phases else []:
        r = crowd(t, 5 if args.quick else 20, 5 if args.quick else 30, work, "uplink_origin.log", "u")
        results["uplink"][t.name] = r
        print(f"[6] {t.name}: {r}", flush=True)
    if phases != {"1", "2", "3", "5", "6"}:
        print(json.dumps(results, indent=1))
        return
    report(args, results, clients)


def report(args, results, clients):
    d, n, b, a = results["direct"], results["nginx"], results["pingora"], results["anibridge"]
    miss, nc, ac = results["anibridge_miss"], results["nginx_cache"], results["anibridge_cache"]
    pm, ac2, pm2 = results["pingora_memory"], results["anibridge_cache_t2"], results["pingora_memory_t2"]
    ncw, acw, acw2 = results["nginx_cache_whole"], results["anibridge_cache_whole"], results["anibridge_cache_t2_whole"]
    ncpw = results["nginx_cache_nopush_whole"]
    MiB = 1 << 20

    def row(label, key, fmt, scale=1):
        v = lambda r: format(r[key] / scale, fmt)
        return (label, v(d), v(n), v(b), v(a), f"{a[key] / n[key]:.2f}x", f"{a[key] / b[key]:.2f}x")

    rows = [
        row("small Range GETs: req/s", "rps", ".0f"),
        row("small Range GETs: p50 ms", "p50", ".2f"),
        row("small Range GETs: p99 ms", "p99", ".2f"),
        row("small Range GETs: CPU µs per request", "cpu_us", ".1f"),
        row("1 GiB download: GiB/s", "gib_s", ".2f"),
        row("CPU seconds per GB relayed", "cpu_per_gb", ".3f"),
        (f"{clients} slow clients: peak RSS MiB", "-", f"{n['peak_rss'] / MiB:.1f}", "-", f"{a['peak_rss'] / MiB:.1f}", f"{a['peak_rss'] / n['peak_rss']:.2f}x", ""),
        (f"{clients} slow clients: RSS first/last third MiB", "-",
         f"{n['rss_first'] / MiB:.1f} / {n['rss_last'] / MiB:.1f}", "-", f"{a['rss_first'] / MiB:.1f} / {a['rss_last'] / MiB:.1f}", "", ""),
        (f"{clients} slow clients: client KiB/s each", "-", f"{n['client_rate'] / 1024:.1f}", "-", f"{a['client_rate'] / 1024:.1f}", "", ""),
        (f"{clients} slow clients: upstream KiB/s each (origin side)", "-", f"{n['upstream_rate'] / 1024:.1f}", "-", f"{a['upstream_rate'] / 1024:.1f}", "", ""),
    ]
    table = ("| measure | direct | nginx | bare Pingora | anibridge-proxy (cache off) | anibridge / nginx | anibridge / bare Pingora |\n"
             "|---|---|---|---|---|---|---|\n")
    table += "".join(f"| {' | '.join(r)} |\n" for r in rows)

    cache = ("| measure | anibridge-proxy | nginx | ratio |\n|---|---|---|---|\n"
             f"| small Range GETs answered from memory / proxy_cache: req/s | {ac['rps']:.0f} | {nc['rps']:.0f} | {ac['rps'] / nc['rps']:.2f}x |\n"
             f"| … p99 ms | {ac['p99']:.2f} | {nc['p99']:.2f} | {ac['p99'] / nc['p99']:.2f}x |\n"
             f"| … CPU µs per request | {ac['cpu_us']:.1f} | {nc['cpu_us']:.1f} | {ac['cpu_us'] / nc['cpu_us']:.2f}x |\n"
             f"| the same answered by bare Pingora from memory (the ceiling on Pingora's session): req/s, vs anibridge-proxy's hits | {ac['rps']:.0f} | {pm['rps']:.0f} (bare Pingora) | {ac['rps'] / pm['rps']:.2f}x |\n"
             f"| bare Pingora from memory vs nginx's proxy_cache: req/s | {pm['rps']:.0f} (bare Pingora) | {nc['rps']:.0f} | {pm['rps'] / nc['rps']:.2f}x |\n"
             f"| … CPU µs per request | {pm['cpu_us']:.1f} (bare Pingora) | {nc['cpu_us']:.1f} | {pm['cpu_us'] / nc['cpu_us']:.2f}x |\n"
             f"| with two threads, as nginx's two workers: hits req/s | {ac2['rps']:.0f} | {nc['rps']:.0f} | {ac2['rps'] / nc['rps']:.2f}x |\n"
             f"| … CPU µs per request | {ac2['cpu_us']:.1f} | {nc['cpu_us']:.1f} | {ac2['cpu_us'] / nc['cpu_us']:.2f}x |\n"
             f"| with two threads: bare Pingora from memory req/s, vs anibridge-proxy's hits | {ac2['rps']:.0f} | {pm2['rps']:.0f} (bare Pingora) | {ac2['rps'] / pm2['rps']:.2f}x |\n"
             f"| with two threads: bare Pingora from memory vs nginx's proxy_cache: req/s | {pm2['rps']:.0f} (bare Pingora) | {nc['rps']:.0f} | {pm2['rps'] / nc['rps']:.2f}x |\n"
             f"| … CPU µs per request | {pm2['cpu_us']:.1f} (bare Pingora) | {nc['cpu_us']:.1f} | {pm2['cpu_us'] / nc['cpu_us']:.2f}x |\n"
             f"| whole 1 MiB files answered from memory / proxy_cache (stored HLS segments): req/s | {acw['rps']:.0f} | {ncw['rps']:.0f} | {acw['rps'] / ncw['rps']:.2f}x |\n"
             f"| … CPU µs per request | {acw['cpu_us']:.1f} | {ncw['cpu_us']:.1f} | {acw['cpu_us'] / ncw['cpu_us']:.2f}x |\n"
             f"| with two threads: whole 1 MiB files req/s | {acw2['rps']:.0f} | {ncw['rps']:.0f} | {acw2['rps'] / ncw['rps']:.2f}x |\n"
             f"| … CPU µs per request | {acw2['cpu_us']:.1f} | {ncw['cpu_us']:.1f} | {acw2['cpu_us'] / ncw['cpu_us']:.2f}x |\n"
             f"| whole 1 MiB files vs nginx with `tcp_nopush on` (Debian's shipped nginx.conf): req/s | {acw['rps']:.0f} | {ncpw['rps']:.0f} | {acw['rps'] / ncpw['rps']:.2f}x |\n"
             f"| … with two threads: req/s | {acw2['rps']:.0f} | {ncpw['rps']:.0f} | {acw2['rps'] / ncpw['rps']:.2f}x |\n"
             f"| … CPU µs per request (two threads) | {acw2['cpu_us']:.1f} | {ncpw['cpu_us']:.1f} | {acw2['cpu_us'] / ncpw['cpu_us']:.2f}x |\n"
             f"| small Range GETs, cache on but nothing cacheable (miss path) vs cache off: req/s | {miss['rps']:.0f} | {a['rps']:.0f} (cache off) | {miss['rps'] / a['rps']:.2f}x |\n"
             f"| … p99 ms | {miss['p99']:.2f} | {a['p99']:.2f} (cache off) | {miss['p99'] / a['p99']:.2f}x |\n"
             f"| {clients} slow clients, shipped config (cache on): peak RSS MiB | {ac['peak_rss'] / MiB:.1f} | {n['peak_rss'] / MiB:.1f} | {ac['peak_rss'] / n['peak_rss']:.2f}x |\n")
    def crowd_table(title, runs):
        out = f"| {title} | origin GETs per segment | first body byte p50 ms | p90 ms | all viewers done, s |\n|---|---|---|---|---|\n"
        for name, label in [("anibridge_cache", "anibridge-proxy, shipped config (cache on)"),
                            ("nginx_lock", "nginx, proxy_cache + proxy_cache_lock"),
                            ("anibridge", "anibridge-proxy, cache off")]:
            c = runs[name]
            out += f"| {label} | {c['gets_per_segment']:.2f} | {c['ttfb_p50_ms']:.0f} | {c['ttfb_p90_ms']:.0f} | {c['seconds']:.1f} |\n"
        return out

    crowd = crowd_table("50 viewers x 20 segments of 1 MiB, slow origin", results["crowd"])
    uplink = crowd_table("20 viewers x 30 segments of 1 MiB, hoster uplink 50 MiB/s", results["uplink"])
    compare = ""
    if "compare" in results:
        c = results["compare"]
        compare = ("| measure | this build (cache off) | previous build | this / previous |\n|---|---|---|---|\n"
                   f"| small Range GETs: req/s | {a['rps']:.0f} | {c['rps']:.0f} | {a['rps'] / c['rps']:.2f}x |\n"
                   f"| small Range GETs: p99 ms | {a['p99']:.2f} | {c['p99']:.2f} | {a['p99'] / c['p99']:.2f}x |\n"
                   f"| small Range GETs: CPU µs per request | {a['cpu_us']:.1f} | {c['cpu_us']:.1f} | {a['cpu_us'] / c['cpu_us']:.2f}x |\n"
                   f"| 1 GiB download: GiB/s | {a['gib_s']:.2f} | {c['gib_s']:.2f} | {a['gib_s'] / c['gib_s']:.2f}x |\n"
                   f"| {clients} slow clients: peak RSS MiB | {a['peak_rss'] / MiB:.1f} | {c['peak_rss'] / MiB:.1f} | {a['peak_rss'] / c['peak_rss']:.2f}x |\n")
    errs = {k: v.get("errors") for k, v in results.items() if isinstance(v, dict) and v.get("errors")}
    print(table)
    print(cache)
    print(crowd)
    print(uplink)
    print(compare)
    if errs:
        print("errors:", errs)

    if args.no_write or args.quick:
        return
    cpu_model = sh("grep -m1 'model name' /proc/cpuinfo").split(":")[1].strip()
    machine = (
        f"- machine: {os.cpu_count()} cores, {cpu_model}, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30))} GiB, Linux {platform.release()}\n"
        f"- versions: {sh('nginx -v 2>&1').strip()}, {sh('wrk -v 2>&1 | head -1').strip()}, {sh('rustc --version').strip()}, "
        f"pingora 0.9.1; anibridge-proxy threads: {args.threads}\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: `benches/load/run.sh"
        f"{' --compare ' + os.path.basename(args.compare) if args.compare else ''}`\n"
        f"- small Range GETs and 1 GiB download: {len(a['rps_rounds'])} interleaved rounds per target, median shown; "
        f"req/s per round: direct {d['rps_rounds']}, nginx {n['rps_rounds']}, bare Pingora {b['rps_rounds']}, "
        f"anibridge {a['rps_rounds']}, anibridge cache hits {ac['rps_rounds']}, nginx proxy_cache hits {nc['rps_rounds']}, bare Pingora from memory {pm['rps_rounds']}, "
        f"anibridge cache hits with two threads {ac2['rps_rounds']}, bare Pingora from memory with two threads {pm2['rps_rounds']}; "
        f"whole 1 MiB files: nginx proxy_cache {ncw['rps_rounds']}, nginx with tcp_nopush on {ncpw['rps_rounds']}, anibridge {acw['rps_rounds']}, anibridge with two threads {acw2['rps_rounds']}\n"
        f"- bare Pingora: `benches/load/bare_pingora.rs` (a minimal `ProxyHttp`, Pingora's own pipeline and pool, "
        f"same threads, allocator and release profile) — what Pingora costs with nothing on top\n"
        f"- the crowd: `benches/load/slow_origin.py` answers after 200 ms at 4 MiB/s per connection; 50 viewers "
        f"(start jitter up to 200 ms) each fetch 20 segments in order on one connection\n"
        f"- behind the uplink: the same origin answering after 20 ms, every connection sharing one 50 MiB/s uplink; "
        f"20 viewers each fetch 30 segments\n"
    )
    text = open("BENCHMARKS.md").read() if os.path.exists("BENCHMARKS.md") else "# Benchmarks\n"
    start, end = "<!-- load:begin -->", "<!-- load:end -->"
    block = (f"{start}\n{machine}\n{table}\nThe shared cache (same run):\n\n{cache}\nA crowd on one stream (same run):\n\n"
             f"{crowd}\nThe same crowd behind a hoster's shared uplink (same run):\n\n{uplink}" + (f"\nAgainst the previous build (same run):\n\n{compare}" if compare else "") + end)
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n## Latest load run\n\n" + block + "\n"
    open("BENCHMARKS.md", "w").write(text)
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
