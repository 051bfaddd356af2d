"""The fleet charging problem and its answer, as JSON-able pydantic models.

A depot has ``chargers`` chargers of ``charger_kw`` each and an optional grid cap on the sum of charging power.
Time is cut into ``slots`` slots of ``slot_minutes``; a vehicle charges a whole slot at full power or not at all
(its power is ``min(charger_kw, max_kw)``). Each vehicle must get ``need_kwh`` between ``arrive_slot`` (inclusive)
and ``depart_slot`` (exclusive); the cost is the energy bought times the slot's tariff.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Anchor prices (EUR/kWh, all-in retail on a dynamic tariff) at each local hour; slots interpolate linearly.
# Night is cheapest, the morning and evening peaks are dear, midday dips with solar.
_HOURLY_EUR_KWH = (
    0.21, 0.20, 0.19, 0.185, 0.185, 0.19, 0.22, 0.28, 0.33, 0.31, 0.27, 0.24,
    0.22, 0.21, 0.22, 0.25, 0.29, 0.35, 0.40, 0.39, 0.34, 0.29, 0.25, 0.23,
)  # fmt: skip


def day_night_tariff(slots: int, slot_minutes: int, start: datetime) -> list[float]:
    """A realistic day-night price curve (EUR/kWh) for ``slots`` slots from ``start`` (its own local clock)."""
    out: list[float] = []
    for i in range(slots):
        t = start + timedelta(minutes=slot_minutes * i + slot_minutes / 2)
        h = t.hour + t.minute / 60 + t.second / 3600
        lo = int(h) % 24
        frac = h - int(h)
        price = _HOURLY_EUR_KWH[lo] * (1 - frac) + _HOURLY_EUR_KWH[(lo + 1) % 24] * frac
        out.append(round(price, 5))
    return out


class Site(BaseModel):
    """The depot: chargers, their power, the grid cap and the time grid with its tariff."""

    model_config = ConfigDict(extra="forbid")

    chargers: int = Field(gt=0)
    charger_kw: float = Field(gt=0, allow_inf_nan=False)
    grid_cap_kw: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    slot_minutes: int = Field(default=15, ge=1, le=60)
    slots: int = Field(default=96, ge=1, le=20_000)
    start: datetime
    tariff: list[float] | None = None

    @field_validator("slot_minutes")
    @classmethod
    def _divides_day(cls, v: int) -> int:
        if 1440 % v:
            raise ValueError(f"slot_minutes={v} must divide 1440 (a day); use e.g. 5, 10, 15, 30 or 60")
        return v

    @field_validator("start")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError(
                "start must be timezone-aware (e.g. 2026-01-05T16:00:00Z); a naive datetime is ambiguous"
            )
        return v

    @field_validator("tariff")
    @classmethod
    def _finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            for i, p in enumerate(v):
                if not math.isfinite(p):
                    raise ValueError(f"tariff[{i}]={p} is not a finite price per kWh")
        return v

    @model_validator(mode="after")
    def _tariff_len(self) -> Site:
        if self.tariff is not None and len(self.tariff) != self.slots:
            raise ValueError(
                f"tariff has {len(self.tariff)} prices but slots={self.slots}; give one price per slot "
                "or leave tariff unset for the default day-night curve"
            )
        return self

    @property
    def slot_hours(self) -> float:
        return self.slot_minutes / 60

    @property
    def cap_kw(self) -> float:
        """The grid cap in force (the chargers' total power when none is set)."""
        return self.grid_cap_kw if self.grid_cap_kw is not None else self.chargers * self.charger_kw

    def prices(self) -> list[float]:
        """The tariff per slot: the given one or the default day-night curve."""
        if self.tariff is not None:
            return list(self.tariff)
        return day_night_tariff(self.slots, self.slot_minutes, self.start)

    def slot_of(self, t: datetime) -> int:
        """The slot index holding instant ``t`` (floor; may be outside 0..slots)."""
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError(f"instant {t!r} must be timezone-aware")
        return math.floor((t - self.start).total_seconds() / (60 * self.slot_minutes))


class EvDemand(BaseModel):
    """One vehicle: how much energy it needs and when it is plugged in (slot indices, depart exclusive)."""

    model_config = ConfigDict(extra="forbid")

    vehicle: str = Field(min_length=1)
    need_kwh: float = Field(ge=0, allow_inf_nan=False)
    arrive_slot: int = Field(ge=0)
    depart_slot: int = Field(ge=1)
    max_kw: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _window(self) -> EvDemand:
        if self.arrive_slot >= self.depart_slot:
            raise ValueError(
                f"vehicle {self.vehicle}: arrive_slot={self.arrive_slot} must be before depart_slot={self.depart_slot}"
            )
        return self

    @property
    def window(self) -> range:
        return range(self.arrive_slot, self.depart_slot)


class ChargingProblem(BaseModel):
    """A site and the vehicles to charge there (unique ``vehicle`` ids, windows inside the horizon)."""

    model_config = ConfigDict(extra="forbid")

    site: Site
    vehicles: list[EvDemand]

    @model_validator(mode="after")
    def _consistent(self) -> ChargingProblem:
        seen: dict[str, int] = {}
        for i, ev in enumerate(self.vehicles):
            if ev.vehicle in seen:
                raise ValueError(
                    f"vehicles[{i}].vehicle={ev.vehicle!r} duplicates vehicles[{seen[ev.vehicle]}]; "
                    "give each vehicle once (sum its needs)"
                )
            seen[ev.vehicle] = i
            if ev.depart_slot > self.site.slots:
                raise ValueError(
                    f"vehicles[{i}].depart_slot={ev.depart_slot} is past the horizon (site.slots={self.site.slots}); "
                    "clip the window or lengthen the horizon"
                )
        return self


class Unmet(BaseModel):
    """A vehicle that does not get its full need, with how much it gets and why."""

    model_config = ConfigDict(extra="forbid")

    vehicle: str
    need_kwh: float
    planned_kwh: float
    reason: str


class Plan(BaseModel):
    """A solver's answer after check and repair; cost and energy are recomputed locally."""

    model_config = ConfigDict(extra="forbid")

    solver: str
    schedule: dict[str, list[int]]
    energy_kwh: dict[str, float]
    cost: float
    unmet: list[Unmet]
    feasible: bool
    wall_s: float
    attempts: list[dict[str, Any]] = Field(default_factory=list)


def ev_kw(site: Site, ev: EvDemand) -> float:
    """The power a vehicle draws while charging: the charger's, limited by its on-board charger."""
    return min(site.charger_kw, ev.max_kw) if ev.max_kw is not None else site.charger_kw


def slot_energy_kwh(site: Site, ev: EvDemand) -> float:
    """Energy one slot of charging adds to this vehicle."""
    return ev_kw(site, ev) * site.slot_hours


def slots_needed(site: Site, ev: EvDemand) -> int:
    """Whole slots needed to reach ``need_kwh`` (regardless of the window)."""
    if ev.need_kwh <= 0:
        return 0
    return max(0, math.ceil(ev.need_kwh / slot_energy_kwh(site, ev) - 1e-9))


def target_slots(site: Site, ev: EvDemand) -> int:
    """Slots to plan: the need, capped by what the window allows (0 when the grid cap is below its power)."""
    if ev_kw(site, ev) > site.cap_kw + 1e-9:
        return 0
    return min(slots_needed(site, ev), len(ev.window))
