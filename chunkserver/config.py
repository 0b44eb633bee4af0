"""The server's configuration: a frozen dataclass read from TOML, then overridden by flags.

`load_config` is the only way in: it reads the file with `tomllib`, applies command-line
overrides and validates every key, raising `ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """A configuration key is unknown, of the wrong type, or has a bad value."""


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    unix_socket: str = ""
    data_dir: str = "./data"
    workers: int = 1
    max_chunk_bytes: int = 64 * MiB
    max_file_bytes: int = 100 * GiB
    max_total_chunks: int = 100_000
    min_free_bytes: int = 256 * MiB
    upload_ttl_seconds: float = 86_400.0
    sweep_interval_seconds: float = 300.0
    idle_timeout_seconds: float = 60.0
    max_inflight_chunks: int = 256
    fsync: bool = False
    auth_tokens: tuple[str, ...] = ()
    # Security (docs/security.md): named tokens, JWTs, signed URLs.
    # The table `auth_identities = {name = "token", ...}`, as (name, token) pairs: a frozen
    # config stays hashable.
    auth_identities: tuple[tuple[str, str], ...] = ()
    jwt_secret: str = ""  # HS256 (or the HS* of jwt_algorithms)
    jwt_jwks: str = ""  # a JWKS file path or URL: public keys by kid
    jwt_algorithms: tuple[str, ...] = ()  # empty: HS256 with a secret, RS256/ES256/EdDSA with keys
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_seconds: float = 30.0
    signing_key: str = ""  # signs and checks signed URLs
    # Quotas per identity (quotas.py); 0: none.
    quota_bytes_in_progress: int = 0
    quota_uploads_in_progress: int = 0
    quota_requests_per_second: float = 0.0
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    accel_redirect_prefix: str = ""
    log_level: str = "info"
    access_log: bool = True
    checksums: tuple[str, ...] = ("crc64nvme",)
    # Beyond one machine (PROTOCOL.md, storage = "s3"): bytes in a bucket, state in PostgreSQL.
    storage: str = "local"
    s3_endpoint_url: str = ""  # empty: AWS S3 itself
    s3_bucket: str = ""
    s3_region: str = ""  # empty: botocore's own default (AWS_REGION, ~/.aws/config)
    s3_prefix: str = ""
    s3_access_key_id: str = ""  # empty: the usual AWS_* variables, profiles or roles
    s3_secret_access_key: str = ""
    s3_max_parts: int = 10_000  # S3's limit; Swift's s3api defaults to 1000
    database_url: str = ""
    # Integration (PROTOCOL.md): events POSTed to the application as JSON.
    hook_url: str = ""  # empty: no hooks
    hook_events: tuple[str, ...] = ("pre-create", "post-finish", "post-terminate", "post-expire")
    hook_timeout_seconds: float = 5.0
    hook_request_headers: tuple[str, ...] = ()  # the request's headers every event carries
    hook_progress_seconds: float = 1.0  # post-receive: at most one per upload this often
    hook_access_cache_seconds: float = 60.0  # pre-access: how long a 2xx answer holds

    @property
    def accepted_jwt_algorithms(self) -> tuple[str, ...]:
        """The algorithms a JWT may be signed with: the configured ones, or by the key."""
        if self.jwt_algorithms:
            return self.jwt_algorithms
        return ("HS256",) if self.jwt_secret else ("RS256", "ES256", "EdDSA")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# The TOML type each key accepts; integers are also accepted where floats are.
_KEY_TYPES: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]
_TUPLE_KEYS = {
    "auth_tokens",
    "cors_origins",
    "trusted_proxies",
    "checksums",
    "hook_events",
    "jwt_algorithms",
    "hook_request_headers",
}
_TABLE_KEYS = {"auth_identities"}
SYMMETRIC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")
CHECKSUMS = ("crc64nvme", "sha256")
STORAGES = ("local", "s3")
MAX_WORKERS = 64
HOOK_EVENTS = (
    "pre-create",
    "post-create",
    "post-receive",
    "pre-finish",
    "post-finish",
    "post-terminate",
    "post-expire",
    "pre-access",
)


def available_cores() -> int:
    """The cores this process may run on (what `workers = "auto"` starts one process per)."""
    return len(os.sched_getaffinity(0))


def _coerce(key: str, value: Any) -> Any:
    """Return `value` converted to the type of `key`, or raise ConfigError naming the key."""
    expected = _KEY_TYPES[key]
    if key == "workers" and isinstance(value, str):
        if value != "auto":
            raise ConfigError(f'workers: expected an integer or "auto", got {value!r}')
        return min(available_cores(), MAX_WORKERS)
    if key in _TABLE_KEYS:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{key}: expected a table of names to strings, got {value!r}")
        return tuple(sorted(value.items()))
    if key in _TUPLE_KEYS:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if expected in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if expected in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if expected in ("float", float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def validate(config: Config) -> Config:
    """Check the values that types alone do not constrain; return the config unchanged."""
    checks: list[tuple[str, bool, str]] = [
        ("port", 0 <= config.port <= 65535, "must be between 0 and 65535"),
        ("workers", 1 <= config.workers <= MAX_WORKERS, 'must be "auto" or between 1 and 64'),
        ("max_chunk_bytes", config.max_chunk_bytes >= 1, "must be at least 1"),
        ("max_file_bytes", config.max_file_bytes >= 1, "must be at least 1"),
        ("max_total_chunks", config.max_total_chunks >= 1, "must be at least 1"),
        ("min_free_bytes", config.min_free_bytes >= 0, "must not be negative"),
        ("upload_ttl_seconds", config.upload_ttl_seconds > 0, "must be positive"),
        ("sweep_interval_seconds", config.sweep_interval_seconds > 0, "must be positive"),
        ("idle_timeout_seconds", config.idle_timeout_seconds > 0, "must be positive"),
        ("max_inflight_chunks", config.max_inflight_chunks >= 1, "must be at least 1"),
        ("data_dir", config.data_dir.strip() != "", "must not be empty"),
        ("storage", config.storage in STORAGES, f"must be one of {STORAGES}"),
        (
            "s3_bucket",
            config.storage != "s3" or config.s3_bucket.strip() != "",
            'must be set when storage = "s3"',
        ),
        (
            "database_url",
            config.storage != "s3"
            or config.database_url.startswith(("postgresql://", "postgres://")),
            'must be a postgresql:// URL when storage = "s3"',
        ),
        (
            "s3_endpoint_url",
            config.s3_endpoint_url == ""
            or config.s3_endpoint_url.startswith(("http://", "https://")),
            "must be empty (AWS S3) or an http:// or https:// URL",
        ),
        ("s3_max_parts", 1 <= config.s3_max_parts <= 10_000, "must be between 1 and 10000"),
        (
            "hook_url",
            config.hook_url == "" or config.hook_url.startswith(("http://", "https://")),
            "must be empty (no hooks) or an http:// or https:// URL",
        ),
        (
            "hook_events",
            set(config.hook_events) <= set(HOOK_EVENTS),
            f"must be a list of {HOOK_EVENTS}",
        ),
        ("hook_timeout_seconds", config.hook_timeout_seconds > 0, "must be positive"),
        ("hook_progress_seconds", config.hook_progress_seconds >= 0, "must not be negative"),
        (
            "hook_access_cache_seconds",
            config.hook_access_cache_seconds >= 0,
            "must not be negative",
        ),
        (
            "hook_request_headers",
            all(h.strip() and ":" not in h for h in config.hook_request_headers),
            "must be a list of header names",
        ),
        ("quota_bytes_in_progress", config.quota_bytes_in_progress >= 0, "must not be negative"),
        (
            "quota_uploads_in_progress",
            config.quota_uploads_in_progress >= 0,
            "must not be negative",
        ),
        (
            "quota_requests_per_second",
            config.quota_requests_per_second >= 0,
            "must not be negative",
        ),
        ("host", config.host.strip() != "", "must not be empty"),
        ("log_level", config.log_level.lower() in LOG_LEVELS, f"must be one of {LOG_LEVELS}"),
        ("auth_tokens", all(t.strip() for t in config.auth_tokens), "must not hold empty tokens"),
        (
            "auth_identities",
            all(n.strip() and t.strip() for n, t in config.auth_identities)
            and len({t for _, t in config.auth_identities}) == len(config.auth_identities),
            "must name each identity and give each its own, non-empty token",
        ),
        (
            "jwt_jwks",
            not (config.jwt_jwks and config.jwt_secret),
            "and jwt_secret exclude each other (one kind of key: no algorithm confusion)",
        ),
        (
            "jwt_algorithms",
            set(config.jwt_algorithms)
            <= set(SYMMETRIC_ALGORITHMS if config.jwt_secret else ASYMMETRIC_ALGORITHMS),
            "must be among "
            + ", ".join(SYMMETRIC_ALGORITHMS if config.jwt_secret else ASYMMETRIC_ALGORITHMS)
            + (" with jwt_secret" if config.jwt_secret else " with jwt_jwks"),
        ),
        ("jwt_leeway_seconds", 0 <= config.jwt_leeway_seconds <= 600, "must be 0 to 600"),
        (
            "checksums",
            "crc64nvme" in config.checksums and set(config.checksums) <= set(CHECKSUMS),
            f'must hold "crc64nvme" and may add "sha256" (known: {CHECKSUMS})',
        ),
        (
            "accel_redirect_prefix",
            config.accel_redirect_prefix == ""
            or (
                config.accel_redirect_prefix.startswith("/")
                and config.accel_redirect_prefix.endswith("/")
            ),
            "must be empty or a path that starts and ends with '/'",
        ),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}, got {getattr(config, key)!r}")
    for proxy in config.trusted_proxies:
        if proxy == "unix":  # whatever connects over the unix socket (nginx, on one host)
            continue
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"trusted_proxies: {proxy!r} is not an IP address, a network or 'unix'"
            ) from None
    return config


def from_mapping(values: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from `values` over `base`; unknown keys and bad types raise ConfigError."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _KEY_TYPES:
            raise ConfigError(f"{key}: unknown configuration key")
        changes[key] = _coerce(key, value)
    return validate((base or Config()).replace(**changes))


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (None: defaults only), apply non-None `overrides`, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config: file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return from_mapping(values)


def as_dict(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


__all__ = ["Config", "ConfigError", "GiB", "MiB", "as_dict", "from_mapping", "load_config"]
