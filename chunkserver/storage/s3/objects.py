"""The object store's verbs for the S3 backend, on any S3-compatible service.

Two paths. Control requests (create, complete and abort a multipart upload, copy a part,
list, head, delete) go through aiobotocore: botocore's own signing, retries and error
parsing (including CompleteMultipartUpload's 200 answer that carries an error) on aiohttp.
Bytes go through presigned URLs on our own aiohttp session, so that a chunk's body streams
from the client's socket to the store piece by piece with its exact Content-Length, and a
download streams back the same way: botocore wants a whole body or a file in hand.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from aiobotocore.session import get_session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from ...errors import StorageFailure, StoreUnavailable

PRESIGN_SECONDS = 3600
READ_PIECE_BYTES = 256 * 1024
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
# Answered by a store that is overloaded or down for a moment: the client may come back.
RETRYABLE_STATUSES = {500, 502, 503, 504}


class NoSuchUpload(Exception):
    """The multipart upload was completed or aborted (by another host, or a DELETE)."""


@dataclass(frozen=True, slots=True)
class Settings:
    bucket: str
    endpoint_url: str | None
    region: str | None
    access_key_id: str | None
    secret_access_key: str | None


@dataclass(frozen=True, slots=True)
class ListedUpload:
    key: str
    upload_id: str
    initiated: datetime


@dataclass(frozen=True, slots=True)
class ListedObject:
    key: str
    last_modified: datetime


@contextlib.contextmanager
def translated_errors(what: str) -> Iterator[None]:
    """Turn the store's failures into the server's: unreachable or overloaded is 503."""
    try:
        yield
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchUpload":
            raise NoSuchUpload(what) from e
        if status in RETRYABLE_STATUSES or code in ("SlowDown", "ServiceUnavailable"):
            raise StoreUnavailable(f"the object store answered {status} {code} to {what}") from e
        raise StorageFailure(f"the object store refused {what}: {code or status}") from e
    except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as e:
        raise StoreUnavailable(f"the object store cannot be reached ({what}: {e})") from e


def _add_content_md5(request: Any, **_: Any) -> None:
    body = request.body
    if isinstance(body, str):
        body = body.encode()
    if isinstance(body, bytes) and "Content-MD5" not in request.headers:
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        request.headers["Content-MD5"] = base64.b64encode(digest).decode()


class _Answer:
    """A GET's answer: status, headers, and the body piece by piece (model.ObjectAnswer)."""

    def __init__(self, answer: aiohttp.ClientResponse) -> None:
        self._answer = answer
        self.status = answer.status
        self.headers = answer.headers

    async def pieces(self) -> AsyncIterator[bytes]:
        with translated_errors("reading an object"):
            async for piece in self._answer.content.iter_chunked(READ_PIECE_BYTES):
                yield piece


class ObjectStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._exit = contextlib.AsyncExitStack()
        self._client: Any = None
        self._http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        s = self.settings
        config = BotoConfig(
            # Path-style for every store but AWS itself (MinIO, Ceph, Swift, R2 behind one
            # host name); on AWS botocore picks the bucket's virtual host.
            s3={"addressing_style": "path" if s.endpoint_url else "auto"},
            signature_version="s3v4",
            # Swift (and several other stores) refuse aws-chunked bodies with trailing CRCs.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=120,
            max_pool_connections=64,
        )
        self._client = await self._exit.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=s.endpoint_url or None,
                region_name=s.region or None,
                aws_access_key_id=s.access_key_id or None,
                aws_secret_access_key=s.secret_access_key or None,
                config=config,
            )
        )
        # DeleteObjects must carry a checksum; "when_required" sends none that Swift (and
        # other stores that predate S3's CRC headers) accept: give it Content-MD5.
        self._client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self._exit.aclose()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "ObjectStore.open() first"
        return self._http

    async def _presign(self, operation: str, **params: Any) -> str:
        url: str = await self._client.generate_presigned_url(
            operation, Params={"Bucket": self.bucket, **params}, ExpiresIn=PRESIGN_SECONDS
        )
        return url

    # -- bytes --

    async def _put(
        self,
        url: str,
        body: bytes | bytearray | AsyncIterable[bytes | memoryview],
        length: int,
        what: str,
    ) -> str:
        with translated_errors(what):
            async with self.http.put(
                url, data=body, headers={"Content-Length": str(length)}
            ) as answer:
                text = await answer.text()
                if answer.status == 404 and "NoSuchUpload" in text:
                    raise NoSuchUpload(what)
                if answer.status in RETRYABLE_STATUSES:
                    raise StoreUnavailable(f"the object store answered {answer.status} to {what}")
                if answer.status != 200:
                    raise StorageFailure(
                        f"the object store answered {answer.status} to {what}: {text[:200]}"
                    )
                return answer.headers.get("ETag", "")

    async def put_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        body: bytes | bytearray | AsyncIterable[bytes | memoryview],
        length: int,
    ) -> str:
        """Upload one part of a multipart upload; its ETag."""
        url = await self._presign(
            "upload_part", Key=key, UploadId=upload_id, PartNumber=part_number
        )
        return await self._put(url, body, length, f"part {part_number} of {key}")

    async def put_object(
        self, key: str, body: bytes | bytearray | AsyncIterable[bytes | memoryview], length: int
    ) -> str:
        url = await self._presign("put_object", Key=key)
        return await self._put(url, body, length, f"object {key}")

    @contextlib.asynccontextmanager
    async def get(self, key: str, range_header: str | None = None) -> AsyncIterator[_Answer]:
        """The store's answer to a GET of `key` (with Range), its body not yet read."""
        url = await self._presign("get_object", Key=key)
        headers = {"Range": range_header} if range_header else {}
        with translated_errors(f"reading {key}"):
            async with self.http.get(url, headers=headers) as answer:
                if answer.status in RETRYABLE_STATUSES:
                    raise StoreUnavailable(f"the object store answered {answer.status}")
                yield _Answer(answer)

    async def read_pieces(self, key: str) -> AsyncIterator[bytes]:
        """The whole object's bytes, piece by piece."""
        async with self.get(key) as answer:
            if answer.status != 200:
                raise StorageFailure(f"the object store answered {answer.status} reading {key}")
            async for piece in answer.pieces():
                yield piece

    # -- control --

    async def create_multipart(self, key: str) -> str:
        with translated_errors(f"creating a multipart upload of {key}"):
            answer = await self._client.create_multipart_upload(Bucket=self.bucket, Key=key)
        return str(answer["UploadId"])

    async def copy_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        source: str,
        byte_range: tuple[int, int] | None = None,
    ) -> str:
        """Part `part_number` copied by the store from `source` (bytes first..last)."""
        extra = (
            {}
            if byte_range is None
            else {"CopySourceRange": f"bytes={byte_range[0]}-{byte_range[1]}"}
        )
        with translated_errors(f"copying {source} into part {part_number} of {key}"):
            answer = await self._client.upload_part_copy(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=part_number,
                CopySource={"Bucket": self.bucket, "Key": source},
                **extra,
            )
        return str(answer["CopyPartResult"]["ETag"])

    async def complete(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        listed = [{"PartNumber": n, "ETag": etag} for n, etag in parts]
        with translated_errors(f"completing {key}"):
            # botocore reads the 200 answer's body and raises when it holds an error.
            await self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
            )

    async def abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(NoSuchUpload), translated_errors(f"aborting {key}"):
            await self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )

    async def size_of(self, key: str) -> int | None:
        """The object's size, or None when there is no such object."""
        try:
            with translated_errors(f"looking up {key}"):
                answer = await self._client.head_object(Bucket=self.bucket, Key=key)
        except StorageFailure:
            return None
        length = answer.get("ContentLength")
        return None if length is None else int(length)

    async def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + DELETE_BATCH]]
            with translated_errors("deleting objects"):
                await self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )

    async def list_objects(self, prefix: str) -> list[ListedObject]:
        found: list[ListedObject] = []
        with translated_errors(f"listing {prefix}"):
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found.append(ListedObject(item["Key"], item["LastModified"]))
        return found

    async def list_multipart_uploads(self, prefix: str) -> list[ListedUpload]:
        found: list[ListedUpload] = []
        with translated_errors(f"listing the multipart uploads under {prefix}"):
            paginator = self._client.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Uploads", []):
                    found.append(ListedUpload(item["Key"], item["UploadId"], item["Initiated"]))
        return found

    async def bucket_is_reachable(self) -> bool:
        try:
            with translated_errors("checking the bucket"):
                await self._client.head_bucket(Bucket=self.bucket)
        except (StoreUnavailable, StorageFailure):
            return False
        return True
