"""The seed routes' paths: the chunk form, status, download, delete, health."""

from __future__ import annotations

from typing import Any

from ...config import Config
from ..forms import (
    FILENAME_PATTERN,
    MAX_FIELD_BYTES,
    MAX_FILENAME_BYTES,
    REQUIRED_FIELDS,
    SHA256_PATTERN,
)
from .common import (
    AUTH_ERROR,
    CRC64NVME,
    FILE_ID,
    FILE_ID_PARAMETER,
    QUOTA_ERROR,
    RETRY_AFTER,
    SCOPE_ERROR,
    error_answer,
    json_body,
    ref,
)


def chunk_form(config: Config) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [*REQUIRED_FIELDS, "chunk"],
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
                "pattern": FILENAME_PATTERN,
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
            "chunk_sha256": {"type": "string", "pattern": f"^{SHA256_PATTERN.pattern}$"},
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


def links_from_file_id() -> dict[str, Any]:
    """What a client does next with the file_id of an answer (schemathesis follows these in
    its stateful phase)."""
    file_id = {"file_id": "$response.body#/file_id"}
    return {
        "UploadStatus": {"operationId": "uploadStatus", "parameters": file_id},
        "DownloadFile": {"operationId": "downloadFile", "parameters": file_id},
        "DeleteUpload": {"operationId": "deleteUpload", "parameters": file_id},
    }


def seed_paths(config: Config) -> dict[str, Any]:
    chunk_answer = {"oneOf": [ref("ChunkUploading"), ref("ChunkCompleted")]}
    status_answer = {
        "oneOf": [ref("StatusUploading"), ref("StatusStreaming"), ref("StatusCompleted")]
    }
    return {
        "/upload-chunk": {
            "post": {
                "summary": "Store one chunk of an upload",
                "operationId": "uploadChunk",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": chunk_form(config)}},
                },
                "responses": {
                    "200": {
                        **json_body(chunk_answer, "stored (or already completed: a late retry)"),
                        "links": links_from_file_id(),
                    },
                    "400": error_answer(
                        "a field is missing, malformed or given twice, or the body is not multipart"
                    ),
                    "401": AUTH_ERROR,
                    "403": SCOPE_ERROR,
                    "429": QUOTA_ERROR,
                    "408": error_answer("no byte of the body arrived for idle_timeout_seconds"),
                    "409": error_answer("a field differs from earlier chunks of the file_id"),
                    "413": error_answer("larger than max_chunk_bytes or max_file_bytes"),
                    "422": error_answer(
                        "chunk_sha256 or chunk_crc64nvme does not match, or a chunk other "
                        "than the last is empty"
                    ),
                    "4XX": error_answer(
                        "the pre-create hook refused the upload: its status and detail"
                    ),
                    "500": error_answer("the storage failed"),
                    "503": error_answer(
                        "too many chunks in flight, the storage or the pre-create hook cannot "
                        "be reached",
                        RETRY_AFTER,
                    ),
                    "507": error_answer("free disk would fall below min_free_bytes"),
                },
            }
        },
        "/upload-status/{file_id}": {
            "get": {
                "summary": "The state of an upload",
                "operationId": "uploadStatus",
                "parameters": [FILE_ID_PARAMETER],
                "responses": {
                    "200": json_body(status_answer, "uploading or completed"),
                    "400": error_answer("file_id breaks the pattern"),
                    "401": AUTH_ERROR,
                    "403": SCOPE_ERROR,
                    "429": QUOTA_ERROR,
                    "404": json_body(ref("StatusNotFound"), "no such upload"),
                    "503": error_answer("the storage cannot be reached", RETRY_AFTER),
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
                    "400": error_answer("file_id breaks the pattern"),
                    "401": AUTH_ERROR,
                    "403": SCOPE_ERROR,
                    "429": QUOTA_ERROR,
                    "404": error_answer("no completed upload of that id"),
                    "416": {"description": "the range is outside the file"},
                    "503": error_answer("the storage cannot be reached", RETRY_AFTER),
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
                    "400": error_answer("file_id breaks the pattern"),
                    "401": AUTH_ERROR,
                    "403": SCOPE_ERROR,
                    "429": QUOTA_ERROR,
                    "404": error_answer("no such upload"),
                    "503": error_answer("the storage cannot be reached", RETRY_AFTER),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Whether the storage is usable (no token needed)",
                "operationId": "health",
                "security": [],
                "responses": {
                    "200": json_body(ref("Health"), "ok"),
                    "503": {
                        **json_body(ref("Health"), "the storage fails"),
                        "headers": RETRY_AFTER,
                    },
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
                    "403": SCOPE_ERROR,
                    "429": QUOTA_ERROR,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document (no token needed)",
                "operationId": "openapi",
                "security": [],
                "responses": {
                    "200": json_body({"type": "object"}, "the OpenAPI 3.1 document"),
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
                    "404": error_answer("no such file"),
                },
            }
        },
    }
