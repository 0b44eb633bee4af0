"""What the document's paths share: the value schemas, the answers and errors, the
component schemas."""

from __future__ import annotations

from typing import Any

from ..forms import FILE_ID_PATTERN

# The rules of forms.py, written once there.
FILE_ID = {"type": "string", "pattern": f"^{FILE_ID_PATTERN.pattern}$"}
CRC64NVME = {
    "type": "string",
    "description": "CRC-64/NVME in S3's form: base64 of the 8 big-endian bytes",
    "pattern": "^[A-Za-z0-9+/]{10}[AEIMQUYcgkosw048]=$",
}
METADATA = {
    "type": "object",
    "additionalProperties": {"type": "string"},
    "description": "the client's metadata, when it gave some",
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error_answer(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = json_body(ref("Error"), description)
    if headers:
        answer["headers"] = headers
    return answer


RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}
FILE_ID_PARAMETER = {
    "name": "file_id",
    "in": "path",
    "required": True,
    "schema": FILE_ID,
    "description": "the upload's id; one breaking the pattern answers 400",
}
AUTH_ERROR = error_answer("auth_tokens are configured and no valid Bearer token was sent")


def chunk_answer(status: str, extra: dict[str, Any]) -> dict[str, Any]:
    """A chunk's answer: the seed's fields, and the file's once it is completed."""
    required = ["file_id", "filename", "type", "status", "uploaded_chunks", "total_chunks"]
    return {
        "type": "object",
        "required": required + (["size", "crc64nvme"] if extra else []),
        "properties": {
            "file_id": FILE_ID,
            "filename": {"type": "string"},
            "type": {"const": "file"},
            "status": {"const": status},
            "uploaded_chunks": {"type": "integer", "minimum": 1},
            "total_chunks": {"type": "integer", "minimum": 1},
            "metadata": METADATA,
            **extra,
        },
    }


def schemas() -> dict[str, Any]:
    completed_fields = {
        "size": {"type": "integer", "minimum": 0},
        "crc64nvme": CRC64NVME,
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "metadata": METADATA,
    }
    return {
        "Error": {
            "type": "object",
            "required": ["detail"],
            "properties": {"detail": {"type": "string"}},
        },
        "ChunkUploading": chunk_answer("uploading", {}),
        "ChunkCompleted": chunk_answer("completed", completed_fields),
        "StatusUploading": {
            "type": "object",
            "required": [
                "status",
                "uploaded_chunks",
                "file_exists",
                "total_chunks",
                "missing_chunks",
            ],
            "properties": {
                "status": {"const": "uploading"},
                "uploaded_chunks": {"type": "integer", "minimum": 0},
                "file_exists": {"const": False},
                "total_chunks": {"type": "integer", "minimum": 1},
                "missing_chunks": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "file_id": FILE_ID,
                "filename": {"type": "string"},
                "metadata": METADATA,
            },
        },
        "StatusCompleted": {
            "type": "object",
            "required": ["status", "file_exists", "filename", "size", "crc64nvme"],
            "properties": {
                "status": {"const": "completed"},
                "file_exists": {"const": True},
                "file_id": FILE_ID,
                "filename": {"type": "string"},
                "uploaded_chunks": {"type": "integer", "minimum": 1},
                "total_chunks": {"type": "integer", "minimum": 1},
                **completed_fields,
            },
        },
        "StatusNotFound": {
            "type": "object",
            "required": ["status", "file_exists"],
            "properties": {"status": {"const": "not_found"}, "file_exists": {"const": False}},
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"enum": ["ok", "error"]},
                "detail": {"type": "string"},
            },
        },
    }
