"""The anomaly function's raw-telemetry request form: ``{"telemetry": [row, …]}``.

Rows of one or more vehicles (DIMO signal names and units, as in the telemetry table) are cut into the
model's fixed windows by :func:`features.anomaly_windows` — the code that built the training windows — with
the tyre baselines of :func:`features.tire_baselines` over the rows sent, exactly as the batch scorer does
over its input. Send a vehicle's longer history (hours to days) with the window of interest: a tyre's usual
offset is learned from the rows sent, so one window alone cannot show a slow leak. One output row per window,
with ``window`` saying which (vehicle, start, end, powertrain) and the engineered row it became.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import polars as pl

from gpu_jobs.errors import InvalidInput
from gpu_jobs.models import features as F
from gpu_jobs.models import raw as R
from gpu_jobs.models.anomaly import features as AF
from gpu_jobs.models.base import Derived


class AnomalyRows(Protocol):
    """What the telemetry form reads of the anomaly online model (``online.AnomalyOnline``), named here so
    that the online model can import its forms without an import cycle."""

    @property
    def types(self) -> Sequence[str]: ...  # the powertrain types the model knows, in its one-hot order
    @property
    def names(self) -> Sequence[str]: ...  # every feature column of any type
    @property
    def order(self) -> Mapping[str, Sequence[str]]: ...  # powertrain type → its feature names


MIN_ROWS = 10  # anomaly_windows' default: a window with fewer buckets is not scored (as in training)


class AnomalyTelemetry:
    """``{"telemetry": [row, …]}`` → one score per complete window (see the module docstring)."""

    key = "telemetry"
    title = "raw telemetry rows of one or more vehicles (DIMO signal names and units)"
    row_key = "window"

    def __init__(self, model: AnomalyRows, config: dict[str, Any]) -> None:
        self.model = model
        self.minutes = int(config["hyperparameters"]["window_minutes"])
        self.rows = R.TelemetryRows(F.SIGNALS, key=self.key)
        types = ", ".join(f'"{t}"' for t in model.types)
        self.schema = self.rows.schema(
            f"telemetry of one or more vehicles, one row per time bucket. A window is {self.minutes} min on the "
            f"epoch-aligned grid (e.g. 08:00-08:{self.minutes:02d} UTC) with at least {MIN_ROWS} rows of one "
            f"vehicle whose {F.POWERTRAIN} is one of {types}. Tyre offsets are learned from the rows sent: "
            "include the vehicle's recent history (hours to days) to see slow tyre leaks."
        )
        self.row_schema = {
            "type": "object",
            "description": "the window this row scores",
            "properties": {
                "token_id": {"type": ["integer", "null"], "description": "the vehicle (null: not given)"},
                "start": {"type": "string", "format": "date-time", "description": "window start"},
                "end": {"type": "string", "format": "date-time", "description": "window end (exclusive)"},
                "powertrain": {"enum": list(model.types)},
                "rows": {"type": "integer", "description": "telemetry rows in the window"},
                "features": {
                    "type": "object",
                    "description": "the engineered row the window became (send it as inputs for the same answer)",
                },
            },
            "required": ["token_id", "start", "end", "powertrain", "rows", "features"],
        }
        self.notes_schema: dict[str, dict[str, Any]] = {}
        self.example = self._example()

    def _example(self) -> list[dict[str, Any]]:
        """12 one-minute buckets of one vehicle per powertrain type the model knows (works as is)."""
        rows: list[dict[str, Any]] = []
        for k, t in enumerate(self.model.types):
            for m in range(12):
                moving = m >= 6
                row: dict[str, Any] = {
                    "token_id": 17 + k,
                    "timestamp": f"2026-05-04T08:{m:02d}:00Z",
                    F.POWERTRAIN: t,
                    F.SPEED: 40.0 if moving else 0.0,
                    F.IGNITION: 1.0 if moving else 0.0,
                    F.AIR: 12.5,
                    F.V12: 14.1 if moving else 12.6,
                    **dict.fromkeys(F.TIRES, 240.0),
                }
                if t == F.ELECTRIC:
                    row |= {F.BATT_TEMP: 20.0 + m * 0.2, F.POWER: -15_000.0 if moving else 0.0,
                            F.CHARGING: 0.0, F.SOC: 70.0 - m * 0.1}  # fmt: skip
                else:
                    row |= {F.RPM: 1900.0 if moving else 0.0, F.LOAD: 30.0 if moving else 0.0,
                            F.COOLANT: 60.0 + m * 2.0, F.FUEL: 55.0}  # fmt: skip
                rows.append(row)
        return rows

    def derive(self, value: Any) -> Derived:
        df = self.rows.parse(value)
        m = self.model
        windows = AF.anomaly_windows(df, window_minutes=self.minutes, baselines=AF.tire_baselines(df))
        windows = windows.filter(pl.col("powertrain").is_in(list(m.types))).sort("token_id", "window_start")
        if windows.is_empty():
            raise InvalidInput(self.key, f"no complete window in these rows: {self._why(df)}")
        cols: dict[str, np.ndarray] = {"powertrain": windows["powertrain"].to_numpy().astype(object)}
        for n in m.names:
            cols[n] = R.float_col(windows[n])
        about = []
        for i, w in enumerate(windows.iter_rows(named=True)):
            t = w["powertrain"]
            feats = {n: R.finite_or_none(cols[n][i]) for n in m.order[t]}
            about.append({
                "token_id": R.token_out(w["token_id"]), "start": R.rfc3339(w["window_start"]),
                "end": R.rfc3339(w["window_end"]), "powertrain": t, "rows": int(w["rows"]),
                "features": {"powertrain": t, **{k: v for k, v in feats.items() if v is not None}},
            })  # fmt: skip
        return Derived(cols, about)

    def _why(self, df: pl.DataFrame) -> str:
        """What the rows lack for a window, and what to send."""
        types = self.model.types
        known = df.filter(pl.col(F.POWERTRAIN).is_in(list(types)))
        want = f"{F.POWERTRAIN} one of {', '.join(map(repr, types))}"
        if known.is_empty():
            return f"no row has {want}; send it on the rows"
        counts = known.group_by("token_id", pl.col("timestamp").dt.truncate(f"{self.minutes}m")).len()
        most = int(counts["len"].max() or 0)  # type: ignore[arg-type]
        return (
            f"a window is {self.minutes} min on the epoch-aligned grid with at least {MIN_ROWS} rows of one "
            f"vehicle with {want}; the fullest window here has {most} row(s): send more buckets (e.g. one a "
            f"minute for the whole {self.minutes} min)"
        )
