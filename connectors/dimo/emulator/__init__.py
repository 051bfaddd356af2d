"""A local server that speaks DIMO's developer APIs (Auth, Token Exchange, Identity, Telemetry) over a
seeded simulated fleet or a replayed recording, with optional fault injection and DIMO's rate limit. See
``depin emulator``; README.md beside this file names the DIMO schema sources (repository, path, commit) it was
compared with."""

from connectors.dimo.emulator.state import EmulatorConfig

__all__ = ["EmulatorConfig"]
