"""Protection against slow and greedy clients, and a disk that really fills."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chunkserver import Config

from .conftest import ClientFactory, chunk_form, crc64, temp_files

MiB = 2**20


def raw_head(file_id: str, index: int = 0, total: int = 2, boundary: str = "bb") -> bytes:
    fields = {"file_id": file_id, "chunk_index": index, "total_chunks": total, "filename": "f"}
    head = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    )
    head += f'--{boundary}\r\nContent-Disposition: form-data; name="chunk"; filename="b"\r\n\r\n'
    return (
        b"POST /upload-chunk HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
        + b"Content-Length: 1000000\r\n\r\n"
        + head.encode()
    )


async def test_slowloris_is_cut_off_and_its_chunk_removed(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client(idle_timeout_seconds=0.5)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(raw_head("slow"))
    for _ in range(3):  # a trickle at first, then nothing
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.2)
    answer = await asyncio.wait_for(reader.read(), timeout=5)  # the server closes the connection
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"no data received for 0.5 seconds" in answer
    assert temp_files(Path(config.data_dir)) == []
    assert (await client.get("/upload-status/slow")).status == 404
    ok = await client.post("/upload-chunk", data=chunk_form("slow", 0, 2, b"fast"))
    assert ok.status == 200


async def test_too_many_chunks_in_flight_get_503_with_retry_after(
    make_client: ClientFactory,
) -> None:
    client = await make_client(max_inflight_chunks=2, idle_timeout_seconds=5)
    stalled = []
    for i in range(2):  # two chunks that hold their slots
        _reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(raw_head(f"hold{i}") + b"x" * 1000)
        await writer.drain()
        stalled.append(writer)
    await asyncio.sleep(0.2)
    resp = await client.post("/upload-chunk", data=chunk_form("third", 0, 1, b"z"))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert "max_inflight_chunks" in (await resp.json())["detail"]
    assert (await client.get("/upload-status/third")).status == 404  # other routes still answer
    for writer in stalled:
        writer.close()
    await asyncio.sleep(0.3)
    resp = await client.post("/upload-chunk", data=chunk_form("third", 0, 1, b"z"))
    assert resp.status == 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs of the test's own, where the test may mount one (root, Linux)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_disk_full_mid_chunk_then_recovery(aiohttp_client, small_disk: Path) -> None:
    from chunkserver import create_app

    data_dir = small_disk / "data"
    client = await aiohttp_client(
        create_app(Config(data_dir=str(data_dir), min_free_bytes=0, access_log=False))
    )
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (30 * MiB))
    chunks = [os.urandom(4 * MiB) for _ in range(3)]
    file_id = uuid.uuid4().hex
    for i in range(2):
        resp = await client.post("/upload-chunk", data=chunk_form(file_id, i, 3, chunks[i]))
        assert resp.status == 200, await resp.text()
    # announced first, the chunk is refused before a byte is written
    resp = await client.post("/upload-chunk", data=chunk_form(file_id, 2, 3, chunks[2]))
    assert resp.status == 507
    # sent before its fields, it runs into ENOSPC while streaming: 507, and removed
    resp = await client.post(
        "/upload-chunk", data=chunk_form(file_id, 2, 3, chunks[2], chunk_first=True)
    )
    assert resp.status == 507
    assert await resp.json() == {"detail": "Chunk upload failed: disk space full"}
    assert temp_files(data_dir) == []
    status = await (await client.get(f"/upload-status/{file_id}")).json()
    assert status["uploaded_chunks"] == 2 and status["missing_chunks"] == [2]
    stored = (data_dir / "chunks" / file_id / ".data").read_bytes()
    for i in range(2):  # in place in the upload's data file, intact
        assert stored[i * 4 * MiB : (i + 1) * 4 * MiB] == chunks[i]
    # Full, the data folder is still writable (a file can be created): health says ok,
    # the 507s say why chunks are refused.
    assert (await client.get("/healthz")).status == 200
    filler.unlink()  # space comes back: the upload finishes
    resp = await client.post("/upload-chunk", data=chunk_form(file_id, 2, 3, chunks[2]))
    body = await resp.json()
    assert body["status"] == "completed" and body["crc64nvme"] == crc64(b"".join(chunks))
