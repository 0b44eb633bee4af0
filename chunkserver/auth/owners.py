"""Whose upload it is: file_ids are per identity.

An upload belongs to the identity that created it, and a file_id names an upload only within
its identity: the server keeps it under an owned id, `<namespace>~<file_id>`, the namespace
a digest of the identity's name (any name, any length; the same on every process and host;
`~` is outside the file_id pattern, so no client's id can name another's upload). Every
path, S3 key and database row is that of the owned id. A request of another identity for the
same file_id therefore reaches another upload, or none, and is answered as for an id that
does not exist, changing nothing; two identities that choose the same file_id make two
uploads. The anonymous identity (authentication off) has no namespace: its uploads keep
their file_id as their owned id, where a data folder or database of an earlier version has
them.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from ..model import SEPARATOR, check_file_id
from .identities import ANONYMOUS, IDENTITY, Identity


def namespace(name: str) -> str:
    return "o" + hashlib.sha256(name.encode()).hexdigest()[:24]


def namespace_of(identity: Identity) -> str:
    """The identity's namespace; "" for the anonymous identity, which has none."""
    return namespace(identity.name) if identity.name else ""


def owned_id(identity: Identity, file_id: str) -> str:
    """The id `identity`'s upload `file_id` is stored under."""
    if not identity.name:
        return file_id
    return f"{namespace(identity.name)}{SEPARATOR}{file_id}"


def public_id(owned: str) -> str:
    """The file_id the client named an upload with (what every answer says)."""
    return owned.rpartition(SEPARATOR)[2]


def identity_of(request: web.Request) -> Identity:
    identity: Identity = request.get(IDENTITY, ANONYMOUS)
    return identity


def upload_id(request: web.Request, file_id: str | None = None) -> str:
    """The owned id of the upload a request names: its path's file_id (or `file_id`),
    checked against the pattern, in the namespace of the request's identity."""
    given = request.match_info["file_id"] if file_id is None else file_id
    return owned_id(identity_of(request), check_file_id(given))
