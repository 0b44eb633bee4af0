"""The rows of the upload state, as the S3 backend reads them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from ....model import CompletedUpload, UploadMeta, UploadProtocol


@dataclass(frozen=True, slots=True)
class UploadRow:
    meta: UploadMeta
    status: str  # uploading | completing | completed
    direct: bool | None  # chunks are their own parts; None until the first chunk decides
    object_key: str
    upload_id: str
    last_activity: float
    claimed_at: float | None
    completed: CompletedUpload | None
    stream: Stream | None = None  # a tus upload's


@dataclass(frozen=True, slots=True)
class Stream:
    """A tus upload's state: `tail` holds the staged pieces past the last part, as
    (key, length, crc), which the next part starts with."""

    offset: int
    crc: int
    tail: tuple[tuple[str, int, int], ...]

    @property
    def tail_bytes(self) -> int:
        return sum(length for _, length, _ in self.tail)


@dataclass(frozen=True, slots=True)
class PartRow:
    """A part gathered from staged chunks first..last while the upload went on."""

    number: int
    first: int
    last: int
    sources: str  # the staging keys it was built from, in order
    etag: str | None


@dataclass(frozen=True, slots=True)
class ChunkRow:
    index: int
    length: int
    crc: int
    etag: str | None
    staging_key: str | None


def to_signed(crc: int) -> int:
    return crc - (1 << 64) if crc >= 1 << 63 else crc


def to_unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def upload_row(r: Mapping[str, Any]) -> UploadRow:
    meta = UploadMeta(
        file_id=r["file_id"],
        filename=r["filename"],
        total_chunks=r["total_chunks"],
        total_size=r["total_size"],
        created_at=r["created_at"],
        token=r["token"],
        chunk_size=r["chunk_size"],
        chunk_size_declared=r["chunk_size_declared"],
        metadata=metadata_of(r.get("metadata")),
        protocol=UploadProtocol(r.get("protocol") or UploadProtocol.CHUNKS),
        concat=r.get("concat"),
        repr_sha256=r.get("repr_sha256"),
        owner=r.get("owner") or "",
    )
    completed = None
    if r["status"] == "completed":
        completed = CompletedUpload.of(
            meta,
            size=r["size"],
            crc64nvme=r["crc64nvme"],
            sha256=r["sha256"],
            completed_at=r["completed_at"],
        )
    stream = None
    if r.get("stream_offset") is not None:
        tail = json.loads(r["stream_tail"] or "[]")
        stream = Stream(
            r["stream_offset"],
            to_unsigned(r["stream_crc"]),
            tuple((key, length, crc) for key, length, crc in tail),
        )
    return UploadRow(
        meta,
        r["status"],
        r["direct"],
        r["object_key"],
        r["s3_upload_id"],
        r["last_activity"],
        r["claimed_at"],
        completed,
        stream,
    )


def metadata_of(text: str | None) -> dict[str, str] | None:
    return None if text is None else dict(json.loads(text))


def chunk_row(r: asyncpg.Record) -> ChunkRow:
    return ChunkRow(r["idx"], r["length"], to_unsigned(r["crc"]), r["etag"], r["staging_key"])
