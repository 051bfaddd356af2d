"""Batch scoring output: per-vehicle-batch predictions → one Parquet file.

The families read their input with :class:`gpu_jobs.models.features.TelemetryFiles` by batches of whole
vehicles (each batch holds every row of its vehicles, from whichever files they are in, sorted by time), build
windows and scores per batch and hand the frames to :func:`write_stream`: memory holds one batch, never the
dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from gpu_jobs.context import JobContext


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
