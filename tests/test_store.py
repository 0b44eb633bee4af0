"""What only the local disk does, beyond the contract both backends pass
(tests/test_store_contract.py): chunks written in place and a completion that is a rename,
runs folded at commit, two writers of one chunk, range locks, a completion cut short, and a
hypothesis search over orders, resends and sizes."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkserver.errors import UploadGone, UploadLocked
from chunkserver.model import CompletedUpload, UploadMeta, UploadProgress
from chunkserver.storage.local import DATA_NAME, LocalStore, recordlog
from chunkserver.storage.local.locks import lock_range
from chunkserver.storage.meter import ByteLimit

from .conftest import crc64, sha256, temp_files
from .test_store_contract import begin, pieces, put, upload


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunk_size=st.integers(min_value=1, max_value=20_000),
    count=st.integers(min_value=1, max_value=10),
    last=st.integers(min_value=0, max_value=20_000),
    declared=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**32),
    duplicates=st.integers(min_value=0, max_value=5),
)
def test_any_order_with_resends_gives_identical_file(
    tmp_path_factory, chunk_size, count, last, declared, seed, duplicates
) -> None:
    rng = random.Random(seed)
    chunks = [rng.randbytes(chunk_size) for _ in range(count - 1)] + [rng.randbytes(last)]
    order = list(range(count)) + [rng.randrange(count) for _ in range(duplicates)]
    rng.shuffle(order)

    async def scenario() -> None:
        store = LocalStore(tmp_path_factory.mktemp("store"))
        meta = UploadMeta.new("prop", "out.bin", count, None, chunk_size if declared else None)
        finished = await upload(store, meta, order, chunks)
        whole = b"".join(chunks)
        assert [here for _, here in finished] == [True]
        record = finished[0][0]
        assert record.size == len(whole) and record.crc64nvme == crc64(whole)
        assert (store.layout.uploads_dir / "prop" / "out.bin").read_bytes() == whole
        assert temp_files(store.layout.root) == []
        await store.backend.close()

    asyncio.run(scenario())


async def test_chunks_go_in_place_and_completion_is_a_rename(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("p", "f", 3, 2500, 1000))
    data_file = tmp_path / "chunks" / "p" / DATA_NAME
    assert data_file.stat().st_size == 2500  # reserved up front
    inode = data_file.stat().st_ino
    for index, chunk in [(2, b"z" * 500), (0, b"x" * 1000), (1, b"y" * 1000)]:
        result = await put(store, meta, index, chunk)
    assert not list((tmp_path / "chunks" / "p").glob(".*.aside"))  # nothing kept aside
    _, here = await store.assembler.complete(result.meta) or (None, False)
    final = tmp_path / "uploads" / "p" / "f"
    assert here and final.stat().st_ino == inode  # the same file, renamed: no copy
    assert final.read_bytes() == b"x" * 1000 + b"y" * 1000 + b"z" * 500


async def test_no_file_is_made_per_chunk_and_completion_reads_the_log_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 chunks in any order leave the folder as it was begun (the data file, the record
    log, the lock, the meta); the process folded the log as it read it, so completing reads
    only past its end."""
    store = LocalStore(tmp_path)
    chunks = [bytes([i % 256]) * 100 for i in range(299)] + [b"end"]
    meta = await begin(store, UploadMeta.new("fold", "f", 300, None, 100))
    folder = tmp_path / "chunks" / "fold"
    begun = sorted(p.name for p in folder.iterdir())
    for index in [*range(1, 300, 2), *range(0, 300, 2)]:
        result = await put(store, meta, index, chunks[index])
    assert (
        sorted(p.name for p in folder.iterdir())
        == begun
        == [".data", ".lock", ".meta.json", ".records"]
    )
    reads = []
    real_read = recordlog.read_from
    monkeypatch.setattr(
        recordlog, "read_from", lambda fd, at: reads.append(at) or real_read(fd, at)
    )
    log_size = (folder / recordlog.LOG_NAME).stat().st_size
    done = await store.assembler.complete(result.meta)
    assert done is not None and done[0].crc64nvme == crc64(b"".join(chunks))
    assert done[0].size == 299 * 100 + 3
    assert reads == [log_size] == [300 * 40]


async def test_a_chunk_kept_aside_until_chunk_size_is_known_is_placed_at_completion(
    tmp_path: Path,
) -> None:
    """No chunk_size given: chunk 1 comes first, before its place is known, so it is kept
    aside (and fixes chunk_size); completing copies it into place."""
    store = LocalStore(tmp_path)
    chunks = [bytes([i]) * 50 for i in range(99)] + [b"last"]
    meta = await begin(store, UploadMeta.new("runs", "f", 100, None))
    for index in [1, 2, 3, 0, *range(4, 100)]:
        result = await put(store, meta, index, chunks[index])
        meta = result.meta
    assert len(list((tmp_path / "chunks" / "runs").glob(".chunk_000001.*.aside"))) == 1
    done = await store.assembler.complete(meta)
    assert done is not None and done[0].crc64nvme == crc64(b"".join(chunks))
    assert (tmp_path / "uploads" / "runs" / "f").read_bytes() == b"".join(chunks)


def test_the_record_log_skips_a_torn_entry_and_finds_the_next() -> None:
    first = recordlog.Entry(recordlog.CHUNK, 0, 100, 7)
    second = recordlog.Entry(recordlog.CHUNK, 1, 50, 9, "ab12cd34ef56")
    torn = recordlog.encode(recordlog.Entry(recordlog.CHUNK, 2, 1, 1))[:17]
    log = recordlog.encode(first) + torn + recordlog.encode(second)
    assert recordlog.decode(log) == ([first, second], len(log))
    # A torn tail (an append still being copied in) is not read past: read again later.
    assert recordlog.decode(log + torn) == ([first, second], len(log))


async def test_a_record_replaced_by_another_process_is_read_at_completion(
    tmp_path: Path,
) -> None:
    """Another process's resend of other bytes replaces a record this one wrote: the folded
    CRC no longer describes the folder, so the records are read and the answer is right."""
    a, b = LocalStore(tmp_path), LocalStore(tmp_path)
    meta = await begin(a, UploadMeta.new("swap", "f", 3, None, 2))
    await put(a, meta, 0, b"aa")
    await put(a, meta, 1, b"bb")
    await put(b, meta, 1, b"XY")  # kept aside (already recorded), replaces the record
    result = await put(a, meta, 2, b"c")
    assert result.all_stored
    done = await a.assembler.complete(result.meta)
    assert done is not None and done[0].crc64nvme == crc64(b"aaXYc")
    assert (tmp_path / "uploads" / "swap" / "f").read_bytes() == b"aaXYc"


async def test_two_writers_of_one_chunk_leave_a_consistent_answer(tmp_path: Path) -> None:
    """A writer in place of chunk 1 in one process, a resend of other bytes kept aside in
    another, committed first: whichever record stays, the file and its CRC agree."""
    a, b = LocalStore(tmp_path), LocalStore(tmp_path)
    meta = await begin(a, UploadMeta.new("both", "f", 3, None, 2))
    await put(a, meta, 0, b"aa")
    in_place = await a.chunks.receive(
        meta, 1, pieces(b"bb"), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
    )
    assert in_place.in_place
    await put(b, meta, 1, b"XY")  # the region is busy: kept aside, and the folder marked
    await a.chunks.commit(in_place, meta, 1)
    result = await put(a, meta, 2, b"c")
    done = await a.assembler.complete(result.meta)
    assert done is not None
    data = (tmp_path / "uploads" / "both" / "f").read_bytes()
    assert data in (b"aabbc", b"aaXYc") and done[0].crc64nvme == crc64(data)


async def test_two_writers_of_one_chunk_never_mix(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("mix", "f", 2, None, 100_000))
    first = await store.chunks.receive(
        meta, 0, pieces(b"A" * 100_000), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
    )
    # The region is locked by the first, uncommitted writer: the second goes aside.
    second = await store.chunks.receive(
        meta, 0, pieces(b"B" * 100_000), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
    )
    assert first.in_place and not second.in_place
    await store.chunks.commit(second, meta, 0)
    await store.chunks.commit(first, meta, 0)  # the last commit wins, whole
    await put(store, meta, 1, b"end")
    assert await store.assembler.complete(meta) is not None
    assert (tmp_path / "uploads" / "mix" / "f").read_bytes() == b"A" * 100_000 + b"end"
    # the folder, with the chunk kept aside, left the tree; the trash is emptied behind it
    assert temp_files(tmp_path) == [] and not (tmp_path / "chunks" / "mix").exists()


async def test_a_completion_cut_short_after_its_rename_is_finished(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, sha256=True)
    meta = await begin(store, UploadMeta.new("crash", "f.bin", 2, None, 4))
    await put(store, meta, 0, b"abcd")
    await put(store, meta, 1, b"ef")
    # As if killed between the rename and the completion record:
    final = tmp_path / "uploads" / "crash" / "f.bin"
    final.parent.mkdir()
    os.rename(tmp_path / "chunks" / "crash" / DATA_NAME, final)
    os.truncate(final, 6)
    report = await store.janitor.sweep(ttl_seconds=3600)
    [record] = report.completed
    assert record.size == 6 and record.sha256 == sha256(b"abcdef")
    assert record.crc64nvme == crc64(b"abcdef")
    assert isinstance(await store.catalog.status("crash"), CompletedUpload)


async def test_a_delete_waits_for_the_chunks_in_flight(tmp_path: Path) -> None:
    """A chunk being received holds its region: the DELETE removes it once committed, and a
    record never lands in an upload begun again under the same file_id."""
    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("del", "f", 3, None, 1))
    received = await store.chunks.receive(
        meta, 1, pieces(b"b"), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
    )
    assert received.in_place
    deleting = asyncio.create_task(store.catalog.delete("del"))
    await asyncio.sleep(0.3)
    assert not deleting.done()
    assert (await store.chunks.commit(received, meta, 1)).uploaded_chunks == 1
    assert await deleting
    assert await store.catalog.status("del") is None
    again = await begin(store, UploadMeta.new("del", "f", 3, None, 1))
    result = await put(store, again, 0, b"a")
    assert result.uploaded_chunks == 1


async def test_a_chunk_kept_aside_guards_its_upload_until_committed(tmp_path: Path) -> None:
    """Completing or abandoning an upload locks its whole data file: a chunk in flight, even
    one kept aside, holds part of it, so neither happens under it."""
    store = LocalStore(tmp_path)
    meta, created = await store.catalog.begin(UploadMeta.new("guard", "f", 3, None))
    assert created and isinstance(meta, UploadMeta)
    received = await store.chunks.receive(
        meta, 1, pieces(b"x" * 10), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
    )
    assert not received.in_place  # chunk_size unknown: its place is not known yet
    fd = os.open(tmp_path / "chunks" / "guard" / DATA_NAME, os.O_RDWR)
    try:
        assert not lock_range(fd, 0, 0, wait=False)
        await store.catalog.abandon(meta)
        assert isinstance(await store.catalog.status("guard"), UploadProgress)
        await store.chunks.commit(received, meta, 1)
        assert lock_range(fd, 0, 0, wait=False)
    finally:
        os.close(fd)


def lock_waiter_on(inode: int) -> bool:
    """Whether a lock request waits on a file of this inode (a `->` line of /proc/locks,
    whose file field is major:minor:inode)."""
    lines = Path("/proc/locks").read_text().splitlines()
    return any("->" in line and f":{inode} " in line for line in lines)


async def test_begin_waits_while_the_upload_is_ending(tmp_path: Path) -> None:
    """A chunk that found its upload being completed or removed asks again through begin,
    which waits for that to end instead of answering halfway."""
    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("end", "f", 2, None, 1))
    fd = os.open(tmp_path / "chunks" / "end" / DATA_NAME, os.O_RDWR)
    try:
        assert lock_range(fd, 0, 0, wait=False)  # held whole, as a completion holds it
        with pytest.raises(UploadGone):  # a chunk cannot start meanwhile
            await store.chunks.receive(
                meta, 0, pieces(b"a"), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
            )
        asking = asyncio.create_task(store.catalog.begin(meta))
        # Observed, not timed: begin is blocked on the data file's lock (/proc/locks lists
        # a waiter, "->", on its inode), and has not answered.
        inode = os.fstat(fd).st_ino
        deadline = time.monotonic() + 10
        while not lock_waiter_on(inode):
            assert time.monotonic() < deadline, "begin should wait for the data file's lock"
            await asyncio.sleep(0.01)
        assert not asking.done()
    finally:
        os.close(fd)
    found, created = await asking
    assert found == meta and not created
    assert (await put(store, meta, 0, b"a")).uploaded_chunks == 1


async def test_an_upload_removed_between_open_and_lock_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that began an upload fails and removes it (its folder to the trash) just
    after another chunk opened the data file, before it locked its region: that chunk must
    find the upload gone, not be stored in the trash and answered as stored."""
    from chunkserver.storage.local import receive as local_receive

    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("race", "f", 3, None, 1))
    real_lock_range = local_receive.lock_range
    removed = []

    def remove_then_lock(*args: object, **kwargs: object) -> bool:
        if not removed:
            removed.append(True)
            store.layout.remove_folder("race")  # what an abandon does, between open and lock
        return real_lock_range(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(local_receive, "lock_range", remove_then_lock)
    with pytest.raises(UploadGone):
        await store.chunks.receive(
            meta, 1, pieces(b"b"), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
        )
    assert removed


async def test_the_loser_of_a_completion_race_brings_no_folder_back(tmp_path: Path) -> None:
    """The request that completes second finds the folder gone: it answers the completion
    and takes the upload's lock without creating the folder (or its .lock) again."""
    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("won", "f", 2, None, 2))
    await put(store, meta, 0, b"ab")
    await put(store, meta, 1, b"c")
    first = await store.assembler.complete(meta)
    late = await store.assembler.complete(meta)  # what the loser of the race does after the winner
    assert first is not None and first[1]
    assert late is not None and late == (first[0], False)
    assert not (tmp_path / "chunks" / "won").exists()
    assert await store.catalog.uploads_in_progress() == []
    # and the other steps that lock an upload which has ended
    await store.catalog.abandon(meta)
    assert await store.catalog.delete("won")
    assert not (tmp_path / "chunks" / "won").exists()


async def test_an_abandoned_upload_leaves_nothing_in_the_trash(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("refused", "f", 2, 10**8, 1000))
    await store.catalog.abandon(meta)
    assert await store.catalog.status("refused") is None
    assert list((tmp_path / "chunks" / ".trash").iterdir()) == []


async def test_an_upload_completing_between_the_two_reads_of_a_lookup_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup or status reads the completion record, then the meta: a completion that
    writes its record and removes the meta between the two must read as completed, not as
    unknown (which dropped a post-finish event as 'removed before completing')."""
    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("between", "f", 1, None, None))
    await put(store, meta, 0, b"abc")
    real = store.layout.read_completion
    calls = []

    def not_yet_then_real(file_id: str) -> CompletedUpload | None:
        calls.append(file_id)
        return None if len(calls) == 1 else real(file_id)

    # the completion, as if between the reads
    assert await store.assembler.complete(meta) is not None
    monkeypatch.setattr(store.layout, "read_completion", not_yet_then_real)
    assert isinstance(await store.catalog.lookup("between"), CompletedUpload)
    calls.clear()
    assert isinstance(await store.catalog.status("between"), CompletedUpload)


def descriptors_on(*paths: Path) -> int:
    """This process's descriptors open on these folders or anything in them."""
    roots = tuple(str(p) for p in paths)
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(roots):
                held += 1
        except OSError:  # closed meanwhile
            pass
    return held


async def test_an_uploads_files_stay_open_across_its_chunks_and_close_when_it_ends(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    upload_files = (tmp_path / "chunks" / "open", tmp_path / "uploads" / "open")
    meta = await begin(store, UploadMeta.new("open", "f", 3, 30, 10))
    await put(store, meta, 0, b"a" * 10)
    assert descriptors_on(*upload_files) == 3  # the folder, the data file, the record log
    await put(store, meta, 1, b"b" * 10)
    assert descriptors_on(*upload_files) == 3
    result = await put(store, meta, 2, b"c" * 10)
    assert await store.assembler.complete(result.meta) is not None
    assert descriptors_on(*upload_files) == 0


async def test_an_upload_completed_by_another_process_is_not_written_through_old_files(
    tmp_path: Path,
) -> None:
    """This process holds the upload's files open; another completes it (its data file is
    renamed into uploads/). A chunk sent here again must not land in the completed file."""
    a, b = LocalStore(tmp_path), LocalStore(tmp_path)
    meta = await begin(a, UploadMeta.new("moved", "f", 2, 20, 10))
    await put(a, meta, 0, b"a" * 10)
    result = await put(b, meta, 1, b"b" * 10)
    assert await b.assembler.complete(result.meta) is not None
    with pytest.raises(UploadGone):
        await a.chunks.receive(
            meta, 0, pieces(b"X" * 10), max_bytes=ByteLimit.chunk(100), want_sha256=False
        )
    assert (tmp_path / "uploads" / "moved" / "f").read_bytes() == b"a" * 10 + b"b" * 10


async def test_one_chunk_twice_at_once_in_one_process_goes_aside_the_second_time(
    tmp_path: Path,
) -> None:
    """Requests of one process share the data file's descriptor, whose range locks do not
    keep them apart: the second writer of a chunk in flight is kept aside instead."""
    store = LocalStore(tmp_path)
    meta = await begin(store, UploadMeta.new("twice", "f", 2, 20, 10))
    first = await store.chunks.receive(
        meta, 0, pieces(b"a" * 10), max_bytes=ByteLimit.chunk(100), want_sha256=False
    )
    second = await store.chunks.receive(
        meta, 0, pieces(b"b" * 10), max_bytes=ByteLimit.chunk(100), want_sha256=False
    )
    assert first.in_place and not second.in_place
    await store.chunks.commit(first, meta, 0)
    await store.chunks.commit(second, meta, 0)
    result = await put(store, meta, 1, b"c" * 10)
    done = await store.assembler.complete(result.meta)
    assert done is not None
    assert (tmp_path / "uploads" / "twice" / "f").read_bytes() == b"b" * 10 + b"c" * 10


async def test_a_tus_uploads_patches_reuse_its_open_files_and_one_writer_at_a_time(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path)
    upload_files = (tmp_path / "chunks" / "tp", tmp_path / "uploads" / "tp")
    meta = await begin(store, UploadMeta.new_stream("tp", "f", 20, None))
    first = await store.streams.receive_at(
        meta, 0, pieces(b"a" * 10), length=10, max_bytes=ByteLimit.chunk(100), on_piece=None
    )
    # A second PATCH of this process while the first is held: the writer is busy.
    with pytest.raises(UploadLocked):
        await store.streams.receive_at(
            meta, 0, pieces(b"b" * 10), length=10, max_bytes=ByteLimit.chunk(100), on_piece=None
        )
    progress = await store.streams.commit_at(first)
    assert progress.offset == 10
    assert descriptors_on(*upload_files) == 3  # kept for the next PATCH
    second = await store.streams.receive_at(
        meta, 10, pieces(b"c" * 10), length=10, max_bytes=ByteLimit.chunk(100), on_piece=None
    )
    progress = await store.streams.commit_at(second)
    assert progress.offset == 20
    done = await store.assembler.complete(progress.meta)
    assert done is not None
    assert (tmp_path / "uploads" / "tp" / "f").read_bytes() == b"a" * 10 + b"c" * 10
    assert descriptors_on(*upload_files) == 0
