"""The S3 backend's pieces: spools, copies of staged chunks, the handles of received bytes,
body slices, and the runs of chunks that make a part."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ... import checksums
from ...errors import (
    BadRequest,
    UploadConflict,
)
from ...model import (
    CompletedUpload,
    UploadMeta,
)
from .state import ChunkRow, Stream, UploadRow

log = logging.getLogger("chunkserver")

MiB = 1024 * 1024
MIN_PART_BYTES = 5 * MiB  # S3 refuses a smaller part other than the last (EntityTooSmall)
SPOOL_MEMORY_BYTES = 8 * MiB  # a spooled chunk past this goes to a scratch file
# A claimed completion is renewed every COMPLETION_RENEW_SECONDS while it runs; one not renewed
# for COMPLETION_LEASE_SECONDS (its host died) is taken over by the next chunk, status request
# or sweep that finds it: within 30 s of the death (PROTOCOL.md, Guarantees 3).
COMPLETION_LEASE_SECONDS = 20.0
COMPLETION_RENEW_SECONDS = 5.0
# How long a chunk waits for a completion that a live host is running before it answers 503.
COMPLETION_WAIT_SECONDS = 5.0
GATHER_CONCURRENCY = 4
STAGED_COPIES_BYTES = 64 * MiB  # local copies of staged chunks, for gathering
STAGED_COPIES_FILES = 64  # and at most this many of them: each holds a descriptor open
ORPHAN_GRACE_SECONDS = 3600.0
WAIT_STEP_SECONDS = 0.05
# A tus writer's lease, renewed while its PATCH streams: a host that dies mid-PATCH holds
# the upload for at most this long (the next PATCH gets 423, which tus clients retry).
WRITER_LEASE_SECONDS = 20.0
WRITER_RENEW_SECONDS = 5.0
MAX_COPY_PART_BYTES = 5 * 1024 * MiB  # UploadPartCopy's largest part


class Spool:
    """A chunk's bytes held until their upload's layout is known: in memory up to
    SPOOL_MEMORY_BYTES, past that in an unlinked scratch file (nothing outlives it)."""

    def __init__(self, scratch: Path) -> None:
        self._scratch = scratch
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self.length = 0

    def write(self, piece: memoryview) -> None:
        if self._file is None and len(self._memory) + len(piece) <= SPOOL_MEMORY_BYTES:
            self._memory += piece
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._scratch)  # noqa: SIM115
                self._file.write(self._memory)
                self._memory = bytearray()
            self._file.write(piece)
        self.length += len(piece)

    def payload(self) -> AsyncIterator[bytes | memoryview]:
        """The bytes, to send with their length: a view of the memory (no copy), or the
        scratch file read back piece by piece."""
        if self._file is None:
            return self._view()
        return self._read_file()

    async def _view(self) -> AsyncIterator[memoryview]:
        yield memoryview(self._memory)

    async def views(self) -> AsyncIterator[memoryview]:
        """The bytes as memoryviews, as a request body gives them."""
        async for piece in self.payload():
            yield piece if isinstance(piece, memoryview) else memoryview(piece)

    def in_memory(self) -> bytearray | None:
        return None if self._file is not None else self._memory

    async def _read_file(self) -> AsyncIterator[bytes]:
        assert self._file is not None
        self._file.seek(0)
        while piece := await asyncio.to_thread(self._file.read, MiB):
            yield piece

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._memory = bytearray()


class StagedCopies:
    """Copies of the chunks this process staged lately, in unlinked scratch files (the page
    cache), so that gathering a run into a part reads them here instead of from the store:
    one pass over the bytes through the store less. Only a cache: a copy may be missing
    (another host staged the chunk, or it was evicted, or the process restarted), and the
    store is read then. Nothing of it outlives the process, and the copies of an upload that
    ended are dropped with it."""

    def __init__(self, scratch: Path, capacity_bytes: int, capacity_files: int) -> None:
        self._scratch = scratch
        self._capacity = capacity_bytes
        self._capacity_files = capacity_files
        self._copies: OrderedDict[str, tuple[IO[bytes], int]] = OrderedDict()
        self._bytes = 0

    def keep(self, key: str, data: bytearray) -> None:
        if len(data) > self._capacity // 4:
            return
        copy = tempfile.TemporaryFile(dir=self._scratch)  # noqa: SIM115 - kept open
        copy.write(data)
        self._copies[key] = (copy, len(data))
        self._bytes += len(data)
        while self._bytes > self._capacity or len(self._copies) > self._capacity_files:
            _, (oldest, length) = self._copies.popitem(last=False)
            oldest.close()
            self._bytes -= length

    def forget(self, prefix: str) -> None:
        """Drop the copies of the keys under `prefix` (an upload's staging folder)."""
        for key in [k for k in self._copies if k.startswith(prefix)]:
            copy, length = self._copies.pop(key)
            copy.close()
            self._bytes -= length

    def take(self, key: str) -> IO[bytes] | None:
        """The copy of `key`, no longer kept (the caller closes it), or None."""
        found = self._copies.pop(key, None)
        if found is None:
            return None
        self._bytes -= found[1]
        return found[0]

    def clear(self) -> None:
        for copy, _ in self._copies.values():
            copy.close()
        self._copies.clear()
        self._bytes = 0


@dataclass(eq=False)
class S3PendingChunk:
    """A chunk received: its bytes in a part, a staging object, or still in the spool."""

    length: int = 0
    crc: int = 0
    digest: hashlib._Hash | None = None
    meta: UploadMeta | None = None
    index: int | None = None
    etag: str | None = None
    staging_key: str | None = None
    spool: Spool | None = None
    row: UploadRow | None = None  # the upload's row when the bytes were placed
    failure: BaseException | None = field(default=None, repr=False)

    def sha256_hex(self) -> str | None:
        return None if self.digest is None else self.digest.hexdigest()


class ShortBody(Exception):
    """The PATCH body ended before its Content-Length: the client went away."""


class BodySlices:
    """A PATCH body cut into slices of known lengths, with the CRC of each slice."""

    def __init__(
        self, body: AsyncIterator[memoryview], on_piece: Callable[[memoryview], None] | None
    ) -> None:
        self.body = body
        self.on_piece = on_piece
        self.pending: memoryview | None = None  # the rest of a piece cut by a slice's end
        self.crc = 0  # of the last slice
        self.short = False

    async def take(self, size: int) -> AsyncIterator[memoryview]:
        """The next `size` bytes; raises ShortBody when the body ends before."""
        self.crc = 0
        left = size
        while left > 0:
            piece = self.pending
            self.pending = None
            if piece is None:
                try:
                    piece = await anext(self.body)
                except StopAsyncIteration:
                    self.short = True
                    raise ShortBody() from None
                if self.on_piece is not None:
                    self.on_piece(piece)
            if len(piece) > left:
                piece, self.pending = piece[:left], piece[left:]
            self.crc = checksums.crc64nvme(piece, self.crc)
            left -= len(piece)
            yield piece


@dataclass(eq=False)
class S3PendingBytes:
    """A PATCH's bytes in parts and staged tail pieces, not yet recorded."""

    row: UploadRow
    writer: str  # the writer's lease in the upload's row
    before: Stream
    parts: list[ChunkRow] = field(default_factory=list)
    tail: list[tuple[str, int, int]] = field(default_factory=list)  # new staged pieces
    took_tail: bool = False  # the first part holds the earlier tail pieces
    length: int = 0  # the body's bytes in parts and tail pieces
    crc: int = 0  # theirs

    def keep(self, size: int, crc: int) -> None:
        self.crc = checksums.combine_two(self.crc, crc, size)
        self.length += size


def gone_midway() -> UploadConflict:
    return UploadConflict(
        "The upload was completed or removed while this chunk was being received: "
        "ask /upload-status for its state"
    )


def length_mismatch() -> BadRequest:
    return BadRequest(
        "With the s3 storage, a chunk of 5 MiB or more must be the last part of the form"
    )


def run_of(meta: UploadMeta, index: int) -> tuple[int, int] | None:
    """The run of chunks gathered ahead into one part with chunk `index`: ceil(5 MiB /
    chunk_size) chunks each, which is the completion's plan when chunks are even (checked
    there). None for the run holding the last chunk (gathered at the completion) or while
    the chunk size is unknown."""
    if not meta.chunk_size:
        return None
    per_part = math.ceil(MIN_PART_BYTES / meta.chunk_size)
    first = index - index % per_part
    last = first + per_part - 1
    return None if last >= meta.total_chunks - 1 else (first, last)


def copy_groups(
    sources: list[CompletedUpload],
) -> list[list[tuple[CompletedUpload, int, int]]]:
    """The parts of a concatenation, as (source, start, end) pieces: a source of 5 MiB or
    more is a part of its own (in ranges of at most 5 GiB, UploadPartCopy's limit);
    consecutive smaller ones join until they make 5 MiB. Only the last part may be less."""
    groups: list[list[tuple[CompletedUpload, int, int]]] = []
    pending: list[tuple[CompletedUpload, int, int]] = []
    pending_bytes = 0
    for source in sources:
        if source.size >= MIN_PART_BYTES and not pending:
            count = math.ceil(source.size / MAX_COPY_PART_BYTES)
            step = math.ceil(source.size / count)
            groups += [
                [(source, start, min(start + step, source.size))]
                for start in range(0, source.size, step)
            ]
            continue
        pending.append((source, 0, source.size))
        pending_bytes += source.size
        if pending_bytes >= MIN_PART_BYTES:
            groups.append(pending)
            pending, pending_bytes = [], 0
    if pending or not groups:
        groups.append(pending)
    return groups


def part_sources(group: list[ChunkRow]) -> str:
    return " ".join(c.staging_key or "" for c in group)


def gather_runs(chunks: list[ChunkRow]) -> list[list[ChunkRow]]:
    """Consecutive chunks in groups of at least MIN_PART_BYTES; the last group may be less."""
    groups: list[list[ChunkRow]] = [[]]
    size = 0
    for chunk in chunks:
        if size >= MIN_PART_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(chunk)
        size += chunk.length
    return groups
