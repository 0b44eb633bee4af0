"""Who sent a request: the peer, or the client behind trusted proxies (X-Forwarded-For)."""

from __future__ import annotations

import functools
import ipaddress

from aiohttp import web

from ..config import Config

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
UNIX_PEER = "unix"


def client_address(request: web.BaseRequest, trusted: tuple[Network | str, ...]) -> str:
    """The client's address: the peer, or the last untrusted hop of X-Forwarded-For.

    A peer on the unix socket is called "unix"; `trusted` may hold "unix" to believe it.
    """
    peer = request.remote or UNIX_PEER
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: tuple[Network | str, ...]) -> bool:
    if address == UNIX_PEER:
        return UNIX_PEER in trusted
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(not isinstance(network, str) and ip in network for network in trusted)


@functools.cache
def trusted_proxies(config: Config) -> tuple[Network | str, ...]:
    return tuple(
        p if p == UNIX_PEER else ipaddress.ip_network(p, strict=False)
        for p in config.trusted_proxies
    )


def remote_of(request: web.BaseRequest, config: Config) -> str:
    """The client's address for hooks and logs."""
    return client_address(request, trusted_proxies(config))


def from_proxy(request: web.BaseRequest, config: Config) -> bool:
    """Whether the request came through a trusted proxy (nginx: it takes a 1xx interim
    answer from upstream for the final one, so none must be sent to it)."""
    trusted = trusted_proxies(config)
    return bool(trusted) and _is_trusted(request.remote or UNIX_PEER, trusted)


def forwarded_base(request: web.BaseRequest, config: Config) -> str:
    """`scheme://host` as the client sees it: X-Forwarded-Proto and X-Forwarded-Host when a
    trusted proxy sent them, the request's own otherwise."""
    scheme, host = request.scheme, request.host
    trusted = trusted_proxies(config)
    if trusted and _is_trusted(request.remote or UNIX_PEER, trusted):
        scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip()
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
    return f"{scheme}://{host}"
