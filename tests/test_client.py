"""The Python client and `chunkserver upload`/`status`, against a real server."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from chunkserver import Config, create_app
from chunkserver.cli import ProgressBar
from chunkserver.client import (
    Backoff,
    Progress,
    UploadError,
    get_status_async,
    parse_size,
    upload_file_async,
)

from .conftest import ServerProcess, crc64

FAST = Backoff(base=0.01, cap=0.05)


class Recorder:
    """A middleware that counts chunk requests, the most in flight at once, and injects faults."""

    def __init__(self, fail_every: int = 0, drop_every: int = 0) -> None:
        self.posts = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_every = fail_every
        self.drop_every = drop_every
        self.faults = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.path != "/upload-chunk":
            return await handler(request)
        self.posts += 1
        number = self.posts
        if self.fail_every and number % self.fail_every == 0:
            self.faults += 1
            return web.json_response(
                {"detail": "try later"}, status=503, headers={"Retry-After": "0"}
            )
        if self.drop_every and number % self.drop_every == 0:
            self.faults += 1
            await request.content.read(1000)
            assert request.transport is not None
            request.transport.abort()  # the connection drops mid-request
            return web.Response(status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # long enough for parallel requests to overlap
            return await handler(request)
        finally:
            self.in_flight -= 1


@pytest.fixture
def make_server(aiohttp_server, config: Config):
    async def make(recorder: Recorder | None = None, **overrides) -> tuple[str, Recorder]:
        recorder = recorder or Recorder()
        app = create_app(config.replace(**overrides))
        app.middlewares.insert(0, recorder.middleware)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/"), recorder

    return make


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(10 * 65536 + 123)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    return path, data


async def test_upload_arrives_identical_with_chunks_in_parallel(
    make_server, big_file, config
) -> None:
    url, recorder = await make_server()
    path, data = big_file
    seen: list[Progress] = []
    result = await upload_file_async(
        path, url, chunk_size=65536, concurrency=4, progress=seen.append
    )
    assert result["verified"] is True and result["crc64nvme"] == crc64(data)
    stored = Path(config.data_dir) / "uploads" / result["file_id"] / "payload.bin"
    assert stored.read_bytes() == data
    assert recorder.posts == 11 and recorder.max_in_flight > 1
    assert seen[-1].bytes_done == len(data) and seen[-1].chunks_done == 11
    assert [p.chunks_done for p in seen] == list(range(1, 12))


async def test_retries_through_503s_and_dropped_connections(make_server, big_file) -> None:
    url, recorder = await make_server(Recorder(fail_every=3, drop_every=5))
    path, data = big_file
    result = await upload_file_async(path, url, chunk_size=65536, concurrency=3, backoff=FAST)
    assert result["crc64nvme"] == crc64(data)
    assert recorder.faults >= 3
    assert result["requests"] > 11


async def test_interrupted_upload_resumes_sending_only_missing_chunks(
    make_server, big_file, config
) -> None:
    url, recorder = await make_server()
    path, data = big_file

    class Interrupt(Exception):
        pass

    def stop_halfway(progress: Progress) -> None:
        if progress.chunks_done == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        await upload_file_async(path, url, chunk_size=65536, concurrency=1, file_id="resume-me",
                                progress=stop_halfway)  # fmt: skip
    status = await get_status_async(url, "resume-me")
    assert status["uploaded_chunks"] == 5
    posts_before = recorder.posts
    result = await upload_file_async(
        path, url, chunk_size=65536, concurrency=3, file_id="resume-me"
    )
    assert result["chunks_sent"] == 6 and recorder.posts - posts_before == 6
    assert result["crc64nvme"] == crc64(data)
    # and once complete, asking again sends nothing and still verifies
    again = await upload_file_async(path, url, chunk_size=65536, file_id="resume-me")
    assert again["chunks_sent"] == 0 and again["verified"]


async def test_client_error_fails_at_once_with_the_servers_detail(make_server, big_file) -> None:
    url, recorder = await make_server(max_chunk_bytes=1000)
    path, _ = big_file
    with pytest.raises(UploadError, match="max_chunk_bytes") as raised:
        await upload_file_async(path, url, chunk_size=65536, concurrency=1, backoff=FAST)
    assert raised.value.status == 413
    assert recorder.posts == 1  # no retry of a 4xx


async def test_retries_are_bounded(make_server, big_file) -> None:
    url, recorder = await make_server(Recorder(fail_every=1))
    path, _ = big_file
    with pytest.raises(UploadError, match="giving up after 3 attempts"):
        await upload_file_async(path, url, chunk_size=65536, concurrency=1, retries=2, backoff=FAST)
    assert recorder.posts == 3


async def test_resuming_with_another_chunk_size_is_refused(make_server, big_file) -> None:
    url, _ = await make_server()
    path, _ = big_file

    def stop(progress: Progress) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        await upload_file_async(
            path, url, chunk_size=65536, concurrency=1, file_id="x", progress=stop
        )
    with pytest.raises(UploadError, match="chunk size"):
        await upload_file_async(path, url, chunk_size=100_000, file_id="x")


def test_parse_size() -> None:
    assert parse_size("4MiB") == 4 * 2**20
    assert parse_size("5MB") == 5_000_000
    assert parse_size("1048576") == 1048576
    assert parse_size("1.5 KiB") == 1536
    for bad in ("", "MiB", "4 parsecs", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_progress_bar_draws_bytes_speed_and_eta() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar(Progress("id", 5 * 2**20, 10 * 2**20, 5, 10, 1.0))
    bar(Progress("id", 10 * 2**20, 10 * 2**20, 10, 10, 2.0))
    text = out.getvalue()  # (updates within 0.1 s of the last one are not redrawn)
    assert "100%|" in text and "10.0M/10.0M" in text and "B/s]" in text
    assert text.endswith("\n")


# -- the command line, on a real server process ----------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chunkserver", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_upload_and_status(servers: Callable[..., ServerProcess], big_file) -> None:
    server = servers()
    path, data = big_file
    done = run_cli("upload", str(path), "--url", server.url, "--chunk-size", "64KiB")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["verified"] is True and result["crc64nvme"] == crc64(data)
    assert "\r[" not in done.stderr  # no progress bar when not on a terminal
    # rerunning the same command finds the upload by the file's path, size and mtime
    again = run_cli("upload", str(path), "--url", server.url, "--chunk-size", "64KiB", "--quiet")
    assert again.returncode == 0 and again.stderr == ""
    assert json.loads(again.stdout.splitlines()[-1])["chunks_sent"] == 0
    status = run_cli("status", result["file_id"], "--url", server.url)
    assert status.returncode == 0
    assert json.loads(status.stdout)["status"] == "completed"
    missing = run_cli("status", "nobody", "--url", server.url)
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {"status": "not_found", "file_exists": False}


def test_cli_upload_failure_exits_1_with_json(big_file, tmp_path: Path) -> None:
    path, _ = big_file
    failed = run_cli(
        "upload", str(path), "--url", "http://127.0.0.1:9", "--retries", "0", "--quiet"
    )
    assert failed.returncode == 1
    last = json.loads(failed.stdout.strip().splitlines()[-1])
    assert last["status"] == "failed" and last["detail"]
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    mistakes = {
        "not a size": ["upload", str(path), "--chunk-size", "lots"],
        "KEY=VALUE": ["upload", str(path), "--metadata", "no-equals-sign"],
        "not a file:": ["upload", str(tmp_path / "nothing")],
        "not a file_id": ["upload", str(path), "--file-id", "../files/x"],
        "not a file_id:": ["status", "../files/demo1"],
    }
    for word, args in mistakes.items():
        done = run_cli(*args)
        assert done.returncode == 2 and done.stdout == "", args
        assert done.stderr.count("\n") == 1 and word in done.stderr, (args, done.stderr)


def test_cli_says_in_one_line_when_a_server_is_not_chunkserver(
    servers: Callable[..., ServerProcess], big_file
) -> None:
    """A URL of the tus endpoint, or a server that answers something else (here a plain
    HTTP file server): one line naming the URL and what came back, exit 1, no traceback."""
    import http.server
    import threading

    server = servers()
    path, _ = big_file
    wrong = run_cli("upload", str(path), "--url", server.url + "/tus/", "--quiet")
    assert wrong.returncode == 1, wrong.stderr
    assert wrong.stderr.count("\n") == 1 and "/tus/upload-status/" in wrong.stderr
    assert json.loads(wrong.stdout.splitlines()[-1])["status"] == "failed"
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        for args in (
            ["status", "demo1", "--url", url],
            ["upload", str(path), "--url", url, "--quiet"],
        ):
            done = run_cli(*args)
            assert done.returncode == 1, args
            assert done.stderr.count("\n") == 1, done.stderr
            assert url in done.stderr and "did not answer as chunkserver" in done.stderr
            assert "Traceback" not in done.stderr
    finally:
        other.shutdown()
        other.server_close()


def test_cli_upload_with_metadata(servers: Callable[..., ServerProcess], big_file) -> None:
    server = servers()
    path, _ = big_file
    done = run_cli(
        "upload", str(path), "--url", server.url, "--chunk-size", "256KiB", "--quiet",
        "--metadata", "user=42", "--metadata", "note=a=b", "--file-id", "with-meta",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    status = json.loads(run_cli("status", "with-meta", "--url", server.url).stdout)
    assert status["metadata"] == {"user": "42", "note": "a=b"}


def test_cli_checksum(tmp_path: Path) -> None:
    data = os.urandom(5 * 2**20 + 3)  # more than one of its 4 MiB reads
    path = tmp_path / "some.bin"
    path.write_bytes(data)
    done = run_cli("checksum", str(path))
    assert (done.returncode, done.stdout, done.stderr) == (0, crc64(data) + "\n", "")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert run_cli("checksum", str(empty)).stdout == crc64(b"") + "\n"
    missing = run_cli("checksum", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "No such file" in missing.stderr


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--retries", "-1"], "--retries"),
        (["--url", "localhost:8000"], "--url"),
    ],
)
def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path: Path, args, word) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    done = run_cli("upload", str(path), *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and word in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_header_line_too_long_is_431_in_json(servers: Callable[..., ServerProcess]) -> None:
    """A header line over 8,190 bytes (nginx's and aiohttp's limit): 431 in JSON like every
    error, not the parser's plain-text 400 echoing the header."""
    import requests

    server = servers()
    resp = requests.get(f"{server.url}/upload-status/x", headers={"X-Big": "a" * 9000}, timeout=10)
    assert resp.status_code == 431
    assert resp.headers["Content-Type"].startswith("application/json")
    assert "header" in resp.json()["detail"] and "aaaa" not in resp.text
    fine = requests.get(f"{server.url}/upload-status/x", headers={"X-Big": "a" * 8000}, timeout=10)
    assert fine.status_code == 404


def test_serve_workers_takes_a_number_or_auto() -> None:
    done = run_cli("serve", "--workers", "nope")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert '"auto" or a whole number' in done.stderr, done.stderr


def test_cli_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("chunkserver ")
    helped = run_cli("status", "--help").stdout
    assert "--url URL      server" in helped and "bearer token" in helped


def test_serve_says_what_it_uses_and_which_address_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 1
    assert f"data folder {tmp_path / 'd'}" in done.stdout and "configuration" in done.stdout
    assert f"cannot serve on 127.0.0.1:{port}" in done.stderr, done.stderr


def test_cli_upload_waits_for_a_server_that_is_not_up_yet(
    servers: Callable[..., ServerProcess], big_file
) -> None:
    """The first status request is retried like the chunks (--retries)."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path, data = big_file
    command = [sys.executable, "-m", "chunkserver", "upload", str(path), "--url",
               f"http://127.0.0.1:{port}", "--chunk-size", "256KiB", "--quiet", "--retries", "8"]  # fmt: skip
    uploading = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    servers("--port", str(port))
    out, _ = uploading.communicate(timeout=120)
    assert uploading.returncode == 0, out
    assert json.loads(out.splitlines()[-1])["crc64nvme"] == crc64(data)
