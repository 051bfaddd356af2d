"""Settings of the function gateway (env prefix ``DEPIN_GATEWAY_``) and of its clients (``DEPIN_GATEWAY_URL``,
``DEPIN_ADMIN_KEY``: :class:`GatewayClientSettings`).

Precedence: keyword arguments > ``DEPIN_GATEWAY_*`` environment variables > defaults. List settings accept a
JSON list or a comma-separated string (``DEPIN_GATEWAY_TRUSTED_PUBLISHERS=0xAbc…,0xDef…``).

Admin API keys are never stored: the gateway holds their sha256 hex digests (``admin_key_hashes``, and/or a
``admin_keys_file`` with one digest per line, ``#`` comments allowed). ``serving._auth.new_admin_key()`` makes
a key and its digest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from depin_core import paths
from depin_core.errors import ConfigError
from depin_core.settings import EnvSettings

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8787"
GATEWAY_URL_ENV = "DEPIN_GATEWAY_URL"
ADMIN_KEY_ENV = "DEPIN_ADMIN_KEY"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            try:
                return json.loads(text)
            except ValueError:
                raise ConfigError(
                    f"not a JSON list: {text[:40]!r}; use a JSON list or comma-separated values"
                ) from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def read_keys_file(path: Path) -> list[str]:
    """The sha256 hex digests in ``path`` (one per line; blank lines and ``#`` comments ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"admin_keys_file {path}: cannot read it ({exc.strerror or exc}); fix the path "
            "(DEPIN_GATEWAY_ADMIN_KEYS_FILE) or its permissions"
        ) from None
    digests = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if not _SHA256.fullmatch(line):
            raise ConfigError(
                f"admin_keys_file {path} line {lineno}: not a sha256 hex digest (64 hex chars); store "
                "hash_api_key(key), never the key itself"
            )
        digests.append(line)
    return digests


class GatewaySettings(BaseSettings):
    """Where the gateway listens, which registry it serves, who may publish and administer, and its limits."""

    model_config = SettingsConfigDict(env_prefix="DEPIN_GATEWAY_", extra="ignore", hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the gateway to the network")
    port: int = Field(8787, ge=0, le=65535, description="TCP port; 0 picks a free one")
    registry_dir: Path = Field(
        paths.REGISTRY_DIR,
        description="the function registry directory (with registry_url: this gateway's local cache of it)",
    )
    registry_url: str | None = Field(
        None,
        description="s3://bucket/prefix of a registry shared by several gateways (the source of truth; "
        "registry_dir becomes a verified cache, synced every poll_interval_s); unset = local registry only",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint of registry_url (default: AWS_ENDPOINT_URL, else AWS)"
    )
    s3_region: str | None = Field(None, description="S3 region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    s3_access_key_id: str | None = Field(None, description="S3 access key id (default: AWS_ACCESS_KEY_ID)")
    s3_secret_access_key: SecretStr | None = Field(
        None, description="S3 secret key (default: AWS_SECRET_ACCESS_KEY)"
    )
    s3_allow_http: bool = Field(
        False,
        description="allow a plain-http s3_endpoint_url (loopback test servers; default AWS_ALLOW_HTTP)",
    )
    trusted_publishers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="publisher addresses (0x…) whose bundles are accepted"
    )
    allow_any_publisher: bool = Field(
        False,
        description="accept any validly signed bundle (development only; trusted_publishers is ignored)",
    )
    admin_key_hashes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="sha256 hex digests of the admin API keys"
    )
    admin_keys_file: Path | None = Field(None, description="file of admin key sha256 digests, one per line")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest invoke request body")
    max_upload_bytes: int = Field(512 * 2**20, ge=1024, description="largest bundle upload (packed tar)")
    max_wait_ms: float = Field(2.0, ge=0, le=10_000, description="longest a queued row waits for its batch")
    max_queue_rows: int = Field(16_384, ge=1, description="rows queued per (function, version) before 429")
    max_in_flight: int = Field(2, ge=1, le=64, description="batches handed to the inference thread at once")
    inline_max_ms: float = Field(
        1.0,
        ge=0,
        le=100,
        description="a lone request on an idle model runs on the event loop when its batches take at most "
        "this long (the thread hop costs more); 0 = every batch on the inference thread",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of an invoke request (504 after it)")
    poll_interval_s: float = Field(1.0, gt=0, description="how often the registry revision is checked")
    max_unaliased_loaded: int = Field(
        4, ge=1, description="versions kept loaded for name@version requests although no alias points at them"
    )
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device of the models")
    torch_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (default: DEPIN_TORCH_THREADS, else 1)"
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate (chain) to serve HTTPS with; needs tls_key_file (default: plain HTTP)",
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key of tls_cert_file (keep it mode 0600)"
    )
    log_level: str = Field("warning", description="uvicorn log level")
    access_log: bool = Field(False, description="log every request (costs throughput)")

    @field_validator("trusted_publishers", "admin_key_hashes", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("trusted_publishers")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if not _ADDRESS.fullmatch(address):
                raise ConfigError(
                    f"DEPIN_GATEWAY_TRUSTED_PUBLISHERS (trusted_publishers): {address[:60]!r} is not an address; "
                    "use 0x followed by 40 hex digits (the publisher's address, see `depin publish`)"
                )
        from eth_utils import to_checksum_address

        return [to_checksum_address(a) for a in value]

    @field_validator("admin_key_hashes")
    @classmethod
    def _check_hashes(cls, value: list[str]) -> list[str]:
        out = []
        for digest in value:
            digest = digest.strip().lower()
            if not _SHA256.fullmatch(digest):
                # never echo it: it may be a raw key pasted by mistake
                raise ConfigError(
                    "DEPIN_GATEWAY_ADMIN_KEY_HASHES (admin_key_hashes): every entry must be a sha256 hex digest "
                    "(64 hex chars) of an admin key — store hash_api_key(key), never the key itself"
                )
            out.append(digest)
        return out

    @field_validator("registry_url")
    @classmethod
    def _check_registry_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", value):
            raise ConfigError(
                f"DEPIN_GATEWAY_REGISTRY_URL (registry_url) {value[:80]!r} is not an s3://bucket/prefix URL; "
                "give e.g. s3://my-bucket/registry, or unset it to serve the local registry_dir only"
            )
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_s3_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value.strip()):
            raise ConfigError(
                "DEPIN_GATEWAY_S3_ENDPOINT_URL (s3_endpoint_url) must be an http(s) URL, e.g. "
                "https://s3.eu-west-1.amazonaws.com"
            )
        return value.strip().rstrip("/") if value else None

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip().strip("[]")
        if not value:
            raise ConfigError("DEPIN_GATEWAY_HOST (host) is empty; use 127.0.0.1 (default) or 0.0.0.0")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError(
                "DEPIN_GATEWAY_TLS_CERT_FILE and DEPIN_GATEWAY_TLS_KEY_FILE go together: set both (HTTPS) or "
                "neither (plain HTTP)"
            )
        for field, path in (("TLS_CERT_FILE", self.tls_cert_file), ("TLS_KEY_FILE", self.tls_key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(
                    f"DEPIN_GATEWAY_{field} ({field.lower()}) {path}: no such file; fix the path"
                )
        return self

    @property
    def scheme(self) -> str:
        """``https`` when a certificate is configured, else ``http``."""
        return "https" if self.tls_cert_file is not None else "http"

    def trusted(self) -> frozenset[str] | None:
        """The publisher addresses a Registry should accept (None = any signature, if allowed).

        Raises ``ConfigError`` when no publisher is trusted and ``allow_any_publisher`` is off."""
        if self.allow_any_publisher:
            return None
        if not self.trusted_publishers:
            raise ConfigError(
                "no trusted publisher: set DEPIN_GATEWAY_TRUSTED_PUBLISHERS to the address(es) that sign your "
                "bundles (see `depin publish`), or DEPIN_GATEWAY_ALLOW_ANY_PUBLISHER=true for development"
            )
        return frozenset(self.trusted_publishers)

    def admin_digests(self) -> frozenset[str]:
        """Every configured admin key digest: ``admin_key_hashes`` plus the keys file's lines."""
        digests = set(self.admin_key_hashes)
        if self.admin_keys_file is not None:
            digests.update(read_keys_file(self.admin_keys_file))
        return frozenset(digests)


class GatewayClientSettings(EnvSettings):
    """Which gateway ``depin publish`` / ``depin invoke`` and the flows talk to, its admin key and the
    certificate to pin (``DEPIN_GATEWAY_URL``, ``DEPIN_ADMIN_KEY``, ``DEPIN_GATEWAY_CERT``; an empty variable
    counts as unset)."""

    model_config = SettingsConfigDict(
        env_prefix="DEPIN_", extra="ignore", hide_input_in_errors=True, env_ignore_empty=True
    )

    gateway_url: str = Field(DEFAULT_GATEWAY_URL, description="the gateway serving the local registry")
    admin_key: SecretStr | None = Field(None, description="the gateway's admin key (X-API-Key)")
    gateway_cert: str | None = Field(
        None,
        description="PEM text of the certificate an https gateway serves, pinned (a worker host's setting; "
        "--tls-cert / PublishParams.tls_cert, a file, win)",
    )

    def admin_key_value(self) -> SecretStr | None:
        """``admin_key`` stripped; None when unset or blank."""
        text = self.admin_key.get_secret_value().strip() if self.admin_key is not None else ""
        return SecretStr(text) if text else None
