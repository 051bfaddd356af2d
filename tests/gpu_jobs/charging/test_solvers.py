"""Exact (MILP) against brute force, the greedy baseline, simulated annealing, and the plan() chain."""

from __future__ import annotations

import itertools
import math

import pytest

from depin_core.errors import PermanentError, TransientError
from gpu_jobs.charging import ChargingProblem, EvDemand, check, plan
from gpu_jobs.charging import chain as chain_mod
from gpu_jobs.charging.anneal import AnnealSettings, solve_anneal
from gpu_jobs.charging.exact import solve_exact
from gpu_jobs.charging.greedy import solve_greedy
from gpu_jobs.charging.layout import Layout
from tests.gpu_jobs.charging.helpers import random_problem, site


def _brute_force(lay: Layout) -> tuple[float, float]:
    """(kWh short, cost) of the best schedule by enumeration: least energy short first, then least cost."""
    choices = []
    for v in range(len(lay.ids)):
        window = range(int(lay.arrive[v]), int(lay.depart[v]))
        k = int(lay.target[v])
        choices.append([c for r in range(k + 1) for c in itertools.combinations(window, r)])
    best = (math.inf, math.inf)
    for combo in itertools.product(*choices):
        schedule = {lay.ids[v]: list(c) for v, c in enumerate(combo)}
        if check(lay, schedule):
            continue
        short = sum((lay.target[v] - len(c)) * lay.energy[v] for v, c in enumerate(combo))
        best = min(best, (round(float(short), 9), lay.cost(schedule)))
    return best


def _tiny(seed: int) -> ChargingProblem:
    import numpy as np

    rng = np.random.default_rng(seed)
    s = site(
        chargers=int(rng.integers(1, 3)),
        charger_kw=11,
        grid_cap_kw=float(rng.choice([15.0, 20.0])) if rng.random() < 0.6 else None,
        slots=6,
        tariff=[round(float(x), 3) for x in rng.uniform(0.1, 0.4, 6)],
    )
    vehicles = []
    for i in range(3):
        a = int(rng.integers(0, 4))
        d = int(rng.integers(a + 1, 7))
        vehicles.append(
            EvDemand(
                vehicle=f"v{i}",
                need_kwh=round(float(rng.uniform(0, 9)), 2),
                arrive_slot=a,
                depart_slot=d,
                max_kw=float(rng.choice([7.4, 11.0])),
            )
        )
    return ChargingProblem(site=s, vehicles=vehicles)


@pytest.mark.parametrize("seed", range(12))
def test_milp_optimum_equals_brute_force(seed: int) -> None:
    lay = Layout(_tiny(seed))
    res = solve_exact(lay)
    assert res.optimal
    assert not check(lay, res.schedule)
    short = sum((lay.target[v] - len(res.schedule[i])) * lay.energy[v] for v, i in enumerate(lay.ids))
    want_short, want_cost = _brute_force(lay)
    assert float(short) == pytest.approx(want_short, abs=1e-9)
    assert lay.cost(res.schedule) == pytest.approx(want_cost, abs=1e-9)


def test_greedy_is_feasible_and_charges_on_arrival() -> None:
    p = random_problem(30, seed=3)
    lay = Layout(p)
    g = solve_greedy(lay)
    assert check(lay, g) == []
    # A vehicle alone at the depot charges from its arrival slot onward, whatever the tariff.
    alone = ChargingProblem(
        site=site(), vehicles=[EvDemand(vehicle="1", need_kwh=11, arrive_slot=10, depart_slot=60)]
    )
    assert solve_greedy(Layout(alone)) == {"1": [10, 11, 12, 13]}


def test_anneal_is_feasible_after_repair_and_close_to_the_optimum() -> None:
    p = random_problem(12, seed=5)
    exact = plan(p, ("exact",))
    a1 = plan(p, ("anneal",), seed=1, anneal=AnnealSettings(num_reads=2, num_sweeps=500))
    a2 = plan(p, ("anneal",), seed=1, anneal=AnnealSettings(num_reads=2, num_sweeps=500))
    greedy = plan(p, ("greedy",))
    assert a1.feasible and check(p, a1) == []
    assert a1.schedule == a2.schedule  # seeded: reproducible
    assert exact.cost - 1e-9 <= a1.cost <= 1.10 * exact.cost
    assert len(a1.unmet) == len(exact.unmet) == 0
    assert a1.cost < greedy.cost


def test_raw_anneal_sample_decodes_to_the_window_slots() -> None:
    p = random_problem(6, seed=2)
    lay = Layout(p)
    ans = solve_anneal(lay, AnnealSettings(num_reads=1, num_sweeps=200, seed=3))
    for v, slots in ans.schedule.items():
        ev = p.vehicles[lay.pos[v]]
        assert all(ev.arrive_slot <= t < ev.depart_slot for t in slots)


def test_plan_reports_every_short_vehicle_with_its_reason() -> None:
    s = site(chargers=1, charger_kw=11, slots=8, tariff=[0.2] * 8)
    p = ChargingProblem(
        site=s,
        vehicles=[
            EvDemand(vehicle="short-window", need_kwh=20, arrive_slot=0, depart_slot=2),  # 2 slots = 5.5 kWh
            EvDemand(vehicle="a", need_kwh=11, arrive_slot=2, depart_slot=6),  # needs 4 of 4 slots
            EvDemand(
                vehicle="b", need_kwh=5.5, arrive_slot=2, depart_slot=6
            ),  # competes for the same charger
        ],
    )
    for solver in ("exact", "greedy", "anneal"):
        result = plan(p, (solver,))
        assert result.feasible
        unmet = {u.vehicle: u for u in result.unmet}
        assert unmet["short-window"].reason == "window too short for the need at this power"
        assert unmet["short-window"].planned_kwh == pytest.approx(5.5)
        # One charger, 4 slots, 6 slots of demand: someone falls short (anneal may spread it over both).
        losers = [v for v in ("a", "b") if v in unmet]
        assert losers, solver
        assert all(unmet[v].reason.startswith("site capacity") for v in losers)
        assert result.energy_kwh["a"] + result.energy_kwh["b"] == pytest.approx(11.0)  # every slot used


def test_plan_falls_through_a_transient_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    real = chain_mod._solve

    def flaky(lay: Layout, solver: str, **kw: object) -> object:
        if solver == "exact":
            raise TransientError("HiGHS ran out of time")
        return real(lay, solver, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(chain_mod, "_solve", flaky)
    result = plan(random_problem(8, seed=1), ("exact", "greedy"))
    assert result.solver == "greedy"
    assert [(a["solver"], a["outcome"]) for a in result.attempts] == [("exact", "failed"), ("greedy", "ok")]
    assert "HiGHS ran out of time" in result.attempts[0]["reason"]
    with pytest.raises(TransientError, match="no solver produced a plan"):
        plan(random_problem(8, seed=1), ("exact",))


def test_plan_rejects_bad_solver_names() -> None:
    with pytest.raises(ValueError, match="solvers: unknown solver 'quantum'"):
        plan(random_problem(3), ("quantum",))


def test_plan_without_a_dynex_key_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNEX_SDK_KEY", raising=False)
    with pytest.raises(PermanentError, match="DYNEX_SDK_KEY"):
        plan(random_problem(3), ("dynex", "exact"))


def test_plan_cost_and_energy_are_recomputed_locally() -> None:
    p = random_problem(10, seed=4)
    result = plan(p, ("exact",))
    lay = Layout(p)
    assert result.cost == pytest.approx(lay.cost(result.schedule), abs=1e-6)
    for v, slots in result.schedule.items():
        assert result.energy_kwh[v] == pytest.approx(len(slots) * lay.energy[lay.pos[v]])
    assert check(p, result) == []


def test_a_vehicle_above_the_grid_cap_is_unmet_with_that_reason() -> None:
    p = ChargingProblem(
        site=site(chargers=2, charger_kw=11, grid_cap_kw=8, slots=8, tariff=[0.2] * 8),
        vehicles=[
            EvDemand(vehicle="big", need_kwh=5, arrive_slot=0, depart_slot=8),  # 11 kW never fits under 8 kW
            EvDemand(vehicle="small", need_kwh=3, arrive_slot=0, depart_slot=8, max_kw=7.4),
        ],
    )
    for solver in ("exact", "greedy", "anneal"):
        result = plan(p, (solver,))
        assert [u.vehicle for u in result.unmet] == ["big"], solver
        assert result.unmet[0].reason == "grid cap 8 kW is below its charging power 11 kW"
        assert result.energy_kwh["small"] >= 3


def test_plan_accepts_the_problem_as_json() -> None:
    p = random_problem(5, seed=9)
    assert plan(p.model_dump(mode="json"), ("exact",)).schedule == plan(p, ("exact",)).schedule
