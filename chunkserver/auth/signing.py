"""Signed URLs: one method on one path, for one identity, until a time, without a token.

A signed URL carries `expires` (Unix seconds), `identity` and `signature` in its query
string; the signature is HMAC-SHA256, keyed with the configuration's `signing_key`, over the
method, the path, the identity and the expiry, one per line, in lowercase hex. The server
checks it (`verify`) and takes the request as that identity; a URL used with another method
or path, or after its expiry, or with any part changed, is no credential.

    from chunkserver.auth.signing import sign_url
    url = sign_url("the signing_key", method="GET", path="/files/report-7",
                   identity="alice", expires_in=3600, base="https://uploads.example.com")

`chunkserver sign` prints the same from the command line.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import urlencode

QUERY_KEYS = ("expires", "identity", "signature")


def signature(key: str, method: str, path: str, identity: str, expires: int) -> str:
    message = f"{method.upper()}\n{path}\n{identity}\n{expires}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def sign_url(
    key: str,
    *,
    method: str,
    path: str,
    identity: str,
    expires_in: int | None = None,
    expires_at: int | None = None,
    base: str = "",
) -> str:
    """The signed URL (`base` + path + query) of `method` on `path` for `identity`, valid
    for `expires_in` seconds from now, or until the Unix time `expires_at`."""
    if not key:
        raise ValueError("signing needs a signing_key")
    if not path.startswith("/"):
        raise ValueError(f"the path must start with '/', not {path!r}")
    if (expires_in is None) == (expires_at is None):
        raise ValueError("give expires_in or expires_at")
    expires = expires_at if expires_at is not None else int(time.time()) + int(expires_in or 0)
    query = urlencode(
        {
            "expires": expires,
            "identity": identity,
            "signature": signature(key, method, path, identity, expires),
        }
    )
    return f"{base.rstrip('/')}{path}?{query}"


def verify(key: str, method: str, path: str, query: Mapping[str, str]) -> str | None:
    """The identity a signed request speaks for, or None when its signature, method, path
    or expiry do not hold (compared in constant time)."""
    try:
        expires = int(query["expires"])
        identity = query["identity"]
        given = query["signature"]
    except (KeyError, ValueError):
        return None
    expected = signature(key, method, path, identity, expires)
    fresh = expires >= time.time()
    return identity if hmac.compare_digest(given.encode(), expected.encode()) and fresh else None
