"""Fleet charging plans: each solver's cost against the exact optimum, its feasibility and time, per depot size.

Depots of ``--sizes`` EVs (default 20, 50, 200) come from the emulator's simulated fleet (``simulate_fleet``, no
server): its EVs' battery size and traction consumption (``truth_vehicles``), a seeded daily distance
(log-normal, median 110 km, 20..400 km) at the catalog consumption x 1.1..1.3 (auxiliaries, weather, charging
losses), a morning state of charge of 60..95 % and hence the evening one; on-board chargers: Nissan Leaf
6.6 kW, Chevrolet Bolt 7.2 kW, the rest take the charger's 11 kW. Arrival 17:00-20:00, departure 06:00-08:00
(UTC), 96 slots of 15 min from 12:00, the default day-night tariff. The site: ``round(0.4 N)`` chargers of
11 kW and a grid cap of 75 % of their total power, so both limits bind at night. ``--instances`` seeded depots
per size.

Solvers: ``exact`` (MILP, HiGHS; the reference; ``--exact-s`` time limit per depot: with mixed on-board powers under
the grid cap HiGHS may stop before proving optimality, and the table says how close its point is to the proven
bound, ``exact_mip_gap_max`` in the JSON), ``greedy`` (charge on arrival), ``anneal`` (dwave-samplers SA
on the penalty BQM, then the repair post-pass), and ``dynex`` when ``DYNEX_SDK_KEY`` is set (else reported
"not run"). Every solver runs through ``plan()``: check + repair, cost recomputed. Per size and solver: cost,
``gap`` = cost / optimum - 1, vehicles left short and kWh short, ``feasible`` (after the gate), ``wall_s``;
for anneal also the raw sample's gap and violations before repair. A control, ``greedy+post``: the greedy
schedule through the same repair improvement pass, without annealing: it shows how much of anneal's result the
post-pass alone would give. ``peak_rss_mb``: this process's peak RSS.

Output: a table, then one JSON object as the last line: ``anneal_gap``, ``anneal_raw_gap``, ``greedy_gap`` and
``greedy_post_gap``
(mean over instances, per size), ``feasible_share`` per solver, ``sizes`` with every figure, ``peak_rss_mb``.
A gap is only a fair comparison at equal energy: ``short_kwh`` says when a solver bought less than the optimum.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import pyarrow as pa

from connectors.dimo.emulator.sim.simulator import simulate_fleet
from connectors.dimo.emulator.state import make_license
from gpu_jobs.charging import ChargingProblem, Plan, Site, check, plan, problem_from_table, repair
from gpu_jobs.charging.chain import build_plan
from gpu_jobs.charging.greedy import solve_greedy
from gpu_jobs.charging.layout import Layout

DAY = datetime(2026, 1, 5, tzinfo=UTC)
ON_BOARD_KW = {("Nissan", "Leaf"): 6.6, ("Chevrolet", "Bolt EV"): 7.2}


def fleet_table(n: int, seed: int) -> pa.Table:
    """``n`` EVs of the emulator's simulated fleet as a depot table (columns of ``problem_from_table``)."""
    fleet = simulate_fleet(make_license(seed), vehicles=math.ceil(n / 0.5) + 20, days=1, seed=seed, end=DAY)
    evs = (
        fleet.truth_vehicles.filter(fleet.truth_vehicles["powertrain"] == "ELECTRIC").sort("token_id").head(n)
    )
    if evs.height < n:
        raise SystemExit(f"the simulated fleet has only {evs.height} EVs, {n} asked")
    rng = np.random.default_rng([seed, n])
    km = np.clip(rng.lognormal(math.log(110), 0.5, n), 20, 400)
    kwh_per_km = evs["consumption_base_kwh_per_100km"].to_numpy() / 100 * rng.uniform(1.1, 1.3, n)
    gross = evs["battery_gross_kwh"].to_numpy()
    used = km * kwh_per_km
    soc_morning = rng.uniform(0.60, 0.95, n)
    soc = np.clip(soc_morning - used / gross, 0.05, 1.0)
    need = np.minimum(used, (soc_morning - soc) * gross)
    arrive = [DAY + timedelta(hours=17, minutes=int(m)) for m in rng.integers(0, 180, n)]
    depart = [DAY + timedelta(days=1, hours=6, minutes=int(m)) for m in rng.integers(0, 120, n)]
    max_kw = [ON_BOARD_KW.get((mk, md)) for mk, md in zip(evs["make"], evs["model"], strict=True)]
    return pa.table(
        {
            "token_id": evs["token_id"].to_list(),
            "soc_pct": (soc * 100).round(1).tolist(),
            "gross_kwh": gross.tolist(),
            "need_kwh": need.round(2).tolist(),
            "arrive": pa.array(arrive, pa.timestamp("us", "UTC")),
            "depart": pa.array(depart, pa.timestamp("us", "UTC")),
            "max_kw": pa.array(max_kw, pa.float64()),
        }
    )


def depot(n: int, seed: int) -> ChargingProblem:
    chargers = max(2, round(0.4 * n))
    site = Site(
        chargers=chargers,
        charger_kw=11.0,
        grid_cap_kw=0.75 * chargers * 11.0,
        start=DAY + timedelta(hours=12),
    )
    return problem_from_table(fleet_table(n, seed), site)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _greedy_post(p: ChargingProblem) -> Plan:
    """The control: charge-on-arrival followed by repair's improvement pass, without any annealing."""
    t0 = time.perf_counter()
    lay = Layout(p)
    raw = solve_greedy(lay)
    attempt = {
        "solver": "greedy+post",
        "outcome": "ok",
        "raw_cost": lay.cost(raw),
        "raw_violations": len(check(lay, raw)),
    }
    return build_plan(lay, "greedy+post", repair(lay, raw, improve=True), time.perf_counter() - t0, [attempt])


def run_solver(p: ChargingProblem, solver: str, seed: int, exact_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    if solver == "greedy+post":
        result = _greedy_post(p)
    else:
        result = plan(p, (solver,), seed=seed, time_limit_s=exact_s if solver == "exact" else None)
    wall = time.perf_counter() - t0
    attempt = result.attempts[-1]
    short = sum(u.need_kwh - u.planned_kwh for u in result.unmet)
    return {
        "cost": result.cost,
        "feasible": result.feasible,
        "unmet": len(result.unmet),
        "short_kwh": round(short, 3),
        "wall_s": round(wall, 3),
        "raw_cost": attempt.get("raw_cost"),
        "raw_violations": attempt.get("raw_violations"),
        "bqm_variables": attempt.get("bqm_variables"),
        "optimal": attempt.get("optimal"),
        "mip_gap": attempt.get("mip_gap"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20,50,200", help="depot sizes (EVs), comma-separated")
    ap.add_argument("--instances", type=int, default=3, help="seeded depots per size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--exact-s", type=float, default=20.0, help="time limit of the exact solver per depot (s)"
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    solvers = ["exact", "greedy", "anneal", "greedy+post"]
    dynex_note = "not run: DYNEX_SDK_KEY is not set"
    if os.environ.get("DYNEX_SDK_KEY", "").strip():
        solvers.append("dynex")
        dynex_note = "run"

    rows: list[dict[str, Any]] = []
    out_sizes: dict[str, Any] = {}
    print(f"{'EVs':>4} {'inst':>4} {'solver':<11} {'cost':>9} {'gap':>7} {'raw gap':>8} {'raw viol':>8} "
          f"{'unmet':>5} {'short kWh':>9} {'feasible':>8} {'wall s':>7}  note")  # fmt: skip
    for n in sizes:
        per: dict[str, list[dict[str, Any]]] = {s: [] for s in solvers}
        for i in range(args.instances):
            seed = args.seed + 1000 * i
            p = depot(n, seed)
            opt: float | None = None
            for solver in solvers:
                try:
                    r = run_solver(p, solver, seed, args.exact_s)
                except Exception as exc:  # a failed solver is a result here (Dynex unreachable, say)
                    r = {"error": f"{type(exc).__name__}: {exc}", "feasible": False}
                if solver == "exact":
                    opt = r["cost"]
                if "cost" in r and opt:
                    r["gap"] = round(r["cost"] / opt - 1, 5)
                    if r.get("raw_cost") is not None and solver in ("anneal", "dynex", "greedy+post"):
                        r["raw_gap"] = round(r["raw_cost"] / opt - 1, 5)
                per[solver].append(r)
                rows.append({"n": n, "instance": i, "solver": solver, **r})
                if "error" in r:
                    print(f"{n:>4} {i:>4} {solver:<11} {r['error'][:80]}")
                    continue
                raw_gap = f"{r['raw_gap']:+.2%}" if "raw_gap" in r else "-"
                raw_v = str(r["raw_violations"]) if solver in ("anneal", "dynex", "greedy+post") else "-"
                note = ""
                if solver == "exact":
                    note = (
                        "proven optimal"
                        if r["optimal"]
                        else f"time limit: within {r['mip_gap']:.3%} of the bound"
                    )
                print(f"{n:>4} {i:>4} {solver:<11} {r['cost']:>9.2f} {r['gap']:>+7.2%} {raw_gap:>8} {raw_v:>8} "
                      f"{r['unmet']:>5} {r['short_kwh']:>9.1f} {r['feasible']!s:>8} {r['wall_s']:>7.2f}  {note}")  # fmt: skip
        out_sizes[str(n)] = {
            s: {
                "mean_gap": _mean([r.get("gap") for r in rs]),
                "mean_raw_gap": _mean([r.get("raw_gap") for r in rs]),
                "feasible_share": _mean([1.0 if r.get("feasible") else 0.0 for r in rs]),
                "mean_wall_s": _mean([r.get("wall_s") for r in rs]),
                "unmet": [r.get("unmet") for r in rs],
                "short_kwh": [r.get("short_kwh") for r in rs],
                "errors": [r["error"] for r in rs if "error" in r],
            }
            for s, rs in per.items()
        }
        out_sizes[str(n)]["exact_proven_optimal"] = [r.get("optimal") for r in per["exact"]]
        out_sizes[str(n)]["exact_mip_gap_max"] = max((r.get("mip_gap") or 0.0) for r in per["exact"])
        out_sizes[str(n)]["peak_rss_mb_so_far"] = round(peak_rss_mb(), 1)
    feasible_share = {
        s: _mean([1.0 if r.get("feasible") else 0.0 for r in rows if r["solver"] == s]) for s in solvers
    }
    summary = {
        "anneal_gap": {k: v["anneal"]["mean_gap"] for k, v in out_sizes.items()},
        "anneal_raw_gap": {k: v["anneal"]["mean_raw_gap"] for k, v in out_sizes.items()},
        "greedy_gap": {k: v["greedy"]["mean_gap"] for k, v in out_sizes.items()},
        "greedy_post_gap": {k: v["greedy+post"]["mean_gap"] for k, v in out_sizes.items()},
        "feasible_share": feasible_share,
        "dynex": dynex_note,
        "exact_mip_gap_max": {k: v["exact_mip_gap_max"] for k, v in out_sizes.items()},
        "instances": args.instances,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "sizes": out_sizes,
    }
    if "dynex" in solvers:
        summary["dynex_gap"] = {k: v["dynex"]["mean_gap"] for k, v in out_sizes.items()}
    print(json.dumps(summary))


def _mean(xs: list[Any]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return round(sum(vals) / len(vals), 5) if vals else None


if __name__ == "__main__":
    main()
