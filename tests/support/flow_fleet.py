"""The fleet the flow tests ingest, train on and score (tests/pipelines and the e2e flow tests)."""

from __future__ import annotations

from datetime import UTC, datetime

# A fixed end of history: the same fleet on every run. 10 vehicles x 2 days (~31k rows at 20 s): EVs with
# measurable trips enough for the range model to beat the fleet-mean baseline on its held-out vehicle.
FLEET_END = datetime(2026, 11, 25, tzinfo=UTC)
FLEET = {"vehicles": 10, "days": 2.0, "seed": 4}
SINCE, UNTIL = "2026-11-23T00:00:00Z", "2026-11-25T00:00:00Z"
SIGNALS = [
    "speed",
    "powertrainTransmissionTravelledDistance",
    "isIgnitionOn",
    "exteriorAirTemperature",
    "powertrainType",
    "powertrainTractionBatteryStateOfChargeCurrent",
    "powertrainTractionBatteryGrossCapacity",
    "powertrainTractionBatteryStateOfHealth",
    "powertrainTractionBatteryCurrentPower",
    "powertrainTractionBatteryChargingIsCharging",
]
RANGE_HP = {"epochs": 30}
