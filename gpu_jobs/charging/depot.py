"""Build a :class:`ChargingProblem` from a fleet table (pyarrow, pandas or polars; one row per vehicle).

Columns (``FLEET_COLUMNS``): ``token_id`` (int or str), ``soc_pct`` (0..100), ``gross_kwh`` (battery),
``need_kwh`` (energy wanted by departure), ``arrive`` and ``depart`` (tz-aware datetimes), and optionally
``max_kw`` (on-board charger limit; null for none). The need is capped at what the battery can take,
``(100 - soc_pct)% x gross_kwh``. A vehicle is plugged in from the first whole slot after ``arrive`` to the
last whole slot before ``depart``, clipped to the site's horizon.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from gpu_jobs.charging.problem import ChargingProblem, EvDemand, Site

FLEET_COLUMNS = ("token_id", "soc_pct", "gross_kwh", "need_kwh", "arrive", "depart")


def _rows(table: Any) -> list[dict[str, Any]]:
    if hasattr(table, "to_pylist"):  # pyarrow.Table
        return list(table.to_pylist())
    if hasattr(table, "to_dicts"):  # polars.DataFrame
        return list(table.to_dicts())
    if hasattr(table, "to_dict"):  # pandas.DataFrame
        return list(table.to_dict(orient="records"))
    raise TypeError(
        f"fleet table must be a pyarrow Table or a pandas/polars DataFrame, not {type(table).__name__}"
    )


def _instant(value: Any, row: int, field: str) -> datetime:
    if hasattr(value, "to_pydatetime"):  # pandas.Timestamp
        value = value.to_pydatetime()
    if not isinstance(value, datetime):
        raise ValueError(f"fleet row {row}: {field}={value!r} is not a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"fleet row {row}: {field}={value!r} must be timezone-aware (UTC)")
    return value


def _number(value: Any, row: int, field: str, *, lo: float, hi: float = math.inf) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"fleet row {row}: {field}={value!r} is not a number") from None
    if not (lo <= x <= hi) or math.isnan(x):
        raise ValueError(f"fleet row {row}: {field}={value!r} must be within [{lo}, {hi}]")
    return x


def problem_from_table(table: Any, site: Site) -> ChargingProblem:
    """One ``EvDemand`` per row of ``table`` (see the module docstring); errors name the row and the column."""
    rows = _rows(table)
    if rows:
        missing = [c for c in FLEET_COLUMNS if c not in rows[0]]
        if missing:
            raise ValueError(f"fleet table lacks column(s) {missing}; it needs {list(FLEET_COLUMNS)}")
    vehicles: list[EvDemand] = []
    for i, r in enumerate(rows):
        soc = _number(r["soc_pct"], i, "soc_pct", lo=0, hi=100)
        gross = _number(r["gross_kwh"], i, "gross_kwh", lo=0)
        need = _number(r["need_kwh"], i, "need_kwh", lo=0)
        arrive = _instant(r["arrive"], i, "arrive")
        depart = _instant(r["depart"], i, "depart")
        if arrive >= depart:
            raise ValueError(
                f"fleet row {i}: arrive={arrive.isoformat()} must be before depart={depart.isoformat()}"
            )
        slot_s = site.slot_minutes * 60
        a = max(0, math.ceil((arrive - site.start).total_seconds() / slot_s))
        d = min(site.slots, math.floor((depart - site.start).total_seconds() / slot_s))
        if a >= d:
            raise ValueError(
                f"fleet row {i} (token_id={r['token_id']}): plugged in {arrive.isoformat()}..{depart.isoformat()} "
                f"covers no whole slot of the site's horizon ({site.start.isoformat()}, {site.slots} slots); "
                "leave it out or move the horizon"
            )
        max_kw = r.get("max_kw")
        vehicles.append(
            EvDemand(
                vehicle=str(r["token_id"]),
                need_kwh=round(min(need, (100 - soc) / 100 * gross), 3),
                arrive_slot=a,
                depart_slot=d,
                max_kw=None
                if max_kw is None or (isinstance(max_kw, float) and math.isnan(max_kw))
                else max_kw,
            )
        )
    return ChargingProblem(site=site, vehicles=vehicles)
