"""Turn one vehicle's activities (park, drive, charge) into its series frame, one vectorised segment at a time.

``VehicleSim`` carries the vehicle's state (odometer, SoC or fuel, temperatures, position) from segment to
segment. Sampling: a sample at every segment start, then every 60 s (aligned to the minute) while parked and
every ``sample_every`` seconds (default 10) while driving or charging, so no gap exceeds 60 s.
``powertrainTractionBatteryCurrentPower`` at a sample is the mean power until the next sample, so the SoC
drop between two samples equals power × Δt / usable capacity exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from connectors.dimo.catalog import signal_catalog
from connectors.dimo.emulator.sim.catalog import ELECTRIC, TIRE_SIGNALS, Place, VehicleParams, soh_at
from connectors.dimo.emulator.sim.physics import (
    AC_EFFICIENCY,
    AC_KNEE_SOC,
    COLD_BELOW_C,
    DC_EFFICIENCY,
    DC_KNEE_SOC,
    charge_duration_s,
    charge_soc,
    cumsum0,
    engine_load_pct,
    ev_power_kw,
    gear_and_rpm,
    harsh_runs,
    ice_fuel_l_per_h,
    relax,
)
from connectors.dimo.emulator.sim.profiles import Route

SPEED = "speed"
ODOMETER = "powertrainTransmissionTravelledDistance"
IGNITION = "isIgnitionOn"
AIR = "exteriorAirTemperature"
V12 = "lowVoltageBatteryCurrentVoltage"
POWERTRAIN_TYPE = "powertrainType"
SOC = "powertrainTractionBatteryStateOfChargeCurrent"
BATTERY_RANGE = "powertrainTractionBatteryRange"
RANGE = "powertrainRange"
BATTERY_POWER = "powertrainTractionBatteryCurrentPower"
BATTERY_TEMP = "powertrainTractionBatteryTemperatureAverage"
IS_CHARGING = "powertrainTractionBatteryChargingIsCharging"
CHARGING_POWER = "powertrainTractionBatteryChargingPower"
SOH = "powertrainTractionBatteryStateOfHealth"
GROSS_CAPACITY = "powertrainTractionBatteryGrossCapacity"
RPM = "powertrainCombustionEngineSpeed"
GEAR = "powertrainTransmissionCurrentGear"
ENGINE_LOAD = "obdEngineLoad"
FUEL = "powertrainFuelSystemRelativeLevel"
COOLANT = "powertrainCombustionEngineECT"

EVENT_SCHEMA: dict[str, Any] = {
    "ts": pl.Datetime("us", "UTC"),
    "name": pl.Utf8,
    "source": pl.Utf8,
    "duration_ns": pl.Int64,
    "metadata": pl.Utf8,
}

# Location columns a series may carry after its signals (``hdop`` only in recordings).
LOCATION_COLUMNS = ("latitude", "longitude", "hdop")

# What carries a vehicle from one segment (or chunk of history) to the next.
CARRIED = (
    "t",
    "place",
    "odometer_km",
    "soc",
    "fuel",
    "batt_temp",
    "coolant",
    "tire_warm",
    "cons",
    "parked_since",
)

TIRE_LEAK = "tire_leak"
WEAK_12V = "weak_12v"
BATTERY_OVERHEAT = "battery_overheat"


def series_column_order(columns: Iterable[str]) -> list[str]:
    """The fleet.py series layout of ``columns``: ``ts``, DIMO signals in catalog order, then location.

    Columns that are none of these are left out.
    """
    present = set(columns)
    order = {n: i for i, n in enumerate(signal_catalog())}
    signals = sorted((c for c in present if c in order), key=order.__getitem__)
    return ["ts", *signals, *[c for c in LOCATION_COLUMNS if c in present]]


@dataclass(frozen=True)
class Fault:
    """An injected fault over ``[start, end)`` (epoch seconds). ``magnitude``: kPa/day, volts or °C."""

    kind: str
    signal: str
    start: int
    end: int
    magnitude: float
    tire: int = 0

    def active(self, t: np.ndarray | int) -> np.ndarray | bool:
        """Whether the fault is active at ``t`` (epoch seconds; an array gives an array)."""
        return (t >= self.start) & (t < self.end)


@dataclass(frozen=True)
class Climate:
    """Air temperature at a vehicle's home: season + daily sinusoid (peak 15:00 local) + weather."""

    mean_c: float
    season_amp_c: float
    daily_amp_c: float
    utc_offset_h: float
    knots_t: np.ndarray
    knots_c: np.ndarray

    def air(self, t: np.ndarray) -> np.ndarray:
        days = t / 86400.0
        season = self.mean_c - self.season_amp_c * np.cos(2 * math.pi * (days % 365.2425 - 20.0) / 365.2425)
        local_h = (t / 3600.0 + self.utc_offset_h) % 24.0
        daily = self.daily_amp_c * np.sin(2 * math.pi * (local_h - 9.0) / 24.0)
        return season + daily + np.interp(t, self.knots_t, self.knots_c)


KNOT_S = 43200.0  # weather fronts every 12 h


def seeded_climate(p: VehicleParams, key: tuple[int, ...], t0: float, t1: float) -> Climate:
    """The vehicle's climate over ``[t0, t1]``; knot ``j`` (at ``j · 12 h``) is drawn from seed ``(*key, j)``.

    Knots sit at absolute times with their own seeds, so any two time ranges agree where they overlap:
    a chunk of history built alone sees the same weather as the whole history would.
    """
    j0, j1 = math.floor(t0 / KNOT_S) - 2, math.ceil(t1 / KNOT_S) + 4
    knots_c = [np.random.default_rng([*key, j]).normal(0.0, 3.0) for j in range(j0, j1 + 1)]
    return Climate(
        mean_c=p.city.mean_c + p.climate_offset_c,
        season_amp_c=p.city.season_amp_c,
        daily_amp_c=p.daily_amp_c,
        utc_offset_h=p.city.utc_offset_h,
        knots_t=np.arange(j0, j1 + 1) * KNOT_S,
        knots_c=np.array(knots_c),
    )


def make_climate(rng: np.random.Generator, p: VehicleParams, t0: float, t1: float) -> Climate:
    """The vehicle's climate over ``[t0, t1]`` with weather fronts every 12 h (±3 °C)."""
    knots = np.arange(t0 - 86400.0, t1 + 2 * 86400.0, 43200.0)
    return Climate(
        mean_c=p.city.mean_c + p.climate_offset_c,
        season_amp_c=p.city.season_amp_c,
        daily_amp_c=p.daily_amp_c,
        utc_offset_h=p.city.utc_offset_h,
        knots_t=knots,
        knots_c=rng.normal(0.0, 3.0, len(knots)),
    )


@dataclass
class VehicleSim:
    """One vehicle's state machine; call ``park``/``drive``/``charge`` in time order, then ``frames``."""

    p: VehicleParams
    climate: Climate
    rng: np.random.Generator
    t: int  # epoch seconds
    place: Place
    odometer_km: float
    soc: float = math.nan
    fuel: float = math.nan
    faults: list[Fault] = field(default_factory=list)
    source: str = ""
    soh_window: tuple[float, float] = (0.0, 1.0)
    chunks: list[dict[str, np.ndarray]] = field(default_factory=list)
    events: list[tuple[int, str, int, str]] = field(default_factory=list)
    parked_since: int | None = None  # when the ignition went off (the 12 V surface charge decays from there)

    def __post_init__(self) -> None:
        self.ev = self.p.powertrain == ELECTRIC
        air0 = float(self.climate.air(np.array([float(self.t)]))[0])
        self.batt_temp = air0
        self.coolant = air0
        self.tire_warm = 0.0
        e = self.p.energy
        if self.ev:
            cold = 1.0 + e.cold * max(0.0, COLD_BELOW_C - air0)
            self.cons = (e.base + 0.2 * e.aero) / 100.0 * cold + e.aux_kw / 35.0
        else:
            self.cons = (e.base + 2.0) / 100.0

    def carried(self) -> dict[str, Any]:
        """The state a later segment starts from (see :meth:`restore`)."""
        return {k: getattr(self, k) for k in CARRIED}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`carried` state (possibly of another ``VehicleSim`` of the same vehicle)."""
        for k in CARRIED:
            setattr(self, k, state[k])

    # ---- helpers -------------------------------------------------------------------------------------
    def _faults(self, kind: str) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind]

    def usable_kwh(self, t: float) -> float:
        return self.p.battery_gross_kwh * float(soh_at(self.p, t, *self.soh_window)) / 100.0

    def _battery_target(self, air: np.ndarray, power_kw: np.ndarray, t: np.ndarray, heat: bool) -> np.ndarray:
        """Battery temperature the pack tends to: ambient + I²R-ish heating, capped by active cooling."""
        target = np.minimum(air + self.p.batt_heat_per_kw * np.abs(power_kw) ** 0.75, np.maximum(air, 38.0))
        if heat:
            for f in self._faults(BATTERY_OVERHEAT):
                target = target + f.magnitude * f.active(t)
        return target

    def _battery_tau(self, t0: int, *, heat: bool) -> float:
        """Pack thermal time constant under load; a failing pack (overheat fault) heats up much faster."""
        if heat and any(f.active(t0) for f in self._faults(BATTERY_OVERHEAT)):
            return 180.0
        return 600.0

    def _tires(self, t: np.ndarray, air: np.ndarray, warm: np.ndarray) -> dict[str, np.ndarray]:
        n = len(t)
        leaks = self._faults(TIRE_LEAK)
        out = {}
        for i, name in enumerate(TIRE_SIGNALS):
            kpa = self.p.tire_base_kpa[i] + 0.9 * (air + warm - 20.0) + self.rng.normal(0.0, 0.3, n)
            for f in leaks:
                if f.tire == i:
                    kpa = kpa - f.magnitude * (t - f.start) / 86400.0 * f.active(t)
            out[name] = kpa
        return out

    def _emit(self, ts: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        cols["ts"] = ts.astype(np.int64)
        self.chunks.append(cols)

    def _range(self, level_pct: np.ndarray, usable: float) -> np.ndarray:
        capacity = usable if self.ev else self.p.tank_l
        return level_pct / 100.0 * capacity / self.cons

    def _ev_cols(
        self,
        ts: np.ndarray,
        soc: np.ndarray,
        power_w: np.ndarray,
        batt: np.ndarray,
        usable: float,
        charging_kw: np.ndarray,
    ) -> dict[str, np.ndarray]:
        n = len(ts)
        rng_km = self._range(soc, usable)
        return {
            SOC: soc,
            BATTERY_RANGE: rng_km,
            RANGE: rng_km,
            BATTERY_POWER: power_w,
            BATTERY_TEMP: batt + self.rng.normal(0.0, 0.1, n),
            IS_CHARGING: (charging_kw > 0).astype(float),
            CHARGING_POWER: charging_kw,
            SOH: np.asarray(soh_at(self.p, ts.astype(float), *self.soh_window)),
            GROSS_CAPACITY: np.full(n, self.p.battery_gross_kwh),
        }

    def _standing_cols(
        self, t: np.ndarray, air: np.ndarray, warm: np.ndarray, v12: np.ndarray | float, *, v12_noise: float
    ) -> dict[str, np.ndarray]:
        """Columns shared by parked and charging samples (ignition off, not moving, at ``self.place``)."""
        n = len(t)
        return {
            SPEED: np.zeros(n),
            ODOMETER: np.full(n, self.odometer_km),
            IGNITION: np.zeros(n),
            AIR: air + self.rng.normal(0.0, 0.15, n),
            V12: v12 + self.rng.normal(0.0, v12_noise, n),
            "latitude": np.full(n, self.place.lat),
            "longitude": np.full(n, self.place.lon),
            **self._tires(t, air, warm),
        }

    # ---- segments -------------------------------------------------------------------------------------
    def park(self, t1: int, *, fuel_to: float | None = None) -> None:
        """Parked (ignition off) until ``t1``; ``fuel_to`` turns it into a refuelling stop."""
        t0 = self.t
        if t1 <= t0:
            return
        ts = np.concatenate(([t0], np.arange((t0 // 60 + 1) * 60, t1, 60, dtype=np.int64)))
        te = np.append(ts, t1).astype(float)
        n = len(ts)
        air = self.climate.air(te)
        warm = relax(te, np.zeros(n + 1), self.tire_warm, 1200.0)
        since = t0 if self.parked_since is None else self.parked_since
        dtp = te - since
        v12 = self.p.v12_rest + 0.3 * np.exp(-dtp / 2700.0) - 0.025 * dtp / 86400.0
        for f in self._faults(WEAK_12V):
            v12 = np.where(f.active(te), f.magnitude + (v12 - f.magnitude) * np.exp(-dtp / 14400.0), v12)
        cols = self._standing_cols(te[:n], air[:n], warm[:n], v12[:n], v12_noise=0.01)
        if self.ev:
            usable = self.usable_kwh(t0)
            soc = self.soc - cumsum0(self.p.vampire_w * np.diff(te) / 3.6e6) / usable * 100.0
            batt = relax(te, air, self.batt_temp, 4 * 3600.0)
            cols |= self._ev_cols(ts, soc[:n], np.full(n, self.p.vampire_w), batt[:n], usable, np.zeros(n))
            self.soc, self.batt_temp = float(soc[-1]), float(batt[-1])
        else:
            coolant = relax(te, air, self.coolant, 5400.0)
            fuel = (
                np.full(n + 1, self.fuel)
                if fuel_to is None
                else np.interp(te, [t0, t1], [self.fuel, fuel_to])
            )
            cols |= self._ice_cols(np.zeros(n), np.zeros(n), np.zeros(n), fuel[:n], coolant[:n])
            self.fuel, self.coolant = float(fuel[-1]), float(coolant[-1])
        self._emit(ts, cols)
        self.tire_warm = float(warm[-1])
        self.t = t1
        self.parked_since = since

    def _ice_cols(
        self, rpm: np.ndarray, gear: np.ndarray, load: np.ndarray, fuel: np.ndarray, coolant: np.ndarray
    ) -> dict[str, np.ndarray]:
        return {
            RPM: rpm,
            GEAR: gear,
            ENGINE_LOAD: load,
            FUEL: fuel,
            COOLANT: coolant + self.rng.normal(0.0, 0.2, len(fuel)),
            RANGE: self._range(fuel, math.nan),
        }

    def drive(
        self, v_kmh: np.ndarray, route: Route, *, sample_every: int = 10, keep: np.ndarray | None = None
    ) -> None:
        """Drive the 1 Hz speed trace ``v_kmh`` along ``route`` (position follows the odometer's share of it).

        ``keep`` (bool per second) drops samples where a recording had no data; physics still runs there.
        """
        t0, n = self.t, len(v_kmh)
        v = np.asarray(v_kmh, dtype=float)
        te = t0 + np.arange(n + 1, dtype=float)
        v_ext = np.append(v, 0.0)
        vm = 0.5 * (v_ext[:-1] + v_ext[1:])
        acc = np.diff(v_ext) / 3.6
        dist = cumsum0(vm / 3600.0)  # km
        air = self.climate.air(te)
        idx = np.arange(0, n, sample_every)
        if keep is not None:
            idx = idx[np.asarray(keep, dtype=bool)[idx]]
        ts = (t0 + idx).astype(np.int64)
        k = len(idx)
        frac = dist / dist[-1] if dist[-1] > 0 else np.zeros(n + 1)
        lat, lon = route.at(frac[idx] * route.length_m)
        warm = relax(te, 6.0 + 0.06 * np.append(0.0, vm), self.tire_warm, 900.0)
        v12 = self.p.v12_charge + self.rng.normal(0.0, 0.03, k)
        cols = {
            SPEED: v[idx],
            ODOMETER: self.odometer_km + dist[idx],
            IGNITION: np.ones(k),
            AIR: air[idx] + self.rng.normal(0.0, 0.15, k),
            "latitude": lat,
            "longitude": lon,
            **self._tires(te[idx], air[idx], warm[idx]),
        }
        bounds = np.append(idx, n)
        if self.ev:
            usable = self.usable_kwh(t0)
            power = ev_power_kw(vm, acc, air[:-1], self.p.energy)
            energy = cumsum0(power) / 3600.0  # kWh
            soc = self.soc - energy / usable * 100.0
            target = self._battery_target(air, np.append(0.0, power), te, heat=True)
            batt = relax(te, target, self.batt_temp, self._battery_tau(t0, heat=True))
            power_w = np.add.reduceat(power, idx) / np.diff(bounds) * 1000.0 if k else np.zeros(0)
            cols |= self._ev_cols(ts, soc[idx], power_w, batt[idx], usable, np.zeros(k))
            trip_energy = float(energy[-1])
            self.soc, self.batt_temp = float(soc[-1]), float(batt[-1])
        else:
            coolant = relax(te, np.full(n + 1, 90.0), self.coolant, 240.0)
            rate = ice_fuel_l_per_h(vm, acc, air[:-1], coolant[:-1], self.p.energy)
            litres = cumsum0(rate) / 3600.0
            fuel = self.fuel - litres / self.p.tank_l * 100.0
            gear, rpm = gear_and_rpm(v[idx], np.maximum(acc[idx], 0.0))
            load = engine_load_pct(rate[idx], rpm, self.p.engine_kw)
            cols |= self._ice_cols(rpm, gear, load, fuel[idx], coolant[idx])
            if k and idx[0] == 0:  # cranking dip on the ignition sample
                weak = any(f.active(t0) for f in self._faults(WEAK_12V))
                v12[0] = self.rng.uniform(8.9, 9.6) if weak else self.rng.uniform(10.4, 10.9)
            trip_energy = float(litres[-1])
            self.fuel, self.coolant = float(fuel[-1]), float(coolant[-1])
        cols[V12] = v12
        trip_km = float(dist[-1])
        if trip_km > 0.5:  # the range estimate learns from recent trips, long ones weigh more
            w = min(0.3, trip_km / 50.0)
            self.cons = (1.0 - w) * self.cons + w * trip_energy / trip_km
        for a, dur, name, peak in harsh_runs(acc):
            meta = {"peak_ms2": round(peak, 2), "speed_kmh": round(float(v[a]), 1)}
            self.events.append((t0 + a, name, dur, json.dumps(meta)))
        self._emit(ts, cols)
        self.odometer_km += trip_km
        self.tire_warm = float(warm[-1])
        self.place = route.end if dist[-1] > 0 else self.place
        self.t = t0 + n
        self.parked_since = None

    def charge(self, *, dc: bool, target_soc: float, charger_kw: float, until: int | None = None) -> None:
        """Charge (AC at home or DC fast) to ``target_soc``, stopping early at ``until``; EVs only."""
        t0 = self.t
        usable = self.usable_kwh(t0)
        knee, eff = (DC_KNEE_SOC, DC_EFFICIENCY) if dc else (AC_KNEE_SOC, AC_EFFICIENCY)
        kw = min(charger_kw, self.p.dc_max_kw) if dc else charger_kw
        dur = (
            math.ceil(
                charge_duration_s(self.soc, min(target_soc, 99.0), kw, usable, knee=knee, efficiency=eff)
                / 10.0
            )
            * 10
        )
        if until is not None:
            dur = min(dur, (until - t0) // 10 * 10)
        if dur <= 0:
            return
        ts = t0 + np.arange(0, dur, 10, dtype=np.int64)
        te = np.append(ts, t0 + dur).astype(float)
        n = len(ts)
        soc = charge_soc(te - t0, self.soc, kw, usable, knee=knee, efficiency=eff)
        battery_kw = np.diff(soc) / 100.0 * usable * 3600.0 / np.diff(te)
        air = self.climate.air(te)
        target = self._battery_target(air, np.append(0.0, battery_kw), te, heat=dc)
        batt = relax(te, target, self.batt_temp, self._battery_tau(t0, heat=dc))
        warm = relax(te, np.zeros(n + 1), self.tire_warm, 1200.0)
        cols = self._standing_cols(te[:n], air[:n], warm[:n], self.p.v12_charge - 0.1, v12_noise=0.02)
        cols |= self._ev_cols(ts, soc[:n], -battery_kw * 1000.0, batt[:n], usable, battery_kw / eff)
        self._emit(ts, cols)
        self.soc, self.batt_temp, self.tire_warm = float(soc[-1]), float(batt[-1]), float(warm[-1])
        self.t = t0 + dur
        self.parked_since = None

    # ---- output ---------------------------------------------------------------------------------------
    def frames(self, t_start: float, t_end: float) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The series frame (fleet.py layout) and events frame, cut to ``[t_start, t_end)``."""
        data = (
            {c: np.concatenate([ch[c] for ch in self.chunks]) for c in self.chunks[0]}
            if self.chunks
            else {"ts": np.zeros(0, dtype=np.int64)}
        )
        keep = (data["ts"] >= t_start) & (data["ts"] < t_end)
        ts = pl.Series("ts", data.pop("ts")[keep] * 1_000_000).cast(pl.Datetime("us", "UTC"))
        series = pl.DataFrame([ts, *(pl.Series(c, x[keep]) for c, x in data.items())])
        series = series.with_columns(pl.lit(self.p.powertrain).alias(POWERTRAIN_TYPE))
        series = series.select(series_column_order(series.columns))
        ev = [e for e in self.events if t_start <= e[0] < t_end]
        events = (
            pl.DataFrame(
                {
                    "ts": [e[0] * 1_000_000 for e in ev],
                    "name": [e[1] for e in ev],
                    "source": [self.source] * len(ev),
                    "duration_ns": [e[2] * 1_000_000_000 for e in ev],
                    "metadata": [e[3] for e in ev],
                },
                schema={**EVENT_SCHEMA, "ts": pl.Int64},
            )
            .with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
            .sort("ts")
        )
        return series, events
