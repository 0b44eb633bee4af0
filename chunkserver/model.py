"""The nouns every layer shares: an upload's metadata, a stored chunk, a completed upload.

Both the store backends and the service import this module; it imports nothing of theirs, so
data flows one way: the service proposes, the store decides from the disk and answers with
these values.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Protocol

from .errors import BadRequest


class UploadProtocol(StrEnum):
    """The protocol an upload is made with, stored as its value ("chunks", "tus", "ietf")."""

    CHUNKS = "chunks"  # the seed's: numbered chunks
    TUS = "tus"  # a byte stream at offsets
    IETF = "ietf"  # the IETF draft's (http/resumable.py): a stream, as tus's


TUS = UploadProtocol.TUS
IETF = UploadProtocol.IETF
STREAM_PROTOCOLS = (TUS, IETF)


@dataclass(frozen=True, slots=True)
class Concatenation:
    """An upload's part in a tus concatenation: a part of one (`final` False), or the final
    upload made of `parts`, in order, as its creation named them (the Upload-Concat's
    references, echoed by HEAD as received; file ids in records of versions before URLs were
    kept, `by_id`). Stored as text (`str()`, `parse`): "partial", "final;<url> <url>...",
    "final <id> <id>..."."""

    final: bool
    parts: tuple[str, ...] = ()
    by_id: bool = False

    @classmethod
    def parse(cls, text: str) -> Concatenation:
        if text == "partial":
            return PARTIAL
        if text.startswith("final;"):
            return cls(True, tuple(text.removeprefix("final;").split()))
        if text.startswith("final "):
            return cls(True, tuple(text.split()[1:]), by_id=True)
        raise BadRequest("Upload-Concat must be 'partial' or 'final;<urls>'")

    def __str__(self) -> str:
        if not self.final:
            return "partial"
        return ("final " if self.by_id else "final;") + " ".join(self.parts)


PARTIAL = Concatenation(final=False)


# A file_id as clients give it; the server keeps an identity's upload under the owned id
# `<namespace><SEPARATOR><file_id>` (auth/owners.py), the separator outside the pattern.
FILE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
SEPARATOR = "~"


def check_file_id(file_id: str) -> str:
    if not FILE_ID_PATTERN.fullmatch(file_id):
        raise BadRequest("Invalid file_id: use 1 to 128 characters from A-Z, a-z, 0-9, _ and -")
    return file_id


@dataclass(frozen=True, slots=True)
class ChunkFields:
    """The validated fields of one chunk request."""

    file_id: str
    chunk_index: int
    total_chunks: int
    filename: str
    chunk_sha256: str | None = None
    chunk_crc64nvme: int | None = None
    total_size: int | None = None
    chunk_size: int | None = None
    metadata: dict[str, str] | None = None


class UploadKind:
    """What an upload is, asked of its protocol and concatenation: UploadMeta and
    CompletedUpload alike."""

    __slots__ = ()
    protocol: UploadProtocol
    concat: Concatenation | None

    def __post_init__(self) -> None:
        # Read back from a record or a row as their stored values: the types again.
        object.__setattr__(self, "protocol", UploadProtocol(self.protocol))
        if isinstance(self.concat, str):
            object.__setattr__(self, "concat", Concatenation.parse(self.concat))

    @property
    def is_partial(self) -> bool:
        """A part of a tus concatenation, not a file of its own."""
        return self.concat is not None and not self.concat.final

    @property
    def is_final(self) -> bool:
        """The final upload of a tus concatenation (made of its parts: it takes no PATCH)."""
        return self.concat is not None and self.concat.final

    def stored(self) -> dict[str, Any]:
        """The upload as its record keeps it: plain JSON values (the protocol's and the
        concatenation's text); what a request alone carries is left out."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        record["protocol"] = str(self.protocol)
        record["concat"] = None if self.concat is None else str(self.concat)
        record.pop("app", None)  # a completing request's answer (pre-finish), never stored
        return record


@dataclass(frozen=True, slots=True)
class UploadMeta(UploadKind):
    """What the first chunk of an upload fixes for all the others."""

    file_id: str
    filename: str
    total_chunks: int
    total_size: int | None
    created_at: float
    token: str  # tells a re-created upload of the same id from the one a cache knew
    # The size of every chunk but the last: given by the client (declared) or learned from
    # the first chunk other than the last that was stored. None until then.
    chunk_size: int | None = None
    chunk_size_declared: bool = False
    # The client's own data (the `metadata` field), fixed by the first chunk that gives it.
    metadata: dict[str, str] | None = None
    # A stream (tus, the draft) has total_size its length, None while deferred.
    protocol: UploadProtocol = UploadProtocol.CHUNKS
    # tus concatenation: a part of one, or a final upload and its parts.
    concat: Concatenation | None = None
    # The IETF draft: the whole upload's SHA-256 (hex) that a request's Repr-Digest gave,
    # checked once the upload is complete.
    repr_sha256: str | None = None
    # The name of the identity it belongs to ("" for the anonymous one; in records made
    # before identities, too): what the hooks' events say of it.
    owner: str = ""

    @classmethod
    def new(
        cls,
        file_id: str,
        filename: str,
        total_chunks: int,
        total_size: int | None,
        chunk_size: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> UploadMeta:
        return cls(
            file_id,
            filename,
            total_chunks,
            total_size,
            time.time(),
            secrets.token_hex(8),
            chunk_size,
            chunk_size is not None,
            metadata,
        )

    @classmethod
    def new_stream(
        cls,
        file_id: str,
        filename: str,
        length: int | None,
        metadata: dict[str, str] | None,
        concat: Concatenation | None = None,
        protocol: UploadProtocol = TUS,
    ) -> UploadMeta:
        """A byte stream (tus, or the IETF draft): one chunk record (local) or its parts (S3)
        once its bytes are in."""
        meta = cls.new(file_id, filename, 1, length, None, metadata)
        return replace(meta, protocol=protocol, concat=concat)

    @property
    def is_stream(self) -> bool:
        return self.protocol in STREAM_PROTOCOLS

    def adopts(self, chunk_size: int | None, metadata: dict[str, str] | None) -> bool:
        """Whether a chunk brings what this upload has not fixed yet (a declared chunk size,
        or metadata): the upload then takes it, once."""
        return (self.chunk_size is None and chunk_size is not None) or (
            self.metadata is None and metadata is not None
        )

    def is_last(self, index: int) -> bool:
        return index == self.total_chunks - 1

    def offset_of(self, index: int) -> int | None:
        """Where chunk `index` starts in the upload's data file, when that is known."""
        if index == 0:
            return 0
        if self.chunk_size is None:
            return None
        return index * self.chunk_size

    def conflict_with(
        self,
        filename: str,
        total_chunks: int,
        total_size: int | None,
        chunk_size: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str | None:
        """Say which field differs from this upload's, or None when they agree."""
        if total_chunks != self.total_chunks:
            return (
                f"total_chunks {total_chunks} differs from {self.total_chunks} "
                "given by earlier chunks of this file_id"
            )
        if filename != self.filename:
            return f"filename {filename!r} differs from {self.filename!r} given by earlier chunks"
        if None not in (total_size, self.total_size) and total_size != self.total_size:
            return f"total_size {total_size} differs from {self.total_size} given by earlier chunks"
        if None not in (chunk_size, self.chunk_size) and chunk_size != self.chunk_size:
            source = "given" if self.chunk_size_declared else "learned"
            return (
                f"chunk_size {chunk_size} differs from {self.chunk_size} {source} by earlier chunks"
            )
        if None not in (metadata, self.metadata) and metadata != self.metadata:
            return "metadata differs from that given by earlier chunks of this file_id"
        return None


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """That chunk `index` is stored: its length, its CRC-64/NVME, and where its bytes are.

    `aside` is None when the bytes are in place in the upload's data file (at index x
    chunk_size), or the name of the separate file that holds them (the rare path).
    """

    index: int
    length: int
    crc64nvme: int
    aside: str | None = None


@dataclass(frozen=True, slots=True)
class CompletedUpload(UploadKind):
    file_id: str
    filename: str
    size: int
    crc64nvme: str  # S3's form: base64 of the 8 big-endian bytes
    total_chunks: int
    completed_at: float
    sha256: str | None = None  # when the configuration's checksums hold "sha256"
    metadata: dict[str, str] | None = None
    token: str = ""  # the upload's (UploadMeta.token); empty in records made before it
    protocol: UploadProtocol = UploadProtocol.CHUNKS  # as UploadMeta.protocol
    concat: Concatenation | None = None  # as UploadMeta.concat
    repr_sha256: str | None = None  # as UploadMeta.repr_sha256
    owner: str = ""  # as UploadMeta.owner
    # The pre-finish hook's answer, for the completing request's answer only (never stored).
    app: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        meta: UploadMeta,
        *,
        size: int,
        crc64nvme: str,
        sha256: str | None,
        completed_at: float | None = None,
    ) -> CompletedUpload:
        """The record of `meta`'s upload once complete with these bytes (every backend's)."""
        return cls(
            file_id=meta.file_id,
            filename=meta.filename,
            size=size,
            crc64nvme=crc64nvme,
            total_chunks=meta.total_chunks,
            completed_at=time.time() if completed_at is None else completed_at,
            sha256=sha256,
            metadata=meta.metadata,
            token=meta.token,
            protocol=meta.protocol,
            concat=meta.concat,
            repr_sha256=meta.repr_sha256,
            owner=meta.owner,
        )


@dataclass(frozen=True, slots=True)
class UploadProgress:
    meta: UploadMeta
    stored: frozenset[int]
    last_activity: float

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.meta.total_chunks) if i not in self.stored]


@dataclass(frozen=True, slots=True)
class StreamProgress:
    """A tus upload in progress: the bytes stored from its start (its offset) and their CRC."""

    meta: UploadMeta
    offset: int
    crc: int
    last_activity: float


@dataclass(frozen=True, slots=True)
class Committed:
    """A chunk's commit: how many chunks this process knows stored, and whether all are."""

    meta: UploadMeta  # the upload as on disk after the commit (chunk_size may be learned)
    uploaded_chunks: int
    all_stored: bool


@dataclass(slots=True)
class SweepReport:
    expired: list[str] = field(default_factory=list)
    expired_uploads: list[UploadMeta] = field(default_factory=list)  # the same, whole
    completed: list[CompletedUpload] = field(default_factory=list)
    removed_temp_files: int = 0


class ObjectAnswer(Protocol):
    """An object store's answer to a GET (aiohttp's ClientResponse fits)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def pieces(self) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A completed file kept in an object store; `open(range_header)` reads it."""

    key: str
    size: int
    open: Callable[[str | None], AbstractAsyncContextManager[ObjectAnswer]]
