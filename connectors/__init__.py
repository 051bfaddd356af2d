"""DePIN data sources. ``connectors.dimo`` reads vehicle telemetry from DIMO (or its local emulator)."""
