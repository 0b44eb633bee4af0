"""Integrity fields of RFC 9530 (`Content-Digest`, `Repr-Digest`): the sha-256 they carry,
checked against the bytes as they pass."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from ..errors import BadRequest, DigestMismatch

ALGORITHM = "sha-256"
# One member of the Structured Field Dictionary: `key=:base64:` (other forms are not digests).
MEMBER = re.compile(r"\s*([a-z][a-z0-9_.*-]*)\s*=\s*:([A-Za-z0-9+/=]*):\s*(;[^,]*)?\s*")


def sha256_of_field(name: str, value: str | None) -> bytes | None:
    """The sha-256 digest a digest field carries, or None when it is absent or carries only
    algorithms this server does not compute (RFC 9530 lets a recipient ignore those)."""
    if value is None or not value.strip():
        return None
    found = None
    for member in value.split(","):
        match = MEMBER.fullmatch(member)
        if match is None:
            raise BadRequest(f"{name} is not a dictionary of `algorithm=:base64:` members")
        if match.group(1) == ALGORITHM:
            try:
                found = base64.b64decode(match.group(2), validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"{name}: the {ALGORITHM} value is not base64") from None
            if len(found) != hashlib.sha256().digest_size:
                raise BadRequest(f"{name}: a {ALGORITHM} digest has 32 bytes, not {len(found)}")
    return found


def field_value(digest: bytes) -> str:
    return f"{ALGORITHM}=:{base64.b64encode(digest).decode()}:"


class DigestCheck:
    """The sha-256 of a request's bytes against the digests it was sent with: its content's
    (`Content-Digest`), and the representation's (`Repr-Digest`) when the request carries
    the whole representation."""

    def __init__(self, expected: dict[str, bytes]) -> None:
        self.expected = expected
        self.hash = hashlib.sha256()

    def update(self, piece: memoryview) -> None:
        self.hash.update(piece)

    def matches(self) -> bool:
        return not self._failing()

    def mismatch(self) -> DigestMismatch:
        names = " and ".join(self._failing())
        return DigestMismatch(f"{names} {ALGORITHM} does not match the bytes received")

    def _failing(self) -> list[str]:
        digest = self.hash.digest()
        return [name for name, value in self.expected.items() if value != digest]
