"""The IETF draft's routes (Resumable Uploads for HTTP) under /resumable/."""

from __future__ import annotations

from typing import Any

from ...config import Config
from .common import FILE_ID_PARAMETER, RETRY_AFTER, json_body, ref
from .tus import COUNT, header

FLAG = {"enum": ["?0", "?1"]}
PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "about:blank, or one of the draft's types"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "expected-offset": {"type": "integer", "description": "mismatching-upload-offset"},
        "provided-offset": {"type": "integer", "description": "mismatching-upload-offset"},
    },
}
INTEROP = header(
    "Upload-Draft-Interop-Version",
    {"type": "string", "pattern": "^[0-9]{1,15}$"},
    "the draft revision's interop version: 3 or more (below 3 answers 400; above 8, the "
    "newest rules); without it the newest rules apply and no 104 is sent",
)
UPLOAD_COMPLETE = header(
    "Upload-Complete",
    FLAG,
    "?1 when this request's content ends the upload (required; interop version 3 sends "
    "Upload-Incomplete, its opposite)",
)
UPLOAD_LENGTH = header("Upload-Length", COUNT, "the whole upload's length, when known")
DIGESTS = [
    header("Content-Digest", {"type": "string"}, "RFC 9530; sha-256 is checked"),
    header("Repr-Digest", {"type": "string"}, "RFC 9530, of the whole upload; sha-256 checked"),
]
STATE = {
    "Upload-Complete": {"schema": FLAG},
    "Upload-Offset": {"schema": COUNT, "description": "the bytes stored"},
    "Upload-Length": {"schema": COUNT, "description": "when known"},
    "Upload-Limit": {"schema": {"type": "string"}, "description": "max-size, max-age"},
}
BYTES = {"schema": {"type": "string", "format": "binary"}}


def problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": PROBLEM}},
        "headers": {"Upload-Complete": {"schema": FLAG}, **(headers or {})},
    }


def errors(*statuses: str) -> dict[str, Any]:
    known = {
        "400": problem(
            "a field is missing or malformed; an inconsistent length "
            "(inconsistent-upload-length); bytes for a completed upload (completed-upload); "
            "a digest that does not match"
        ),
        "401": problem("authentication is configured and no valid credential was sent"),
        "403": problem("the token's chunkserver claim allows not this action or file_id"),
        "429": problem(
            "the identity is over a quota (uploads or bytes in progress, requests per second)",
            {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
        ),
        "404": problem("no such upload"),
        "409": problem(
            "Upload-Offset is not the upload's (mismatching-upload-offset)",
            {"Upload-Offset": {"schema": COUNT, "description": "the right offset"}},
        ),
        "413": problem(
            "the bytes go past the upload's length or max_file_bytes",
            {"Upload-Limit": {"schema": {"type": "string"}, "description": "max-size"}},
        ),
        "415": problem("an append's Content-Type is not application/partial-upload"),
        "423": problem("another request is writing to this upload"),
        "503": problem("the storage or the pre-create hook cannot be reached", RETRY_AFTER),
        "507": problem("free disk would fall below min_free_bytes"),
    }
    return {status: known[status] for status in statuses}


def completed(description: str) -> dict[str, Any]:
    return {**json_body(ref("StatusCompleted"), description), "headers": STATE}


def resumable_paths(config: Config) -> dict[str, Any]:
    """draft-ietf-httpbis-resumable-upload (revision 15, and interop versions 3 and more)."""
    limits = {
        "204": {
            "description": "the limits of an upload made here",
            "headers": {
                "Upload-Limit": {"schema": {"const": f"max-size={config.max_file_bytes}"}},
                "Accept-Patch": {"schema": {"const": "application/partial-upload"}},
            },
        },
        **errors("400", "401", "403", "429"),
    }
    location = {"Location": {"schema": {"type": "string"}}}
    return {
        "/resumable/": {
            "options": {
                "summary": "The limits of an upload (Upload-Limit)",
                "operationId": "resumableOptions",
                "responses": limits,
            },
            "post": {
                "summary": "Create an upload, with some, all or none of its bytes",
                "operationId": "resumableCreate",
                "description": "A 104 (Upload Resumption Supported) with the Location comes "
                "first when an interop version is sent, on HTTP/1.1.",
                "parameters": [UPLOAD_COMPLETE, UPLOAD_LENGTH, INTEROP, *DIGESTS],
                "requestBody": {"content": {"application/octet-stream": BYTES}},
                "responses": {
                    "104": {
                        "description": "Upload Resumption Supported: the Location, before the "
                        "final answer (an interop version sent, HTTP/1.1, not to a proxy)",
                        "headers": location,
                    },
                    "200": {**completed("complete: the file"), "headers": STATE | location},
                    "201": {"description": "created", "headers": STATE | location},
                    **errors("400", "401", "403", "429", "413", "503", "507"),
                },
            },
        },
        "/resumable/{file_id}": {
            "parameters": [FILE_ID_PARAMETER],
            "head": {
                "summary": "Offset retrieval",
                "operationId": "resumableOffset",
                "parameters": [INTEROP],
                "responses": {
                    "204": {"description": "the upload's state", "headers": STATE},
                    **errors("400", "401", "403", "429", "404", "503"),
                },
            },
            "get": {
                "summary": "Offset retrieval (as HEAD)",
                "operationId": "resumableOffsetGet",
                "parameters": [INTEROP],
                "responses": {
                    "204": {"description": "the upload's state", "headers": STATE},
                    **errors("400", "401", "403", "429", "404", "503"),
                },
            },
            "patch": {
                "summary": "Append at the upload's offset",
                "operationId": "resumableAppend",
                "parameters": [
                    header("Upload-Offset", COUNT, "the upload's offset", required=True),
                    UPLOAD_COMPLETE,
                    UPLOAD_LENGTH,
                    INTEROP,
                    *DIGESTS,
                ],
                "requestBody": {"content": {"application/partial-upload": BYTES}},
                "responses": {
                    "200": completed("complete: the file"),
                    "204": {"description": "stored, not complete", "headers": STATE},
                    **errors(
                        "400", "401", "403", "429", "404", "409", "413", "415", "423", "503", "507"
                    ),
                },
            },
            "delete": {
                "summary": "Cancel the upload (or delete the completed file)",
                "operationId": "resumableCancel",
                "parameters": [INTEROP],
                "responses": {
                    "204": {"description": "removed"},
                    **errors("400", "401", "403", "429", "404", "503"),
                },
            },
        },
    }
