"""Settings of the DIMO client (env prefix ``DEPIN_DIMO_``), with the base URLs of each environment.

Precedence: keyword arguments > ``DEPIN_DIMO_*`` environment variables > defaults. ``from_credentials_file``
passes the file's fields as keyword arguments, so the file wins over the environment for the fields it has;
everything else (rate limit, concurrency, retries) still comes from the environment.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from depin_core.errors import ConfigError

Environment = Literal["emulator", "production", "dev"]

EMULATOR_BASE_URL = "http://127.0.0.1:8765"
VEHICLE_NFT_PROD = "0xbA5738a18d83D41847dfFbDC6101d37C69c9B0cF"
VEHICLE_NFT_DEV = "0x45fbCD3ef7361d156e8b16F5538AE36DEdf61Da8"

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class ServiceUrls:
    """Where each DIMO service lives, plus the vehicle NFT contract of that chain."""

    auth: str
    token_exchange: str
    identity: str
    telemetry: str
    nft_contract: str
    chain_id: int


ENVIRONMENTS: dict[str, ServiceUrls] = {
    "production": ServiceUrls(
        "https://auth.dimo.zone",
        "https://token-exchange-api.dimo.zone",
        "https://identity-api.dimo.zone/query",
        "https://telemetry-api.dimo.zone/query",
        VEHICLE_NFT_PROD,
        137,
    ),
    "dev": ServiceUrls(
        "https://auth.dev.dimo.zone",
        "https://token-exchange-api.dev.dimo.zone",
        "https://identity-api.dev.dimo.zone/query",
        "https://telemetry-api.dev.dimo.zone/query",
        VEHICLE_NFT_DEV,
        80002,
    ),
    "emulator": ServiceUrls(
        EMULATOR_BASE_URL,
        EMULATOR_BASE_URL,
        f"{EMULATOR_BASE_URL}/identity/query",
        f"{EMULATOR_BASE_URL}/telemetry/query",
        VEHICLE_NFT_PROD,  # the emulator serves the production contract, like the SDKs expect
        137,
    ),
}

_ENV_VAR = {
    "client_id": "DEPIN_DIMO_CLIENT_ID",
    "domain": "DEPIN_DIMO_DOMAIN",
    "private_key": "DEPIN_DIMO_PRIVATE_KEY",
}


class DimoSettings(BaseSettings):
    """How to reach DIMO and how hard to push it. The private key is a ``SecretStr`` and never printed."""

    model_config = SettingsConfigDict(
        env_prefix="DEPIN_DIMO_", extra="ignore", hide_input_in_errors=True, populate_by_name=True
    )

    # Keyword ``environment`` works through populate_by_name; the aliases are only the env var names (a bare
    # "environment" alias would also read an unprefixed ENVIRONMENT variable meant for something else).
    environment: Environment = Field(
        "emulator", validation_alias=AliasChoices("DEPIN_DIMO_ENV", "DEPIN_DIMO_ENVIRONMENT")
    )
    client_id: str | None = Field(None, description="developer license address (0x + 40 hex)")
    domain: str | None = Field(None, description="a redirect URI registered on the license")
    private_key: SecretStr | None = Field(None, description="API key: private key of a signer of the license")
    auth_url: str | None = None
    token_exchange_url: str | None = None
    identity_url: str | None = None
    telemetry_url: str | None = None
    rate_limit_per_s: float = Field(
        10.0, ge=0, description="requests/s per service (DIMO documents 10 per service per client); 0 = off"
    )
    max_concurrency: int = Field(8, ge=1, le=256)
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(8, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    # Planning budget: buckets × value columns per telemetry request (a 1-minute day of 15 signals is ~22k
    # values, ~0.6 MB of JSON); see the measurements in _telemetry.py.
    max_values_per_request: int = Field(40_000, ge=100)
    # Signals per request; the planner also keeps the gqlgen complexity (every field 1 + children) ≤ 100.
    max_signals_per_request: int = Field(90, ge=1, le=97)
    max_window: timedelta = Field(
        timedelta(days=7), description="longest time range of one telemetry request"
    )
    use_data_summary: bool = Field(
        True,
        description="ask dataSummary (one request per vehicle) for each signal's first/last time and skip "
        "the windows and signals that cannot hold data",
    )
    # The lookup costs one request: worth it for backfills (many windows), not for an incremental hour.
    data_summary_min_requests: int = Field(
        4, ge=1, description="use dataSummary only for vehicles whose plan has at least this many requests"
    )

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, v: str | None) -> str | None:
        if v is not None and not _ADDRESS.fullmatch(v.strip()):
            raise ConfigError(
                "DEPIN_DIMO_CLIENT_ID (client_id) must be the developer license address, 0x followed by 40 hex "
                "digits; copy it from console.dimo.org (or the emulator's credentials file)"
            )
        return v.strip() if v else v

    @field_validator("private_key")
    @classmethod
    def _check_private_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        raw = v.get_secret_value().strip()
        if not _KEY.fullmatch(raw):
            # Never echo the value: it may be a real key with a typo.
            raise ConfigError(
                "DEPIN_DIMO_PRIVATE_KEY (private_key) must be a 32-byte hex private key (64 hex digits, with or "
                "without 0x): the API key of a signer from console.dimo.org"
            )
        return SecretStr("0x" + raw.lower().removeprefix("0x"))

    @field_validator("auth_url", "token_exchange_url", "identity_url", "telemetry_url")
    @classmethod
    def _check_url(cls, v: str | None, info: Any) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v.strip()):
            raise ConfigError(
                f"DEPIN_DIMO_{info.field_name.upper()} ({info.field_name}) must be an http(s) URL, "
                f"e.g. {getattr(ENVIRONMENTS['production'], info.field_name.removesuffix('_url'))}"
            )
        return v.strip().rstrip("/") if v else v

    @property
    def urls(self) -> ServiceUrls:
        """The effective service URLs: explicit settings, else the environment's table."""
        base = ENVIRONMENTS[self.environment]
        return ServiceUrls(
            self.auth_url or base.auth,
            self.token_exchange_url or base.token_exchange,
            self.identity_url or base.identity,
            self.telemetry_url or base.telemetry,
            base.nft_contract,
            base.chain_id,
        )

    @property
    def effective_rate_limit(self) -> float:
        """Requests per second per service (0 = unlimited)."""
        return self.rate_limit_per_s

    def require_credentials(self) -> None:
        """Raise ConfigError naming every missing ``DEPIN_DIMO_*`` credential variable."""
        missing = [var for name, var in _ENV_VAR.items() if not getattr(self, name)]
        if missing:
            raise ConfigError(
                f"DIMO credentials missing: set {', '.join(missing)} (from console.dimo.org), or for the emulator "
                "use DimoSettings.from_credentials_file(<file written by `depin emulator --credentials-out`>)"
            )

    @classmethod
    def from_credentials_file(cls, path: str | Path, **overrides: Any) -> DimoSettings:
        """Settings from the JSON written by ``depin emulator --credentials-out``.

        ``overrides`` win over the file, which wins over ``DEPIN_DIMO_*`` environment variables."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"credentials file {p} does not exist; start `depin emulator --credentials-out {p}`"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"credentials file {p} is not readable JSON ({type(exc).__name__}); rewrite it"
            ) from None
        if not isinstance(doc, dict):
            raise ConfigError(f"credentials file {p} must hold a JSON object")
        keys = (
            "environment",
            "client_id",
            "domain",
            "private_key",
            *(f"{s}_url" for s in ("auth", "token_exchange", "identity", "telemetry")),
        )
        fields = {"environment": "emulator", **{k: doc[k] for k in keys if doc.get(k) is not None}}
        return cls(**{**fields, **overrides})


class DatasetSettings(BaseSettings):
    """Where the telemetry table lives (env prefix ``DEPIN_DATASET_``).

    ``uri`` is a local path (default) or ``s3://bucket/prefix``. The ``s3_*`` fields are passed to delta-rs /
    the object store; any one left unset falls back to the standard ``AWS_*`` environment variables, which
    delta-rs reads itself. The secret key is a ``SecretStr`` and never printed.
    """

    model_config = SettingsConfigDict(env_prefix="DEPIN_DATASET_", extra="ignore", hide_input_in_errors=True)

    uri: str | None = Field(None, description="table location: a directory or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000"
    )
    s3_region: str | None = Field(None, description="S3 region (any value for most S3-compatible stores)")
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_allow_http: bool = Field(False, description="allow a plain-http endpoint (loopback test servers)")

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v.strip()):
            raise ConfigError(
                "DEPIN_DATASET_S3_ENDPOINT_URL (s3_endpoint_url) must be an http(s) URL, e.g. https://s3.eu-west-1.amazonaws.com"
            )
        return v.strip().rstrip("/") if v else v

    def storage_options(self) -> dict[str, str]:
        """The object-store options for delta-rs, pyarrow and polars (secrets included: never log this)."""
        opts = {
            "AWS_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_REGION": self.s3_region,
            "AWS_ACCESS_KEY_ID": self.s3_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_access_key.get_secret_value()
            if self.s3_secret_access_key
            else None,
        }
        out = {k: v for k, v in opts.items() if v}
        if self.s3_allow_http:
            out["AWS_ALLOW_HTTP"] = "true"
        return out
