"""The draft revisions /resumable/ serves, told apart by `Upload-Draft-Interop-Version`,
and the Structured Field items (RFC 9651) its header fields carry.

| interop version | drafts | what differs |
|---|---|---|
| 3 | -01 (iOS 17's URLSession) | `Upload-Incomplete` (its opposite) instead of `Upload-Complete` |
| 5 | -03 (tus-js-client's `ietf-draft-03`) | an append needs no media type |
| 6 | -04, -05 (tus-js-client's `ietf-draft-05`) | an append is `application/partial-upload` |
| 8 | -09 to -11 | an upload is complete only when a request says so |
| 9 | -12, the current revision | as 8 (-12 changed the text, not the requests) |

With 3 to 6 an upload whose length is known also completes when its offset reaches it, as
tusd does: tus-js-client reading a stream sends its last bytes with `Upload-Complete: ?0`
(it cannot know they are the last) and takes the offset reaching the length as the end.

A request without the field, or naming a version not served (4, 7, 10, a malformed value),
is answered by the current rules with no 104 and no version echoed: the draft forbids a
104 to a request whose interop version is missing or mismatching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

CURRENT = "9"  # the interop version of the current revision, draft -12
SERVED = frozenset({"3", "5", "6", "8", CURRENT})

# RFC 9651 parameters after an item (`;key` or `;key=value`), allowed and ignored.
PARAMETERS = r'(?:\s*;\s*[a-z*][a-z0-9_.*-]*(?:=(?:"(?:[^"\\]|\\.)*"|[^;"\s]+))?)*'
INTEGER_ITEM = re.compile(r"([0-9]{1,15})" + PARAMETERS)
BOOLEAN_ITEM = re.compile(r"\?([01])" + PARAMETERS)


def structured_integer(value: str | None) -> int | None:
    """A non-negative Integer item (RFC 9651), its parameters ignored; None when absent or
    of another form (the draft says a field of any other value is ignored)."""
    if value is None:
        return None
    match = INTEGER_ITEM.fullmatch(value.strip())
    return int(match.group(1)) if match else None


def structured_boolean(value: str | None) -> bool | None:
    """A Boolean item, its parameters ignored; None when absent or of another form."""
    if value is None:
        return None
    match = BOOLEAN_ITEM.fullmatch(value.strip())
    return match.group(1) == "1" if match else None


@dataclass(frozen=True, slots=True)
class Interop:
    version: str | None  # a served version the client named; None: the current rules, unnamed

    @property
    def uses_incomplete(self) -> bool:
        return self.version == "3"

    @property
    def requires_media_type(self) -> bool:
        return self.version not in ("3", "5")

    @property
    def completes_at_length(self) -> bool:
        return self.version in ("3", "5", "6")

    @property
    def sends_interim(self) -> bool:
        """A 104 goes only to a client that named a version served here, echoed back."""
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
    version = structured_integer(request.headers.get("Upload-Draft-Interop-Version"))
    if version is None or str(version) not in SERVED:
        return Interop(None)
    return Interop(str(version))
