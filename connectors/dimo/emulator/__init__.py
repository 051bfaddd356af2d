"""A local server that speaks DIMO's developer APIs (Auth, Token Exchange, Identity, Telemetry) over a
seeded simulated fleet or a replayed recording, with optional fault injection. See ``depin emulator``."""

from connectors.dimo.emulator.state import EmulatorConfig

__all__ = ["EmulatorConfig"]
