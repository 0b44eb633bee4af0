"""The merged file built ahead of the last chunk: right whatever happens to its chunks."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from chunkserver import Config
from chunkserver import uploads as uploads_module
from chunkserver.keys import UPLOADS
from chunkserver.store import FileStore, UploadMeta

from .conftest import ClientFactory, chunk_form, dead_pid, sha256, temp_files

KiB = 1024
MiB = 1024 * KiB


def assembly_files(data_dir: Path, file_id: str) -> list[Path]:
    return list((data_dir / "chunks" / file_id).glob(".assembly.*.assembling"))


async def wait_for_assembly(data_dir: Path, file_id: str, size: int) -> Path:
    """The upload's assembly once it holds `size` bytes (the background work is done)."""
    for _ in range(200):
        found = assembly_files(data_dir, file_id)
        if found and found[0].stat().st_size == size:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no assembly of {size} bytes: {found}")


async def send(client, file_id: str, index: int, total: int, data: bytes) -> dict:
    resp = await client.post("/upload-chunk", data=chunk_form(file_id, index, total, data))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def send_first(client, file_id: str, chunks: list[bytes], count: int) -> None:
    """Send chunks 0 to count - 1 of an upload of `len(chunks)` chunks, in order."""
    for index in range(count):
        await send(client, file_id, index, len(chunks), chunks[index])


def assert_merged(data_dir: Path, file_id: str, chunks: list[bytes], answer: dict) -> None:
    """The completed answer's sha256 and the merged file are those of all the chunks."""
    assert answer["sha256"] == sha256(b"".join(chunks))
    assert (data_dir / "uploads" / file_id / "file.bin").read_bytes() == b"".join(chunks)


def open_assembly_files() -> list[str]:
    """Assembly files this process holds open (the test server runs in it)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if ".assembl" in link]


def deleted_open_files() -> list[str]:
    return [link for link in open_assembly_files() if link.endswith("(deleted)")]


async def test_prefix_is_copied_and_hashed_as_chunks_arrive(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client()
    data_dir = Path(config.data_dir)
    chunks = [os.urandom(300 * KiB) for _ in range(5)]
    file_id = uuid.uuid4().hex
    # out of order: 2 and 1 wait for 0, then the prefix 0..2 is assembled
    for index in (2, 1, 0):
        await send(client, file_id, index, 5, chunks[index])
    assembly = await wait_for_assembly(data_dir, file_id, 3 * 300 * KiB)
    assert assembly.read_bytes() == b"".join(chunks[:3])
    await asyncio.sleep(0.1)
    assert open_assembly_files() == []  # between steps an upload holds no descriptor
    await send(client, file_id, 3, 5, chunks[3])
    await wait_for_assembly(data_dir, file_id, 4 * 300 * KiB)
    answer = await send(client, file_id, 4, 5, chunks[4])
    assert answer["status"] == "completed"
    assert_merged(data_dir, file_id, chunks, answer)
    assert not (data_dir / "chunks" / file_id).exists()
    assert temp_files(data_dir) == [] and deleted_open_files() == []


async def test_a_chunk_sent_again_with_other_bytes_restarts_the_assembly(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client()
    data_dir = Path(config.data_dir)
    chunks = [os.urandom(200 * KiB) for _ in range(4)]
    file_id = uuid.uuid4().hex
    await send_first(client, file_id, chunks, 3)
    await wait_for_assembly(data_dir, file_id, 3 * 200 * KiB)
    chunks[1] = os.urandom(200 * KiB)  # the last write of a chunk wins, as before
    await send(client, file_id, 1, 4, chunks[1])
    assert_merged(data_dir, file_id, chunks, await send(client, file_id, 3, 4, chunks[3]))


async def test_an_assembly_removed_under_the_server_is_not_used(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client()
    data_dir = Path(config.data_dir)
    chunks = [os.urandom(100 * KiB) for _ in range(3)]
    file_id = uuid.uuid4().hex
    await send_first(client, file_id, chunks, 2)
    (await wait_for_assembly(data_dir, file_id, 2 * 100 * KiB)).unlink()  # as a sweep might
    assert_merged(data_dir, file_id, chunks, await send(client, file_id, 2, 3, chunks[2]))
    assert deleted_open_files() == []


async def test_abort_and_expiry_drop_the_assembly(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client(upload_ttl_seconds=1)
    data_dir = Path(config.data_dir)
    aborted, expired = uuid.uuid4().hex, uuid.uuid4().hex
    for file_id in (aborted, expired):
        await send(client, file_id, 0, 2, os.urandom(64 * KiB))
        await wait_for_assembly(data_dir, file_id, 64 * KiB)
    assert (await client.delete(f"/uploads/{aborted}")).status == 204
    await asyncio.sleep(1.5)
    uploads = client.server.app[UPLOADS]
    await uploads.sweep()
    assert not (data_dir / "chunks").joinpath(expired).exists()
    assert uploads.assemblies == {} and deleted_open_files() == []


def test_the_head_start_leaves_room_for_chunks_to_come(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    meta = UploadMeta.new("f", "f.bin", 2, None)
    (tmp_path / "chunks" / "f").mkdir()
    (tmp_path / "chunks" / "f" / "chunk_000000").write_bytes(b"x" * 1000)
    assembly = store.start_assembly(meta)
    assert assembly is not None
    more = store.advance_assembly(assembly, meta, 1 << 20, keep_free=store.free_bytes() + 1)
    assert not more and assembly.next_index == 0 and assembly.size == 0
    store.advance_assembly(assembly, meta, 1 << 20, keep_free=0)
    assert assembly.next_index == 1 and assembly.size == 1000
    assembly.discard()
    assert assembly_files(tmp_path, "f") == []


def test_the_allowed_lag_follows_the_pace_of_the_copy() -> None:
    pace = uploads_module.CopyPace()
    assert pace.allowed_lag() == uploads_module.MAX_ASSEMBLY_LAG_BYTES  # nothing measured
    for _ in range(20):  # 1 GiB/s: capped
        pace.record(8 * MiB, 8 / 1024)
    assert pace.allowed_lag() == uploads_module.MAX_ASSEMBLY_LAG_BYTES
    for _ in range(20):  # the kernel throttles writes: 200 MiB/s
        pace.record(8 * MiB, 8 / 200)
    expected = 200 * MiB * uploads_module.ASSEMBLY_LAG_SECONDS
    assert abs(pace.allowed_lag() - expected) < 0.05 * expected
    for _ in range(20):  # a crawl: never below the floor
        pace.record(1 * MiB, 1.0)
    assert pace.allowed_lag() == uploads_module.MIN_ASSEMBLY_LAG_BYTES
    pace.record(0, 5.0)  # a step that copied nothing says nothing of the pace
    assert pace.allowed_lag() == uploads_module.MIN_ASSEMBLY_LAG_BYTES


async def test_answers_wait_while_the_assembly_trails_too_far(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client must not outrun the merge built ahead: the last chunk would inherit it all."""
    monkeypatch.setattr(uploads_module, "MIN_ASSEMBLY_LAG_BYTES", 0)
    monkeypatch.setattr(uploads_module, "MAX_ASSEMBLY_LAG_BYTES", 0)
    client = await make_client()
    store = client.server.app[UPLOADS].store
    gate = threading.Event()
    advance = store.advance_assembly

    def held_back(*args: Any, **kwargs: Any) -> bool:
        gate.wait(10)
        return advance(*args, **kwargs)

    monkeypatch.setattr(store, "advance_assembly", held_back)
    file_id = uuid.uuid4().hex
    chunks = [os.urandom(64 * KiB) for _ in range(2)]
    answer = asyncio.ensure_future(send(client, file_id, 0, 2, chunks[0]))
    await asyncio.sleep(0.5)
    assert not answer.done()  # chunk 0 is stored, but its copy has not been made
    gate.set()
    assert (await answer)["uploaded_chunks"] == 1
    final = await send(client, file_id, 1, 2, chunks[1])
    assert final["sha256"] == sha256(b"".join(chunks))


async def test_a_finished_upload_leaves_the_tree_at_once_and_its_chunks_go_after(
    client: Any, config: Config
) -> None:
    data_dir = Path(config.data_dir)
    file_id = uuid.uuid4().hex
    for index in range(3):
        answer = await send(client, file_id, index, 3, os.urandom(100 * KiB))
    assert answer["status"] == "completed"
    assert not (data_dir / "chunks" / file_id).exists()
    await send(client, file_id, 1, 3, os.urandom(100 * KiB))  # a late retry
    other = uuid.uuid4().hex
    await send(client, other, 0, 2, b"x")
    assert (await client.delete(f"/uploads/{other}")).status == 204
    trash = data_dir / "chunks" / ".trash"
    for _ in range(100):
        if not any(trash.iterdir()):
            break
        await asyncio.sleep(0.02)
    assert list(trash.iterdir()) == []
    assert not (data_dir / "chunks" / file_id).exists()


def test_the_sweep_empties_the_trash_of_dead_processes_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    pid = dead_pid()
    trash = tmp_path / "chunks" / ".trash"
    dead = trash / f"a.{pid}.0123456789ab.removing"
    alive = trash / f"b.{os.getppid()}.0123456789ab.removing"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "chunk_000000").write_bytes(b"x" * 1000)
    report = store.sweep(ttl_seconds=3600, max_file_bytes=2**40)
    assert report.expired == [] and store.uploads_in_progress() == []
    assert not dead.exists()
    assert alive.exists()  # another live process is removing it
