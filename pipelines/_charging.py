"""Fleet charging from telemetry: the steps of ``plan_charging`` and ``depin plan`` as plain functions.

From the telemetry table, per EV: its latest state of charge (``powertrainTractionBatteryStateOfChargeCurrent``)
and battery (``powertrainTractionBatteryGrossCapacity`` × state of health when reported: the usable kWh), and
its next-day distance — the simple rule: the odometer distance it covered in the table, per day of the
table's time span (at least one day). The published range function, called through the gateway with that
distance as a planned trip (``{"plan": {"km", "mean_speed", "air", "soc", "usable_kwh"}}``: the vehicle's own
mean moving speed and the last day's mean air temperature), gives its kWh/100 km; the need is
``min(km × kWh/100 km / 100, (100 − SoC)% × usable kWh)`` (the cap is applied by
:func:`gpu_jobs.charging.problem_from_table`). Vehicles without a state of charge or a battery size (combustion
cars) are skipped and counted. Windows come from ``site.json`` (:class:`SiteFile`). Then
:func:`gpu_jobs.charging.plan` — the one planner API — solves it, and the plan is written as Parquet (vehicle,
slot, start, kW) and a PNG (chargers in use per slot against the tariff).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from depin_core import paths
from depin_core.errors import ConfigError
from gpu_jobs.charging import ChargingProblem, Plan, Site
from gpu_jobs.models import features as F
from gpu_jobs.models.charging.planner import Solver
from gpu_jobs.models.charging.snapshot import FleetRow, FleetSnapshot
from pipelines.params import DEFAULT_DATASET, DatasetLocation

PLANS_DIR = paths.PLANS_DIR
WINDOW_KEYS = ("timezone", "plug_in", "departure", "vehicles")
PLAN_COLUMNS = ("vehicle", "slot", "start", "kw")
DEFAULT_CHAIN: tuple[Solver, ...] = ("exact",)
MAX_PLAN_KM = 2000.0  # the range function's limit for one planned trip


# --------------------------------------------------------------------------------------------- site.json


class VehicleWindow(BaseModel):
    """A vehicle's own plug-in/departure times (site local) or on-board charger limit."""

    model_config = ConfigDict(extra="forbid")

    plug_in: clock | None = None
    departure: clock | None = None
    max_kw: float | None = Field(None, gt=0, le=1000)


class Windows(BaseModel):
    """The plug-in windows of ``site.json``: site-local clock times, per-vehicle overrides by token id."""

    model_config = ConfigDict(extra="forbid")

    timezone: str = Field("UTC", description="IANA time zone of the site, e.g. Europe/Berlin")
    plug_in: clock = Field(clock(18, 0), description="when the vehicles are plugged in (site local)")
    departure: clock = Field(clock(7, 0), description="when they leave (site local)")
    vehicles: dict[str, VehicleWindow] = Field(default_factory=dict, description="token id → overrides")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone; use e.g. UTC or Europe/Berlin") from None
        return v

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def window(self, vehicle: str, start: datetime) -> tuple[datetime, datetime]:
        """(plugged in, leaves) of ``vehicle`` for a horizon starting at ``start``: plugged in at ``start``
        when ``start`` falls inside its window, else at the next plug-in time; leaving at the first departure
        time after that."""
        own = self.vehicles.get(vehicle, VehicleWindow())
        plug_in = own.plug_in or self.plug_in
        departure = own.departure or self.departure
        if plug_in == departure:
            raise ConfigError(f"site.json: vehicle {vehicle}: plug_in equals departure; give a window")
        local = start.astimezone(self.zone)
        arrive = _next_at(local, plug_in)
        depart = _next_at(local, departure)
        if local < depart < arrive:  # inside the window already (it began before start)
            arrive = local
        elif depart <= arrive:
            depart = _next_at(arrive + timedelta(seconds=1), departure)
        return arrive, depart


def _next_at(after: datetime, at: clock) -> datetime:
    """The first instant ≥ ``after`` whose local clock reads ``at`` (``after`` is tz-aware, local)."""
    day = after.date()
    for d in range(3):
        t = datetime.combine(day + timedelta(days=d), at, tzinfo=after.tzinfo)
        if t >= after:
            return t
    raise AssertionError("unreachable: a clock time recurs daily")  # pragma: no cover


class SiteFile(BaseModel):
    """``site.json``: the depot's :class:`gpu_jobs.charging.Site` fields (``chargers``, ``charger_kw``,
    ``grid_cap_kw``, ``slot_minutes``, ``slots``, ``tariff``, and ``start``, optional here) and the
    :class:`Windows` fields (``timezone``, ``plug_in``, ``departure``, ``vehicles``) side by side.

    ``start`` absent: the horizon starts at the latest telemetry, on the slot grid (the plan is for the
    coming night). ``tariff`` absent: the default day-night curve, on the site's local clock."""

    model_config = ConfigDict(frozen=True)

    site: Site  # with the start given, or a placeholder until the telemetry says
    windows: Windows
    start_given: bool

    def site_for(self, latest: datetime) -> Site:
        """The site with its horizon: ``start`` as given, else ``latest`` ceiled to the slot grid, in the
        site's time zone (so the default tariff follows the local clock)."""
        if self.start_given:
            return self.site
        step = self.site.slot_minutes * 60
        ts = math.ceil(latest.timestamp() / step) * step
        start = datetime.fromtimestamp(ts, UTC).astimezone(self.windows.zone)
        return self.site.model_copy(update={"start": start})


_PLACEHOLDER = "2000-01-01T00:00:00Z"


def _field_error(where: str, e: ValidationError, prefix: str = "") -> ConfigError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *err["loc"])) or "(the object)"
    return ConfigError(f"{where}: field {loc}: {err['msg']}; fix it in the file")


def parse_site(doc: Any, where: str = "site.json") -> SiteFile:
    """Validate a decoded ``site.json`` (``ConfigError`` naming the field)."""
    if not isinstance(doc, dict):
        raise ConfigError(f'{where}: expected a JSON object such as {{"chargers": 4, "charger_kw": 11}}')
    site = {k: v for k, v in doc.items() if k not in WINDOW_KEYS}
    try:
        windows = Windows.model_validate({k: doc[k] for k in WINDOW_KEYS if k in doc})
    except ValidationError as e:
        raise _field_error(where, e) from None
    given = site.get("start") is not None
    try:
        parsed = Site.model_validate({**site, "start": site["start"] if given else _PLACEHOLDER})
    except ValidationError as e:
        raise _field_error(where, e) from None
    return SiteFile(site=parsed, windows=windows, start_given=given)


def load_site(path: Path | str) -> SiteFile:
    """Read and validate the site file ``path``."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"--site {p}: no such file; write a site.json (see README, Fleet charging)"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--site {p}: cannot read it as JSON ({e})") from None
    return parse_site(doc, str(p))


# --------------------------------------------------------------------------------------------- params


class PlanChargingParams(BaseModel):
    """What to plan: the dataset, the site, the solver chain, where the range function is served."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetLocation = Field(
        str(DEFAULT_DATASET), description="telemetry dataset (directory or s3://…)"
    )
    site: Path = Field(Path("site.json"), description="site file: chargers, power, grid cap, windows")
    solvers: list[Solver] = Field(
        default_factory=lambda: list(DEFAULT_CHAIN),
        min_length=1,
        description="solver chain, tried in order (exact, anneal, dynex, greedy); e.g. [dynex, exact]",
    )
    range_function: str = Field("range@prod", description="the range function giving each EV's kWh/100 km")
    gateway_url: str | None = Field(
        None, description="gateway serving it (default: DEPIN_GATEWAY_URL, else http://127.0.0.1:8787)"
    )
    kwh_per_100km: float | None = Field(
        None, gt=0, le=200, description="use this consumption for every EV instead of the range function"
    )
    out: Path = Field(PLANS_DIR, description="plans directory: <out>/plan-<time>.parquet and .png")
    seed: int = 0
    time_limit_s: float | None = Field(60.0, gt=0, description="limit of one solver attempt")


class VehicleState(BaseModel):
    """An EV's state from the telemetry, and what the range function says of its next day."""

    token_id: int
    soc_pct: float
    soc_at: datetime
    gross_kwh: float
    usable_kwh: float
    km_per_day: float
    mean_speed: float | None = None
    air: float | None = None
    kwh_per_100km: float | None = None
    range_km: float | None = None


class Fleet(BaseModel):
    """The EVs of a dataset and the vehicles skipped (no state of charge or battery size)."""

    vehicles: list[VehicleState]
    skipped: list[dict[str, Any]]
    first: datetime
    latest: datetime
    span_days: float


class PlanChargingResult(BaseModel):
    """What a planning run did (``depin plan --json`` prints it)."""

    dataset: str
    site_start: str
    slots: int
    slot_minutes: int
    solver: str
    solvers: list[str]
    attempts: list[dict[str, Any]]
    feasible: bool
    cost: float
    baseline_cost: float = Field(description="cost of charging on arrival (greedy) for the same needs")
    saving: float
    energy_kwh: float
    need_kwh: float
    vehicles: int
    skipped: int
    skipped_vehicles: list[dict[str, Any]]
    unmet: list[dict[str, Any]]
    consumption: str = Field(description="where kWh/100 km came from: the range function or a fixed value")
    plan_path: str
    plot_path: str
    wall_s: float
    seconds: float
    per_vehicle: list[dict[str, Any]]
    function_name: str | None = None
    function_version: str | None = None
    function_url: str | None = None


# --------------------------------------------------------------------------------------------- fleet


def fleet_states(dataset: Path | str) -> Fleet:
    """Each EV's latest SoC and battery, its km per day and driving conditions (see the module docstring).

    Three passes of polars' streaming engine over the table (its time extent; per vehicle, when each value
    was last seen, odometer extremes and means; the values seen then): memory follows the fleet's size in
    vehicles, not its rows (reading the table whole took 1.4 GB at 1,200 vehicles × 3 days at 1 minute)."""
    import polars as pl

    from connectors.dimo.store import TelemetryStore

    store = TelemetryStore(dataset)
    schema, data = store.schema(), store.dataset()
    if schema is None or data is None:
        raise ConfigError(f"--dataset {dataset}: no telemetry there; ingest first (depin ingest)")

    def signal(name: str) -> pl.Expr:  # a signal the table lacks counts as never reported
        return pl.col(name) if name in schema.names else pl.lit(None, dtype=pl.Float64).alias(name)

    ts = pl.col("timestamp")
    rows = pl.scan_pyarrow_dataset(data).select(
        "token_id", "timestamp", *(signal(c) for c in (F.SOC, F.GROSS, F.SOH, F.ODOMETER, F.SPEED, F.AIR))
    )
    first, latest = rows.select(ts.min(), ts.max().alias("latest")).collect(engine="streaming").row(0)
    if latest is None:
        raise ConfigError(f"--dataset {dataset}: the table is empty; ingest first (depin ingest)")
    span_days = max((latest - first).total_seconds() / 86400.0, 1.0)
    last_day = latest - timedelta(days=1)
    seen = {name: f"{name}_at" for name in (F.SOC, F.GROSS, F.SOH)}
    agg = (
        rows.group_by("token_id")
        .agg(
            *(pl.when(pl.col(c).is_not_null()).then(ts).max().alias(at) for c, at in seen.items()),
            pl.col(F.ODOMETER).min().alias("odo_min"),
            pl.col(F.ODOMETER).max().alias("odo_max"),
            pl.when(pl.col(F.SPEED) > 0).then(pl.col(F.SPEED)).mean().alias("speed"),
            pl.when(ts >= last_day).then(pl.col(F.AIR)).mean().alias("air"),
        )
        .collect(engine="streaming")
    )
    values = (  # each value at the time it was last seen
        rows.join(agg.lazy().select("token_id", *seen.values()), on="token_id")
        .filter(pl.any_horizontal(ts == pl.col(at) for at in seen.values()))
        .group_by("token_id")
        .agg(pl.when(ts == pl.col(at)).then(pl.col(c)).drop_nulls().last() for c, at in seen.items())
        .collect(engine="streaming")
    )
    agg = agg.join(values, on="token_id", how="left").rename(
        {F.SOC: "soc", seen[F.SOC]: "soc_at", F.GROSS: "gross", F.SOH: "soh"}
    )
    vehicles, skipped = [], []
    for r in agg.sort("token_id").iter_rows(named=True):
        tid = int(r["token_id"])
        if r["soc"] is None or r["gross"] is None or not r["gross"] > 0:
            what = "state of charge" if r["soc"] is None else "battery capacity"
            skipped.append(
                {"token_id": tid, "reason": f"no {what} in the telemetry (not an EV, or not reported)"}
            )
            continue
        soh = r["soh"] if r["soh"] is not None and 0 < r["soh"] <= 100 else 100.0
        km = float(r["odo_max"] - r["odo_min"]) if r["odo_max"] is not None else 0.0
        vehicles.append(
            VehicleState(
                token_id=tid,
                soc_pct=min(max(float(r["soc"]), 0.0), 100.0),
                soc_at=r["soc_at"],
                gross_kwh=float(r["gross"]),
                usable_kwh=round(float(r["gross"]) * soh / 100.0, 3),
                km_per_day=round(km / span_days, 3),
                mean_speed=_finite(r["speed"]),
                air=_finite(r["air"]),
            )
        )
    return Fleet(vehicles=vehicles, skipped=skipped, first=first, latest=latest, span_days=span_days)


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def trip_plan(v: VehicleState) -> dict[str, float]:
    """The range function's ``plan`` body for the vehicle's next day (fields within the function's bounds)."""
    body: dict[str, float] = {
        "km": min(v.km_per_day, MAX_PLAN_KM),
        "soc": v.soc_pct,
        "usable_kwh": v.usable_kwh,
    }
    if v.mean_speed is not None and 0 < v.mean_speed <= 300:
        body["mean_speed"] = round(v.mean_speed, 3)
    if v.air is not None and -90 <= v.air <= 70:
        body["air"] = round(v.air, 3)
    return body


def add_consumption(fleet: Fleet, params: PlanChargingParams) -> str:
    """Set each EV's kWh/100 km (and remaining range): the range function through the gateway, one planned
    trip per EV that drove, or ``params.kwh_per_100km``; returns where it came from."""
    if params.kwh_per_100km is not None:
        for v in fleet.vehicles:
            v.kwh_per_100km = params.kwh_per_100km
        return f"fixed {params.kwh_per_100km:g} kWh/100 km"
    from pipelines._targets import local_gateway_url, make_target

    url = local_gateway_url(params.gateway_url)
    driving = [v for v in fleet.vehicles if v.km_per_day > 0]
    if driving:
        with make_target(url, retries=3, timeout=60) as target:
            for v in driving:
                out = target.invoke(params.range_function, {"plan": trip_plan(v)})["outputs"][0]
                v.kwh_per_100km = float(out["kwh_per_100km"])
                v.range_km = None if out.get("range_km") is None else float(out["range_km"])
    return f"{params.range_function} at {url}"


# --------------------------------------------------------------------------------------------- problem


def snapshot(fleet: Fleet, site_file: SiteFile) -> FleetSnapshot:
    """The fleet snapshot the planner takes (what the ``charging-plan`` function takes too)."""
    site = site_file.site_for(fleet.latest)
    rows = []
    for v in fleet.vehicles:
        vid = str(v.token_id)
        arrive, depart = site_file.windows.window(vid, site.start)
        need = v.km_per_day * (v.kwh_per_100km or 0.0) / 100.0
        own = site_file.windows.vehicles.get(vid)
        rows.append(
            FleetRow(
                token_id=v.token_id,
                soc_pct=v.soc_pct,
                gross_kwh=v.usable_kwh,  # the cap (100 − SoC)% × capacity is on the usable energy
                need_kwh=round(need, 3),
                arrive=arrive,
                depart=depart,
                max_kw=own.max_kw if own else None,
            )
        )
    if not rows:
        raise ConfigError("the dataset has no EV with a state of charge and a battery size; nothing to plan")
    known = {str(v.token_id) for v in fleet.vehicles} | {str(s["token_id"]) for s in fleet.skipped}
    if unknown := sorted(set(site_file.windows.vehicles) - known, key=lambda t: (len(t), t)):
        raise ConfigError(
            f"site.json: vehicles: {', '.join(unknown)} not in the dataset (its EVs: "
            f"{', '.join(str(v.token_id) for v in fleet.vehicles)}); fix the token ids or remove the overrides"
        )
    return FleetSnapshot(site=site, fleet=rows)


def problem_of(snap: FleetSnapshot) -> ChargingProblem:
    """:meth:`FleetSnapshot.problem`, a window outside the horizon as a ``ConfigError`` with the fix."""
    try:
        return snap.problem()
    except ValueError as e:
        raise ConfigError(f"site.json: {e}") from None


def plan_rows(problem: ChargingProblem, plan: Plan) -> list[dict[str, Any]]:
    """The Parquet rows: one per (vehicle, slot) it charges in — vehicle, slot, start (UTC), kW."""
    from gpu_jobs.models.charging.snapshot import charging_rows

    return charging_rows(problem, plan)


def write_plan(rows: list[dict[str, Any]], path: Path) -> Path:
    """The plan as Parquet (vehicle string, slot int32, start timestamp UTC, kw float64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from depin_core.fs import atomic_write_bytes

    schema = pa.schema(
        [
            ("vehicle", pa.string()),
            ("slot", pa.int32()),
            ("start", pa.timestamp("us", tz="UTC")),
            ("kw", pa.float64()),
        ]
    )
    table = pa.table(
        {
            "vehicle": [r["vehicle"] for r in rows],
            "slot": [r["slot"] for r in rows],
            "start": [datetime.fromisoformat(r["start"]) for r in rows],
            "kw": [r["kw"] for r in rows],
        },
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


def vehicle_rows(fleet: Fleet, problem: ChargingProblem, plan: Plan) -> list[dict[str, Any]]:
    """The per-vehicle table: state, consumption, need, window, planned energy and slots, status."""
    demand = {ev.vehicle: ev for ev in problem.vehicles}
    unmet = {u.vehicle: u.reason for u in plan.unmet}
    rows = []
    for v in fleet.vehicles:
        vid = str(v.token_id)
        ev = demand[vid]
        rows.append(
            {
                "vehicle": vid,
                "soc_pct": round(v.soc_pct, 1),
                "usable_kwh": v.usable_kwh,
                "km_per_day": round(v.km_per_day, 1),
                "kwh_per_100km": None if v.kwh_per_100km is None else round(v.kwh_per_100km, 2),
                "range_km": None if v.range_km is None else round(v.range_km, 1),
                "need_kwh": round(ev.need_kwh, 2),
                "window": f"{ev.arrive_slot}..{ev.depart_slot}",
                "planned_kwh": round(plan.energy_kwh.get(vid, 0.0), 2),
                "slots": len(plan.schedule.get(vid, [])),
                "status": f"unmet: {unmet[vid]}" if vid in unmet else "ok",
            }
        )
    rows += [{"vehicle": str(s["token_id"]), "status": f"skipped: {s['reason']}"} for s in fleet.skipped]
    return rows


def attempt_text(a: dict[str, Any]) -> str:
    """One solver attempt for people: ``dynex failed (reason)``."""
    return f"{a.get('solver')} {a.get('outcome')}" + (f" ({a['reason']})" if a.get("reason") else "")


def run_plan(params: PlanChargingParams) -> tuple[PlanChargingResult, ChargingProblem, Plan]:
    """Telemetry → needs → :func:`gpu_jobs.charging.plan` → Parquet + PNG; the result, problem and plan."""
    from gpu_jobs.charging import plan as solve
    from gpu_jobs.models.charging.plots import plan_png

    t0 = time.perf_counter()
    site_file = load_site(params.site)  # before reading anything: a bad file fails fast
    fleet = fleet_states(params.dataset)
    source = add_consumption(fleet, params)
    problem = problem_of(snapshot(fleet, site_file))
    answer = solve(problem, params.solvers, seed=params.seed, time_limit_s=params.time_limit_s)
    baseline = solve(problem, ["greedy"], seed=params.seed, time_limit_s=params.time_limit_s)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{secrets.token_hex(2)}"
    plan_path = params.out / f"plan-{stamp}.parquet"
    plot_path = params.out / f"plan-{stamp}.png"
    rows = plan_rows(problem, answer)
    write_plan(rows, plan_path)
    from depin_core.fs import atomic_write_bytes

    atomic_write_bytes(plot_path, plan_png(problem, answer))
    result = PlanChargingResult(
        dataset=str(params.dataset),
        site_start=problem.site.start.isoformat(),
        slots=problem.site.slots,
        slot_minutes=problem.site.slot_minutes,
        solver=answer.solver,
        solvers=list(params.solvers),
        attempts=answer.attempts,
        feasible=answer.feasible,
        cost=round(answer.cost, 6),
        baseline_cost=round(baseline.cost, 6),
        saving=round(baseline.cost - answer.cost, 6),
        energy_kwh=round(sum(answer.energy_kwh.values()), 3),
        need_kwh=round(sum(ev.need_kwh for ev in problem.vehicles), 3),
        vehicles=len(problem.vehicles),
        skipped=len(fleet.skipped),
        skipped_vehicles=fleet.skipped,
        unmet=[u.model_dump(mode="json") for u in answer.unmet],
        consumption=source,
        plan_path=str(plan_path),
        plot_path=str(plot_path),
        wall_s=answer.wall_s,
        seconds=round(time.perf_counter() - t0, 3),
        per_vehicle=vehicle_rows(fleet, problem, answer),
    )
    return result, problem, answer


__all__ = [
    "PLANS_DIR",
    "Fleet",
    "PlanChargingParams",
    "PlanChargingResult",
    "SiteFile",
    "VehicleState",
    "Windows",
    "add_consumption",
    "attempt_text",
    "fleet_states",
    "load_site",
    "parse_site",
    "problem_of",
    "run_plan",
    "snapshot",
    "write_plan",
]
