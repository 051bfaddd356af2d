"""Peak memory of the charging planner's fleet read (``pipelines._charging.fleet_states``) against fleet size.

For each ``--sizes`` N: a synthetic telemetry table of N EVs × ``--days`` days at 1 minute (state of charge,
battery, state of health, odometer, speed, air temperature; written in commits of 25 vehicles), then in a
fresh child process each: ``fleet_states`` (three passes of polars' streaming engine) and, as the baseline,
the table read whole (``TelemetryStore.read`` of the same columns: what ``fleet_states`` did before it
streamed). Prints each child's peak RSS (``ru_maxrss``), rows, seconds, and the ratios: streaming ÷ whole
read per size, and each one's growth from the smallest size to the largest. Last line: one JSON object with
``sizes`` (every figure), ``streaming_growth`` and ``whole_read_growth`` (peak RSS at the largest size ÷ at
the smallest). A flat ``streaming_growth`` (near 1 while rows grow N-fold) is the point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import pyarrow as pa

from connectors.dimo.schema import telemetry_schema
from connectors.dimo.store import TelemetryStore
from gpu_jobs.models import features as F

SIGNALS = [F.SOC, F.GROSS, F.SOH, F.ODOMETER, F.SPEED, F.AIR]
T0 = datetime(2026, 3, 1, tzinfo=UTC)

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
mode, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if mode == "streaming":
    from pipelines._charging import fleet_states
    n = len(fleet_states(path).vehicles)
else:
    from connectors.dimo.store import TelemetryStore
    n = TelemetryStore(path).read(columns={signals!r}).num_rows
print(json.dumps({{"n": n, "seconds": round(time.perf_counter() - t, 3),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
"""


def write_table(path: Path, vehicles: int, days: int) -> int:
    """``vehicles`` EVs × ``days`` at 1 minute into a new table at ``path``; returns its rows."""
    schema = telemetry_schema(SIGNALS, interval="1m0s")
    store, minutes = TelemetryStore(path), 1440 * days
    for first in range(1, vehicles + 1, 25):
        ids = np.arange(first, min(first + 25, vehicles + 1))
        tok, minute = np.repeat(ids, minutes), np.tile(np.arange(minutes), len(ids))
        rng = np.random.default_rng(first)
        data = {
            "token_id": tok,
            "timestamp": np.datetime64("2026-03-01T00:00", "us") + minute.astype("timedelta64[m]"),
            F.SOC: 90 - (minute % 1440) / 30.0,
            F.GROSS: np.full(len(tok), 64.0),
            F.SOH: np.full(len(tok), 95.0),
            F.ODOMETER: tok * 1000.0 + minute * 0.05,
            F.SPEED: rng.uniform(0, 90, len(tok)),
            F.AIR: rng.uniform(-5, 20, len(tok)),
        }
        marks = dict.fromkeys((int(t) for t in ids), T0 + timedelta(days=days))
        store.append(pa.table({f.name: data[f.name] for f in schema}, schema=schema), watermarks=marks)
    return store.summary(count_vehicles=False).rows


def measure(mode: str, path: Path) -> dict[str, float]:
    code = CHILD.format(root=str(ROOT), signals=SIGNALS)
    done = subprocess.run(
        [sys.executable, "-c", code, mode, str(path)], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"bench failed: {mode} on {path}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="50,400,1200,2400", help="vehicles per table, comma-separated")
    ap.add_argument("--days", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="depin-bench-plan-memory-") as tmp:
        for n in sizes:
            path = Path(tmp) / f"t{n}"
            rows = write_table(path, n, args.days)
            streaming, whole = measure("streaming", path), measure("whole", path)
            if streaming["n"] != n or whole["n"] != rows:
                raise SystemExit(
                    f"bench failed: {n} vehicles: streaming saw {streaming['n']}, whole read {whole['n']}"
                )
            out[str(n)] = {
                "rows": rows,
                "streaming_peak_rss_mb": streaming["peak_rss_mb"],
                "whole_read_peak_rss_mb": whole["peak_rss_mb"],
                "streaming_s": streaming["seconds"],
                "whole_read_s": whole["seconds"],
                "ratio": round(streaming["peak_rss_mb"] / whole["peak_rss_mb"], 3),
            }
            print(f"{n:>6} EVs {rows:>11,} rows: streaming {streaming['peak_rss_mb']:7.1f} MB "
                  f"({streaming['seconds']:.2f} s), whole read {whole['peak_rss_mb']:7.1f} MB "
                  f"({whole['seconds']:.2f} s), ratio {out[str(n)]['ratio']:.2f}")  # fmt: skip
    lo, hi = out[str(sizes[0])], out[str(sizes[-1])]
    result = {
        "days": args.days,
        "sizes": out,
        "streaming_growth": round(hi["streaming_peak_rss_mb"] / lo["streaming_peak_rss_mb"], 3),
        "whole_read_growth": round(hi["whole_read_peak_rss_mb"] / lo["whole_read_peak_rss_mb"], 3),
        "rows_growth": round(hi["rows"] / lo["rows"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
