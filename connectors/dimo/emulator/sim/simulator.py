"""A seeded, physically plausible simulated fleet: daily routines, energy physics, faults and ground truth.

``simulate_fleet`` is deterministic in its arguments. It draws only each vehicle's identity, hidden
parameters, faults and initial state; the rows are simulated lazily, one vehicle-day at a time, when asked
for (``history``: how that stays deterministic). Each vehicle follows a daily routine (``routine``: commutes,
errands, overnight or DC fast charging for EVs, refuelling for combustion cars); its signals come from the
vectorised physics in ``physics`` driven by 1 Hz speed profiles (``profiles``) and are sampled by
``render``. Hidden per-vehicle parameters and injected faults are returned as ground truth.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from connectors.dimo.emulator.fleet import DeveloperLicense, Fleet, Vehicle
from connectors.dimo.emulator.sim.catalog import (
    COMBUSTION,
    ELECTRIC,
    FULL_GRANT,
    NAME_COUNT,
    TIRE_SIGNALS,
    TRUTH_FAULT_SCHEMA,
    VehicleParams,
    checksum_address,
    draw_params,
    make_vehicle,
    mnemonic,
    truth_frame,
    truth_row,
)
from connectors.dimo.emulator.sim.history import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_MAX_STATES,
    HistoryView,
    SimulatedHistory,
    VehicleSpec,
)
from connectors.dimo.emulator.sim.profiles import SpeedPieces
from connectors.dimo.emulator.sim.render import (
    BATTERY_OVERHEAT,
    BATTERY_TEMP,
    TIRE_LEAK,
    V12,
    WEAK_12V,
    Fault,
    VehicleSim,
    make_climate,
)
from depin_core.errors import ConfigError

EV_SHARE = 0.6
FIRST_TOKEN_ID = 10_000
WARMUP_S = 6 * 3600  # simulated before the window so state (temperatures, charge) looks lived-in


def draw_faults(
    rng: np.random.Generator, params: list[VehicleParams], t_start: int, t_end: int
) -> dict[int, list[Fault]]:
    """Faults for ~20–30 % of vehicles: a leaking tyre, a weak 12 V battery or (EVs) an overheating pack."""
    n = len(params)
    out: dict[int, list[Fault]] = {}
    if n == 0:
        return out
    k = min(n, max(1, round(rng.uniform(0.2, 0.3) * n)))
    span = t_end - t_start
    for i in sorted(rng.choice(n, k, replace=False).tolist()):
        p = params[i]
        kinds = [TIRE_LEAK, WEAK_12V] + ([BATTERY_OVERHEAT] if p.powertrain == ELECTRIC else [])
        kind = kinds[int(rng.integers(len(kinds)))]
        dur = int(min(rng.uniform(1.5, 4.0) * 86400.0, 0.6 * span)) // 60 * 60
        start = (t_start + int(rng.uniform(0, span - dur))) // 60 * 60
        if kind == TIRE_LEAK:
            tire = int(rng.integers(4))
            fault = Fault(kind, TIRE_SIGNALS[tire], start, start + dur, float(rng.uniform(2.0, 8.0)), tire)
        elif kind == WEAK_12V:
            fault = Fault(kind, V12, start, start + dur, float(rng.uniform(11.3, 11.7)))
        else:
            fault = Fault(kind, BATTERY_TEMP, start, start + dur, float(rng.uniform(15.0, 25.0)))
        out[p.token_id] = [fault]
    return out


_FAULT_UNITS = {TIRE_LEAK: "kpa_per_day", WEAK_12V: "parked_volts", BATTERY_OVERHEAT: "excess_celsius"}


def faults_frame(faults: dict[int, list[Fault]]) -> pl.DataFrame:
    """``Fleet.truth_faults`` from injected faults."""
    rows = []
    for token_id, fs in sorted(faults.items()):
        for f in fs:
            unit = _FAULT_UNITS[f.kind]
            rows.append(
                {
                    "token_id": token_id,
                    "fault": f.kind,
                    "signal": f.signal,
                    "start": datetime.fromtimestamp(f.start, UTC),
                    "end": datetime.fromtimestamp(f.end, UTC),
                    "detail": json.dumps({unit: round(f.magnitude, 3)}),
                }
            )
    return pl.DataFrame(rows, schema=TRUTH_FAULT_SCHEMA)


def initial_sim(
    p: VehicleParams,
    rng: np.random.Generator,
    *,
    t0: int,
    t_start: float,
    t_end: float,
    faults: list[Fault],
    source: str,
    end_year: int,
) -> VehicleSim:
    """A ``VehicleSim`` at home at ``t0`` with a plausible odometer, charge/fuel level and climate.

    Also fixes ``p.soh_end`` from the SoH decline rate and the history length ``[t_start, t_end)``.
    """
    age = max(0.2, end_year - p.year + 0.5)
    if p.powertrain == ELECTRIC:
        p.soh_end = p.soh_start - p.soh_rate_per_year * (t_end - t_start) / (365.25 * 86400.0)
    return VehicleSim(
        p=p,
        climate=make_climate(rng, p, t0, t_end),
        rng=rng,
        t=t0,
        place=p.home,
        odometer_km=float(age * rng.uniform(8000, 18000)),
        soc=float(rng.uniform(45, 90)) if p.powertrain == ELECTRIC else math.nan,
        fuel=float(rng.uniform(30, 95)) if p.powertrain == COMBUSTION else math.nan,
        faults=faults,
        source=source,
        soh_window=(t_start, t_end),
    )


def idle_cutoffs(
    seed: int, vehicles: int, idle_fraction: float, start: datetime, end: datetime
) -> dict[int, datetime]:
    """{vehicle index: time its data stops} for the idle share of the fleet.

    Drawn from their own seed stream, so a fleet with ``idle_fraction=0`` is the same as before the option.
    """
    n = round(idle_fraction * vehicles)
    if not n:
        return {}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x53]))
    chosen = rng.choice(vehicles, n, replace=False).tolist()
    span = end - start
    return {i: start if k == 0 else start + span * float(rng.uniform(0, 0.5)) for k, i in enumerate(chosen)}


def simulate_fleet(
    license: DeveloperLicense,
    *,
    vehicles: int,
    days: float,
    seed: int,
    end: datetime,
    restricted_fraction: float = 0.0,
    speed_traces: list[np.ndarray] | None = None,
    idle_fraction: float = 0.0,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    max_states: int = DEFAULT_MAX_STATES,
) -> Fleet:
    """Simulate ``vehicles`` cars over ``[end − days, end)``; same arguments, identical fleet.

    ~60 % are EVs. Every vehicle grants privileges (1,3,4,5,6) to ``license.client_id`` except a
    ``restricted_fraction`` share: half of those grant nothing, half only (1,). ``speed_traces`` (1 Hz km/h
    arrays, e.g. CMAP recordings) replace the synthetic speed profiles with recorded stop-to-stop pieces.
    An ``idle_fraction`` share of vehicles lost their device early: their data stops at a random time in the
    first half of the history, and the first of them never reported at all (see :func:`idle_cutoffs`).
    Rows are simulated on demand (``Fleet.history``); ``cache_bytes`` bounds the rows kept in memory,
    ``max_states`` the vehicle-day start states.
    """
    if not 0 <= vehicles <= NAME_COUNT or not 0 < days < math.inf:
        raise ConfigError(
            f"simulate_fleet: vehicles={vehicles}, days={days}; use 0 <= vehicles <= {NAME_COUNT} "
            "(one unique name each) and a finite days > 0"
        )
    for name, share in (("restricted_fraction", restricted_fraction), ("idle_fraction", idle_fraction)):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{name}={share} is outside [0, 1]")
    end = end.astimezone(UTC)
    start = end - timedelta(days=days)
    t_start, t_end = start.timestamp(), end.timestamp()
    pieces = SpeedPieces.from_traces(speed_traces) if speed_traces else None
    if pieces is not None and not pieces.pieces:
        raise ConfigError("speed_traces: no trace contains a stop-to-stop piece of 50 m or more")

    master = np.random.default_rng(np.random.SeedSequence([seed, 0x51]))
    child_seeds = np.random.SeedSequence([seed, 0x52]).spawn(vehicles)
    rngs = [np.random.default_rng(s) for s in child_seeds]
    token_ids = (FIRST_TOKEN_ID + np.cumsum(master.integers(1, 40, vehicles))).tolist()
    kinds = np.where(master.random(vehicles) < EV_SHARE, ELECTRIC, COMBUSTION).tolist()
    params = [draw_params(r, t, k, end) for r, t, k in zip(rngs, token_ids, kinds, strict=True)]
    faults = draw_faults(master, params, int(t_start), int(t_end))
    n_restricted = round(restricted_fraction * vehicles)
    restricted = master.choice(vehicles, n_restricted, replace=False).tolist() if n_restricted else []
    no_grant = set(restricted[: n_restricted // 2])
    owners = [checksum_address(f"owner-{seed}-{i}".encode()) for i in range(vehicles)]
    for i in range(1, vehicles):  # some owners have more than one car
        if master.random() < 0.1:
            owners[i] = owners[int(master.integers(i))]

    idle = idle_cutoffs(seed, vehicles, idle_fraction, start, end)
    names: set[str] = set()
    fleet_vehicles: dict[int, Vehicle] = {}
    specs: dict[int, VehicleSpec] = {}
    for i, p in enumerate(params):
        rng = rngs[i]
        perms = None if i in no_grant else (1,) if i in restricted else FULL_GRANT
        vehicle = make_vehicle(
            p,
            rng=rng,
            owner=owners[i],
            name=mnemonic(master, names),
            license=license,
            history_start=start,
            history_end=end,
            permissions=perms,
        )
        age = max(0.2, end.year - p.year + 0.5)
        if p.powertrain == ELECTRIC:
            p.soh_end = p.soh_start - p.soh_rate_per_year * (t_end - t_start) / (365.25 * 86400.0)
        cutoff = idle.get(i)
        specs[p.token_id] = VehicleSpec(
            index=i,
            params=p,
            faults=tuple(faults.get(p.token_id, [])),
            source=vehicle.source,
            odometer_km=float(age * rng.uniform(8000, 18000)),
            soc=float(rng.uniform(45, 90)) if p.powertrain == ELECTRIC else math.nan,
            fuel=float(rng.uniform(30, 95)) if p.powertrain == COMBUSTION else math.nan,
            stop_s=t_end if cutoff is None else cutoff.timestamp(),
        )
        fleet_vehicles[p.token_id] = vehicle
    history = SimulatedHistory(
        seed=seed,
        specs=specs,
        t0=int(t_start - WARMUP_S) // 60 * 60,
        t_start=t_start,
        t_end=t_end,
        pieces=pieces,
        cache_bytes=cache_bytes,
        max_states=max_states,
    )
    return Fleet(
        license=license,
        vehicles=fleet_vehicles,
        series=HistoryView(history, "series"),
        events=HistoryView(history, "events"),
        start=start,
        end=end,
        truth_vehicles=truth_frame([truth_row(p) for p in params]),
        truth_faults=faults_frame(faults),
        history=history,
    )
