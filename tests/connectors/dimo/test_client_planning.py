"""Planning (windows, chunks, halving) and page → Arrow conversion; no network."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import orjson
import pyarrow as pa
import pytest

from connectors.dimo import _telemetry as tm
from connectors.dimo.catalog import current_signals
from connectors.dimo.errors import (
    ComplexityLimitExceeded,
    DimoPrivilegeError,
    DimoTransientError,
    ExecutionTimeExceeded,
)
from connectors.dimo.schema import telemetry_schema

T0 = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)  # deliberately not on an epoch-aligned minute
MIN = timedelta(minutes=1)


def test_windows_are_whole_intervals_from_since_and_cover_the_range():
    until = T0 + timedelta(days=2, seconds=90)
    wins = tm.plan_windows(T0, until, MIN, columns=15, max_values=22_000, max_window=timedelta(days=7))
    assert wins[0][0] == T0 and wins[-1][1] == until
    assert all(a[1] == b[0] for a, b in itertools.pairwise(wins))  # contiguous, no overlap
    assert all((s - T0) % MIN == timedelta(0) for s, _ in wins)  # bucket grid kept
    assert all((e - s) // MIN * 15 <= 22_000 for s, e in wins)
    assert len(wins) == 2  # 2882 buckets (the last partial) at 1466 per window


def test_windows_respect_max_window_and_small_budgets():
    wins = tm.plan_windows(
        T0,
        T0 + timedelta(days=30),
        timedelta(hours=1),
        columns=2,
        max_values=10**6,
        max_window=timedelta(days=7),
    )
    assert [e - s for s, e in wins[:-1]] == [timedelta(days=7)] * 4
    assert tm.plan_windows(
        T0, T0 + 3 * MIN, MIN, columns=500, max_values=100, max_window=timedelta(days=1)
    ) == [(T0, T0 + MIN), (T0 + MIN, T0 + 2 * MIN), (T0 + 2 * MIN, T0 + 3 * MIN)]
    assert tm.plan_windows(T0, T0, MIN, columns=1, max_values=10, max_window=timedelta(days=1)) == []


def test_chunks_stay_under_the_complexity_limit():
    names = list(current_signals())
    chunks = tm.chunk_signals(names, max_signals=97)
    assert [n for c in chunks for n in c] == names
    assert all(tm.query_complexity(c) <= 100 for c in chunks)
    assert max(len(c) for c in chunks) >= 90
    assert all(len(c) <= 10 for c in tm.chunk_signals(names, max_signals=10))
    q = tm.build_query(("speed", "currentLocationCoordinates", "powertrainType"))
    assert (
        "s0: speed(agg: AVG)" in q and "s1: currentLocationCoordinates(agg: LAST) { latitude longitude }" in q
    )
    assert "s2: powertrainType(agg: LAST)" in q


def test_chunks_match_the_greedy_rule_around_location_fields():
    def reference(signals, max_signals, limit):  # the rule, recomputed from scratch for every signal
        chunks, current = [], []
        for name in signals:
            if current and (len(current) >= max_signals or tm.query_complexity([*current, name]) > limit):
                chunks.append(tuple(current))
                current = []
            current.append(name)
        return [*chunks, tuple(current)] if current else chunks

    names = list(current_signals())
    loc = "currentLocationCoordinates"
    mixed = [n for n in names if n != loc]
    mixed = [*mixed[:5], loc, *mixed[5:40], loc, *mixed[40:]]  # location fields cost 3, placed at the edges
    for limit in (5, 7, 8, 40, 100):
        for max_signals in (1, 3, 90):
            assert tm.chunk_signals(mixed, max_signals, limit) == reference(mixed, max_signals, limit)
    assert tm.chunk_signals([], 10) == []


SIGS = ("powertrainType", "speed", "currentLocationCoordinates")


def _page(rows, signals=SIGS):
    """A response page as DIMO sends it for ``build_query(signals)``: values under the signals' aliases."""
    keys = {name: tm.alias(i) for i, name in enumerate(signals)}
    return orjson.dumps({"data": {"signals": [{keys.get(k, k): v for k, v in r.items()} for r in rows]}})


def test_parse_page_types_nulls_strings_location_and_utc():
    rows = [
        {
            "timestamp": "2024-06-28T00:00:00Z",
            "speed": 65,
            "powertrainType": None,
            "currentLocationCoordinates": None,
        },
        {
            "timestamp": "2024-06-28T00:01:00.25Z",
            "speed": None,
            "powertrainType": "ELECTRIC",
            "currentLocationCoordinates": {"latitude": 40.7, "longitude": -73.9},
        },
    ]
    t = tm.parse_page(_page(rows), SIGS)
    assert t.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert (
        t.schema.field("speed").type == pa.float64() and t.schema.field("powertrainType").type == pa.string()
    )
    assert t.to_pydict() == {
        "timestamp": [datetime(2024, 6, 28, tzinfo=UTC), datetime(2024, 6, 28, 0, 1, 0, 250000, tzinfo=UTC)],
        "powertrainType": [None, "ELECTRIC"],
        "speed": [65.0, None],
        "latitude": [None, 40.7],
        "longitude": [None, -73.9],
    }
    assert tm.parse_page(_page([]), SIGS).num_rows == 0
    assert tm.parse_page(b'{"data":{"signals":null}}', SIGS).num_rows == 0


def test_parse_page_errors_are_classified():
    with pytest.raises(DimoTransientError):
        tm.parse_page(b'{"data":{"signals":[{"timest', SIGS)
    with pytest.raises(DimoTransientError):
        tm.parse_page(b'{"errors":[{"message":"x"', SIGS)
    with pytest.raises(DimoPrivilegeError, match=r"GetLocationHistory.*share"):
        tm.parse_page(
            orjson.dumps(
                {
                    "errors": [
                        {
                            "message": "unauthorized: missing required privilege(s) "
                            "privilege:GetLocationHistory"
                        }
                    ],
                    "data": {"signals": None},
                }
            ),
            SIGS,
            privilege_hint="; share location",
        )
    with pytest.raises(ExecutionTimeExceeded):
        tm.parse_page(
            orjson.dumps(
                {
                    "errors": [
                        {"message": "request exceeded or is estimated to exceed the maximum execution time"}
                    ],
                    "data": {"signals": None},
                }
            ),
            SIGS,
        )
    # A string value that happens to contain "errors" is not an error.
    t = tm.parse_page(_page([{"timestamp": "2024-06-28T00:00:00Z", "powertrainType": '"errors"'}]), SIGS)
    assert t.column("powertrainType").to_pylist() == ['"errors"']


def test_join_and_assemble_follow_the_schema_exactly():
    a = tm.parse_page(
        _page(
            [
                {"timestamp": "2024-06-28T00:00:00Z", "speed": 1},
                {"timestamp": "2024-06-28T00:02:00Z", "speed": 3},
            ],
            ("speed",),
        ),
        ("speed",),
    )
    b = tm.parse_page(
        _page(
            [
                {"timestamp": "2024-06-28T00:01:00Z", "powertrainType": "X"},
                {"timestamp": "2024-06-28T00:02:00Z", "powertrainType": "Y"},
            ],
            ("powertrainType",),
        ),
        ("powertrainType",),
    )
    joined = tm.join_chunks([a, b])
    assert joined.column("timestamp").to_pylist() == [
        datetime(2024, 6, 28, 0, m, tzinfo=UTC) for m in range(3)
    ]
    schema = telemetry_schema(["speed", "powertrainType", "currentLocationCoordinates"], interval="1m0s")
    table = tm.assemble(42, [joined, tm.empty_page(("speed",))], schema)
    assert table.schema.equals(schema, check_metadata=True)
    assert table.column("token_id").to_pylist() == [42, 42, 42]
    assert table.column("speed").to_pylist() == [1.0, None, 3.0]
    assert table.column("powertrainType").to_pylist() == [None, "X", "Y"]
    assert table.column("latitude").null_count == 3  # location not fetched → null column, same schema
    assert tm.assemble(1, [], schema).schema.equals(schema)


async def test_fetch_unit_halves_chunks_on_complexity_and_windows_on_timeouts():
    calls: list[tuple[tuple[str, ...], datetime, datetime]] = []

    async def fetch(chunk, start, end):
        calls.append((chunk, start, end))
        if len(chunk) > 2:
            raise ComplexityLimitExceeded("too complex")
        if (end - start) > 4 * MIN:
            raise ExecutionTimeExceeded("too slow")
        rows = [
            {"timestamp": (start + k * MIN).strftime("%Y-%m-%dT%H:%M:%SZ"), **{s: 1.0 for s in chunk}}
            for k in range((end - start) // MIN)
        ]
        return tm.parse_page(_page(rows), chunk)

    planner = tm.Planner(max_signals=90, max_values=10**6, max_window=timedelta(days=1))
    sigs = ("powertrainRange", "speed", "obdRunTime", "exteriorAirTemperature")
    t = await tm.fetch_unit(fetch, planner, sigs, T0, T0 + 10 * MIN, MIN)
    assert t.num_rows == 10 and t.column("timestamp").to_pylist() == [T0 + k * MIN for k in range(10)]
    assert set(t.column_names) == {"timestamp", *sigs}
    assert planner.max_signals == 2 and planner.max_values <= 5 * 2
    assert all((s - T0) % MIN == timedelta(0) for _, s, _ in calls)
    assert max(len(c) for c, _, _ in calls[1:]) <= 2
    # The next plan uses the learned, smaller sizes.
    assert all(len(c) <= 2 for c in planner.chunks(sigs))


async def test_one_bucket_timeout_is_transient():
    async def fetch(chunk, start, end):
        raise ExecutionTimeExceeded("too slow")

    planner = tm.Planner(90, 1000, timedelta(days=1))
    with pytest.raises(DimoTransientError):
        await tm.fetch_unit(fetch, planner, ("speed",), T0, T0 + MIN, MIN)


def test_data_summary_spans_parse_go_times_and_widen_by_a_second():
    data = {
        "dataSummary": {
            "signalDataSummary": [
                {
                    "name": "speed",
                    "firstSeen": "2026-01-01T00:00:00.123456789Z",
                    "lastSeen": "2026-01-02T00:00:00Z",
                },
                {
                    "name": "currentLocationCoordinates",
                    "firstSeen": "2026-01-01T05:00:00+02:00",
                    "lastSeen": "2026-01-01T06:00:00Z",
                },
            ]
        }
    }
    spans = tm.parse_data_summary(data, "test")
    first, last = spans["speed"]
    assert first == datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC) - tm.SPAN_SLACK
    assert last == datetime(2026, 1, 2, tzinfo=UTC) + tm.SPAN_SLACK
    loc = spans["currentLocationCoordinates"]
    assert loc[0] == datetime(2026, 1, 1, 3, tzinfo=UTC) - tm.SPAN_SLACK
    # the approximate location is derived from the coordinates: same span; unknown signals have none
    assert tm.signal_span("currentLocationApproximateCoordinates", spans) == loc
    assert tm.signal_span("obdDTCList", spans) is None
    assert tm.chunk_span(("speed", "currentLocationCoordinates"), spans) == (first, last)
    with pytest.raises(DimoTransientError, match="firstSeen/lastSeen"):
        tm.parse_data_summary(
            {"dataSummary": {"signalDataSummary": [{"name": "speed", "firstSeen": "x"}]}}, "t"
        )
    # no summary at all (null, missing) means unknown, not "no data": nothing may be skipped
    assert tm.parse_data_summary({"dataSummary": None}, "t") is None
    assert tm.parse_data_summary({}, "t") is None
    assert tm.parse_data_summary({"dataSummary": {"signalDataSummary": []}}, "t") == {}
    # an inverted span (first after last) is kept but skips nothing
    inverted = {"name": "speed", "firstSeen": "2026-01-02T00:00:00Z", "lastSeen": "2026-01-01T00:00:00Z"}
    bad = tm.parse_data_summary({"dataSummary": {"signalDataSummary": [inverted]}}, "t")
    assert tm.clamp_range(T0, T0 + timedelta(days=1), MIN, bad["speed"]) == (T0, T0 + timedelta(days=1))


def test_clamp_range_keeps_the_bucket_grid():
    until = T0 + timedelta(days=1)
    span = (T0 + timedelta(hours=2, seconds=10), T0 + timedelta(hours=5, seconds=59))
    start, end = tm.clamp_range(T0, until, MIN, span)
    assert start == T0 + timedelta(hours=2) and end == T0 + timedelta(hours=5, minutes=1)
    assert tm.clamp_range(T0, until, MIN, (T0 - timedelta(days=3), T0 - timedelta(days=2))) is None
    assert tm.clamp_range(T0, until, MIN, (until, until + MIN)) is None
    # data around the whole range: unchanged (the last, partial bucket included)
    odd = until + timedelta(seconds=20)
    assert tm.clamp_range(T0, odd, MIN, (T0 - MIN, odd + MIN)) == (T0, odd)


async def test_fetch_range_with_spans_skips_chunks_and_windows_outside_them():
    planner = tm.Planner(max_signals=1, max_values=60, max_window=timedelta(days=1))  # 1-hour windows
    asked: list[tuple[tuple[str, ...], datetime]] = []

    async def fetch(chunk, start, end):
        asked.append((chunk, start))
        return tm.empty_page(chunk)

    until = T0 + timedelta(hours=6)
    spans = {
        "speed": (T0 + timedelta(hours=1, minutes=5), T0 + timedelta(hours=2, minutes=30)),
        "powertrainType": (T0 + timedelta(hours=2, minutes=10), T0 + timedelta(hours=3, minutes=10)),
    }
    await tm.fetch_range(fetch, planner, ["speed", "powertrainType", "obdDTCList"], T0, until, MIN, spans)
    got = sorted((c[0], s - T0) for c, s in asked)
    # All spans: 01:05–03:10 after T0 → buckets 01:05 … 03:10 after T0, one-hour windows from 01:05.
    h = timedelta(hours=1)
    assert got == [
        ("powertrainType", 2 * h + 5 * MIN),  # its span starts at 02:10
        ("powertrainType", 3 * h + 5 * MIN),
        ("speed", h + 5 * MIN),
        ("speed", 2 * h + 5 * MIN),  # its span ends at 02:30
    ]
    asked.clear()
    await tm.fetch_range(fetch, planner, ["speed", "powertrainType", "obdDTCList"], T0, until, MIN, None)
    assert len(asked) == 3 * 6
    asked.clear()
    assert await tm.fetch_range(fetch, planner, ["obdDTCList"], T0, until, MIN, spans) == [] and asked == []
