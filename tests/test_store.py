"""The store on a real temporary folder: commits, merges, recovery and the sweep."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkserver.errors import UploadConflict
from chunkserver.manifest import ChunkSet
from chunkserver.store import Committed, CompletedUpload, FileStore, UploadMeta, UploadProgress

from .conftest import sha256, temp_files


def put(store: FileStore, meta: UploadMeta, index: int, data: bytes, chunks: ChunkSet) -> Committed:
    temp = store.temp_chunk(meta.file_id, index)
    temp.create()
    os.write(temp.fd, data)
    temp.size = len(data)
    return store.commit_chunk(temp, meta, index, chunks, max_file_bytes=2**40)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=20_000), min_size=1, max_size=12),
    seed=st.integers(min_value=0, max_value=2**32),
    duplicates=st.integers(min_value=0, max_value=6),
)
def test_any_order_with_duplicates_gives_identical_file(
    tmp_path_factory, sizes, seed, duplicates
) -> None:
    store = FileStore(tmp_path_factory.mktemp("store"))
    rng = random.Random(seed)
    chunks_data = [rng.randbytes(n) for n in sizes]
    order = list(range(len(sizes))) + [rng.randrange(len(sizes)) for _ in range(duplicates)]
    rng.shuffle(order)
    meta = UploadMeta.new("prop", "out.bin", len(sizes), None)
    cache = ChunkSet(meta.token)
    records = []
    for index in order:
        result = put(store, meta, index, chunks_data[index], cache)
        if result.record is not None:
            records.append(result)
    whole = b"".join(chunks_data)
    assert records and records[0].merged_here
    assert sum(r.merged_here for r in records) == 1
    assert (store.uploads_dir / "prop" / "out.bin").read_bytes() == whole
    assert records[0].record.sha256 == sha256(whole)
    assert temp_files(store.root) == []


def test_two_caches_see_each_others_chunks(tmp_path: Path) -> None:
    """Two processes each know only their own commits; the disk tells them the rest."""
    store = FileStore(tmp_path)
    meta = UploadMeta.new("two", "f", 4, None)
    a, b = ChunkSet(meta.token), ChunkSet(meta.token)
    assert put(store, meta, 0, b"0", a).record is None
    assert put(store, meta, 1, b"1", b).record is None
    assert put(store, meta, 2, b"2", a).record is None
    result = put(store, meta, 3, b"3", b)
    assert result.merged_here and result.record.size == 4
    assert (tmp_path / "uploads" / "two" / "f").read_bytes() == b"0123"


def test_recreated_upload_resets_a_stale_cache(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    old = UploadMeta.new("re", "f", 2, None)
    cache = ChunkSet(old.token)
    put(store, old, 0, b"a", cache)
    store.delete("re")
    # Another process starts the same id again; this cache still believes chunk 0 is there.
    new = UploadMeta.new("re", "f", 2, None)
    put(store, new, 1, b"b", ChunkSet(new.token))
    result = put(store, old, 1, b"b", cache)
    assert result.record is None
    assert cache.token == new.token and 0 not in cache


def test_conflicting_meta_is_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    put(store, UploadMeta.new("c", "f", 2, None), 0, b"a", ChunkSet())
    with pytest.raises(UploadConflict):
        put(store, UploadMeta.new("c", "g", 2, None), 1, b"b", ChunkSet())
    assert temp_files(tmp_path) == []


def test_status_from_disk(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    meta = UploadMeta.new("s", "f", 3, None)
    assert store.status("s") is None
    put(store, meta, 2, b"x", ChunkSet())
    status = store.status("s")
    assert isinstance(status, UploadProgress)
    assert status.stored == {2} and status.missing == [0, 1]


def test_sweep_expires_idle_uploads_and_keeps_fresh_ones(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    put(store, UploadMeta.new("old", "f", 2, None), 0, b"a", ChunkSet())
    put(store, UploadMeta.new("new", "f", 2, None), 0, b"a", ChunkSet())
    past = time.time() - 3600
    folder = tmp_path / "chunks" / "old"
    for path in [folder, *folder.iterdir()]:
        os.utime(path, (past, past))
    report = store.sweep(ttl_seconds=600, max_file_bytes=2**40)
    assert report.expired == ["old"]
    assert store.status("old") is None
    assert isinstance(store.status("new"), UploadProgress)


def test_sweep_finishes_a_merge_cut_short_and_removes_dead_temps(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    meta = UploadMeta.new("cut", "f.bin", 2, None)
    folder = tmp_path / "chunks" / "cut"
    folder.mkdir(parents=True)
    (folder / ".meta.json").write_text(
        '{"file_id": "cut", "filename": "f.bin", "total_chunks": 2, "total_size": null,'
        f' "created_at": {time.time()}, "token": "{meta.token}"}}'
    )
    (folder / "chunk_000000").write_bytes(b"ab")
    (folder / "chunk_000001").write_bytes(b"cd")
    # what a process killed mid-merge and mid-chunk leaves behind (pid 999999 is not running)
    (tmp_path / "uploads" / "cut.999999.abc.merging").write_bytes(b"a")
    (folder / ".chunk_000001.999999.abc.part").write_bytes(b"c")
    (tmp_path / "chunks" / ".incoming" / "chunk.999999.abc.part").write_bytes(b"c")
    report = store.sweep(ttl_seconds=600, max_file_bytes=2**40)
    assert [r.file_id for r in report.merged] == ["cut"]
    assert report.removed_temp_files == 2  # the chunk folder and its .part went with the merge
    assert isinstance(store.status("cut"), CompletedUpload)
    assert (tmp_path / "uploads" / "cut" / "f.bin").read_bytes() == b"abcd"
    assert temp_files(tmp_path) == []


def test_live_writers_temp_files_are_kept(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    temp = store.temp_chunk("live", 0)
    temp.create()
    store.sweep(ttl_seconds=600, max_file_bytes=2**40)
    assert temp.path.exists()
    temp.discard()


def test_chunk_in_flight_when_its_upload_is_deleted(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    meta = UploadMeta.new("gone", "f", 3, None)
    put(store, meta, 0, b"a", ChunkSet())
    temp = store.temp_chunk("gone", 1)
    temp.create()
    os.write(temp.fd, b"b")
    assert store.delete("gone")
    with pytest.raises(UploadConflict, match="removed"):
        store.commit_chunk(temp, meta, 1, ChunkSet(), max_file_bytes=2**40)
    assert store.status("gone") is None  # no upload is left behind, not even an empty one


def test_free_bytes_is_reused_only_while_the_disk_is_roomy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path)
    free = {"bytes": 100 * 1024**3}
    calls = []

    def fake_statvfs(path: object) -> os.statvfs_result:
        calls.append(path)
        blocks = free["bytes"] // 4096
        return os.statvfs_result((4096, 4096, 0, 0, blocks, 0, 0, 0, 0, 255))

    monkeypatch.setattr(os, "statvfs", fake_statvfs)
    assert store.free_bytes() == store.free_bytes() == 100 * 1024**3
    assert len(calls) == 1  # roomy: the figure is reused for a few ms
    free["bytes"] = 10 * 1024**2
    store._free_bytes_at = -1.0  # let the cached figure age
    assert store.free_bytes() == store.free_bytes() == 10 * 1024**2
    assert len(calls) == 3  # near full: every call asks the kernel
