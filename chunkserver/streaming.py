"""The hot path: the few functions that touch a chunk's bytes on their way to disk.

Bytes arrive as memoryview slices of the socket's buffers (see `multipart.py`). They are
gathered, without joining, into batches of about `WRITE_BATCH_BYTES` and written with one
`os.writev` per batch in an executor thread, so the loop goes on reading the next batch while
the kernel copies this one into the page cache. At most two batches per request are held,
which bounds memory whatever the chunk size. When the client sent `chunk_sha256` first, the
same thread hashes the batch before writing it (hashlib releases the GIL).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from .errors import PayloadTooLarge
from .fileio import hash_file
from .store import TempChunk, storage_error

WRITE_BATCH_BYTES = 1024 * 1024
# Stay well below IOV_MAX (1024) however small the pieces a slow client sends.
MAX_BATCH_PIECES = 256


def _write_batch(temp: TempChunk, pieces: list[memoryview], digest: hashlib._Hash | None) -> None:
    """Hash (optionally) and write `pieces` in order, creating the file at the first batch;
    runs in an executor thread."""
    if digest is not None:
        for piece in pieces:
            digest.update(piece)
    try:
        if temp.fd < 0:
            temp.create()
        while pieces:
            written = os.writev(temp.fd, pieces)
            # A short write is rare for regular files; drop what went out and go on.
            while pieces and written >= len(pieces[0]):
                written -= len(pieces[0])
                pieces = pieces[1:]
            if written:
                pieces[0] = pieces[0][written:]
    except OSError as e:
        raise storage_error(e) from e


async def receive_into(
    pieces: AsyncIterator[memoryview],
    temp: TempChunk,
    *,
    executor: Executor,
    max_bytes: int,
    digest: hashlib._Hash | None,
) -> None:
    """Stream `pieces` into `temp`, counting its size; 413 past `max_bytes`.

    Always waits for its last write before returning or raising, so the caller may close
    or remove the file as soon as this returns.
    """
    batch: list[memoryview] = []
    batch_bytes = 0
    in_flight: concurrent.futures.Future[None] | None = None
    try:
        async for piece in pieces:
            temp.size += len(piece)
            if temp.size > max_bytes:
                raise PayloadTooLarge(f"Chunk is larger than max_chunk_bytes ({max_bytes} bytes)")
            batch.append(piece)
            batch_bytes += len(piece)
            if batch_bytes >= WRITE_BATCH_BYTES or len(batch) >= MAX_BATCH_PIECES:
                if in_flight is not None:
                    await asyncio.wrap_future(in_flight)
                in_flight = executor.submit(_write_batch, temp, batch, digest)
                batch, batch_bytes = [], 0
        if batch or in_flight is None:  # an empty chunk still gets its (empty) file
            if in_flight is not None:
                await asyncio.wrap_future(in_flight)
            in_flight = executor.submit(_write_batch, temp, batch, digest)
        if in_flight is not None:
            await asyncio.wrap_future(in_flight)
    finally:
        if in_flight is not None and not in_flight.done():
            # Cancelled or failed while a write is running: the fd must stay open until
            # the thread is done with it, so wait here (at most one batch).
            with contextlib.suppress(Exception):
                in_flight.result()


def sha256_of_file(path: os.PathLike[str] | str) -> str:
    """The hex sha256 of a whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        hash_file(f.fileno(), os.fstat(f.fileno()).st_size, digest)
    return digest.hexdigest()
