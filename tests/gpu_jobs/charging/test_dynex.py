"""Dynex through its official SDK against a fake ``dynex.sdk.v2.SDK`` service on loopback: the unmodified
``dynex.DynexSampler`` solves what it sends, ``sample_bqm`` maps every failure to the right error, the key never
leaks, and a lying answer is rejected by ``verify_sampleset``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dimod
import numpy as np
import pytest

from depin_core.errors import ConfigError, PermanentError, TransientError
from gpu_jobs.charging.dynex import (
    INSTALL_HINT,
    PRODUCTION_ENDPOINT,
    DynexAuthError,
    DynexPriceError,
    DynexSettings,
    DynexUnavailable,
    sample_bqm,
    verify_sampleset,
)
from gpu_jobs.errors import VerifyError
from tests.gpu_jobs.charging.helpers import KEY
from tests.support.gpu_jobs import wait_for

if TYPE_CHECKING:
    from tests.support.fakes.dynex import FakeDynex


@pytest.fixture
def model() -> dimod.BinaryQuadraticModel:
    """A small frustrated model with mixed labels (its optimum is unique: -5.5)."""
    return dimod.BinaryQuadraticModel(
        {"a": -1.0, "b": 2.0, "c": -3.0, 0: 1.5, ("t", 1): -0.5, "e": 0.25},
        {
            ("a", "b"): 2.0,
            ("b", "c"): -1.0,
            ("c", 0): 2.5,
            ("a", 0): -2.0,
            (("t", 1), "e"): -1.5,
            ("c", "e"): -1.0,
        },
        0.5,
        dimod.BINARY,
    )


def optimum(bqm: dimod.BinaryQuadraticModel) -> float:
    return float(dimod.ExactSolver().sample(bqm).first.energy)


def settings(fake: FakeDynex, **values: Any) -> DynexSettings:
    defaults = {
        "sdk_key": KEY,
        "compute_backend": "cpu",
        "num_reads": 16,
        "annealing_time": 50,
        "max_wall_s": 60,
    }
    return DynexSettings(grpc_endpoint=fake.endpoint, **{**defaults, **values})


# ---- the official client against the fake ----------------------------------------------------------------------
@pytest.mark.parametrize("legacy_wcnf", [False, True], ids=["job_data", "wcnf-chunks"])
def test_official_sampler_solves_to_the_optimum(
    fake_dynex: Callable[..., FakeDynex],
    model: dimod.BinaryQuadraticModel,
    legacy_wcnf: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    import dynex
    from dynex.proto import sdk_pb2

    fake = fake_dynex(legacy_wcnf=legacy_wcnf)
    monkeypatch.chdir(tmp_path)  # the SDK looks for a .env from the working directory up
    monkeypatch.setenv("DYNEX_SDK_KEY", KEY)
    monkeypatch.setenv("DYNEX_GRPC_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("DYNEX_TMP_DIR", str(tmp_path))
    config = dynex.DynexConfig(compute_backend="cpu")
    sampler = dynex.DynexSampler(dynex.BQM(model.copy(), config=config), config=config, show_progress=False)
    answer = sampler.sample(num_reads=8, annealing_time=40)

    assert answer.first.energy == pytest.approx(optimum(model))
    assert model.energy(answer.first.sample) == pytest.approx(optimum(model))
    # What went over the wire: the SDK's RPC sequence, its metadata, its options, the model itself.
    expected = ["CreateJob", "SubscribeJob", "FinishJob"]
    assert fake.rpc_names() == (["CreateJob", *expected] if legacy_wcnf else expected)
    assert {c.metadata["authorization"] for c in fake.calls} == {f"Bearer {KEY}"}
    assert fake.calls[0].metadata["dynex-sdk-version"] == dynex.__version__
    job = fake.last_job()
    assert job.payload == ("wcnf" if legacy_wcnf else "job_data")
    assert (job.opts.num_reads, job.opts.max_steps, job.opts.rank, job.opts.shots) == (8, 40, 1, 1)
    assert job.opts.compute_backend == sdk_pb2.COMPUTE_BACKEND_DYNEX_CPU
    assert job.num_vars == model.num_variables
    index = {v: i for i, v in enumerate(model.variables)}  # the SDK numbers variables in the model's order
    states = dimod.ExactSolver().sample(model)
    for sample, energy in states.data(["sample", "energy"]):
        assert job.qubo.energy({index[v]: x for v, x in sample.items()}) == pytest.approx(energy)
    assert job.state == "finished"


# ---- sample_bqm ---------------------------------------------------------------------------------------------------
def test_sample_bqm_returns_the_optimum_with_the_models_labels(
    fake_dynex: Callable[..., FakeDynex], model: dimod.BinaryQuadraticModel
) -> None:
    fake = fake_dynex()
    answer = sample_bqm(model, settings(fake))

    assert set(answer.variables) == set(model.variables)
    assert answer.first.energy == pytest.approx(optimum(model))
    verify_sampleset(model, answer)
    job = fake.last_job()
    assert (job.opts.num_reads, job.opts.max_steps, job.opts.block_fee) == (16, 50, 0)
    assert fake.rpc_names() == ["CreateJob", "SubscribeJob", "FinishJob"]


def test_sample_bqm_keeps_a_spin_model_spin(fake_dynex: Callable[..., FakeDynex]) -> None:
    spin = dimod.BinaryQuadraticModel(
        {"x": 0.5, "y": -1.0, "z": 0.25}, {("x", "y"): 1.0, ("y", "z"): -2.0}, 1.0, "SPIN"
    )
    answer = sample_bqm(spin, settings(fake_dynex()))

    assert answer.vartype is dimod.SPIN
    assert set(np.unique(answer.record.sample)) <= {-1, 1}
    assert answer.first.energy == pytest.approx(optimum(spin))
    verify_sampleset(spin, answer)


def test_price_guard_is_the_offered_block_fee(
    fake_dynex: Callable[..., FakeDynex], model: dimod.BinaryQuadraticModel
) -> None:
    fake = fake_dynex(price_per_block=3.0)
    answer = sample_bqm(model, settings(fake, max_price=5.0))
    assert answer.first.energy == pytest.approx(optimum(model))
    assert fake.last_job().opts.block_fee == 5_000_000_000  # nanoDNX

    with pytest.raises(DynexPriceError, match="max_price") as refused:
        sample_bqm(model, settings(fake, max_price=2.0))
    assert isinstance(refused.value, PermanentError)
    assert len(fake.jobs) == 1  # the refused one never became a job


@pytest.mark.parametrize(
    ("failure", "error", "rpcs"),
    [
        ("unavailable", DynexUnavailable, ["CreateJob"]),
        ("error", DynexUnavailable, ["CreateJob", "SubscribeJob", "CancelJob"]),
        ("timeout", DynexUnavailable, []),
        ("unauthenticated", DynexAuthError, ["CreateJob"]),
    ],
)
def test_failures_map_to_transient_or_permanent(
    fake_dynex: Callable[..., FakeDynex],
    model: dimod.BinaryQuadraticModel,
    failure: str,
    error: type[Exception],
    rpcs: list[str],
) -> None:
    fake = fake_dynex(failure=failure)
    wall = 2.0 if failure == "timeout" else 60.0
    with pytest.raises(error) as raised:
        sample_bqm(model, settings(fake, max_wall_s=wall))

    expected_class = PermanentError if failure == "unauthenticated" else TransientError
    assert isinstance(raised.value, expected_class)
    assert fake.rpc_names()[: len(rpcs)] == rpcs
    if failure == "timeout":
        assert "max_wall_s=2s" in str(raised.value)
        # The SDK goes on in its thread after our deadline: its job is created, and never finished.
        wait_for("the job to be created", lambda: fake.jobs)
        assert fake.last_job().state != "finished" and "FinishJob" not in fake.rpc_names()


def test_unreachable_endpoint_is_transient(
    fake_dynex: Callable[..., FakeDynex], model: dimod.BinaryQuadraticModel
) -> None:
    fake = fake_dynex()
    fake.stop()  # nothing listens on its port any more
    with pytest.raises(DynexUnavailable):
        sample_bqm(model, settings(fake))


def test_a_wrong_key_is_permanent(
    fake_dynex: Callable[..., FakeDynex], model: dimod.BinaryQuadraticModel
) -> None:
    fake = fake_dynex(key="the-accounts-real-key-000")
    with pytest.raises(DynexAuthError, match="DYNEX_SDK_KEY"):
        sample_bqm(model, settings(fake))
    assert fake.jobs == {}


def test_no_key_or_no_sdk_fails_before_any_call(
    fake_dynex: Callable[..., FakeDynex], model: dimod.BinaryQuadraticModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_dynex()
    with pytest.raises(ConfigError, match="DYNEX_SDK_KEY is not set"):
        sample_bqm(model, settings(fake, sdk_key=None))
    with pytest.raises(ConfigError, match="DYNEX_QPU_MODEL"):
        sample_bqm(model, settings(fake, compute_backend="qpu"))
    monkeypatch.setitem(sys.modules, "dynex", None)  # as if it were not installed
    with pytest.raises(ConfigError) as missing:
        sample_bqm(model, settings(fake))
    assert INSTALL_HINT in str(missing.value)
    assert fake.calls == []


def test_a_wrong_answer_passes_sampling_but_not_the_optimum(
    fake_dynex: Callable[..., FakeDynex], model: dimod.BinaryQuadraticModel
) -> None:
    answer = sample_bqm(model, settings(fake_dynex(failure="wrong")))
    verify_sampleset(model, answer)  # honest about a poor assignment: the chain's check/repair judge it
    assert answer.first.energy > optimum(model) + 1


def test_a_lying_answer_is_rejected(
    fake_dynex: Callable[..., FakeDynex], model: dimod.BinaryQuadraticModel
) -> None:
    answer = sample_bqm(model, settings(fake_dynex(failure="lie")))
    assert answer.first.energy == pytest.approx(optimum(model))  # what it claims
    with pytest.raises(VerifyError, match="misreport"):
        verify_sampleset(model, answer)


def test_an_answer_missing_variables_is_rejected(
    fake_dynex: Callable[..., FakeDynex], model: dimod.BinaryQuadraticModel
) -> None:
    with pytest.raises(VerifyError, match="lacks 1 of the model's 6 variables"):
        sample_bqm(model, settings(fake_dynex(failure="short")))


# ---- the key --------------------------------------------------------------------------------------------------------
def test_the_key_never_reaches_logs_output_or_errors(
    fake_dynex: Callable[..., FakeDynex],
    model: dimod.BinaryQuadraticModel,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level("DEBUG")
    wrong = "dnx-wrong-key-77aa01"
    errors: list[BaseException] = []
    sample_bqm(model, settings(fake_dynex()))
    # A job error, a wrong key, and a careless service that echoes the authorization header in its refusal.
    for fake, key in (
        (fake_dynex(failure="error"), KEY),
        (fake_dynex(), wrong),
        (fake_dynex(echo_auth=True), wrong),
    ):
        with pytest.raises((TransientError, PermanentError)) as raised:
            sample_bqm(model, settings(fake, sdk_key=key))
        errors.append(raised.value)

    out, err = capfd.readouterr()
    # pytest also hooks its handler onto the SDK's non-propagating "dynex" logger; the application's handlers
    # (those of the root logger) only ever get our records.
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("dynex"))
    texts = [ours, out, err, repr(settings(fake, sdk_key=KEY)), settings(fake).model_dump_json()]
    for exc in errors:
        texts += [str(exc), repr(exc)]
        assert exc.__cause__ is None and exc.__context__ is None  # no SDK error (with its text) chained
    for text in texts:
        assert KEY not in text
        assert wrong not in text
    assert "Bearer ***" in str(errors[-1])  # the echoed header, redacted
    assert "dynex sdk: " in ours  # the SDK's records were there, forwarded at DEBUG
    assert not logging.getLogger("dynex").propagate  # and went no further
    assert "[DYNEX-" not in err  # the SDK's own stderr handler was never installed


# ---- verify_sampleset -------------------------------------------------------------------------------------------------
def test_verify_sampleset(model: dimod.BinaryQuadraticModel) -> None:
    honest = dimod.ExactSolver().sample(model)
    verify_sampleset(model, honest)

    labels = list(honest.variables)
    offset_free = dimod.SampleSet.from_samples(
        (honest.record.sample, labels), dimod.BINARY, energy=honest.record.energy - model.offset
    )
    verify_sampleset(model, offset_free)  # a service may leave the constant out

    lied = honest.record.energy.copy()
    lied[5] -= 1.0
    with pytest.raises(VerifyError, match="sample 5 reports energy"):
        verify_sampleset(
            model, dimod.SampleSet.from_samples((honest.record.sample, labels), dimod.BINARY, lied)
        )
    short = dimod.SampleSet.from_samples(([[1, 0]], ["a", "b"]), dimod.BINARY, energy=[0.0])
    with pytest.raises(VerifyError, match="lacks variables"):
        verify_sampleset(model, short)
    spins = dimod.SampleSet.from_samples(
        (honest.record.sample * 2 - 1, labels), dimod.SPIN, honest.record.energy
    )
    with pytest.raises(VerifyError, match="outside BINARY"):
        verify_sampleset(model, spins)
    with pytest.raises(VerifyError, match="no samples"):
        verify_sampleset(model, dimod.SampleSet.from_samples([], dimod.BINARY, energy=[]))


# ---- settings -----------------------------------------------------------------------------------------------------
def test_settings_read_dynexs_own_variables() -> None:
    env = {
        "DYNEX_SDK_KEY": KEY,
        "DYNEX_GRPC_ENDPOINT": "127.0.0.1:9",
        "DYNEX_COMPUTE_BACKEND": "gpu",
        "DYNEX_NUM_READS": "64",
        "DYNEX_MAX_WALL_S": "30",
        "DYNEX_MAX_PRICE": "0.5",
    }
    s = DynexSettings.from_env(env)
    assert s.sdk_key is not None and s.sdk_key.get_secret_value() == KEY
    assert (s.grpc_endpoint, s.compute_backend, s.num_reads, s.max_wall_s, s.max_price) == (
        "127.0.0.1:9",
        "gpu",
        64,
        30.0,
        0.5,
    )
    assert KEY not in repr(s) and KEY not in str(s)
    defaults = DynexSettings.from_env({})
    assert (defaults.sdk_key, defaults.grpc_endpoint, defaults.compute_backend) == (
        None,
        PRODUCTION_ENDPOINT,
        None,
    )
    with pytest.raises(ValueError, match="max_price"):
        DynexSettings.from_env({"DYNEX_MAX_PRICE": "-1"})
