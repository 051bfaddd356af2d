"""The telemetry dataset: a Delta Lake table (delta-rs), append-only, whose commits carry the watermarks.

Layout at ``uri`` (a local directory or ``s3://bucket/prefix``)::

    _delta_log/00000000000000000000.json …   the table's log: every version, schema, watermarks
    date=YYYY-MM-DD/part-<uuid>.zstd.parquet  data files, partitioned by UTC day; an append writes its rows
                                               sorted by (token_id, timestamp), ``optimize`` Z-orders them
                                               (``read`` always returns them sorted)

Columns are the Arrow contract of :mod:`connectors.dimo.schema` plus the partition column ``date`` (date32),
which :meth:`TelemetryStore.read` drops. The schema id and bucket width live in the table description (Delta
drops schema-level metadata); ``unit``/``agg`` field metadata is kept as Delta column metadata.

Exactly-once. One append is one Delta commit holding the new files *and* the watermark of every vehicle the
write completes, as Delta application transactions (app id ``depin-ingest:<token_id>``, version = the
watermark in µs since the epoch). Files are staged first, then committed, so:

- a crash before the commit leaves orphan files no reader sees (``vacuum`` removes them) and unchanged
  watermarks: the rerun writes the same rows once;
- a crash after the commit leaves rows and watermarks in place together: the rerun skips those vehicles.

Rows at or behind their vehicle's watermark are already stored and are dropped on append (a retried write is a
no-op); a watermark never moves back. Two writers appending disjoint vehicles both commit (delta-rs rebases
blind appends; on S3 each commit is a conditional ``PUT If-None-Match``, so no lock service is needed); two
writers racing on one vehicle conflict on its app id, and the loser re-reads the watermarks and retries.

A write costs O(new rows): nothing already stored is read or rewritten. A new signal column is added to the
table schema (``ALTER TABLE ADD COLUMN``) before the files that carry it are committed; older files are not
rewritten and read as nulls. Compaction (``optimize``) and ``vacuum`` are separate maintenance commands.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, Field, Transaction
from deltalake.exceptions import CommitFailedError
from pydantic import BaseModel

from connectors.dimo import _delta
from connectors.dimo.location import TableLocation
from connectors.dimo.schema import KEY_COLUMNS, KEY_FIELDS, SCHEMA_ID, conform_table, validate_table
from depin_core.errors import ConfigError

log = logging.getLogger(__name__)

APP_PREFIX = "depin-ingest:"
TABLE_NAME = "dimo-telemetry"
PARTITION = "date"
_DATE_FIELD = pa.field(PARTITION, pa.date32())
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_US = 86_400_000_000
_COMMIT_ATTEMPTS = 20


class WriteResult(BaseModel):
    """What one append did. ``rows_in - rows_added - rows_skipped`` rows were duplicates within the input."""

    rows_in: int
    rows_added: int
    rows_skipped: int  # at or behind their vehicle's watermark: stored already (a retried write)
    partitions: list[str]
    version: int | None  # the table version this write committed; None when it had nothing to commit


class VersionFile(BaseModel):
    """One data file of a table version (``path`` is table-relative)."""

    path: str
    size: int
    rows: int


class StoreSummary(BaseModel):
    """Size and extent of a dataset (rows, extent and bytes come from the log, not from a scan)."""

    root: str
    version: int | None
    rows: int
    vehicles: int
    first: datetime | None
    last: datetime | None
    partitions: int
    files: int
    columns: list[str]
    interval: str | None
    bytes: int


def _utc(dt: datetime, what: str) -> datetime:
    if not isinstance(dt, datetime):
        raise ConfigError(f"{what}: expected a datetime, got {type(dt).__name__}")
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _us(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _meta(schema: pa.Schema, key: bytes) -> str | None:
    value = (schema.metadata or {}).get(key)
    return value.decode() if value else None


def _int_keys(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """token_id and timestamp (µs since epoch) as int64 numpy arrays."""
    tok = table.column("token_id").to_numpy()
    ts = pc.cast(table.column("timestamp"), pa.int64()).to_numpy()
    return tok, ts


def _dedupe_sorted(table: pa.Table) -> pa.Table:
    """Sort by (token_id, timestamp), keeping the last row of each key (a later row in the input wins)."""
    tok, ts = _int_keys(table)
    order = np.lexsort((ts, tok))
    tok_s, ts_s = tok[order], ts[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (tok_s[1:] != tok_s[:-1]) | (ts_s[1:] != ts_s[:-1])
    return table.take(order[last])


def _day_name(day: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=day)).isoformat()


def _app_id(token_id: int) -> str:
    return f"{APP_PREFIX}{int(token_id)}"


class TelemetryStore:
    """The telemetry Delta table at ``where`` (a directory or ``s3://…``), created on first write.

    ``before_commit`` is called after a write's files are staged and before they are committed (crash tests).
    """

    def __init__(
        self,
        where: TableLocation | str | Path,
        *,
        storage_options: dict[str, str] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.location = TableLocation.of(where, storage_options)
        self.root = self.location.uri
        self._before_commit = before_commit
        self._dt: DeltaTable | None = None
        self._marks: dict[int, int] = {}  # µs, as of self._marks_version
        self._marks_version = -1

    def __repr__(self) -> str:
        return f"TelemetryStore({self.root!r})"

    # ------------------------------------------------------------------ table

    def _table(self, version: int | None = None) -> DeltaTable | None:
        """The table at ``version`` (latest when None, refreshed), or None before the first write."""
        if version is not None:
            dt = _delta.open_table(self.location, version)
            if dt is None:
                raise ConfigError(f"dataset {self.root} has no table yet; version {version} does not exist")
            return dt
        if self._dt is None:
            self._dt = _delta.open_table(self.location)
            if self._dt is None:
                self._refuse_old_layout()
        else:
            self._dt.update_incremental()
        return self._dt

    def _refuse_old_layout(self) -> None:
        if self.location.is_local and (self.location.path / "_depin" / "state.json").is_file():
            raise ConfigError(
                f"dataset {self.root} is a Parquet dataset of depin-pipeline's earlier layout; convert it with "
                f"`depin dataset migrate {self.root} NEW_DIR` and use NEW_DIR"
            )

    def exists(self) -> bool:
        """True once the table has been created."""
        return self._table() is not None

    def version(self) -> int | None:
        """The latest table version, or None before the first write."""
        dt = self._table()
        return dt.version() if dt is not None else None

    def _description(self, dt: DeltaTable) -> dict[str, Any]:
        try:
            doc = json.loads(dt.metadata().description or "{}")
        except ValueError:
            doc = {}
        return doc if isinstance(doc, dict) else {}

    @property
    def interval(self) -> str | None:
        """The bucket width of every row in the dataset (Go duration), or None when unknown or empty."""
        dt = self._table()
        return self._description(dt).get("interval") if dt is not None else None

    def schema(self, version: int | None = None) -> pa.Schema | None:
        """The dataset's Arrow schema (contract columns, ``depin.*`` metadata; no ``date``), or None."""
        dt = self._table(version)
        if dt is None:
            return None
        return self._contract_schema(dt)

    def _contract_schema(self, dt: DeltaTable) -> pa.Schema:
        full = pa.schema(dt.schema().to_arrow())
        doc = self._description(dt)
        meta = {"depin.schema": doc.get("schema") or SCHEMA_ID}
        if doc.get("interval"):
            meta["depin.interval"] = doc["interval"]
        return pa.schema([f for f in full if f.name != PARTITION], metadata=meta)

    def ensure(self, *, interval: str | None) -> None:
        """Create the (empty) table if missing, recording the bucket width; check it if present."""
        dt = self._table()
        if dt is None:
            self._create(pa.schema(list(KEY_FIELDS)), interval)
            return
        held = self._description(dt).get("interval")
        if interval and held and held != interval:
            raise ConfigError(
                f"interval: the dataset at {self.root} holds {held} buckets, not {interval}; use the same "
                "--interval or another dataset"
            )

    def _create(self, schema: pa.Schema, interval: str | None) -> DeltaTable:
        try:
            DeltaTable.create(
                self.location.uri,
                pa.schema([*schema, _DATE_FIELD]),
                mode="ignore",  # a table created before we looked is ours too
                partition_by=[PARTITION],
                name=TABLE_NAME,
                description=json.dumps({"schema": SCHEMA_ID, "interval": interval}),
                storage_options=self.location.storage_options or None,
            )
        except CommitFailedError:
            # A concurrent creator committed version 0 first ("protocol changed": seen with 4 shards starting
            # on a new table). Its table is ours too: the caller checks its schema and adds missing columns.
            log.info("dataset %s: created meanwhile by another writer", self.root)
        self._dt = None
        dt = self._table()
        assert dt is not None
        return dt

    # ------------------------------------------------------------- watermarks

    def _refresh_marks(self, dt: DeltaTable) -> None:
        """Bring the cached watermarks up to ``dt``'s version (reads only the commits since the last call)."""
        version = dt.version()
        if version == self._marks_version:
            return
        txns, base = None, {}
        if 0 <= self._marks_version < version:
            txns = _delta.app_transactions_between(self.location, self._marks_version, version, APP_PREFIX)
            base = self._marks
        if txns is None:
            txns, base = _delta.app_transactions(self.location, version, APP_PREFIX), {}
        if txns is None:  # the log cannot be read in one pass: ask delta-rs vehicle by vehicle
            ids = set(self._marks) | set(self._distinct_token_ids(dt))
            found = {_app_id(t): dt.transaction_version(_app_id(t)) for t in ids}
            txns = {app: v for app, v in found.items() if v is not None}
        marks = dict(base)
        for app, us in txns.items():  # later commits win, as in Delta
            marks[int(app.removeprefix(APP_PREFIX))] = us
        self._marks, self._marks_version = marks, version

    def _distinct_token_ids(self, dt: DeltaTable) -> list[int]:
        """The vehicles with rows, scanning ``token_id`` batch by batch (memory: the ids, not the rows)."""
        seen: set[int] = set()
        for batch in dt.to_pyarrow_dataset().to_batches(columns=["token_id"]):
            seen.update(pc.unique(batch.column(0)).to_pylist())
        return sorted(seen)

    def watermarks(self, token_ids: Iterable[int] | None = None) -> dict[int, datetime]:
        """Per-vehicle watermarks (exclusive end of the window fully stored), all or for ``token_ids``."""
        dt = self._table()
        if dt is None:
            return {}
        self._refresh_marks(dt)
        wanted = self._marks if token_ids is None else {int(t) for t in token_ids}
        return {t: _from_us(self._marks[t]) for t in wanted if t in self._marks}

    def watermark(self, token_id: int) -> datetime | None:
        """Exclusive end of the window fully stored for ``token_id``, or None when nothing is."""
        return self.watermarks([token_id]).get(int(token_id))

    def set_watermarks(self, watermarks: Mapping[int, datetime]) -> int | None:
        """Advance watermarks without rows (a window complete but empty), as one commit; never moves one back."""
        if not self.exists():
            self.ensure(interval=None)
        return self.append(pa.schema(list(KEY_FIELDS)).empty_table(), watermarks=watermarks).version

    # ------------------------------------------------------------------ write

    def _prepare(self, table: pa.Table) -> DeltaTable:
        """The table, created or evolved so that it has every column of ``table``; refuses conflicts."""
        interval = _meta(table.schema, b"depin.interval")
        schema_id = _meta(table.schema, b"depin.schema") or SCHEMA_ID
        dt = self._table()
        if dt is None:
            fields = list(KEY_FIELDS) + [f for f in table.schema if f.name not in KEY_COLUMNS]
            dt = self._create(pa.schema(fields), interval)
        doc = self._description(dt)
        if schema_id != (doc.get("schema") or SCHEMA_ID):
            raise ConfigError(
                f"table has schema {schema_id!r} but the dataset at {self.root} holds {doc.get('schema')!r}; "
                "write it to another dataset"
            )
        held = doc.get("interval")
        if table.num_rows and interval != held and not (held is None and interval is None):
            if held is None:
                dt.alter.set_table_description(json.dumps({**doc, "schema": schema_id, "interval": interval}))
                dt.update_incremental()
            else:
                raise ConfigError(
                    f"table has interval {interval or 'none'} but the dataset at {self.root} holds interval "
                    f"{held}; rows of different bucket widths cannot share a dataset, use another dataset"
                )
        for _attempt in range(_COMMIT_ATTEMPTS):
            missing = self._missing_columns(pa.schema(dt.schema().to_arrow()), table.schema)
            if not missing:
                return dt
            try:  # schema merge: the new columns join the table schema; older files are not rewritten
                dt.alter.add_columns([Field.from_arrow(f.with_nullable(True)) for f in missing])
            except CommitFailedError:  # another writer changed the schema meanwhile: look again
                pass
            else:
                log.info("dataset %s: added column(s) %s", self.root, [f.name for f in missing])
            dt.update_incremental()
        raise ConfigError(f"dataset {self.root}: the schema kept changing under concurrent writers; retry")

    def _missing_columns(self, current: pa.Schema, incoming: pa.Schema) -> list[pa.Field]:
        """Columns of ``incoming`` the table lacks; refuses type or aggregation conflicts."""
        missing = []
        for f in incoming:
            if f.name not in current.names:
                missing.append(f)
                continue
            old = current.field(f.name)
            if f.type != old.type and not pa.types.is_null(f.type):
                raise ConfigError(
                    f"column {f.name!r} is {old.type} in the dataset at {self.root} but {f.type} in the new "
                    "table; convert it, or write to another dataset"
                )
            old_agg, new_agg = (old.metadata or {}).get(b"agg"), (f.metadata or {}).get(b"agg")
            if old_agg and new_agg and old_agg != new_agg:
                raise ConfigError(
                    f"column {f.name!r} holds {old_agg.decode()} aggregates in the dataset at {self.root} but "
                    f"{new_agg.decode()} in the new table; use the same aggregation or another dataset"
                )
        return missing

    def append(self, table: pa.Table, *, watermarks: Mapping[int, datetime] | None = None) -> WriteResult:
        """Append ``table``'s rows and advance ``watermarks`` in one commit (exactly once; see module doc).

        ``watermarks`` maps a vehicle to the exclusive end of the window this write completes. Rows of a
        vehicle before its stored watermark are dropped as already stored; without watermarks rows are
        appended as given.
        """
        validate_table(table)
        marks = {int(k): _us(_utc(v, f"watermark for vehicle {k}")) for k, v in (watermarks or {}).items()}
        rows_in = table.num_rows
        data = _dedupe_sorted(table) if rows_in else table
        dt = self._prepare(data)
        staged: list[str] = []
        fs = _delta.filesystem(self.location)
        for _attempt in range(_COMMIT_ATTEMPTS):
            self._refresh_marks(dt)
            rows = self._behind_marks_dropped(data)
            txns = self._advancing(marks)
            if not rows.num_rows and not txns:
                return WriteResult(rows_in=rows_in, rows_added=0, rows_skipped=data.num_rows, partitions=[],
                                   version=None)  # fmt: skip
            schema = pa.schema(dt.schema().to_arrow())
            rows = conform_table(rows, pa.schema([f for f in schema if f.name != PARTITION]))
            adds, days = self._stage(fs, rows)
            staged = [a.path for a in adds]
            if self._before_commit is not None:
                self._before_commit()
            read_version, write_id = dt.version(), uuid.uuid4().hex
            try:
                dt.create_write_transaction(
                    adds,
                    mode="append",
                    schema=schema,
                    partition_by=[PARTITION],
                    commit_properties=CommitProperties(
                        app_transactions=[Transaction(_app_id(t), us) for t, us in txns.items()],
                        custom_metadata={
                            "depin.write": write_id,
                            "depin.rows": str(rows.num_rows),
                            "depin.vehicles": str(len(txns)),
                        },
                        max_commit_retries=_COMMIT_ATTEMPTS,
                    ),
                )
            except CommitFailedError as exc:
                # Another writer moved a watermark of ours, or the schema: re-read and write what is left.
                log.info("dataset %s: commit conflict (%s); re-reading watermarks", self.root, exc)
                _delta.remove_files(fs, staged)
                staged = []
                dt.update_incremental()
                dt = self._prepare(data)
                continue
            dt.update_incremental()
            version = self._committed_version(dt, read_version, write_id)
            self._marks.update(txns)
            return WriteResult(
                rows_in=rows_in,
                rows_added=rows.num_rows,
                rows_skipped=data.num_rows - rows.num_rows,
                partitions=[f"{PARTITION}={d}" for d in days],
                version=version,
            )
        raise ConfigError(
            f"dataset {self.root}: {_COMMIT_ATTEMPTS} commits in a row conflicted with other writers; "
            "make each writer own its vehicles (disjoint --vehicles) and retry"
        )

    def _committed_version(self, dt: DeltaTable, read_version: int, write_id: str) -> int | None:
        """The version our commit got: other writers may have committed before or after it."""
        for entry in dt.history(max(1, dt.version() - read_version)):
            if entry.get("depin.write") == write_id:
                return int(entry["version"])
        return None  # pragma: no cover - the commit succeeded, so it is in the log

    def _behind_marks_dropped(self, data: pa.Table) -> pa.Table:
        if not data.num_rows or not self._marks:
            return data
        tok, ts = _int_keys(data)
        uniq, inverse = np.unique(tok, return_inverse=True)
        floor = np.array([self._marks.get(int(t), np.iinfo(np.int64).min) for t in uniq], dtype=np.int64)
        keep = ts >= floor[inverse]
        return data if keep.all() else data.filter(pa.array(keep))

    def _advancing(self, marks: Mapping[int, int]) -> dict[int, int]:
        out = {}
        for tid, us in marks.items():
            held = self._marks.get(tid)
            if held is not None and us < held:
                log.warning(
                    "watermark for vehicle %d stays at %s (not moved back to %s)",
                    tid,
                    _from_us(held),
                    _from_us(us),
                )
            elif held != us:
                out[tid] = us
        return out

    def _stage(self, fs: Any, rows: pa.Table) -> tuple[list[Any], list[str]]:
        """One file per UTC day of ``rows`` (sorted by token_id, timestamp within the day)."""
        if not rows.num_rows:
            return [], []
        _, ts = _int_keys(rows)
        days = ts // _DAY_US
        order = np.lexsort((ts, rows.column("token_id").to_numpy(), days))
        rows, days = rows.take(order), days[order]
        starts = np.flatnonzero(np.r_[True, days[1:] != days[:-1]])
        ends = np.r_[starts[1:], len(days)]
        adds, names = [], []
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            day = _day_name(int(days[start]))
            adds.append(_delta.stage_file(fs, day, rows.slice(start, end - start)))
            names.append(day)
        return adds, names

    # ------------------------------------------------------------------- read

    def dataset(self, version: int | None = None) -> ds.Dataset | None:
        """The table (at ``version``) as a lazy pyarrow dataset (with the ``date`` partition column)."""
        dt = self._table(version)
        return dt.to_pyarrow_dataset() if dt is not None else None

    def read(
        self,
        *,
        columns: Sequence[str] | None = None,
        token_ids: Sequence[int] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        version: int | None = None,
    ) -> pa.Table:
        """Rows with ``since <= timestamp < until`` for ``token_ids``, sorted by (token_id, timestamp).

        ``columns`` picks signal columns; the key columns always come first. Days outside the time range
        and files whose statistics exclude the vehicles are not opened.
        """
        dt = self._table(version)
        if dt is None:
            return pa.schema(list(KEY_FIELDS)).empty_table()
        schema = self._contract_schema(dt)
        if columns is not None:
            unknown = [c for c in columns if c not in schema.names]
            if unknown:
                raise ConfigError(
                    f"columns {unknown} are not in the dataset at {self.root}; it has {schema.names}"
                )
            wanted = set(columns) | set(KEY_COLUMNS)
            schema = pa.schema([f for f in schema if f.name in wanted], metadata=schema.metadata)
        conds = []
        if token_ids is not None:
            conds.append(pc.field("token_id").isin(pa.array([int(t) for t in token_ids], pa.int64())))
        if since is not None:
            since = _utc(since, "since")
            conds.append(pc.field(PARTITION) >= pa.scalar(since.date(), pa.date32()))
            conds.append(pc.field("timestamp") >= pa.scalar(since, schema.field("timestamp").type))
        if until is not None:
            until = _utc(until, "until")
            last_day = (until - timedelta(microseconds=1)).date()
            conds.append(pc.field(PARTITION) <= pa.scalar(last_day, pa.date32()))
            conds.append(pc.field("timestamp") < pa.scalar(until, schema.field("timestamp").type))
        expr = None
        for c in conds:
            expr = c if expr is None else expr & c
        table = dt.to_pyarrow_dataset().to_table(columns=schema.names, filter=expr)
        table = conform_table(table, schema)
        tok, ts = _int_keys(table)
        return table.take(np.lexsort((ts, tok)))

    def version_files(self, version: int | None = None) -> list[VersionFile]:
        """The data files of a table version (sorted by path): what a job that reads that version needs."""
        dt = self._table(version)
        if dt is None:
            return []
        adds = pa.table(dt.get_add_actions(flatten=True))
        files = [
            VersionFile(path=p, size=int(s), rows=int(n or 0))
            for p, s, n in zip(
                adds.column("path").to_pylist(),
                adds.column("size_bytes").to_pylist(),
                adds.column("num_records").to_pylist(),
                strict=True,
            )
        ]
        return sorted(files, key=lambda f: f.path)

    def summary(self, *, version: int | None = None, count_vehicles: bool = True) -> StoreSummary:
        """Rows, vehicles, time extent, partitions, files, columns, interval and bytes.

        Everything but ``vehicles`` comes from the log; counting vehicles scans the ``token_id`` column
        (``count_vehicles=False`` skips it and reports 0)."""
        dt = self._table(version)
        if dt is None:
            return StoreSummary(root=self.root, version=None, rows=0, vehicles=0, first=None, last=None,
                                partitions=0, files=0, columns=[], interval=None, bytes=0)  # fmt: skip
        adds = pa.table(dt.get_add_actions(flatten=True))
        rows = int(pc.sum(adds.column("num_records")).as_py() or 0) if adds.num_rows else 0
        first = last = None
        if rows and "min.timestamp" in adds.column_names:
            first = pc.min(adds.column("min.timestamp")).as_py()
            last = pc.max(adds.column("max.timestamp")).as_py()
        schema = self._contract_schema(dt)
        return StoreSummary(
            root=self.root,
            version=dt.version(),
            rows=rows,
            vehicles=len(self._distinct_token_ids(dt)) if rows and count_vehicles else 0,
            first=first,
            last=last,
            partitions=len(set(adds.column(f"partition.{PARTITION}").to_pylist())) if adds.num_rows else 0,
            files=adds.num_rows,
            columns=schema.names,
            interval=self._description(dt).get("interval"),
            bytes=int(pc.sum(adds.column("size_bytes")).as_py() or 0) if adds.num_rows else 0,
        )
