"""What the simulated vehicles are: models, cities, per-vehicle hidden parameters and their identity metadata."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
from eth_utils import to_checksum_address

from connectors.dimo.emulator.fleet import SOURCES, DeveloperLicense, Grant, Vehicle
from connectors.dimo.emulator.sim.physics import EnergyParams
from depin_core.errors import ConfigError

ELECTRIC = "ELECTRIC"
COMBUSTION = "COMBUSTION"
FULL_GRANT = (1, 3, 4, 5, 6)
TIRE_SIGNALS = (
    "chassisAxleRow1WheelLeftTirePressure",
    "chassisAxleRow1WheelRightTirePressure",
    "chassisAxleRow2WheelLeftTirePressure",
    "chassisAxleRow2WheelRightTirePressure",
)


@dataclass(frozen=True)
class EvModel:
    make: str
    model: str
    years: tuple[int, int]
    gross_kwh: tuple[float, ...]
    base: float  # kWh/100 km at 50 km/h, 20 °C (traction only)
    aero: float
    mass_kg: float
    dc_max_kw: float


@dataclass(frozen=True)
class IceModel:
    make: str
    model: str
    years: tuple[int, int]
    base: float  # L/100 km at 50 km/h, 20 °C
    aero: float
    mass_kg: float
    tank_l: float
    engine_kw: float


EV_MODELS = (
    EvModel("Tesla", "Model 3", (2018, 2025), (60.0, 82.0), 10.8, 6.0, 1850, 150),
    EvModel("Tesla", "Model Y", (2020, 2025), (75.0, 82.0), 12.2, 7.0, 2000, 150),
    EvModel("Chevrolet", "Bolt EV", (2017, 2023), (66.0,), 12.3, 7.5, 1620, 55),
    EvModel("Nissan", "Leaf", (2015, 2024), (40.0, 62.0), 12.8, 7.8, 1600, 50),
    EvModel("Hyundai", "Ioniq 5", (2022, 2025), (58.0, 77.4), 13.6, 7.2, 2050, 150),
    EvModel("Volkswagen", "ID.4", (2021, 2025), (62.0, 82.0), 14.5, 8.0, 2150, 125),
    EvModel("Ford", "Mustang Mach-E", (2021, 2025), (75.7, 98.8), 15.0, 7.9, 2200, 150),
    EvModel("Kia", "EV6", (2022, 2025), (58.0, 77.4), 13.4, 6.8, 2000, 150),
)
ICE_MODELS = (
    IceModel("Toyota", "Corolla", (2014, 2025), 5.6, 2.6, 1330, 50, 125),
    IceModel("Honda", "Civic", (2014, 2025), 5.8, 2.6, 1300, 47, 118),
    IceModel("Toyota", "Camry", (2015, 2025), 6.3, 2.8, 1550, 60, 150),
    IceModel("Toyota", "RAV4", (2016, 2025), 7.0, 3.4, 1620, 55, 150),
    IceModel("Honda", "CR-V", (2015, 2025), 7.1, 3.3, 1560, 53, 140),
    IceModel("Ford", "F-150", (2015, 2025), 10.5, 4.8, 2050, 87, 250),
    IceModel("Chevrolet", "Silverado 1500", (2015, 2025), 11.2, 5.0, 2200, 91, 265),
    IceModel("Jeep", "Wrangler", (2016, 2025), 10.8, 5.5, 1900, 81, 210),
    IceModel("Subaru", "Outback", (2015, 2025), 7.4, 3.2, 1650, 70, 136),
)
MANUFACTURER_TOKEN_IDS = {
    m: 100 + i for i, m in enumerate(sorted({x.make for x in EV_MODELS} | {x.make for x in ICE_MODELS}))
}


@dataclass(frozen=True)
class City:
    name: str
    lat: float
    lon: float
    utc_offset_h: float
    mean_c: float  # annual mean air temperature
    season_amp_c: float  # half the summer–winter difference


CITIES = (
    City("San Francisco", 37.77, -122.42, -8, 14.5, 3.5),
    City("Los Angeles", 34.05, -118.24, -8, 18.5, 4.5),
    City("Seattle", 47.61, -122.33, -8, 11.5, 7.0),
    City("Phoenix", 33.45, -112.07, -7, 24.0, 11.0),
    City("Denver", 39.74, -104.99, -7, 10.5, 11.5),
    City("Austin", 30.27, -97.74, -6, 21.0, 9.0),
    City("Chicago", 41.88, -87.63, -6, 10.5, 14.0),
    City("Minneapolis", 44.98, -93.27, -6, 8.0, 16.0),
    City("New York", 40.71, -74.01, -5, 13.0, 12.0),
    City("Boston", 42.36, -71.06, -5, 11.0, 12.5),
    City("Miami", 25.76, -80.19, -5, 25.5, 3.5),
    City("Berlin", 52.52, 13.40, 1, 10.0, 9.5),
)
CHICAGO = CITIES[6]

_ADVERBS = (
    "plainly",
    "quickly",
    "gently",
    "boldly",
    "calmly",
    "kindly",
    "neatly",
    "openly",
    "proudly",
    "quietly",
    "rarely",
    "simply",
    "softly",
    "swiftly",
    "warmly",
    "wisely",
    "barely",
    "deeply",
    "fairly",
    "freely",
    "madly",
    "nearly",
    "oddly",
    "truly",
)
_ADJECTIVES = (
    "elite",
    "brave",
    "clever",
    "eager",
    "fancy",
    "giant",
    "happy",
    "jolly",
    "lively",
    "mellow",
    "noble",
    "polite",
    "proud",
    "rapid",
    "shiny",
    "silent",
    "smooth",
    "sunny",
    "tidy",
    "vivid",
    "witty",
    "young",
    "amber",
    "crisp",
)
_NOUNS = (
    "frog",
    "otter",
    "falcon",
    "badger",
    "panda",
    "tiger",
    "heron",
    "walrus",
    "lynx",
    "bison",
    "koala",
    "raven",
    "whale",
    "zebra",
    "puma",
    "gecko",
    "moose",
    "robin",
    "squid",
    "llama",
    "finch",
    "camel",
    "yak",
    "wren",
)

NAME_COUNT = len(_ADVERBS) * len(_ADJECTIVES) * len(_NOUNS)  # distinct vehicle names
_WORD_COUNTS = (len(_ADVERBS), len(_ADJECTIVES), len(_NOUNS))


@dataclass(frozen=True)
class Place:
    lat: float
    lon: float


@dataclass
class VehicleParams:
    """Everything hidden that drives one simulated vehicle (ground truth for models and tests)."""

    token_id: int
    powertrain: str
    make: str
    model: str
    year: int
    energy: EnergyParams
    city: City
    home: Place
    work: Place
    errands: list[Place]
    commuter: bool
    aggression: float
    harsh_brake_prob: float
    harsh_accel_prob: float
    tire_base_kpa: tuple[float, float, float, float]
    v12_rest: float
    v12_charge: float
    climate_offset_c: float
    daily_amp_c: float
    # EV
    battery_gross_kwh: float = math.nan
    soh_start: float = math.nan
    soh_end: float = math.nan
    soh_rate_per_year: float = math.nan
    dc_max_kw: float = math.nan
    ac_kw: float = math.nan
    home_charging: bool = False
    offpeak_charging: bool = False
    charge_limit: float = 80.0
    plug_threshold: float = 60.0
    vampire_w: float = 0.0
    batt_heat_per_kw: float = 0.3
    # ICE
    tank_l: float = math.nan
    engine_kw: float = math.nan


def offset_place(rng: np.random.Generator, origin: Place, min_km: float, max_km: float) -> Place:
    """A point ``min_km``–``max_km`` from ``origin`` in a random direction."""
    r = rng.uniform(min_km, max_km) * 1000.0
    ang = rng.uniform(0, 2 * math.pi)
    dlat = r * math.cos(ang) / 111_320.0
    dlon = r * math.sin(ang) / (111_320.0 * math.cos(math.radians(origin.lat)))
    return Place(origin.lat + dlat, origin.lon + dlon)


def draw_params(
    rng: np.random.Generator, token_id: int, powertrain: str, end: datetime, city: City | None = None
) -> VehicleParams:
    """Draw one vehicle's model, places, habits and hidden physics parameters."""
    city = city or CITIES[int(rng.integers(len(CITIES)))]
    center = Place(city.lat, city.lon)
    home = offset_place(rng, center, 0.5, 15.0)
    common: dict[str, Any] = dict(
        token_id=token_id,
        powertrain=powertrain,
        city=city,
        home=home,
        work=offset_place(rng, home, 4.0, 25.0),
        errands=[offset_place(rng, home, 1.5, 8.0) for _ in range(5)],
        commuter=bool(rng.random() < 0.7),
        aggression=float(rng.uniform(0.8, 1.2)),
        harsh_brake_prob=float(rng.uniform(0.03, 0.08) if rng.random() < 0.15 else rng.uniform(0.0, 0.015)),
        harsh_accel_prob=float(rng.uniform(0.02, 0.06) if rng.random() < 0.15 else rng.uniform(0.0, 0.01)),
        tire_base_kpa=tuple(float(x) for x in rng.uniform(234.0, 248.0) + rng.normal(0.0, 1.5, 4)),
        v12_rest=float(rng.uniform(12.55, 12.72)),
        v12_charge=float(rng.uniform(13.9, 14.5)),
        climate_offset_c=float(rng.normal(0.0, 1.5)),
        daily_amp_c=float(rng.uniform(3.5, 7.0)),
    )
    if powertrain == ELECTRIC:
        m = EV_MODELS[int(rng.integers(len(EV_MODELS)))]
        year = int(rng.integers(m.years[0], min(m.years[1], end.year) + 1))
        age = max(0.2, end.year - year + 0.5)
        soh_start = float(np.clip(100.0 - age * rng.uniform(0.8, 2.2) - rng.uniform(0.0, 2.0), 70.0, 100.0))
        rate_per_year = rng.uniform(1.0, 4.0)
        energy = EnergyParams(
            base=float(m.base * rng.lognormal(0.0, 0.09)),
            aero=float(m.aero * rng.uniform(0.85, 1.15)),
            cold=float(rng.uniform(0.008, 0.025)),
            mass_kg=float(m.mass_kg + rng.uniform(60, 200)),
            aux_kw=float(rng.uniform(0.3, 0.9)),
            regen_eff=float(rng.uniform(0.6, 0.75)),
        )
        return VehicleParams(
            **common,
            make=m.make,
            model=m.model,
            year=year,
            energy=energy,
            battery_gross_kwh=float(m.gross_kwh[int(rng.integers(len(m.gross_kwh)))]),
            soh_start=soh_start,
            soh_end=soh_start,  # set by the caller once the history length is known
            dc_max_kw=m.dc_max_kw,
            ac_kw=float(rng.choice([7.2, 7.7, 9.6, 11.0])),
            home_charging=bool(rng.random() < 0.85),
            offpeak_charging=bool(rng.random() < 0.4),
            charge_limit=float(rng.choice([80.0, 80.0, 85.0, 90.0])),
            plug_threshold=float(rng.uniform(45.0, 75.0)),
            vampire_w=float(rng.uniform(20.0, 60.0)),
            batt_heat_per_kw=float(rng.uniform(0.25, 0.4)),
            soh_rate_per_year=float(rate_per_year),
        )
    ice = ICE_MODELS[int(rng.integers(len(ICE_MODELS)))]
    year = int(rng.integers(ice.years[0], min(ice.years[1], end.year) + 1))
    energy = EnergyParams(
        base=float(ice.base * rng.lognormal(0.0, 0.07)),
        aero=float(ice.aero * rng.uniform(0.85, 1.15)),
        cold=float(rng.uniform(0.01, 0.03)),
        mass_kg=float(ice.mass_kg + rng.uniform(60, 200)),
        idle_l_per_h=float(rng.uniform(0.6, 1.1)),
    )
    return VehicleParams(
        **common,
        make=ice.make,
        model=ice.model,
        year=year,
        energy=energy,
        tank_l=ice.tank_l,
        engine_kw=ice.engine_kw,
    )


def soh_at(params: VehicleParams, t: np.ndarray | float, t_start: float, t_end: float) -> np.ndarray | float:
    """State of health (%) at epoch seconds ``t``: linear from ``soh_start`` at ``t_start`` to ``soh_end``."""
    frac = (np.asarray(t, dtype=float) - t_start) / max(t_end - t_start, 1.0)
    return params.soh_start + (params.soh_end - params.soh_start) * frac


def slug(text: str) -> str:
    return text.lower().replace(" ", "-")


def checksum_address(seed_bytes: bytes) -> str:
    """A checksummed address derived from ``seed_bytes`` (not a real key: only the address is needed)."""
    return to_checksum_address("0x" + hashlib.sha256(seed_bytes).digest()[:20].hex())


def mnemonic(rng: np.random.Generator, taken: set[str]) -> str:
    """A unique three-word vehicle name like ``plainly elite frog`` (adds it to ``taken``)."""
    if len(taken) >= NAME_COUNT:  # every name is taken: drawing would never end
        raise ConfigError(
            f"vehicle names: all {NAME_COUNT} three-word names are taken; use at most {NAME_COUNT} vehicles "
            "in one fleet (simulated, CMAP and replayed together)"
        )
    while True:
        i, j, k = rng.integers(0, _WORD_COUNTS).tolist()  # indices, not rng.choice: 30× faster per name
        name = f"{_ADVERBS[i]} {_ADJECTIVES[j]} {_NOUNS[k]}"
        if name not in taken:
            taken.add(name)
            return name


def _today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def make_vehicle(
    params: VehicleParams,
    *,
    rng: np.random.Generator,
    owner: str,
    name: str,
    license: DeveloperLicense,
    history_start: datetime,
    history_end: datetime,
    permissions: tuple[int, ...] | None = FULL_GRANT,
) -> Vehicle:
    """The identity record of a simulated vehicle, with its SACD grant to ``license`` (``None``: no grant)."""
    minted = history_start - timedelta(days=float(rng.uniform(30, 900)))
    source = "tesla" if params.make == "Tesla" else ("autopi", "macaron", "smartcar")[int(rng.integers(3))]
    grants = []
    if permissions:
        created = minted + (history_start - minted) * float(rng.uniform(0.05, 0.9))
        grants.append(
            Grant(
                grantee=license.client_id,
                permissions=permissions,
                created_at=created,
                # anchored on today when the history ended in the past, so a fixed-date fleet stays shared
                expires_at=max(history_end, _today()) + timedelta(days=float(rng.uniform(180, 720))),
            )
        )
    hardware = source in ("autopi", "macaron")
    return Vehicle(
        token_id=params.token_id,
        owner=owner,
        make=params.make,
        model=params.model,
        year=params.year,
        powertrain=params.powertrain,
        minted_at=minted,
        name=name,
        source=SOURCES[source],
        grants=grants,
        definition_id=f"{slug(params.make)}_{slug(params.model)}_{params.year}",
        manufacturer_token_id=MANUFACTURER_TOKEN_IDS[params.make],
        aftermarket_device_id=params.token_id * 3 + 7 if hardware else None,
        synthetic_device_id=None if hardware else params.token_id * 5 + 11,
    )


TRUTH_VEHICLE_SCHEMA = {
    "token_id": pl.Int64,
    "origin": pl.Utf8,
    "powertrain": pl.Utf8,
    "make": pl.Utf8,
    "model": pl.Utf8,
    "year": pl.Int64,
    "city": pl.Utf8,
    "mass_kg": pl.Float64,
    "battery_gross_kwh": pl.Float64,
    "consumption_base_kwh_per_100km": pl.Float64,
    "aero_coef": pl.Float64,
    "cold_penalty_per_deg": pl.Float64,
    "aux_kw": pl.Float64,
    "regen_eff": pl.Float64,
    "soh_start": pl.Float64,
    "soh_end": pl.Float64,
    "fuel_base_l_per_100km": pl.Float64,
    "idle_l_per_h": pl.Float64,
    "tank_l": pl.Float64,
    "harsh_brake_prob": pl.Float64,
}
TRUTH_FAULT_SCHEMA: dict[str, Any] = {
    "token_id": pl.Int64,
    "fault": pl.Utf8,
    "signal": pl.Utf8,
    "start": pl.Datetime("us", "UTC"),
    "end": pl.Datetime("us", "UTC"),
    "detail": pl.Utf8,
}


def truth_row(p: VehicleParams, origin: str = "simulated") -> dict[str, object]:
    """One ``Fleet.truth_vehicles`` row. ``aero_coef`` is in the powertrain's unit (kWh or L per 100 km)."""
    ev = p.powertrain == ELECTRIC
    e = p.energy
    nan = math.nan
    return {
        "token_id": p.token_id,
        "origin": origin,
        "powertrain": p.powertrain,
        "make": p.make,
        "model": p.model,
        "year": p.year,
        "city": p.city.name,
        "mass_kg": e.mass_kg,
        "battery_gross_kwh": p.battery_gross_kwh,
        "consumption_base_kwh_per_100km": e.base if ev else nan,
        "aero_coef": e.aero,
        "cold_penalty_per_deg": e.cold,
        "aux_kw": e.aux_kw if ev else nan,
        "regen_eff": e.regen_eff if ev else nan,
        "soh_start": p.soh_start,
        "soh_end": p.soh_end,
        "fuel_base_l_per_100km": nan if ev else e.base,
        "idle_l_per_h": nan if ev else e.idle_l_per_h,
        "tank_l": p.tank_l,
        "harsh_brake_prob": p.harsh_brake_prob,
    }


def truth_frame(rows: list[dict[str, object]]) -> pl.DataFrame:
    """``Fleet.truth_vehicles`` from :func:`truth_row` rows (typed even when empty)."""
    return pl.DataFrame(rows, schema=TRUTH_VEHICLE_SCHEMA)
