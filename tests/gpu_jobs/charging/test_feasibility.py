"""check() catches each kind of violation; repair() makes any schedule feasible without dropping energy."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_jobs.charging import ChargingProblem, EvDemand, check, repair
from gpu_jobs.charging.chain import build_plan
from gpu_jobs.charging.exact import solve_exact
from gpu_jobs.charging.feasibility import unmet_of
from gpu_jobs.charging.layout import Layout
from tests.gpu_jobs.charging.helpers import random_problem, site


def _problem() -> ChargingProblem:
    return ChargingProblem(
        site=site(
            chargers=2,
            charger_kw=11,
            grid_cap_kw=19,
            slots=8,
            tariff=[0.3, 0.3, 0.1, 0.1, 0.2, 0.2, 0.4, 0.4],
        ),
        vehicles=[
            EvDemand(vehicle="a", need_kwh=5.5, arrive_slot=0, depart_slot=8),  # 2 slots
            EvDemand(vehicle="b", need_kwh=5.5, arrive_slot=0, depart_slot=8, max_kw=7.4),  # 1.85 kWh/slot: 3
            EvDemand(vehicle="c", need_kwh=2.75, arrive_slot=4, depart_slot=8),  # 1 slot
        ],
    )


def test_a_feasible_schedule_has_no_violations() -> None:
    assert check(_problem(), {"a": [2, 4], "b": [2, 3, 5], "c": [6]}) == []


def test_too_many_vehicles_on_the_chargers() -> None:
    p = _problem().model_copy(update={"site": site(chargers=2, charger_kw=11, slots=8)})
    assert any("3 vehicles charging on 2 chargers" in v for v in check(p, {"a": [4], "b": [4], "c": [4]}))


def test_grid_cap() -> None:
    out = check(_problem(), {"a": [2], "b": [3], "c": [4, 5]} | {"a": [4], "c": [4]})
    assert any(v.startswith("slot 4: 22.0 kW drawn, above the grid cap of 19.0 kW") for v in out)


def test_outside_the_window_and_unknown_vehicles() -> None:
    out = check(_problem(), {"c": [1], "zz": [0]})
    assert any("vehicle c: slot 1 is outside its window [4, 8)" in v for v in out)
    assert any("'zz', which is not in the problem" in v for v in out)


def test_wrong_energy() -> None:
    p = _problem()
    assert any("more than the 2 its need takes (wrong energy)" in v for v in check(p, {"a": [0, 1, 2]}))
    lay = Layout(p)
    good = build_plan(lay, "exact", {"a": [2, 3], "b": [2, 4, 5], "c": [4]}, 0.0, [])
    assert check(p, good) == []
    lying = good.model_copy(update={"energy_kwh": {**good.energy_kwh, "a": 99.0}})
    assert any("vehicle a: plan says 99.0 kWh" in v for v in check(p, lying))
    cheap = good.model_copy(update={"cost": good.cost - 1})
    assert any("differs from the cost of its schedule" in v for v in check(p, cheap))
    hidden = good.model_copy(update={"schedule": {**good.schedule, "c": []}})
    assert any("vehicle c: gets 0.0 of 2.75 kWh but is not reported as unmet" in v for v in check(p, hidden))


@pytest.mark.parametrize("seed", range(5))
def test_repair_makes_random_schedules_feasible_and_fills_targets(seed: int) -> None:
    p = random_problem(15, seed=seed)
    lay = Layout(p)
    rng = np.random.default_rng(seed)
    broken = {
        v: sorted(rng.choice(96, size=int(rng.integers(0, 30)), replace=False).tolist()) for v in lay.ids
    }
    broken["not-a-vehicle"] = [1, 2]
    assert check(lay, broken)
    fixed = repair(lay, broken)
    assert check(lay, fixed) == []
    exact_short = len(unmet_of(lay, solve_exact(lay).schedule))
    assert len(unmet_of(lay, fixed)) == exact_short  # here the site can serve everyone; repair finds room


def test_repair_leaves_a_feasible_optimum_alone() -> None:
    p = random_problem(20, seed=7)
    lay = Layout(p)
    opt = solve_exact(lay).schedule
    assert repair(lay, opt) == opt
    assert repair(lay, opt, improve=False) == opt


def test_repair_improvement_moves_slots_to_cheaper_free_ones() -> None:
    p = _problem()
    dear = {"a": [6, 7], "b": [0, 1, 6], "c": [5]}
    assert check(p, dear) == []
    better = repair(p, dear)
    lay = Layout(p)
    assert check(p, better) == []
    assert lay.cost(better) < lay.cost(dear)
    assert repair(p, dear, improve=False) == dear
