"""Child processes: stop one politely, then firmly."""

from __future__ import annotations

import subprocess


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, *, timeout: float = 10.0
) -> None:
    """SIGTERM ``proc`` and wait up to ``timeout`` s, then SIGKILL; a no-op when it already exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
