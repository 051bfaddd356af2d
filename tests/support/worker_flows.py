"""A cheap flow for the work-pool test: a worker imports it by module path (``tests.support.worker_flows``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow


@flow(name="worker-probe")
def worker_probe(out: str) -> None:
    """Write the pid of the process that ran the flow (and its parent's) to ``out`` as JSON."""
    Path(out).write_text(json.dumps({"pid": os.getpid(), "ppid": os.getppid()}))
