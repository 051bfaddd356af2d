"""The parts of the Delta protocol the telemetry table needs beyond delta-rs' public calls.

- Staging: Parquet files written with pyarrow into the table's storage (``deltalake.fs.DeltaStorageHandler``
  works for local paths and ``s3://`` alike), described by ``AddAction``s with file statistics, so "files
  written" and "commit" are two steps (``write_deltalake`` does both in one call and cannot be split).
- Application transactions of a snapshot read in one pass over the log (newest checkpoint + later commits).
  delta-rs only answers ``transaction_version(app_id)`` one id at a time (ms each: 10,000 vehicles = tens
  of seconds); reading the log's ``txn`` actions directly costs one checkpoint read plus the later commits.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler
from deltalake.transaction import AddAction

from connectors.dimo.location import TableLocation

log = logging.getLogger(__name__)

LOG_DIR = "_delta_log"
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint(?:\.(\d{10})\.(\d{10}))?\.parquet$")


def filesystem(loc: TableLocation) -> pafs.FileSystem:
    """A pyarrow filesystem rooted at the table (paths are table-relative)."""
    return pafs.PyFileSystem(DeltaStorageHandler(loc.uri, loc.storage_options or None))


def open_table(loc: TableLocation, version: int | None = None) -> DeltaTable | None:
    """The table (at ``version``), or None when there is no Delta table at ``loc``."""
    if not DeltaTable.is_deltatable(loc.uri, storage_options=loc.storage_options or None):
        return None
    return DeltaTable(loc.uri, version=version, storage_options=loc.storage_options or None)


def _iso_ms(us: int) -> str:
    """Delta stats timestamps: millisecond ISO-8601 in UTC (readers add 1 ms to maxima, so truncating is safe)."""
    dt = datetime.fromtimestamp(us // 1_000_000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{us % 1_000_000 // 1000:03d}Z"


def file_stats(table: pa.Table) -> str:
    """Delta file statistics (numRecords, minValues, maxValues, nullCount) of a staged file's rows."""
    mins: dict[str, object] = {}
    maxs: dict[str, object] = {}
    nulls: dict[str, int] = {}
    for name in table.column_names:
        col = table.column(name)
        nulls[name] = col.null_count
        if col.null_count == len(col):
            continue
        if pa.types.is_timestamp(col.type):
            mm = pc.min_max(pc.cast(col, pa.int64()))
            mins[name], maxs[name] = _iso_ms(mm["min"].as_py()), _iso_ms(mm["max"].as_py())
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if all(v == v for v in (lo, hi)):  # NaN has no order: leave the column without bounds
                mins[name], maxs[name] = lo, hi
    return json.dumps(
        {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls},
        separators=(",", ":"),
    )


def stage_file(fs: pafs.FileSystem, day: str, rows: pa.Table) -> AddAction:
    """Write ``rows`` (one UTC day, without the ``date`` column) as a new file of partition ``date=day``."""
    rel = f"date={day}/part-{uuid.uuid4().hex}.zstd.parquet"
    dictionary = [f.name for f in rows.schema if not pa.types.is_floating(f.type)]
    with fs.open_output_stream(rel) as out:
        pq.write_table(rows, out, compression="zstd", use_dictionary=dictionary)
    size = fs.get_file_info(rel).size
    return AddAction(rel, int(size), {"date": day}, int(time.time() * 1000), True, file_stats(rows))


def remove_files(fs: pafs.FileSystem, rels: Iterable[str]) -> None:
    """Best-effort delete of staged files that will never be committed (vacuum removes any left)."""
    for rel in rels:
        try:
            fs.delete_file(rel)
        except OSError as exc:  # pragma: no cover - depends on the store
            log.debug("could not delete staged file %s: %s", rel, exc)


def _checkpoints(fs: pafs.FileSystem) -> dict[int, list[str]]:
    """Checkpoint parts by version in ``_delta_log`` (one listing)."""
    checkpoints: dict[int, list[str]] = {}
    for info in fs.get_file_info(pafs.FileSelector(LOG_DIR, allow_not_found=True)):
        if info.type == pafs.FileType.File and (m := _CHECKPOINT.match(info.base_name)):
            checkpoints.setdefault(int(m.group(1)), []).append(info.base_name)
    return checkpoints


def _commit_txns(fs: pafs.FileSystem, lo: int, hi: int, prefix: str, out: dict[str, int]) -> bool:
    """Apply the ``txn`` actions of commits ``lo+1 … hi`` to ``out``; False when one is missing.

    Commit files are opened by name, not listed: the log keeps every commit until log cleanup, so a listing
    would grow with the table's history on every append."""
    for v in range(lo + 1, hi + 1):
        try:
            fh = fs.open_input_stream(f"{LOG_DIR}/{v:020d}.json")
        except FileNotFoundError:
            return False
        with fh:
            for line in fh.read().splitlines():
                if b'"txn"' not in line:
                    continue
                action = json.loads(line).get("txn")
                if action and action["appId"].startswith(prefix):
                    out[action["appId"]] = int(action["version"])
    return True


def app_transactions(loc: TableLocation, version: int, prefix: str) -> dict[str, int] | None:
    """Every application transaction whose id starts with ``prefix`` at table ``version``, read from the log.

    None when the log is not laid out as expected (a commit file missing after the newest checkpoint, e.g.
    compacted logs): the caller then asks delta-rs id by id.
    """
    fs = filesystem(loc)
    checkpoints = _checkpoints(fs)
    usable = [v for v, parts in checkpoints.items() if v <= version and _complete(parts)]
    start = max(usable, default=-1)
    out: dict[str, int] = {}
    if start >= 0:
        for name in sorted(checkpoints[start]):
            with fs.open_input_file(f"{LOG_DIR}/{name}") as fh:
                txn = pq.read_table(fh, columns=["txn"]).column("txn")
            for row in txn.drop_null().to_pylist():
                if row and row["appId"].startswith(prefix):
                    out[row["appId"]] = int(row["version"])
    return out if _commit_txns(fs, start, version, prefix, out) else None


def app_transactions_between(loc: TableLocation, after: int, upto: int, prefix: str) -> dict[str, int] | None:
    """The application transactions set by commits ``after+1 … upto`` (None when one is missing)."""
    out: dict[str, int] = {}
    return out if _commit_txns(filesystem(loc), after, upto, prefix, out) else None


def _complete(parts: list[str]) -> bool:
    """A single-file checkpoint, or every part of a multi-part one."""
    if len(parts) == 1 and _CHECKPOINT.match(parts[0]).group(2) is None:  # type: ignore[union-attr]
        return True
    totals = {int(_CHECKPOINT.match(p).group(3) or 0) for p in parts}  # type: ignore[union-attr]
    return len(totals) == 1 and len(parts) == totals.pop()
