"""A small hand-built fleet for the emulator handlers: three vehicles over one day at 30 s, one with both
privileges, one with location withheld, one not shared (tests of the client against the emulator app)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from connectors.dimo.emulator.fleet import SOURCES, Fleet, Grant, Vehicle
from connectors.dimo.emulator.state import make_license

START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(days=1)
SIGNALS = ["speed", "powertrainType", "powertrainTransmissionTravelledDistance", "currentLocationCoordinates"]


def handbuilt_fleet() -> Fleet:
    lic = make_license(0)
    n = 24 * 60 * 2  # one sample every 30 s
    ts = pl.datetime_range(START, END, "30s", closed="left", time_unit="us", time_zone="UTC", eager=True)
    k = np.arange(n, dtype=np.float64)
    series = pl.DataFrame(
        {
            "ts": ts,
            "speed": k % 120,
            "powertrainType": ["ELECTRIC"] * n,
            "powertrainTransmissionTravelledDistance": 1000 + k / 10,
            "latitude": 40 + k / 1e5,
            "longitude": -73 - k / 1e5,
        }
    )
    vehicles, all_series = {}, {}
    for tid, privs in ((11, (1, 4)), (12, (1,)), (13, ())):
        grants = [Grant(lic.client_id.lower(), privs, START - timedelta(days=1), END + timedelta(days=3650))]
        vehicles[tid] = Vehicle(
            tid,
            "0x" + "ab" * 20,
            "Tesla",
            "Model 3",
            2022,
            "ELECTRIC",
            START - timedelta(days=9),
            "one two three",
            SOURCES["tesla"],
            grants if privs else [],
        )
        all_series[tid] = series
    events = {
        tid: pl.DataFrame(
            schema={
                "ts": pl.Datetime("us", "UTC"),
                "name": pl.Utf8,
                "source": pl.Utf8,
                "duration_ns": pl.Int64,
                "metadata": pl.Utf8,
            }
        )
        for tid in vehicles
    }
    return Fleet(lic, vehicles, all_series, events, START, END)
