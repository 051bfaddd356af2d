"""The solver chain with Dynex first (``plan(problem, solvers=("dynex", "anneal"))``) against the fake Dynex
service: a Dynex that fails falls through to local annealing; a lying or an infeasible answer is rejected."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from gpu_jobs.charging import ChargingProblem, EvDemand, Site, check, plan
from gpu_jobs.charging.dynex import DynexSettings
from tests.gpu_jobs.charging.helpers import KEY

if TYPE_CHECKING:
    from tests.support.fakes.dynex import FakeDynex


@pytest.fixture
def problem() -> ChargingProblem:
    """Three vehicles, two 11 kW chargers, eight hourly slots from 18:00 (the night is cheaper)."""
    site = Site(
        chargers=2, charger_kw=11.0, slot_minutes=60, slots=8, start=datetime(2026, 3, 2, 18, tzinfo=UTC)
    )
    return ChargingProblem(
        site=site,
        vehicles=[
            EvDemand(vehicle="101", need_kwh=22.0, arrive_slot=0, depart_slot=8),
            EvDemand(vehicle="102", need_kwh=33.0, arrive_slot=1, depart_slot=8),
            EvDemand(vehicle="103", need_kwh=11.0, arrive_slot=0, depart_slot=5, max_kw=7.4),
        ],
    )


def dynex_settings(fake: FakeDynex, **values: Any) -> DynexSettings:
    return DynexSettings(
        sdk_key=KEY,
        grpc_endpoint=fake.endpoint,
        num_reads=32,
        annealing_time=1000,
        **{"max_wall_s": 60, **values},
    )


def test_dynex_answers_a_feasible_plan(
    fake_dynex: Callable[..., FakeDynex], problem: ChargingProblem
) -> None:
    fake = fake_dynex()
    result = plan(problem, solvers=("dynex", "anneal"), dynex=dynex_settings(fake))

    assert result.solver == "dynex"
    assert result.feasible and check(problem, result) == []
    assert [a["outcome"] for a in result.attempts] == ["ok"]
    assert result.cost >= plan(problem, solvers=("exact",)).cost - 1e-9  # no better than the optimum
    assert fake.rpc_names() == ["CreateJob", "SubscribeJob", "FinishJob"]


@pytest.mark.parametrize("failure", ["unavailable", "error", "timeout"])
def test_a_failing_dynex_falls_through_to_anneal(
    fake_dynex: Callable[..., FakeDynex], problem: ChargingProblem, failure: str
) -> None:
    fake = fake_dynex(failure=failure)
    wall = 2.0 if failure == "timeout" else 60.0
    result = plan(problem, solvers=("dynex", "anneal"), dynex=dynex_settings(fake, max_wall_s=wall))

    assert result.solver == "anneal" and result.feasible
    first, second = result.attempts
    assert (first["solver"], first["outcome"], second["outcome"]) == ("dynex", "failed", "ok")
    assert "Dynex" in first["reason"]
    assert KEY not in first["reason"]


def test_a_lying_dynex_is_rejected(fake_dynex: Callable[..., FakeDynex], problem: ChargingProblem) -> None:
    result = plan(problem, solvers=("dynex", "anneal"), dynex=dynex_settings(fake_dynex(failure="lie")))

    assert result.solver == "anneal" and result.feasible
    first = result.attempts[0]
    assert (first["solver"], first["outcome"]) == ("dynex", "rejected")
    assert "misreport" in first["reason"]


def test_an_infeasible_dynex_answer_is_rejected_not_repaired(
    fake_dynex: Callable[..., FakeDynex], problem: ChargingProblem
) -> None:
    result = plan(problem, solvers=("dynex", "anneal"), dynex=dynex_settings(fake_dynex(failure="wrong")))

    first, second = result.attempts
    assert first["solver"] == "dynex" and first["raw_violations"] > 0  # Dynex's own answer was infeasible
    assert first["outcome"] == "rejected" and first["reason"].startswith("infeasible as returned: ")
    assert (second["solver"], second["outcome"], result.solver) == ("anneal", "ok", "anneal")
    assert result.feasible and check(problem, result) == []


def test_a_refused_key_stops_the_chain(
    fake_dynex: Callable[..., FakeDynex], problem: ChargingProblem
) -> None:
    from gpu_jobs.charging.dynex import DynexAuthError

    with pytest.raises(DynexAuthError):
        plan(
            problem, solvers=("dynex", "anneal"), dynex=dynex_settings(fake_dynex(failure="unauthenticated"))
        )
