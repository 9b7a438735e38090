#!/usr/bin/env python3
"""Resumption soak: a real nginx behind a TCP proxy that cuts connections
mid-response, the release binary in front, and clients checking every byte.

The hoster here is a real server (nginx: ETag, Last-Modified, 206s, keep-
alive, `limit_rate` so bodies take time), and what breaks is the network:
each upstream connection the proxy opens is, with probability --cut-rate,
cut (reset, no clean end) after a random 1 KB .. --max-cut bytes of
response. The proxy resumes what it can (`upstream.resume_attempts`, 3);
what it cannot must reach the client as an aborted response. So every
answer a client reads to its end must be exactly the file's bytes (200),
the asked range (206: `Content-Range` checked) or the file's length (HEAD);
an answer that ends short must end as an abort (fewer bytes than its
`Content-Length`), never as a different complete answer. Aborts are
expected once a response has used its resumptions up, or when a cache
fill dies for good; the proxy's warnings saying which are summed up.
Exits 1 if any complete answer is wrong.

Clients: --clients threads for --seconds, each on one keep-alive
connection, asking at random for whole files, `bytes=0-`, ranges, open
ranges, suffixes and HEADs of 16 files of 1 MiB, one of 12 MB and six of
300 KB, through signed relay URLs. --cache: `on` (the shipped default),
`small` (6 MB, objects up to 4 MB: fills come and go, the 12 MB file is
relayed) or `off`.

Usage: benches/load/cut_soak.sh [--seconds 60] [--clients 40]
       [--cut-rate 0.5] [--max-cut 3000000] [--cache small]
"""
import argparse, asyncio, collections, http.client, os, random, re, shutil
import subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import SECRET, signed, wait_port  # noqa: E402  (benches/load/run.py, the load benchmark)

ROOT = os.getcwd()
BIN = os.path.join(ROOT, "target/release/anibridge-proxy")
ORIGIN, CUT, PROXY, ADMIN = 18181, 18190, 18183, 18184


class Cutter:
    """The network between the proxy and nginx: forwards bytes both ways and
    cuts some connections after a random number of response bytes."""

    def __init__(self, rate, max_cut):
        self.rate, self.max_cut = rate, max_cut
        self.conns = self.cut = 0

    async def pipe(self, r, w, budget=None):
        sent = 0
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                if budget is not None and sent + len(data) > budget:
                    w.write(data[: budget - sent])
                    await w.drain()
                    self.cut += 1
                    w.transport.abort()
                    return True
                w.write(data)
                await w.drain()
                sent += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()
        return False

    async def handle(self, cr, cw):
        self.conns += 1
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", ORIGIN)
        except OSError:
            cw.transport.abort()
            return
        budget = random.randint(1000, self.max_cut) if random.random() < self.rate else None
        up = asyncio.ensure_future(self.pipe(cr, uw))
        down = asyncio.ensure_future(self.pipe(ur, cw, budget))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        if down.done() and down.result():
            uw.transport.abort()
        await asyncio.gather(up, down, return_exceptions=True)

    def start(self):
        loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(loop)
            loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", CUT))
            loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        wait_port(CUT)


def client(seed, seconds, files, results, aborts, wrong, lock):
    rnd = random.Random(seed)
    end = time.time() + seconds
    conn = None
    while time.time() < end:
        name = rnd.choice(sorted(files))
        body = files[name]
        n = len(body)
        kind = rnd.choice(["whole", "from 0", "range", "range", "open range", "suffix", "HEAD"])
        # The Range sent, and the bytes first..=last a 206 must carry.
        headers, span = {}, None
        if kind == "from 0":
            span = (0, n - 1)
            headers["Range"] = "bytes=0-"
        elif kind == "range":
            a = rnd.randrange(n)
            span = (a, min(n - 1, a + rnd.randrange(200_000)))
            headers["Range"] = f"bytes={span[0]}-{span[1]}"
        elif kind == "open range":
            span = (rnd.randrange(n), n - 1)
            headers["Range"] = f"bytes={span[0]}-"
        elif kind == "suffix":
            k = rnd.randrange(1, 300_000)
            span = (max(0, n - k), n - 1)
            headers["Range"] = f"bytes=-{k}"
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", PROXY, timeout=60)
            conn.request("HEAD" if kind == "HEAD" else "GET", signed(f"/{name}", origin=CUT), headers=headers)
            r = conn.getresponse()
            data = r.read()
            if kind == "HEAD":
                ok = r.status == 200 and r.getheader("content-length") == str(n) and data == b""
            elif span is None:
                ok = r.status == 200 and data == body
            else:
                first, last = span
                ok = (r.status == 206 and r.getheader("content-range") == f"bytes {first}-{last}/{n}"
                      and data == body[first : last + 1])
            outcome = "ok" if ok else f"WRONG {r.status}"
            with lock:
                results[(kind, outcome)] += 1
                if not ok and len(wrong) < 10:
                    wrong.append((kind, name, headers, r.status, r.getheaders(), len(data)))
        except (http.client.IncompleteRead, ConnectionError) as e:
            with lock:
                results[(kind, "aborted")] += 1
                aborts[type(e).__name__] += 1
            conn.close()
            conn = None
        except (http.client.HTTPException, OSError) as e:
            with lock:
                results[(kind, f"ERROR {type(e).__name__}")] += 1
                if len(wrong) < 10:
                    wrong.append((kind, name, headers, repr(e)))
            conn.close()
            conn = None


def metric(name):
    admin = http.client.HTTPConnection("127.0.0.1", ADMIN, timeout=5)
    admin.request("GET", "/metrics")
    for line in admin.getresponse().read().decode().splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=40)
    ap.add_argument("--cut-rate", type=float, default=0.5)
    ap.add_argument("--max-cut", type=int, default=3_000_000)
    ap.add_argument("--cache", choices=["on", "small", "off"], default="small")
    args = ap.parse_args()
    if not os.path.exists(BIN):
        raise SystemExit("build it first: cargo build --release (benches/load/cut_soak.sh does)")
    work = tempfile.mkdtemp(prefix="cut-soak.")
    os.chmod(work, 0o755)  # nginx's worker may run as another user
    data = os.path.join(work, "data")
    os.mkdir(data)
    os.chmod(data, 0o755)
    files = {f"f{i}.bin": os.urandom(1 << 20) for i in range(16)}
    files["big.bin"] = os.urandom(12_000_000)
    files.update({f"seg{i}.ts": os.urandom(300_000) for i in range(6)})
    for name, body in files.items():
        path = os.path.join(data, name)
        with open(path, "wb") as f:
            f.write(body)
        os.chmod(path, 0o644)
    with open(os.path.join(work, "nginx.conf"), "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; sendfile on;
  server {{ listen 127.0.0.1:{ORIGIN}; root {data}; limit_rate 8m; }} }}
""")
    cache = {"on": "", "small": "cache: {max_bytes: 6000000, max_object_bytes: 4000000}\n",
             "off": "cache: {max_bytes: 0}\n"}[args.cache]
    with open(os.path.join(work, "proxy.yaml"), "w") as f:
        f.write(f"""listen: "127.0.0.1:{PROXY}"
admin_listen: "127.0.0.1:{ADMIN}"
auth: {{mode: token, secret: "{SECRET}"}}
egress: {{allow_cidrs: ["127.0.0.0/8"]}}
{cache}""")
    procs = []
    try:
        procs.append(subprocess.Popen(["nginx", "-c", os.path.join(work, "nginx.conf")]))
        wait_port(ORIGIN)
        cutter = Cutter(args.cut_rate, args.max_cut)
        cutter.start()
        log = open(os.path.join(work, "proxy.log"), "w")
        procs.append(subprocess.Popen([BIN, "--config", os.path.join(work, "proxy.yaml")],
                                      env={**os.environ, "RUST_LOG": "warn"}, stderr=log))
        wait_port(PROXY)
        pid = procs[-1].pid
        rss = lambda: int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
        rss_start = rss()
        results, aborts, wrong, lock = collections.Counter(), collections.Counter(), [], threading.Lock()
        threads = [threading.Thread(target=client, args=(i, args.seconds, files, results, aborts, wrong, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        attempted, succeeded = metric("anibridge_resume_attempts_total"), metric("anibridge_resumes_succeeded_total")
        print(f"cache {args.cache}, {args.clients} clients for {args.seconds:.0f} s; upstream connections "
              f"{cutter.conns}, cut {cutter.cut}; resumptions attempted {attempted}, succeeded {succeeded}; "
              f"RSS {rss_start} -> {rss()} MiB")
        for kind in ["whole", "from 0", "range", "open range", "suffix", "HEAD"]:
            row = {o: c for (k, o), c in results.items() if k == kind}
            print(f"  {kind:10} " + ", ".join(f"{o} {c}" for o, c in sorted(row.items())))
        for w in wrong:
            print("  WRONG:", w)
        if procs[-1].poll() is not None:
            raise SystemExit("the proxy exited")
        complete = sum(c for (_, o), c in results.items() if o == "ok")
        bad = sum(c for (_, o), c in results.items() if o not in ("ok", "aborted"))
        if bad or complete == 0:
            raise SystemExit(f"{bad} wrong answers or errors, {complete} right ones")
        aborted = sum(c for (_, o), c in results.items() if o == "aborted")
        # Why responses were aborted, as the proxy logged it (numbers and addresses folded).
        log.flush()
        said = collections.Counter(re.sub(r"[0-9.]+", "N", line.split("] ", 1)[-1].strip())
                                   for line in open(log.name) if " WARN " in line and "auth.secret" not in line)
        for line, count in said.most_common(5):
            print(f"  proxy log: {count} x {line}")
        how = ", ".join(f"{n} {c}" for n, c in sorted(aborts.items()))
        print(f"{complete} complete answers, every one byte-exact; {aborted} aborted ({how or 'none'}: "
              "the client saw its connection end before the Content-Length it was promised)")
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
