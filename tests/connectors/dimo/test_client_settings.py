"""DimoSettings: validation messages, environment tables, credentials file precedence, secrecy."""

from __future__ import annotations

import json

import pytest

from connectors.dimo.settings import DimoSettings
from depin_core.errors import ConfigError

KEY = "ab" * 32
LIC = "0x" + "12" * 20


def test_defaults_resolve_urls_per_environment(monkeypatch):
    monkeypatch.delenv("DEPIN_DIMO_ENV", raising=False)
    emu = DimoSettings()
    assert emu.urls.telemetry == "http://127.0.0.1:8765/telemetry/query" and emu.effective_rate_limit == 10
    monkeypatch.setenv("DEPIN_DIMO_ENV", "production")
    prod = DimoSettings()
    assert prod.urls.identity == "https://identity-api.dimo.zone/query" and prod.effective_rate_limit == 10
    assert DimoSettings(rate_limit_per_s=0).effective_rate_limit == 0
    assert DimoSettings(environment="dev").urls.auth == "https://auth.dev.dimo.zone"
    assert DimoSettings(telemetry_url="http://x:1/q/").urls.telemetry == "http://x:1/q"


@pytest.mark.parametrize(
    ("field", "value", "var"),
    [
        ("client_id", "0x123", "DEPIN_DIMO_CLIENT_ID"),
        ("private_key", "0x" + "zz" * 32, "DEPIN_DIMO_PRIVATE_KEY"),
        ("identity_url", "ftp://x", "DEPIN_DIMO_IDENTITY_URL"),
    ],
)
def test_invalid_values_name_the_variable(field, value, var):
    with pytest.raises(ConfigError, match=var) as info:
        DimoSettings(**{field: value})
    assert value not in str(info.value)


def test_private_key_is_normalised_and_never_printed(monkeypatch):
    monkeypatch.setenv("DEPIN_DIMO_PRIVATE_KEY", KEY.upper())
    s = DimoSettings(client_id=LIC, domain="d")
    assert s.private_key is not None and s.private_key.get_secret_value() == "0x" + KEY
    for text in (repr(s), str(s), s.model_dump_json()):
        assert KEY not in text.lower()


def test_require_credentials_lists_missing_variables(monkeypatch):
    for var in ("DEPIN_DIMO_CLIENT_ID", "DEPIN_DIMO_DOMAIN", "DEPIN_DIMO_PRIVATE_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="DEPIN_DIMO_DOMAIN, DEPIN_DIMO_PRIVATE_KEY"):
        DimoSettings(client_id=LIC).require_credentials()
    DimoSettings(client_id=LIC, domain="d", private_key=KEY).require_credentials()


def test_credentials_file_wins_over_env_for_its_fields(tmp_path, monkeypatch):
    doc = {
        "client_id": LIC,
        "domain": "http://localhost/cb",
        "private_key": "0x" + KEY,
        "auth_url": "http://127.0.0.1:9",
        "token_exchange_url": "http://127.0.0.1:9",
        "identity_url": "http://127.0.0.1:9/identity/query",
        "telemetry_url": "http://127.0.0.1:9/telemetry/query",
    }
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("DEPIN_DIMO_TELEMETRY_URL", "http://elsewhere/q")
    monkeypatch.setenv("DEPIN_DIMO_MAX_CONCURRENCY", "3")
    monkeypatch.delenv("DEPIN_DIMO_ENV", raising=False)
    s = DimoSettings.from_credentials_file(path)
    assert s.urls.telemetry == doc["telemetry_url"] and s.max_concurrency == 3 and s.environment == "emulator"
    with pytest.raises(ConfigError, match="does not exist"):
        DimoSettings.from_credentials_file(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        DimoSettings.from_credentials_file(path)


def test_environment_comes_only_from_prefixed_variables(monkeypatch):
    monkeypatch.delenv("DEPIN_DIMO_ENV", raising=False)
    monkeypatch.delenv("DEPIN_DIMO_ENVIRONMENT", raising=False)
    monkeypatch.setenv("ENVIRONMENT", "production")  # someone else's variable: must not switch to prod DIMO
    assert DimoSettings().environment == "emulator"
    monkeypatch.setenv("ENVIRONMENT", "staging")  # nor break validation
    assert DimoSettings(environment="dev").environment == "dev"
    monkeypatch.setenv("DEPIN_DIMO_ENVIRONMENT", "dev")
    assert DimoSettings().environment == "dev"
    monkeypatch.setenv("DEPIN_DIMO_ENV", "production")
    assert DimoSettings().environment == "production"


def test_credentials_file_overrides_win_over_its_fields(tmp_path, monkeypatch):
    monkeypatch.delenv("DEPIN_DIMO_ENV", raising=False)
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"client_id": LIC, "telemetry_url": "http://127.0.0.1:9/telemetry/query"}))
    s = DimoSettings.from_credentials_file(path, telemetry_url="http://127.0.0.1:7/q", environment="dev")
    assert s.urls.telemetry == "http://127.0.0.1:7/q" and s.environment == "dev" and s.client_id == LIC
