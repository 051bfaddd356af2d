"""``plan()``: try solvers in order, pass every answer through check + repair, return the first usable plan.

- A solver that cannot answer (``TransientError``: Dynex unreachable or timed out, HiGHS out of time) is recorded
  as ``failed`` and the next one runs.
- An answer that fails verification (a sampler misreporting energies), an untrusted answer (``dynex``: it
  comes from machines we do not control) that breaks a constraint as it came, or any answer still infeasible
  after repair is recorded as ``rejected`` and the next one runs.
- A ``PermanentError`` other than a failed verification (a missing Dynex key, a price above the guard) stops the
  chain: retrying elsewhere would hide a setting the user must fix.

Heuristic answers (anneal, dynex) always go through repair with its improvement pass (fill missing slots, move
slots to cheaper free ones); exact and greedy answers are repaired only if check() finds a violation, so the
greedy baseline stays what it is. Cost, energy and unmet vehicles are always recomputed here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from depin_core.errors import PermanentError, TransientError
from gpu_jobs.charging.feasibility import check, energy_of, repair, unmet_of
from gpu_jobs.charging.layout import Layout, Schedule
from gpu_jobs.charging.problem import ChargingProblem, Plan
from gpu_jobs.errors import VerifyError

if TYPE_CHECKING:
    from gpu_jobs.charging.anneal import AnnealSettings
    from gpu_jobs.charging.dynex import DynexSettings

SOLVERS = ("exact", "anneal", "greedy", "dynex")
# HiGHS's limit when plan() gets none: mixed on-board powers under a binding grid cap can keep it proving
# optimality for minutes from ~50 vehicles on; at the limit it answers its best point (attempt optimal=False).
DEFAULT_EXACT_LIMIT_S = 60.0
HEURISTIC = frozenset({"anneal", "dynex"})
# answered on machines we do not control: verified, and rejected rather than repaired when infeasible
UNTRUSTED = frozenset({"dynex"})


def _solve(
    lay: Layout,
    solver: str,
    *,
    seed: int,
    time_limit_s: float | None,
    dynex: DynexSettings | None,
    anneal: AnnealSettings | None,
) -> tuple[Schedule, dict[str, Any]]:
    if solver == "exact":
        from gpu_jobs.charging.exact import solve_exact

        res = solve_exact(lay, time_limit_s=DEFAULT_EXACT_LIMIT_S if time_limit_s is None else time_limit_s)
        return res.schedule, {"optimal": res.optimal, "mip_gap": res.mip_gap, "message": res.message}
    if solver == "greedy":
        from gpu_jobs.charging.greedy import solve_greedy

        return solve_greedy(lay), {}
    if solver == "anneal":
        from dataclasses import replace

        from gpu_jobs.charging.anneal import AnnealSettings, solve_anneal

        ans = solve_anneal(lay, replace(anneal or AnnealSettings(), seed=seed))
        return ans.schedule, {"bqm_variables": ans.num_variables, "bqm_energy": ans.energy}
    if solver == "dynex":
        from gpu_jobs.charging.anneal import best_schedule
        from gpu_jobs.charging.dynex import DynexSettings, sample_bqm, verify_sampleset

        where = dynex if dynex is not None else DynexSettings()
        ans = best_schedule(lay, lambda bqm: sample_bqm(bqm, where), verify=verify_sampleset)
        return ans.schedule, {"bqm_variables": ans.num_variables, "bqm_energy": ans.energy}
    raise ValueError(f"unknown solver {solver!r}; solvers are {', '.join(SOLVERS)}")


def build_plan(
    lay: Layout, solver: str, schedule: Schedule, wall_s: float, attempts: list[dict[str, Any]]
) -> Plan:
    """A Plan of a schedule with cost, energy, unmet vehicles and feasibility recomputed locally."""
    return Plan(
        solver=solver,
        schedule={v: sorted(set(schedule.get(v, []))) for v in lay.ids},
        energy_kwh=energy_of(lay, schedule),
        cost=round(lay.cost(schedule), 6),
        unmet=unmet_of(lay, schedule),
        feasible=not check(lay, schedule),
        wall_s=round(wall_s, 4),
        attempts=attempts,
    )


def plan(
    problem: ChargingProblem | Mapping[str, Any],
    solvers: Sequence[str] = ("exact",),
    *,
    dynex: DynexSettings | None = None,
    seed: int = 0,
    time_limit_s: float | None = None,
    anneal: AnnealSettings | None = None,
) -> Plan:
    """The first feasible plan from ``solvers`` tried in order (see the module docstring). ``time_limit_s``
    bounds the exact solver (default ``DEFAULT_EXACT_LIMIT_S``); ``seed`` makes annealing reproducible."""
    if not isinstance(problem, ChargingProblem):
        problem = ChargingProblem.model_validate(problem)
    if isinstance(solvers, str):
        solvers = (solvers,)
    if not solvers:
        raise ValueError("solvers is empty; give at least one of " + ", ".join(SOLVERS))
    for s in solvers:
        if s not in SOLVERS:
            raise ValueError(f"solvers: unknown solver {s!r}; choose from {', '.join(SOLVERS)}")
    lay = Layout(problem)
    attempts: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for solver in solvers:
        t0 = time.perf_counter()
        record: dict[str, Any] = {"solver": solver}
        try:
            raw, meta = _solve(lay, solver, seed=seed, time_limit_s=time_limit_s, dynex=dynex, anneal=anneal)
        except TransientError as exc:
            attempts.append({**record, "outcome": "failed", "reason": str(exc), "wall_s": _since(t0)})
            continue
        except VerifyError as exc:
            attempts.append({**record, "outcome": "rejected", "reason": str(exc), "wall_s": _since(t0)})
            continue
        violations = check(lay, raw)
        record.update(meta)
        record["raw_cost"] = round(lay.cost(raw), 6)
        record["raw_violations"] = len(violations)
        if violations and solver in UNTRUSTED:
            reason = _violations_text("infeasible as returned", violations)
            attempts.append({**record, "outcome": "rejected", "reason": reason, "wall_s": _since(t0)})
            continue
        schedule = raw
        if violations or solver in HEURISTIC:
            schedule = repair(lay, raw, improve=solver in HEURISTIC)
        left = check(lay, schedule)
        if left:
            reason = _violations_text("still infeasible after repair", left)
            attempts.append({**record, "outcome": "rejected", "reason": reason, "wall_s": _since(t0)})
            continue
        attempts.append({**record, "outcome": "ok", "reason": "", "wall_s": _since(t0)})
        result = build_plan(lay, solver, schedule, time.perf_counter() - t_all, attempts)
        final = check(lay, result)
        if final:  # the plan must agree with its own schedule; a bug here must not ship a wrong plan
            raise PermanentError(f"internal error: the {solver} plan does not check: {final[0]}")
        return result
    outcomes = "; ".join(f"{a['solver']}: {a['outcome']} ({a['reason']})" for a in attempts)
    if any(a["outcome"] == "failed" for a in attempts):
        raise TransientError(
            f"no solver produced a plan: {outcomes}; retry, or add 'exact' or 'greedy' to solvers"
        )
    raise PermanentError(f"no solver produced a feasible plan: {outcomes}")


def _violations_text(what: str, violations: Sequence[str]) -> str:
    """``"<what>: <first violation> (+n more)"``: an attempt's reason."""
    more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
    return f"{what}: {violations[0]}{more}"


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 4)


__all__ = ["HEURISTIC", "SOLVERS", "UNTRUSTED", "build_plan", "plan"]
