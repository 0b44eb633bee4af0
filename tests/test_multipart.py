"""The framing parser against aiohttp's own multipart reader, on randomly split bodies."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from email.message import Message

import aiohttp
import pytest
from aiohttp import MultipartReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkserver.errors import BadRequest
from chunkserver.http.multipart import (
    MalformedMultipart,
    MultipartParser,
    boundary_from_content_type,
    parse_part_headers,
)

# Bodies rich in near-boundaries, so that split reads cut through them.
tricky_bytes = st.lists(
    st.sampled_from([b"\r", b"\n", b"-", b"--", b"\r\n--", b"\r\n--bou", b"x", b"\x00", b"\xff"]),
    max_size=60,
).map(b"".join)
part_bodies = st.one_of(st.binary(max_size=3000), tricky_bytes)


def encode(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    out = b""
    for name, body in parts:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        out += b'; filename="blob"\r\nContent-Type: application/octet-stream\r\n\r\n'
        out += body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def reader_over(pieces: list[bytes]):
    """Each piece in one reused buffer, followed by bytes that are not the body's, as
    bodyreader.py hands them over: the parser must copy what it keeps over."""
    it: Iterator[bytes] = iter(pieces)
    reused = bytearray(b"\r\n--" * (max(map(len, pieces), default=0) // 4 + 4))

    async def read() -> tuple[bytearray, int]:
        piece = next(it, b"")
        reused[:] = b"\r\n--" * (len(reused) // 4)
        reused[: len(piece)] = piece
        return reused, len(piece)

    return read


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


async def parse_ours(pieces: list[bytes], boundary: str) -> list[tuple[str, bytes]]:
    parser = MultipartParser(reader_over(pieces), boundary.encode())
    parts = []
    while (headers := await parser.next_part()) is not None:
        parts.append((headers.name, b"".join([bytes(v) async for v in parser.body()])))
    return parts


async def parse_aiohttp(data: bytes, boundary: str) -> list[tuple[str, bytes]]:
    stream = aiohttp.StreamReader(_Protocol(), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(data)
    stream.feed_eof()
    reader = MultipartReader({"Content-Type": f"multipart/form-data; boundary={boundary}"}, stream)
    parts = []
    while (part := await reader.next()) is not None:
        parts.append((part.name, bytes(await part.read())))
    return parts


class _Protocol:
    _reading_paused = False

    def pause_reading(self, **kwargs: object) -> None: ...
    def resume_reading(self, **kwargs: object) -> None: ...


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bodies=st.lists(part_bodies, min_size=1, max_size=4),
    boundary=st.sampled_from(["bou", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "x"]),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=12),
)
def test_parser_agrees_with_aiohttp_on_any_split(
    bodies: list[bytes], boundary: str, cuts: list[int]
) -> None:
    # A body holding the delimiter is not encodable; one starting with "--boundary" is not
    # either, since the CRLF that ends the headers would make it a delimiter.
    delimiter = f"\r\n--{boundary}".encode()
    parts = [(f"p{i}", b) for i, b in enumerate(bodies) if delimiter not in b"\r\n" + b]
    data = encode(parts, boundary)

    async def both() -> None:
        ours = await parse_ours(cut(data, cuts), boundary)
        theirs = await parse_aiohttp(data, boundary)
        assert ours == theirs == parts

    asyncio.run(both())


async def test_premature_end_is_malformed() -> None:
    data = encode([("chunk", b"abc" * 100)], "bb")[:-20]
    with pytest.raises(MalformedMultipart):
        await parse_ours([data], "bb")


async def test_parts_not_read_are_skipped() -> None:
    data = encode([("a", b"1" * 5000), ("b", b"2")], "bb")
    parser = MultipartParser(reader_over(cut(data, [100, 2000, 4000])), b"bb")
    assert (await parser.next_part()).name == "a"
    second = await parser.next_part()
    assert second is not None and second.name == "b"
    assert await parser.read_text(limit=10) == "2"
    assert await parser.next_part() is None


def test_boundary_from_content_type() -> None:
    assert boundary_from_content_type('multipart/form-data; boundary="a b"') == b"a b"
    with pytest.raises(Exception, match="multipart"):
        boundary_from_content_type("application/json")
    with pytest.raises(Exception, match="boundary"):
        boundary_from_content_type("multipart/form-data")


header_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r\n"), max_size=20
)


@given(
    name=header_text,
    filename=st.one_of(st.none(), header_text),
    content_type=st.sampled_from(
        [
            None,
            "application/octet-stream",
            "text/plain; charset=utf-8",
            "text/plain; name=x.txt",
            'text/plain; NAME="y.txt"',
        ]
    ),
    spacing=st.sampled_from(["; ", ";", " ; "]),
)
def test_header_fast_path_agrees_with_the_email_parser(
    name: str, filename: str | None, content_type: str | None, spacing: str
) -> None:
    disposition = f'form-data{spacing}name="{name}"'
    if filename is not None:
        disposition += f'{spacing}filename="{filename}"'
    headers = [("Content-Disposition", disposition)]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    block = "\r\n".join(f"{k}: {v}" for k, v in headers).encode()
    expected = email_reference(headers)
    if expected is None:
        with pytest.raises(MalformedMultipart):
            parse_part_headers(block)
        return
    parsed = parse_part_headers(block)
    assert (parsed.name, parsed.filename, parsed.content_type) == (*expected, content_type)


def email_reference(headers: list[tuple[str, str]]) -> tuple[str, str | None] | None:
    """A part's name and filename as the standard library's email package reads the
    headers (independent of the parser under test); None when it finds no name."""
    message = Message()
    for key, value in headers:
        message[key] = value
    name = message.get_param("name", header="content-disposition")
    if not isinstance(name, str):
        return None
    return name, message.get_filename()


@given(
    boundary=st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=80),
    quoted=st.booleans(),
    spacing=st.sampled_from(["; ", ";", ";  "]),
)
def test_boundary_fast_path_agrees_with_the_email_parser(
    boundary: str, quoted: bool, spacing: str
) -> None:
    value = f'"{boundary}"' if quoted else boundary
    content_type = f"multipart/form-data{spacing}boundary={value}"
    message = Message()
    message["content-type"] = content_type
    expected = message.get_param("boundary")
    if not isinstance(expected, str) or not 1 <= len(expected) <= 200:
        with pytest.raises(BadRequest):
            boundary_from_content_type(content_type)
        return
    assert boundary_from_content_type(content_type) == expected.encode("ascii")
