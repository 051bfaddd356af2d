"""Ingest at scale: ``depin ingest`` of N vehicles × 1 day at 1 minute from the DIMO emulator, per store.

For each size of ``--sizes`` (default 10,100,1000,3000,10000): the emulator starts as a child process
(``EmulatorProcess``: N simulated vehicles, ``--days`` of history, rate limit off, pinned to CPU 1 when there
are 2+ cores), then for each store of ``--store`` ``depin ingest --json`` runs as a child of its own (pinned
to CPU 0, client rate limit off through ``DEPIN_DIMO_RATE_LIMIT_PER_S=0``, all signals) into a fresh
directory, which is removed afterwards. Measured per size and store:
- ``seconds``: the ingest process's wall time, start to exit (interpreter start-up and imports included);
  ``per_vehicle_day_ms`` = seconds ÷ (vehicles × days); ``ingest_report_s``: the ``seconds`` of its own
  report (the ingest proper, without the interpreter's start-up and imports, a few seconds here), with
  ``per_vehicle_day_ms_report`` and ``growth_ratio_report`` from it — the wall-time ratio counts that
  constant once per size, which flatters the large sizes against 100;
- ``ingest_peak_rss_mb``: the ingest process's peak RSS (``ru_maxrss`` of ``wait4`` on its pid: that
  process alone, whatever else runs);
- ``emulator_peak_rss_mb`` (per size): the emulator's ``VmHWM`` (peak RSS) read from ``/proc`` after the
  last ingest, before it is stopped — so it covers building the fleet and serving every store's ingest;
- rows, requests, the dataset's bytes on disk, the emulator's start-up seconds.
A size that cannot be measured (emulator start past ``--max-emulator-start-s``, a process past
``--max-rss-mb``, an ingest past ``--timeout-s``, the ``--budget-s`` spent, a failed child) is recorded as
null with its reason in ``unmeasured``; the run goes on with the next size.

Stores: ``delta`` (``connectors/dimo/store.py``: a Delta Lake table, append-only commits that carry the
watermarks). ``STORES`` maps a store's name to the extra ``depin ingest`` arguments that select it; name
several (``--store a,b``) to measure them in the same run against the same emulator. The per-day Parquet
store this replaced was measured with this bench before it was removed (README, "Benchmarks").

Output: a table per store (stdout), then the last stdout line, JSON. Its top-level ``per_vehicle_day_ms``
(size → ms), ``growth_ratio`` (per-vehicle-day time at the largest measured size ÷ at 100),
``peak_rss_mb_max`` (largest ingest peak RSS over the sizes), ``ingest_peak_rss_mb``, ``seconds``, ``rows``,
``unmeasured`` and ``targets`` are the first store's; ``by_store`` holds the same for every store;
``emulator_peak_rss_mb`` is per size. Targets: ``growth_ratio`` ≤ 1.3, ingest peak RSS ≤ 600 MB at every
size, emulator ≤ 600 MB at 10,000 vehicles. Absolute seconds are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from depin_core.proc.child import Child
from depin_core.proc.tree import descendants, status_kb

# store name → extra `depin ingest` arguments selecting it (the Delta table is the only store)
STORES: dict[str, list[str]] = {"delta": []}

TARGET_GROWTH = 1.3
TARGET_INGEST_RSS_MB = 600.0
TARGET_EMULATOR_RSS_MB = 600.0
TARGET_EMULATOR_AT = 10_000
BASE_SIZE = 100


def tree_hwm_mb(pid: int) -> float | None:
    """Peak RSS (MB) of ``pid``, plus that of each living descendant (none expected: the emulator is one
    process; summed in case one appears)."""
    own = status_kb(pid, "VmHWM")
    if own is None:
        return None
    return (own + sum(status_kb(p, "VmHWM") or 0 for p in descendants(pid))) / 1024


class RssGuard:
    """Kills ``pid()``'s process (SIGKILL) once its RSS passes ``limit_mb``, so that one size cannot take
    the machine's memory; polls every 0.2 s from a thread. ``tripped``: whether it killed it."""

    def __init__(self, pid: Any, limit_mb: float) -> None:
        self._pid = pid
        self.limit_kb = limit_mb * 1024
        self.tripped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pid = self._pid()
            rss = status_kb(pid, "VmRSS") if pid else None
            if rss is not None and rss > self.limit_kb:
                self.tripped = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                return

    def __enter__(self) -> RssGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class IngestRun:
    """One ``depin ingest`` child: its wall seconds, peak RSS, report, or why it has none."""

    seconds: float | None = None
    peak_rss_mb: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    dataset_bytes: int | None = None
    error: str | None = None


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run_ingest(
    credentials: Path,
    out: Path,
    extra: list[str],
    *,
    since: datetime,
    until: datetime,
    interval: str,
    timeout_s: float,
    max_rss_mb: float,
    cpu: int | None,
) -> IngestRun:
    """Run ``depin ingest --json`` into ``out`` (a fresh directory) as a child; ``wait4`` gives its own
    ``ru_maxrss``. Past ``timeout_s`` or ``max_rss_mb`` it is killed and the run says why."""
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "ingest",
        "--json",
        "--credentials",
        str(credentials),
        "--out",
        str(out / "dataset"),
        "--since",
        since.isoformat(),
        "--until",
        until.isoformat(),
        "--interval",
        interval,
        *extra,
    ]
    env = {**os.environ, "DEPIN_DIMO_RATE_LIMIT_PER_S": "0", "NO_COLOR": "1"}
    log_path = out / "ingest.log"  # stdout and stderr; the --json line is the last one starting with {
    waited: dict[str, Any] = {}
    t = time.perf_counter()
    # its own session (killed as a group on timeout), SIGTERM if this process dies, pinned to ``cpu``
    child = Child("ingest", cmd, log_path=log_path, env=env, cwd=ROOT, new_session=True, cpu=cpu)
    proc = child.start(die_with_parent=True).proc
    assert proc is not None

    def reap() -> None:  # wait4, not Popen.wait: its rusage is this child's alone
        _, status, usage = os.wait4(proc.pid, 0)
        waited.update(end=time.perf_counter(), status=status, usage=usage)

    reaper = threading.Thread(target=reap, daemon=True)
    reaper.start()
    with RssGuard(lambda: proc.pid if "end" not in waited else None, max_rss_mb) as guard:
        reaper.join(timeout_s)
        timed_out = reaper.is_alive()
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            reaper.join()
    proc.returncode = os.waitstatus_to_exitcode(waited["status"])  # reaped above; tell Popen
    run = IngestRun(peak_rss_mb=round(waited["usage"].ru_maxrss / 1024, 1))
    if guard.tripped:
        run.error = f"ingest passed --max-rss-mb {max_rss_mb:.0f} and was killed"
    elif timed_out:
        run.error = f"ingest ran past --timeout-s {timeout_s:.0f}s and was killed"
    elif proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        run.error = f"ingest exited with code {proc.returncode}: {tail}"
    else:
        lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith("{")]
        run.report = json.loads(lines[-1]) if lines else {}
        run.seconds = waited["end"] - t
        run.dataset_bytes = dir_bytes(out / "dataset")
    return run


def measure_size(
    vehicles: int, stores: list[str], args: argparse.Namespace, deadline: float, cores: int
) -> dict[str, Any]:
    """Start the emulator with ``vehicles``, ingest into each store; the size's row of every store."""
    left = deadline - time.monotonic()
    row: dict[str, Any] = {"vehicles": vehicles, "stores": {}}
    if left <= 0:
        row["error"] = "not started: --budget-s spent"
        return row
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    until = end - timedelta(minutes=1)
    since = until - timedelta(days=args.days)
    config = EmulatorConfig(
        vehicles=vehicles,
        days=args.days + 0.01,
        seed=args.seed,
        end=end,
        vehicle_jwt_ttl_s=3600,
        rate_limit_per_s=0,
    )
    emu = EmulatorProcess(
        config,
        startup_timeout=min(args.max_emulator_start_s, left),
        cpu=1 if cores >= 2 else None,
    )
    t = time.perf_counter()
    with RssGuard(lambda: emu.proc.pid if emu.proc is not None else None, args.max_rss_mb) as guard:
        try:
            emu.start()
        except Exception as exc:  # a size that cannot start is recorded, not fatal
            emu.close()
            if guard.tripped:
                row["error"] = f"emulator passed --max-rss-mb {args.max_rss_mb:.0f} while starting; killed"
            elif time.perf_counter() - t >= emu.startup_timeout:
                row["error"] = (
                    f"emulator not ready within {emu.startup_timeout:g}s "
                    "(--max-emulator-start-s or --budget-s); stopped"
                )
            else:
                row["error"] = f"emulator did not start: {str(exc)[:300]}"
            return row
        except BaseException:
            emu.close()
            raise
    row["emulator_start_s"] = round(time.perf_counter() - t, 2)
    print(f"{vehicles} vehicles: emulator ready in {row['emulator_start_s']:.1f}s", file=sys.stderr)
    try:
        assert emu.proc is not None
        with RssGuard(lambda: emu.proc.pid if emu.proc is not None else None, args.max_rss_mb) as guard:
            for store in stores:
                left = deadline - time.monotonic()
                if left <= 0:
                    row["stores"][store] = IngestRun(error="not started: --budget-s spent")
                    continue
                work = Path(tempfile.mkdtemp(prefix=f"depin-bench-scale-{store}-{vehicles}-"))
                try:
                    run = run_ingest(
                        emu.credentials_path,
                        work,
                        STORES[store],
                        since=since,
                        until=until,
                        interval=args.interval,
                        timeout_s=min(args.timeout_s, left),
                        max_rss_mb=args.max_rss_mb,
                        cpu=0 if cores >= 2 else None,
                    )
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                if guard.tripped and run.error is None:
                    run.error = "emulator passed --max-rss-mb while serving and was killed"
                row["stores"][store] = run
                print(f"{vehicles} vehicles, {store}: {_describe(run)}", file=sys.stderr)
            row["emulator_peak_rss_mb"] = _round(tree_hwm_mb(emu.proc.pid))
            if guard.tripped:
                row["error"] = f"emulator passed --max-rss-mb {args.max_rss_mb:.0f} and was killed"
    finally:
        emu.close()
    return row


def _describe(run: IngestRun) -> str:
    if run.error:
        return run.error.splitlines()[0][:200]
    return f"{run.seconds:.1f}s, {run.report.get('rows', 0):,} rows, peak RSS {run.peak_rss_mb:.0f} MB"


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def store_summary(rows: list[dict[str, Any]], store: str, days: float) -> dict[str, Any]:
    """The JSON figures of one store over the sizes (null + a reason in ``unmeasured`` where missing)."""
    per_vd: dict[str, float | None] = {}
    seconds: dict[str, float | None] = {}
    report_s: dict[str, float | None] = {}
    per_vd_report: dict[str, float | None] = {}
    rss: dict[str, float | None] = {}
    nrows: dict[str, int | None] = {}
    requests: dict[str, int | None] = {}
    disk: dict[str, float | None] = {}
    unmeasured: dict[str, str] = {}
    for row in rows:
        key = str(row["vehicles"])
        run: IngestRun | None = row["stores"].get(store)
        reason = row.get("error") or (run.error if run else "not run")
        ok = run is not None and run.seconds is not None and not row.get("error")
        if run is not None and run.seconds is not None and row.get("error"):
            reason = row["error"]
        seconds[key] = round(run.seconds, 2) if ok and run else None
        report_s[key] = _round(run.report.get("seconds"), 2) if ok and run else None
        per_vd_report[key] = (
            round(report_s[key] / (row["vehicles"] * days) * 1000, 2)  # type: ignore[operator]
            if report_s[key] is not None
            else None
        )
        per_vd[key] = round(run.seconds / (row["vehicles"] * days) * 1000, 2) if ok and run else None
        rss[key] = run.peak_rss_mb if run is not None else None
        nrows[key] = run.report.get("rows") if ok and run else None
        requests[key] = run.report.get("requests") if ok and run else None
        disk[key] = _round(run.dataset_bytes / 1e6) if ok and run and run.dataset_bytes is not None else None
        if not ok:
            unmeasured[key] = str(reason)
    growth, largest = growth_ratio(per_vd)
    growth_report, _ = growth_ratio(per_vd_report)
    rss_seen = [v for v in rss.values() if v is not None]
    peak = max(rss_seen, default=None)
    return {
        "per_vehicle_day_ms": per_vd,
        "growth_ratio": growth,
        "growth_sizes": [BASE_SIZE, largest] if growth is not None else None,
        "peak_rss_mb_max": peak,
        "ingest_peak_rss_mb": rss,
        "seconds": seconds,
        "ingest_report_s": report_s,
        "per_vehicle_day_ms_report": per_vd_report,
        "growth_ratio_report": growth_report,
        "rows": nrows,
        "requests": requests,
        "dataset_mb": disk,
        "unmeasured": unmeasured,
        "targets": {
            "growth_ratio_le_1_3": None if growth is None else growth <= TARGET_GROWTH,
            # a peak past the target fails it even where a size went unmeasured
            "ingest_rss_le_600_mb_every_size": (
                False
                if peak is not None and peak > TARGET_INGEST_RSS_MB
                else None
                if unmeasured or peak is None
                else True
            ),
        },
    }


def growth_ratio(per_vd: dict[str, float | None]) -> tuple[float | None, int | None]:
    """(time per vehicle-day at the largest measured size ÷ at ``BASE_SIZE``, that size); None without both."""
    measured = [int(k) for k, v in per_vd.items() if v is not None]
    largest = max(measured, default=None)
    base = per_vd.get(str(BASE_SIZE))
    if not base or largest is None or largest <= BASE_SIZE:
        return None, largest
    return round(per_vd[str(largest)] / base, 3), largest  # type: ignore[operator]


def print_table(rows: list[dict[str, Any]], store: str, summary: dict[str, Any]) -> None:
    head = (
        f"{'vehicles':>9} {'seconds':>9} {'ms/veh-day':>11} {'report s':>9} {'ms/veh-day':>11} "
        f"{'ingest MB':>10} {'emulator MB':>12} {'emu start s':>12} {'rows':>12}"
    )
    print(f"store {store}:")
    print(head)
    for row in rows:
        key = str(row["vehicles"])
        secs = summary["seconds"][key]
        cells = [
            f"{row['vehicles']:>9,}",
            f"{secs:>9.1f}" if secs is not None else f"{'—':>9}",
            f"{summary['per_vehicle_day_ms'][key]:>11.1f}" if secs is not None else f"{'—':>11}",
            _cell(summary["ingest_report_s"][key], 9, 1),
            _cell(summary["per_vehicle_day_ms_report"][key], 11, 1),
            _cell(summary["ingest_peak_rss_mb"][key], 10),
            _cell(row.get("emulator_peak_rss_mb"), 12),
            _cell(row.get("emulator_start_s"), 12, 1),
            f"{summary['rows'][key]:>12,}" if summary["rows"][key] is not None else f"{'—':>12}",
        ]
        note = summary["unmeasured"].get(key)
        print(" ".join(cells) + (f"  ({note.splitlines()[0][:120]})" if note else ""))
    print(
        f"growth_ratio (ms/veh-day at the largest size ÷ at {BASE_SIZE}): {summary['growth_ratio']} wall, "
        f"{summary['growth_ratio_report']} from the ingest's own seconds"
    )


def _cell(x: float | None, width: int, nd: int = 0) -> str:
    return f"{x:>{width}.{nd}f}" if x is not None else f"{'—':>{width}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000,3000,10000", help="comma-separated vehicle counts")
    ap.add_argument(
        "--store",
        default="delta",
        help=f"comma-separated stores, the first one's figures top-level in the JSON ({', '.join(STORES)})",
    )
    ap.add_argument("--days", type=float, default=1.0)
    ap.add_argument("--interval", default="1m", help="bucket width (Go duration)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per ingest; killed past it")
    ap.add_argument("--max-emulator-start-s", type=float, default=900.0)
    ap.add_argument(
        "--max-rss-mb", type=float, default=8000.0, help="a child (emulator or ingest) past it is killed"
    )
    ap.add_argument("--budget-s", type=float, default=None, help="whole run; sizes left are recorded null")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if len(set(sizes)) != len(sizes) or any(n <= 0 for n in sizes):
        raise SystemExit(
            f"--sizes: {args.sizes!r} must be distinct positive vehicle counts, e.g. 10,100,1000"
        )
    stores = [s.strip() for s in args.store.split(",") if s.strip()]
    if unknown := [s for s in stores if s not in STORES]:
        raise SystemExit(f"--store: unknown {', '.join(unknown)}; known: {', '.join(STORES)}")
    cores = os.cpu_count() or 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the emulator is stopped on the way out
    deadline = time.monotonic() + (args.budget_s if args.budget_s is not None else float("inf"))

    rows = [measure_size(n, stores, args, deadline, cores) for n in sizes]

    summaries = {s: store_summary(rows, s, args.days) for s in stores}
    for store in stores:
        print_table(rows, store, summaries[store])
    emu_rss = {str(r["vehicles"]): r.get("emulator_peak_rss_mb") for r in rows}
    emu_at = emu_rss.get(str(TARGET_EMULATOR_AT))
    first = summaries[stores[0]]
    result = {
        "store": stores[0],
        **first,
        "targets": {
            **first["targets"],
            "emulator_rss_le_600_mb_at_10000": None if emu_at is None else emu_at <= TARGET_EMULATOR_RSS_MB,
        },
        "emulator_peak_rss_mb": emu_rss,
        "emulator_start_s": {str(r["vehicles"]): r.get("emulator_start_s") for r in rows},
        "by_store": summaries if len(stores) > 1 else None,
        "sizes": sizes,
        "days": args.days,
        "interval": args.interval,
        "seed": args.seed,
        "cores": cores,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
