"""The one per-piece tally of every writer: a chunk's or a PATCH's length against its limit,
its CRC-64/NVME, and its SHA-256 when the client gave one to check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .. import checksums
from ..errors import PayloadTooLarge


@dataclass(frozen=True, slots=True)
class ByteLimit:
    """How many bytes a request's content may bring, and the limit that number comes from:
    a 413 names the limit the client passed (max_chunk_bytes, the upload's length,
    max_file_bytes), with its value."""

    bytes: int
    refusal: str  # the 413's detail

    @classmethod
    def chunk(cls, max_chunk_bytes: int) -> ByteLimit:
        return cls(
            max_chunk_bytes, f"Chunk is larger than max_chunk_bytes ({max_chunk_bytes} bytes)"
        )

    def exceeded(self) -> PayloadTooLarge:
        return PayloadTooLarge(self.refusal)


class Tally(Protocol):
    """What a received handle counts of its bytes (LocalPendingChunk, S3PendingChunk)."""

    length: int
    crc: int
    digest: Any  # a hashlib sha256, or None


def count_piece(tally: Tally, piece: memoryview, max_bytes: ByteLimit) -> None:
    """Add one piece of a chunk: PayloadTooLarge, naming the limit, once it passes `max_bytes`."""
    tally.length += len(piece)
    if tally.length > max_bytes.bytes:
        raise max_bytes.exceeded()
    tally.crc = checksums.crc64nvme(piece, tally.crc)
    if tally.digest is not None:
        tally.digest.update(piece)
