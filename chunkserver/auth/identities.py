"""Who a request speaks for: static bearer tokens with names, JWTs, or a signed URL.

`Authenticator.identify` answers the request's `Identity` or raises NotAuthenticated, the
same 401 for every kind of missing or invalid credential (no oracle). Static tokens are
compared in constant time against every one. A JWT is verified locally with PyJWT: the
algorithms are the configured ones, never the token's (`alg: none`, and a token signed
with HS256 where public keys are configured, are refused); `exp` and `sub` are required,
`aud` and `iss` checked when configured, with a small leeway. Its keys are a shared secret
(`jwt_secret`) or a JWKS (`jwt_jwks`, a file or a URL): the set is read again when a token
names a key id it does not hold (a key rotated while the server runs), at most once per
JWKS_REFRESH_SECONDS. A token may carry a `chunkserver` claim that scopes it (`Scope`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import hdrs, web

from ..config import Config
from ..errors import NotAuthenticated
from . import signing

# A credential longer than this is refused unread (a JWT is a few hundred bytes).
MAX_CREDENTIAL_BYTES = 16 * 1024
JWKS_REFRESH_SECONDS = 10.0
# Verified JWTs kept, so that a client sending the same token with every chunk pays for its
# signature once (measured: 0.12 ms of CPU a request otherwise): each until its `exp`, and
# forgotten when the key set is read again (a key rotated out takes its tokens with it).
VERIFIED_TOKENS_KEPT = 4096
ACTIONS = frozenset({"upload", "read", "delete"})


@dataclass(frozen=True, slots=True)
class Scope:
    """What a token's `chunkserver` claim allows: one file_id or a prefix of them, and the
    actions (upload, read, delete); None where the claim does not limit."""

    file_id: str | None = None
    file_id_prefix: str | None = None
    actions: frozenset[str] | None = None
    max_bytes: int | None = None

    def allows_file(self, file_id: str) -> bool:
        if self.file_id is not None and file_id != self.file_id:
            return False
        return self.file_id_prefix is None or file_id.startswith(self.file_id_prefix)

    def allows(self, action: str) -> bool:
        return self.actions is None or action in self.actions


@dataclass(frozen=True, slots=True)
class Identity:
    name: str  # "" for the anonymous identity (authentication off)
    scope: Scope | None = None


ANONYMOUS = Identity("")
# Who a request speaks for, set by the auth middleware (app.py); ANONYMOUS when it is off.
IDENTITY = web.RequestKey("identity", Identity)


def scope_of(claim: Any) -> Scope | None:
    """The `chunkserver` claim as a Scope; NotAuthenticated when it is malformed (a token
    that cannot say what it allows is no credential)."""
    if claim is None:
        return None
    if not isinstance(claim, dict):
        raise NotAuthenticated()
    file_id, prefix = claim.get("file_id"), claim.get("file_id_prefix")
    actions, max_bytes = claim.get("actions"), claim.get("max_bytes")
    if not all(v is None or isinstance(v, str) for v in (file_id, prefix)):
        raise NotAuthenticated()
    if actions is not None and (not isinstance(actions, list) or not set(actions) <= ACTIONS):
        raise NotAuthenticated()
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
        raise NotAuthenticated()
    return Scope(file_id, prefix, None if actions is None else frozenset(actions), max_bytes)


class KeySet:
    """A JWKS read from a file or fetched from a URL, by key id; read again on an unknown
    key id, at most once per JWKS_REFRESH_SECONDS."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.read_at = 0.0
        self.generation = 0  # read anew: tokens verified with the keys before are checked again
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        if kid not in self.keys and time.monotonic() - self.read_at >= JWKS_REFRESH_SECONDS:
            async with self._lock:
                if kid not in self.keys:
                    await self._read()
        found = self.keys.get(kid)
        if found is None and kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))  # a set of one key: a token may omit kid
        return found

    async def _read(self) -> None:
        self.read_at = time.monotonic()
        try:
            if self.source.startswith(("http://", "https://")):
                timeout = aiohttp.ClientTimeout(total=10)
                async with (
                    aiohttp.ClientSession(timeout=timeout) as session,
                    session.get(self.source) as answer,
                ):
                    document = await answer.json(content_type=None)
            else:
                document = json.loads(await asyncio.to_thread(Path(self.source).read_text))
            found = jwt.PyJWKSet.from_dict(document)
        except (OSError, ValueError, aiohttp.ClientError, jwt.PyJWKSetError):
            return  # the keys known so far stay; tokens of unknown keys are refused
        self.keys = {key.key_id: key for key in found.keys}
        self.generation += 1


class Authenticator:
    """The identities of a configuration: none (authentication off), or any of static
    tokens, JWTs and signed URLs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # (token, name); each plain auth_tokens token is an identity of its own, named by
        # its digest, so that logs and hooks never show a token.
        self.tokens: list[tuple[bytes, str]] = [
            (token.encode(), name) for name, token in config.auth_identities
        ] + [(token.encode(), token_name(token)) for token in config.auth_tokens]
        self.keyset = KeySet(config.jwt_jwks) if config.jwt_jwks else None
        self.verified: dict[str, tuple[Identity, float, int]] = {}  # token: identity, exp, keys

    @property
    def enabled(self) -> bool:
        config = self.config
        return bool(self.tokens or config.jwt_secret or config.jwt_jwks or config.signing_key)

    async def identify(self, request: web.Request) -> Identity:
        if "signature" in request.query and self.config.signing_key:
            name = signing.verify(
                self.config.signing_key, request.method, request.path, request.query
            )
            if name is None or not name:
                raise NotAuthenticated()
            return Identity(name)
        scheme, _, credential = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential or len(credential) > MAX_CREDENTIAL_BYTES:
            raise NotAuthenticated()
        given = credential.encode()
        # compare_digest against every token, so that timing says nothing of which matched
        named = [name for token, name in self.tokens if hmac.compare_digest(given, token)]
        if named:
            return Identity(named[0])
        if credential.count(".") == 2 and (self.config.jwt_secret or self.keyset):
            return await self._from_jwt(credential)
        raise NotAuthenticated()

    async def _from_jwt(self, token: str) -> Identity:
        generation = self.keyset.generation if self.keyset is not None else 0
        kept = self.verified.get(token)
        if kept is not None and kept[1] > time.time() and kept[2] == generation:
            return kept[0]
        identity, expires = await self._verify(token)
        if len(self.verified) >= VERIFIED_TOKENS_KEPT:
            self.verified.clear()
        generation = self.keyset.generation if self.keyset is not None else 0
        self.verified[token] = (identity, expires, generation)
        return identity

    async def _verify(self, token: str) -> tuple[Identity, float]:
        """The token's identity and expiry, its signature and claims checked."""
        config = self.config
        try:
            header = jwt.get_unverified_header(token)
            key: Any = config.jwt_secret
            if self.keyset is not None:
                found = await self.keyset.key(header.get("kid"))
                if found is None:
                    raise NotAuthenticated()
                key = found
            claims = jwt.decode(
                token,
                key,
                algorithms=list(config.accepted_jwt_algorithms),
                audience=config.jwt_audience or None,
                issuer=config.jwt_issuer or None,
                leeway=config.jwt_leeway_seconds,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": bool(config.jwt_audience),
                },
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            raise NotAuthenticated() from None
        subject, expires = claims.get("sub"), claims.get("exp")
        if not isinstance(subject, str) or not subject or not isinstance(expires, int | float):
            raise NotAuthenticated()
        return Identity(subject, scope_of(claims.get("chunkserver"))), float(expires)


def token_name(token: str) -> str:
    """The identity of a plain `auth_tokens` token: a name derived from it, not the token."""
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]
