"""Hostile input: random and mutated multipart bodies, headers and field values.

Whatever arrives, the server answers 4xx (never 5xx), writes nothing outside its data folder,
leaves no temporary file behind, and keeps serving.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkserver import Config

from .conftest import temp_files

BOUNDARY = "fuzzboundary"
FIELDS = [
    "file_id",
    "chunk_index",
    "total_chunks",
    "filename",
    "chunk",
    "chunk_sha256",
    "total_size",
]


def valid_body(values: dict[str, str | bytes]) -> bytes:
    out = b""
    for name, value in values.items():
        filename = '; filename="blob"' if name == "chunk" else ""
        data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode()
        out += data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


field_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["0", "-1", "1", "99999999999999999999", "1e3", " 3 ", "..", "../x", "a/b",
                     "\x00", "%2e%2e", "é" * 200, "0x10", "NaN", "", "ok-id", "f.bin"]),
)  # fmt: skip


def mutate(data: bytes, rng: random.Random, count: int) -> bytes:
    buf = bytearray(data)
    for _ in range(count):
        choice = rng.randrange(4)
        position = rng.randrange(len(buf) + 1)
        if choice == 0 and buf:
            del buf[position : position + rng.randrange(1, 20)]
        elif choice == 1:
            buf[position:position] = rng.choice(
                [b"\r\n", b"--", BOUNDARY.encode(), b"\x00", b'"', b";"]
            )
        elif choice == 2 and buf:
            buf[min(position, len(buf) - 1)] = rng.randrange(256)
        else:
            buf[position:position] = os.urandom(rng.randrange(1, 50))
    return bytes(buf)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=7),
    chunk=st.binary(max_size=2000),
    mutations=st.integers(min_value=0, max_value=6),
    seed=st.integers(min_value=0, max_value=2**32),
    content_type=st.sampled_from(
        [
            f"multipart/form-data; boundary={BOUNDARY}",
            "multipart/form-data",
            "text/plain",
            f"multipart/form-data; boundary={BOUNDARY}x",
            f'multipart/form-data; boundary="{BOUNDARY}"',
            "multipart/mixed; boundary=" + BOUNDARY,
            "",
        ]
    ),
)
async def test_random_and_mutated_requests_never_5xx(
    client, config: Config, tmp_path: Path, values, chunk, mutations, seed, content_type
) -> None:
    body_values: dict[str, str | bytes] = dict(values)
    if "chunk" in body_values:
        body_values["chunk"] = chunk
    body = mutate(valid_body(body_values), random.Random(seed), mutations)
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await client.post("/upload-chunk", data=body, headers=headers)
    text = await resp.text()
    assert resp.status < 500, (resp.status, text, body[:300])
    if resp.status != 200:
        assert "detail" in (await resp.json())
    data_dir = Path(config.data_dir)
    assert temp_files(data_dir) == []
    outside = {p.name for p in tmp_path.iterdir()} - {"data"}
    assert not outside, outside


async def test_random_garbage_and_headers(client, config: Config) -> None:
    rng = random.Random(7)
    for _ in range(200):
        body = os.urandom(rng.randrange(0, 3000))
        content_type = rng.choice([f"multipart/form-data; boundary={BOUNDARY}",
                                   "multipart/form-data; boundary=" + os.urandom(8).hex(),
                                   "application/octet-stream"])  # fmt: skip
        resp = await client.post("/upload-chunk", data=body, headers={"Content-Type": content_type})
        assert 400 <= resp.status < 500
    for path in ["/upload-status/%00", "/upload-status/" + "a" * 500, "/files/..", "/uploads/%2F"]:
        assert (await client.get(path)).status < 500
        assert (await client.delete(path.replace("/upload-status", "/uploads"))).status < 500
    assert temp_files(Path(config.data_dir)) == []
    assert (await client.get("/healthz")).status == 200
