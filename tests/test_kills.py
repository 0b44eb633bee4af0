"""Real deaths inside a completion, on both backends: a `chunkserver serve` process that
SIGKILLs itself at a fault point (chunkserver/faults.py) between the steps that must happen
together, then a restart (local disk) or another host (S3) that finishes the upload, once and
byte for byte."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from chunkserver.faults import FAULT_POINT_ENV

from . import realstack
from .conftest import ServerProcess, s3_flags, split
from .reference import metric_value
from .test_processes import post_chunk


def upload_until_killed(server: ServerProcess, file_id: str, chunks: list[bytes]) -> None:
    """Every chunk; the last one's completion kills the server: its request gets no answer,
    and the process ends by SIGKILL (the kill landed inside the completion)."""
    for index, chunk in enumerate(chunks[:-1]):
        assert post_chunk(server.url, file_id, index, len(chunks), chunk)["status"] == "uploading"
    with pytest.raises(requests.ConnectionError):
        post_chunk(server.url, file_id, len(chunks) - 1, len(chunks), chunks[-1])
    assert server.process.wait(10) == -signal.SIGKILL


def completions(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return metric_value(text, "chunkserver_uploads_completed_total")


@pytest.mark.parametrize("point", ["local-before-rename", "local-after-rename"])
def test_a_process_killed_inside_a_merge_completes_once_after_restart(
    servers: Callable[..., ServerProcess], tmp_path: Path, point: str
) -> None:
    data = os.urandom(5 * 64_000 + 7)
    chunks = split(data, 64_000)
    upload_until_killed(servers(env={FAULT_POINT_ENV: point}), "killed", chunks)
    final = tmp_path / "data" / "uploads" / "killed" / "f.bin"
    # Where the kill landed: before the rename the file is not in place; after it, it is,
    # whole, with no completion record yet.
    assert final.is_file() == (point == "local-after-rename")
    again = servers()
    status = requests.get(f"{again.url}/upload-status/killed", timeout=30).json()
    assert status["status"] == "completed" and status["size"] == len(data)
    assert requests.get(f"{again.url}/files/killed", timeout=30).content == data
    assert completions(again.url) == 1  # the dead process never counted one
    resent = post_chunk(again.url, "killed", len(chunks) - 1, len(chunks), chunks[-1])
    assert resent["status"] == "completed" and completions(again.url) == 1
    assert not (tmp_path / "data" / "chunks" / "killed").exists()


def test_a_host_killed_between_the_object_and_its_row_is_taken_over_once(
    servers: Callable[..., ServerProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    swift: realstack.Swift,
) -> None:
    """S3: the host dies after CompleteMultipartUpload made the object whole, before the row
    says completed. Another host takes the completion over once the lease (20 s) runs out,
    within the 30 s the contract allows: the object is the file, and no multipart upload is
    left (S3 completes one once: the taking over finds it done and checks the object)."""
    settings = request.getfixturevalue("s3_settings")
    config = tmp_path / "s3.toml"
    config.write_text("\n".join([*s3_flags(settings), "min_free_bytes = 0"]) + "\n")
    data = os.urandom(6 * 1024 * 1024 + 11)
    chunks = split(data, 1024 * 1024)
    dying = servers("--config", str(config), data_dir=tmp_path / "a",
                    env={FAULT_POINT_ENV: "s3-after-complete"})  # fmt: skip
    upload_until_killed(dying, "taken", chunks)
    died = time.monotonic()
    other = servers("--config", str(config), data_dir=tmp_path / "b")
    while True:
        answer = requests.get(f"{other.url}/upload-status/taken", timeout=30)
        if answer.status_code == 200 and answer.json()["status"] == "completed":
            break
        assert time.monotonic() - died < 30, answer.text
        time.sleep(1)
    assert answer.json()["size"] == len(data)
    assert requests.get(f"{other.url}/files/taken", timeout=60).content == data
    s3: Any = realstack.s3_client(swift)
    bucket = settings["s3_bucket"]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    stored = s3.get_object(Bucket=bucket, Key="uploads/taken/f.bin")["Body"].read()
    assert stored == data
