"""DIMO vehicle telemetry: an async client for DIMO's Auth, Token Exchange, Identity and Telemetry APIs (or the
local emulator in ``connectors.dimo.emulator``), the telemetry table's Arrow schema, and a Parquet store with
per-vehicle watermarks that incremental ingestion writes exactly once::

    from connectors.dimo import DimoClient, DimoSettings, TelemetryStore, ingest
    async with DimoClient(DimoSettings()) as client:
        report = await ingest(client, TelemetryStore("data/telemetry"), since=..., until=..., interval=...)

Names are imported on first use, so ``import connectors.dimo`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depin_core.lazy import lazy_exports

_WHERE = {
    "DimoClient": "connectors.dimo.client",
    "TelemetrySource": "connectors.dimo.client",
    "VehicleHistory": "connectors.dimo.client",
    "DimoSettings": "connectors.dimo.settings",
    "TelemetryStore": "connectors.dimo.store",
    "WriteResult": "connectors.dimo.store",
    "ingest": "connectors.dimo.ingest",
    "IngestReport": "connectors.dimo.ingest",
    "telemetry_schema": "connectors.dimo.schema",
    "validate_table": "connectors.dimo.schema",
    "resolve_signals": "connectors.dimo.schema",
    "DimoError": "connectors.dimo.errors",
    "DimoTransientError": "connectors.dimo.errors",
    "DimoAuthError": "connectors.dimo.errors",
    "DimoPrivilegeError": "connectors.dimo.errors",
    "DimoQueryError": "connectors.dimo.errors",
}

__all__ = [
    "DimoAuthError",
    "DimoClient",
    "DimoError",
    "DimoPrivilegeError",
    "DimoQueryError",
    "DimoSettings",
    "DimoTransientError",
    "IngestReport",
    "TelemetrySource",
    "TelemetryStore",
    "VehicleHistory",
    "WriteResult",
    "ingest",
    "resolve_signals",
    "telemetry_schema",
    "validate_table",
]

if TYPE_CHECKING:
    from connectors.dimo.client import DimoClient, TelemetrySource, VehicleHistory
    from connectors.dimo.errors import (
        DimoAuthError,
        DimoError,
        DimoPrivilegeError,
        DimoQueryError,
        DimoTransientError,
    )
    from connectors.dimo.ingest import IngestReport, ingest
    from connectors.dimo.schema import resolve_signals, telemetry_schema, validate_table
    from connectors.dimo.settings import DimoSettings
    from connectors.dimo.store import TelemetryStore, WriteResult

__getattr__, __dir__ = lazy_exports(globals(), _WHERE)
