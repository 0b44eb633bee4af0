"""The JSON answers of the seed routes, as types.

The handlers build these and send them with `answer()`; `/openapi.json`'s component schemas are
generated from the same classes (`schema_of`), so the document and the wire cannot drift.
A field whose value is None is left out of the body and is optional in the schema; every
other field is required. Value rules (the file-id pattern, the checksum forms) come from
forms.py and checksums.py, where the requests are checked against them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from aiohttp import web

from ..auth.owners import public_id
from ..model import FILE_ID_PATTERN, CompletedUpload, StreamProgress, UploadProgress

JsonSchema = dict[str, Any]


class Rule(dict[str, Any]):
    """Schema keywords attached to a type with Annotated (hashed by identity, as a union of
    Annotated types needs)."""

    __hash__ = object.__hash__  # type: ignore[assignment]


FILE_ID_SCHEMA = Rule(type="string", pattern=f"^{FILE_ID_PATTERN.pattern}$")
CRC64NVME_SCHEMA = Rule(
    type="string",
    description="CRC-64/NVME in S3's form: base64 of the 8 big-endian bytes",
    pattern="^[A-Za-z0-9+/]{10}[AEIMQUYcgkosw048]=$",
)
METADATA_SCHEMA = Rule(
    type="object",
    additionalProperties={"type": "string"},
    description="the client's metadata, when it gave some",
)

FileId = Annotated[str, FILE_ID_SCHEMA]
Crc64Nvme = Annotated[str, CRC64NVME_SCHEMA]
Metadata = Annotated[dict[str, str], METADATA_SCHEMA]
Sha256Hex = Annotated[str, Rule(pattern="^[0-9a-f]{64}$")]  # answers give it in lower case
AppAnswer = Annotated[
    dict[str, Any],
    Rule(type="object", description="the pre-finish hook's answer (docs/integration.md)"),
]
Count = Annotated[int, Rule(minimum=1)]
Size = Annotated[int, Rule(minimum=0)]


class Answer:
    """A JSON answer: `body()` is what goes on the wire, fields in declaration order."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def body(self) -> dict[str, Any]:
        return {
            name: value
            for name in self.__dataclass_fields__
            if (value := getattr(self, name)) is not None
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChunkUploading(Answer):
    """A chunk stored; the upload is not complete yet."""

    file_id: FileId
    filename: str
    type: Literal["file"] = "file"
    status: Literal["uploading"] = "uploading"
    uploaded_chunks: Count
    total_chunks: Count
    metadata: Metadata | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChunkCompleted(Answer):
    """The chunk that completed the upload (or a late retry of one after it)."""

    file_id: FileId
    filename: str
    type: Literal["file"] = "file"
    status: Literal["completed"] = "completed"
    uploaded_chunks: Count
    total_chunks: Count
    size: Size
    crc64nvme: Crc64Nvme
    sha256: Sha256Hex | None = None
    metadata: Metadata | None = None
    app: AppAnswer | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StatusUploading(Answer):
    """An upload of chunks in progress."""

    status: Literal["uploading"] = "uploading"
    uploaded_chunks: Size
    file_exists: Literal[False] = False
    file_id: FileId
    filename: str
    total_chunks: Count
    missing_chunks: list[Size]
    metadata: Metadata | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StatusStreaming(Answer):
    """A byte stream in progress (tus, or the IETF draft): its bytes so far, and its length
    once declared."""

    status: Literal["uploading"] = "uploading"
    file_exists: Literal[False] = False
    file_id: FileId
    protocol: Annotated[str, Rule(enum=["tus", "ietf"])]
    offset: Size
    size: Size | None = None
    filename: str
    metadata: Metadata | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StatusCompleted(Answer):
    """A completed upload: its file can be downloaded."""

    status: Literal["completed"] = "completed"
    file_exists: Literal[True] = True
    file_id: FileId
    filename: str
    size: Size
    crc64nvme: Crc64Nvme
    sha256: Sha256Hex | None = None
    metadata: Metadata | None = None
    uploaded_chunks: Count
    total_chunks: Count
    app: AppAnswer | None = None  # on the draft's completing answer only


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StatusNotFound(Answer):
    """No upload of that id, in progress or completed."""

    status: Literal["not_found"] = "not_found"
    file_exists: Literal[False] = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Health(Answer):
    """`ok`, or `error` with what fails and each check's state."""

    status: Literal["ok", "error"]
    detail: str | None = None
    checks: dict[str, Literal["ok", "failing"]] | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Error(Answer):
    """Every refusal and failure: what went wrong, in a sentence."""

    detail: str


# Reason phrases of the statuses http.HTTPStatus does not know.
REASONS = {460: "Checksum Mismatch"}


def answer(
    value: Answer, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The answer as a JSON response, `Content-Type: application/json` exactly (no charset)."""
    return web.Response(
        body=json.dumps(value.body()).encode(),
        status=status,
        reason=REASONS.get(status),
        content_type="application/json",
        headers=headers,
    )


def chunk_completed(record: CompletedUpload) -> ChunkCompleted:
    return ChunkCompleted(
        file_id=public_id(record.file_id),
        filename=record.filename,
        uploaded_chunks=record.total_chunks,
        total_chunks=record.total_chunks,
        size=record.size,
        crc64nvme=record.crc64nvme,
        sha256=record.sha256,
        metadata=record.metadata,
        app=record.app,
    )


def status_answer(
    found: CompletedUpload | StreamProgress | UploadProgress,
) -> StatusCompleted | StatusStreaming | StatusUploading:
    if isinstance(found, CompletedUpload):
        return StatusCompleted(
            file_id=public_id(found.file_id),
            filename=found.filename,
            size=found.size,
            crc64nvme=found.crc64nvme,
            sha256=found.sha256,
            metadata=found.metadata,
            uploaded_chunks=found.total_chunks,
            total_chunks=found.total_chunks,
            app=found.app,
        )
    if isinstance(found, StreamProgress):
        return StatusStreaming(
            file_id=public_id(found.meta.file_id),
            protocol=found.meta.protocol,
            offset=found.offset,
            size=found.meta.total_size,
            filename=found.meta.filename,
            metadata=found.meta.metadata,
        )
    return StatusUploading(
        uploaded_chunks=len(found.stored),
        file_id=public_id(found.meta.file_id),
        filename=found.meta.filename,
        total_chunks=found.meta.total_chunks,
        missing_chunks=found.missing,
        metadata=found.meta.metadata,
    )


ANSWERS: tuple[type[Answer], ...] = (
    Error,
    ChunkUploading,
    ChunkCompleted,
    StatusUploading,
    StatusStreaming,
    StatusCompleted,
    StatusNotFound,
    Health,
)


def schema_of(cls: type[Answer]) -> JsonSchema:
    """The JSON schema of an answer class, from its fields' types."""
    hints = typing.get_type_hints(cls, include_extras=True)
    properties: JsonSchema = {}
    required = []
    for field in dataclasses.fields(cls):
        value_schema, optional = _value_schema(hints[field.name])
        properties[field.name] = value_schema
        if not optional:
            required.append(field.name)
    schema: JsonSchema = {"type": "object", "required": required, "properties": properties}
    if cls.__doc__:
        schema["description"] = " ".join(cls.__doc__.split())
    return schema


def _value_schema(hint: Any) -> tuple[JsonSchema, bool]:
    """(schema, whether None is allowed: the field is then left out of the body)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType or origin is typing.Union:
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"an answer field may be one type or None, not {hint}")
        return _value_schema(others[0])[0], True
    if origin is Annotated:
        inner, _ = _value_schema(args[0])
        for extra in hint.__metadata__:
            inner = {**inner, **extra}
        return inner, False
    if origin is Literal:
        return ({"const": args[0]} if len(args) == 1 else {"enum": list(args)}), False
    if origin is list:
        return {"type": "array", "items": _value_schema(args[0])[0]}, False
    if origin is dict:
        return {"type": "object", "additionalProperties": _value_schema(args[1])[0]}, False
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}, False
    if hint is Any:  # any JSON value (the application's, in "app")
        return {}, False
    raise TypeError(f"no JSON schema for {hint!r}")


_SCALARS = {str: "string", int: "integer", bool: "boolean", float: "number"}
