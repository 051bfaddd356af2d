"""Offer choice, worker names, the bootstrap script, provider construction."""

from __future__ import annotations

import shlex

import pytest
from pydantic import SecretStr, ValidationError

from depin_core import tls
from depin_core.errors import ConfigError
from gpu_jobs.providers import (
    Bootstrap,
    IonetProvider,
    ManualProvider,
    Offer,
    VastProvider,
    choose_offer,
    is_ours,
    make_provider,
    parse_worker_name,
    worker_name,
)
from gpu_jobs.providers.ionet import vram_of
from tests.support.providers import JOB_ID, TOKEN, make_bootstrap, make_spec

TLS_ENV = ("DEPIN_AGENT_TLS_CERT", "DEPIN_AGENT_TLS_KEY")


def offer(oid: str, usd: float, *, gpus: int = 1, vram: float = 24.0, host: str | None = None, **kw) -> Offer:
    return Offer(
        provider=kw.pop("provider", "vast"),
        offer_id=oid,
        host=host,
        gpu_name="RTX 4090",
        gpu_count=gpus,
        vram_gb=vram,
        usd_per_hour=usd,
        **kw,
    )


def test_choose_offer_takes_the_cheapest_that_fits() -> None:
    offers = [
        offer("a", 0.50, host="h1"),
        offer("b", 0.20, vram=12.0, host="h2"),  # too little memory
        offer("c", 0.30, gpus=1, host="h3"),
        offer("d", 0.10, gpus=1, vram=16.0, host="h4"),
    ]
    assert choose_offer(offers, make_spec(1, 24.0)).offer_id == "c"
    assert choose_offer(offers, make_spec(1, 16.0)).offer_id == "d"
    assert choose_offer(offers, make_spec(2, 16.0)) is None  # nobody has two GPUs


def test_choose_offer_respects_the_price_cap_and_blocked_hosts() -> None:
    offers = [offer("a", 0.50, host="h1"), offer("c", 0.30, host="h3"), offer("e", 0.40, host=None)]
    spec = make_spec(1, 8.0)
    assert choose_offer(offers, spec, max_usd_per_hour=0.29) is None
    assert choose_offer(offers, spec, max_usd_per_hour=0.30).offer_id == "c"
    assert choose_offer(offers, spec, blocked={("vast", "h3")}).offer_id == "e"
    # an offer without a host is blocked by its offer id
    assert choose_offer(offers, spec, blocked={("vast", "h3"), ("vast", "e")}).offer_id == "a"
    # the same host on another provider is not blocked
    assert choose_offer(offers, spec, blocked={("ionet", "h3")}).offer_id == "c"


def test_choose_offer_breaks_ties_by_reliability() -> None:
    offers = [offer("x", 0.3, reliability=0.9), offer("y", 0.3, reliability=0.99)]
    assert choose_offer(offers, make_spec()).offer_id == "y"


def test_choose_offer_skips_machines_rentable_for_less_than_the_deadline() -> None:
    # Vast offers say how long the machine may be rented (`duration`, s); the job needs limits.max_wall_s
    offers = [offer("short", 0.10, max_duration_s=1800.0), offer("long", 0.30, max_duration_s=86400.0)]
    assert choose_offer(offers, make_spec(max_wall_s=3600.0)).offer_id == "long"
    assert choose_offer(offers, make_spec(max_wall_s=600.0)).offer_id == "short"
    assert choose_offer(offers[:1], make_spec(max_wall_s=3600.0)) is None


def test_worker_names_round_trip() -> None:
    name = worker_name(JOB_ID, 2)
    assert name == f"depin-{JOB_ID}-2"
    assert parse_worker_name(name) == (JOB_ID, 2)
    assert is_ours(name) and not is_ours("my-notebook") and not is_ours(None)
    assert parse_worker_name("depin-other") is None
    with pytest.raises(ConfigError, match="job id"):
        worker_name("not-a-job-id", 1)
    with pytest.raises(ConfigError):
        worker_name(JOB_ID, 0)


def test_bootstrap_script_installs_and_serves_without_the_token() -> None:
    b = Bootstrap(token=SecretStr(TOKEN), package="git+https://example.org/depin.git@v1", port=8911)
    for background in (False, True):
        script = b.script(background=background)
        assert TOKEN not in script
        assert "pip install" in script and shlex.quote(b.package) in script
        assert "HOST=${DEPIN_AGENT_HOST:-0.0.0.0}\nPORT=${DEPIN_AGENT_PORT:-8911}\n" in script
        assert 'depin worker serve --host "$HOST" --port "$PORT"' in script
        assert "DEPIN_AGENT_TOKEN" in script  # refuses to start without it
    assert b.script().rstrip().splitlines()[-1].startswith("exec depin worker serve")
    assert b.script(background=True).rstrip().splitlines()[-1].startswith("nohup depin worker serve")
    # tests/e2e/bootstrap runs these scripts for real
    # a fresh certificate and key per node, handed over with the token (secret env), never in the script
    env = b.env()
    assert env.pop("DEPIN_AGENT_TOKEN") == TOKEN and all(k.startswith(TLS_ENV) for k in env)
    assert all(len(v) <= 256 and "\n" not in v for v in env.values())  # Vast's limit; one line each
    assert tls.from_env(TLS_ENV[0], env, "CERTIFICATE") == b.tls_cert
    assert tls.from_env(TLS_ENV[1], env, "PRIVATE KEY") == (b.tls_key.get_secret_value() if b.tls_key else "")
    assert not any(v in b.script() for v in env.values())
    assert "PRIVATE KEY" not in repr(b) and "PRIVATE KEY" not in str(b.model_dump())
    other = Bootstrap(token=SecretStr(TOKEN))
    assert tls.fingerprint(other.tls_cert or "") != tls.fingerprint(b.tls_cert or "")
    assert TOKEN not in repr(b) and TOKEN not in str(b.model_dump())


def test_bootstrap_rejects_a_short_token_and_multiline_values() -> None:
    with pytest.raises(ValidationError, match="16 characters"):
        Bootstrap(token=SecretStr("short"))
    with pytest.raises(ValidationError, match="one non-empty line"):
        Bootstrap(token=SecretStr(TOKEN), package="depin\nrm -rf /")


def test_make_provider_reads_the_environment(tmp_path) -> None:
    env = {"DEPIN_VAST_API_KEY": "vk-secret-1", "DEPIN_IONET_API_KEY": "ik-secret-2"}
    vast = make_provider("vast", env=env)
    ionet = make_provider("ionet", env={**env, "DEPIN_IONET_URL": "http://127.0.0.1:1"})
    manual = make_provider("gpunet", env={}, nodes_file=tmp_path / "w.json")
    try:
        assert isinstance(vast, VastProvider) and isinstance(ionet, IonetProvider)
        assert isinstance(manual, ManualProvider) and manual.name == "gpunet"
        assert "vk-secret-1" not in repr(vast) and "ik-secret-2" not in repr(ionet)
    finally:
        vast.close()
        ionet.close()
        manual.close()
    with pytest.raises(ConfigError, match="DEPIN_VAST_API_KEY"):
        make_provider("vast", env={})
    with pytest.raises(ConfigError, match="DEPIN_IONET_API_KEY"):
        make_provider("ionet", env={})
    with pytest.raises(ConfigError, match="choose one of"):
        make_provider("runpod", env=env)


def test_vram_of_io_net_hardware_names() -> None:
    assert vram_of("H100 80GB") == 80.0
    assert vram_of("A100 40GB") == 40.0
    assert vram_of("NVIDIA RTX 4090") == 24.0
    assert vram_of("L40S") == 48.0 and vram_of("L4") == 24.0
    assert vram_of("mystery accelerator") == 0.0


def test_make_bootstrap_helper_is_valid() -> None:
    assert make_bootstrap().port == 8900
