"""Loaded by schemathesis (SCHEMATHESIS_HOOKS, tests/test_openapi.py): tus and IETF draft
bodies are raw bytes, sent as `application/octet-stream` bodies are."""

import schemathesis

schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
schemathesis.serializer.alias("application/partial-upload", "application/octet-stream")


@schemathesis.hook
def before_call(context, case, **kwargs):
    """requests (schemathesis's HTTP client) reads a 1xx interim answer other than 100 as the
    final one, so POST /resumable/ is sent without the interop version that asks for the
    104; tests/test_resumable.py reads the 104 on a raw socket."""
    if case.method.upper() == "POST" and case.path == "/resumable/" and case.headers:
        case.headers.pop("Upload-Draft-Interop-Version", None)
