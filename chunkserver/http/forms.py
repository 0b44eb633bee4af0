"""The form fields of POST /upload-chunk: collected as they arrive, validated into a request."""

from __future__ import annotations

import base64
import binascii
import json
import re

from .. import checksums
from ..errors import BadRequest
from ..model import ChunkFields, check_file_id

SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
REQUIRED_FIELDS = ("file_id", "chunk_index", "total_chunks", "filename")
OPTIONAL_FIELDS = ("chunk_sha256", "chunk_crc64nvme", "total_size", "chunk_size", "metadata")
TEXT_FIELDS = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)
MAX_FIELD_BYTES = 4096  # also the limit of `metadata`, encoded
MAX_FILENAME_BYTES = 255
# check_filename's rules as one pattern, for the OpenAPI document (which counts characters,
# not bytes: the byte limit is said in words there).
FILENAME_PATTERN = r"^(?!\.{1,2}$)[^/\\\x00-\x1f\x7f]{1," + f"{MAX_FILENAME_BYTES}" + "}$"


def check_filename(filename: str) -> str:
    if filename in ("", ".", ".."):
        raise BadRequest("Invalid filename: must not be empty, '.' or '..'")
    if any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in filename):
        raise BadRequest("Invalid filename: must not hold '/', '\\', NUL or control characters")
    if len(filename.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise BadRequest(f"Invalid filename: longer than {MAX_FILENAME_BYTES} bytes of UTF-8")
    return filename


def check_metadata(text: str) -> dict[str, str]:
    """The client's metadata: a JSON object of string keys and values, at most 4 KiB."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FIELD_BYTES:
        raise BadRequest(f"Invalid metadata: longer than {MAX_FIELD_BYTES} bytes")
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest("Invalid metadata: must be a JSON object of string keys and values")
    return value


def _integer(name: str, text: str) -> int:
    """A plain decimal integer: digits only (no sign, no spaces), as the seed's clients send."""
    if not re.fullmatch(r"[0-9]{1,19}", text):
        raise BadRequest(f"Invalid {name}: must be a decimal integer, got {text[:40]!r}")
    return int(text)


class ChunkForm:
    """Text fields as they arrive, in any order; `fields()` validates them together."""

    def __init__(self, *, max_total_chunks: int) -> None:
        self.values: dict[str, str] = {}
        self.max_total_chunks = max_total_chunks
        self._checked: ChunkFields | None = None  # fields() of the values as they are

    def set(self, name: str, value: str) -> None:
        if name in self.values:
            raise BadRequest(f"Invalid {name}: given more than once")
        self.values[name] = value
        self._checked = None

    def has_required(self) -> bool:
        return all(name in self.values for name in REQUIRED_FIELDS)

    def wants_sha256(self) -> bool:
        return "chunk_sha256" in self.values

    def expected_sha256(self) -> str | None:
        value = self.values.get("chunk_sha256")
        return _checked_sha256(value) if value is not None else None

    def fields(self) -> ChunkFields:
        """Validate every field; raise BadRequest naming the first that is wrong."""
        if self._checked is None:
            self._checked = self._validate()
        return self._checked

    def _validate(self) -> ChunkFields:
        for name in REQUIRED_FIELDS:
            if name not in self.values:
                raise BadRequest(f"Missing required parameter: {name}")
        file_id = check_file_id(self.values["file_id"])
        total_chunks = _integer("total_chunks", self.values["total_chunks"])
        if total_chunks < 1:
            raise BadRequest("Invalid total_chunks: must be at least 1")
        if total_chunks > self.max_total_chunks:
            raise BadRequest(
                f"Invalid total_chunks: above the limit of {self.max_total_chunks} "
                "(max_total_chunks)"
            )
        chunk_index = _integer("chunk_index", self.values["chunk_index"])
        if not 0 <= chunk_index < total_chunks:
            raise BadRequest(
                f"Invalid chunk_index: must be in [0, {total_chunks}), got {chunk_index}"
            )
        filename = check_filename(self.values["filename"])
        total_size = self._optional_integer("total_size", minimum=0)
        chunk_size = self._optional_integer("chunk_size", minimum=1)
        crc = self.values.get("chunk_crc64nvme")
        metadata = self.values.get("metadata")
        return ChunkFields(
            file_id=file_id,
            chunk_index=chunk_index,
            total_chunks=total_chunks,
            filename=filename,
            chunk_sha256=self.expected_sha256(),
            chunk_crc64nvme=_checked_crc64nvme(crc) if crc is not None else None,
            total_size=total_size,
            chunk_size=chunk_size,
            metadata=check_metadata(metadata) if metadata is not None else None,
        )

    def _optional_integer(self, name: str, *, minimum: int) -> int | None:
        if name not in self.values:
            return None
        value = _integer(name, self.values[name])
        if value < minimum:
            raise BadRequest(f"Invalid {name}: must be at least {minimum}")
        return value


def _checked_sha256(value: str) -> str:
    value = value.strip()
    if not SHA256_PATTERN.fullmatch(value):
        raise BadRequest("Invalid chunk_sha256: must be 64 hexadecimal characters")
    return value.lower()


def _checked_crc64nvme(value: str) -> int:
    try:
        return checksums.from_s3(value)
    except ValueError:
        raise BadRequest(
            "Invalid chunk_crc64nvme: must be the base64 of 8 bytes (S3's form)"
        ) from None


# -- Upload-Metadata (tus, and the IETF draft's clients that send it) --


def parse_metadata(header: str | None) -> dict[str, str] | None:
    """Upload-Metadata: comma-separated `key base64(value)` pairs (the value may be absent)."""
    if header is None or not header.strip():
        return None
    pairs: dict[str, str] = {}
    for item in header.split(","):
        key, _, encoded = item.strip().partition(" ")
        if not key or not key.isascii() or any(c.isspace() for c in key):
            raise BadRequest(f"Upload-Metadata: invalid key {key[:40]!r}")
        try:
            pairs[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise BadRequest(f"Upload-Metadata: the value of {key!r} is not base64 UTF-8") from None
    if len(json.dumps(pairs).encode()) > MAX_FIELD_BYTES:
        raise BadRequest(f"Upload-Metadata: longer than {MAX_FIELD_BYTES} bytes")
    return pairs


def encode_metadata(metadata: dict[str, str] | None) -> str:
    return ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}".rstrip()
        for key, value in (metadata or {}).items()
    )
