"""The caller of a request (service/callers.py), made once per request by the HTTP layer."""

from __future__ import annotations

from aiohttp import web

from ..auth.identities import ANONYMOUS, IDENTITY
from ..config import Config
from ..service.callers import Caller
from .addresses import remote_of


def caller_of(request: web.Request, config: Config) -> Caller:
    """The caller of `request`: its client's address (X-Forwarded-For's from a trusted
    proxy), method, path, identity and the headers the configuration lets hooks see."""
    headers = tuple(
        (name, request.headers[name])
        for name in config.hook_request_headers
        if name in request.headers
    )
    return Caller(
        remote=remote_of(request, config),
        method=request.method,
        path=request.path,
        identity=request.get(IDENTITY, ANONYMOUS),
        headers=headers,
    )
