"""The draft revisions /resumable/ serves, told apart by `Upload-Draft-Interop-Version`.

| interop version | drafts | what differs |
|---|---|---|
| 3 | -01 (iOS 17's URLSession) | `Upload-Incomplete` (its opposite) instead of `Upload-Complete` |
| 4, 5 | -02, -03 (tus-js-client's `ietf-draft-03` sends 5) | an append needs no media type |
| 6 | -04, -05 (tus-js-client's `ietf-draft-05`) | an append is `application/partial-upload` |
| 7 and later, or none | -09 to revision 15 | an upload is complete only when a request says so |

With 3 to 6 an upload whose length is known also completes when its offset reaches it, as
tusd does: tus-js-client reading a stream sends its last bytes with `Upload-Complete: ?0`
(it cannot know they are the last) and takes the offset reaching the length as the end.

Without the field the newest rules apply and no 104 is sent: the draft forbids a 104 to a
request without an interop version. A version above 8 (a revision newer than the text this
server follows, such as revision 15's) gets the newest rules and its 104, its version echoed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from .errors import BadRequest

CURRENT = "8"  # the newest interop version of the draft's text this server follows
OLDEST = 3
INTEGER = re.compile(r"[0-9]{1,15}")


def structured_integer(value: str | None) -> int | None:
    """A non-negative Integer Structured Field (RFC 9651), or None: the draft says a field
    of any other value is ignored."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if INTEGER.fullmatch(value) else None


def structured_boolean(value: str | None) -> bool | None:
    if value is None:
        return None
    return {"?1": True, "?0": False}.get(value.strip())


@dataclass(frozen=True, slots=True)
class Interop:
    version: str | None  # as the client sent it; None when it sent none

    @property
    def uses_incomplete(self) -> bool:
        return self.version == "3"

    @property
    def requires_media_type(self) -> bool:
        return self.version not in ("3", "4", "5")

    @property
    def completes_at_length(self) -> bool:
        return self.version in ("3", "4", "5", "6")

    @property
    def sends_interim(self) -> bool:
        """A 104 goes only to a client that named its version (the draft: not to one whose
        version is missing), echoed back; a version above 8 is taken for a newer revision's,
        served by the newest rules."""
        return self.version is not None

    @property
    def complete_name(self) -> str:
        return "Upload-Incomplete" if self.uses_incomplete else "Upload-Complete"

    def complete_flag(self, request: web.Request) -> bool | None:
        """Whether the request says it completes the upload; None when it does not say."""
        flag = structured_boolean(request.headers.get(self.complete_name))
        if flag is None or not self.uses_incomplete:
            return flag
        return not flag

    def completion(self, complete: bool) -> bool | None:
        """The service's `complete` for a request's flag: True (now), False (not with this
        request), or None (when the offset reaches the length: the older revisions)."""
        if complete or not self.completes_at_length:
            return complete
        return None

    def complete_header(self, complete: bool) -> dict[str, str]:
        flag = complete != self.uses_incomplete
        return {self.complete_name: "?1" if flag else "?0"}

    def echo(self) -> dict[str, str]:
        return {} if self.version is None else {"Upload-Draft-Interop-Version": self.version}


def interop_of(request: web.Request) -> Interop:
    given = request.headers.get("Upload-Draft-Interop-Version")
    if given is None:
        return Interop(None)
    version = structured_integer(given)
    if version is None or version < OLDEST:
        raise BadRequest(
            f"Upload-Draft-Interop-Version {given.strip()[:20]!r} is not served: "
            f"{OLDEST} or more (the newest rules from 7 on)"
        )
    return Interop(str(version))
