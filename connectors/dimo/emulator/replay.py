"""Serve recorded telemetry, and import the CMAP real 1 Hz speed traces as vehicles.

Replay files hold long rows ``(token_id, signal, ts, value[, value_str])``, as Parquet or CSV:
``value`` is numeric; String signals (``powertrainType``…) put their text in ``value_str``; location comes as
signals ``latitude``/``longitude`` or as ``currentLocationCoordinates`` with ``value_str = "lat,lon"``.

CMAP files (NREL FASTSim ``cmap_subset``, see shared/data/SOURCES.md) are CRLF CSVs
``timestamp,cycle_sec,timestep,speed_mph,accel_meters_ps`` in Chicago local time; ``timestep > 1`` marks a
gap where the logger was off. Each file becomes one EV whose energy, SoC and battery temperature come from
the simulator's physics (``sim.render.VehicleSim``).
"""

from __future__ import annotations

import math
from collections import ChainMap
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from connectors.dimo.catalog import signal_catalog
from connectors.dimo.emulator.fleet import SOURCES, DeveloperLicense, Fleet, Grant, Vehicle
from connectors.dimo.emulator.sim.catalog import (
    CHICAGO,
    COMBUSTION,
    ELECTRIC,
    FULL_GRANT,
    TRUTH_FAULT_SCHEMA,
    checksum_address,
    draw_params,
    make_vehicle,
    mnemonic,
    truth_frame,
    truth_row,
)
from connectors.dimo.emulator.sim.profiles import wander_route
from connectors.dimo.emulator.sim.render import (
    EVENT_SCHEMA,
    LOCATION_COLUMNS,
    POWERTRAIN_TYPE,
    series_column_order,
)
from connectors.dimo.emulator.sim.simulator import FIRST_TOKEN_ID, WARMUP_S, initial_sim
from connectors.dimo.schema import LOCATION_SIGNAL
from depin_core.errors import ConfigError

# removed lat/long signals are accepted and mapped to the location columns
_LOCATION_ALIASES = {"currentLocationLatitude": "latitude", "currentLocationLongitude": "longitude"}
REQUIRED = ("token_id", "signal", "ts", "value")
MPH_TO_KMH = 1.609344
CMAP_TZ = "America/Chicago"
CMAP_COLUMNS = ("timestamp", "timestep", "speed_mph")
TRIP_BREAK_S = 300  # a logger gap longer than this is a parked period; shorter ones stay inside a trip
DAY_S = 86400


# ---- replay files -------------------------------------------------------------------------------------
def _read_table(path: Path) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"replay: file {str(path)!r} does not exist; pass a .parquet or .csv file of long rows"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix == ".csv":
            return pl.read_csv(
                path,
                schema_overrides={"signal": pl.Utf8, "ts": pl.Utf8, "value_str": pl.Utf8},
                infer_schema_length=10_000,
            )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ConfigError(
            f"replay: cannot read {str(path)!r} ({type(exc).__name__}: {exc}); is it valid?"
        ) from None
    raise ConfigError(f"replay: {str(path)!r} has suffix {suffix!r}; use .parquet or .csv")


def _normalize(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Validate the long rows and return them typed, location split, as (token_id, signal, ts, value, value_str)."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ConfigError(
            f"replay: {str(path)!r} lacks column(s) {missing}; expected long rows "
            "(token_id, signal, ts, value[, value_str])"
        )
    if df.height == 0:
        raise ConfigError(f"replay: {str(path)!r} has no rows; record some telemetry first")
    if "value_str" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.Utf8).alias("value_str"))
    try:
        ts = pl.col("ts")
        if df.schema["ts"] == pl.Utf8:
            ts = ts.str.to_datetime(time_unit="us", time_zone="UTC")
        elif isinstance(df.schema["ts"], pl.Datetime):
            tz = df.schema["ts"].time_zone
            ts = ts.dt.replace_time_zone("UTC") if tz is None else ts.dt.convert_time_zone("UTC")
            ts = ts.dt.cast_time_unit("us")
        else:
            raise ConfigError(
                f"replay: column 'ts' has type {df.schema['ts']}; use timestamps or ISO-8601 strings "
                "(2026-01-01T00:00:00Z)"
            )
        df = df.select(
            pl.col("token_id").cast(pl.Int64, strict=True),
            pl.col("signal").cast(pl.Utf8),
            ts.alias("ts"),
            pl.col("value").cast(pl.Float64, strict=True),
            pl.col("value_str").cast(pl.Utf8),
        )
    except pl.exceptions.PolarsError as exc:
        raise ConfigError(
            f"replay: {str(path)!r} has values of the wrong type ({exc}); token_id must be an integer, "
            "ts a timestamp, value a number (text goes in value_str)"
        ) from None
    for col in ("token_id", "signal", "ts"):
        if df[col].null_count():
            raise ConfigError(
                f"replay: column {col!r} has {df[col].null_count()} empty value(s); fill or drop them"
            )

    df = df.with_columns(pl.col("signal").replace(_LOCATION_ALIASES))
    catalog = signal_catalog()
    names = df["signal"].unique().to_list()
    unknown = sorted(n for n in names if n not in catalog and n not in LOCATION_COLUMNS)
    if unknown:
        raise ConfigError(
            f"replay: unknown signal name(s) {unknown[:10]} in column 'signal'; use DIMO signal names exactly "
            "(case-sensitive, see connectors/dimo/signals.tsv) or latitude/longitude for location"
        )
    if LOCATION_SIGNAL in names:
        loc = df.filter(pl.col("signal") == LOCATION_SIGNAL)
        parts = loc["value_str"].str.replace_all(r"[\[\]\(\)\s]", "").str.split_exact(",", 1)
        loc = loc.with_columns(
            parts.struct.field("field_0").cast(pl.Float64, strict=False).alias("latitude"),
            parts.struct.field("field_1").cast(pl.Float64, strict=False).alias("longitude"),
        )
        if loc["latitude"].null_count() or loc["longitude"].null_count():
            raise ConfigError(
                "replay: currentLocationCoordinates rows need value_str 'lat,lon' (e.g. '41.88,-87.63'), "
                "or use separate latitude/longitude signals"
            )
        split = pl.concat(
            [
                loc.select("token_id", pl.lit(c).alias("signal"), "ts", pl.col(c).alias("value"), "value_str")
                for c in ("latitude", "longitude")
            ]
        ).with_columns(pl.lit(None, dtype=pl.Utf8).alias("value_str"))
        df = pl.concat([df.filter(pl.col("signal") != LOCATION_SIGNAL), split])

    is_str = pl.col("signal").is_in(_string_signals(names))
    bad = df.filter(pl.when(is_str).then(pl.col("value_str").is_null()).otherwise(pl.col("value").is_null()))
    if bad.height:
        first = bad.row(0, named=True)
        raise ConfigError(
            f"replay: {bad.height} row(s) lack a value, e.g. token_id={first['token_id']} "
            f"signal={first['signal']!r} ts={first['ts']}; numbers go in 'value', text signals in 'value_str'"
        )
    return df


def _string_signals(names: list[str]) -> list[str]:
    """The names among ``names`` that are String signals (their values live in ``value_str``)."""
    catalog = signal_catalog()
    return [n for n in names if n in catalog and catalog[n].gql_type == "String"]


def _pivot(rows: pl.DataFrame, values: str) -> pl.DataFrame:
    """One vehicle's rows wide by signal; duplicates of (signal, ts) keep the last row."""
    try:
        return rows.pivot(on="signal", index="ts", values=values, aggregate_function=None)
    except pl.exceptions.ComputeError:  # duplicates: the slower aggregating pivot
        return rows.pivot(on="signal", index="ts", values=values, aggregate_function="last")


def long_to_series(df: pl.DataFrame) -> dict[int, pl.DataFrame]:
    """Pivot validated long rows into one wide series frame per vehicle (fleet.py layout)."""
    out = {}
    for (token_id,), part in df.partition_by("token_id", as_dict=True).items():
        names = part["signal"].unique().to_list()
        strings = _string_signals(names)
        if not strings:
            wide = _pivot(part, "value")
        else:
            is_str = pl.col("signal").is_in(strings)
            wide = _pivot(part.filter(is_str), "value_str")
            if len(strings) < len(names):
                wide = _pivot(part.filter(~is_str), "value").join(wide, on="ts", how="full", coalesce=True)
        out[int(token_id)] = wide.sort("ts").select(series_column_order(wide.columns))
    return dict(sorted(out.items()))


def replay_fleet(license: DeveloperLicense, path: Path) -> Fleet:
    """A fleet serving the recording at ``path``; every vehicle grants the license full access."""
    path = Path(path)
    df = _normalize(_read_table(path), path)
    series = long_to_series(df)
    start, last = df["ts"].min(), df["ts"].max()
    assert isinstance(start, datetime) and isinstance(last, datetime)
    end = last + timedelta(seconds=1)
    taken: set[str] = set()
    vehicles: dict[int, Vehicle] = {}
    for token_id, s in series.items():
        vehicles[token_id] = _replay_vehicle(token_id, s, license, start, end, taken)
    empty_events = pl.DataFrame(schema=EVENT_SCHEMA)
    return Fleet(
        license=license,
        vehicles=vehicles,
        series=series,
        events={t: empty_events for t in series},
        start=start,
        end=end,
        truth_vehicles=truth_frame([]),
        truth_faults=pl.DataFrame(schema=TRUTH_FAULT_SCHEMA),
    )


def _replay_vehicle(
    token_id: int, s: pl.DataFrame, license: DeveloperLicense, start: datetime, end: datetime, taken: set[str]
) -> Vehicle:
    """Identity for a replayed vehicle; powertrain from ``powertrainType`` or from which signals exist."""
    reported = s[POWERTRAIN_TYPE].drop_nulls().tail(1).to_list() if POWERTRAIN_TYPE in s.columns else []
    if reported and reported[0] in ("ELECTRIC", "COMBUSTION", "HYBRID"):
        powertrain = reported[0]
    elif any(c.startswith("powertrainTractionBattery") for c in s.columns):
        powertrain = ELECTRIC
    else:
        powertrain = COMBUSTION
    rng = np.random.default_rng(token_id)
    minted = start - timedelta(days=30)
    return Vehicle(
        token_id=token_id,
        owner=checksum_address(f"replay-owner-{token_id}".encode()),
        make="Replay",
        model="Replay",
        year=start.year,
        powertrain=powertrain,
        minted_at=minted,
        name=mnemonic(rng, taken),
        source=list(SOURCES.values())[token_id % len(SOURCES)],
        grants=[Grant(license.client_id, tuple(range(1, 9)), minted, end + timedelta(days=365))],
        definition_id=f"replay_replay_{start.year}",
    )


def fleet_to_long(fleet: Fleet) -> pl.DataFrame:
    """Wide series → long rows ``(token_id, signal, ts, value, value_str)``, grouped by vehicle and signal."""
    parts = []
    for token_id, s in sorted(fleet.series.items()):
        cols = [c for c in s.columns if c != "ts"]
        strings = _string_signals(cols)
        nums = [c for c in cols if c not in strings]
        base = s.with_columns(pl.lit(token_id, dtype=pl.Int64).alias("token_id"))
        if nums:
            parts.append(
                base.unpivot(index=["token_id", "ts"], on=nums, variable_name="signal", value_name="value")
                .with_columns(
                    pl.col("value").cast(pl.Float64), pl.lit(None, dtype=pl.Utf8).alias("value_str")
                )
                .drop_nulls("value")
            )
        if strings:
            parts.append(
                base.unpivot(
                    index=["token_id", "ts"], on=strings, variable_name="signal", value_name="value_str"
                )
                .with_columns(pl.lit(None, dtype=pl.Float64).alias("value"))
                .drop_nulls("value_str")
            )
    schema: dict[str, Any] = {
        "token_id": pl.Int64,
        "signal": pl.Utf8,
        "ts": pl.Datetime("us", "UTC"),
        "value": pl.Float64,
        "value_str": pl.Utf8,
    }
    if not parts:
        return pl.DataFrame(schema=schema)
    return pl.concat([p.select(list(schema)) for p in parts])


def write_replay_file(fleet: Fleet, path: Path) -> None:
    """Write the fleet's series as a replay file (.parquet or .csv); ``replay_fleet`` reads it back."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"replay: cannot write {str(path)!r}; use a .parquet or .csv file name")
    long = fleet_to_long(fleet)
    if suffix == ".parquet":
        long.write_parquet(path)
    else:
        long.write_csv(path, datetime_format="%Y-%m-%dT%H:%M:%S%.6fZ")


# ---- CMAP real traces ---------------------------------------------------------------------------------
def load_cmap_trace(csv_path: Path) -> pl.DataFrame:
    """One CMAP file as ``(ts, speed_kmh)``: UTC timestamps (local Chicago time converted), mph → km/h.

    Rows are kept as recorded; a jump of more than one second between ``ts`` values is a logger gap.
    """
    csv_path = Path(csv_path)
    try:
        raw = pl.read_csv(csv_path, schema_overrides={"timestamp": pl.Utf8})
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ConfigError(f"cmap: cannot read {str(csv_path)!r} ({exc}); pass a CMAP cycle CSV") from None
    missing = [c for c in CMAP_COLUMNS if c not in raw.columns]
    if missing:
        raise ConfigError(
            f"cmap: {str(csv_path)!r} lacks column(s) {missing}; expected "
            "timestamp,cycle_sec,timestep,speed_mph,accel_meters_ps"
        )
    try:
        out = raw.select(
            pl.col("timestamp")
            .str.strip_chars()
            .str.to_datetime("%Y-%m-%d %H:%M:%S", time_unit="us")
            .dt.replace_time_zone(CMAP_TZ, ambiguous="earliest")
            .dt.convert_time_zone("UTC")
            .alias("ts"),
            (pl.col("speed_mph").cast(pl.Float64) * MPH_TO_KMH).alias("speed_kmh"),
        )
    except pl.exceptions.PolarsError as exc:
        raise ConfigError(f"cmap: {str(csv_path)!r} has unparseable rows ({exc})") from None
    if out.height == 0 or out["ts"].null_count() or out["speed_kmh"].null_count():
        raise ConfigError(f"cmap: {str(csv_path)!r} is empty or has empty timestamps/speeds")
    if (out["ts"].diff().drop_nulls() <= timedelta(0)).any():
        raise ConfigError(f"cmap: {str(csv_path)!r} has timestamps that do not increase; is it a CMAP cycle?")
    return out


def cmap_files(cmap_dir: Path) -> list[Path]:
    """The CMAP CSVs in ``cmap_dir``, sorted by name."""
    cmap_dir = Path(cmap_dir)
    files = sorted(cmap_dir.glob("*.csv")) if cmap_dir.is_dir() else []
    if not files:
        raise ConfigError(f"cmap: no .csv files in {str(cmap_dir)!r}; point --cmap-dir at shared/data/cmap")
    return files


def load_cmap_speed_traces(cmap_dir: Path) -> list[np.ndarray]:
    """Every gap-free run of every CMAP file as a 1 Hz km/h array (for ``simulate_fleet(speed_traces=…)``)."""
    out = []
    for f in cmap_files(cmap_dir):
        tr = load_cmap_trace(f)
        sec = _epoch_s(tr)
        breaks = np.flatnonzero(np.diff(sec) > 1) + 1
        out += np.split(tr["speed_kmh"].to_numpy(), breaks)
    return out


def _epoch_s(tr: pl.DataFrame) -> np.ndarray:
    return tr["ts"].dt.epoch("s").to_numpy()


def add_cmap_vehicles(fleet: Fleet, cmap_dir: Path, *, seed: int) -> Fleet:
    """A new fleet: ``fleet`` plus one EV per CMAP file, its day moved to the window's last 24 h.

    Recorded seconds become 1 Hz samples (speed as recorded; logger gaps stay gaps), the odometer integrates
    the speed, and energy, SoC, power and battery temperature come from the simulator's physics; the rest of
    the window is parked at 60 s sampling. Each vehicle gets a ground-truth row (origin ``cmap:<file>``).
    """
    t_start, t_end = fleet.start.timestamp(), fleet.end.timestamp()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC3A9]))
    next_id = max(fleet.vehicles, default=FIRST_TOKEN_ID)
    taken = {v.name for v in fleet.vehicles.values()}
    vehicles = dict(fleet.vehicles)
    # new frames in front of the (possibly lazily generated) ones: nothing of the input fleet is materialised
    series: ChainMap[int, pl.DataFrame] = ChainMap({}, fleet.series)  # type: ignore[arg-type]  # read-only below
    events: ChainMap[int, pl.DataFrame] = ChainMap({}, fleet.events)  # type: ignore[arg-type]
    truth = []
    for path in cmap_files(cmap_dir):
        next_id += int(rng.integers(1, 40))
        trace = load_cmap_trace(path)
        sec, speed = _epoch_s(trace), trace["speed_kmh"].to_numpy()
        shift = math.floor((t_end - 1 - sec[-1]) / DAY_S) * DAY_S
        sec = sec + shift
        vrng = np.random.default_rng(np.random.SeedSequence([seed, next_id]))
        p = draw_params(vrng, next_id, ELECTRIC, fleet.end, city=CHICAGO)
        vehicle = make_vehicle(
            p,
            rng=vrng,
            owner=checksum_address(f"cmap-owner-{seed}-{path.stem}".encode()),
            name=mnemonic(vrng, taken),
            license=fleet.license,
            history_start=fleet.start,
            history_end=fleet.end,
            permissions=FULL_GRANT,
        )
        t0 = int(min(t_start - WARMUP_S, sec[0] - 600)) // 60 * 60
        sim = initial_sim(
            p,
            vrng,
            t0=t0,
            t_start=t_start,
            t_end=t_end,
            faults=[],
            source=vehicle.source,
            end_year=fleet.end.year,
        )
        trip_breaks = np.flatnonzero(np.diff(sec) > TRIP_BREAK_S) + 1
        for tsec, tv in zip(np.split(sec, trip_breaks), np.split(speed, trip_breaks), strict=True):
            grid = np.arange(tsec[0], tsec[-1] + 1)
            v = np.interp(grid, tsec, tv)  # logger gaps inside a trip: linear speed
            keep = np.zeros(len(grid), dtype=bool)
            keep[tsec - tsec[0]] = True
            km = float(np.sum(v) / 3600.0)
            sim.park(int(tsec[0]))
            sim.drive(v, wander_route(vrng, sim.place, km * 1000.0), sample_every=1, keep=keep)
        sim.park(math.ceil(t_end))
        series[p.token_id], events[p.token_id] = sim.frames(t_start, t_end)
        vehicles[p.token_id] = vehicle
        truth.append(truth_row(p, origin=f"cmap:{path.stem}"))
    truth_vehicles = (
        pl.concat([fleet.truth_vehicles, truth_frame(truth)])
        if fleet.truth_vehicles.width
        else truth_frame(truth)
    )
    faults = fleet.truth_faults if fleet.truth_faults.width else pl.DataFrame(schema=TRUTH_FAULT_SCHEMA)
    return replace(
        fleet,
        vehicles=vehicles,
        series=series,
        events=events,
        truth_vehicles=truth_vehicles,
        truth_faults=faults,
    )


def cmap_replay_rows(cmap_dir: Path, *, end: datetime, seed: int, days: float = 2.0) -> pl.DataFrame:
    """The CMAP vehicles over ``[end − days, end)`` as long replay rows (for ``--replay``)."""
    from connectors.dimo.emulator.state import make_license

    end = end.astimezone(UTC)
    empty = Fleet(
        license=make_license(seed),
        vehicles={},
        series={},
        events={},
        start=end - timedelta(days=days),
        end=end,
    )
    return fleet_to_long(add_cmap_vehicles(empty, cmap_dir, seed=seed))
