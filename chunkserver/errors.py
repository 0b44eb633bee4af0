"""The errors the server answers with: one class per row of PROTOCOL.md's error table.

Each carries its HTTP status and the `detail` sent to the client. They are raised where the
problem is found and turned into JSON in one place, `app.error_middleware`.
"""

from __future__ import annotations


class ChunkServerError(Exception):
    """Base of every error that has an HTTP answer."""

    status: int = 500
    headers: dict[str, str] = {}  # noqa: RUF012 - read-only defaults, replaced per instance
    close_connection = False

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ChunkServerError):
    status = 400


class NotAuthenticated(ChunkServerError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012

    def __init__(self, detail: str = "Not authenticated") -> None:
        super().__init__(detail)


class ClientTooSlow(ChunkServerError):
    """No byte of the request body arrived for `idle_timeout_seconds` (a stalled client)."""

    status = 408
    close_connection = True

    def __init__(self, seconds: float) -> None:
        super().__init__(f"Chunk upload failed: no data received for {seconds:g} seconds")


class FileNotFound(ChunkServerError):
    status = 404

    def __init__(self, detail: str = "File not found") -> None:
        super().__init__(detail)


class UploadConflict(ChunkServerError):
    status = 409


class UploadGone(UploadConflict):
    """The upload was completed, deleted or expired while this request was handled."""

    def __init__(
        self, detail: str = "The upload was removed while this chunk was being received"
    ) -> None:
        super().__init__(detail)


class PayloadTooLarge(ChunkServerError):
    status = 413


class RangeNotSatisfiable(ChunkServerError):
    """A Range that the file cannot satisfy (it starts past the end)."""

    status = 416

    def __init__(self, size: int) -> None:
        super().__init__(f"Range not satisfiable: the file has {size} bytes")
        self.headers = {"Content-Range": f"bytes */{size}"}


class ChecksumMismatch(ChunkServerError):
    status = 422

    def __init__(self, detail: str = "Chunk checksum mismatch") -> None:
        super().__init__(detail)


class EmptyChunk(ChunkServerError):
    """A chunk of no bytes that is not the last: only the last chunk may be empty."""

    status = 422

    def __init__(self, index: int) -> None:
        super().__init__(f"Chunk {index} is empty: only the last chunk of an upload may be")


class HeaderFieldsTooLarge(ChunkServerError):
    """A header line over the limit (RFC 6585's 431), refused as JSON like every error."""

    status = 431
    close_connection = True

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request header fields too large: a header line is over {limit} bytes")


class DiskFull(ChunkServerError):
    status = 507

    def __init__(
        self, detail: str = "Chunk upload failed: disk space full", retry_after: int | None = None
    ) -> None:
        super().__init__(detail)
        if retry_after is not None:
            self.headers = {"Retry-After": str(retry_after)}


class StorageFailure(ChunkServerError):
    status = 500

    def __init__(self, reason: str) -> None:
        super().__init__(f"Chunk upload failed: {reason}")


class InternalFailure(ChunkServerError):
    """An unforeseen error, already logged with its traceback where it was caught."""

    status = 500


class ServerBusy(ChunkServerError):
    """More chunks in flight than `max_inflight_chunks`; the client should retry later."""

    status = 503
    headers = {"Retry-After": "1"}  # noqa: RUF012

    def __init__(self, limit: int) -> None:
        super().__init__(f"Server busy: {limit} chunks already in flight (max_inflight_chunks)")


class CompletionPending(ChunkServerError):
    """Another live process or host is completing the upload; ask again in a moment."""

    status = 503
    headers = {"Retry-After": "2"}  # noqa: RUF012

    def __init__(
        self, detail: str = "The upload is being completed by another server; retry shortly"
    ) -> None:
        super().__init__(detail)


class StoreUnavailable(ChunkServerError):
    """The object store or the database cannot be reached now: nothing was acknowledged."""

    status = 503
    headers = {"Retry-After": "5"}  # noqa: RUF012

    def __init__(self, reason: str) -> None:
        super().__init__(f"Storage unavailable, retry later: {reason}")
        self.component = "the database" if "database" in reason else "the object store"


class QuotaExceeded(ChunkServerError):
    """An identity is over one of its quotas (quotas.py): nothing of the request is stored."""

    status = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(max(1, retry_after))}


class UploadStopped(BadRequest):
    """The application stopped the upload (a post-receive hook's answer)."""


class HookRefused(ChunkServerError):
    """A blocking hook (pre-create, pre-finish, pre-access) answered 4xx: its status and
    detail go to the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class HookUnavailable(ChunkServerError):
    """A blocking hook could not be asked (down, timeout, 5xx): the request waits."""

    status = 503
    headers = {"Retry-After": "5"}  # noqa: RUF012

    def __init__(self, reason: str) -> None:
        super().__init__(f"The upload hook cannot be reached, retry later: {reason}")


# -- tus (tus.py): the statuses its specification gives --


class OffsetMismatch(UploadConflict):
    """A PATCH's Upload-Offset is not the upload's offset."""

    def __init__(self, given: int, stored: int) -> None:
        super().__init__(f"Upload-Offset {given} does not match the upload's offset {stored}")
        self.given = given
        self.stored = stored
        self.headers = {"Upload-Offset": str(stored)}


class UploadAlreadyComplete(PayloadTooLarge):
    """Bytes sent to an upload that is complete (tus: 413; the IETF draft: 400)."""

    def __init__(self) -> None:
        super().__init__("The upload is complete: no byte may be added")


class InconsistentLength(BadRequest):
    """A length given by a request differs from one given before, or from its bytes."""


class DigestMismatch(BadRequest):
    """Content-Digest or Repr-Digest (RFC 9530) does not match the bytes sent."""


class UploadLocked(ChunkServerError):
    """Another PATCH of the same upload is being received (by this process or another)."""

    status = 423

    def __init__(self) -> None:
        super().__init__("Another request is writing to this upload; retry after it ends")


class UnsupportedTusVersion(ChunkServerError):
    status = 412
    headers = {"Tus-Version": "1.0.0"}  # noqa: RUF012

    def __init__(self, given: str) -> None:
        super().__init__(f"Tus-Resumable {given!r} is not supported: this server speaks 1.0.0")


class UnsupportedMediaType(ChunkServerError):
    status = 415

    def __init__(
        self, detail: str = "A PATCH must have Content-Type: application/offset+octet-stream"
    ) -> None:
        super().__init__(detail)


class LengthRequired(ChunkServerError):
    status = 411

    def __init__(self) -> None:
        super().__init__("A PATCH must have a Content-Length")


class Forbidden(ChunkServerError):
    status = 403


class TusChecksumMismatch(ChunkServerError):
    """Upload-Checksum does not match the PATCH's bytes (tus's own status, 460)."""

    status = 460

    def __init__(self) -> None:
        super().__init__("Checksum Mismatch")
