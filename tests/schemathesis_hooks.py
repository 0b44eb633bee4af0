"""Loaded by schemathesis (SCHEMATHESIS_HOOKS, tests/test_openapi.py): tus bodies are raw
bytes, sent as `application/octet-stream` bodies are."""

import schemathesis

schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
