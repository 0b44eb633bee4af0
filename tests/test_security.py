"""Identities: named static tokens, JWTs (a secret, or public keys from a JWKS file or URL,
rotated while the server runs), signed URLs, and tokens scoped by their claims; every
invalid credential answered with the same 401."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from chunkserver.auth import identities
from chunkserver.auth.signing import sign_url

from .conftest import ClientFactory, chunk_form

SECRET = "a-shared-secret-of-32-bytes-or-more!"
UNAUTHORIZED = {"detail": "Not authenticated"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hs256(claims: dict[str, Any], key: str = SECRET, **header: Any) -> str:
    return jwt.encode({"exp": int(time.time()) + 300, **claims}, key, "HS256", headers=header)


async def refused_alike(resp: Any) -> None:
    """The one answer of every missing or invalid credential: no oracle."""
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert await resp.json() == UNAUTHORIZED


async def test_named_tokens_and_plain_tokens(make_client: ClientFactory) -> None:
    client = await make_client(
        auth_identities=(("alice", "tok-a"), ("bob", "tok-b")), auth_tokens=("legacy",)
    )
    for token in ("tok-a", "tok-b", "legacy"):
        resp = await client.get("/upload-status/x", headers=bearer(token))
        assert resp.status == 404, token
    for headers in ({}, bearer("tok-c"), bearer("tok-a-longer"), {"Authorization": "Basic tok-a"}):
        await refused_alike(await client.get("/upload-status/x", headers=headers))
    assert (await client.get("/healthz")).status == 200  # public


async def test_jwt_with_a_shared_secret_and_the_hostile_ones(make_client: ClientFactory) -> None:
    client = await make_client(jwt_secret=SECRET, jwt_audience="uploads", jwt_issuer="app")
    good = {"sub": "alice", "aud": "uploads", "iss": "app"}
    assert (await client.get("/upload-status/x", headers=bearer(hs256(good)))).status == 404
    now = int(time.time())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = hs256(good)
    head, body, sig = token.split(".")
    hostile = {
        "expired": hs256({**good, "exp": now - 3600}),
        "not yet valid": hs256({**good, "nbf": now + 3600}),
        "wrong audience": hs256({**good, "aud": "other"}),
        "wrong issuer": hs256({**good, "iss": "other"}),
        "no exp": jwt.encode(good, SECRET, "HS256"),
        "no sub": hs256({"aud": "uploads", "iss": "app"}),
        "alg none": jwt.encode({**good, "exp": now + 300}, None, "none"),
        "another secret": hs256(good, key="another-secret-of-32-bytes-or-more!!"),
        "tampered signature": f"{head}.{body}.{sig[:-4]}AAAA",
        "tampered claims": f"{head}.{body[:-2]}xx.{sig}",
        "RS256 where HS256 is configured": jwt.encode({**good, "exp": now + 300}, rsa_key, "RS256"),
        "100 KB": "a" * 100_000,
        "not a JWT": "abc.def",
    }
    for name, credential in hostile.items():
        resp = await client.get("/upload-status/x", headers=bearer(credential))
        assert resp.status == 401, name
        assert await resp.json() == UNAUTHORIZED, name


def jwks_of(*keys: tuple[str, Any, Any]) -> dict[str, Any]:
    """A JWKS document of (kid, algorithm class, public key)."""
    found = []
    for kid, algorithm, public in keys:
        jwk = algorithm.to_jwk(public, as_dict=True)
        found.append({**jwk, "kid": kid})
    return {"keys": found}


async def test_public_keys_from_a_jwks_file_rotated_while_running(
    make_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(identities, "JWKS_REFRESH_SECONDS", 0.0)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_of(
        ("r1", RSAAlgorithm, rsa_key.public_key()), ("e1", ECAlgorithm, ec_key.public_key()),
    )))  # fmt: skip
    client = await make_client(jwt_jwks=str(jwks))
    claims = {"sub": "alice", "exp": int(time.time()) + 300}
    for kid, key, alg in (("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256")):
        token = jwt.encode(claims, key, alg, headers={"kid": kid})
        assert (await client.get("/upload-status/x", headers=bearer(token))).status == 404, alg
    # An HS256 token signed with the RSA public key's PEM: algorithm confusion, refused.
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    confused = _hmac_token(claims, pem, "r1")
    await refused_alike(await client.get("/upload-status/x", headers=bearer(confused)))
    # A key added (rotated in) while the server runs: its kid is unknown, the set is read
    # again, and its tokens are taken.
    new_token = jwt.encode(claims, ed_key, "EdDSA", headers={"kid": "d2"})
    await refused_alike(await client.get("/upload-status/x", headers=bearer(new_token)))
    jwks.write_text(json.dumps(jwks_of(("d2", OKPAlgorithm, ed_key.public_key()))))
    assert (await client.get("/upload-status/x", headers=bearer(new_token))).status == 404
    old = jwt.encode(claims, rsa_key, "RS256", headers={"kid": "r1"})  # rotated out
    await refused_alike(await client.get("/upload-status/x", headers=bearer(old)))


def _hmac_token(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """HS256 by hand (PyJWT refuses a PEM key as an HMAC secret): the classic confusion."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


async def test_public_keys_from_a_jwks_url(
    make_client: ClientFactory, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(identities, "JWKS_REFRESH_SECONDS", 0.0)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
    served = {"doc": jwks_of(("k0", ECAlgorithm, keys[0].public_key()))}

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(served["doc"])

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    server = await aiohttp_server(app)
    client = await make_client(jwt_jwks=str(server.make_url("/jwks.json")))
    claims = {"sub": "bob", "exp": int(time.time()) + 300}
    first = jwt.encode(claims, keys[0], "ES256", headers={"kid": "k0"})
    assert (await client.get("/upload-status/x", headers=bearer(first))).status == 404
    served["doc"] = jwks_of(("k1", ECAlgorithm, keys[1].public_key()))  # rotated
    second = jwt.encode(claims, keys[1], "ES256", headers={"kid": "k1"})
    assert (await client.get("/upload-status/x", headers=bearer(second))).status == 404


async def test_signed_urls_valid_for_exactly_what_was_signed(
    make_client: ClientFactory,
) -> None:
    client = await make_client(signing_key="sign-key", auth_identities=(("alice", "tok-a"),))
    form = chunk_form("doc7", 0, 1, b"the file")
    assert (await client.post("/upload-chunk", data=form, headers=bearer("tok-a"))).status == 200
    url = sign_url("sign-key", method="GET", path="/files/doc7", identity="alice", expires_in=60)
    resp = await client.get(url)
    assert resp.status == 200 and await resp.read() == b"the file"
    query = url.split("?")[1]
    expired = sign_url(
        "sign-key", method="GET", path="/files/doc7", identity="alice",
        expires_at=int(time.time()) - 1,
    )  # fmt: skip
    tampered = {
        "another path": f"/files/doc8?{query}",
        "another method": None,
        "expiry changed": url.replace("expires=", "expires=9"),
        "identity changed": url.replace("identity=alice", "identity=bob"),
        "signature changed": url[:-4] + "0000",
        "expired": expired,
        "another key": sign_url(
            "other-key", method="GET", path="/files/doc7", identity="alice", expires_in=60
        ),
    }
    for name, changed in tampered.items():
        resp = await (client.delete(url) if changed is None else client.get(changed))
        assert resp.status == 401, name
        assert await resp.json() == UNAUTHORIZED, name
    assert (await client.get("/upload-status/doc7", headers=bearer("tok-a"))).status == 200


def test_chunkserver_sign_prints_a_url_the_server_takes(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('signing_key = "k"\n')
    done = subprocess.run(
        [sys.executable, "-m", "chunkserver", "sign", "--config", str(config), "--method",
         "get", "--path", "/files/x", "--identity", "alice", "--expires", "3600", "--url",
         "http://host:8000"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip().splitlines()[-1]
    assert url.startswith("http://host:8000/files/x?expires=") and "identity=alice" in url
    from urllib.parse import parse_qsl, urlsplit

    from chunkserver.auth.signing import verify

    parts = urlsplit(url)
    assert verify("k", "GET", parts.path, dict(parse_qsl(parts.query))) == "alice"
    assert verify("k", "DELETE", parts.path, dict(parse_qsl(parts.query))) is None
    no_key = tmp_path / "none.toml"
    no_key.write_text("")
    missing = subprocess.run(
        [sys.executable, "-m", "chunkserver", "sign", "--config", str(no_key), "--method",
         "GET", "--path", "/files/x", "--identity", "a", "--expires", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "signing_key" in missing.stderr
    assert missing.stderr.count("\n") == 1


async def test_a_tokens_claim_scopes_its_actions_and_file_ids(
    make_client: ClientFactory,
) -> None:
    client = await make_client(jwt_secret=SECRET)
    reader = bearer(hs256({"sub": "a", "chunkserver": {"actions": ["read"]}}))
    one = bearer(hs256({"sub": "a", "chunkserver": {"file_id": "mine"}}))
    prefixed = bearer(hs256({"sub": "a", "chunkserver": {"file_id_prefix": "team-"}}))
    resp = await client.post("/upload-chunk", data=chunk_form("mine", 0, 1, b"x"), headers=reader)
    assert resp.status == 403
    assert (await client.get("/upload-status/mine", headers=reader)).status == 404
    resp = await client.post("/upload-chunk", data=chunk_form("yours", 0, 1, b"x"), headers=one)
    assert resp.status == 403
    assert (await client.get("/upload-status/yours", headers=one)).status == 403
    resp = await client.post("/upload-chunk", data=chunk_form("mine", 0, 1, b"x"), headers=one)
    assert resp.status == 200
    resp = await client.post(
        "/upload-chunk", data=chunk_form("team-1", 0, 1, b"y", chunk_first=True), headers=prefixed
    )
    assert resp.status == 200
    resp = await client.post(
        "/upload-chunk", data=chunk_form("solo", 0, 1, b"z", chunk_first=True), headers=prefixed
    )
    assert resp.status == 403
    everything = bearer(hs256({"sub": "a"}))
    assert (await client.get("/upload-status/solo", headers=everything)).status == 404
    assert (await client.delete("/uploads/mine", headers=reader)).status == 403
    malformed = bearer(hs256({"sub": "a", "chunkserver": {"actions": ["fly"]}}))
    await refused_alike(await client.get("/upload-status/mine", headers=malformed))


async def test_clients_take_a_token_or_a_function_returning_a_fresh_one(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """The Python client and the browser's uploader call the function before each request,
    so that a short-lived JWT is renewed as the upload goes."""
    import asyncio
    import shutil

    from chunkserver.client import upload_file_async

    client = await make_client(jwt_secret=SECRET)
    url = str(client.make_url("")).rstrip("/")
    issued: list[str] = []

    def fresh() -> str:
        issued.append(hs256({"sub": "alice", "n": len(issued)}))
        return issued[-1]

    data = os.urandom(300_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    result = await upload_file_async(path, url, chunk_size=100_000, token=fresh, file_id="py")
    assert result["verified"] is True
    assert len(issued) >= 4  # a status request and three chunks, each with its own token
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node binary (apt-get install nodejs)")
    module = Path(__file__).resolve().parent.parent / "chunkserver" / "http" / "static"
    module = module / "chunked-uploader.js"
    token = hs256({"sub": "alice"})
    script = f"""
    import {{ ChunkedUploader }} from {json.dumps(str(module))};
    let calls = 0;
    const uploader = new ChunkedUploader({json.dumps(url)}, {{
      chunkSize: 1000, storage: null,
      token: async () => {{ calls += 1; return {json.dumps(token)}; }},
    }});
    const file = new File([new Uint8Array(2500).fill(7)], "js.bin");
    const done = await uploader.upload(file);
    console.log(JSON.stringify({{ calls, status: done.status, size: done.size }}));
    """
    ran = await asyncio.create_subprocess_exec(
        node, "--input-type=module", "-e", script, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(ran.communicate(), 60)
    answer = json.loads(out.decode().strip().splitlines()[-1])
    assert answer["status"] == "completed" and answer["size"] == 2500
    assert answer["calls"] >= 3


async def test_a_verified_token_is_kept_only_until_it_expires(make_client: ClientFactory) -> None:
    """The same JWT on every request is verified once, and refused once its exp passes."""
    import asyncio

    client = await make_client(jwt_secret=SECRET, jwt_leeway_seconds=0)
    token = bearer(hs256({"sub": "alice", "exp": int(time.time()) + 2}))
    for _ in range(3):
        assert (await client.get("/upload-status/x", headers=token)).status == 404
    deadline = time.monotonic() + 10
    while (await client.get("/upload-status/x", headers=token)).status == 404:
        assert time.monotonic() < deadline, "an expired token must be refused"
        await asyncio.sleep(0.2)
    await refused_alike(await client.get("/upload-status/x", headers=token))
