"""The one gate every answer passes: ``check`` lists violations, ``repair`` makes a schedule feasible.

Feasible means: only known vehicles, each slot at most once and inside the vehicle's window, no vehicle charging
more slots than its need takes, at most ``chargers`` vehicles and at most the grid cap (kW) per slot. Falling
short of a need is not a violation but must be reported as :class:`Unmet` (``unmet_of``).
"""

from __future__ import annotations

import math

import numpy as np

from gpu_jobs.charging.layout import Layout, Schedule
from gpu_jobs.charging.problem import ChargingProblem, Plan, Unmet

_EPS_KW = 1e-6
_EPS_KWH = 1e-6


def _layout(problem: ChargingProblem | Layout) -> Layout:
    return problem if isinstance(problem, Layout) else Layout(problem)


def check(problem: ChargingProblem | Layout, plan: Plan | Schedule) -> list[str]:
    """Every violation of ``plan`` (a Plan or a bare schedule); empty when feasible and honestly reported."""
    lay = _layout(problem)
    schedule = plan.schedule if isinstance(plan, Plan) else plan
    out: list[str] = []
    for vehicle, slots in schedule.items():
        v = lay.pos.get(vehicle)
        if v is None:
            out.append(f"schedule names vehicle {vehicle!r}, which is not in the problem")
            continue
        if len(set(slots)) != len(slots):
            out.append(f"vehicle {vehicle}: a slot is listed more than once ({sorted(slots)})")
        for t in sorted(set(slots)):
            if not (lay.arrive[v] <= t < lay.depart[v]):
                out.append(
                    f"vehicle {vehicle}: slot {t} is outside its window [{lay.arrive[v]}, {lay.depart[v]})"
                )
        if len(set(slots)) > lay.need_slots[v]:
            out.append(
                f"vehicle {vehicle}: charges {len(set(slots))} slots, more than the {lay.need_slots[v]} "
                "its need takes (wrong energy)"
            )
    n, kw = lay.load(schedule)
    for t in map(int, np.flatnonzero(n > lay.chargers)):
        out.append(f"slot {t}: {n[t]} vehicles charging on {lay.chargers} chargers")
    for t in map(int, np.flatnonzero(kw > lay.cap_kw + _EPS_KW)):
        out.append(f"slot {t}: {kw[t]:.1f} kW drawn, above the grid cap of {lay.cap_kw:.1f} kW")
    if isinstance(plan, Plan):
        out.extend(_check_report(lay, plan))
    return out


def _check_report(lay: Layout, plan: Plan) -> list[str]:
    out: list[str] = []
    energy = energy_of(lay, plan.schedule)
    for vehicle, kwh in plan.energy_kwh.items():
        if vehicle in energy and not math.isclose(kwh, energy[vehicle], rel_tol=1e-9, abs_tol=_EPS_KWH):
            out.append(
                f"vehicle {vehicle}: plan says {kwh} kWh, its schedule gives {energy[vehicle]} (wrong energy)"
            )
    cost = lay.cost(plan.schedule)
    if not math.isclose(plan.cost, cost, rel_tol=1e-9, abs_tol=1e-6):
        out.append(f"plan cost {plan.cost} differs from the cost of its schedule, {cost}")
    reported = {u.vehicle for u in plan.unmet}
    for u in unmet_of(lay, plan.schedule):
        if u.vehicle not in reported:
            out.append(
                f"vehicle {u.vehicle}: gets {u.planned_kwh} of {u.need_kwh} kWh but is not reported as unmet"
            )
    return out


def energy_of(problem: ChargingProblem | Layout, schedule: Schedule) -> dict[str, float]:
    """kWh each vehicle gets from the schedule (whole slots at full power)."""
    lay = _layout(problem)
    return {v: round(float(len(set(schedule.get(v, ()))) * lay.energy[i]), 6) for i, v in enumerate(lay.ids)}


def unmet_of(problem: ChargingProblem | Layout, schedule: Schedule) -> list[Unmet]:
    """Every vehicle the schedule leaves short, with the reason: its window, the grid cap, or the site's capacity."""
    lay = _layout(problem)
    energy = energy_of(lay, schedule)
    out: list[Unmet] = []
    for i, ev in enumerate(lay.problem.vehicles):
        got = energy[ev.vehicle]
        if got >= ev.need_kwh - _EPS_KWH:
            continue
        if lay.kw[i] > lay.cap_kw + _EPS_KW:
            reason = f"grid cap {lay.cap_kw:g} kW is below its charging power {lay.kw[i]:g} kW"
        elif lay.need_slots[i] > lay.depart[i] - lay.arrive[i]:
            reason = "window too short for the need at this power"
        else:
            reason = "site capacity: chargers or grid cap taken in its window"
        out.append(Unmet(vehicle=ev.vehicle, need_kwh=ev.need_kwh, planned_kwh=got, reason=reason))
    return out


class _State:
    """Mutable schedule with per-slot load, for repair moves."""

    def __init__(self, lay: Layout, schedule: Schedule) -> None:
        self.lay = lay
        self.used = np.zeros((len(lay.ids), lay.problem.site.slots), dtype=bool)
        self.n = np.zeros(lay.problem.site.slots, dtype=int)
        self.kw = np.zeros(lay.problem.site.slots, dtype=float)
        for vehicle, slots in schedule.items():
            v = lay.pos.get(vehicle)
            if v is None:
                continue
            for t in slots:
                if lay.arrive[v] <= t < lay.depart[v] and not self.used[v, t]:
                    self.add(v, t)

    def add(self, v: int, t: int) -> None:
        self.used[v, t] = True
        self.n[t] += 1
        self.kw[t] += self.lay.kw[v]

    def remove(self, v: int, t: int) -> None:
        self.used[v, t] = False
        self.n[t] -= 1
        self.kw[t] -= self.lay.kw[v]

    def fits(self, v: int) -> np.ndarray:
        """Slots of v's window where v could be added now (free charger and grid headroom, not already there)."""
        a, d = self.lay.arrive[v], self.lay.depart[v]
        ok = np.zeros(len(self.n), dtype=bool)
        ok[a:d] = (
            (self.n[a:d] < self.lay.chargers)
            & (self.kw[a:d] + self.lay.kw[v] <= self.lay.cap_kw + _EPS_KW)
            & ~self.used[v, a:d]
        )
        return ok

    def schedule(self) -> Schedule:
        return {vid: [int(t) for t in np.flatnonzero(self.used[v])] for v, vid in enumerate(self.lay.ids)}


def _cheapest(lay: Layout, mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return None
    return int(idx[np.argmin(lay.prices[idx])])


def _eject_insert(st: _State, v: int, below: float) -> tuple[int, int, int] | None:
    """Make room for v in a full slot t of its window with price < ``below`` by moving one vehicle u from t to a
    free slot t2 of u's window; the cheapest such (t, u, t2) by total cost, or None."""
    lay = st.lay
    a, d = lay.arrive[v], lay.depart[v]
    best: tuple[float, tuple[int, int, int]] | None = None
    for t in range(a, d):
        if st.used[v, t] or lay.prices[t] >= below:
            continue
        for u in map(int, np.flatnonzero(st.used[:, t])):
            if u == v:
                continue
            if st.n[t] - 1 >= lay.chargers or st.kw[t] - lay.kw[u] + lay.kw[v] > lay.cap_kw + _EPS_KW:
                continue
            t2 = _cheapest(lay, st.fits(u))
            if t2 is None:
                continue
            delta = lay.energy[v] * lay.prices[t] + lay.energy[u] * (lay.prices[t2] - lay.prices[t])
            if best is None or delta < best[0]:
                best = (float(delta), (t, int(u), t2))
    return None if best is None else best[1]


def repair(
    problem: ChargingProblem | Layout, schedule: Schedule, *, improve: bool = True, chains: bool = False
) -> Schedule:
    """A feasible schedule close to ``schedule``: drop what breaks the rules, fill what is missing, then (with
    ``improve``) move slots to cheaper free ones (and, with ``chains``, into full cheaper slots by moving one
    other vehicle on) until no move lowers the cost. The counts per vehicle only ever rise toward the target."""
    lay = _layout(problem)
    st = _State(lay, schedule)
    flex = (lay.depart - lay.arrive) - lay.target
    # 1. No vehicle above its target: drop its dearest slots.
    for v in range(len(lay.ids)):
        on = np.flatnonzero(st.used[v])
        extra = len(on) - int(lay.target[v])
        if extra > 0:
            for t in on[np.argsort(-lay.prices[on], kind="stable")][:extra]:
                st.remove(v, int(t))
    # 2. Overloaded slots: unplug the most flexible vehicles (most spare slots in their window) first.
    for t in range(lay.problem.site.slots):
        while st.n[t] > lay.chargers or st.kw[t] > lay.cap_kw + _EPS_KW:
            on = np.flatnonzero(st.used[:, t])
            grid = st.kw[t] > lay.cap_kw + _EPS_KW
            key = [(-lay.kw[u] if grid else 0.0, -flex[u], lay.ids[u]) for u in on]
            st.remove(int(on[min(range(len(on)), key=key.__getitem__)]), t)
    # 3. Fill what is missing, least flexible vehicles first; one ejection when the window is full.
    for v in sorted(range(len(lay.ids)), key=lambda v: (flex[v], lay.ids[v])):
        while st.used[v].sum() < lay.target[v]:
            t = _cheapest(lay, st.fits(v))
            if t is not None:
                st.add(v, t)
                continue
            move = _eject_insert(st, v, below=math.inf)
            if move is None:
                break
            t, u, t2 = move
            st.remove(u, t)
            st.add(u, t2)
            st.add(v, t)
    if improve:
        _improve(st, chains=chains)
    return st.schedule()


def _improve(st: _State, *, chains: bool) -> None:
    lay = st.lay
    for _ in range(50):  # passes; each strictly lowers the cost, so this ends long before
        moved = False
        order = np.argsort(-lay.var_cost, kind="stable")
        for i in order:
            v, t = int(lay.var_v[i]), int(lay.var_t[i])
            if not st.used[v, t]:
                continue
            st.remove(v, t)
            t2 = _cheapest(lay, st.fits(v))
            if t2 is not None and lay.prices[t2] < lay.prices[t] - 1e-12:
                st.add(v, t2)
                moved = True
                continue
            if chains:
                move = _eject_insert(st, v, below=lay.prices[t] - 1e-12)
                if move is not None:
                    t1, u, t3 = move
                    gain = lay.energy[v] * lay.prices[t] - (
                        lay.energy[v] * lay.prices[t1] + lay.energy[u] * (lay.prices[t3] - lay.prices[t1])
                    )
                    if gain > 1e-9:
                        st.remove(u, t1)
                        st.add(u, t3)
                        st.add(v, t1)
                        moved = True
                        continue
            st.add(v, t)
        if not moved:
            return
