"""The deployment of deploy/nginx.conf, with a real nginx in front of two chunkserver processes."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from chunkserver.client import Backoff, upload_file_async

from .conftest import ServerProcess, crc64, start_server, wait_until

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
MiB = 2**20

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        NGINX is None, reason="no nginx binary (apt-get install nginx); .ci/run installs it"
    ),
]

MAIN_CONF = """\
{user}worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/chunkserver.conf;
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Deployment:
    url: str
    data_dir: Path
    servers: list[ServerProcess]
    nginx: subprocess.Popen[bytes]
    prefix: Path


def render(prefix: Path, run_dir: Path, data_dir: Path, port: int) -> str:
    """deploy/nginx.conf with this test's paths and port."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    for old, new in [
        ("/run/chunkserver/", f"{run_dir}/"),
        ("/var/lib/chunkserver/data/uploads/", f"{data_dir}/uploads/"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
    ]:
        assert old in text, f"deploy/nginx.conf no longer holds {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    prefix, run_dir, data_dir = tmp_path / "nginx", tmp_path / "run", tmp_path / "data"
    for folder in (prefix, run_dir, data_dir):
        folder.mkdir()
    config = tmp_path / "chunkserver.toml"
    config.write_text(
        'trusted_proxies = ["unix"]\naccess_log = true\n'
        'accel_redirect_prefix = "/_chunkserver_files/"\nmin_free_bytes = 0\n'
    )
    servers = [
        start_server(
            data_dir,
            "--config",
            str(config),
            "--unix-socket",
            str(run_dir / f"chunkserver-{i}.sock"),
        )
        for i in (1, 2)
    ]
    port = free_port()
    nginx = run_nginx(prefix, render(prefix, run_dir, data_dir, port), port)
    yield Deployment(f"http://127.0.0.1:{port}", data_dir, servers, nginx, prefix)
    stop_nginx(nginx)
    for server in servers:
        server.close()


def run_nginx(prefix: Path, site: str, port: int) -> subprocess.Popen[bytes]:
    """nginx on `prefix` with `site` as its server block; returns once it listens on `port`."""
    (prefix / "chunkserver.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(MAIN_CONF.format(prefix=prefix, user=user))
    assert NGINX is not None
    nginx = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return nginx
        except OSError:
            assert nginx.poll() is None, (prefix / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)


def stop_nginx(nginx: subprocess.Popen[bytes]) -> None:
    nginx.send_signal(signal.SIGQUIT)
    try:
        nginx.wait(10)
    except subprocess.TimeoutExpired:
        nginx.kill()


def posts_seen_by(server: ServerProcess) -> int:
    return sum('"POST /upload-chunk' in line for line in server.output)


def test_100_mib_through_nginx_spreads_over_both_processes(
    deployment: Deployment, tmp_path: Path
) -> None:
    data = os.urandom(100 * MiB)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    result = asyncio.run(
        upload_file_async(path, deployment.url, chunk_size=5 * MiB, concurrency=8, file_id="big")
    )
    assert result["verified"] and result["crc64nvme"] == crc64(data)
    assert (deployment.data_dir / "uploads" / "big" / "big.bin").read_bytes() == data
    wait_until(
        lambda: sum(posts_seen_by(s) for s in deployment.servers) >= 20,
        "the access log lines of the chunks",
    )
    counts = [posts_seen_by(s) for s in deployment.servers]
    assert sum(counts) >= 20 and min(counts) > 0, counts

    status = requests.get(f"{deployment.url}/upload-status/big", timeout=10)
    assert status.status_code == 200 and status.json()["crc64nvme"] == crc64(data)
    # the download is sent by nginx itself (X-Accel-Redirect), with Range
    whole = requests.get(f"{deployment.url}/files/big", timeout=60)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["Content-Disposition"].startswith("attachment;")
    assert "X-Accel-Redirect" not in whole.headers
    part = requests.get(f"{deployment.url}/files/big", headers={"Range": "bytes=10-19"}, timeout=10)
    assert part.status_code == 206 and part.content == data[10:20]
    assert requests.get(f"{deployment.url}/files/none", timeout=10).status_code == 404
    # the internal location cannot be asked for directly
    assert (
        requests.get(f"{deployment.url}/_chunkserver_files/big/big.bin", timeout=10).status_code
        == 404
    )


def test_too_large_chunks_get_json_413(deployment: Deployment) -> None:
    with socket.create_connection(("127.0.0.1", int(deployment.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST /upload-chunk HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 80000000\r\n\r\n"
        )
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413")
    assert "application/json" in answer
    assert '{"detail": "Request body is larger than the proxy accepts' in answer


def test_an_upstream_killed_mid_upload(deployment: Deployment, tmp_path: Path) -> None:
    data = os.urandom(40 * MiB)
    path = tmp_path / "survivor.bin"
    path.write_bytes(data)
    killed = threading.Event()

    def kill_one(progress) -> None:
        if progress.chunks_done == 10 and not killed.is_set():
            killed.set()
            os.kill(deployment.servers[0].process.pid, signal.SIGKILL)

    result = asyncio.run(
        upload_file_async(
            path,
            deployment.url,
            chunk_size=MiB,
            concurrency=4,
            file_id="survivor",
            progress=kill_one,
            backoff=Backoff(base=0.05, cap=0.5),
        )
    )
    assert killed.is_set()
    assert result["verified"] and result["crc64nvme"] == crc64(data)
    assert (deployment.data_dir / "uploads" / "survivor" / "survivor.bin").read_bytes() == data


def test_access_log_shows_the_original_client(deployment: Deployment) -> None:
    requests.get(
        f"{deployment.url}/healthz", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10
    )

    def healthz_lines() -> list[str]:
        return [line for s in deployment.servers for line in s.output if '"GET /healthz' in line]

    wait_until(lambda: bool(healthz_lines()), "the access log line of /healthz")
    lines = healthz_lines()
    # the client nginx saw (127.0.0.1), not the unix socket, and not the spoofed header
    clients = [line.split("chunkserver.access: ", 1)[1].split()[0] for line in lines]
    assert clients and all(client == "127.0.0.1" for client in clients), lines


def test_the_bench_runs_through_nginx(deployment: Deployment, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--url",
            deployment.url,
            "--smallest",
            "--no-sink",
            "--no-nginx",
            "--out",
            str(tmp_path),
            "--name",
            "via-nginx",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "via-nginx.json").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tuspy's file
def test_tus_through_nginx(deployment: Deployment, tmp_path: Path) -> None:
    """A tus client through deploy/nginx.conf: Location names nginx's address (from
    X-Forwarded-Host/-Proto), and one PATCH of the whole file streams past the 65m body
    limit of the chunk routes."""
    from tusclient import client as tusclient

    data = os.urandom(80 * MiB + 1)
    path = tmp_path / "big.iso"
    path.write_bytes(data)
    uploader = tusclient.TusClient(f"{deployment.url}/tus/").uploader(
        str(path), metadata={"filename": "big.iso"}
    )  # tuspy's default: the whole file in one PATCH
    uploader.upload()
    assert uploader.url is not None and uploader.url.startswith(f"{deployment.url}/tus/")
    file_id = uploader.url.rsplit("/", 1)[1]
    status = requests.get(f"{deployment.url}/upload-status/{file_id}", timeout=10).json()
    assert status["status"] == "completed" and status["crc64nvme"] == crc64(data)
    assert (deployment.data_dir / "uploads" / file_id / "big.iso").read_bytes() == data
    del uploader
    gc.collect()  # what tuspy left open is collected here, under this test's filter


def test_resumable_through_nginx(deployment: Deployment) -> None:
    """The IETF draft through deploy/nginx.conf: creation with the interop version (whose 104
    nginx does not pass on), Location with nginx's address, an append, HEAD, and a body past
    the chunk routes' 65m limit."""
    data = os.urandom(70 * MiB + 3)
    headers = {"Upload-Draft-Interop-Version": "8", "Upload-Complete": "?0"}
    created = requests.post(
        f"{deployment.url}/resumable/", data=data[:MiB], headers=headers, timeout=60
    )
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    assert location.startswith(f"{deployment.url}/resumable/")
    assert created.headers["Upload-Offset"] == str(MiB)
    appended = requests.patch(
        location,
        data=data[MiB:],
        headers={
            "Upload-Draft-Interop-Version": "8",
            "Content-Type": "application/partial-upload",
            "Upload-Offset": str(MiB),
            "Upload-Complete": "?1",
        },
        timeout=120,
    )
    assert appended.status_code == 200, appended.text
    assert appended.headers["Upload-Complete"] == "?1"
    probe = requests.head(location, timeout=10)
    assert probe.status_code == 204 and probe.headers["Upload-Offset"] == str(len(data))
    file_id = location.rsplit("/", 1)[1]
    status = requests.get(f"{deployment.url}/upload-status/{file_id}", timeout=10).json()
    assert status["status"] == "completed" and status["crc64nvme"] == crc64(data)
    whole = requests.post(
        f"{deployment.url}/resumable/",
        data=b"small",
        headers={"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1"},
        timeout=10,
    )
    assert whole.status_code == 200 and whole.json()["size"] == 5
