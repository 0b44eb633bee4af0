"""What the document's paths share: the value schemas, the answers and errors, the
component schemas."""

from __future__ import annotations

from typing import Any

from ..answers import ANSWERS, CRC64NVME_SCHEMA, FILE_ID_SCHEMA, schema_of

FILE_ID = dict(FILE_ID_SCHEMA)
CRC64NVME = dict(CRC64NVME_SCHEMA)


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
AUTH_ERROR = error_answer("authentication is configured and no valid credential was sent")
SCOPE_ERROR = error_answer("the token's chunkserver claim allows not this action or file_id")
QUOTA_ERROR = error_answer(
    "the identity is over a quota (uploads or bytes in progress, requests per second)",
    RETRY_AFTER,
)


def schemas() -> dict[str, Any]:
    """The component schemas: one per answer type of answers.py, generated from it."""
    return {cls.__name__: schema_of(cls) for cls in ANSWERS}
