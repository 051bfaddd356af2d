"""The exact optimum: the problem as a MILP solved by HiGHS (``scipy.optimize.milp``), the reference answer.

Variables: ``x[v,t]`` binary for each slot of each window, ``s_v`` integer shortfall in slots. Per vehicle
``sum_t x[v,t] + s_v == target_v``; per slot the charger count and the grid cap. Objective: energy cost plus
``M x kWh short`` with ``M`` far above any price, so the MILP is always solvable and falls short only where the
site cannot serve every vehicle (then it minimises the energy short first, the cost second).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from depin_core.errors import TransientError
from gpu_jobs.charging.layout import Layout, Schedule


@dataclass(frozen=True)
class ExactResult:
    schedule: Schedule
    objective: float
    optimal: bool  # False when HiGHS stopped at the time limit with a feasible, unproven point
    message: str
    mip_gap: float  # HiGHS's relative gap between this point and its proven lower bound (0 when optimal)
    bound: float  # HiGHS's proven lower bound of the objective


def shortfall_price(lay: Layout) -> float:
    """Price per kWh short: 1000 x the dearest tariff, so no saving ever justifies leaving a need unmet."""
    return 1000.0 * max(1.0, float(np.abs(lay.prices).max()) if len(lay.prices) else 1.0)


def solve_exact(lay: Layout, *, time_limit_s: float | None = None, mip_rel_gap: float = 1e-6) -> ExactResult:
    """Solve to optimality (within ``mip_rel_gap``); with ``time_limit_s`` HiGHS may stop earlier with the best
    point found (``optimal=False``, ``mip_gap`` says how far from proven). Raises TransientError when no point
    is found in time. Mixed on-board charger powers under a binding grid cap make the slot rows knapsacks:
    proving optimality can then take minutes from ~50 vehicles on."""
    n, nv = lay.n_vars, len(lay.ids)
    m_price = shortfall_price(lay)
    c = np.concatenate([lay.var_cost, m_price * lay.energy])
    integrality = np.ones(n + nv)
    lb = np.zeros(n + nv)
    ub = np.concatenate([np.ones(n), lay.target.astype(float)])

    # Per vehicle: sum x + s == target.
    a_eq = sparse.csr_matrix(
        (np.ones(n + nv), (np.concatenate([lay.var_v, np.arange(nv)]), np.arange(n + nv))), shape=(nv, n + nv)
    )
    constraints = [LinearConstraint(a_eq, lay.target.astype(float), lay.target.astype(float))]

    slots = lay.problem.site.slots
    count = np.bincount(lay.var_t, minlength=slots)
    kw_sum = np.bincount(lay.var_t, weights=lay.kw[lay.var_v], minlength=slots)
    tight_n = np.flatnonzero(count > lay.chargers)
    tight_kw = np.flatnonzero(kw_sum > lay.cap_kw + 1e-9)
    if len(tight_n):
        remap = -np.ones(slots, dtype=int)
        remap[tight_n] = np.arange(len(tight_n))
        keep = remap[lay.var_t] >= 0
        a = sparse.csr_matrix(
            (np.ones(int(keep.sum())), (remap[lay.var_t][keep], np.flatnonzero(keep))),
            shape=(len(tight_n), n + nv),
        )
        constraints.append(LinearConstraint(a, -np.inf, float(lay.chargers)))
    if len(tight_kw):
        remap = -np.ones(slots, dtype=int)
        remap[tight_kw] = np.arange(len(tight_kw))
        keep = remap[lay.var_t] >= 0
        a = sparse.csr_matrix(
            (lay.kw[lay.var_v][keep], (remap[lay.var_t][keep], np.flatnonzero(keep))),
            shape=(len(tight_kw), n + nv),
        )
        constraints.append(LinearConstraint(a, -np.inf, float(lay.cap_kw)))

    options: dict[str, float | bool] = {"mip_rel_gap": mip_rel_gap, "disp": False}
    if time_limit_s is not None:
        options["time_limit"] = float(time_limit_s)
    res = milp(c, constraints=constraints, integrality=integrality, bounds=Bounds(lb, ub), options=options)
    if res.x is None:
        raise TransientError(
            f"exact solver (HiGHS) found no solution: {res.message} (status {res.status}); "
            "raise time_limit_s or fall back to another solver"
        )
    x = np.round(res.x[:n]).astype(np.int8)
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    bound = float(getattr(res, "mip_dual_bound", res.fun))
    return ExactResult(lay.to_schedule(x), float(res.fun), res.status == 0, str(res.message), gap, bound)
