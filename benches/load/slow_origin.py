#!/usr/bin/env python3
"""A slow hoster for the crowd phases of benches/load/run.py: every GET is
answered after FIRST_BYTE seconds (200 ms), then 1 MiB in 64 KiB pieces at
RATE bytes/s per connection (4 MiB/s; 0: unpaced), keep-alive. With
--uplink BYTES_PER_S every connection's pieces also share one uplink of
that rate (a hoster's per-address limit): a piece goes out only when the
uplink has sent every piece booked before it. Each GET's path is appended
to LOG as it arrives, so the benchmark counts what the origin served.
Usage: slow_origin.py PORT LOG [--first-byte S] [--rate BYTES_PER_S] [--uplink BYTES_PER_S]"""
import argparse, asyncio, hashlib, time

SIZE = 1 << 20
PIECE = 64 * 1024


def body_of(path):
    seed = hashlib.sha256(path.encode()).digest()
    return (seed * (SIZE // len(seed) + 1))[:SIZE]


class Uplink:
    """One shared link: each piece books the next free slot of PIECE/rate s."""

    def __init__(self, rate):
        self.rate, self.free_at = rate, 0.0

    async def send_slot(self):
        if not self.rate:
            return
        now = time.monotonic()
        start = max(now, self.free_at)
        self.free_at = start + PIECE / self.rate
        if self.free_at > now:
            await asyncio.sleep(self.free_at - now)


async def serve(reader, writer, log, args, uplink):
    pause = PIECE / args.rate if args.rate else 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            log.write(path + "\n")
            log.flush()
            await asyncio.sleep(args.first_byte)
            body = body_of(path.split("?")[0])
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nContent-Length: %d\r\n"
                b"ETag: \"%s\"\r\nCache-Control: public, max-age=600\r\n\r\n"
                % (SIZE, hashlib.sha256(body).hexdigest()[:16].encode())
            )
            for off in range(0, SIZE, PIECE):
                await uplink.send_slot()
                writer.write(body[off:off + PIECE])
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("log")
    ap.add_argument("--first-byte", type=float, default=0.2)
    ap.add_argument("--rate", type=int, default=4 << 20)
    ap.add_argument("--uplink", type=int, default=0)
    args = ap.parse_args()
    log, uplink = open(args.log, "a"), Uplink(args.uplink)
    server = await asyncio.start_server(lambda r, w: serve(r, w, log, args, uplink), "127.0.0.1", args.port,
                                        backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
