"""The OpenAPI 3.1 document of every route, field, answer and error: `GET /openapi.json`.

Written by hand from PROTOCOL.md, next to the handlers it describes; `tests/test_openapi.py`
checks that it lists exactly the server's routes and that real answers match it, and CI runs
schemathesis against a live server from it.
"""

from __future__ import annotations

import functools
import json
from importlib import metadata
from typing import Any

from .config import Config
from .forms import MAX_FIELD_BYTES, MAX_FILENAME_BYTES

FILE_ID = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}
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


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = _json(_ref("Error"), description)
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
AUTH_ERROR = _error("auth_tokens are configured and no valid Bearer token was sent")


def _chunk_answer(status: str, extra: dict[str, Any]) -> dict[str, Any]:
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


def _schemas() -> dict[str, Any]:
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
        "ChunkUploading": _chunk_answer("uploading", {}),
        "ChunkCompleted": _chunk_answer("completed", completed_fields),
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


def _chunk_form(config: Config) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["file_id", "chunk_index", "total_chunks", "filename", "chunk"],
        "properties": {
            "file_id": {**FILE_ID, "description": "the upload's id, chosen by the client"},
            "chunk_index": {
                "type": "integer",
                "minimum": 0,
                "maximum": config.max_total_chunks - 1,
                "description": "0-based, below total_chunks",
            },
            "total_chunks": {
                "type": "integer",
                "minimum": 1,
                "maximum": config.max_total_chunks,
                "description": "the number of chunks (max_total_chunks at most)",
            },
            "filename": {
                "type": "string",
                "pattern": r"^(?!\.{1,2}$)[^/\\\x00-\x1f\x7f]{1,255}$",
                "description": (
                    f"not '.' or '..', no '/', '\\', NUL or control characters, at most "
                    f"{MAX_FILENAME_BYTES} bytes of UTF-8"
                ),
            },
            "chunk": {
                "type": "string",
                "format": "binary",
                "description": f"the chunk's bytes, at most max_chunk_bytes "
                f"({config.max_chunk_bytes})",
            },
            "chunk_sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
            "chunk_crc64nvme": {**CRC64NVME, "description": "this chunk's CRC-64/NVME"},
            "total_size": {
                "type": "integer",
                "minimum": 0,
                "description": f"the whole file's size in bytes; above max_file_bytes "
                f"({config.max_file_bytes}): 413",
            },
            "chunk_size": {
                "type": "integer",
                "minimum": 1,
                "description": f"the size of every chunk but the last; above max_chunk_bytes "
                f"({config.max_chunk_bytes}): 413",
            },
            "metadata": {
                "type": "string",
                "maxLength": MAX_FIELD_BYTES,
                "description": (
                    "a JSON object of string keys and string values, at most 4 KiB encoded"
                ),
                "contentMediaType": "application/json",
            },
        },
    }


def _links_from_file_id() -> dict[str, Any]:
    """What a client does next with the file_id of an answer (schemathesis follows these in
    its stateful phase)."""
    file_id = {"file_id": "$response.body#/file_id"}
    return {
        "UploadStatus": {"operationId": "uploadStatus", "parameters": file_id},
        "DownloadFile": {"operationId": "downloadFile", "parameters": file_id},
        "DeleteUpload": {"operationId": "deleteUpload", "parameters": file_id},
    }


def _paths(config: Config) -> dict[str, Any]:
    chunk_answer = {"oneOf": [_ref("ChunkUploading"), _ref("ChunkCompleted")]}
    status_answer = {"oneOf": [_ref("StatusUploading"), _ref("StatusCompleted")]}
    return {
        "/upload-chunk": {
            "post": {
                "summary": "Store one chunk of an upload",
                "operationId": "uploadChunk",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _chunk_form(config)}},
                },
                "responses": {
                    "200": {
                        **_json(chunk_answer, "stored (or already completed: a late retry)"),
                        "links": _links_from_file_id(),
                    },
                    "400": _error("a field is missing or malformed, or the body is not multipart"),
                    "401": AUTH_ERROR,
                    "408": _error("no byte of the body arrived for idle_timeout_seconds"),
                    "409": _error("a field differs from earlier chunks of the file_id"),
                    "413": _error("larger than max_chunk_bytes or max_file_bytes"),
                    "422": _error("chunk_sha256 or chunk_crc64nvme does not match"),
                    "4XX": _error("the pre-create hook refused the upload: its status and detail"),
                    "500": _error("the storage failed"),
                    "503": _error(
                        "too many chunks in flight, the storage or the pre-create hook cannot "
                        "be reached",
                        RETRY_AFTER,
                    ),
                    "507": _error("free disk would fall below min_free_bytes"),
                },
            }
        },
        "/upload-status/{file_id}": {
            "get": {
                "summary": "The state of an upload",
                "operationId": "uploadStatus",
                "parameters": [FILE_ID_PARAMETER],
                "responses": {
                    "200": _json(status_answer, "uploading or completed"),
                    "400": _error("file_id breaks the pattern"),
                    "401": AUTH_ERROR,
                    "404": _json(_ref("StatusNotFound"), "no such upload"),
                    "503": _error("the storage cannot be reached", RETRY_AFTER),
                },
            }
        },
        "/files/{file_id}": {
            "get": {
                "summary": "The completed file, with Range",
                "operationId": "downloadFile",
                "description": (
                    "Takes a Range header (RFC 9110): 206 with the range, 416 outside the file."
                ),
                "parameters": [FILE_ID_PARAMETER],
                "responses": {
                    "200": {
                        "description": "the whole file, Content-Disposition: attachment",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "206": {
                        "description": "the asked range",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "400": _error("file_id breaks the pattern"),
                    "401": AUTH_ERROR,
                    "404": _error("no completed upload of that id"),
                    "416": {"description": "the range is outside the file"},
                    "503": _error("the storage cannot be reached", RETRY_AFTER),
                },
            }
        },
        "/uploads/{file_id}": {
            "delete": {
                "summary": "Abort an upload in progress or delete a completed file",
                "operationId": "deleteUpload",
                "parameters": [FILE_ID_PARAMETER],
                "responses": {
                    "204": {"description": "removed"},
                    "400": _error("file_id breaks the pattern"),
                    "401": AUTH_ERROR,
                    "404": _error("no such upload"),
                    "503": _error("the storage cannot be reached", RETRY_AFTER),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Whether the storage is usable (no token needed)",
                "operationId": "health",
                "security": [],
                "responses": {
                    "200": _json(_ref("Health"), "ok"),
                    "503": {**_json(_ref("Health"), "the storage fails"), "headers": RETRY_AFTER},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format, summed over the server's processes",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "the metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": AUTH_ERROR,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document (no token needed)",
                "operationId": "openapi",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "the OpenAPI 3.1 document"),
                },
            }
        },
        "/": {
            "get": {
                "summary": "The upload page (no token needed)",
                "operationId": "uploadPage",
                "security": [],
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/static/{path}": {
            "get": {
                "summary": "The page's scripts (no token needed)",
                "operationId": "staticFile",
                "security": [],
                "parameters": [
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "the file"},
                    "404": _error("no such file"),
                },
            }
        },
    }


def _version() -> str:
    try:
        return metadata.version("chunkserver")
    except metadata.PackageNotFoundError:
        return "unknown"


def document(config: Config) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chunkserver",
            "version": _version(),
            "description": (
                "Large files in chunks over HTTP: each chunk is a multipart POST; the upload "
                "completes when every chunk is stored. Answers may hold keys not listed here: "
                "clients ignore keys they do not know."
            ),
        },
        "paths": _paths(config),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # A token is needed only when auth_tokens are configured: both are valid.
        "security": [{}, {"bearer": []}],
    }


@functools.cache
def document_bytes(config: Config) -> bytes:
    """The document for this configuration's limits, encoded once."""
    return json.dumps(document(config), indent=1).encode()
