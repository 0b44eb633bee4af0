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
from .forms import FILE_ID_PATTERN, MAX_FIELD_BYTES, MAX_FILENAME_BYTES, SHA256_PATTERN

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
                "pattern": r"^(?!\.{1,2}$)[^/\\\x00-\x1f\x7f]{1," + f"{MAX_FILENAME_BYTES}" + "}$",
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


def _header(
    name: str, schema: dict[str, Any], description: str, *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "schema": schema,
        "description": description,
    }


TUS_RESUMABLE = _header(
    "Tus-Resumable", {"const": "1.0.0"}, "the tus version; another answers 412", required=True
)
COUNT = {"type": "string", "pattern": "^[0-9]{1,19}$"}
TUS_ANSWER_HEADERS = {"Tus-Resumable": {"schema": {"const": "1.0.0"}}}
OFFSET_OCTETS = {
    "application/offset+octet-stream": {"schema": {"type": "string", "format": "binary"}}
}
TUS_STATE_HEADERS = {
    **TUS_ANSWER_HEADERS,
    "Upload-Offset": {"schema": COUNT, "description": "the bytes stored"},
    "Upload-Expires": {"schema": {"type": "string"}, "description": "when an idle upload ends"},
}


def _tus_error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _error(description, {**TUS_ANSWER_HEADERS, **(headers or {})})


def _tus_paths(config: Config) -> dict[str, Any]:
    """tus 1.0.0 (https://tus.io/protocols/resumable-upload) and its extensions."""
    capabilities = {
        "204": {
            "description": "the server's tus capabilities",
            "headers": {
                **TUS_ANSWER_HEADERS,
                "Tus-Version": {"schema": {"const": "1.0.0"}},
                "Tus-Extension": {"schema": {"type": "string"}},
                "Tus-Max-Size": {"schema": {"const": str(config.max_file_bytes)}},
                "Tus-Checksum-Algorithm": {"schema": {"const": "sha1,md5,crc32"}},
            },
        }
    }
    common = {
        "400": _tus_error("a header is malformed, or file_id breaks the pattern"),
        "401": AUTH_ERROR,
        "412": _tus_error("Tus-Resumable is not 1.0.0"),
        "503": _tus_error("the storage or the pre-create hook cannot be reached", RETRY_AFTER),
    }
    patch_answers = {
        "204": {"description": "stored", "headers": TUS_STATE_HEADERS},
        **common,
        "403": _tus_error("the upload is the final one of a concatenation"),
        "404": _tus_error("no such upload"),
        "409": _tus_error("Upload-Offset is not the upload's offset"),
        "411": _tus_error("no Content-Length"),
        "413": _tus_error("the bytes go past the upload's length"),
        "415": _tus_error("Content-Type is not application/offset+octet-stream"),
        "423": _tus_error("another request is writing to this upload"),
        "460": _tus_error("Upload-Checksum does not match the bytes"),
        "507": _tus_error("free disk would fall below min_free_bytes"),
    }
    upload_metadata = _header(
        "Upload-Metadata",
        {"type": "string"},
        "comma-separated `key base64(value)` pairs; `filename` (or `name`) names the file",
    )
    return {
        "/tus/": {
            "options": {
                "summary": "tus: the server's capabilities (no token needed)",
                "operationId": "tusOptions",
                "security": [],
                "responses": capabilities,
            },
            "post": {
                "summary": "tus creation: a new upload, its bytes possibly in the body; or a "
                "concatenation of partial uploads",
                "operationId": "tusCreate",
                "parameters": [
                    TUS_RESUMABLE,
                    _header("Upload-Length", COUNT, "the file's size"),
                    _header("Upload-Defer-Length", {"const": "1"}, "the size comes later"),
                    upload_metadata,
                    _header(
                        "Upload-Concat",
                        {"type": "string"},
                        "`partial`, or `final;<url> <url>...` naming completed partials",
                    ),
                ],
                "requestBody": {"required": False, "content": OFFSET_OCTETS},
                "responses": {
                    "201": {
                        "description": "created; Location is the upload's URL",
                        "headers": {
                            **TUS_STATE_HEADERS,
                            "Location": {"schema": {"type": "string"}, "required": True},
                        },
                    },
                    **common,
                    "413": _tus_error("Upload-Length exceeds max_file_bytes"),
                    "507": _tus_error("free disk would fall below min_free_bytes"),
                },
            },
        },
        "/tus/{file_id}": {
            "parameters": [FILE_ID_PARAMETER],
            "options": {
                "summary": "tus: the server's capabilities (no token needed)",
                "operationId": "tusUploadOptions",
                "security": [],
                "responses": {**capabilities, "400": _error("file_id breaks the pattern")},
            },
            "head": {
                "summary": "tus: an upload's offset, length and metadata",
                "operationId": "tusHead",
                "parameters": [TUS_RESUMABLE],
                "responses": {
                    "200": {
                        "description": "the upload (a completed one has its size as offset)",
                        "headers": {
                            **TUS_STATE_HEADERS,
                            "Upload-Length": {"schema": COUNT},
                            "Upload-Metadata": {"schema": {"type": "string"}},
                        },
                    },
                    **common,
                    "404": _tus_error("no such upload"),
                },
            },
            "patch": {
                "summary": "tus: bytes at the upload's offset",
                "operationId": "tusPatch",
                "parameters": [
                    TUS_RESUMABLE,
                    _header("Upload-Offset", COUNT, "must be the upload's offset", required=True),
                    _header("Upload-Length", COUNT, "declares a deferred length"),
                    _header(
                        "Upload-Checksum",
                        {"type": "string"},
                        "`sha1|md5|crc32 <base64 digest>` of this request's bytes",
                    ),
                ],
                "requestBody": {"required": True, "content": OFFSET_OCTETS},
                "responses": patch_answers,
            },
            "post": {
                "summary": "tus: PATCH or DELETE sent as POST with X-HTTP-Method-Override",
                "operationId": "tusMethodOverride",
                "parameters": [
                    TUS_RESUMABLE,
                    _header(
                        "X-HTTP-Method-Override",
                        {"enum": ["PATCH", "DELETE"]},
                        "the method meant; without it, 405",
                        required=True,
                    ),
                    _header("Upload-Offset", COUNT, "as for PATCH"),
                    _header("Upload-Length", COUNT, "as for PATCH"),
                    _header("Upload-Checksum", {"type": "string"}, "as for PATCH"),
                ],
                "requestBody": {"required": False, "content": OFFSET_OCTETS},
                "responses": {
                    **patch_answers,
                    "204": {"description": "as PATCH or DELETE", "headers": TUS_STATE_HEADERS},
                    "405": _tus_error(
                        "no X-HTTP-Method-Override", {"Allow": {"schema": {"type": "string"}}}
                    ),
                },
            },
            "delete": {
                "summary": "tus termination: the upload and its bytes removed",
                "operationId": "tusDelete",
                "parameters": [TUS_RESUMABLE],
                "responses": {
                    "204": {"description": "removed", "headers": TUS_ANSWER_HEADERS},
                    **common,
                    "404": _tus_error("no such upload"),
                },
            },
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
        "paths": _paths(config) | _tus_paths(config),
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
