"""Configuration: the default file, overrides, and one clear line for every bad key."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from chunkserver.config import Config, ConfigError, as_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_KEYS = {
    "host", "port", "unix_socket", "data_dir", "workers", "max_chunk_bytes", "max_file_bytes",
    "max_total_chunks", "min_free_bytes", "upload_ttl_seconds", "sweep_interval_seconds",
    "fsync", "auth_tokens", "cors_origins", "log_level", "access_log", "checksums",
}  # fmt: skip


def test_default_file_matches_builtin_defaults_and_has_every_key() -> None:
    with open(ROOT / "config.toml", "rb") as f:
        values = tomllib.load(f)
    assert set(values) >= PROTOCOL_KEYS
    assert load_config(ROOT / "config.toml") == Config()
    assert set(as_dict(Config())) == set(values)


def test_overrides_win_and_none_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('port = 9000\nhost = "0.0.0.0"\nauth_tokens = ["t"]\n')
    config = load_config(path, {"port": 9100, "host": None})
    assert config.port == 9100 and config.host == "0.0.0.0"
    assert config.auth_tokens == ("t",)


def test_security_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'auth_identities = {loader = "tok-l", viewer = "tok-v"}\njwt_jwks = "keys.json"\n'
        'jwt_audience = "uploads"\nsigning_key = "k"\n'
    )
    config = load_config(path)
    assert dict(config.auth_identities) == {"loader": "tok-l", "viewer": "tok-v"}
    assert config.accepted_jwt_algorithms == ("RS256", "ES256", "EdDSA")
    assert Config(jwt_secret="s").accepted_jwt_algorithms == ("HS256",)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("nonsense = 1", "nonsense"),
        ('port = "80"', "port"),
        ("port = 70000", "port"),
        ("workers = 0", "workers"),
        ('workers = "many"', "workers"),
        ("fsync = 1", "fsync"),
        ("auth_tokens = 'abc'", "auth_tokens"),
        ("max_chunk_bytes = 0", "max_chunk_bytes"),
        ("min_free_bytes = -1", "min_free_bytes"),
        ('log_level = "loud"', "log_level"),
        ("upload_ttl_seconds = 0", "upload_ttl_seconds"),
        ('trusted_proxies = ["not-an-ip"]', "trusted_proxies"),
        ('accel_redirect_prefix = "no-slashes"', "accel_redirect_prefix"),
        ("max_total_chunks = true", "max_total_chunks"),
        ('checksums = ["md5"]', "checksums"),
        ('checksums = ["sha256"]', "checksums"),
        ('checksums = "crc64nvme"', "checksums"),
        ('storage = "s4"', "storage"),
        ('storage = "s3"', "s3_bucket"),
        ('storage = "s3"\ns3_bucket = "b"', "database_url"),
        ('storage = "s3"\ns3_bucket = "b"\ndatabase_url = "mysql://x"', "database_url"),
        ('s3_endpoint_url = "minio:9000"', "s3_endpoint_url"),
        ("s3_max_parts = 0", "s3_max_parts"),
        ("database_url = 5", "database_url"),
        ('hook_url = "ftp://x"', "hook_url"),
        ('hook_events = ["pre-upload"]', "hook_events"),
        ("hook_timeout_seconds = 0", "hook_timeout_seconds"),
        ('auth_identities = ["a"]', "auth_identities"),
        ('auth_identities = {alice = "t", bob = "t"}', "auth_identities"),
        ('auth_identities = {alice = ""}', "auth_identities"),
        ('jwt_secret = "s"\njwt_jwks = "keys.json"', "jwt_jwks"),
        ('jwt_secret = "s"\njwt_algorithms = ["RS256"]', "jwt_algorithms"),
        ('jwt_jwks = "keys.json"\njwt_algorithms = ["HS256"]', "jwt_algorithms"),
        ('jwt_algorithms = ["none"]', "jwt_algorithms"),
        ("jwt_leeway_seconds = -1", "jwt_leeway_seconds"),
        ("quota_bytes_in_progress = -1", "quota_bytes_in_progress"),
        ("quota_uploads_in_progress = 1.5", "quota_uploads_in_progress"),
        ('quota_requests_per_second = "10"', "quota_requests_per_second"),
        ('hook_request_headers = "X-User"', "hook_request_headers"),
        ('hook_request_headers = ["X-User: 1"]', "hook_request_headers"),
        ("hook_progress_seconds = -1", "hook_progress_seconds"),
        ("hook_access_cache_seconds = -0.5", "hook_access_cache_seconds"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(path)


def test_serve_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_chunk_bytes = 'big'\n")
    result = subprocess.run(
        [sys.executable, "-m", "chunkserver", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_chunk_bytes" in lines[0]


def test_workers_auto_is_one_per_core(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('workers = "auto"\n')
    assert load_config(path).workers == len(os.sched_getaffinity(0))
    assert load_config(None, {"workers": "auto"}).workers == len(os.sched_getaffinity(0))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
