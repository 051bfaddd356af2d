"""``python -m connectors.dimo.emulator --config-json '{...}'``: run the emulator from an EmulatorConfig.

Users run ``depin emulator`` (same options as flags); this entry point lets a parent process start it
without going through the CLI package.
"""

from __future__ import annotations

import argparse
import contextlib

from connectors.dimo.emulator.server import serve
from connectors.dimo.emulator.state import EmulatorConfig


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m connectors.dimo.emulator")
    parser.add_argument("--config-json", default="{}", help="EmulatorConfig as JSON")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        serve(EmulatorConfig.model_validate_json(args.config_json))


if __name__ == "__main__":
    main()
