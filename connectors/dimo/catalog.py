"""The DIMO signal catalog: every telemetry signal's name, GraphQL type, unit and privilege.

Loaded once from ``signals.tsv`` (copied from DIMO's telemetry-api schema, 2026-08). This is the single
place the rest of the code asks "what signals exist, what type are they, who may read them".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

GqlType = Literal["Float", "String", "Location"]

NON_LOCATION = "VEHICLE_NON_LOCATION_DATA"
ALL_TIME_LOCATION = "VEHICLE_ALL_TIME_LOCATION"
APPROXIMATE_LOCATION = "VEHICLE_APPROXIMATE_LOCATION"

# Aggregation used for a signal's column when ingesting into Arrow (one column per signal).
# Cumulative and level signals keep the bucket's last reading; flags keep "was it ever on"; the rest average.
_LAST_SIGNALS = frozenset(
    {
        "powertrainTransmissionTravelledDistance",
        "powertrainFuelSystemAccumulatedConsumption",
        "powertrainTractionBatteryChargingAddedEnergy",
        "obdRunTime",
        "obdDistanceSinceDTCClear",
        "obdDistanceWithMIL",
        "obdStatusDTCCount",
        "obdWarmupsSinceDTCClear",
        "powertrainTractionBatteryGrossCapacity",
        "powertrainTractionBatteryStateOfHealth",
        "serviceDistanceToService",
        "serviceTimeToService",
        "powertrainTransmissionActualGear",
        "powertrainTransmissionCurrentGear",
        "powertrainTransmissionSelectedGear",
    }
)


@dataclass(frozen=True, slots=True)
class Signal:
    name: str
    gql_type: GqlType
    unit: str
    privilege: str
    current: bool
    description: str

    @property
    def is_flag(self) -> bool:
        """0/1 float signals (booleans in VSS)."""
        return (
            self.gql_type == "Float" and not self.unit and ("Is" in self.name or self.name.startswith("is"))
        )

    @property
    def default_agg(self) -> str:
        """The aggregation the connector requests for this signal's Arrow column."""
        if self.gql_type == "String":
            return "LAST"
        if self.gql_type == "Location":
            return "LAST"
        if self.name in _LAST_SIGNALS:
            return "LAST"
        if self.is_flag:
            return "MAX"
        return "AVG"


@cache
def signal_catalog() -> dict[str, Signal]:
    """All signals known to the telemetry API, current and removed, by name (catalog order)."""
    text = resources.files("connectors.dimo").joinpath("signals.tsv").read_text(encoding="utf-8")
    out: dict[str, Signal] = {}
    for row in csv.DictReader(text.splitlines(), delimiter="\t"):
        out[row["name"]] = Signal(
            name=row["name"],
            gql_type=row["gql_type"],  # type: ignore[arg-type]
            unit=row["unit"],
            privilege=row["privilege"],
            current=row["status"].startswith("current"),
            description=row["description"],
        )
    return out


@cache
def current_signals() -> dict[str, Signal]:
    """Signals served by today's telemetry API (removed ones excluded). Shared: do not mutate."""
    return {n: s for n, s in signal_catalog().items() if s.current}
