"""The store contract on both backends: the local disk, and S3 (a real Swift) with its state in
a real PostgreSQL. What any backend must do, seen only through the store's verbs, role by
role: chunks in any order, resent, uneven, cut off mid-write, from two stores (two processes
or two hosts), removed, expired, and completed exactly once; tus streams written at offsets,
refused at a wrong offset, given a length later, and concatenated; the backend's health and
the hooks' outbox (claimed once, retried, delivered)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chunkserver import Config
from chunkserver.errors import UploadConflict, UploadGone
from chunkserver.model import (
    PARTIAL,
    Committed,
    CompletedUpload,
    Concatenation,
    StoredObject,
    UploadMeta,
)
from chunkserver.storage.backends import build_store
from chunkserver.storage.meter import ByteLimit

from .conftest import crc64, crc64_value, temp_files

BOTH_BACKENDS = True


async def pieces(data: bytes, step: int = 7000) -> AsyncIterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(data), step):
        yield view[start : start + step]
        await asyncio.sleep(0)


@pytest.fixture
async def open_store(config: Config) -> AsyncIterator[Any]:
    """Open stores of the configured backend (several: as several processes or hosts)."""
    opened: list[Any] = []

    async def open_one(**changes: Any) -> Any:
        store = build_store(config.replace(**changes))
        await store.backend.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.backend.close()


async def read_back(store: Any, file_id: str) -> bytes:
    found = await store.catalog.download(file_id)
    assert found is not None
    where, _ = found
    if isinstance(where, Path):
        return where.read_bytes()
    assert isinstance(where, StoredObject)
    async with where.open(None) as answer:
        return b"".join([piece async for piece in answer.pieces()])


async def begin(store: Any, meta: UploadMeta) -> UploadMeta:
    found, _ = await store.catalog.begin(meta)
    assert isinstance(found, UploadMeta)
    return found


async def put(store: Any, meta: UploadMeta, index: int, data: bytes, **kw: Any) -> Committed:
    received = await store.chunks.receive(
        meta, index, pieces(data), max_bytes=ByteLimit.chunk(2**30), want_sha256=False, **kw
    )
    assert received.length == len(data) and received.crc == crc64_value(data)
    result = await store.chunks.commit(received, meta, index)
    assert isinstance(result, Committed)
    return result


async def upload(store: Any, meta: UploadMeta, order: list[int], chunks: list[bytes]) -> list:
    meta = await begin(store, meta)
    finished = []
    for index in order:
        if finished:  # a resend after completion: the store says the upload is gone
            with pytest.raises(UploadGone):
                await put(store, meta, index, chunks[index])
            continue
        result = await put(store, meta, index, chunks[index])
        meta = result.meta
        if result.all_stored:
            done = await store.assembler.complete(meta)
            assert done is not None
            finished.append(done)
    return finished


@pytest.mark.parametrize("seed", range(4))
async def test_any_order_with_resends_gives_identical_file(open_store, seed: int) -> None:
    rng = random.Random(seed)
    chunk_size, count = rng.randint(1, 20_000), rng.randint(1, 8)
    chunks = [rng.randbytes(chunk_size) for _ in range(count - 1)] + [
        rng.randbytes(rng.randint(0, 20_000))
    ]
    order = list(range(count)) + [rng.randrange(count) for _ in range(rng.randint(0, 4))]
    rng.shuffle(order)
    store = await open_store()
    declared = chunk_size if seed % 2 else None
    meta = UploadMeta.new("prop", "out.bin", count, None, declared)
    finished = await upload(store, meta, order, chunks)
    whole = b"".join(chunks)
    assert len(finished) == 1 and finished[0][1] is True
    record = finished[0][0]
    assert record.size == len(whole) and record.crc64nvme == crc64(whole)
    assert await read_back(store, "prop") == whole


async def test_uneven_chunks_are_joined_in_order(open_store) -> None:
    store = await open_store()
    chunks = [b"a" * 10, b"b" * 3, b"c" * 25, b"d" * 10, b"e" * 1]
    [(record, _)] = await upload(store, UploadMeta.new("u", "f", 5, None), [4, 0, 2, 1, 3], chunks)
    assert await read_back(store, "u") == b"".join(chunks)
    assert record.crc64nvme == crc64(b"".join(chunks))


async def test_two_stores_see_each_others_chunks_and_complete_once(open_store) -> None:
    """Two processes, or two hosts: each finish is asked; exactly one completes."""
    a, b = await open_store(), await open_store()
    meta = await begin(a, UploadMeta.new("two", "f", 4, None, 1))
    assert not (await put(a, meta, 0, b"0")).all_stored
    assert not (await put(b, meta, 1, b"1")).all_stored
    assert not (await put(a, meta, 2, b"2")).all_stored
    assert (await put(b, meta, 3, b"3")).all_stored
    results = await asyncio.gather(a.assembler.complete(meta), b.assembler.complete(meta))
    assert all(r is not None for r in results)
    assert sorted(here for _, here in results) == [False, True]  # type: ignore[misc]
    assert await read_back(b, "two") == b"0123"


async def test_a_chunk_cut_off_mid_write_never_counts(open_store, config: Config) -> None:
    store = await open_store()
    meta = await begin(store, UploadMeta.new("cut", "f", 2, None))

    async def broken() -> AsyncIterator[memoryview]:
        yield memoryview(b"x" * 50_000)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.chunks.receive(
            meta, 0, broken(), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
        )
    status = await store.catalog.status("cut")
    assert status is not None and status.stored == frozenset()  # type: ignore[union-attr]
    assert temp_files(Path(config.data_dir)) == []
    # simply sent again
    await put(store, meta, 0, b"a" * 100_000)
    assert (await put(store, meta, 1, b"b")).all_stored


async def test_a_declared_chunk_size_is_enforced_while_streaming(open_store) -> None:
    store = await open_store()
    meta = await begin(store, UploadMeta.new("big", "f", 3, None, 1000))
    with pytest.raises(UploadConflict):
        await store.chunks.receive(
            meta, 1, pieces(b"x" * 1001), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
        )
    assert (await store.catalog.status("big")).stored == frozenset()  # type: ignore[union-attr]


async def test_recreated_upload_is_a_new_one(open_store) -> None:
    store = await open_store()
    old = await begin(store, UploadMeta.new("re", "f", 2, None, 1))
    await put(store, old, 0, b"a")
    assert await store.catalog.delete("re")
    with pytest.raises(UploadGone):  # a chunk of the removed upload never lands in the new
        received = await store.chunks.receive(
            old, 1, pieces(b"b"), max_bytes=ByteLimit.chunk(99), want_sha256=False
        )
        await store.chunks.commit(received, old, 1)
    new = await begin(store, UploadMeta.new("re", "f", 2, None, 1))
    result = await put(store, new, 1, b"b")
    assert result.uploaded_chunks == 1 and not result.all_stored


async def test_delete_and_expiry_remove_uploads(open_store) -> None:
    store = await open_store()
    meta = await begin(store, UploadMeta.new("old", "f", 2, None, 1))
    await put(store, meta, 0, b"a")
    done = await upload(store, UploadMeta.new("done", "f", 1, None), [0], [b"all"])
    assert isinstance(done[0][0], CompletedUpload)
    report = await store.janitor.sweep(ttl_seconds=1e-9)
    assert report.expired == ["old"] and await store.catalog.status("old") is None
    assert await store.catalog.delete("done") and await store.catalog.download("done") is None
    assert not await store.catalog.delete("done")
    assert await store.catalog.uploads_in_progress() == []


async def test_a_chunk_after_completion_is_answered_with_the_record(open_store) -> None:
    store = await open_store()
    meta = await begin(store, UploadMeta.new("late", "f", 2, None, 2))
    await put(store, meta, 0, b"ab")
    await put(store, meta, 1, b"c")
    assert await store.assembler.complete(meta) is not None
    found, created = await store.catalog.begin(UploadMeta.new("late", "f", 2, None))
    assert isinstance(found, CompletedUpload) and not created
    assert found.size == 3 and found.crc64nvme == crc64(b"abc")


async def test_a_failed_creator_does_not_abandon_an_upload_another_request_streams_into(
    open_store: Any,
) -> None:
    """The request that began an upload fails (its client hung up mid-chunk) while another
    request of the same upload, on another process or host, is receiving a chunk: the
    upload stays, and that chunk is stored."""
    creator, other = await open_store(), await open_store()
    meta = await begin(creator, UploadMeta.new("joined", "f.bin", 2, None, 1000))
    cut = await creator.chunks.receive(
        meta, 0, pieces(b"a" * 400), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
    )
    streaming = await other.chunks.receive(
        meta, 1, pieces(b"b" * 10), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
    )
    await creator.chunks.discard(cut)
    await creator.catalog.abandon(meta)  # what the service does for the creator's failed request
    result = await other.chunks.commit(streaming, meta, 1)
    assert isinstance(result, Committed) and result.uploaded_chunks == 1
    assert (await put(creator, meta, 0, b"a" * 1000)).all_stored


# -- the stream writer role (tus): bytes at an offset, a declared length, concatenation --


async def patch(store: Any, meta: UploadMeta, offset: int, data: bytes, **kw: Any) -> Any:
    received = await store.streams.receive_at(
        meta,
        offset,
        pieces(data),
        length=len(data),
        max_bytes=ByteLimit.chunk(2**30),
        on_piece=None,
        **kw,
    )
    assert received.length == len(data)
    return await store.streams.commit_at(received)


async def test_a_stream_written_at_offsets_completes_with_its_bytes(open_store) -> None:
    store = await open_store()
    data = random.Random(1).randbytes(7 * 1024 * 1024 + 3)
    meta = await begin(store, UploadMeta.new_stream("s", "s.bin", len(data), None))
    offset = 0
    for size in (3, 6 * 1024 * 1024, len(data) - 6 * 1024 * 1024 - 3):
        progress = await patch(store, meta, offset, data[offset : offset + size])
        offset += size
        assert progress.offset == offset
        assert progress.crc == crc64_value(data[:offset])
    found = await store.streams.stream_progress(meta)
    assert found is not None and found.offset == len(data)
    done = await store.assembler.complete(meta)
    assert done is not None and done[1] is True
    assert done[0].crc64nvme == crc64(data) and done[0].size == len(data)
    assert await read_back(store, "s") == data


async def test_a_stream_refuses_a_wrong_offset_and_a_discard_keeps_the_offset(open_store) -> None:
    from chunkserver.errors import OffsetMismatch

    store = await open_store()
    meta = await begin(store, UploadMeta.new_stream("o", "o.bin", 10, None))
    await patch(store, meta, 0, b"abcd")
    with pytest.raises(OffsetMismatch):
        await patch(store, meta, 2, b"xx")
    received = await store.streams.receive_at(
        meta, 4, pieces(b"ef"), length=2, max_bytes=ByteLimit.chunk(6), on_piece=None
    )
    await store.streams.discard_at(received)
    found = await store.streams.stream_progress(meta)
    assert found is not None and found.offset == 4
    await patch(store, meta, 4, b"efghij")
    assert (await store.assembler.complete(meta)) is not None
    assert await read_back(store, "o") == b"abcdefghij"


async def test_a_stream_begun_without_a_length_takes_one_declared_later(open_store) -> None:
    store = await open_store()
    meta = await begin(store, UploadMeta.new_stream("d", "d.bin", None, None))
    progress = await patch(store, meta, 0, b"12345")
    assert progress.offset == 5
    meta = await store.streams.declare_length(progress.meta, 8)
    assert meta.total_size == 8
    await patch(store, meta, 5, b"678")
    done = await store.assembler.complete(meta)
    assert done is not None and done[0].size == 8
    assert await read_back(store, "d") == b"12345678"


async def test_completed_streams_concatenate_into_a_final_one(open_store) -> None:
    store = await open_store()
    parts = [b"first part,", random.Random(2).randbytes(300_000), b"", b"last"]
    records = []
    for i, data in enumerate(parts):
        meta = await begin(store, UploadMeta.new_stream(f"p{i}", "p", len(data), None, PARTIAL))
        await patch(store, meta, 0, data)  # an empty one too: its commit makes it whole
        done = await store.assembler.complete(meta)
        assert done is not None
        records.append(done[0])
    whole = b"".join(parts)
    named = Concatenation(final=True, parts=tuple(f"/tus/p{i}" for i in range(len(parts))))
    final = await begin(store, UploadMeta.new_stream("f", "f.bin", len(whole), None, named))
    progress = await store.streams.concatenate(final, records)
    assert progress.offset == len(whole)
    done = await store.assembler.complete(final)
    assert done is not None and done[0].crc64nvme == crc64(whole)
    assert await read_back(store, "f") == whole


# -- the backend role: health, free space, the hooks' outbox --


async def test_the_backend_reports_its_health_and_keeps_an_outbox(open_store) -> None:
    import time

    store = await open_store()
    health = await store.backend.health()
    assert health and all(health.values())
    assert store.backend.free_bytes() > 0
    outbox = store.backend.outbox()
    event = {"id": "ev-1", "type": "post-finish", "upload": {"file_id": "x"}}
    await outbox.add(event)
    await outbox.add(event)  # the same event twice is kept once
    assert await outbox.count() == 1
    [pending] = await outbox.claim_due(10)
    assert pending.event == event and pending.attempts == 0
    assert await outbox.claim_due(10) == []  # claimed: nobody else gets it meanwhile
    await outbox.retry_at(pending, time.time() - 1)  # due again at once
    [again] = await outbox.claim_due(10)
    assert again.attempts == 1
    await outbox.delivered(again)
    assert await outbox.count() == 0
