"""Several hosts behind the project's nginx (deploy/nginx-multihost.conf), round robin with no
stickiness, sharing one real Swift bucket and one real PostgreSQL database: each host is a
`chunkserver serve` process with a data folder of its own. Uploads with the seed's Python
client and with `chunkserver upload`; one host SIGKILLed mid-upload; the others finish; the
object in the bucket is checked byte for byte."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from . import realstack
from .conftest import ServerProcess, crc64, s3_flags, split, start_server, wait_until
from .reference import metric_value
from .test_nginx import NGINX, free_port, posts_seen_by, run_nginx, stop_nginx

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        NGINX is None, reason="no nginx binary (apt-get install nginx); .ci/run installs it"
    ),
]


@dataclass
class Cluster:
    url: str
    hosts: list[ServerProcess]
    bucket: str
    s3: Any


def render(text: str, ports: list[int], port: int) -> str:
    """deploy/nginx-multihost.conf with this test's hosts and port."""
    lines = []
    for line in text.splitlines():
        if line.strip().startswith("server 10.0.0."):
            continue
        if line.strip().startswith("upstream chunkserver_hosts"):
            lines.append(line)
            lines += [f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in ports]
            continue
        lines.append(line)
    rendered = "\n".join(lines)
    assert "listen 80;" in rendered, "deploy/nginx-multihost.conf no longer listens on 80"
    return rendered.replace("listen 80;", f"listen 127.0.0.1:{port};")


@pytest.fixture
def cluster(
    tmp_path: Path, s3_settings: dict[str, Any], swift: realstack.Swift
) -> Iterator[Cluster]:
    config = tmp_path / "host.toml"
    config.write_text(
        "\n".join(
            [
                *s3_flags(s3_settings),
                "min_free_bytes = 0",
                "access_log = true",
                'trusted_proxies = ["127.0.0.1"]',
            ]
        )
        + "\n"
    )
    hosts = [start_server(tmp_path / f"host{i}", "--config", str(config)) for i in (1, 2, 3)]
    ports = [int(h.url.rsplit(":", 1)[1]) for h in hosts]
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = (ROOT / "deploy" / "nginx-multihost.conf").read_text()
    nginx = run_nginx(prefix, render(conf, ports, port), port)
    url = f"http://127.0.0.1:{port}"
    yield Cluster(url, hosts, s3_settings["s3_bucket"], realstack.s3_client(swift))
    stop_nginx(nginx)
    for host in hosts:
        host.close()


def object_bytes(cluster: Cluster, file_id: str, filename: str) -> bytes:
    answer = cluster.s3.get_object(Bucket=cluster.bucket, Key=f"uploads/{file_id}/{filename}")
    return bytes(answer["Body"].read())


def seed_post(url: str, file_id: str, index: int, total: int, data: bytes) -> dict:
    """The seed's Python client (requests, fields then the file), one chunk."""
    response = requests.post(
        f"{url}/upload-chunk",
        files={"chunk": ("chunk", data, "application/octet-stream")},
        data={"file_id": file_id, "chunk_index": index, "total_chunks": total,
              "filename": "seed.bin"},
        timeout=120,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


def test_the_seed_client_over_three_hosts(cluster: Cluster) -> None:
    data = os.urandom(12 * MiB + 123)
    chunks = split(data, MiB)
    answers = [seed_post(cluster.url, "seed", i, len(chunks), c) for i, c in enumerate(chunks)]
    assert [a["uploaded_chunks"] for a in answers] == list(range(1, len(chunks) + 1))
    assert answers[-1]["status"] == "completed" and answers[-1]["crc64nvme"] == crc64(data)
    assert object_bytes(cluster, "seed", "seed.bin") == data
    wait_until(
        lambda: sum(posts_seen_by(h) for h in cluster.hosts) >= len(chunks),
        "the access log lines of every chunk",
    )
    counts = [posts_seen_by(h) for h in cluster.hosts]
    assert min(counts) > 0 and sum(counts) == len(chunks), counts
    # every host answers for the upload, and streams the file back with Range
    for host in cluster.hosts:
        status = requests.get(f"{host.url}/upload-status/seed", timeout=10).json()
        assert status["status"] == "completed" and status["size"] == len(data)
    part = requests.get(f"{cluster.url}/files/seed", headers={"Range": "bytes=5-14"}, timeout=10)
    assert part.status_code == 206 and part.content == data[5:15]
    assert requests.get(f"{cluster.url}/files/seed", timeout=60).content == data


def test_last_chunks_racing_on_three_hosts_complete_once(cluster: Cluster) -> None:
    """Chunks sent to the three hosts at once, last ones first: one CompleteMultipartUpload
    in all (each host counts the completions it made, so the hosts' counts add up to 1)."""
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(6 * MiB + 5)
    chunks = split(data, MiB)

    def send(i: int) -> dict:
        return seed_post(cluster.hosts[i % 3].url, "race3", i, len(chunks), chunks[i])

    with ThreadPoolExecutor(len(chunks)) as pool:
        answers = list(pool.map(send, reversed(range(len(chunks)))))
    assert any(a["status"] == "completed" for a in answers)
    assert object_bytes(cluster, "race3", "seed.bin") == data
    completions = sum(
        metric_value(
            requests.get(f"{host.url}/metrics", timeout=10).text,
            "chunkserver_uploads_completed_total",
        )
        for host in cluster.hosts
    )
    assert completions == 1


def test_a_host_killed_mid_upload_the_others_finish(cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(60 * MiB + 7)
    path = tmp_path / "big file.bin"
    path.write_bytes(data)
    command = [
        sys.executable, "-m", "chunkserver", "upload", str(path), "--url", cluster.url,
        "--chunk-size", "5MiB", "--concurrency", "4", "--file-id", "killed",
    ]  # fmt: skip
    upload = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = cluster.hosts[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = requests.get(f"{cluster.hosts[1].url}/upload-status/killed", timeout=10)
        if status.status_code == 200 and status.json().get("uploaded_chunks", 0) >= 3:
            break
        time.sleep(0.05)
    os.kill(victim.process.pid, signal.SIGKILL)
    assert status.json()["status"] == "uploading"  # killed mid-upload, not after
    out, err = upload.communicate(timeout=300)
    assert upload.returncode == 0, err
    result = __import__("json").loads(out.strip().splitlines()[-1])
    assert result["verified"] and result["crc64nvme"] == crc64(data)
    assert object_bytes(cluster, "killed", "big file.bin") == data
    for host in cluster.hosts[1:]:
        status = requests.get(f"{host.url}/upload-status/killed", timeout=10).json()
        assert status["status"] == "completed"
    # nothing is left of the upload but the object: no staging object, no multipart upload
    listed = cluster.s3.list_objects_v2(Bucket=cluster.bucket).get("Contents", [])
    assert [o["Key"] for o in listed if "killed" in o["Key"]] == ["uploads/killed/big file.bin"]
    assert cluster.s3.list_multipart_uploads(Bucket=cluster.bucket).get("Uploads", []) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tuspy's file
def test_tus_over_three_hosts(cluster: Cluster, tmp_path: Path) -> None:
    """tuspy through nginx's round robin: each PATCH may land on another host; the state is in
    PostgreSQL, the parts in the bucket."""
    from tusclient import client as tusclient

    data = os.urandom(23 * MiB + 7)
    path = tmp_path / "tus.bin"
    path.write_bytes(data)
    uploader = tusclient.TusClient(f"{cluster.url}/tus/").uploader(
        str(path), chunk_size=3 * MiB, metadata={"filename": "tus.bin"}
    )
    uploader.upload()
    assert uploader.url is not None and uploader.url.startswith(f"{cluster.url}/tus/")
    file_id = uploader.url.rsplit("/", 1)[1]

    def patches_seen() -> list[int]:
        return [sum('"PATCH /tus/' in line for line in h.output) for h in cluster.hosts]

    wait_until(lambda: min(patches_seen()) > 0, "a PATCH in every host's access log")
    patches = patches_seen()
    assert min(patches) > 0, patches
    for host in cluster.hosts:
        status = requests.get(f"{host.url}/upload-status/{file_id}", timeout=10).json()
        assert status["status"] == "completed" and status["crc64nvme"] == crc64(data)
    assert object_bytes(cluster, file_id, "tus.bin") == data
    del uploader
    gc.collect()  # what tuspy left open is collected here, under this test's filter
