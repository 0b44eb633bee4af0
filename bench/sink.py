"""A sink server: reads each request body whole and throws it away.

    python -m bench.sink --port 0

Measured with the same load as chunkserver, it shows what the load generator and the loopback
can do on this machine: the client's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvloop
from aiohttp import web

from chunkserver.server import keep_freed_heap


async def discard(request: web.Request) -> web.Response:
    received = 0
    while chunk := await request.content.readany():
        received += len(chunk)
    return web.json_response({"status": "uploading", "received": received})


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", discard)
    runner = web.AppRunner(app, access_log=None, read_bufsize=256 * 1024)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock)
    await site.start()
    print(f"sink listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    keep_freed_heap()  # as chunkserver does: the same allocator, a fair floor
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
