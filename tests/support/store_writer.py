"""Writers of a telemetry table in a child process, for the crash and concurrency tests of the store.

``python -m tests.support.store_writer URI MODE FIRST COUNT [BARRIER]`` appends vehicles ``FIRST …
FIRST+COUNT-1`` (one day at one minute each, ``VEHICLES_PER_COMMIT`` per commit, with their watermarks) the
way ingest does. Object-store options come from ``DEPIN_DATASET_S3_*``. MODE:

- ``write``: every commit; with BARRIER, wait until that file exists first (both writers start together);
- ``crash-before-commit``: on the second commit, exit with code 9 after its files are staged;
- ``crash-after-commit``: exit with code 9 right after the second commit;
- ``hang-in-stage``: print HANGING after the first file of the second commit is written, then wait to be killed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from connectors.dimo.schema import telemetry_schema

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY_END = T0 + timedelta(days=1)
MINUTES = 1440
VEHICLES_PER_COMMIT = 3
SIGNALS = ["speed", "powertrainTransmissionTravelledDistance"]


def vehicle_rows(token_ids: list[int]) -> pa.Table:
    """One day at one minute for each vehicle; values are a function of (vehicle, minute)."""
    tok = np.repeat(np.asarray(token_ids, dtype=np.int64), MINUTES)
    minute = np.tile(np.arange(MINUTES), len(token_ids))
    ts = np.datetime64("2026-03-01T00:00", "us") + minute.astype("timedelta64[m]")
    return pa.table(
        {
            "token_id": tok,
            "timestamp": ts,
            "speed": (tok % 97) + minute / 10.0,
            "powertrainTransmissionTravelledDistance": tok * 1000.0 + minute * 0.5,
        },
        schema=telemetry_schema(SIGNALS, interval="1m0s"),
    )


def write_vehicles(store: object, first: int, count: int) -> None:
    """Append the vehicles in commits of ``VEHICLES_PER_COMMIT``, each with its vehicles' watermarks."""
    ids = list(range(first, first + count))
    for i in range(0, len(ids), VEHICLES_PER_COMMIT):
        group = ids[i : i + VEHICLES_PER_COMMIT]
        store.append(vehicle_rows(group), watermarks=dict.fromkeys(group, DAY_END))  # type: ignore[attr-defined]


def main(argv: list[str]) -> None:
    from connectors.dimo import _delta
    from connectors.dimo import store as store_mod

    uri, mode, first, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    commits = 0

    def before_commit() -> None:
        nonlocal commits
        commits += 1
        if mode == "crash-before-commit" and commits == 2:
            os._exit(9)

    if mode == "crash-after-commit":
        real = store_mod.TelemetryStore._committed_version

        def committed(self, *a, **k):  # type: ignore[no-untyped-def]
            v = real(self, *a, **k)
            if commits == 2:
                os._exit(9)
            return v

        store_mod.TelemetryStore._committed_version = committed  # type: ignore[method-assign]
    if mode == "hang-in-stage":
        real_stage = _delta.stage_file

        def stage(*a, **k):  # type: ignore[no-untyped-def]
            add = real_stage(*a, **k)
            if commits == 1:
                print("HANGING", flush=True)
                threading.Event().wait()
            return add

        store_mod._delta.stage_file = stage  # type: ignore[attr-defined]
    if len(argv) > 4:
        barrier = Path(argv[4])
        deadline = time.monotonic() + 60
        while not barrier.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    store = store_mod.TelemetryStore(uri, before_commit=before_commit)
    write_vehicles(store, first, count)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
