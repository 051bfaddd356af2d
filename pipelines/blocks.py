"""Prefect blocks: ``DimoCredentials`` (the private key is a ``SecretStr``, masked in the UI and in reprs)
and how the flows find DIMO settings.

Save once (UI: Blocks → DIMO Credentials, or Python)::

    DimoCredentials(client_id="0x…", redirect_uri="https://…", private_key="0x…",
                    environment="production").save("dimo")

Lookup order in :func:`resolve_dimo_settings`: an explicit emulator credentials file, the block, the
``DEPIN_DIMO_*`` environment, the emulator credentials ``depin up`` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from connectors.dimo.settings import DimoSettings, Environment
from depin_core.errors import ConfigError
from pipelines.params import DEFAULT_EMULATOR_CREDENTIALS


class DimoCredentials(Block):
    """DIMO developer-license credentials: client id, redirect URI and the API (signer private) key."""

    _block_type_name = "DIMO Credentials"
    _block_type_slug = "dimo-credentials"
    _description = "DIMO developer license: client id, redirect URI, API key (secret), environment, URLs."

    client_id: str = Field(description="developer license address (0x + 40 hex)")
    redirect_uri: str = Field(description="a redirect URI registered on the license (DIMO 'domain')")
    private_key: SecretStr = Field(description="API key: private key of a signer of the license")
    environment: Environment = Field("production", description="production, dev or emulator")
    auth_url: str | None = Field(None, description="override the environment's Auth URL")
    token_exchange_url: str | None = None
    identity_url: str | None = None
    telemetry_url: str | None = None

    def settings(self, **overrides: Any) -> DimoSettings:
        """``DimoSettings`` from this block; ``overrides`` and ``DEPIN_DIMO_*`` tuning (rate, retries…) apply."""
        fields: dict[str, Any] = {
            "environment": self.environment,
            "client_id": self.client_id,
            "domain": self.redirect_uri,
            "private_key": self.private_key,
        }
        for name in ("auth_url", "token_exchange_url", "identity_url", "telemetry_url"):
            if getattr(self, name):
                fields[name] = getattr(self, name)
        return DimoSettings(**{**fields, **overrides})

    @classmethod
    def from_settings(cls, settings: DimoSettings) -> DimoCredentials:
        """A block holding ``settings``' credentials (e.g. the emulator's, for ``depin up``)."""
        settings.require_credentials()
        assert settings.client_id and settings.domain and settings.private_key
        return cls(
            client_id=settings.client_id,
            redirect_uri=settings.domain,
            private_key=settings.private_key,
            environment=settings.environment,
            auth_url=settings.auth_url,
            token_exchange_url=settings.token_exchange_url,
            identity_url=settings.identity_url,
            telemetry_url=settings.telemetry_url,
        )


def load_block(name: str) -> DimoCredentials | None:
    """The saved ``DimoCredentials`` block ``name``, or None when there is none (needs a Prefect API)."""
    try:
        return DimoCredentials.load(name)  # type: ignore[return-value]
    except ValueError:  # "Unable to find block document named …" (or the block type is not registered)
        return None


def resolve_dimo_settings(
    credentials: Path | None = None,
    block: str | None = None,
    *,
    default_credentials: Path = DEFAULT_EMULATOR_CREDENTIALS,
    **overrides: Any,
) -> tuple[DimoSettings, str]:
    """DIMO settings and where they came from: ``credentials`` (emulator JSON), else the block ``block``,
    else the ``DEPIN_DIMO_*`` environment (when it holds credentials), else ``default_credentials``."""
    if credentials is not None:
        return DimoSettings.from_credentials_file(credentials, **overrides), f"file {credentials}"
    if block and (found := load_block(block)) is not None:
        return found.settings(**overrides), f"block {block}"
    env = DimoSettings(**overrides)
    if env.client_id and env.private_key:
        return env, "environment"
    if default_credentials.exists():
        return (
            DimoSettings.from_credentials_file(default_credentials, **overrides),
            f"file {default_credentials}",
        )
    try:
        env.require_credentials()
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; or save a DimoCredentials block named {block or 'dimo'!r}, or run `depin up` (its emulator "
            f"writes {default_credentials})"
        ) from None
    raise AssertionError("unreachable")


__all__ = ["DimoCredentials", "load_block", "resolve_dimo_settings"]
