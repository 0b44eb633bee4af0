"""Durability and failure paths: fsync, a full disk, shutdown with a chunk in flight,
and the client address behind a trusted proxy."""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from chunkserver import Config
from chunkserver.http.app import access_logger_for, client_address
from chunkserver.storage.local import receive as local_receive

from .conftest import (
    ClientFactory,
    ServerProcess,
    chunk_form,
    crc64,
    stored_chunks,
    temp_files,
    wait_until,
)


@pytest.mark.parametrize("fsync", [True, False])
async def test_fsync_mode_syncs_every_chunk_before_its_answer(
    make_client: ClientFactory, config: Config, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    """With fsync = true each chunk's bytes and record are synced before it is answered, and
    the merge syncs the file and its folders; with false, nothing is synced at all."""
    synced: list[int] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counting(fd: int, real=real) -> None:
            synced.append(fd)
            real(fd)

        monkeypatch.setattr(os, name, counting)
    client = await make_client(fsync=fsync)
    data = os.urandom(300_000)
    for i, part in enumerate((data[:100_000], data[100_000:200_000], data[200_000:])):
        before = len(synced)
        resp = await client.post("/upload-chunk", data=chunk_form(f"sync{fsync}", i, 3, part))
        assert resp.status == 200
        # the chunk's data and its record synced before the answer: two at least
        assert len(synced) - before >= (2 if fsync else 0), (i, synced)
    assert (await resp.json())["crc64nvme"] == crc64(data)
    final = Path(config.data_dir) / "uploads" / f"sync{fsync}" / "file.bin"
    assert final.read_bytes() == data
    if not fsync:
        assert synced == []


async def test_disk_full_while_writing_is_507_and_removes_the_chunk(
    client, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (
        await client.post("/upload-chunk", data=chunk_form("full", 0, 3, b"kept"))
    ).status == 200
    real_write = local_receive.pwritev_all

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_receive, "pwritev_all", full)
    resp = await client.post("/upload-chunk", data=chunk_form("full", 1, 3, b"x" * 2_000_000))
    assert resp.status == 507
    assert await resp.json() == {"detail": "Chunk upload failed: disk space full"}
    assert temp_files(Path(config.data_dir)) == []
    monkeypatch.setattr(local_receive, "pwritev_all", real_write)
    status = await (await client.get("/upload-status/full")).json()
    assert status["uploaded_chunks"] == 1 and status["missing_chunks"] == [1, 2]
    # space is back: the upload finishes with its earlier chunk intact
    for i in (1, 2):
        resp = await client.post("/upload-chunk", data=chunk_form("full", i, 3, b"more"))
    assert (await resp.json())["crc64nvme"] == crc64(b"keptmoremore")
    assert (Path(config.data_dir) / "uploads" / "full" / "file.bin").read_bytes() == b"keptmoremore"


def test_sigterm_with_a_chunk_in_flight_leaves_no_partial_chunk(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        "".join(
            f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            for k, v in {
                "file_id": "term",
                "chunk_index": 0,
                "total_chunks": 2,
                "filename": "f",
            }.items()
        )
        + '--b\r\nContent-Disposition: form-data; name="chunk"; filename="b"\r\n\r\n'
    )
    sock.sendall(
        b"POST /upload-chunk HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 3000000\r\n\r\n" + head.encode() + b"x" * 1_200_000
    )
    data_file = tmp_path / "data" / "chunks" / "term" / ".data"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if data_file.exists() and data_file.stat().st_size >= 1 << 20:
            break
        time.sleep(0.05)
    # past the first 1 MiB write batch, the chunk is streaming into the upload's data file
    assert data_file.stat().st_size >= 1 << 20, "the chunk should be streaming in place"
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    sock.close()  # the client gives up: the cut chunk must not stay behind
    assert server.process.wait(20) == 0
    assert temp_files(tmp_path / "data") == []
    assert stored_chunks(tmp_path / "data" / "chunks" / "term") == {}


def test_client_address_trusts_only_configured_proxies() -> None:
    trusted = access_logger_for(Config(trusted_proxies=("127.0.0.1", "10.0.0.0/8"))).trusted

    def request(peer: str, forwarded: str | None):
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        req = make_mocked_request("GET", "/", headers=headers)
        req._transport_peername = (peer, 1234)  # type: ignore[attr-defined]
        return req

    assert client_address(request("127.0.0.1", "203.0.113.9"), trusted) == "203.0.113.9"
    # the last hop that is not a trusted proxy is the client
    assert (
        client_address(request("127.0.0.1", "198.51.100.1, 203.0.113.9, 10.1.2.3"), trusted)
        == "203.0.113.9"
    )
    # an untrusted peer cannot claim another address
    assert client_address(request("192.0.2.7", "203.0.113.9"), trusted) == "192.0.2.7"
    assert client_address(request("127.0.0.1", "203.0.113.9"), ()) == "127.0.0.1"
    # "unix" trusts the peer on the unix socket (nginx on the same host)
    unix = access_logger_for(Config(trusted_proxies=("unix",))).trusted
    assert client_address(request("", "198.51.100.1, 127.0.0.1"), unix) == "127.0.0.1"
    assert client_address(request("", None), unix) == "unix"
    assert client_address(request("", "203.0.113.9"), ()) == "unix"


def test_access_log_shows_the_forwarded_client(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    import requests

    config = tmp_path / "c.toml"
    config.write_text('trusted_proxies = ["127.0.0.1"]\naccess_log = true\n')
    server = servers("--config", str(config))
    requests.get(f"{server.url}/healthz", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any('203.0.113.9 - "GET /healthz' in line for line in server.output):
            break
        time.sleep(0.05)
    assert any('203.0.113.9 - "GET /healthz HTTP/1.1" 200' in line for line in server.output)


def test_sigterm_lets_a_chunk_in_flight_finish(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    fields = {"file_id": "drain", "chunk_index": 0, "total_chunks": 2, "filename": "f"}
    head = (
        "".join(
            f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            for k, v in fields.items()
        )
        + '--b\r\nContent-Disposition: form-data; name="chunk"; filename="b"\r\n\r\n'
    )
    tail = b"\r\n--b--\r\n"
    body = head.encode() + b"y" * 400_000 + tail
    sock.sendall(
        b"POST /upload-chunk HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:200_000]
    )
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the server is stopping while the chunk is still arriving
    sock.sendall(body[200_000:])
    answer = sock.recv(65536).decode()
    sock.close()
    assert answer.startswith("HTTP/1.1 200"), answer
    assert "Connection: close" in answer
    assert '"uploaded_chunks": 1' in answer
    # It stops once that chunk is answered, well before the drain's own deadline would
    # cut it (the process ends: its exit status is 0).
    assert server.process.wait(20) == 0
    folder = tmp_path / "data" / "chunks" / "drain"
    record = stored_chunks(folder)[0]
    assert record.length == 400_000 and record.aside == ""
    assert (folder / ".data").read_bytes()[:400_000] == b"y" * 400_000


def test_malformed_requests_log_one_warning_line_not_tracebacks(
    servers: Callable[..., ServerProcess],
) -> None:
    """A NUL in a header is the client's fault: aiohttp answers 400, and the log says so in
    one WARNING line for many such requests, never an ERROR with a traceback each."""
    server = servers()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=5) as connection:
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
            assert connection.recv(100).startswith(b"HTTP/1.0 400")
    wait_until(
        lambda: "malformed request" in "".join(server.output), "the malformed request's line"
    )
    text = "".join(server.output)
    assert "Traceback" not in text and " ERROR " not in text, text
    warnings = [line for line in text.splitlines() if "malformed request" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], warnings
    assert "Invalid header value char" in warnings[0]
