"""Real `chunkserver serve` processes: shared data folders, workers, crashes and restarts."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests

from .conftest import ServerProcess, crc64, split, temp_files
from .reference import metric_value

pytestmark = pytest.mark.slow


def post_chunk(url: str, file_id: str, index: int, total: int, data: bytes, **kw) -> dict:
    """The seed's Python client, one chunk."""
    response = requests.post(
        f"{url}/upload-chunk",
        files={"chunk": ("chunk", data, "application/octet-stream")},
        data={
            "file_id": file_id,
            "chunk_index": index,
            "total_chunks": total,
            "filename": "f.bin",
            **kw,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_two_processes_share_one_data_folder(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    a, b = servers(), servers()
    data = os.urandom(20 * 10_000)
    chunks = split(data, 10_000)
    answers = []
    for i, chunk in enumerate(chunks):
        here, there = (a, b) if i % 2 == 0 else (b, a)
        answers.append(post_chunk(here.url, "shared", i, len(chunks), chunk))
        if i < len(chunks) - 1:
            # a status read from the other process right after the acknowledgement reflects it
            status = requests.get(f"{there.url}/upload-status/shared", timeout=10).json()
            assert status["uploaded_chunks"] == i + 1
            assert answers[-1]["uploaded_chunks"] == i + 1
    assert answers[-1]["status"] == "completed"
    assert answers[-1]["crc64nvme"] == crc64(data)
    for server in (a, b):
        status = requests.get(f"{server.url}/upload-status/shared", timeout=10).json()
        assert status["status"] == "completed"
        assert requests.get(f"{server.url}/files/shared", timeout=10).content == data


def test_two_processes_race_on_the_last_chunks(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    a, b = servers(), servers()
    data = os.urandom(64 * 8192)
    chunks = split(data, 8192)

    def send(i: int) -> dict:
        return post_chunk((a, b)[i % 2].url, "race", i, len(chunks), chunks[i])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, reversed(range(len(chunks)))))
    completed = [x for x in answers if x["status"] == "completed"]
    assert completed and all(x["crc64nvme"] == crc64(data) for x in completed)
    assert requests.get(f"{a.url}/files/race", timeout=10).content == data
    # Exactly one merge: the processes on one data folder count into one total, which
    # each of them reports (prometheus-client's multiprocess mode), so two merges read 2.
    for server in (a, b):
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        assert metric_value(text, "chunkserver_uploads_completed_total") == 1
    # the process that lost the completion brought no chunk folder (or .lock) back
    assert not (tmp_path / "data" / "chunks" / "race").exists()
    assert (
        "chunkserver_uploads_in_progress 0.0" in requests.get(f"{a.url}/metrics", timeout=10).text
    )


def test_workers_share_a_port_and_their_metrics(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers("--workers", "2")
    assert "2 workers" in "".join(server.output)
    data = os.urandom(40 * 5000)
    chunks = split(data, 5000)
    for i, chunk in enumerate(chunks):
        answer = post_chunk(server.url, "w", i, len(chunks), chunk)
    assert answer["crc64nvme"] == crc64(data)
    assert requests.get(f"{server.url}/files/w", timeout=10).content == data
    # each worker publishes its counters; any of them answers for all
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        if f"chunkserver_chunks_stored_total {len(chunks)}" in text:
            break
        time.sleep(0.5)
    assert f"chunkserver_chunks_stored_total {len(chunks)}.0" in text
    # prometheus-client's multiprocess files: one set per worker
    files = list((tmp_path / "data" / ".metrics").glob("counter_*.db"))
    assert len(files) == 2
    assert server.stop() == 0
    assert not any(f.exists() for f in files)  # a clean stop takes its figures with it


def test_workers_die_with_their_supervisor(servers: Callable[..., ServerProcess]) -> None:
    """SIGKILL gives the supervisor no chance to stop its workers: the kernel kills them
    (PR_SET_PDEATHSIG), so no orphan keeps serving on the port beside the next start."""
    server = servers("--workers", "2")
    workers = psutil.Process(server.process.pid).children()
    assert len(workers) == 2
    server.kill()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/healthz", timeout=5)


def test_metrics_forget_a_dead_process(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    first = servers()
    post_chunk(first.url, "dead", 0, 2, b"x")
    text = requests.get(f"{first.url}/metrics", timeout=10).text
    assert "chunkserver_chunks_stored_total 1.0" in text
    first.kill()  # SIGKILL: its file stays behind
    folder = tmp_path / "data" / ".metrics"
    left = list(folder.glob(f"counter_{first.process.pid}.db"))
    assert left
    second = servers()
    text = requests.get(f"{second.url}/metrics", timeout=10).text
    assert "chunkserver_chunks_stored_total 0.0" in text
    assert not any(f.exists() for f in left)


def test_sigkill_mid_upload_then_restart(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    server = servers()
    size = 400_000  # a body over 256 KiB: received into reused buffers, written as it comes
    data = os.urandom(10 * size)
    chunks = split(data, size)
    for i in range(6):
        post_chunk(server.url, "crash", i, len(chunks), chunks[i])
    # a chunk half sent when the process dies: never acknowledged, so it must not count
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    boundary = "zzz"
    head = (
        "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            for k, v in {
                "file_id": "crash",
                "chunk_index": 6,
                "total_chunks": 10,
                "filename": "f.bin",
            }.items()
        )
        + f'--{boundary}\r\nContent-Disposition: form-data; name="chunk"; filename="b"\r\n\r\n'
    )
    sock.sendall(
        f"POST /upload-chunk HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {size + 1000}\r\n\r\n{head}".encode()
        + b"x" * (size // 2)
    )
    # The kill lands mid-chunk: some of chunk 6's bytes are in the data file, past chunk 5.
    data_file = data_dir / "chunks" / "crash" / ".data"
    deadline = time.monotonic() + 10
    while data_file.stat().st_size <= 6 * size and time.monotonic() < deadline:
        time.sleep(0.02)
    assert data_file.stat().st_size > 6 * size, "chunk 6 should be streaming into place"
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(10)
    sock.close()

    again = servers()
    status = requests.get(f"{again.url}/upload-status/crash", timeout=10).json()
    assert status["status"] == "uploading"
    assert status["uploaded_chunks"] == 6
    assert status["missing_chunks"] == [6, 7, 8, 9]
    assert temp_files(data_dir) == []  # the dead process's partial chunk was swept at start
    for i in status["missing_chunks"]:
        answer = post_chunk(again.url, "crash", i, len(chunks), chunks[i])
    assert answer["status"] == "completed" and answer["crc64nvme"] == crc64(data)
    assert (data_dir / "uploads" / "crash" / "f.bin").read_bytes() == data


def test_restart_after_completion(servers: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = servers()
    post_chunk(server.url, "kept", 0, 2, b"first ")
    post_chunk(server.url, "kept", 1, 2, b"second")
    assert server.stop(signal.SIGTERM) == 0
    again = servers()
    status = requests.get(f"{again.url}/upload-status/kept", timeout=10).json()
    assert status["status"] == "completed" and status["size"] == 12
    assert requests.get(f"{again.url}/files/kept", timeout=10).content == b"first second"
    assert post_chunk(again.url, "kept", 1, 2, b"again!")["status"] == "completed"


def test_unix_socket_and_clean_stop(servers: Callable[..., ServerProcess], tmp_path: Path) -> None:
    import http.client

    path = tmp_path / "cs.sock"
    server = servers("--unix-socket", str(path))
    assert server.url == f"unix:{path}"

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(path))

    connection = UnixConnection("localhost")
    connection.request("GET", "/healthz")
    assert connection.getresponse().read() == b'{"status": "ok"}'
    connection.close()
    assert server.stop(signal.SIGINT) == 0
    assert not path.exists()
