"""A simulated vehicle's daily routine: planned trips per local day and how one day of them is played.

``plan_day`` draws a day's intended trips from that day's own seed, so any day's plan is known without
simulating the days before it (a day looks ahead at the next days' first departures to stop overnight
charging in time). ``run_day`` plays one day's trips through a :class:`~.render.VehicleSim`, deciding on
charging and refuelling from the state the vehicle is in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from connectors.dimo.emulator.sim.catalog import Place, VehicleParams
from connectors.dimo.emulator.sim.physics import COLD_BELOW_C
from connectors.dimo.emulator.sim.profiles import SpeedPieces, make_route, synthetic_profile, trace_profile
from connectors.dimo.emulator.sim.render import VehicleSim

HOME, WORK = -1, -2
DAY_S = 86400
# How far past its day a day's last activity (an overnight charge) may run when no later trip is planned.
MAX_OVERFLOW_S = 20 * 3600


@dataclass(frozen=True)
class PlannedTrip:
    depart: int  # epoch seconds (may be delayed at run time)
    dest: int  # HOME, WORK or an errand index
    day: int


def align(t: float, step: int = 10) -> int:
    return int(math.ceil(t / step) * step)


def local_day(p: VehicleParams, t: float) -> int:
    """The vehicle's local day number (days since 1970-01-01 in its city's time) at epoch second ``t``."""
    return math.floor((t + p.city.utc_offset_h * 3600.0) / DAY_S)


def day_start(p: VehicleParams, day: int) -> int:
    """Epoch second of the vehicle's local midnight starting ``day``."""
    return int(day * DAY_S - p.city.utc_offset_h * 3600.0)


def plan_trips(rng: np.random.Generator, p: VehicleParams, t0: float, t1: float) -> list[PlannedTrip]:
    """The vehicle's intended trips between ``t0`` and ``t1``: 0 or 2–4 per local day, ending at home."""
    out: list[PlannedTrip] = []
    h = 3600.0
    for day in range(local_day(p, t0), local_day(p, t1) + 1):
        midnight = day_start(p, day)
        weekend = (day + 3) % 7 >= 5  # 1970-01-01 was a Thursday
        if rng.random() < 0.07:
            continue
        legs: list[tuple[float, int]] = []
        errand = int(rng.integers(len(p.errands)))
        if p.commuter and not weekend:
            legs += [(rng.normal(7.75, 0.5) * h, WORK), (rng.normal(17.25, 0.6) * h, HOME)]
            if rng.random() < 0.15:
                lunch = rng.normal(12.25, 0.3) * h
                legs += [(lunch, errand), (lunch + rng.uniform(0.5, 1.0) * h, WORK)]
            elif rng.random() < 0.35:
                evening = rng.normal(19.5, 0.7) * h
                legs += [(evening, errand), (evening + rng.uniform(0.3, 1.5) * h, HOME)]
        else:
            if rng.random() < 0.2:
                other = int(rng.integers(len(p.errands)))
                t = rng.uniform(9.5, 14.0) * h
                legs += [
                    (t, errand),
                    (t + rng.uniform(0.4, 1.5) * h, other),
                    (t + rng.uniform(2.0, 3.5) * h, HOME),
                ]
            else:
                for t in sorted(rng.uniform(9.0, 19.0, int(rng.integers(1, 3))) * h):
                    e = int(rng.integers(len(p.errands)))
                    legs += [(t, e), (t + rng.uniform(0.3, 2.5) * h, HOME)]
        legs.sort()
        out += [PlannedTrip(align(midnight + t), dest, day) for t, dest in legs]
    return out


def plan_day(p: VehicleParams, key: tuple[int, ...], day: int) -> list[PlannedTrip]:
    """The trips planned for local ``day``, drawn from seed ``(*key, day)`` alone."""
    t = day_start(p, day) + 1
    return plan_trips(np.random.default_rng([*key, day]), p, t, t)


def _place(p: VehicleParams, dest: int) -> Place:
    return p.home if dest == HOME else p.work if dest == WORK else p.errands[dest]


def _trip_energy_estimate(p: VehicleParams, km: float, air_c: float) -> float:
    """Pessimistic energy (kWh) or fuel (L) a trip of ``km`` may need."""
    e = p.energy
    cold = 1.0 + e.cold * max(0.0, COLD_BELOW_C - air_c)
    return km * ((e.base + 1.2 * e.aero + 4.0) / 100.0 * cold + e.aux_kw / 20.0) * 1.3


def _fast_charge(sim: VehicleSim, rng: np.random.Generator, *, min_target: float) -> None:
    """A DC fast-charging stop, now, to a random target between ``min_target`` and 90 %."""
    sim.charge(
        dc=True, target_soc=float(rng.uniform(min_target, 90)), charger_kw=float(rng.choice([50, 100, 150]))
    )


def _refuel(sim: VehicleSim, rng: np.random.Generator) -> None:
    """A 6–10 minute refuelling stop, now, to a 93–100 % full tank."""
    sim.park(sim.t + int(rng.integers(36, 60)) * 10, fuel_to=float(rng.uniform(93, 100)))


def run_day(
    sim: VehicleSim,
    rng: np.random.Generator,
    trips: list[PlannedTrip],
    later: list[PlannedTrip],
    *,
    loc: int,
    day_end: int,
    t_end: int,
    pieces: SpeedPieces | None = None,
) -> int:
    """Play one day's ``trips`` through ``sim`` from location ``loc``, then park until ``day_end``.

    ``later``: the next days' planned trips (only their departures are used, to end charging in time).
    Activities never start at or after ``t_end``; a trip or charge may run past ``day_end``. Returns the
    location the vehicle ends at (``HOME``, ``WORK`` or an errand index).
    """
    p = sim.p
    plan = trips + later
    for i, trip in enumerate(trips):
        if trip.dest == loc:
            continue
        depart = max(trip.depart, align(sim.t + 120))
        if depart >= t_end:
            break
        horizon = min(t_end, day_end + MAX_OVERFLOW_S)
        nxt = min(next((q.depart for q in plan[i + 1 :] if q.depart > depart), horizon), horizon)
        route = make_route(rng, sim.place, _place(p, trip.dest))
        if pieces is not None:
            v = trace_profile(rng, route.length_m, pieces)
        else:
            v = synthetic_profile(
                rng,
                route.length_m,
                aggression=p.aggression,
                harsh_brake_prob=p.harsh_brake_prob,
                harsh_accel_prob=p.harsh_accel_prob,
            )
        air = float(sim.climate.air(np.array([float(depart)]))[0])
        need = _trip_energy_estimate(p, route.length_m / 1000.0, air)
        sim.park(depart)
        if sim.ev and sim.soc - need / sim.usable_kwh(depart) * 100.0 < 10.0:
            _fast_charge(sim, rng, min_target=80.0)
        elif not sim.ev and sim.fuel - need / p.tank_l * 100.0 < 6.0:
            _refuel(sim, rng)
        sim.drive(v, route)
        loc = trip.dest
        day_over = i + 1 >= len(plan) or plan[i + 1].day != trip.day
        if sim.ev:
            if sim.soc < 20.0 and not (loc == HOME and p.home_charging):
                sim.park(align(sim.t + rng.uniform(60, 600)))
                _fast_charge(sim, rng, min_target=75.0)
            elif (
                day_over
                and loc == HOME
                and p.home_charging
                and (sim.soc < p.plug_threshold or rng.random() < 0.2)
            ):
                if p.offpeak_charging:
                    start = align(day_start(p, trip.day) + 23 * 3600.0)
                else:
                    start = align(sim.t + rng.uniform(120, 2400))
                if start < nxt:
                    sim.park(max(start, sim.t))
                    sim.charge(dc=False, target_soc=p.charge_limit, charger_kw=p.ac_kw, until=nxt - 60)
        elif sim.fuel < 15.0:
            sim.park(align(sim.t + rng.uniform(60, 900)))
            _refuel(sim, rng)
    if sim.t < min(day_end, t_end):
        sim.park(min(day_end, t_end))
    return loc
