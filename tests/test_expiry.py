"""The periodic sweep removes uploads that stopped receiving chunks (or tus PATCHes)."""

from __future__ import annotations

import asyncio
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

from chunkserver import Config

from .conftest import ClientFactory, chunk_form
from .reference import metric_value


async def test_idle_upload_expires_and_active_one_stays(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client(upload_ttl_seconds=1.0, sweep_interval_seconds=0.2)
    assert (await client.post("/upload-chunk", data=chunk_form("idle", 0, 3, b"a"))).status == 200
    assert (await client.post("/upload-chunk", data=chunk_form("busy", 0, 30, b"a"))).status == 200
    for i in range(1, 12):  # keep "busy" alive for 2.2 s, longer than the TTL
        await asyncio.sleep(0.2)
        resp = await client.post("/upload-chunk", data=chunk_form("busy", i, 30, b"a"))
        assert resp.status == 200
    resp = await client.get("/upload-status/idle")
    assert resp.status == 404
    assert await resp.json() == {"status": "not_found", "file_exists": False}
    assert not (Path(config.data_dir) / "chunks" / "idle").exists()
    assert (await (await client.get("/upload-status/busy")).json())["uploaded_chunks"] == 12
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, "chunkserver_uploads_failed_total") == 1
    # the id may be used again from scratch after it expired
    assert (await client.post("/upload-chunk", data=chunk_form("idle", 0, 1, b"z"))).status == 200


async def test_an_idle_tus_upload_expires_when_its_upload_expires_says(
    make_client: ClientFactory,
) -> None:
    client = await make_client(upload_ttl_seconds=1.0, sweep_interval_seconds=0.2)
    tus = {"Tus-Resumable": "1.0.0"}
    created = await client.post("/tus/", headers={**tus, "Upload-Length": "10"})
    path = "/tus/" + created.headers["Location"].rsplit("/tus/", 1)[1]
    before = time.time()
    patched = await client.patch(
        path,
        data=b"abc",
        headers={**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    after = time.time()
    # An HTTP date has whole seconds: the last activity plus the TTL, truncated.
    expires = parsedate_to_datetime(patched.headers["Upload-Expires"]).timestamp()
    assert before + 1.0 - 1 <= expires <= after + 1.0
    # The sweep removes it after that instant: waited for, with a deadline, not timed.
    deadline = time.monotonic() + 20
    while (await client.head(path, headers=tus)).status != 404:
        assert time.monotonic() < deadline, "the sweep should remove the expired upload"
        await asyncio.sleep(0.1)
    assert time.time() >= expires
    status = await client.get("/upload-status/" + path.rsplit("/", 1)[1])
    assert status.status == 404
