"""Large bodies read straight from the socket into reused buffers (chunkserver/http/bodyreader.py):
the bytes stored are the bytes sent, and the connection goes on as aiohttp's would."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from chunkserver.http import bodyreader

from .conftest import (
    ClientFactory,
    ServerProcess,
    chunk_form,
    crc64,
    downloaded,
    split,
    temp_files,
)

BOTH_BACKENDS = True
MiB = 2**20
BOUNDARY = "b0undaryb0undary"


def chunk_request(file_id: str, index: int, total: int, data: bytes) -> bytes:
    """A whole POST /upload-chunk request, its chunk part last, as raw bytes."""
    fields = {"file_id": file_id, "chunk_index": index, "total_chunks": total, "filename": "f"}
    body = "".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ).encode()
    body += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="chunk"; filename="b"\r\n'.encode()
    )
    body += b"Content-Type: application/octet-stream\r\n\r\n" + data
    body += f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (
        "POST /upload-chunk HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_answer(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer from a socket's file: status, headers (lower-case), body."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", "0")))


def connect(server: ServerProcess) -> socket.socket:
    url = urlsplit(server.url)
    assert url.hostname is not None and url.port is not None
    return socket.create_connection((url.hostname, url.port), timeout=20)


@pytest.fixture
def takeovers(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each body taken over from aiohttp in this process."""
    taken: list[object] = []

    class Counted(bodyreader._Takeover):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            taken.append(self)

    monkeypatch.setattr(bodyreader, "_Takeover", Counted)
    return taken


async def test_large_chunks_are_received_into_reused_buffers(
    make_client: ClientFactory, backend: str, takeovers: list[object]
) -> None:
    client = await make_client()
    proof = len(takeovers)  # the start's proof took one body over (local disk only)
    assert proof == (1 if backend == "local" else 0)
    takeovers.clear()
    data = os.urandom(3 * MiB + 5)
    pieces = split(data, MiB)
    for index, piece in enumerate(pieces):
        form = chunk_form("big", index, len(pieces), piece, chunk_first=index == 1)
        resp = await client.post("/upload-chunk", data=form)
        assert resp.status == 200, await resp.text()
    assert await downloaded(client, "big") == data
    # The last chunk is 5 bytes (aiohttp has it whole); on S3 pieces go on to its client.
    assert len(takeovers) == (3 if backend == "local" else 0)


def test_requests_pipelined_behind_a_large_body_are_answered(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers()
    first, second = os.urandom(2 * MiB), os.urandom(MiB + 7)
    with connect(server) as sock, sock.makefile("rb") as stream:
        sock.sendall(
            chunk_request("pipe", 0, 2, first)
            + b"GET /upload-status/pipe HTTP/1.1\r\nHost: x\r\n\r\n"
            + chunk_request("pipe", 1, 2, second)
        )
        status, _, body = read_answer(stream)
        assert status == 200 and b'"uploaded_chunks": 1' in body
        status, _, body = read_answer(stream)
        assert status == 200 and b'"uploaded_chunks": 1' in body
        status, _, body = read_answer(stream)
        assert status == 200 and b'"status": "completed"' in body
        sock.sendall(b"GET /files/pipe HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_answer(stream)
        assert status == 200 and body == first + second


def test_a_body_sent_in_small_pieces_with_pauses_is_stored_whole(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers()
    data = os.urandom(MiB + 12345)
    request = chunk_request("trickle", 0, 1, data)
    with connect(server) as sock, sock.makefile("rb") as stream:
        for start in range(0, len(request), 7001):
            sock.sendall(request[start : start + 7001])
            if start % (50 * 7001) == 0:
                time.sleep(0.01)
        status, _, body = read_answer(stream)
        assert status == 200 and b'"status": "completed"' in body
        assert f'"crc64nvme": "{crc64(data)}"'.encode() in body
    assert requests.get(f"{server.url}/files/trickle", timeout=10).content == data


def test_an_answer_given_before_the_body_ends_keeps_the_connection(
    servers: Callable[..., ServerProcess],
) -> None:
    server = servers()
    with connect(server) as sock, sock.makefile("rb") as stream:
        sock.sendall(chunk_request("early", 0, 1, b"done"))
        assert read_answer(stream)[0] == 200
    request = chunk_request("early", 0, 1, os.urandom(2 * MiB))
    with connect(server) as sock, sock.makefile("rb") as stream:
        sock.sendall(request[: 600 * 1024])  # the upload is complete: answered at once
        status, _, body = read_answer(stream)
        assert status == 200 and b'"status": "completed"' in body
        sock.sendall(request[600 * 1024 :])  # read and dropped
        sock.sendall(b"GET /files/early HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(stream)[2] == b"done"


def test_a_client_gone_mid_body_leaves_nothing_and_the_chunk_can_be_sent_again(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers()
    data = os.urandom(3 * MiB)
    request = chunk_request("gone", 0, 2, data)
    with connect(server) as sock:
        sock.sendall(request[: 2 * MiB])
        time.sleep(0.3)
    time.sleep(0.3)
    assert temp_files(tmp_path / "data") == []
    with connect(server) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"GET /upload-status/gone HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_answer(stream)
        assert status == 404 or b'"uploaded_chunks": 0' in body
        sock.sendall(request)
        status, _, body = read_answer(stream)
        assert status == 200 and b'"uploaded_chunks": 1' in body


async def test_a_client_that_stalls_mid_body_gets_408(
    make_client: ClientFactory, backend: str
) -> None:
    client = await make_client(idle_timeout_seconds=0.5)
    request = chunk_request("stall", 0, 2, os.urandom(2 * MiB))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(request[: 700 * 1024])
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    # the stalled chunk was the upload's first: nothing of it remains, not even the upload
    assert (await client.get("/upload-status/stall")).status == 404
    resp = await client.post("/upload-chunk", data=chunk_form("stall", 0, 2, b"x" * MiB))
    assert resp.status == 200


async def test_the_takeover_is_used_only_once_proven(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proof at start: True with the installed aiohttp; False (every body then read
    through aiohttp) when a taken-over body would leave the connection unable to parse the
    request after it, or when aiohttp lacks the internals relied on."""
    assert await bodyreader.takeover_proven()
    monkeypatch.setattr(bodyreader, "restart_parser", lambda handler: None)
    assert not await bodyreader.takeover_proven()
    monkeypatch.undo()
    monkeypatch.setattr(bodyreader, "internals_present", lambda: False)
    assert not await bodyreader.takeover_proven()
    assert bodyreader.receive_buffers_for("local") is None
