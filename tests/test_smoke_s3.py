import os, pytest
from .conftest import chunk_form

async def test_smoke(make_client, s3_settings):
    client = await make_client(**s3_settings)
    data = os.urandom(3 * 1024 * 1024 + 17)
    chunks = [data[i:i+1024*1024] for i in range(0, len(data), 1024*1024)]
    for i, c in enumerate(chunks):
        r = await client.post("/upload-chunk", data=chunk_form("abc", i, len(chunks), c))
        print(r.status, await r.text())
    r = await client.get("/files/abc")
    assert r.status == 200
    assert await r.read() == data
    r = await client.get("/files/abc", headers={"Range": "bytes=10-19"})
    assert r.status == 206 and await r.read() == data[10:20]
    big = os.urandom(11 * 1024 * 1024 + 5)
    size = 5 * 1024 * 1024
    chunks = [big[i:i+size] for i in range(0, len(big), size)]
    for i, c in enumerate(chunks):
        r = await client.post("/upload-chunk", data=chunk_form("big", i, len(chunks), c))
        print(r.status, await r.text())
    r = await client.get("/files/big")
    assert await r.read() == big
    r = await client.get("/healthz"); print(await r.text())
    r = await client.delete("/uploads/big"); assert r.status == 204
