"""Who is asking and how: the part of a request that the service's verbs and the hooks see.

A `Caller` is made once per request by the HTTP layer (`caller_of`) and handed down with the
verb, so that quotas count the right identity and every hook event carries the request:
`{"remote", "method", "path", "identity", "headers"}`, the headers being only those named in
`hook_request_headers` (Authorization and Cookie included only when named there). Work that
no request asked for (the sweep, a completion finished after a crash) has no caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..auth.identities import ANONYMOUS, Identity


@dataclass(frozen=True, slots=True)
class Caller:
    remote: str | None
    method: str | None = None
    path: str | None = None
    identity: Identity = ANONYMOUS
    headers: tuple[tuple[str, str], ...] = ()

    def as_event(self) -> dict[str, Any]:
        """The event's `request` (hooks.py); the anonymous identity is null."""
        return {
            "remote": self.remote,
            "method": self.method,
            "path": self.path,
            "identity": self.identity.name or None,
            "headers": dict(self.headers),
        }


NO_CALLER = Caller(remote=None)
