"""The problem as a dimod constrained quadratic model and as its penalty binary quadratic model.

CQM: minimise the energy cost subject to, per vehicle, ``sum_t x[v,t] == target_slots(v)`` (its need in whole
slots, capped by its window), per slot ``sum_v x[v,t] <= chargers`` and ``sum_v kW_v x[v,t] <= grid cap``
(constraints that cannot bind are left out). When the site cannot serve every target at once the CQM has no
feasible point; the exact MILP then models the shortfall explicitly (:mod:`.exact`).

BQM (what an annealer samples): the cost plus ``A (sum_t x[v,t] - target_v)^2`` per vehicle plus
``B (sum_v a_v x[v,t] + slack_t - U_t)^2`` per slot whose capacity can bind, where ``slack_t`` is a binary
expansion of ``0..U_t``. Where every vehicle in a slot draws the same kW the charger and grid limits merge into
one count limit ``U_t = min(chargers, floor(cap / kW))``; otherwise the grid limit is in ``0.1 kW`` units. For a
feasible schedule that meets every target, with the slack set to the unused capacity (``Decoder.encode``), the
BQM energy equals the cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dimod
import numpy as np

from gpu_jobs.charging.layout import Layout, Schedule
from gpu_jobs.charging.problem import ChargingProblem

_KW_UNIT = 0.1  # grid constraint resolution when vehicles in a slot draw different power


@dataclass
class _Capacity:
    """One capacity row: ``sum coef_i * y_i <= ub`` over variables ``idx`` (layout indices)."""

    name: str
    slot: int
    idx: np.ndarray
    coef: np.ndarray
    ub: int
    weight: float
    slack: list[tuple[str, int]] = field(default_factory=list)  # (label, coefficient)


def _slack_coefficients(ub: int, unary: bool = False) -> list[int]:
    """Coefficients whose subset sums cover exactly 0..ub: ``ub`` ones (unary), or the binary expansion
    1, 2, 4, ... with a last coefficient that tops up to ub."""
    if unary:
        return [1] * ub
    out: list[int] = []
    total = 0
    c = 1
    while total + c <= ub:
        out.append(c)
        total += c
        c *= 2
    if total < ub:
        out.append(ub - total)
    return out


def _capacity_rows(
    lay: Layout, penalty: float, residual: tuple[np.ndarray, np.ndarray] | None, unary: bool
) -> list[_Capacity]:
    """The capacity constraints that can bind, given per-slot residual (count, kW) capacity if any."""
    slots = lay.problem.site.slots
    rows: list[_Capacity] = []
    order = np.argsort(lay.var_t, kind="stable")
    bounds = np.searchsorted(lay.var_t[order], np.arange(slots + 1))
    for t in range(slots):
        idx = order[bounds[t] : bounds[t + 1]]
        if len(idx) == 0:
            continue
        count_cap = lay.chargers if residual is None else int(residual[0][t])
        kw_cap = lay.cap_kw if residual is None else float(residual[1][t])
        kws = lay.kw[lay.var_v[idx]]
        if np.allclose(kws, kws[0]):
            ub = max(0, min(count_cap, math.floor(kw_cap / kws[0] + 1e-9)))
            if len(idx) > ub:
                rows.append(_Capacity("slot", t, idx, np.ones(len(idx), dtype=int), ub, penalty))
            continue
        if len(idx) > count_cap:
            rows.append(
                _Capacity("chargers", t, idx, np.ones(len(idx), dtype=int), max(0, count_cap), penalty)
            )
        if np.sort(kws)[::-1][: max(0, count_cap)].sum() > kw_cap + 1e-9:  # else the count row implies it
            coef = np.maximum(1, np.round(kws / _KW_UNIT)).astype(int)
            ub = max(0, math.floor(kw_cap / _KW_UNIT + 1e-9))
            rows.append(_Capacity("grid", t, idx, coef, ub, penalty / float(np.median(coef)) ** 2))
    for r in rows:
        r.slack = [
            (f"slack[{r.name},{r.slot},{j}]", c)
            for j, c in enumerate(_slack_coefficients(r.ub, unary and r.name != "grid"))
        ]
    return rows


class Decoder:
    """Turns a BQM sample into a schedule (``decoder(sample)``), and a schedule into a sample (``encode``)."""

    def __init__(self, lay: Layout, rows: list[_Capacity]) -> None:
        self.layout = lay
        self.rows = rows

    def __call__(self, sample: Mapping[Any, Any]) -> Schedule:
        x = np.array([sample.get(lbl, 0) for lbl in self.layout.labels], dtype=np.int8)
        return self.layout.to_schedule(x)

    def encode(self, schedule: Schedule) -> dict[str, int]:
        """The sample of a schedule, with each slack set to the capacity the schedule leaves unused."""
        x = self.layout.to_vector(schedule)
        sample = {lbl: int(b) for lbl, b in zip(self.layout.labels, x, strict=True)}
        for r in self.rows:
            free = r.ub - int((r.coef * x[r.idx]).sum())
            for lbl, c in reversed(r.slack):
                bit = int(0 <= c <= free)
                sample[lbl] = bit
                free -= c * bit
        return sample


def default_penalty(lay: Layout) -> float:
    """Twice the dearest variable's cost: above what dropping or squeezing in one slot can ever save."""
    cmax = float(np.abs(lay.var_cost).max()) if lay.n_vars else 1.0
    return 2.0 * (cmax if cmax > 0 else 1.0)


def bqm_for(
    lay: Layout,
    *,
    penalty: float | None = None,
    residual: tuple[np.ndarray, np.ndarray] | None = None,
    unary_slack: bool = False,
) -> tuple[dimod.BinaryQuadraticModel, Decoder]:
    """The penalty BQM of ``lay`` (see the module docstring); ``residual`` overrides per-slot capacities."""
    a = default_penalty(lay) if penalty is None else penalty
    rows = _capacity_rows(lay, a, residual, unary_slack)
    n = lay.n_vars
    labels = list(lay.labels)
    linear = [lay.var_cost.astype(float)]
    qi: list[np.ndarray] = []
    qj: list[np.ndarray] = []
    qb: list[np.ndarray] = []
    offset = 0.0

    # Vehicle targets: A (sum x - k)^2 = A [sum x (1 - 2k) + 2 sum_{i<j} x_i x_j + k^2].
    lin = np.zeros(n)
    for v in range(len(lay.ids)):
        s, e, k = int(lay.start[v]), int(lay.start[v + 1]), int(lay.target[v])
        lin[s:e] += a * (1 - 2 * k)
        offset += a * k * k
        iu, ju = np.triu_indices(e - s, 1)
        qi.append(iu + s)
        qj.append(ju + s)
        qb.append(np.full(len(iu), 2 * a))
    linear[0] = linear[0] + lin

    # Capacity rows: B (sum c_i y_i - U)^2 with the slack bits appended as new variables.
    for r in rows:
        first = n + sum(len(x) for x in linear[1:])
        sl = np.array([c for _, c in r.slack], dtype=float)
        idx = np.concatenate([r.idx, first + np.arange(len(sl))]).astype(int)
        coef = np.concatenate([r.coef.astype(float), sl])
        labels.extend(lbl for lbl, _ in r.slack)
        linear.append(np.zeros(len(sl)))
        lin_all = r.weight * (coef**2 - 2 * r.ub * coef)
        offset += r.weight * r.ub * r.ub
        for pos, b in zip(idx, lin_all, strict=True):
            if pos < n:
                linear[0][pos] += b
            else:
                linear[-1][pos - first] += b
        iu, ju = np.triu_indices(len(idx), 1)
        qi.append(idx[iu])
        qj.append(idx[ju])
        qb.append(2 * r.weight * coef[iu] * coef[ju])

    lin_vec = np.concatenate(linear)
    quad = (
        (np.concatenate(qi), np.concatenate(qj), np.concatenate(qb))
        if qi
        else (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    )
    bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(
        lin_vec, quad, offset, dimod.BINARY, variable_order=labels
    )
    return bqm, Decoder(lay, rows)


def to_bqm(
    problem: ChargingProblem, *, penalty: float | None = None
) -> tuple[dimod.BinaryQuadraticModel, Decoder]:
    """The penalty BQM and its decoder (``decoder(sample) -> schedule``; ``decoder.encode(schedule)``)."""
    return bqm_for(Layout(problem), penalty=penalty)


def to_cqm(problem: ChargingProblem) -> dimod.ConstrainedQuadraticModel:
    """The constrained model: cost objective, one target equality per vehicle, binding capacity rows per slot."""
    lay = Layout(problem)
    cqm = dimod.ConstrainedQuadraticModel()
    obj = dimod.BinaryQuadraticModel.from_numpy_vectors(
        lay.var_cost.astype(float),
        (np.zeros(0, int), np.zeros(0, int), np.zeros(0)),
        0.0,
        dimod.BINARY,
        variable_order=lay.labels,
    )
    cqm.set_objective(obj)
    labels = lay.labels
    for v, vehicle in enumerate(lay.ids):
        s, e = int(lay.start[v]), int(lay.start[v + 1])
        cqm.add_constraint_from_iterable(
            [(labels[i], 1) for i in range(s, e)], "==", rhs=int(lay.target[v]), label=f"need[{vehicle}]"
        )
    order = np.argsort(lay.var_t, kind="stable")
    bounds = np.searchsorted(lay.var_t[order], np.arange(problem.site.slots + 1))
    for t in range(problem.site.slots):
        idx = order[bounds[t] : bounds[t + 1]]
        if len(idx) > lay.chargers:
            cqm.add_constraint_from_iterable(
                [(labels[i], 1) for i in idx], "<=", rhs=lay.chargers, label=f"chargers[{t}]"
            )
        kws = lay.kw[lay.var_v[idx]]
        if kws.sum() > lay.cap_kw + 1e-9:
            cqm.add_constraint_from_iterable(
                [(labels[i], float(k)) for i, k in zip(idx, kws, strict=True)],
                "<=",
                rhs=float(lay.cap_kw),
                label=f"grid[{t}]",
            )
    return cqm
