"""Fleet plots of a telemetry dataset: the vehicles' tracks on a latitude/longitude plot coloured by speed or
state of charge (no map tiles: nothing is downloaded), and the ingested rows per vehicle and hour, where the
gaps show at a glance.

The dataset is read in record batches, only the columns a plot needs, so memory does not grow with the
fleet's history: the coverage counts are one integer per vehicle-hour, the tracks a fixed number of points
(every k-th row, k from the row count in the Parquet footers). Each plot is its data (:func:`coverage_data`,
:func:`tracks_data`) and its drawing; :func:`render_fleet` makes the PNGs and never raises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from connectors.dimo.schema import LOCATION_COLUMNS
from depin_core import plots as P

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

HOUR_US = 3_600_000_000
SOC = "powertrainTractionBatteryStateOfChargeCurrent"
COLOURS = {"speed": ("speed", "km/h"), "soc": (SOC, "%")}
MAX_TRACK_POINTS = 8000
MAX_ROWS = 120  # vehicles drawn in the heatmap (the first by id; the data holds every vehicle)
MAX_COLS = 24 * 45  # hour columns drawn; longer histories are drawn in blocks of several hours


def _dataset(root: Path | str) -> ds.Dataset:
    """The current version of the telemetry table at ``root`` (a plain Parquet folder also works)."""
    from connectors.dimo.store import TelemetryStore

    if str(root).startswith("s3") or (Path(root) / "_delta_log").is_dir():
        dataset = TelemetryStore(root).dataset()
        if dataset is not None:
            return dataset
    return ds.dataset(str(root), format="parquet", partitioning="hive")


BATCH_ROWS = 65_536


def _batches(dataset: ds.Dataset, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The dataset's rows in order (files by partition, rows as stored: by token_id, timestamp)."""
    for batch in dataset.to_batches(columns=columns, batch_size=BATCH_ROWS, use_threads=False):
        if batch.num_rows:
            yield batch


def coverage_data(root: Path | str) -> dict[str, Any]:
    """Ingested rows per vehicle and UTC hour: ``vehicles`` (token_ids, sorted), ``hour0_ms`` (the first
    hour), ``hours`` and ``counts[i][h]`` (rows of vehicle i in hour h, 0 = a gap). Memory: one entry per
    vehicle-hour with rows, whatever the number of rows."""
    dataset = _dataset(root)
    keys = np.zeros((0, 2), dtype=np.int64)  # (token_id, hour) with rows, and their counts
    counts = np.zeros(0, dtype=np.int64)
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def merge() -> None:  # amortised: only when the pending cells outnumber the merged ones
        nonlocal keys, counts
        all_keys = np.concatenate([keys, *(k for k, _ in pending)])
        all_counts = np.concatenate([counts, *(c for _, c in pending)])
        keys, inverse = np.unique(all_keys, axis=0, return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=all_counts, minlength=len(keys)).astype(np.int64)
        pending.clear()

    for batch in _batches(dataset, ["token_id", "timestamp"]):
        tid = batch.column("token_id").to_numpy(zero_copy_only=False).astype(np.int64)
        hour = batch.column("timestamp").cast(pa.int64()).to_numpy(zero_copy_only=False) // HOUR_US
        new, n = np.unique(np.stack([tid, hour], axis=1), axis=0, return_counts=True)
        pending.append((new, n.astype(np.int64)))
        if sum(len(k) for k, _ in pending) > max(len(keys), 100_000):
            merge()
    merge()
    if not len(keys):
        raise ValueError(f"dataset {root} has no rows")
    vehicles, row = np.unique(keys[:, 0], return_inverse=True)
    h0 = int(keys[:, 1].min())
    hours = int(keys[:, 1].max()) - h0 + 1
    matrix = np.zeros((len(vehicles), hours), dtype=np.int64)
    matrix[row.ravel(), keys[:, 1] - h0] = counts
    return {"vehicles": vehicles.tolist(), "hour0_ms": h0 * 3_600_000, "hours": hours,
            "counts": matrix.tolist()}  # fmt: skip


def draw_coverage(data: dict[str, Any], max_rows: int = MAX_ROWS, max_cols: int = MAX_COLS) -> Figure:
    """Heatmap of rows per vehicle-hour; hours without rows in red. Over ``max_cols`` hours, columns are
    blocks of hours (a block is red only when every hour in it is empty)."""
    import matplotlib as mpl

    counts = np.asarray(data["counts"], dtype=np.float64)[:max_rows]
    block = max(1, math.ceil(data["hours"] / max_cols))
    if block > 1:
        pad = (-counts.shape[1]) % block
        counts = np.pad(counts, ((0, 0), (0, pad))).reshape(counts.shape[0], -1, block).sum(axis=2)
    masked = np.ma.masked_equal(counts, 0.0)
    fig = P.figure(9.0, min(2.0 + 0.12 * len(counts), 12.0))
    ax = fig.add_subplot()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#d62728")
    days = counts.shape[1] * block / 24.0
    im = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap=cmap,
                   extent=(0.0, days, len(counts) - 0.5, -0.5))  # fmt: skip
    fig.colorbar(im, ax=ax, label=f"rows per {block} h" if block > 1 else "rows per hour", shrink=0.8)
    labels = [str(v) for v in data["vehicles"][:max_rows]]
    step = max(1, len(labels) // 40)
    ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=6)
    from datetime import UTC, datetime

    start = datetime.fromtimestamp(data["hour0_ms"] / 1000.0, tz=UTC)
    ax.set_xlabel(f"days since {start:%Y-%m-%d %H:00} UTC (red: no rows)")
    ax.set_ylabel("vehicle (token_id)")
    shown = len(labels)
    total = len(data["vehicles"])
    ax.set_title(f"Ingested rows per vehicle and hour ({shown} of {total} vehicles)" if shown < total
                 else f"Ingested rows per vehicle and hour ({total} vehicles)")  # fmt: skip
    return fig


def tracks_data(
    root: Path | str, colour: str = "speed", max_points: int = MAX_TRACK_POINTS
) -> dict[str, Any]:
    """Where the vehicles went: the rows with a location that differs from the vehicle's previous position
    (a parked car is one point, not hundreds), in the dataset's order (day files, then token_id, time), 1 in ``every`` of them so that at most ``max_points`` are kept
    (the stride doubles while streaming: bounded memory, deterministic): ``token_id``, ``latitude``,
    ``longitude`` and ``value`` (``colour``: ``speed`` km/h or ``soc`` %), plus ``moves`` (rows that moved)."""
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r}: choose one of {', '.join(COLOURS)}")
    dataset = _dataset(root)
    names = set(dataset.schema.names)
    if not set(LOCATION_COLUMNS) <= names:
        raise ValueError(
            f"dataset {root} has no {'/'.join(LOCATION_COLUMNS)} columns; ingest the "
            "currentLocationCoordinates signal to plot tracks"
        )
    column, unit = COLOURS[colour]
    value_col = column if column in names else None
    cols = ["token_id", *LOCATION_COLUMNS, *([value_col] if value_col else [])]
    keep: dict[str, np.ndarray] = {
        k: np.zeros(0) for k in ("index", "token_id", "latitude", "longitude", "value")
    }
    step, moves = 1, 0
    last: dict[int, tuple[float, float]] = {}  # per vehicle: its last position (files are per day)
    for batch in _batches(dataset, cols):
        tid = batch.column("token_id").to_numpy(zero_copy_only=False)
        lat = batch.column("latitude").to_numpy(zero_copy_only=False).astype(np.float64)
        lon = batch.column("longitude").to_numpy(zero_copy_only=False).astype(np.float64)
        val = (batch.column(value_col).to_numpy(zero_copy_only=False).astype(np.float64) if value_col
               else np.full(len(tid), np.nan))  # fmt: skip
        ok = np.isfinite(lat) & np.isfinite(lon)
        tid, lat, lon, val = tid[ok], lat[ok], lon[ok], val[ok]
        if not len(tid):
            continue
        # a vehicle's previous position: the row before in the batch, or its last one in earlier batches
        prev_lat, prev_lon = np.roll(lat, 1), np.roll(lon, 1)
        starts = np.flatnonzero(np.concatenate([[True], tid[1:] != tid[:-1]]))
        for i in starts.tolist():
            prev_lat[i], prev_lon[i] = last.get(int(tid[i]), (np.nan, np.nan))
        moved = (lat != prev_lat) | (lon != prev_lon)
        ends = np.concatenate([starts[1:] - 1, [len(tid) - 1]])
        last.update({int(tid[i]): (float(lat[i]), float(lon[i])) for i in ends.tolist()})
        index = moves + np.arange(int(moved.sum()))
        moves += int(moved.sum())
        new = {"index": index, "token_id": tid[moved], "latitude": lat[moved], "longitude": lon[moved],
               "value": val[moved]}  # fmt: skip
        keep = {k: np.concatenate([keep[k], v[index % step == 0]]) for k, v in new.items()}
        while len(keep["index"]) > max_points:
            step *= 2
            sel = keep["index"].astype(np.int64) % step == 0
            keep = {k: v[sel] for k, v in keep.items()}
    if not len(keep["index"]):
        raise ValueError(f"dataset {root} has no rows with a location")
    return {
        "token_id": keep["token_id"].astype(np.int64).tolist(),
        "latitude": keep["latitude"].tolist(),
        "longitude": keep["longitude"].tolist(),
        "value": [None if not math.isfinite(v) else v for v in keep["value"].tolist()],
        "colour": colour, "unit": unit, "every": step, "moves": moves,
    }  # fmt: skip


MAX_PANELS = 4  # places drawn (the busiest): a fleet spread over cities is one panel per city


def draw_tracks(data: dict[str, Any], max_panels: int = MAX_PANELS) -> Figure:
    """The points on latitude/longitude plots coloured by the value: one panel per place (points within
    about 2° of each other), the busiest ``max_panels`` places, each at equal-distance aspect."""
    from matplotlib.ticker import MaxNLocator

    lat, lon = np.asarray(data["latitude"]), np.asarray(data["longitude"])
    ids = np.asarray(data["token_id"])
    val = np.asarray([np.nan if v is None else v for v in data["value"]], dtype=np.float64)
    cell = np.round(lat / 2.0).astype(np.int64) * 100_000 + np.round(lon / 2.0).astype(np.int64)
    places, sizes = np.unique(cell, return_counts=True)
    busiest = places[np.argsort(-sizes, kind="stable")][:max_panels]
    cols = 1 if len(busiest) == 1 else 2
    rows = math.ceil(len(busiest) / cols)
    fig = P.figure(4.2 * cols + 1.0, 3.8 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    finite = val[np.isfinite(val)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    sc = None
    for ax, place in zip(axes, busiest, strict=False):
        sel = cell == place
        for v in np.unique(ids[sel]):  # the track: the vehicle's positions in order
            one = sel & (ids == v)
            ax.plot(lon[one], lat[one], color="0.75", lw=0.4, zorder=1)
        sc = ax.scatter(lon[sel], lat[sel], c=val[sel], s=4, cmap="plasma", vmin=vmin, vmax=vmax,
                        linewidths=0, zorder=2)  # fmt: skip
        ax.set_aspect(1.0 / max(math.cos(math.radians(float(np.mean(lat[sel])))), 0.05))
        n = len(set(ids[sel].tolist()))
        ax.set_title(f"{n} vehicle{'s' if n > 1 else ''} near {np.mean(lat[sel]):.2f}°, "
                     f"{np.mean(lon[sel]):.2f}°", fontsize=8)  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.ticklabel_format(useOffset=False)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(busiest) :]:
        ax.set_axis_off()
    if sc is not None and len(finite):
        label = "speed (km/h)" if data["colour"] == "speed" else "state of charge (%)"
        fig.colorbar(sc, ax=list(axes), label=label, shrink=0.8)
    fig.supxlabel("longitude (°)", fontsize=9)
    fig.supylabel("latitude (°)", fontsize=9)
    n_places = len(places)
    shown = f"{len(busiest)} of {n_places} places" if len(busiest) < n_places else f"{n_places} places"
    thinned = "every position" if data["every"] == 1 else f"1 in {data['every']} positions"
    fig.suptitle(f"Vehicle tracks: {len(set(ids.tolist()))} vehicles, {shown}, {thinned} ({len(lat):,} points)",
                 fontsize=10)  # fmt: skip
    return fig


FLEET_PLOTS: dict[
    str, tuple[str, Callable[[Path | str], dict[str, Any]], Callable[[dict[str, Any]], Any]]
] = {
    "coverage": ("Ingested rows per vehicle and hour", coverage_data, draw_coverage),
    "tracks": ("Vehicle tracks coloured by speed", tracks_data, draw_tracks),
}


def render_fleet(root: Path | str, out_dir: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """The fleet plots of the dataset at ``root``: ``{name: {"title", "png" (bytes), "data_sha256"} |
    {"title", "missing": reason}}``, each PNG also written to ``out_dir/<name>.png`` when given. Never
    raises: a plot that fails is logged and reported missing."""
    out: dict[str, dict[str, Any]] = {}
    for name, (title, data_fn, draw_fn) in FLEET_PLOTS.items():
        try:
            data = data_fn(root)
            png = P.encode_png(draw_fn(data), data)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"[:500]
            log.warning("fleet plot %s of %s is missing: %s", name, root, reason)
            out[name] = {"title": title, "missing": reason}
            continue
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / f"{name}.png").write_bytes(png)
        out[name] = {"title": title, "png": png, "data_sha256": P.data_digest(data)}
    return out
