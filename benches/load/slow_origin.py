#!/usr/bin/env python3
"""A slow hoster for the crowd phase of benches/load/run.py: every GET is
answered after 200 ms, then 1 MiB at 4 MiB/s per connection (64 KiB every
15.6 ms), keep-alive. Each GET's path is appended to LOG as it arrives, so
the benchmark counts what the origin served.
Usage: slow_origin.py PORT LOG"""
import asyncio, hashlib, sys

SIZE = 1 << 20
PIECE = 64 * 1024
PAUSE = PIECE / (4 << 20)
FIRST_BYTE = 0.2


def body_of(path):
    seed = hashlib.sha256(path.encode()).digest()
    return (seed * (SIZE // len(seed) + 1))[:SIZE]


async def serve(reader, writer, log):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            log.write(path + "\n")
            log.flush()
            await asyncio.sleep(FIRST_BYTE)
            body = body_of(path.split("?")[0])
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nContent-Length: %d\r\n"
                b"ETag: \"%s\"\r\nCache-Control: public, max-age=600\r\n\r\n"
                % (SIZE, hashlib.sha256(body).hexdigest()[:16].encode())
            )
            for off in range(0, SIZE, PIECE):
                writer.write(body[off:off + PIECE])
                await writer.drain()
                await asyncio.sleep(PAUSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    port, log = int(sys.argv[1]), open(sys.argv[2], "a")
    server = await asyncio.start_server(lambda r, w: serve(r, w, log), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
