"""``python -m gpu_jobs.agent --host 127.0.0.1 --port 0 --data-dir DIR --ready-file F`` (token: $DEPIN_AGENT_TOKEN)."""

from __future__ import annotations

import sys

from depin_core.errors import ConfigError
from gpu_jobs.agent.server import main

if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
