"""The tus routes' paths and headers."""

from __future__ import annotations

from typing import Any

from ...config import Config
from .common import (
    AUTH_ERROR,
    FILE_ID_PARAMETER,
    QUOTA_ERROR,
    RETRY_AFTER,
    SCOPE_ERROR,
    error_answer,
)


def header(
    name: str, schema: dict[str, Any], description: str, *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "schema": schema,
        "description": description,
    }


TUS_RESUMABLE = header(
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


def tus_error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return error_answer(description, {**TUS_ANSWER_HEADERS, **(headers or {})})


def tus_paths(config: Config) -> dict[str, Any]:
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
        "400": tus_error("a header is malformed, or file_id breaks the pattern"),
        "401": AUTH_ERROR,
        "403": SCOPE_ERROR,
        "412": tus_error("Tus-Resumable is not 1.0.0"),
        "429": QUOTA_ERROR,
        "503": tus_error("the storage or the pre-create hook cannot be reached", RETRY_AFTER),
    }
    patch_answers = {
        "204": {"description": "stored", "headers": TUS_STATE_HEADERS},
        **common,
        "403": tus_error("the upload is the final one of a concatenation"),
        "404": tus_error("no such upload"),
        "409": tus_error("Upload-Offset is not the upload's offset"),
        "411": tus_error("no Content-Length"),
        "413": tus_error("the bytes go past the upload's length"),
        "415": tus_error("Content-Type is not application/offset+octet-stream"),
        "423": tus_error("another request is writing to this upload"),
        "460": tus_error("Upload-Checksum does not match the bytes"),
        "507": tus_error("free disk would fall below min_free_bytes"),
    }
    upload_metadata = header(
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
                    header("Upload-Length", COUNT, "the file's size"),
                    header("Upload-Defer-Length", {"const": "1"}, "the size comes later"),
                    upload_metadata,
                    header(
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
                    "413": tus_error("Upload-Length exceeds max_file_bytes"),
                    "507": tus_error("free disk would fall below min_free_bytes"),
                },
            },
        },
        "/tus/{file_id}": {
            "parameters": [FILE_ID_PARAMETER],
            "options": {
                "summary": "tus: the server's capabilities (no token needed)",
                "operationId": "tusUploadOptions",
                "security": [],
                "responses": {**capabilities, "400": error_answer("file_id breaks the pattern")},
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
                    "404": tus_error("no such upload"),
                },
            },
            "patch": {
                "summary": "tus: bytes at the upload's offset",
                "operationId": "tusPatch",
                "parameters": [
                    TUS_RESUMABLE,
                    header("Upload-Offset", COUNT, "must be the upload's offset", required=True),
                    header("Upload-Length", COUNT, "declares a deferred length"),
                    header(
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
                    header(
                        "X-HTTP-Method-Override",
                        {"enum": ["PATCH", "DELETE"]},
                        "the method meant; without it, 405",
                        required=True,
                    ),
                    header("Upload-Offset", COUNT, "as for PATCH"),
                    header("Upload-Length", COUNT, "as for PATCH"),
                    header("Upload-Checksum", {"type": "string"}, "as for PATCH"),
                ],
                "requestBody": {"required": False, "content": OFFSET_OCTETS},
                "responses": {
                    **patch_answers,
                    "204": {"description": "as PATCH or DELETE", "headers": TUS_STATE_HEADERS},
                    "405": tus_error(
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
                    "404": tus_error("no such upload"),
                },
            },
        },
    }
