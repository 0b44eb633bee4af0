"""Compare the hand-written CORS middleware with aiohttp-cors on the same app and requests.

    python bench/cors_compare.py     (needs aiohttp-cors: pip install aiohttp-cors)

Prints, for each case, the status and the CORS headers each one gives. The result and the
decision are in docs/clients.md ("CORS: the hand-written middleware or aiohttp-cors").
"""

from __future__ import annotations

import asyncio
import tempfile
import warnings
from collections.abc import Callable

import aiohttp_cors  # type: ignore[import-untyped]
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from chunkserver import Config, create_app

ORIGIN = "https://app.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
CASES = [
    ("preflight of POST /upload-chunk", "OPTIONS", "/upload-chunk",
     {**PREFLIGHT, "Access-Control-Request-Headers": "authorization,content-type"}),
    ("preflight asking for x-custom", "OPTIONS", "/upload-chunk",
     {**PREFLIGHT, "Access-Control-Request-Headers": "x-custom"}),
    ("preflight of DELETE", "OPTIONS", "/uploads/x",
     {"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"}),
    ("404 of /upload-status", "GET", "/upload-status/x", {"Origin": ORIGIN}),
    ("400 of a bad id", "GET", "/upload-status/bad.id", {"Origin": ORIGIN}),
    ("404 of an unknown path", "GET", "/nope", {"Origin": ORIGIN}),
    ("another origin", "GET", "/upload-status/x", {"Origin": "https://evil.example"}),
]  # fmt: skip


def with_aiohttp_cors(config: Config) -> web.Application:
    app = create_app(config)  # without cors_origins: the hand-written middleware is off
    options = aiohttp_cors.ResourceOptions(
        expose_headers=("Content-Disposition", "Content-Length"),
        allow_headers="*",
        allow_methods="*",
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults={ORIGIN: options})
    for route in list(app.router.routes()):
        cors.add(route)  # every route by hand: one added later without it has no CORS
    return app


async def show(name: str, make: Callable[[Config], web.Application]) -> None:
    print(name)
    with tempfile.TemporaryDirectory() as folder:
        app = make(Config(data_dir=folder, min_free_bytes=0, access_log=False))
        async with TestClient(TestServer(app)) as client:
            for label, method, path, headers in CASES:
                resp = await client.request(method, path, headers=headers)
                got = {k: resp.headers.get(f"Access-Control-{k}") for k in
                       ("Allow-Origin", "Allow-Methods", "Expose-Headers")}  # fmt: skip
                print(f"  {label:34} {resp.status} {got}")


async def main() -> None:
    await show("hand-written middleware", lambda c: create_app(c.replace(cors_origins=(ORIGIN,))))
    await show("aiohttp-cors", with_aiohttp_cors)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    asyncio.run(main())
