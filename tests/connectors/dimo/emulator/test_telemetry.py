"""The emulator's Telemetry endpoint, against hand-built fleets with expected values computed here."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import orjson
import polars as pl
import pytest
import uvicorn

from connectors.dimo.catalog import current_signals
from connectors.dimo.emulator.app import create_app
from connectors.dimo.emulator.fleet import SOURCES, Fleet, Vehicle
from connectors.dimo.emulator.state import EmulatorState, make_license
from connectors.dimo.emulator.telemetry import routes
from connectors.dimo.emulator.telemetry.data import APPROX_STEP_DEG, to_us
from connectors.dimo.emulator.telemetry.resolvers import fake_vin
from connectors.dimo.emulator.telemetry.schema import telemetry_schema
from connectors.dimo.privileges import ID_TO_PERMISSION
from connectors.dimo.settings import VEHICLE_NFT_DEV, VEHICLE_NFT_PROD

T0 = datetime(2024, 6, 28, tzinfo=UTC)
STEP = timedelta(seconds=10)
N = 360  # one hour of 10-second rows
DTC = ["P0100", "P0200", "P0100", "P0300"]
ALL = (1, 4, 5, 8)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _series_11() -> pl.DataFrame:
    """Vehicle 11: speed with every 7th reading missing, a once-a-minute temperature, DTC strings, a track."""
    rng = np.random.default_rng(7)
    ts = [T0 + i * STEP for i in range(N)]
    speed = [None if i % 7 == 3 else round(float(v), 1) for i, v in enumerate(rng.uniform(0, 120, N))]
    return pl.DataFrame(
        {
            "ts": ts,
            "speed": speed,
            "exteriorAirTemperature": [20 + i * 0.1 if i % 6 == 0 else None for i in range(N)],
            "obdDTCList": [DTC[(i // 3) % 4] if i % 3 == 0 else None for i in range(N)],
            "currentLocationAltitude": [10.0 + i for i in range(N)],
            "latitude": [40.7 + i * 1e-4 if i % 2 == 0 else None for i in range(N)],
            "longitude": [-73.99 - i * 1e-4 if i % 2 == 0 else None for i in range(N)],
            "hdop": [1.0 + (i % 5) if i % 2 == 0 else None for i in range(N)],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )


def _series_12() -> pl.DataFrame:
    """Vehicle 12: speed for minutes 0-2 and 8-9 only (a data gap), powertrainType strings, a track."""
    ts = [T0 + i * STEP for i in range(60)]
    speed = [float(i) if (i < 18 or i >= 48) else None for i in range(60)]
    return pl.DataFrame(
        {
            "ts": ts,
            "speed": speed,
            "powertrainType": ["ELECTRIC"] * 60,
            "latitude": [10 + i * 0.01 for i in range(60)],  # no hdop column: Location.hdop reads 0
            "longitude": [20 + i * 0.01 for i in range(60)],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )


def _vehicle(token_id: int, source: str) -> Vehicle:
    return Vehicle(
        token_id=token_id,
        owner="0x" + "11" * 20,
        make="Tesla",
        model="Model 3",
        year=2022,
        powertrain="ELECTRIC",
        minted_at=T0 - timedelta(days=30),
        name="alpha beta gamma",
        source=source,
    )


def _fleet() -> Fleet:
    events = pl.DataFrame(
        {
            "ts": [T0 + timedelta(minutes=m) for m in (1, 5, 9, 30)],
            "name": [
                "behavior.harshBraking",
                "behavior.harshAcceleration",
                "behavior.harshBraking",
                "safety.collision",
            ],
            "source": [SOURCES["tesla"]] * 4,
            "duration_ns": [1_500_000_000, 3_000_000_000, 0, 10**10],
            "metadata": ['{"g":0.5}', None, None, "{}"],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    return Fleet(
        license=make_license(0),
        vehicles={
            11: _vehicle(11, SOURCES["tesla"]),
            12: _vehicle(12, SOURCES["autopi"]),
            13: _vehicle(13, SOURCES["macaron"]),
        },
        series={11: _series_11(), 12: _series_12()},
        events={11: events},
        start=T0,
        end=T0 + timedelta(hours=1),
    )


@pytest.fixture(scope="module")
def state() -> EmulatorState:
    return EmulatorState(fleet=_fleet(), public_url="http://127.0.0.1")


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port; yields the base URL and always stops it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def base_url(state: EmulatorState) -> Iterator[str]:
    with serve(create_app(state)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c


def vehicle_jwt(
    state: EmulatorState, token_id: int, privileges: tuple[int, ...] = ALL, ttl: int = 600
) -> str:
    now = int(state.clock())
    return state.vehicle_key.sign(
        {
            "iss": "https://auth-roles-rights.dimo.zone",
            "sub": state.license.client_id,
            "aud": ["dimo.zone"],
            "iat": now,
            "exp": now + ttl,
            "asset": f"did:erc721:137:{VEHICLE_NFT_PROD}:{token_id}",
            "permissions": [ID_TO_PERMISSION[p] for p in privileges],
            "token_id": str(token_id),
            "privilege_ids": list(privileges),
        }
    )


def post(
    client: httpx.Client,
    state: EmulatorState,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    token_id: int | None = 11,
    privileges: tuple[int, ...] = ALL,
) -> httpx.Response:
    headers = (
        {} if token_id is None else {"Authorization": f"Bearer {vehicle_jwt(state, token_id, privileges)}"}
    )
    return client.post(
        "/telemetry/query", json={"query": query, "variables": variables or {}}, headers=headers
    )


def signals_query(
    fields: str, *, token: int = 11, interval: str = "1m", frm: str, to: str, filt: str = ""
) -> str:
    extra = f", filter: {filt}" if filt else ""
    return f'{{ signals(tokenId: {token}, interval: "{interval}", from: "{frm}", to: "{to}"{extra}) {{ {fields} }} }}'


def buckets(
    frame: pl.DataFrame, col: str, frm: datetime, to: datetime, interval: timedelta
) -> dict[datetime, list[Any]]:
    """Expected grouping, computed in plain Python: non-null values of ``col`` per bucket start."""
    out: dict[datetime, list[Any]] = defaultdict(list)
    for ts, v in zip(frame["ts"].to_list(), frame[col].to_list(), strict=True):
        if frm <= ts < to and v is not None:
            out[frm + ((ts - frm) // interval) * interval].append(v)
    return dict(sorted(out.items()))


# ---- signals: bucketing and aggregation -------------------------------------------------------------


def test_buckets_start_at_from_window_is_half_open_and_float_aggs_match(client, state) -> None:
    frm, to, iv = T0 + timedelta(seconds=20), T0 + timedelta(seconds=620), timedelta(minutes=1)
    series = _series_11()
    assert series.filter(pl.col("ts") == to)["speed"].item() is not None  # the row at `to` would add a bucket
    fields = "timestamp avg: speed(agg: AVG) med: speed(agg: MED) mx: speed(agg: MAX) mn: speed(agg: MIN) first: speed(agg: FIRST) last: speed(agg: LAST)"
    r = post(client, state, signals_query(fields, frm=_iso(frm), to=_iso(to)))
    assert r.status_code == 200, r.text
    rows = r.json()["data"]["signals"]
    expected = buckets(series, "speed", frm, to, iv)
    assert [row["timestamp"] for row in rows] == [_iso(b) for b in expected]
    assert rows[0]["timestamp"] == "2024-06-28T00:00:20Z" and len(rows) == 10
    for row, values in zip(rows, expected.values(), strict=True):
        assert row["avg"] == pytest.approx(statistics.mean(values))
        assert row["med"] == pytest.approx(statistics.median(values))
        assert (row["mx"], row["mn"]) == (max(values), min(values))
        assert (row["first"], row["last"]) == (values[0], values[-1])
        assert list(row) == ["timestamp", "avg", "med", "mx", "mn", "first", "last"]


def test_only_buckets_with_data_and_nulls_for_missing_fields(client, state) -> None:
    q = signals_query(
        "timestamp speed(agg: MAX) powertrainType(agg: LAST)",
        token=12,
        frm=_iso(T0),
        to=_iso(T0 + timedelta(minutes=10)),
    )
    rows = post(client, state, q, token_id=12).json()["data"]["signals"]
    # powertrainType has data in every minute, so all 10 buckets exist; speed is null in the gap.
    assert len(rows) == 10 and [r["speed"] for r in rows[3:8]] == [None] * 5
    assert rows[0]["speed"] == 5.0 and rows[9]["speed"] == 59.0
    only_speed = post(client, state, q.replace("powertrainType(agg: LAST)", ""), token_id=12).json()["data"][
        "signals"
    ]
    assert [r["timestamp"][14:16] for r in only_speed] == ["00", "01", "02", "08", "09"]


def test_value_filter_applies_before_aggregation(client, state) -> None:
    frm, to, iv = T0, T0 + timedelta(minutes=30), timedelta(minutes=5)
    fields = (
        "timestamp "
        "gt: speed(agg: AVG, filter: {gt: 60}) "
        "band: speed(agg: MIN, filter: {gte: 30, lt: 50}) "
        "either: speed(agg: MAX, filter: {or: [{lt: 10}, {gt: 110}]}) "
        "cnt: speed(agg: AVG, filter: {notIn: [0.0], neq: 1000})"
    )
    rows = post(client, state, signals_query(fields, interval="5m", frm=_iso(frm), to=_iso(to))).json()[
        "data"
    ]["signals"]
    expected = buckets(_series_11(), "speed", frm, to, iv)
    assert len(rows) == len(expected) == 6
    for row, vals in zip(rows, expected.values(), strict=True):
        gt = [v for v in vals if v > 60]
        band = [v for v in vals if 30 <= v < 50]
        either = [v for v in vals if v < 10 or v > 110]
        assert row["gt"] == (pytest.approx(statistics.mean(gt)) if gt else None)
        assert row["band"] == (min(band) if band else None)
        assert row["either"] == (max(either) if either else None)
        assert row["cnt"] == pytest.approx(statistics.mean([v for v in vals if v != 0.0]))
    in_rows = post(
        client, state, signals_query("speed(agg: MAX, filter: {in: [-5]})", frm=_iso(frm), to=_iso(to))
    )
    assert in_rows.json()["data"]["signals"] == []  # nothing passes the filter, so no bucket has data


def test_rand_is_deterministic_and_picks_a_bucket_value(client, state) -> None:
    frm, to = T0, T0 + timedelta(minutes=20)
    q = signals_query(
        "timestamp r: speed(agg: RAND) s: obdDTCList(agg: RAND)", interval="2m", frm=_iso(frm), to=_iso(to)
    )
    first, second = post(client, state, q).json(), post(client, state, q).json()
    assert first == second
    speeds = buckets(_series_11(), "speed", frm, to, timedelta(minutes=2))
    dtcs = buckets(_series_11(), "obdDTCList", frm, to, timedelta(minutes=2))
    rows = first["data"]["signals"]
    assert all(row["r"] in speeds[datetime.fromisoformat(row["timestamp"])] for row in rows)
    assert all(row["s"] in dtcs[datetime.fromisoformat(row["timestamp"])] for row in rows)
    assert len({row["r"] for row in rows}) > 1


def test_string_aggregations(client, state) -> None:
    frm, to, iv = T0, T0 + timedelta(minutes=10), timedelta(minutes=2)
    fields = "timestamp top: obdDTCList(agg: TOP) uniq: obdDTCList(agg: UNIQUE) f: obdDTCList(agg: FIRST) l: obdDTCList(agg: LAST)"
    rows = post(client, state, signals_query(fields, interval="2m", frm=_iso(frm), to=_iso(to))).json()[
        "data"
    ]["signals"]
    expected = buckets(_series_11(), "obdDTCList", frm, to, iv)
    assert len(rows) == len(expected)
    for row, vals in zip(rows, expected.values(), strict=True):
        counts = Counter(vals)
        best = max(counts.values())
        assert row["top"] == min(v for v, c in counts.items() if c == best)
        assert row["uniq"] == ",".join(dict.fromkeys(vals))
        assert (row["f"], row["l"]) == (vals[0], vals[-1])


def test_location_aggregations_and_approximate_coordinates(client, state) -> None:
    frm, to, iv = T0, T0 + timedelta(minutes=3), timedelta(minutes=1)
    fields = (
        "timestamp avg: currentLocationCoordinates(agg: AVG) { latitude longitude hdop } "
        "last: currentLocationCoordinates(agg: LAST) { lat: latitude lon: longitude __typename } "
        "approx: currentLocationApproximateCoordinates(agg: FIRST) { latitude longitude } "
        "alt: currentLocationAltitude(agg: MAX)"
    )
    rows = post(client, state, signals_query(fields, frm=_iso(frm), to=_iso(to))).json()["data"]["signals"]
    s = _series_11()
    lats, lons, hdops = (buckets(s, c, frm, to, iv) for c in ("latitude", "longitude", "hdop"))
    assert len(rows) == 3
    for row, b in zip(rows, lats, strict=True):
        assert row["avg"] == {
            "latitude": pytest.approx(statistics.mean(lats[b])),
            "longitude": pytest.approx(statistics.mean(lons[b])),
            "hdop": pytest.approx(statistics.mean(hdops[b])),
        }
        assert row["last"] == {"lat": lats[b][-1], "lon": lons[b][-1], "__typename": "Location"}
        cell = (np.floor(lats[b][0] / APPROX_STEP_DEG) + 0.5) * APPROX_STEP_DEG
        assert row["approx"]["latitude"] == pytest.approx(cell) and row["approx"]["latitude"] != lats[b][0]
        assert row["alt"] == 10.0 + (b - T0) / STEP + 5


def test_location_filter_in_circle(client, state) -> None:
    frm, to = T0, T0 + timedelta(hours=1)
    filt = "{inCircle: {center: {latitude: 40.7, longitude: -73.99}, radius: 0.5}}"
    q = signals_query(
        f"n: currentLocationCoordinates(agg: LAST, filter: {filt}) {{ latitude }}",
        interval="1h",
        frm=_iso(frm),
        to=_iso(to),
    )
    (row,) = post(client, state, q).json()["data"]["signals"]
    # 0.5 km ≈ 0.0045° of latitude, the track moves 1e-4° per 10 s along both axes (≈ 14 m per step).
    lat = row["n"]["latitude"]
    assert 40.702 < lat < 40.704


def test_location_without_hdop_rand_and_polygon_filter(client, state) -> None:
    polygon = "[{latitude: 9, longitude: 19}, {latitude: 10.105, longitude: 19}, {latitude: 10.105, longitude: 21}, {latitude: 9, longitude: 21}]"
    fields = f"timestamp r: currentLocationCoordinates(agg: RAND) {{ latitude hdop }} p: currentLocationCoordinates(agg: LAST, filter: {{inPolygon: {polygon}}}) {{ latitude }}"
    frm, to = T0, T0 + timedelta(minutes=10)
    rows = post(
        client, state, signals_query(fields, token=12, frm=_iso(frm), to=_iso(to)), token_id=12
    ).json()["data"]["signals"]
    lats = buckets(_series_12(), "latitude", frm, to, timedelta(minutes=1))
    assert len(rows) == 10
    assert all(
        row["r"]["hdop"] == 0.0 and row["r"]["latitude"] in lats[datetime.fromisoformat(row["timestamp"])]
        for row in rows
    )
    assert [row["p"] and row["p"]["latitude"] for row in rows[:3]] == [
        pytest.approx(10.05),
        pytest.approx(10.10),
        None,
    ]


def test_schema_has_one_field_per_current_signal() -> None:
    schema = telemetry_schema()
    aggs = schema.type_map["SignalAggregations"].fields
    latest = schema.type_map["SignalCollection"].fields
    for name, sig in current_signals().items():
        assert str(aggs[name].type) == sig.gql_type
        assert str(latest[name].type) == f"Signal{sig.gql_type}"
    assert "currentLocationLatitude" not in aggs  # removed signals are not served


def test_fragments_variables_typename_and_mixed_roots_keep_selection_order(client, state) -> None:
    q = """
    query Q($id: Int!, $from: Time!, $to: Time!, $iv: String!, $skip: Boolean!) {
      __typename
      latest: signalsLatest(tokenId: $id) { lastSeen }
      signals(tokenId: $id, interval: $iv, from: $from, to: $to) { ...F hidden: speed(agg: MIN) @skip(if: $skip) }
    }
    fragment F on SignalAggregations { __typename ts: timestamp speed(agg: MAX) }
    """
    variables = {
        "id": 11,
        "from": "2024-06-28T02:00:00+02:00",
        "to": "2024-06-28T00:02:00Z",
        "iv": "1m",
        "skip": True,
    }
    body = post(client, state, q, variables).json()
    assert list(body["data"]) == ["__typename", "latest", "signals"]
    assert body["data"]["__typename"] == "Query"
    assert body["data"]["latest"] == {"lastSeen": _iso(T0 + (N - 1) * STEP)}
    assert [list(r) for r in body["data"]["signals"]] == [["__typename", "ts", "speed"]] * 2
    assert body["data"]["signals"][0]["__typename"] == "SignalAggregations"


def test_unknown_vehicle_and_source_filter(client, state) -> None:
    frm, to = _iso(T0), _iso(T0 + timedelta(minutes=5))
    unknown = post(client, state, signals_query("speed(agg: MAX)", token=999, frm=frm, to=to), token_id=999)
    assert unknown.json() == {"data": {"signals": []}}
    other = signals_query("speed(agg: MAX)", frm=frm, to=to, filt=f'{{source: "{SOURCES["autopi"]}"}}')
    assert post(client, state, other).json() == {"data": {"signals": []}}
    own = signals_query("speed(agg: MAX)", frm=frm, to=to, filt=f'{{source: "{SOURCES["tesla"].lower()}"}}')
    assert len(post(client, state, own).json()["data"]["signals"]) == 5


@pytest.mark.parametrize(
    ("token", "interval", "frm", "to", "filt", "message"),
    [
        (
            11,
            "1d",
            "2024-06-28T00:00:00Z",
            "2024-06-28T01:00:00Z",
            "",
            'failed parsing interval: time: unknown unit "d" in duration "1d"',
        ),
        (
            11,
            "1h",
            "2024-06-28T02:00:00Z",
            "2024-06-28T01:00:00Z",
            "",
            "invalid argument: from timestamp is after to timestamp",
        ),
        (
            11,
            "500ns",
            "2024-06-28T00:00:00Z",
            "2024-06-28T01:00:00Z",
            "",
            "invalid argument: interval is not a positive integer",
        ),
        (
            11,
            "-1h",
            "2024-06-28T00:00:00Z",
            "2024-06-28T01:00:00Z",
            "",
            "invalid argument: interval is not a positive integer",
        ),
        (
            0,
            "1h",
            "2024-06-28T00:00:00Z",
            "2024-06-28T01:00:00Z",
            "",
            "invalid argument: tokenID is not a positive integer",
        ),
        (
            11,
            "1h",
            "2024-06-28T00:00:00Z",
            "2024-06-28T01:00:00Z",
            '{source: "autopi"}',
            "invalid argument: source 'autopi' is not a valid ethr DID",
        ),
    ],
)
def test_validation_messages(client, state, token, interval, frm, to, filt, message) -> None:
    r = post(
        client,
        state,
        signals_query("speed(agg: MAX)", token=token, interval=interval, frm=frm, to=to, filt=filt),
        token_id=token,
    )
    assert r.status_code == 200
    assert r.json() == {
        "errors": [{"message": message, "path": ["signals"], "extensions": {"code": "BAD_REQUEST"}}],
        "data": {"signals": None},
    }


# ---- protocol: complexity, parse errors, auth, privileges --------------------------------------------


def test_complexity_limit(client, state) -> None:
    def q(n: int) -> str:
        fields = " ".join(f"a{i}: speed(agg: MAX)" for i in range(n))
        return signals_query(fields, frm=_iso(T0), to=_iso(T0 + timedelta(minutes=2)))

    ok = post(client, state, q(90))
    assert ok.status_code == 200 and len(ok.json()["data"]["signals"][0]) == 90
    too_big = post(client, state, q(120))
    assert too_big.status_code == 422
    assert too_big.json()["errors"] == [
        {
            "message": "operation has complexity 121, which exceeds the limit of 100",
            "extensions": {"code": "COMPLEXITY_LIMIT_EXCEEDED"},
        }
    ]


def test_parse_validation_and_body_errors(client, state) -> None:
    parse = post(client, state, "{ signals(")
    assert (
        parse.status_code == 422 and parse.json()["errors"][0]["extensions"]["code"] == "GRAPHQL_PARSE_FAILED"
    )
    invalid = post(client, state, "{ signals(tokenId: 11) { nope } }")
    assert (
        invalid.status_code == 422
        and invalid.json()["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    )
    bad_time = post(
        client,
        state,
        "query($t: Time!) { events(tokenId: 11, from: $t, to: $t) { name } }",
        {"t": "yesterday"},
    )
    assert bad_time.status_code == 422
    body = client.post("/telemetry/query", content=b"{nope", headers={"content-type": "application/json"})
    assert body.status_code == 400


@pytest.mark.parametrize("kind", ["garbage", "expired", "foreign"])
def test_invalid_jwt_is_401(client, state, kind) -> None:
    if kind == "garbage":
        token = "not.a.jwt"
    elif kind == "expired":
        token = vehicle_jwt(state, 11, ttl=-5)
    else:
        token = state.dev_key.sign(
            {
                "iss": "https://auth-roles-rights.dimo.zone",
                "aud": ["dimo.zone"],
                "exp": int(state.clock()) + 60,
            }
        )
    r = client.post(
        "/telemetry/query", json={"query": "{ __typename }"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert (r.status_code, r.json()) == (401, {"message": "JWT is invalid."})


def test_missing_jwt_and_token_mismatch(client, state) -> None:
    q = signals_query("speed(agg: MAX)", frm=_iso(T0), to=_iso(T0 + timedelta(minutes=2)))
    missing = post(client, state, q + "", token_id=None).json()
    assert (
        missing["data"] == {"signals": None}
        and missing["errors"][0]["message"] == "unauthorized: jwt missing"
    )
    mismatch = post(client, state, q, token_id=12).json()
    assert mismatch["errors"][0]["message"] == "unauthorized: token id does not match"
    latest = post(client, state, "{ signalsLatest(tokenId: 11) { lastSeen } }", token_id=12).json()
    assert latest == {
        "errors": [
            {
                "message": "unauthorized: token id does not match",
                "path": ["signalsLatest"],
                "extensions": {"code": "UNAUTHORIZED"},
            }
        ],
        "data": {"signalsLatest": None},
    }
    assert post(client, state, "{ __typename }", token_id=None).json() == {"data": {"__typename": "Query"}}


def test_token_for_another_vehicle_contract_is_unauthorized(client, state) -> None:
    now = int(state.clock())
    token = state.vehicle_key.sign(
        {
            "iss": "https://auth-roles-rights.dimo.zone",
            "aud": ["dimo.zone"],
            "exp": now + 600,
            "asset": f"did:erc721:80002:{VEHICLE_NFT_DEV}:11",
            "permissions": [ID_TO_PERMISSION[p] for p in ALL],
        }
    )
    q = signals_query("speed(agg: MAX)", frm=_iso(T0), to=_iso(T0 + timedelta(minutes=2)))
    q = q[:-1] + " signalsLatest(tokenId: 11) { lastSeen } }"
    r = client.post("/telemetry/query", json={"query": q}, headers={"Authorization": f"Bearer {token}"})
    message = (
        f"unauthorized: contract in claim is {VEHICLE_NFT_DEV} instead of the required {VEHICLE_NFT_PROD}"
    )
    body = r.json()
    assert body["data"] == {"signals": None, "signalsLatest": None}
    assert [e["message"] for e in body["errors"]] == [message, message]


def test_window_microseconds_are_exact_before_1970() -> None:
    assert to_us(datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)) == -500_000
    assert to_us(T0 + timedelta(microseconds=7)) == int(T0.timestamp()) * 1_000_000 + 7


@pytest.mark.parametrize(
    ("privileges", "fields", "message"),
    [
        (
            (4,),
            "speed(agg: MAX)",
            "unauthorized: missing required privilege(s) privilege:GetNonLocationHistory",
        ),
        (
            (1,),
            "currentLocationAltitude(agg: MAX)",
            "unauthorized: missing required privilege(s) privilege:GetLocationHistory",
        ),
        (
            (1, 8),
            "currentLocationCoordinates(agg: LAST) { latitude }",
            "unauthorized: missing required privilege(s) privilege:GetLocationHistory",
        ),
        (
            (1,),
            "currentLocationApproximateCoordinates(agg: LAST) { latitude }",
            "unauthorized: requires at least one of the following privileges [privilege:GetApproximateLocation privilege:GetLocationHistory]",
        ),
        ((1, 8), "currentLocationApproximateCoordinates(agg: LAST) { latitude }", None),
        ((4,), "currentLocationApproximateCoordinates(agg: LAST) { latitude }", None),
    ],
)
def test_signal_privileges(client, state, privileges, fields, message) -> None:
    q = signals_query(fields, frm=_iso(T0), to=_iso(T0 + timedelta(minutes=2)))
    body = post(client, state, q, privileges=privileges).json()
    if message is None:
        assert "errors" not in body and len(body["data"]["signals"]) == 2
    else:
        assert body["data"] == {"signals": None}
        assert body["errors"] == [
            {"message": message, "path": ["signals"], "extensions": {"code": "UNAUTHORIZED"}}
        ]


# ---- other root fields ------------------------------------------------------------------------------


def test_signals_latest(client, state) -> None:
    q = """{ signalsLatest(tokenId: 11) {
        lastSeen speed { timestamp value } obdDTCList { value }
        currentLocationCoordinates { timestamp value { latitude longitude hdop } }
        powertrainType { value } } }"""
    s = _series_11()
    last_speed = s.filter(pl.col("speed").is_not_null()).tail(1)
    last_loc = s.filter(pl.col("latitude").is_not_null()).tail(1)
    data = post(client, state, q).json()["data"]["signalsLatest"]
    assert data == {
        "lastSeen": _iso(T0 + (N - 1) * STEP),
        "speed": {"timestamp": _iso(last_speed["ts"].item()), "value": last_speed["speed"].item()},
        "obdDTCList": {"value": s["obdDTCList"].drop_nulls()[-1]},
        "currentLocationCoordinates": {
            "timestamp": _iso(last_loc["ts"].item()),
            "value": {
                "latitude": last_loc["latitude"].item(),
                "longitude": last_loc["longitude"].item(),
                "hdop": last_loc["hdop"].item(),
            },
        },
        "powertrainType": None,
    }
    denied = post(
        client,
        state,
        "{ signalsLatest(tokenId: 11) { speed { value } currentLocationCoordinates { timestamp } } }",
        privileges=(1,),
    ).json()
    assert denied["data"]["signalsLatest"] == {
        "speed": {"value": last_speed["speed"].item()},
        "currentLocationCoordinates": None,
    }
    assert denied["errors"][0]["path"] == ["signalsLatest", "currentLocationCoordinates"]


def test_available_signals_and_data_summary(client, state) -> None:
    q = """{ availableSignals(tokenId: 11) dataSummary(tokenId: 11) {
        numberOfSignals availableSignals firstSeen lastSeen
        signalDataSummary { name numberOfSignals firstSeen lastSeen }
        eventDataSummary { name numberOfEvents firstSeen lastSeen } } }"""
    s = _series_11()
    names = [
        "currentLocationAltitude",
        "currentLocationCoordinates",
        "exteriorAirTemperature",
        "obdDTCList",
        "speed",
    ]
    data = post(client, state, q).json()["data"]
    assert data["availableSignals"] == names
    summary = data["dataSummary"]
    counts = {
        n: s[c].count()
        for n, c in zip(
            names,
            ["currentLocationAltitude", "latitude", "exteriorAirTemperature", "obdDTCList", "speed"],
            strict=True,
        )
    }
    assert summary["numberOfSignals"] == sum(counts.values())
    assert {d["name"]: d["numberOfSignals"] for d in summary["signalDataSummary"]} == counts
    # The overall span also covers events (the last, safety.collision, is at 00:30, inside the series).
    assert (summary["firstSeen"], summary["lastSeen"]) == (_iso(T0), _iso(T0 + (N - 1) * STEP))
    assert summary["eventDataSummary"][0] == {
        "name": "behavior.harshAcceleration",
        "numberOfEvents": 1,
        "firstSeen": _iso(T0 + timedelta(minutes=5)),
        "lastSeen": _iso(T0 + timedelta(minutes=5)),
    }
    # telemetry-api filters neither by the caller's privileges (only signalsSnapshot does).
    non_location = post(client, state, q, privileges=(1,)).json()["data"]
    assert non_location == data
    empty = post(
        client,
        state,
        "{ availableSignals(tokenId: 13) dataSummary(tokenId: 13) { numberOfSignals availableSignals "
        "signalDataSummary { name } firstSeen lastSeen } }",
        token_id=13,
    ).json()["data"]
    assert empty["availableSignals"] is None
    # GetDataSummary's starting values survive when there is no data: firstSeen = now, lastSeen = 1900.
    first_seen = datetime.fromisoformat(empty["dataSummary"].pop("firstSeen").replace("Z", "+00:00"))
    assert first_seen > datetime(2026, 1, 1, tzinfo=UTC)
    assert empty["dataSummary"] == {
        "numberOfSignals": 0,
        "availableSignals": [],
        "signalDataSummary": [],
        "lastSeen": "1900-01-01T00:00:00Z",
    }


def test_signals_snapshot_is_filtered_by_privileges(client, state) -> None:
    q = """{ signalsSnapshot(tokenId: 11) { lastSeen
        signals { name timestamp valueNumber valueString valueLocation { latitude longitude hdop } } } }"""
    full = post(client, state, q).json()["data"]["signalsSnapshot"]
    latest = post(client, state, "{ signalsLatest(tokenId: 11) { lastSeen speed { timestamp value } } }")
    latest_data = latest.json()["data"]["signalsLatest"]
    by_name = {s["name"]: s for s in full["signals"]}
    assert full["lastSeen"] == latest_data["lastSeen"]
    assert list(by_name) == [
        "currentLocationAltitude",
        "currentLocationCoordinates",
        "exteriorAirTemperature",
        "obdDTCList",
        "speed",
        "currentLocationApproximateCoordinates",  # derived, appended last
    ]
    speed = by_name["speed"]
    assert (speed["timestamp"], speed["valueNumber"]) == (
        latest_data["speed"]["timestamp"],
        latest_data["speed"]["value"],
    )
    assert speed["valueString"] is None and speed["valueLocation"] is None
    assert isinstance(by_name["obdDTCList"]["valueString"], str)
    exact, approx = by_name["currentLocationCoordinates"], by_name["currentLocationApproximateCoordinates"]
    assert exact["valueLocation"] != approx["valueLocation"]
    assert abs(exact["valueLocation"]["latitude"] - approx["valueLocation"]["latitude"]) < 0.05
    # without location privileges the location entries disappear (no error, unlike signalsLatest)
    no_loc = post(client, state, q, privileges=(1,)).json()
    assert "errors" not in no_loc
    assert [s["name"] for s in no_loc["data"]["signalsSnapshot"]["signals"]] == [
        "exteriorAirTemperature",
        "obdDTCList",
        "speed",
    ]
    none = post(client, state, "{ signalsSnapshot(tokenId: 13) { lastSeen signals { name } } }", token_id=13)
    assert none.json()["data"]["signalsSnapshot"] == {"lastSeen": None, "signals": []}


def test_data_summary_first_and_last_seen_cover_events() -> None:
    fleet = _fleet()
    fleet.events[12] = fleet.events[11].with_columns(pl.col("ts") + timedelta(hours=2))
    st = EmulatorState(fleet=fleet, public_url="http://127.0.0.1")
    q = "{ dataSummary(tokenId: 12) { firstSeen lastSeen signalDataSummary { lastSeen } } }"
    with serve(create_app(st)) as url, httpx.Client(base_url=url, timeout=10) as c:
        got = post(c, st, q, token_id=12).json()["data"]["dataSummary"]
    assert got["lastSeen"] == _iso(T0 + timedelta(hours=2, minutes=30))
    assert max(s["lastSeen"] for s in got["signalDataSummary"]) < got["lastSeen"]


def test_events(client, state) -> None:
    q = """query($f: EventFilter) { events(tokenId: 11, from: "2024-06-28T00:00:00Z", to: "2024-06-28T00:09:00Z", filter: $f) {
        timestamp name source durationNs metadata } }"""
    rows = post(client, state, q).json()["data"]["events"]
    assert [r["timestamp"] for r in rows] == [
        _iso(T0 + timedelta(minutes=1)),
        _iso(T0 + timedelta(minutes=5)),
    ]
    assert rows[0] == {
        "timestamp": "2024-06-28T00:01:00Z",
        "name": "behavior.harshBraking",
        "source": SOURCES["tesla"],
        "durationNs": 1_500_000_000,
        "metadata": '{"g":0.5}',
    }
    named = post(client, state, q, {"f": {"name": {"in": ["behavior.harshAcceleration"]}}}).json()["data"][
        "events"
    ]
    assert [r["name"] for r in named] == ["behavior.harshAcceleration"]
    # durationNs is gqlgen's 64-bit Int: 3 s does not fit graphql-core's 32-bit Int.
    assert next(r for r in rows if r["name"] == "behavior.harshAcceleration")["durationNs"] == 3_000_000_000
    prefixed = post(client, state, q, {"f": {"name": {"startsWith": "behavior.harshA"}}}).json()["data"]
    assert [r["name"] for r in prefixed["events"]] == ["behavior.harshAcceleration"]
    either = {
        "name": {"neq": "x", "or": [{"eq": "behavior.harshBraking"}, {"startsWith": "behavior.harshA"}]}
    }
    assert len(post(client, state, q, {"f": either}).json()["data"]["events"]) == 2
    neither = {"name": {"or": [{"eq": "nope"}, {"startsWith": "safety"}]}}
    assert post(client, state, q, {"f": neither}).json()["data"]["events"] == []
    denied = post(client, state, q, privileges=(1,)).json()
    assert (
        denied["errors"][0]["message"]
        == "unauthorized: missing required privilege(s) privilege:GetLocationHistory"
    )


def test_vin_vc(client, state) -> None:
    q = "{ vinVCLatest(tokenId: 11) { vin rawVC vehicleTokenId validFrom validTo } }"
    first = post(client, state, q).json()["data"]["vinVCLatest"]
    raw = orjson.loads(first["rawVC"])
    assert (first["validFrom"], first["validTo"]) == (raw["validFrom"], raw["validTo"])
    assert first["validTo"] > first["validFrom"]
    assert first == post(client, state, q).json()["data"]["vinVCLatest"]
    assert first["vin"] == fake_vin(11) and len(first["vin"]) == 17 and first["vehicleTokenId"] == 11
    assert orjson.loads(first["rawVC"])["credentialSubject"]["vehicleIdentificationNumber"] == first["vin"]
    denied = post(client, state, q, privileges=(1, 4)).json()
    assert (
        denied["errors"][0]["message"]
        == "unauthorized: missing required privilege(s) privilege:GetVINCredential"
    )


def test_get_request(client, state) -> None:
    headers = {"Authorization": f"Bearer {vehicle_jwt(state, 11)}"}
    r = client.get("/telemetry/query", params={"query": "{ availableSignals(tokenId: 11) }"}, headers=headers)
    assert r.status_code == 200 and "speed" in r.json()["data"]["availableSignals"]


# ---- speed -----------------------------------------------------------------------------------------


def test_measure_one_day_ten_second_data() -> None:
    """Prints (does not assert) the time of one request: 1 vehicle × 1 day of 10-s data × 15 signals, 1-minute buckets."""
    names = [
        n
        for n, s in current_signals().items()
        if s.gql_type == "Float" and s.privilege.endswith("NON_LOCATION_DATA")
    ][:15]
    rows = 8640
    rng = np.random.default_rng(1)
    frame = pl.DataFrame(
        {"ts": [T0 + i * STEP for i in range(rows)], **{n: rng.normal(50, 10, rows) for n in names}},
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    fleet = Fleet(
        make_license(1), {21: _vehicle(21, SOURCES["tesla"])}, {21: frame}, {}, T0, T0 + timedelta(days=1)
    )
    st = EmulatorState(fleet=fleet, public_url="http://127.0.0.1")
    fields = " ".join(
        f"{n}(agg: {agg})" for n, agg in zip(names, ["AVG", "MAX", "MIN", "LAST", "MED"] * 3, strict=True)
    )
    q = signals_query(f"timestamp {fields}", token=21, frm=_iso(T0), to=_iso(T0 + timedelta(days=1)))
    from starlette.applications import Starlette

    with serve(Starlette(routes=routes(st))) as url, httpx.Client(base_url=url, timeout=30) as http:
        headers = {"Authorization": f"Bearer {vehicle_jwt(st, 21)}"}
        first = http.post("/telemetry/query", json={"query": q}, headers=headers)
        assert len(first.json()["data"]["signals"]) == 1440
        t = time.perf_counter()
        for _ in range(20):
            http.post("/telemetry/query", json={"query": q}, headers=headers)
        per_request = (time.perf_counter() - t) / 20
    print(
        f"\n[telemetry] 1 day × 10 s × 15 signals @1m: {per_request * 1000:.1f} ms/request (1440 rows, {len(first.content)} bytes)"
    )
