"""The storage verbs the upload service needs, in the spirit of tusd's DataStore.

A backend keeps the truth about every upload; the service above it holds only caches (the
manifest) and guards (per-file locks), checks the policy (limits, free space, conflicts),
and calls these verbs. `local.LocalStore` keeps uploads on a local disk.

The verbs are grouped by role, as tusd composes a store from small interfaces: `Catalog`,
`ChunkWriter`, `StreamWriter`, `Assembler`, `Janitor` and `Backend`. A backend is one object
per role (`Store` names them); the service's parts each take the roles they call.

A chunk goes through three verbs: `receive` streams its bytes to where they will stay and
returns a `PendingChunk` handle (length, CRC, optional SHA-256); the service checks them; then
`commit` makes the chunk count, or `discard` forgets it. Until `commit` nothing of it is
visible: a chunk cut off at any instant has no record and never counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol, TypeVar

from ..model import (
    Committed,
    CompletedUpload,
    StoredObject,
    StreamProgress,
    SweepReport,
    UploadMeta,
    UploadProgress,
)
from .ledger import Ledger
from .meter import ByteLimit
from .outbox import Outbox


class PendingChunk(Protocol):
    """A chunk whose bytes are stored but not yet committed."""

    @property
    def length(self) -> int: ...
    @property
    def crc(self) -> int: ...
    def sha256_hex(self) -> str | None: ...


class PendingBytes(Protocol):
    """Bytes of a tus PATCH stored at the upload's offset, not yet committed."""

    @property
    def length(self) -> int:
        """The bytes that count on commit: all received (local), or those of whole parts
        and staged pieces (S3) when the body ended early."""


R = TypeVar("R", bound=PendingChunk)
A = TypeVar("A", bound=PendingBytes)


class Catalog(Protocol):
    """What the store knows of each upload, and its beginning and end."""

    async def lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        """What the backend knows of an upload: its metadata, its record once complete."""

    async def begin(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        """Create the upload unless it exists; return it as stored and whether it was created.

        An existing upload that has no chunk_size adopts a declared one from `proposed`.
        """

    async def abandon(self, meta: UploadMeta) -> None:
        """Remove an upload this request created, if it holds no chunk and none is coming."""

    async def status(self, file_id: str) -> CompletedUpload | UploadProgress | None: ...

    async def download(self, file_id: str) -> tuple[Path | StoredObject, CompletedUpload] | None:
        """The completed file's path (for `FileResponse` or X-Accel-Redirect) or object, and
        its record."""

    async def delete(self, file_id: str) -> bool:
        """Abort an upload in progress or delete a completed one; False when unknown."""

    def location_of(self, file_id: str, filename: str) -> str:
        """Where a completed file is: a path under data_dir, or an object key."""

    async def uploads_in_progress(self) -> list[str]: ...


class ChunkWriter(Protocol[R]):
    """A chunk's bytes received, then committed or discarded (the seed protocol); `R` is the
    backend's handle of a received chunk."""

    async def receive(
        self,
        meta: UploadMeta,
        index: int,
        body: AsyncIterator[memoryview],
        *,
        max_bytes: ByteLimit,
        want_sha256: bool,
        length_hint: int | None = None,
    ) -> R:
        """Stream a chunk's bytes to their place; raises UploadGone before reading any byte
        when the upload is no longer there (completed, removed).

        `length_hint` is the chunk's length if it is the form's last part (from the request's
        Content-Length): an object store needs a length before the first byte."""

    async def receive_unplaced(
        self, body: AsyncIterator[memoryview], *, max_bytes: ByteLimit, want_sha256: bool
    ) -> R:
        """Stream a chunk that came before the fields that say where it belongs."""

    async def sha256_of(self, received: R) -> str:
        """The SHA-256 of received bytes (when the checksum field came after the chunk)."""

    async def commit(
        self, received: R, meta: UploadMeta, index: int
    ) -> Committed | CompletedUpload:
        """Make a received chunk count (consumes `received`); the upload's record when it
        completed meanwhile (the chunk is then dropped)."""

    async def discard(self, received: R) -> None:
        """Forget a received chunk; nothing of it remains."""


class StreamWriter(Protocol[A]):
    """A byte stream written at offsets (tus; begun with `Catalog.begin`); `A` is the backend's
    handle of a PATCH's received bytes."""

    async def stream_progress(self, meta: UploadMeta) -> StreamProgress | CompletedUpload | None:
        """A tus upload's offset and CRC so far; its record once complete."""

    async def receive_at(
        self,
        meta: UploadMeta,
        offset: int,
        body: AsyncIterator[memoryview],
        *,
        length: int | None,
        max_bytes: ByteLimit,
        on_piece: Callable[[memoryview], None] | None,
    ) -> A:
        """Write a PATCH's `length` bytes at `offset`, which must be the upload's offset
        (OffsetMismatch); one writer at a time per upload (UploadLocked) until the commit or
        discard; UploadGone, before reading any byte, when the upload is no longer there.
        A body that ends before `length` bytes (the client went away) is no error here: the
        handle says what was kept. With `length` None (no Content-Length) the body is read
        to its end; past `max_bytes` it is refused (PayloadTooLarge) and nothing is kept.
        `on_piece` sees every byte (checksums)."""

    async def commit_at(self, received: A) -> StreamProgress:
        """Make received bytes count: the offset moves past them. Once it reaches the
        upload's length every chunk is stored, and `complete` completes it."""

    async def discard_at(self, received: A) -> None:
        """Forget received bytes; the offset stays."""

    async def declare_length(self, meta: UploadMeta, length: int) -> UploadMeta:
        """Fix the length of an upload begun without one (tus creation-defer-length)."""

    async def declare_digest(self, meta: UploadMeta, sha256: str) -> UploadMeta:
        """Keep the whole upload's SHA-256 (the IETF draft's Repr-Digest) with an upload
        begun without one; the upload as stored after (an earlier digest stays)."""

    async def concatenate(self, meta: UploadMeta, sources: list[CompletedUpload]) -> StreamProgress:
        """Fill a begun tus upload with completed uploads' bytes, in order, copying nothing
        the store can join in place; every chunk is then stored (call `complete`)."""


class Assembler(Protocol):
    """Completion: the stored pieces become the file, once across processes and hosts."""

    async def complete(self, meta: UploadMeta) -> tuple[CompletedUpload, bool] | None:
        """Complete the upload when every chunk is stored: exactly once across processes.

        Returns the record and whether this call completed it, or None when chunks are
        still missing.
        """


class Janitor(Protocol):
    """What nobody asks for: expiry of idle uploads, and what a crash left half done."""

    async def sweep(self, *, ttl_seconds: float, finish: bool = True) -> SweepReport:
        """Expire idle uploads and finish what a crash left half done (completions too,
        unless `finish` is False: a request completes them)."""


class Backend(Protocol):
    """The store as a service of its own: started, checked, stopped."""

    # Whether chunks take room on the local disk (the free-space checks reserve it).
    keeps_bytes_locally: bool

    async def open(self) -> None:
        """Connect and check what the backend needs, before the first request."""

    async def health(self) -> dict[str, bool]:
        """Each part the store needs (the data folder; the object store and the database),
        and whether it works now."""
        ...

    def free_bytes(self) -> int: ...

    def outbox(self) -> Outbox:
        """Where this backend keeps hook events until they are delivered."""

    def ledger(self) -> Ledger:
        """Where this backend counts what quotas and stopped uploads need."""

    async def close(self) -> None: ...


class Store(Protocol[R, A]):
    """A backend: one object per role, each built with what it needs (`local.LocalStore`,
    `s3.S3Store`). The service takes the roles each of its parts uses."""

    @property
    def catalog(self) -> Catalog: ...
    @property
    def chunks(self) -> ChunkWriter[R]: ...
    @property
    def streams(self) -> StreamWriter[A]: ...
    @property
    def assembler(self) -> Assembler: ...
    @property
    def janitor(self) -> Janitor: ...
    @property
    def backend(self) -> Backend: ...
