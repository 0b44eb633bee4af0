"""The application factory: routes, middlewares, and the parts opened and closed with the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from ..auth.identities import ANONYMOUS, Authenticator
from ..config import Config
from ..errors import (
    ChunkServerError,
    Forbidden,
    HeaderFieldsTooLarge,
    StorageFailure,
    StoreUnavailable,
)
from ..logs import ThrottledLog
from ..service.uploads import UploadService
from .addresses import Network, client_address, trusted_proxies
from .answers import Error, answer
from .bodyreader import ReceiveBuffers, receive_buffers_for, takeover_proven
from .handlers import UPLOAD_CHUNK_ROUTE, add_routes
from .inflight import InFlightAppends
from .keys import CONFIG, ERROR_FORM, IDENTITY, IN_FLIGHT, METHOD_OVERRIDE, RECEIVE_BUFFERS, UPLOADS
from .resumable import EXPOSED_HEADERS as RESUMABLE_EXPOSED_HEADERS
from .resumable import PREFIX as RESUMABLE_PREFIX
from .resumable import resumable_app
from .tus import EXPOSED_HEADERS as TUS_EXPOSED_HEADERS
from .tus import PREFIX as TUS_PREFIX
from .tus import tus_app

log = logging.getLogger("chunkserver")

# The longest header line taken (name, ": " and value), as nginx's default and aiohttp's own;
# the parser is given more room so that a longer one is answered here, in JSON.
# Authorization is let through to the credential check (an oversized token is a 401 like
# any invalid one, not an oracle telling it apart).
MAX_HEADER_LINE_BYTES = 8190
PARSER_FIELD_BYTES = 128 * 1024

# Routes that answer without a token even when auth_tokens is set.
PUBLIC_PATHS = ("/healthz", "/openapi.json")
PUBLIC_PREFIXES = ("/static/",)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into the answer of its protocol: the error form of the application
    the route belongs to (ERROR_FORM: the seed routes' JSON, tus's, the draft's problem
    details), whatever raised it (a handler, or a middleware: credentials, quotas)."""
    uploads = request.config_dict[UPLOADS]
    try:
        _check_header_lines(request)
        response = await handler(request)
    except ChunkServerError as e:
        if isinstance(e, StorageFailure):  # the disk failed us, not the client: say how
            log.error("Storage failure on %s %s", request.method, request.path, exc_info=e)
        elif isinstance(e, StoreUnavailable):  # an outage: one line, not one per request
            uploads.core.outages.warning(e.component, f"{e.detail} (answering 503)")
        response = _error(request, e.status, e.detail, e)
        response.headers.update(e.headers)
        if e.close_connection:
            # Send the answer, then hang up at once: aiohttp would otherwise linger, reading
            # what is left of the body for seconds, which is what a stalled client wants.
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            if request.transport is not None:
                request.transport.close()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = _error(request, e.status, e.reason, e)
        for name in (hdrs.ALLOW, hdrs.RETRY_AFTER):
            if name in e.headers:
                response.headers[name] = e.headers[name]
    except ConnectionResetError:
        # The client went away mid-request (its temp file is already removed): nobody is
        # left to answer, so no traceback either; the status is for the metrics only.
        log.info("Client disconnected during %s %s", request.method, request.path)
        response = _error(request, 400, "Client disconnected")
    except Exception:
        log.exception("Unexpected error on %s %s", request.method, request.path)
        response = _error(request, 500, "Internal server error")
    if uploads.core.draining:
        response.force_close()
    return response


def _check_header_lines(request: web.Request) -> None:
    """431 for a header line over MAX_HEADER_LINE_BYTES. aiohttp's parser takes lines up to
    PARSER_FIELD_BYTES (server.py sets it) so that such a request reaches this JSON answer,
    not the parser's plain-text 400."""
    for name, value in request.raw_headers:
        too_long = len(name) + len(value) + 2 > MAX_HEADER_LINE_BYTES
        if too_long and name.lower() != b"authorization":
            raise HeaderFieldsTooLarge(MAX_HEADER_LINE_BYTES)


def auth_middleware(authenticator: Authenticator) -> Middleware:
    """Every request but the public ones speaks for an identity (identities.py), kept as
    request[IDENTITY]; a token's scope limits its actions and file_ids (403 otherwise)."""

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_public(request):
            return await handler(request)
        identity = await authenticator.identify(request)
        scope = identity.scope
        if scope is not None:
            action = action_of(request)
            if action is not None and not scope.allows(action):
                raise Forbidden(f"This token does not allow {action}")
            file_id = request.match_info.get("file_id")
            if file_id is not None and not scope.allows_file(file_id):
                raise Forbidden("This token is not for this file_id")
        request[IDENTITY] = identity
        return await handler(request)

    return identify


def rate_middleware(uploads: UploadService) -> Middleware:
    """Every request but the public ones takes one from its identity's bucket (quotas.py):
    429 with Retry-After when it is empty."""

    @web.middleware
    async def limit_rate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_public(request):
            await uploads.core.quotas.admit_request(request.get(IDENTITY, ANONYMOUS))
        return await handler(request)

    return limit_rate


def is_public(request: web.Request) -> bool:
    """Whether a request answers without a credential (and outside the quotas)."""
    path = request.path
    return (
        request.method == hdrs.METH_OPTIONS
        or path in PUBLIC_PATHS
        or path == "/"
        or path.startswith(PUBLIC_PREFIXES)
    )


def action_of(request: web.Request) -> str | None:
    """What a request does to an upload, as a token's scope names it: upload, read, delete;
    None for OPTIONS. tus's X-HTTP-Method-Override counts as the method."""
    method = request.method
    if route_app(request).get(METHOD_OVERRIDE, False):
        method = request.headers.get("X-HTTP-Method-Override", method).strip().upper()
    if method in (hdrs.METH_GET, hdrs.METH_HEAD):
        return "read"
    if method == hdrs.METH_DELETE:
        return "delete"
    return None if method == hdrs.METH_OPTIONS else "upload"


def route_app(request: web.Request) -> web.Application:
    """The application the request's route belongs to: a sub-application's (/tus, /resumable)
    or the root's (the seed routes, and any path no route matches)."""
    apps = request.match_info.apps
    return apps[-1] if apps else request.app


def _error(
    request: web.Request, status: int, detail: str, error: BaseException | None = None
) -> web.Response:
    return route_app(request)[ERROR_FORM](request, status, detail, error)


def json_error(
    request: web.Request, status: int, detail: str, error: BaseException | None
) -> web.Response:
    """The seed routes' error: `{"detail": ...}`."""
    return answer(Error(detail=detail), status)


def cors_middleware(origins: tuple[str, ...]) -> Middleware:
    allow_any = "*" in origins

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not (allow_any or origin in origins):
            return await handler(request)
        cors_headers = {
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: "*" if allow_any else origin,
            hdrs.ACCESS_CONTROL_EXPOSE_HEADERS: "Content-Disposition, Content-Length, "
            + TUS_EXPOSED_HEADERS
            + ", "
            + RESUMABLE_EXPOSED_HEADERS,
            hdrs.VARY: "Origin",
        }
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in (
            request.headers
        ):
            requested = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
            cors_headers |= {
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, HEAD, POST, PATCH, DELETE, OPTIONS",
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: requested or "Authorization, Content-Type",
                hdrs.ACCESS_CONTROL_MAX_AGE: "600",
            }
            return web.Response(status=204, headers=cors_headers)
        try:
            response = await handler(request)
        except web.HTTPException as e:
            e.headers.update(cors_headers)
            raise
        response.headers.update(cors_headers)
        return response

    return cors


class AccessLogger(AbstractAccessLogger):
    """One line per request; the client is X-Forwarded-For's when a trusted proxy sent it."""

    trusted: tuple[Network | str, ...] = ()

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # The identity in the place of common log format's user ("-": anonymous).
        identity = request.get(IDENTITY, ANONYMOUS).name or "-"
        self.logger.info(
            '%s %s "%s %s HTTP/%d.%d" %d %d %.4fs',
            client_address(request, self.trusted),
            identity,
            request.method,
            request.path_qs,
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time,
        )


def access_logger_for(config: Config) -> type[AccessLogger]:
    return type("ConfiguredAccessLogger", (AccessLogger,), {"trusted": trusted_proxies(config)})


async def _every(
    seconds: float, job: Callable[[], Awaitable[object]], name: str, outages: ThrottledLog
) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except StoreUnavailable as e:
            outages.warning(e.component, f"Periodic job {name} waits: {e.detail}")
        except Exception:
            log.exception("Periodic job %s failed", name)


async def _prove_takeover(buffers: ReceiveBuffers | None) -> None:
    """Bodies are taken off aiohttp only once this process saw it work (bodyreader.py)."""
    if buffers is None:
        return
    buffers.usable = await takeover_proven()
    if not buffers.usable:
        log.warning(
            "Request bodies are read through aiohttp: taking them off the socket did not "
            "work with aiohttp %s",
            aiohttp.__version__,
        )


def _uploads_context(config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def uploads_context(app: web.Application) -> AsyncIterator[None]:
        uploads = app[UPLOADS]
        await uploads.start()
        await _prove_takeover(app[RECEIVE_BUFFERS])
        report = await uploads.sweep()  # finish completions and clear strays a crash left
        if report.completed or report.expired or report.removed_temp_files:
            log.info(
                "Recovery at start: %d completed, %d expired, %d stray temp files removed",
                len(report.completed),
                len(report.expired),
                report.removed_temp_files,
            )
        await uploads.rebuild_manifest()
        tasks = [
            asyncio.create_task(
                _every(config.sweep_interval_seconds, uploads.sweep, "sweep", uploads.core.outages)
            ),
        ]
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        uploads.core.metrics.forget_this_process()
        await uploads.close()

    return uploads_context


def create_app(config: Config) -> web.Application:
    middlewares: list[Middleware] = [error_middleware]
    if config.cors_origins:
        middlewares.insert(0, cors_middleware(config.cors_origins))
    authenticator = Authenticator(config)
    if authenticator.enabled:
        middlewares.append(auth_middleware(authenticator))
    uploads = UploadService.open(config)
    if config.quota_requests_per_second:
        middlewares.append(rate_middleware(uploads))
    app = web.Application(middlewares=middlewares)
    app[CONFIG] = config
    app[UPLOADS] = uploads
    app[RECEIVE_BUFFERS] = receive_buffers_for(config.storage)
    app[IN_FLIGHT] = InFlightAppends()
    app[ERROR_FORM] = json_error
    add_routes(app)
    # Each protocol of its own is a sub-application: its routes, and its form of errors.
    app.add_subapp(TUS_PREFIX.rstrip("/"), tus_app())
    app.add_subapp(RESUMABLE_PREFIX.rstrip("/"), resumable_app())
    app.cleanup_ctx.append(_uploads_context(config))
    app.on_response_prepare.append(_count_status)
    return app


async def _count_status(request: web.Request, response: web.StreamResponse) -> None:
    """Count each answer by the status it is sent with: a download's 206, 304 or 416 is
    known only once its response is prepared."""
    identity = request.get(IDENTITY, ANONYMOUS)
    metrics = request.config_dict[UPLOADS].core.metrics
    metrics.count_request(response.status, identity.name)
    if response.status >= 400 and request.match_info.route.name == UPLOAD_CHUNK_ROUTE:
        metrics.inc("chunks_rejected")
