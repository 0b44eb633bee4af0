"""The typed keys under which the application keeps its parts (no globals)."""

from __future__ import annotations

from aiohttp import web

from ..auth.identities import IDENTITY
from ..config import Config
from ..service.uploads import UploadService
from .bodyreader import ReceiveBuffers
from .inflight import InFlightAppends

CONFIG = web.AppKey("config", Config)
UPLOADS = web.AppKey("uploads", UploadService)
RECEIVE_BUFFERS: web.AppKey[ReceiveBuffers | None] = web.AppKey("receive_buffers")
IN_FLIGHT = web.AppKey("in_flight_appends", InFlightAppends)

__all__ = ["CONFIG", "IDENTITY", "IN_FLIGHT", "RECEIVE_BUFFERS", "UPLOADS"]
