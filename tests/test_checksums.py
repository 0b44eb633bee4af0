"""CRC-64/NVME: S3's form, combining chunk CRCs, and the browser's JavaScript implementation,
each checked against an independent bit-by-bit reference (tests/reference.py) and the
standard check value."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkserver import checksums

from . import reference
from .conftest import ClientFactory, chunk_form, crc64

STATIC = Path(__file__).resolve().parent.parent / "chunkserver" / "http" / "static"
CHECK_VALUE = reference.CHECK_VALUE  # CRC-64/NVME of b"123456789"


def test_check_value_and_s3_form() -> None:
    assert reference.crc64nvme(b"123456789") == CHECK_VALUE
    assert checksums.crc64nvme(b"123456789") == CHECK_VALUE
    # S3's form: base64 of the 8 big-endian bytes, as `aws s3api` shows ChecksumCRC64NVME.
    assert checksums.to_s3(CHECK_VALUE) == "rosUhgp5mIg="
    assert checksums.from_s3("rosUhgp5mIg=") == CHECK_VALUE
    for bad in ("", "rosUhgp5mI", "rosUhgp5mIgA", "!!!!!!!!!!!=", "AAAAAAAAAAAAAAA="):
        with pytest.raises(ValueError):
            checksums.from_s3(bad)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_combined_chunk_crcs_equal_the_whole_files(data: bytes, cuts: list[int]) -> None:
    edges = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(edges)]
    combined = checksums.combine((checksums.crc64nvme(p), len(p)) for p in pieces)
    assert combined == reference.crc64nvme(data)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=3000))
def test_the_fast_crc_the_tests_use_is_the_reference(data: bytes) -> None:
    """conftest.crc64 (awscrt, for speed on large files) against the bit-by-bit reference:
    the tests' expected values do not depend on the server's code being right."""
    import base64

    assert crc64(data) == base64.b64encode(reference.crc64nvme(data).to_bytes(8, "big")).decode()
    assert checksums.crc64nvme(data) == reference.crc64nvme(data)


def run_node(script: str) -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node binary (apt-get install nodejs)")
    result = subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=STATIC,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_javascript_crc_matches_the_check_value_and_python() -> None:
    pieces = [os.urandom(n) for n in (0, 1, 7, 1000, 9_999)]
    script = f"""
    import {{ crc64nvme, crc64Combine, toS3 }} from './crc64nvme.js';
    const pieces = {json.dumps([list(p) for p in pieces])}.map((p) => new Uint8Array(p));
    let whole = 0n;
    for (const p of pieces) whole = crc64Combine(whole, crc64nvme(p), p.length);
    let running = 0n;
    for (const p of pieces) running = crc64nvme(p, running);
    console.log(JSON.stringify({{
      check: crc64nvme(new TextEncoder().encode('123456789')).toString(16),
      each: pieces.map((p) => toS3(crc64nvme(p))),
      combined: toS3(whole),
      running: toS3(running),
    }}));
    """
    out = json.loads(run_node(script))
    assert int(out["check"], 16) == CHECK_VALUE
    assert out["each"] == [crc64(p) for p in pieces]
    assert out["combined"] == out["running"] == crc64(b"".join(pieces))


async def test_javascript_crc_matches_the_servers(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    client = await make_client()
    data = os.urandom(300_000)
    chunks = [data[i : i + 100_000] for i in range(0, len(data), 100_000)]
    for i, chunk in enumerate(chunks):
        resp = await client.post("/upload-chunk", data=chunk_form("js", i, 3, chunk))
    server = (await resp.json())["crc64nvme"]
    original = tmp_path / "original.bin"
    original.write_bytes(data)
    script = f"""
    import {{ crc64nvme, toS3 }} from './crc64nvme.js';
    import {{ readFileSync }} from 'node:fs';
    console.log(toS3(crc64nvme(new Uint8Array(readFileSync({json.dumps(str(original))})))));
    """
    assert run_node(script).strip() == server == crc64(data)
