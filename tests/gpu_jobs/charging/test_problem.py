"""The problem models: validation errors name the field, tariff and slot arithmetic, the depot builder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest
from pydantic import ValidationError

from gpu_jobs.charging import (
    ChargingProblem,
    EvDemand,
    Site,
    day_night_tariff,
    problem_from_table,
    slot_energy_kwh,
    slots_needed,
    target_slots,
)
from tests.gpu_jobs.charging.helpers import START, site


def test_naive_start_is_an_error_naming_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        Site(chargers=2, charger_kw=11, start=datetime(2026, 1, 5, 12))
    assert err.value.errors()[0]["loc"] == ("start",)
    assert "timezone-aware" in str(err.value)


def test_arrive_not_before_depart_is_an_error() -> None:
    with pytest.raises(ValidationError, match="arrive_slot=5 must be before depart_slot=5"):
        EvDemand(vehicle="1", need_kwh=10, arrive_slot=5, depart_slot=5)


def test_tariff_of_the_wrong_length_is_an_error() -> None:
    with pytest.raises(ValidationError, match=r"tariff has 95 prices but slots=96"):
        site(tariff=[0.2] * 95)


def test_duplicate_vehicles_are_an_error_naming_both() -> None:
    ev = EvDemand(vehicle="7", need_kwh=10, arrive_slot=0, depart_slot=4)
    with pytest.raises(ValidationError, match=r"vehicles\[1\].vehicle='7' duplicates vehicles\[0\]"):
        ChargingProblem(site=site(), vehicles=[ev, ev])


def test_window_past_the_horizon_is_an_error() -> None:
    ev = EvDemand(vehicle="7", need_kwh=10, arrive_slot=0, depart_slot=97)
    with pytest.raises(ValidationError, match=r"vehicles\[0\].depart_slot=97 is past the horizon"):
        ChargingProblem(site=site(), vehicles=[ev])


@pytest.mark.parametrize(
    ("field", "value"),
    [("chargers", 0), ("charger_kw", -1.0), ("slot_minutes", 7), ("grid_cap_kw", 0.0)],
)
def test_bad_site_fields_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        site(**{field: value})
    assert err.value.errors()[0]["loc"][0] == field


def test_default_tariff_is_cheap_at_night_and_dear_in_the_evening() -> None:
    prices = day_night_tariff(96, 15, datetime(2026, 1, 5, 0, tzinfo=UTC))
    assert len(prices) == 96
    night = prices[8:20]  # 02:00-05:00
    evening = prices[70:80]  # 17:30-20:00
    assert max(night) < min(evening)
    assert site().prices() == day_night_tariff(96, 15, START)


def test_slot_arithmetic_uses_the_slower_of_charger_and_car() -> None:
    s = site(charger_kw=11)
    slow = EvDemand(vehicle="1", need_kwh=10, arrive_slot=0, depart_slot=3, max_kw=7.4)
    assert slot_energy_kwh(s, slow) == pytest.approx(7.4 / 4)
    assert slots_needed(s, slow) == 6  # 10 / 1.85 = 5.4 -> 6
    assert target_slots(s, slow) == 3  # the window caps it
    capped = site(charger_kw=11, grid_cap_kw=5)
    assert target_slots(capped, slow) == 0  # 7.4 kW never fits under a 5 kW cap


def test_problem_round_trips_through_json() -> None:
    p = ChargingProblem(
        site=site(), vehicles=[EvDemand(vehicle="1", need_kwh=3, arrive_slot=1, depart_slot=4)]
    )
    assert ChargingProblem.model_validate_json(p.model_dump_json()) == p


def test_depot_from_a_fleet_table_caps_need_and_rounds_the_window_inward() -> None:
    arrive = START + timedelta(hours=5, minutes=7)  # 17:07 -> first whole slot 17:15 = slot 21
    depart = START + timedelta(hours=19, minutes=50)  # 07:50 -> last whole slot ends 07:45 = slot 79 excl.
    table = pa.table(
        {
            "token_id": [11, 12],
            "soc_pct": [40.0, 90.0],
            "gross_kwh": [60.0, 60.0],
            "need_kwh": [20.0, 20.0],
            "arrive": [arrive, arrive],
            "depart": [depart, depart],
        }
    )
    p = problem_from_table(table, site())
    a, b = p.vehicles
    assert (a.vehicle, a.need_kwh, a.arrive_slot, a.depart_slot) == ("11", 20.0, 21, 79)
    assert b.need_kwh == pytest.approx(6.0)  # 10 % of 60 kWh is all the battery takes
    pdf = table.to_pandas()
    assert problem_from_table(pdf, site()) == p


def test_depot_rows_outside_the_horizon_or_naive_are_errors_naming_the_row() -> None:
    naive = datetime(2026, 1, 5, 18)
    table = pa.table(
        {
            "token_id": [1],
            "soc_pct": [50.0],
            "gross_kwh": [60.0],
            "need_kwh": [10.0],
            "arrive": pa.array([naive]),
            "depart": pa.array([naive + timedelta(hours=2)]),
        }
    )
    with pytest.raises(ValueError, match=r"fleet row 0: arrive=.* must be timezone-aware"):
        problem_from_table(table, site())
    late = START + timedelta(days=2)
    table = pa.table(
        {
            "token_id": [1],
            "soc_pct": [50.0],
            "gross_kwh": [60.0],
            "need_kwh": [10.0],
            "arrive": [late],
            "depart": [late + timedelta(hours=3)],
        }
    )
    with pytest.raises(ValueError, match=r"fleet row 0 \(token_id=1\).*covers no whole slot"):
        problem_from_table(table, site())
    with pytest.raises(ValueError, match="lacks column"):
        problem_from_table(pa.table({"token_id": [1]}), site())
