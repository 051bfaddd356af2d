"""Raw telemetry rows as a request form: JSON objects shaped like the telemetry table → a conformed frame.

A row is one vehicle and time bucket, as in ``connectors.dimo.schema``: ``timestamp`` (RFC 3339), optional
``token_id`` (rows without it are one unnamed vehicle) and DIMO signals by their DIMO names and units
(``speed`` in km/h, ``powertrainTransmissionTravelledDistance`` in km, …), each optional (absent or null = not
reported). :class:`TelemetryRows` validates them with errors naming ``telemetry[i].<field>`` and what to send,
and builds the small polars frame the families' own feature code (``trip_windows``, ``anomaly_windows``) reads
— the code that built the training data, so serving and training cannot drift apart.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from connectors.dimo.catalog import signal_catalog
from gpu_jobs.errors import InvalidInput
from gpu_jobs.models import features as F
from gpu_jobs.models.online import Matrix, NumberField, json_type, short

MAX_ROWS = 20_000  # per request: a day of one vehicle at 1-minute buckets is 1 440
POWERTRAINS = ("ELECTRIC", "COMBUSTION", "HYBRID")  # DIMO's powertrainType values
TIME_EXAMPLE = "2026-05-04T08:00:00Z"

# plausibility bounds of raw signals (minimum, maximum, example), generous on purpose
SIGNAL_LIMITS: dict[str, tuple[float, float, float]] = {
    F.SPEED: (0.0, 400.0, 48.0),
    F.ODOMETER: (0.0, 10_000_000.0, 12_345.6),
    F.IGNITION: (0.0, 1.0, 1.0),
    F.AIR: (-90.0, 70.0, 12.5),
    F.V12: (0.0, 100.0, 12.6),
    F.SOC: (0.0, 100.0, 80.0),
    F.GROSS: (0.0, 1000.0, 64.0),
    F.SOH: (0.0, 100.0, 95.0),
    F.POWER: (-2_000_000.0, 2_000_000.0, -12_000.0),
    F.BATT_TEMP: (-60.0, 100.0, 22.0),
    F.CHARGING: (0.0, 1.0, 0.0),
    F.RPM: (0.0, 20_000.0, 2100.0),
    F.LOAD: (0.0, 100.0, 35.0),
    F.FUEL: (0.0, 100.0, 60.0),
    F.COOLANT: (-60.0, 200.0, 90.0),
    **{t: (0.0, 1000.0, 240.0) for t in F.TIRES},
}


def signal_field(name: str) -> NumberField:
    """The input field of a float DIMO signal: catalog unit and description, :data:`SIGNAL_LIMITS` bounds."""
    sig = signal_catalog()[name]
    unit = sig.unit or ("0/1" if sig.is_flag else "1")
    lo, hi, ex = SIGNAL_LIMITS.get(name, (-1e12, 1e12, 0.0))
    return NumberField(name, unit, sig.description.rstrip("."), False, lo, hi, example=ex)


class TelemetryRows:
    """Validates JSON telemetry rows of the float ``signals`` (plus ``powertrainType``) under body key ``key``."""

    def __init__(
        self, signals: Sequence[str] = F.SIGNALS, *, key: str = "telemetry", max_rows: int = MAX_ROWS
    ):
        self.key = key
        self.max_rows = max_rows
        self.floats = [signal_field(s) for s in signals if s != F.POWERTRAIN]
        self.powertrain = F.POWERTRAIN in signals
        self.matrix = Matrix(self.floats, prefix=key)
        self.allowed = frozenset(["token_id", "timestamp", *(f.name for f in self.floats)]
                                 + ([F.POWERTRAIN] if self.powertrain else []))  # fmt: skip

    def row_schema(self) -> dict[str, Any]:
        """JSON Schema (2020-12) of one telemetry row."""
        props: dict[str, Any] = {
            "token_id": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                         "description": "the vehicle (DIMO token id); rows without it are one unnamed vehicle"},
            "timestamp": {"type": "string", "format": "date-time",
                          "description": f"bucket start, RFC 3339, e.g. {TIME_EXAMPLE}"},
        }  # fmt: skip
        for f in self.floats:
            props[f.name] = {
                "type": ["number", "null"],
                "minimum": f.minimum,
                "maximum": f.maximum,
                "description": f"{f.description} [{f.unit}]; absent or null = not reported",
                "x-unit": f.unit,
            }
        if self.powertrain:
            props[F.POWERTRAIN] = {
                "enum": [*POWERTRAINS, None],
                "description": "the vehicle's powertrain type",
            }
        return {
            "title": "telemetry row: one vehicle and time bucket (DIMO signal names and units)",
            "type": "object",
            "properties": props,
            "required": ["timestamp"],
            "additionalProperties": False,
        }

    def schema(self, description: str) -> dict[str, Any]:
        """JSON Schema of the form's value: an array of telemetry rows."""
        return {
            "type": "array",
            "items": self.row_schema(),
            "minItems": 1,
            "maxItems": self.max_rows,
            "description": description,
        }

    def parse(self, value: Any) -> pl.DataFrame:
        """Validate ``value`` → the conformed telemetry frame sorted by ``(token_id, timestamp)`` (a row
        without ``token_id`` gets ``-1``); ``InvalidInput`` naming ``telemetry[i].<field>`` and what to send."""
        key = self.key
        if not isinstance(value, list):
            raise InvalidInput(key, f"expected an array of telemetry rows, got {json_type(value)}; send "
                               f'[{{"timestamp": "{TIME_EXAMPLE}", "speed": 48.0, …}}, …]')  # fmt: skip
        if not value:
            raise InvalidInput(key, f'empty; send at least one row, e.g. {{"timestamp": "{TIME_EXAMPLE}"}}')
        if len(value) > self.max_rows:
            raise InvalidInput(key, f"{len(value)} rows exceed {self.max_rows}; send at most {self.max_rows} "
                               "rows per request (split by vehicle or time)")  # fmt: skip
        tokens: list[int] = []
        times: list[datetime] = []
        for i, r in enumerate(value):
            if type(r) is not dict:
                raise InvalidInput(f"{key}[{i}]", f"expected an object, got {json_type(r)}; send "
                                   f'{{"timestamp": "{TIME_EXAMPLE}", "speed": 48.0, …}}')  # fmt: skip
            if not r.keys() <= self.allowed:
                extra = sorted(str(k) for k in r if k not in self.allowed)[0]
                raise InvalidInput(f"{key}[{i}].{extra}", self._unexpected(extra))
            tokens.append(self._token(r.get("token_id", -1), i))
            times.append(self._time(r.get("timestamp"), i, "timestamp" in r))
        arr = self.matrix.parse(value, range(len(value)))
        cols: dict[str, Any] = {
            "token_id": pl.Series("token_id", tokens, pl.Int64),
            "timestamp": pl.Series("timestamp", times, pl.Datetime("us", "UTC")),
        }
        for j, f in enumerate(self.floats):
            cols[f.name] = pl.Series(f.name, arr[:, j], pl.Float64, nan_to_null=True)
        if self.powertrain:
            cols[F.POWERTRAIN] = pl.Series(F.POWERTRAIN, self._powertrains(value), pl.Utf8)
        df = pl.DataFrame(cols).with_row_index("_i")
        dup = df.filter(pl.struct("token_id", "timestamp").is_duplicated()).sort("_i")
        if dup.height:
            i, j = dup["_i"][1], dup["_i"][0]
            raise InvalidInput(f"{key}[{i}].timestamp", f"same vehicle and time as {key}[{j}]; send one row per "
                               "vehicle and time bucket (merge their signals into one row)")  # fmt: skip
        return F.conform(df.drop("_i")).sort(F.KEYS)

    def _unexpected(self, name: str) -> str:
        if name in signal_catalog():
            return f"this model does not read the DIMO signal {name}; drop it (it reads: {self._names()})"
        close = difflib.get_close_matches(name, sorted(self.allowed), n=1)
        guess = f"did you mean {close[0]}? " if close else ""
        return f"unexpected field; {guess}send DIMO signal names (case-sensitive) this model reads: {self._names()}"

    def _names(self) -> str:
        return ", ".join(["token_id", "timestamp", *sorted(self.allowed - {"token_id", "timestamp"})])

    def _token(self, v: Any, i: int) -> int:
        if type(v) is int and (v == -1 or 0 <= v < 2**63):
            return v
        raise InvalidInput(f"{self.key}[{i}].token_id", f"expected the vehicle's integer token id, got "
                           f"{json_type(v)} {short(v)}; send e.g. 17 (or leave it out)")  # fmt: skip

    def _time(self, v: Any, i: int, present: bool) -> datetime:
        where = f"{self.key}[{i}].timestamp"
        want = f'send the bucket start as an RFC 3339 string, e.g. "{TIME_EXAMPLE}"'
        if not present:
            raise InvalidInput(where, f"missing; {want}")
        if type(v) is not str:
            raise InvalidInput(where, f"expected a string, got {json_type(v)} {short(v)}; {want}")
        try:
            dt = datetime.fromisoformat(v.strip().replace("Z", "+00:00").replace("z", "+00:00"))
            dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
            if not 1970 <= dt.year <= 2200:
                raise ValueError(dt.year)
        except (ValueError, OverflowError):
            raise InvalidInput(
                where, f"{short(v)} is not an RFC 3339 time between 1970 and 2200; {want}"
            ) from None
        return dt

    def _powertrains(self, rows: list[dict[str, Any]]) -> list[str | None]:
        out = [r.get(F.POWERTRAIN) for r in rows]
        for i, v in enumerate(out):
            if v is not None and v not in POWERTRAINS:
                raise InvalidInput(f"{self.key}[{i}].{F.POWERTRAIN}", f"{short(v)} is not a powertrain type; send "
                                   f"one of {', '.join(map(repr, POWERTRAINS))} (or null)")  # fmt: skip
        return out


def rfc3339(v: Any) -> str | None:
    """A polars/Python datetime as an RFC 3339 UTC string (None stays None)."""
    if v is None:
        return None
    dt = v if v.tzinfo else v.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def token_out(v: int) -> int | None:
    """A frame's token id as the caller sent it (``-1``, the unnamed vehicle, → None)."""
    return None if v is None or v < 0 else int(v)


def finite_or_none(v: Any) -> float | None:
    """A JSON-able float: NaN, inf and None → None."""
    if v is None:
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def float_col(series: pl.Series) -> np.ndarray:
    """A frame column as float64 numpy with nulls as NaN (the row models' "not measured")."""
    return series.cast(pl.Float64).fill_null(np.nan).to_numpy().astype(np.float64, copy=True)
