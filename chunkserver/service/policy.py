"""Every refusal of the upload service in one place: limits, free space, conflicts with what
an upload already holds, checksums. `UploadService` calls these before a chunk's or a
PATCH's bytes are read and after; each raises the error its answer is made of."""

from __future__ import annotations

from typing import Protocol

from ..config import Config
from ..errors import ChecksumMismatch, DiskFull, EmptyChunk, PayloadTooLarge, UploadConflict
from ..model import ChunkFields, UploadMeta
from ..storage.meter import ByteLimit
from ..storage.store import PendingChunk

# Room for the form fields and multipart framing around a chunk, when judging Content-Length.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class Room(Protocol):
    """What the policy asks of the store: whether chunks take room on the local disk, and
    how much is free."""

    keeps_bytes_locally: bool

    def free_bytes(self) -> int: ...


class Policy:
    def __init__(self, config: Config, room: Room) -> None:
        self.config = config
        self.room = room

    def check_request_length(self, content_length: int | None) -> None:
        """A chunk request whose Content-Length cannot hold a chunk within max_chunk_bytes:
        refused from its headers, before a byte of its body is read."""
        limit = self.config.max_chunk_bytes
        if content_length is not None and content_length > limit + MULTIPART_OVERHEAD_BYTES:
            raise PayloadTooLarge(f"Chunk is larger than max_chunk_bytes ({limit} bytes)")

    def check_limits(self, fields: ChunkFields, content_length: int | None) -> None:
        limits = self.config
        self.check_request_length(content_length)
        if fields.total_size is not None and fields.total_size > limits.max_file_bytes:
            raise PayloadTooLarge(
                f"total_size {fields.total_size} exceeds max_file_bytes "
                f"({limits.max_file_bytes} bytes)"
            )
        if (
            fields.chunk_size is not None
            and fields.total_chunks > 1
            and fields.chunk_size > limits.max_chunk_bytes
        ):
            raise PayloadTooLarge(
                f"chunk_size {fields.chunk_size} exceeds max_chunk_bytes "
                f"({limits.max_chunk_bytes} bytes)"
            )

    @staticmethod
    def check_conflicts(meta: UploadMeta, fields: ChunkFields) -> None:
        conflict = meta.conflict_with(
            fields.filename,
            fields.total_chunks,
            fields.total_size,
            fields.chunk_size,
            fields.metadata,
        )
        if conflict is not None:
            raise UploadConflict(conflict)

    def check_free_space(
        self, known: UploadMeta | None, fields: ChunkFields, content_length: int | None
    ) -> None:
        if not self.room.keeps_bytes_locally:
            needed = 0  # only scratch files, gone with their request
        elif known is not None and known.total_size is not None:
            needed = 0  # the whole file's room was reserved when the upload began
        elif known is None and fields.total_size is not None:
            needed = fields.total_size
        else:
            needed = content_length or 0
        if self.room.free_bytes() - needed < self.config.min_free_bytes:
            raise DiskFull()

    def check_received(
        self, fields: ChunkFields, meta: UploadMeta, received: PendingChunk, sha256: str | None
    ) -> None:
        """A received chunk against its fields and its upload; `sha256`, its SHA-256 when
        the fields name one."""
        if received.length == 0 and not meta.is_last(fields.chunk_index):
            raise EmptyChunk(fields.chunk_index)
        cs = meta.chunk_size if meta.chunk_size_declared else fields.chunk_size
        if cs is not None and not meta.is_last(fields.chunk_index) and received.length != cs:
            raise UploadConflict(
                f"Chunk {fields.chunk_index} has {received.length} bytes; every chunk but "
                f"the last must have chunk_size ({cs}) bytes"
            )
        if fields.chunk_crc64nvme is not None and fields.chunk_crc64nvme != received.crc:
            raise ChecksumMismatch()
        if fields.chunk_sha256 is not None and sha256 != fields.chunk_sha256:
            raise ChecksumMismatch()
        if meta.chunk_size is not None:
            end = fields.chunk_index * meta.chunk_size + received.length
            if end > self.config.max_file_bytes:
                raise PayloadTooLarge(
                    f"Upload would exceed max_file_bytes ({self.config.max_file_bytes} bytes)"
                )
        if self.room.free_bytes() < self.config.min_free_bytes:
            raise DiskFull()

    def check_stream_size(self, length: int) -> None:
        if length > self.config.max_file_bytes:
            raise PayloadTooLarge(
                f"Upload-Length {length} exceeds max_file_bytes "
                f"({self.config.max_file_bytes} bytes)"
            )

    def check_stream_room(self, length: int) -> None:
        if self.room.keeps_bytes_locally and (
            self.room.free_bytes() - length < self.config.min_free_bytes
        ):
            raise DiskFull(
                "Upload failed: not enough disk space for these bytes; retry later",
                retry_after=60,
            )

    def room_after(self, meta: UploadMeta, offset: int, declared_length: int | None) -> ByteLimit:
        """How many bytes a PATCH at `offset` may bring: up to the upload's length (given
        or declared now), or to max_file_bytes."""
        length = meta.total_size if meta.total_size is not None else declared_length
        if length is not None:
            return ByteLimit(
                length - offset,
                f"This request's content runs past the upload's length ({length} bytes)",
            )
        limit = self.config.max_file_bytes
        return ByteLimit(limit - offset, f"The upload would exceed max_file_bytes ({limit} bytes)")
