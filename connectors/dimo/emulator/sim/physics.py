"""Vectorised vehicle physics shared by the fleet simulator and the CMAP import.

Every function works on whole numpy arrays (one trip or one parked period at a time); nothing loops over
samples. Units: speed km/h, acceleration m/s², temperature °C, power kW unless a name says otherwise.

The energy model is the simulator's hidden ground truth (``Fleet.truth_vehicles``):

- EV traction power ``P = v/100 · (base + aero·((v/100)² − 0.25)) · (1 + cold·max(0, 15 − T)) + aux + inertia``
  where ``base`` is kWh/100 km at 50 km/h and 20 °C without auxiliaries, ``aero`` the extra kWh/100 km per
  (100 km/h)², ``cold`` the fractional penalty per °C below 15 °C, ``aux`` a constant kW while the car is on,
  and ``inertia = m·a·v`` (divided by ``DRIVE_EFFICIENCY`` when accelerating, times the regen efficiency when braking).
- ICE fuel rate uses the same form in L/100 km plus an idle rate (L/h), acceleration fuel and a cold-engine
  enrichment while the coolant is below 60 °C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HARSH_BRAKE_MS2 = 3.5
EXTREME_BRAKE_MS2 = 6.0
HARSH_ACCEL_MS2 = 3.0
COLD_BELOW_C = 15.0
GASOLINE_MECH_KWH_PER_L = 8.9 * 0.28  # energy content × engine efficiency
REGEN_LIMIT_KW = 70.0
DRIVE_EFFICIENCY = 0.92  # battery → wheels when accelerating
AC_KNEE_SOC = 92.0
DC_KNEE_SOC = 80.0
AC_EFFICIENCY = 0.92
DC_EFFICIENCY = 0.96

# Gear g (1-based) is used from GEAR_FROM_KMH[g-1] km/h upwards; engine rpm = v · RPM_PER_KMH[g-1].
GEAR_FROM_KMH = np.array([0.0, 18.0, 32.0, 48.0, 65.0, 85.0])
RPM_PER_KMH = np.array([120.0, 68.0, 46.0, 35.0, 28.0, 23.0])
IDLE_RPM = 750.0


@dataclass(frozen=True)
class EnergyParams:
    """The per-vehicle consumption parameters (see the module docstring for the model)."""

    base: float  # kWh/100 km (EV) or L/100 km (ICE) at 50 km/h, 20 °C
    aero: float  # extra per 100 km per (100 km/h)² relative to 50 km/h
    cold: float  # fractional increase per °C below 15 °C
    mass_kg: float
    aux_kw: float = 0.0  # EV auxiliaries while on
    regen_eff: float = 0.65  # EV share of braking energy recovered
    idle_l_per_h: float = 0.0  # ICE fuel while the engine runs


def cumsum0(x: np.ndarray) -> np.ndarray:
    """Cumulative sum with a leading 0 (length ``len(x) + 1``): integral at each boundary."""
    out = np.empty(len(x) + 1)
    out[0] = 0.0
    np.cumsum(x, out=out[1:])
    return out


def relax(t: np.ndarray, target: np.ndarray, x0: float, tau_s: float) -> np.ndarray:
    """First-order lag ``x' = (target − x)/tau`` evaluated exactly at times ``t`` (seconds).

    ``target[k]`` is the value held over ``(t[k-1], t[k]]`` (``target[0]`` is unused); ``x[0] = x0``.
    Closed form ``x_k = e^{−z_k}(x0 + Σ_j (e^{z_j} − e^{z_{j−1}}) u_j)`` with ``z = (t − t0)/tau``, computed in
    chunks so the exponentials stay finite.
    """
    n = len(t)
    out = np.empty(n)
    if n == 0:
        return out
    out[0] = x0
    z = (np.asarray(t, dtype=float) - float(t[0])) / tau_s
    u = np.asarray(target, dtype=float)
    start = 0
    while start < n - 1:
        stop = max(int(np.searchsorted(z, z[start] + 300.0, side="right")), start + 2)
        zz = z[start:stop] - z[start]
        if zz[1] > 300.0:  # one step longer than 300 tau: fully relaxed
            out[start + 1] = u[start + 1]
            start += 1
            continue
        e = np.exp(zz)
        acc = out[start] + np.cumsum(np.diff(e) * u[start + 1 : stop])
        out[start + 1 : stop] = acc / e[1:]
        start = stop - 1
    return out


def _road_rate(v_kmh: np.ndarray, temp_c: np.ndarray, p: EnergyParams) -> np.ndarray:
    """Steady-speed consumption per hour (kW or L/h): ``v/100 · (base + aero·((v/100)² − 0.25)) · cold``."""
    u = v_kmh / 100.0
    per100 = p.base + p.aero * (u * u - 0.25)
    cold = 1.0 + p.cold * np.maximum(0.0, COLD_BELOW_C - temp_c)
    return u * per100 * cold


def _kinetic_kw(v_kmh: np.ndarray, accel_ms2: np.ndarray, p: EnergyParams) -> np.ndarray:
    """Power (kW) that changes the car's kinetic energy, ``m·a·v`` (negative when braking)."""
    return p.mass_kg * accel_ms2 * (v_kmh / 3.6) / 1000.0


def ev_power_kw(v_kmh: np.ndarray, accel_ms2: np.ndarray, temp_c: np.ndarray, p: EnergyParams) -> np.ndarray:
    """Traction battery power (kW, positive = discharge) while the car is on."""
    kinetic = _kinetic_kw(v_kmh, accel_ms2, p)
    inertial = np.where(
        kinetic > 0.0, kinetic / DRIVE_EFFICIENCY, np.maximum(kinetic * p.regen_eff, -REGEN_LIMIT_KW)
    )
    return _road_rate(v_kmh, temp_c, p) + inertial + p.aux_kw


def ice_fuel_l_per_h(
    v_kmh: np.ndarray, accel_ms2: np.ndarray, temp_c: np.ndarray, coolant_c: np.ndarray, p: EnergyParams
) -> np.ndarray:
    """Fuel rate (L/h) of a running combustion engine."""
    kinetic = np.maximum(0.0, _kinetic_kw(v_kmh, accel_ms2, p))
    enrich = 1.0 + 0.3 * np.clip((60.0 - coolant_c) / 40.0, 0.0, 1.0)
    return (_road_rate(v_kmh, temp_c, p) + kinetic / GASOLINE_MECH_KWH_PER_L + p.idle_l_per_h) * enrich


def gear_and_rpm(v_kmh: np.ndarray, accel_ms2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gear (1–6) and engine speed (rpm) of an automatic gearbox; idle when slow."""
    g = np.searchsorted(GEAR_FROM_KMH, v_kmh, side="right") - 1
    rpm = v_kmh * RPM_PER_KMH[g] * (1.0 + 0.08 * np.clip(accel_ms2, 0.0, 2.0))
    return (g + 1).astype(float), np.maximum(rpm, IDLE_RPM)


def engine_load_pct(fuel_l_per_h: np.ndarray, rpm: np.ndarray, engine_kw: float) -> np.ndarray:
    """Calculated engine load (%): delivered power over the power available at this rpm."""
    delivered = fuel_l_per_h * GASOLINE_MECH_KWH_PER_L + 3.0
    available = engine_kw * np.clip(rpm / 5500.0, 0.1, 1.0)
    return np.clip(100.0 * delivered / available, 8.0, 100.0)


def _charge_curve(
    soc0: float, charger_kw: float, usable_kwh: float, knee: float, efficiency: float
) -> tuple[float, float, float, float]:
    """Parameters of a charging session: full-power rate (%/s), time and SoC at the knee, taper rate (1/s)."""
    r = charger_kw * efficiency / usable_kwh / 36.0
    return r, max(0.0, (knee - soc0) / r), max(soc0, knee), r / (100.0 - knee)


def charge_soc(
    tau_s: np.ndarray, soc0: float, charger_kw: float, usable_kwh: float, *, knee: float, efficiency: float
) -> np.ndarray:
    """SoC (%) ``tau_s`` seconds into a session: constant power to ``knee``, then power ∝ (100 − SoC)."""
    r, t_knee, s_knee, r2 = _charge_curve(soc0, charger_kw, usable_kwh, knee, efficiency)
    linear = soc0 + r * tau_s
    taper = 100.0 - (100.0 - s_knee) * np.exp(-r2 * np.maximum(tau_s - t_knee, 0.0))
    return np.where(tau_s < t_knee, linear, taper)


def charge_duration_s(
    soc0: float, target: float, charger_kw: float, usable_kwh: float, *, knee: float, efficiency: float
) -> float:
    """Seconds from ``soc0`` to ``target`` (< 100) under :func:`charge_soc`."""
    if target <= soc0:
        return 0.0
    r, t_knee, s_knee, r2 = _charge_curve(soc0, charger_kw, usable_kwh, knee, efficiency)
    if target <= knee:
        return (target - soc0) / r
    return t_knee + float(np.log((100.0 - s_knee) / (100.0 - target))) / r2


def harsh_runs(accel_ms2: np.ndarray) -> list[tuple[int, int, str, float]]:
    """Harsh braking/acceleration episodes in a 1 Hz acceleration series: ``(start, seconds, name, peak)``."""
    out: list[tuple[int, int, str, float]] = []
    for mask, kind in ((accel_ms2 <= -HARSH_BRAKE_MS2, "brake"), (accel_ms2 >= HARSH_ACCEL_MS2, "accel")):
        if not mask.any():
            continue
        edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            if kind == "brake":
                peak = float(-accel_ms2[a:b].min())
                name = "behavior.extremeBraking" if peak >= EXTREME_BRAKE_MS2 else "behavior.harshBraking"
            else:
                peak = float(accel_ms2[a:b].max())
                name = "behavior.harshAcceleration"
            out.append((a, b - a, name, peak))
    return out
