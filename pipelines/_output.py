"""Console output for the CLI: human text and progress on stderr, the ``--json`` line on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

err_console = Console(stderr=True)


def emit_json(payload: dict[str, Any]) -> None:
    """Print ``payload`` as one JSON line on stdout (always the last stdout line of a ``--json`` run)."""
    sys.stdout.write(json.dumps(payload, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()
