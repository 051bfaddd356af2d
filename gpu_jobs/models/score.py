"""Streaming batch scoring: Parquet record batches → per-vehicle windows → predictions → one Parquet file.

Memory stays flat: files are read one record batch at a time (in file order), and only the rows that may
still belong to an unfinished window are carried to the next batch. Windows need each vehicle's rows in time
order, so the input must be sorted by ``(token_id, timestamp)`` within each file, and a vehicle's rows in later
files must be later in time — which the ``TelemetryStore`` layout (one file per UTC day, sorted) guarantees.
Which rows to carry is the family's choice (:func:`carry_open_trips`, :func:`carry_last_window`): a vehicle's
rows after its last parked bucket (a trip may go on), or its last fixed window (more rows may follow).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from gpu_jobs.context import JobContext
from gpu_jobs.models import features as F

# (frame) → (rows to process now, rows to carry into the next batch); a row may be in both
CarryFn = Callable[[pl.DataFrame], tuple[pl.Series, pl.Series]]


def iter_frames(files: Sequence[str | Path], *, batch_rows: int = 131_072) -> Iterator[pl.DataFrame]:
    """Conformed telemetry frames of at most ``batch_rows`` rows, file by file, in file order."""
    for path in files:
        pf = pq.ParquetFile(str(path))
        names = [n for n in (*F.KEYS, *F.SIGNALS) if n in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=names):
            df = pl.from_arrow(pa.Table.from_batches([batch]))
            assert isinstance(df, pl.DataFrame)
            yield F.conform(df)


def carry_open_trips(df: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
    """Process each vehicle's rows up to its last parked bucket; carry from that bucket on (it brackets the
    next trip, so it is in both)."""
    parked = ~(
        (pl.col(F.IGNITION).fill_null(0.0) > 0)
        | (pl.col(F.SPEED).fill_null(0.0) > 0)
        | (pl.col(F.CHARGING).fill_null(0.0) > 0)
    )
    idx = pl.col("_i")  # a materialized global row number (int_range inside .over() would count per vehicle)
    last = idx.filter(parked).max().over("token_id")
    m = df.with_row_index("_i").select(
        (idx <= last).fill_null(False).alias("p"), (idx >= last).fill_null(True).alias("c")
    )
    return m["p"], m["c"]


def carry_last_window(window_minutes: int) -> CarryFn:
    """Process every vehicle's complete windows; carry the rows of its last (maybe unfinished) window."""

    def fn(df: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
        win = pl.col("timestamp").dt.truncate(f"{int(window_minutes)}m")
        m = df.select((win == win.max().over("token_id")).alias("c"))
        return ~m["c"], m["c"]

    return fn


def stream_windows(
    files: Sequence[str | Path], carry: CarryFn, *, batch_rows: int = 131_072
) -> Iterator[pl.DataFrame]:
    """Frames in which every vehicle's windows are complete (the last one gets whatever is left)."""
    held: pl.DataFrame | None = None
    for chunk in iter_frames(files, batch_rows=batch_rows):
        df = chunk if held is None or held.is_empty() else pl.concat([held, chunk]).sort(F.KEYS)
        now, later = carry(df)
        ready = df.filter(now)
        held = df.filter(later)
        if not ready.is_empty():
            yield ready
    if held is not None and not held.is_empty():
        yield held


def write_stream(frames: Iterator[pl.DataFrame], out: Path, empty: pl.DataFrame) -> int:
    """Write ``frames`` to one Parquet file at ``out`` (``empty`` gives the schema when none come); rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for frame in frames:
            if frame.is_empty():
                continue
            table = frame.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(str(tmp), table.schema, compression="zstd")
            writer.write_table(table.cast(writer.schema))
            rows += frame.height
        if writer is None:
            writer = pq.ParquetWriter(str(tmp), empty.to_arrow().schema, compression="zstd")
        writer.close()
        tmp.replace(out)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return rows


def predictions_path(ctx: JobContext) -> Path:
    """Where an ``infer`` job writes its scores: ``<spec.outputs.dir>/predictions.parquet``."""
    return Path(ctx.spec.outputs.dir) / "predictions.parquet"
