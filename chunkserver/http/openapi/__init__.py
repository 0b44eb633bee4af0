"""The OpenAPI 3.1 document of every route, field, answer and error: `GET /openapi.json`.

The paths are written from PROTOCOL.md, next to the handlers they describe; the component
schemas are generated from the answer types of answers.py, which the handlers send.
`tests/test_openapi.py` checks that the document lists exactly the server's routes and that
real answers match it, and CI runs schemathesis against a live server from it.
"""

from __future__ import annotations

import functools
import json
from importlib import metadata
from typing import Any

from ...config import Config
from .common import schemas
from .resumable import resumable_paths
from .seed import seed_paths
from .tus import tus_paths


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
        "paths": seed_paths(config) | tus_paths(config) | resumable_paths(config),
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "a static token (auth_identities, auth_tokens) or a JWT",
                },
                "signedUrl": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "signature",
                    "description": (
                        "A signed URL: `expires`, `identity` and `signature` (HMAC-SHA256 "
                        "with signing_key over the method, path, identity and expiry) in "
                        "the query string; `chunkserver sign` makes one."
                    ),
                },
            },
        },
        # A credential is needed only when authentication is configured: all are valid.
        "security": [{}, {"bearer": []}, {"signedUrl": []}],
    }


@functools.cache
def document_bytes(config: Config) -> bytes:
    """The document for this configuration's limits, encoded once."""
    return json.dumps(document(config), indent=1).encode()
