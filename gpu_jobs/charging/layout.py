"""The numeric view of a problem that every solver shares: one binary variable per (vehicle, slot in its window).

Variables of vehicle ``v`` are contiguous and ordered by slot: variable ``start[v] + (t - arrive[v])`` is
"vehicle v charges in slot t", labelled ``x[<vehicle>,<t>]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from gpu_jobs.charging.problem import ChargingProblem, ev_kw, slots_needed, target_slots

Schedule = dict[str, list[int]]


def label(vehicle: str, slot: int) -> str:
    return f"x[{vehicle},{slot}]"


@dataclass(frozen=True)
class Layout:
    problem: ChargingProblem

    @cached_property
    def ids(self) -> list[str]:
        return [ev.vehicle for ev in self.problem.vehicles]

    @cached_property
    def pos(self) -> dict[str, int]:
        return {v: i for i, v in enumerate(self.ids)}

    @cached_property
    def prices(self) -> np.ndarray:
        return np.asarray(self.problem.site.prices(), dtype=float)

    @cached_property
    def kw(self) -> np.ndarray:
        return np.array([ev_kw(self.problem.site, ev) for ev in self.problem.vehicles], dtype=float)

    @cached_property
    def energy(self) -> np.ndarray:
        """kWh one slot adds, per vehicle."""
        return self.kw * self.problem.site.slot_hours

    @cached_property
    def need_slots(self) -> np.ndarray:
        return np.array([slots_needed(self.problem.site, ev) for ev in self.problem.vehicles], dtype=int)

    @cached_property
    def target(self) -> np.ndarray:
        return np.array([target_slots(self.problem.site, ev) for ev in self.problem.vehicles], dtype=int)

    @cached_property
    def arrive(self) -> np.ndarray:
        return np.array([ev.arrive_slot for ev in self.problem.vehicles], dtype=int)

    @cached_property
    def depart(self) -> np.ndarray:
        return np.array([ev.depart_slot for ev in self.problem.vehicles], dtype=int)

    @cached_property
    def start(self) -> np.ndarray:
        """Index of each vehicle's first variable (length n_vehicles + 1)."""
        return np.concatenate([[0], np.cumsum(self.depart - self.arrive)]).astype(int)

    @cached_property
    def var_v(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.ids)), self.depart - self.arrive)

    @cached_property
    def var_t(self) -> np.ndarray:
        return np.concatenate(
            [np.arange(a, d) for a, d in zip(self.arrive, self.depart, strict=True)] or [np.zeros(0, int)]
        ).astype(int)

    @cached_property
    def var_cost(self) -> np.ndarray:
        """Cost of each variable: kW x slot hours x price of its slot."""
        return self.energy[self.var_v] * self.prices[self.var_t]

    @cached_property
    def labels(self) -> list[str]:
        return [label(self.ids[v], int(t)) for v, t in zip(self.var_v, self.var_t, strict=True)]

    @property
    def n_vars(self) -> int:
        return int(self.start[-1])

    @property
    def chargers(self) -> int:
        return self.problem.site.chargers

    @property
    def cap_kw(self) -> float:
        return self.problem.site.cap_kw

    def var(self, v: int, t: int) -> int:
        return int(self.start[v] + t - self.arrive[v])

    def to_vector(self, schedule: Schedule) -> np.ndarray:
        """0/1 vector of a schedule (slots outside a window or unknown vehicles are ignored)."""
        x = np.zeros(self.n_vars, dtype=np.int8)
        for vehicle, slots in schedule.items():
            v = self.pos.get(vehicle)
            if v is None:
                continue
            for t in slots:
                if self.arrive[v] <= t < self.depart[v]:
                    x[self.var(v, t)] = 1
        return x

    def to_schedule(self, x: np.ndarray) -> Schedule:
        on = np.flatnonzero(np.asarray(x) > 0.5)
        out: Schedule = {v: [] for v in self.ids}
        for i in on:
            out[self.ids[self.var_v[i]]].append(int(self.var_t[i]))
        return {v: sorted(s) for v, s in out.items()}

    def cost(self, schedule: Schedule) -> float:
        """Cost of a schedule, recomputed from the tariff (slots outside windows are priced too)."""
        total = 0.0
        for vehicle, slots in schedule.items():
            v = self.pos.get(vehicle)
            if v is None:
                continue
            for t in slots:
                if 0 <= t < len(self.prices):
                    total += float(self.energy[v] * self.prices[t])
        return total

    def load(self, schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
        """Vehicles charging and kW drawn, per slot."""
        n = np.zeros(self.problem.site.slots, dtype=int)
        p = np.zeros(self.problem.site.slots, dtype=float)
        for vehicle, slots in schedule.items():
            v = self.pos.get(vehicle)
            if v is None:
                continue
            for t in set(slots):
                if 0 <= t < len(n):
                    n[t] += 1
                    p[t] += self.kw[v]
        return n, p
