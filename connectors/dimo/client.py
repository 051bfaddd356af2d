"""``DimoClient``: the async DIMO connector (real DIMO or the emulator; only the URLs differ).

>>> async with DimoClient(DimoSettings.from_credentials_file("creds.json")) as dimo:
...     vehicles = await dimo.discover_vehicles()
...     async for hist in dimo.fetch_fleet(vehicles, since=t0, until=t1, interval=timedelta(minutes=1),
...                                        signals=["speed", "currentLocationCoordinates"]):
...         write(hist.table)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Protocol, runtime_checkable

import httpx
import pyarrow as pa

from connectors.dimo import _telemetry as tm
from connectors.dimo._auth import DeveloperToken, VehicleTokens
from connectors.dimo._http import (
    Admission,
    ClientStats,
    Pacer,
    RetryPolicy,
    Service,
    TokenSource,
    graphql_data,
)
from connectors.dimo._identity import VehicleInfo, discover_vehicles
from connectors.dimo.catalog import ALL_TIME_LOCATION, NON_LOCATION, current_signals, signal_catalog
from connectors.dimo.errors import DimoPrivilegeError, DimoQueryError
from connectors.dimo.go_duration import format_go_duration
from connectors.dimo.privileges import ID_TO_PERMISSION, LOCATION_HISTORY, NON_LOCATION_HISTORY
from connectors.dimo.schema import resolve_signals, telemetry_schema
from connectors.dimo.settings import DimoSettings
from depin_core.errors import ConfigError
from depin_core.timeparse import parse_instant

__all__ = [
    "Admission",
    "ClientStats",
    "DimoClient",
    "Pacer",
    "TelemetrySource",
    "VehicleHistory",
    "VehicleInfo",
]

# Signal privilege (catalog) → privilege id the license needs.
_PRIVILEGE_ID = {NON_LOCATION: NON_LOCATION_HISTORY, ALL_TIME_LOCATION: LOCATION_HISTORY}
_DATA_PRIVILEGES = frozenset(_PRIVILEGE_ID.values())
_AVAILABLE_QUERY = "query Available($tokenId: Int!) { availableSignals(tokenId: $tokenId) }"


@dataclass(frozen=True, slots=True)
class VehicleHistory:
    """One vehicle's telemetry for ``[since, until)``; ``requests`` counts its telemetry requests (pages and the
    ``dataSummary`` lookup, when the planner made one).

    ``skipped_reason`` is set (and ``table`` empty) when the license may not read the vehicle; callers must
    not advance its watermark then.
    """

    vehicle: VehicleInfo
    table: pa.Table
    requests: int
    since: datetime
    until: datetime
    skipped_reason: str | None = None


@runtime_checkable
class TelemetrySource(Protocol):
    """Where vehicle telemetry comes from (``DimoClient`` against real DIMO or the emulator)."""

    async def discover_vehicles(self) -> list[VehicleInfo]: ...

    async def available_signals(self, token_id: int) -> list[str]: ...

    def fetch_fleet(
        self,
        vehicles: Sequence[VehicleInfo],
        *,
        since: datetime | Mapping[int, datetime],
        until: datetime,
        interval: timedelta,
        signals: Sequence[str] | None = None,
    ) -> AsyncIterator[VehicleHistory]: ...


class DimoClient(TelemetrySource):
    """Async DIMO client: auth, discovery and planned, concurrent, retried telemetry → Arrow.

    Use as ``async with DimoClient(settings) as client``. All requests to one service share a keep-alive
    connection pool, a concurrency bound (``max_concurrency``) and a rate limiter; ``admit`` (optional) is
    awaited with the service's name before every request, for a limit shared with other processes.
    """

    def __init__(
        self,
        settings: DimoSettings,
        *,
        logger: logging.Logger | None = None,
        policy: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        admit: Admission | None = None,
    ) -> None:
        self.settings = settings
        self.log = logger or logging.getLogger("connectors.dimo")
        self.stats = ClientStats()
        self.policy = policy or RetryPolicy(
            settings.max_retries, settings.backoff_base_s, settings.backoff_max_s
        )
        urls = settings.urls
        self._urls = urls

        def service(name: str) -> Service:
            return Service(
                name,
                rate=settings.effective_rate_limit,
                concurrency=settings.max_concurrency,
                timeout_s=settings.timeout_s,
                policy=self.policy,
                stats=self.stats,
                transport=transport,
                admit=admit,
            )

        self._auth = service("auth")
        self._exchange = service("token-exchange")
        self._identity = service("identity")
        self._telemetry = service("telemetry")
        self._developer: DeveloperToken | None = None
        self._vehicle_tokens: VehicleTokens | None = None
        self._summary_supported = True  # cleared when the telemetry service rejects dataSummary
        self.planner = tm.Planner(
            settings.max_signals_per_request, settings.max_values_per_request, settings.max_window
        )

    def __repr__(self) -> str:
        return f"DimoClient(environment={self.settings.environment!r}, client_id={self.settings.client_id!r})"

    async def __aenter__(self) -> DimoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection pool."""
        await asyncio.gather(
            *(s.aclose() for s in (self._auth, self._exchange, self._identity, self._telemetry))
        )

    @property
    def developer_token(self) -> DeveloperToken:
        if self._developer is None:
            self._developer = DeveloperToken(self.settings, self._auth)
        return self._developer

    @property
    def vehicle_tokens(self) -> VehicleTokens:
        if self._vehicle_tokens is None:
            self._vehicle_tokens = VehicleTokens(self.settings, self._exchange, self.developer_token)
        return self._vehicle_tokens

    # ------------------------------------------------------------ discovery

    async def discover_vehicles(self) -> list[VehicleInfo]:
        """Every vehicle shared with the license, with the privilege ids it grants."""
        self.settings.require_credentials()
        assert self.settings.client_id
        return await discover_vehicles(
            self._identity, self._urls.identity, self.settings.client_id, logger=self.log
        )

    def _token_source(self, vehicle: VehicleInfo | int) -> TokenSource:
        """Vehicle JWTs for ``vehicle``: one exchange covers both data kinds the license holds (a bare
        token id asks for non-location data only)."""
        if isinstance(vehicle, VehicleInfo):
            token_id, privileges = vehicle.token_id, vehicle.privileges & _DATA_PRIVILEGES
        else:
            token_id, privileges = int(vehicle), frozenset()
        return self.vehicle_tokens.source(token_id, privileges or {NON_LOCATION_HISTORY})

    async def available_signals(self, token_id: int | VehicleInfo) -> list[str]:
        """Signals the vehicle has data for, restricted to current catalog names (catalog order)."""
        tid = token_id.token_id if isinstance(token_id, VehicleInfo) else int(token_id)
        what = f"DIMO availableSignals for vehicle {tid}"
        data = await self._telemetry.call(
            "POST",
            self._urls.telemetry,
            what=what,
            parse=lambda r: graphql_data(r, what),
            auth=self._token_source(token_id),
            json={"query": _AVAILABLE_QUERY, "variables": {"tokenId": tid}},
        )
        names = set(data.get("availableSignals") or [])
        return [n for n in current_signals() if n in names]

    # ------------------------------------------------------------ telemetry

    def _select(self, vehicle: VehicleInfo, wanted: Sequence[str]) -> tuple[list[str], str | None]:
        """(the subset of ``wanted`` the license may read on ``vehicle``, why the vehicle is skipped or None).

        Logs what is dropped or skipped."""
        catalog = signal_catalog()
        keep: list[str] = []
        missing: dict[int, list[str]] = {}
        for name in wanted:
            pid = _PRIVILEGE_ID.get(catalog[name].privilege, NON_LOCATION_HISTORY)
            (keep if pid in vehicle.privileges else missing.setdefault(pid, [])).append(name)
        lic = self.settings.client_id
        if not keep:
            perms = ", ".join(ID_TO_PERMISSION[p] for p in sorted(missing)) or "any data privilege"
            reason = f"license {lic} lacks {perms}; the owner must share the vehicle with the license"
            self.log.warning("vehicle %d: %s; skipping the vehicle", vehicle.token_id, reason)
            return keep, reason
        for pid, names in missing.items():
            hint = (
                "ask the owner to share location or drop location signals"
                if pid == LOCATION_HISTORY
                else "ask the owner to share vehicle data"
            )
            self.log.warning(
                "vehicle %d: license %s lacks %s; its columns %s will be null (%s)",
                vehicle.token_id,
                lic,
                ID_TO_PERMISSION[pid],
                ", ".join(names),
                hint,
            )
        return keep, None

    async def _history(
        self,
        vehicle: VehicleInfo,
        since: datetime,
        until: datetime,
        interval: timedelta,
        signals: list[str] | None,
    ) -> VehicleHistory:
        """Fetch one vehicle's ``signals`` (resolved; None = what the vehicle has); a vehicle the license
        may not read comes back with ``skipped_reason`` (logged)."""
        go_interval = format_go_duration(interval)

        def skipped(reason: str, schema: pa.Schema) -> VehicleHistory:
            self.stats.vehicles_skipped += 1
            return VehicleHistory(vehicle, schema.empty_table(), 0, since, until, skipped_reason=reason)

        if signals is not None:
            wanted = signals
            schema = _schema(tuple(signals), go_interval)
        else:
            schema = None
            if not vehicle.privileges & _DATA_PRIVILEGES:
                _, reason = self._select(vehicle, [])
                return skipped(reason or "no privileges", _schema((), go_interval))
            wanted = await self.available_signals(vehicle)
        fetch_signals, reason = self._select(vehicle, wanted) if wanted else ([], None)
        if reason:
            return skipped(reason, schema or _schema((), go_interval))
        if schema is None:
            schema = _schema(tuple(fetch_signals), go_interval)
        if until <= since or not fetch_signals:
            return VehicleHistory(vehicle, schema.empty_table(), 0, since, until)

        auth = self._token_source(vehicle)
        requests = 0
        hint = (
            f"; vehicle {vehicle.token_id}: ask the owner to share these privileges with license "
            f"{self.settings.client_id} or drop the signals that need them"
        )

        async def page(chunk: tuple[str, ...], start: datetime, end: datetime) -> pa.Table:
            nonlocal requests
            requests += 1
            what = f"DIMO telemetry vehicle {vehicle.token_id} [{start:%Y-%m-%dT%H:%M}, {end:%Y-%m-%dT%H:%M})"
            body = tm.request_body(vehicle.token_id, chunk, start, end, go_interval)
            return await self._telemetry.call(
                "POST",
                self._urls.telemetry,
                what=what,
                auth=auth,
                content=body,
                headers={"content-type": "application/json"},
                parse=lambda r: tm.parse_response(r.content, chunk, what, hint),
            )

        try:
            spans = None
            if self._worth_a_summary(fetch_signals, since, until, interval):
                requests += 1
                spans = await self._data_spans(vehicle.token_id, auth)
            windows = await tm.fetch_range(page, self.planner, fetch_signals, since, until, interval, spans)
        except DimoPrivilegeError as exc:
            self.log.warning("vehicle %d: skipped, privilege refused by DIMO: %s", vehicle.token_id, exc)
            return skipped(str(exc), schema)
        table = await asyncio.to_thread(tm.assemble, vehicle.token_id, windows, schema)
        return VehicleHistory(vehicle, table, requests, since, until)

    def _worth_a_summary(
        self, signals: list[str], since: datetime, until: datetime, interval: timedelta
    ) -> bool:
        """Whether a ``dataSummary`` lookup (one request) may pay off for this vehicle's plan."""
        s = self.settings
        if not (s.use_data_summary and self._summary_supported):
            return False
        return (
            tm.planned_requests(self.planner, signals, since, until, interval) >= s.data_summary_min_requests
        )

    async def _data_spans(self, token_id: int, auth: TokenSource) -> dict[str, tm.Span] | None:
        """Each signal's (first, last) time from ``dataSummary``; None when the service lacks the query."""
        what = f"DIMO dataSummary for vehicle {token_id}"
        try:
            data = await self._telemetry.call(
                "POST",
                self._urls.telemetry,
                what=what,
                parse=lambda r: graphql_data(r, what),
                auth=auth,
                json={"query": tm.DATA_SUMMARY_QUERY, "variables": {"tokenId": token_id}},
            )
        except DimoQueryError as exc:
            if self._summary_supported:
                self.log.warning("%s failed (%s); fetching every window without it", what, exc)
            self._summary_supported = False
            return None
        return tm.parse_data_summary(data, what)

    async def fetch_history(
        self,
        vehicle: VehicleInfo,
        *,
        since: datetime,
        until: datetime,
        interval: timedelta,
        signals: Sequence[str] | None = None,
    ) -> pa.Table:
        """One vehicle's history as a table following ``telemetry_schema`` (empty when it is skipped)."""
        since_ = _utc(since, "since")
        until_, wanted = _checked(until, interval, signals)
        return (await self._history(vehicle, since_, until_, interval, wanted)).table

    async def fetch_fleet(
        self,
        vehicles: Sequence[VehicleInfo],
        *,
        since: datetime | Mapping[int, datetime],
        until: datetime,
        interval: timedelta,
        signals: Sequence[str] | None = None,
    ) -> AsyncIterator[VehicleHistory]:
        """Yield each vehicle's history as soon as it completes (skipped ones carry ``skipped_reason``).

        ``since`` may be one time or a per-vehicle mapping (watermarks). All vehicles share the client's
        concurrency bound and rate limiter; a bounded number of vehicles is in flight at a time.
        """
        until_, wanted = _checked(until, interval, signals)
        starts = {v.token_id: _since_for(since, v.token_id) for v in vehicles}
        started = time.perf_counter()
        in_flight = max(2, 2 * self.settings.max_concurrency)
        queue = iter(vehicles)
        pending: set[asyncio.Task[VehicleHistory]] = set()
        try:
            while True:
                while len(pending) < in_flight and (v := next(queue, None)) is not None:
                    pending.add(
                        asyncio.create_task(self._history(v, starts[v.token_id], until_, interval, wanted))
                    )
                if not pending:
                    break
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.log.debug(
                "fleet fetch: %d vehicles in %.2fs, %s",
                len(starts),
                time.perf_counter() - started,
                self.stats.as_dict(),
            )


@lru_cache(maxsize=256)
def _schema(signals: tuple[str, ...], interval: str) -> pa.Schema:
    """``telemetry_schema`` memoised: every vehicle of a fleet fetch shares one (immutable) schema."""
    return telemetry_schema(signals, interval=interval)


def _checked(
    until: datetime, interval: timedelta, signals: Sequence[str] | None
) -> tuple[datetime, list[str] | None]:
    """The fetch arguments every vehicle shares, validated: ``until`` in UTC, ``signals`` resolved."""
    until_ = _utc(until, "until")
    _check_interval(interval)
    return until_, (resolve_signals(signals) if signals is not None else None)


def _utc(dt: datetime, field: str) -> datetime:
    if not isinstance(dt, datetime):
        raise ConfigError(f"{field}: expected a datetime, got {type(dt).__name__}")
    return parse_instant(dt, field=field)


def _since_for(since: datetime | Mapping[int, datetime], token_id: int) -> datetime:
    if isinstance(since, Mapping):
        if token_id not in since:
            raise ConfigError(f"since: no start time for vehicle {token_id}; give every vehicle a watermark")
        return _utc(since[token_id], f"since[{token_id}]")
    return _utc(since, "since")


def _check_interval(interval: timedelta) -> None:
    if not isinstance(interval, timedelta) or interval < timedelta(milliseconds=1):
        raise ConfigError(
            f"interval: {interval!r} must be a timedelta of at least 1 ms, e.g. timedelta(minutes=1)"
        )
