"""A fleet snapshot: what the ``charging-plan`` function takes (one input row) and turns into a problem.

``{"site": Site, "fleet": [row, …]}``: the depot (:class:`gpu_jobs.charging.Site`, ``start`` a UTC instant)
and one row per vehicle, the columns of :func:`gpu_jobs.charging.problem_from_table`: ``token_id``,
``soc_pct``, ``gross_kwh``, ``need_kwh`` (energy wanted by departure), ``arrive``/``depart`` (RFC 3339
instants, tz-aware) and optionally ``max_kw``. The need is capped at what the battery can take and the
window cut to whole slots of the horizon by that function: the served planner and the ``plan_charging``
flow build the same problem from the same rows.
"""

from __future__ import annotations

import re
from datetime import UTC, timedelta
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from gpu_jobs.charging import ChargingProblem, Plan, Site, ev_kw, problem_from_table
from gpu_jobs.errors import InvalidInput


class FleetRow(BaseModel):
    """One vehicle of a snapshot."""

    model_config = ConfigDict(extra="forbid")

    token_id: int | str = Field(description="the vehicle (DIMO token id)")
    soc_pct: float = Field(ge=0, le=100, description="state of charge now [percent]")
    gross_kwh: float = Field(gt=0, le=1000, description="battery capacity [kWh]")
    need_kwh: float = Field(ge=0, le=10_000, description="energy wanted by departure [kWh]")
    arrive: AwareDatetime = Field(description="plugged in from (RFC 3339, with offset)")
    depart: AwareDatetime = Field(description="leaves at (RFC 3339, with offset)")
    max_kw: float | None = Field(None, gt=0, le=1000, description="on-board charger limit [kW]; null: none")


class FleetSnapshot(BaseModel):
    """The depot and its vehicles now: one input row of ``charging-plan``."""

    model_config = ConfigDict(extra="forbid")

    site: Site
    fleet: list[FleetRow] = Field(min_length=1, description="one row per vehicle to charge")

    def problem(self) -> ChargingProblem:
        """The charging problem of this snapshot (``ValueError`` naming the fleet row when a window covers
        no whole slot of the horizon)."""
        import pyarrow as pa

        rows = [{**r.model_dump(), "token_id": str(r.token_id)} for r in self.fleet]
        return problem_from_table(pa.Table.from_pylist(rows), self.site)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_snapshot(row: Any, where: str, max_vehicles: int) -> ChargingProblem:
    """Validate one JSON-decoded snapshot → its problem; ``InvalidInput`` naming ``<where>.<field>``."""
    if not isinstance(row, dict):
        raise InvalidInput(where, 'expected an object {"site": {…}, "fleet": [{…}, …]}')
    try:
        snap = FleetSnapshot.model_validate(row)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [p for p in err["loc"] if p not in ("int", "str")]  # the union's branch names
        raise InvalidInput(f"{where}{_loc(tuple(loc))}", f"{err['msg']}; see the input schema") from None
    if len(snap.fleet) > max_vehicles:
        raise InvalidInput(
            f"{where}.fleet",
            f"{len(snap.fleet)} vehicles, over this planner's {max_vehicles}; split the depot",
        )
    try:
        return snap.problem()
    except ValueError as e:
        row = re.match(r"fleet row (\d+)", str(e))  # problem_from_table names the row
        raise InvalidInput(f"{where}.fleet" + (f"[{row[1]}]" if row else ""), str(e)) from None


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON Schema with its ``$defs`` inlined (served schemas are embedded in other documents,
    where ``#/$defs/…`` would not resolve). The models here are not recursive."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def charging_rows(problem: ChargingProblem, plan: Plan) -> list[dict[str, Any]]:
    """One row per (vehicle, slot) the plan charges in: vehicle, slot, start (UTC, RFC 3339), kW."""
    site = problem.site
    kw = {ev.vehicle: ev_kw(site, ev) for ev in problem.vehicles}
    step = timedelta(minutes=site.slot_minutes)
    return [
        {
            "vehicle": v,
            "slot": s,
            "start": (site.start + s * step).astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "kw": kw[v],
        }
        for v, slots in sorted(plan.schedule.items())
        for s in slots
    ]
