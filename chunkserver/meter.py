"""The one per-piece tally of every writer: a chunk's or a PATCH's length against its limit,
its CRC-64/NVME, and its SHA-256 when the client gave one to check."""

from __future__ import annotations

from typing import Any, Protocol

from . import checksums
from .errors import PayloadTooLarge


class Tally(Protocol):
    """What a received handle counts of its bytes (LocalPendingChunk, S3PendingChunk)."""

    length: int
    crc: int
    digest: Any  # a hashlib sha256, or None


def count_piece(tally: Tally, piece: memoryview, max_bytes: int) -> None:
    """Add one piece of a chunk: PayloadTooLarge once it passes `max_bytes`."""
    tally.length += len(piece)
    if tally.length > max_bytes:
        raise PayloadTooLarge(f"Chunk is larger than max_chunk_bytes ({max_bytes} bytes)")
    tally.crc = checksums.crc64nvme(piece, tally.crc)
    if tally.digest is not None:
        tally.digest.update(piece)
