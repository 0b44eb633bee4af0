"""The typed keys under which the application keeps its parts (no globals)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from ..auth.identities import IDENTITY
from ..config import Config
from ..service.uploads import UploadService
from .bodyreader import ReceiveBuffers
from .inflight import InFlightAppends

ErrorForm = Callable[[web.Request, int, str, BaseException | None], web.Response]

CONFIG = web.AppKey("config", Config)
# How the application of a route answers an error: the seed routes' JSON `{"detail"}`, tus's
# (the same, with Tus-Resumable), the draft's problem details. The error middleware asks the
# route's application (the root, or the /tus and /resumable sub-applications).
ERROR_FORM: web.AppKey[ErrorForm] = web.AppKey("error_form")
# Whether an application's routes take X-HTTP-Method-Override (tus) as their method.
METHOD_OVERRIDE = web.AppKey("method_override", bool)
UPLOADS = web.AppKey("uploads", UploadService)
RECEIVE_BUFFERS: web.AppKey[ReceiveBuffers | None] = web.AppKey("receive_buffers")
IN_FLIGHT = web.AppKey("in_flight_appends", InFlightAppends)

__all__ = [
    "CONFIG",
    "ERROR_FORM",
    "IDENTITY",
    "IN_FLIGHT",
    "METHOD_OVERRIDE",
    "RECEIVE_BUFFERS",
    "UPLOADS",
    "ErrorForm",
]
