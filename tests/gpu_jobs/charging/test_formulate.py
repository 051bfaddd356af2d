"""The CQM and its penalty BQM: variables, energies equal to the cost, penalties only when infeasible."""

from __future__ import annotations

import dimod
import pytest

from gpu_jobs.charging import ChargingProblem, EvDemand, check, to_bqm, to_cqm
from gpu_jobs.charging.exact import solve_exact
from gpu_jobs.charging.layout import Layout
from tests.gpu_jobs.charging.helpers import random_problem, site


def _small() -> ChargingProblem:
    return ChargingProblem(
        site=site(chargers=1, charger_kw=11, grid_cap_kw=15, slots=5, tariff=[0.4, 0.1, 0.3, 0.2, 0.5]),
        vehicles=[
            EvDemand(vehicle="a", need_kwh=5, arrive_slot=0, depart_slot=4),  # 2 slots
            EvDemand(vehicle="b", need_kwh=2, arrive_slot=1, depart_slot=5, max_kw=7.4),  # 2 slots
        ],
    )


def test_variables_are_named_per_window_slot() -> None:
    cqm = to_cqm(_small())
    assert set(cqm.variables) == {f"x[a,{t}]" for t in range(4)} | {f"x[b,{t}]" for t in range(1, 5)}
    assert set(cqm.constraints) >= {"need[a]", "need[b]", "chargers[1]"}
    bqm, _ = to_bqm(_small())
    xs = {v for v in bqm.variables if str(v).startswith("x[")}
    assert xs == set(cqm.variables)


@pytest.mark.parametrize("seed", range(3))
def test_energy_of_the_optimum_equals_its_cost(seed: int) -> None:
    p = random_problem(12, seed=seed)
    lay = Layout(p)
    opt = solve_exact(lay).schedule
    assert all(len(opt[v]) == lay.target[i] for i, v in enumerate(lay.ids))  # every target met here
    cost = lay.cost(opt)
    cqm = to_cqm(p)
    sample = {lbl: 0 for lbl in cqm.variables} | {f"x[{v},{t}]": 1 for v, ts in opt.items() for t in ts}
    assert cqm.objective.energy(sample) == pytest.approx(cost)
    assert cqm.check_feasible(sample)
    bqm, decode = to_bqm(p)
    encoded = decode.encode(opt)
    assert bqm.energy(encoded) == pytest.approx(cost, abs=1e-6)
    assert decode(encoded) == opt


def test_penalties_are_positive_when_infeasible() -> None:
    p = _small()
    lay = Layout(p)
    bqm, decode = to_bqm(p)
    cqm = to_cqm(p)
    crowded = {"a": [1, 2], "b": [1, 3]}  # two on one charger in slot 1
    assert check(p, crowded)
    s = decode.encode(crowded)
    assert bqm.energy(s) > lay.cost(crowded) + 0.5
    assert not cqm.check_feasible(
        {lbl: 0 for lbl in cqm.variables} | {f"x[{v},{t}]": 1 for v in crowded for t in crowded[v]}
    )
    short = {"a": [1], "b": [2, 3]}
    assert bqm.energy(decode.encode(short)) > lay.cost(short) + 0.5


def test_bqm_ground_state_is_the_optimum() -> None:
    p = _small()
    lay = Layout(p)
    bqm, decode = to_bqm(p)
    assert bqm.num_variables <= 16
    best = dimod.ExactSolver().sample(bqm).first
    schedule = decode(best.sample)
    assert check(p, schedule) == []
    assert lay.cost(schedule) == pytest.approx(lay.cost(solve_exact(lay).schedule))
    assert best.energy == pytest.approx(lay.cost(schedule))
