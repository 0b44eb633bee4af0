"""Real deaths inside a completion on the local disk: a `chunkserver serve` process that
SIGKILLs itself at a fault point (chunkserver/storage/faults.py) between the steps that must happen
together, then a restart that finishes the upload, once and byte for byte. (On S3, a host
killed between CompleteMultipartUpload and its row: tests/test_s3store.py,
test_a_dead_completion_is_finished_within_30_s_by_live_hosts.)"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from chunkserver.storage.faults import FAULT_POINT_ENV

from .conftest import ServerProcess, split
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
