"""The small shared pieces of connectors.dimo: catalog, privileges, Go durations, the Arrow contract."""

from datetime import timedelta

import pyarrow as pa
import pytest

from connectors.dimo.catalog import current_signals, signal_catalog
from connectors.dimo.go_duration import (
    GoDurationError,
    format_go_duration,
    parse_go_duration,
    parse_go_duration_ns,
)
from connectors.dimo.privileges import decode_sacd_permissions, encode_sacd_permissions
from connectors.dimo.schema import (
    conform_table,
    resolve_signals,
    signals_of_columns,
    telemetry_schema,
    validate_table,
)
from depin_core.errors import ConfigError


def test_catalog_has_the_documented_signals() -> None:
    cat = signal_catalog()
    assert len(cat) == 123
    assert cat["speed"].unit == "km/h" and cat["speed"].gql_type == "Float"
    assert cat["currentLocationCoordinates"].gql_type == "Location"
    assert cat["powertrainType"].gql_type == "String"
    assert "currentLocationLatitude" in cat and "currentLocationLatitude" not in current_signals()
    assert cat["powertrainTransmissionTravelledDistance"].default_agg == "LAST"
    assert cat["isIgnitionOn"].default_agg == "MAX"
    assert cat["exteriorAirTemperature"].default_agg == "AVG"


def test_sacd_bits_match_reference_example() -> None:
    assert encode_sacd_permissions(range(1, 7)) == "0x3ffc"
    assert decode_sacd_permissions("0x3ffc") == [1, 2, 3, 4, 5, 6]
    assert decode_sacd_permissions(encode_sacd_permissions([1, 4, 8])) == [1, 4, 8]
    assert decode_sacd_permissions("0x0") == []


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1m", 60 * 10**9),
        ("1h30m", 5400 * 10**9),
        ("1.5h", 5400 * 10**9),
        ("300ms", 300 * 10**6),
        ("24h", 86400 * 10**9),
        ("-1h", -3600 * 10**9),
        ("0", 0),
        ("2us", 2000),
        ("1µs", 1000),
    ],
)
def test_go_duration_parse(text: str, ns: int) -> None:
    assert parse_go_duration_ns(text) == ns


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        ("10", 'time: missing unit in duration "10"'),
        ("", 'time: invalid duration ""'),
        ("h", 'time: invalid duration "h"'),
    ],
)
def test_go_duration_errors_use_go_text(text: str, message: str) -> None:
    with pytest.raises(GoDurationError) as info:
        parse_go_duration_ns(text)
    assert str(info.value) == message


def test_go_duration_format_round_trips() -> None:
    for delta in (
        timedelta(minutes=1),
        timedelta(hours=1, minutes=30),
        timedelta(seconds=90),
        timedelta(hours=24),
    ):
        assert parse_go_duration(format_go_duration(delta)) == delta
    assert format_go_duration(timedelta(hours=24)) == "24h"


def test_schema_contract() -> None:
    schema = telemetry_schema(["speed", "currentLocationCoordinates", "powertrainType"], interval="1m")
    assert schema.names[:2] == ["token_id", "timestamp"]
    assert schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert schema.field("speed").type == pa.float64()
    assert schema.field("powertrainType").type == pa.string()
    assert {"latitude", "longitude"} <= set(schema.names)
    assert schema.metadata[b"depin.interval"] == b"1m"
    assert schema.field("speed").metadata[b"agg"] == b"AVG"
    assert signals_of_columns(schema.names) == ["currentLocationCoordinates", "powertrainType", "speed"]


def test_unknown_signal_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown DIMO signal\(s\) \['Speed'\]"):
        resolve_signals(["Speed"])


def test_conform_and_validate() -> None:
    schema = telemetry_schema(["speed", "exteriorAirTemperature"])
    part = pa.table(
        {
            "token_id": pa.array([1], pa.int64()),
            "timestamp": pa.array([0], pa.timestamp("us", tz="UTC")),
            "speed": [12.5],
        }
    )
    full = conform_table(part, schema)
    assert full.schema.names == schema.names
    assert full.column("exteriorAirTemperature").null_count == 1
    validate_table(full)
    with pytest.raises(ConfigError, match="not a DIMO signal"):
        validate_table(full.append_column("bogus", pa.array([1.0])))
    with pytest.raises(ConfigError, match="key column 'token_id'"):
        validate_table(full.drop_columns(["token_id"]))
