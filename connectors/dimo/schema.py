"""The Arrow contract between ``connectors`` and ``gpu_jobs``: DIMO telemetry as one row per vehicle and bucket.

Columns, in order:

- ``token_id``  int64, not null: the vehicle NFT token id.
- ``timestamp`` timestamp[us, UTC], not null: the bucket start (``from + k·interval``).
- one column per requested signal, named exactly as the DIMO signal: ``float64`` for Float signals,
  ``string`` for String signals; null where the vehicle reported nothing in the bucket.
- ``latitude`` / ``longitude`` float64, when location (``currentLocationCoordinates``) is requested.

Each signal field carries metadata ``unit`` and ``agg`` (the aggregation used for the bucket). The schema
carries ``depin.schema = dimo-telemetry/1`` and ``depin.interval`` (the bucket width, Go duration string).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

from connectors.dimo.catalog import signal_catalog
from depin_core.errors import ConfigError

SCHEMA_ID = "dimo-telemetry/1"
KEY_COLUMNS = ("token_id", "timestamp")
LOCATION_SIGNAL = "currentLocationCoordinates"
LOCATION_COLUMNS = ("latitude", "longitude")
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")

KEY_FIELDS = (
    pa.field("token_id", pa.int64(), nullable=False),
    pa.field("timestamp", TIMESTAMP_TYPE, nullable=False),
)


def resolve_signals(names: Iterable[str]) -> list[str]:
    """Validate signal names against the catalog and return them deduplicated in catalog order."""
    catalog = signal_catalog()
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in catalog]
    if unknown:
        raise ConfigError(
            f"signals: unknown DIMO signal(s) {unknown}; names are case-sensitive, e.g. 'speed', "
            "'powertrainTransmissionTravelledDistance' (see `depin signals` or connectors/dimo/signals.tsv)"
        )
    order = {n: i for i, n in enumerate(catalog)}
    return sorted(wanted, key=order.__getitem__)


def signal_fields(name: str, agg: str | None = None) -> list[pa.Field]:
    """The Arrow field(s) holding one signal (location expands to latitude/longitude)."""
    sig = signal_catalog()[name]
    agg = agg or sig.default_agg
    if sig.gql_type == "Location":
        meta = {"unit": "degrees", "agg": agg, "signal": name}
        return [pa.field(col, pa.float64(), metadata=meta) for col in LOCATION_COLUMNS]
    arrow_type = pa.string() if sig.gql_type == "String" else pa.float64()
    return [pa.field(name, arrow_type, metadata={"unit": sig.unit, "agg": agg})]


def telemetry_schema(
    signals: Iterable[str], *, interval: str | None = None, aggs: Mapping[str, str] | None = None
) -> pa.Schema:
    """Build the telemetry table schema for ``signals`` (validated, catalog order)."""
    aggs = aggs or {}
    fields = list(KEY_FIELDS)
    for name in resolve_signals(signals):
        fields.extend(signal_fields(name, aggs.get(name)))
    meta = {"depin.schema": SCHEMA_ID}
    if interval:
        meta["depin.interval"] = interval
    return pa.schema(fields, metadata=meta)


def validate_table(table: pa.Table) -> None:
    """Check that ``table`` follows the contract: key columns typed and not null, known signal columns."""
    for f in KEY_FIELDS:
        if f.name not in table.column_names:
            raise ConfigError(
                f"telemetry table lacks key column {f.name!r}; it must follow connectors.dimo.schema"
            )
        actual = table.schema.field(f.name).type
        if actual != f.type:
            raise ConfigError(f"telemetry column {f.name!r} has type {actual}, expected {f.type}")
        if table.column(f.name).null_count:
            raise ConfigError(f"telemetry column {f.name!r} has nulls; key columns must be set on every row")
    catalog = signal_catalog()
    for name in table.column_names:
        if name not in KEY_COLUMNS and name not in LOCATION_COLUMNS and name not in catalog:
            raise ConfigError(f"telemetry column {name!r} is not a DIMO signal")


def signals_of_columns(column_names: Iterable[str]) -> list[str]:
    """The DIMO signals behind a table's columns (``latitude``/``longitude`` map to the location signal)."""
    out: list[str] = []
    for name in column_names:
        if name in KEY_COLUMNS:
            continue
        out.append(LOCATION_SIGNAL if name in LOCATION_COLUMNS else name)
    return list(dict.fromkeys(out))


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder ``table``'s columns to ``schema``, adding all-null columns for signals it lacks."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)
