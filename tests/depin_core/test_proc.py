"""``depin_core.proc``: the one child-process launcher (``Child``, ``ServerProcess``) on real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from depin_core.errors import DepinError
from depin_core.proc import Child, ServerProcess, alive, children, descendants, status_kb, stop_process

# a loopback HTTP server that answers 200 on /healthz, writes {KEY: url} to READY once listening and, with a
# third argument, first starts a grandchild (in its own process group unless told to leave it) that ignores
# SIGTERM
SERVER = """
import http.server, json, os, subprocess, sys
key, ready = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
with open(ready + ".tmp", "w") as f:
    json.dump({key: f"http://127.0.0.1:{srv.server_address[1]}", "pid": os.getpid()}, f)
os.replace(ready + ".tmp", ready)
print("listening", flush=True)
srv.serve_forever()
"""

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"


class Stub(ServerProcess):
    def __init__(self, *args: str, key: str = "url", **kw: Any) -> None:
        super().__init__("stub", startup_timeout=60, stop_timeout=1, ready_key=key, **kw)
        self.args = args
        self.key = key

    def start(self) -> Stub:
        cmd = [sys.executable, "-c", SERVER, self.key, str(self.ready_path), *self.args]
        self._launch(cmd, {}, [("/healthz", "stub not healthy")])
        return self


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_server_process_ready_key_handshake_and_stop() -> None:
    with Stub(key="base") as stub:
        assert stub.url.startswith("http://127.0.0.1:") and stub.ready["pid"] == stub.proc.pid  # type: ignore[union-attr]
        assert httpx.get(f"{stub.url}/healthz").status_code == 200
        assert "listening" in stub.log_text()
        assert stub.proc is not None and os.getpgid(stub.proc.pid) == os.getpgrp()  # no group of its own
        pid, tmp = stub.proc.pid, stub.log_path.parent
    assert not alive(pid) and not tmp.exists()


def test_failed_start_shows_the_end_of_the_output() -> None:
    class Failing(ServerProcess):
        def start(self) -> Failing:
            code = "import sys; print('first line', flush=True); print('no such dataset: /x', file=sys.stderr); sys.exit(3)"
            self._launch([sys.executable, "-c", code], {}, [("/healthz", "never")])
            return self

    proc = Failing("failing", startup_timeout=60)
    with pytest.raises(DepinError, match=r"failing exited with code 3: first line\nno such dataset: /x"):
        proc.start()
    proc.close()


def test_new_session_server_stops_with_its_group() -> None:
    with Stub("grandchild", new_session=True) as stub:
        assert stub.proc is not None and os.getpgid(stub.proc.pid) == stub.proc.pid
        _wait_for(lambda: children(stub.proc.pid), "the grandchild started")  # type: ignore[union-attr]
        tree = {stub.proc.pid, *descendants(stub.proc.pid)}
        assert len(tree) == 2
    assert not any(alive(p) for p in tree)  # the grandchild ignored SIGTERM: SIGKILL after stop_timeout


def test_child_without_session_is_stopped_alone_and_killed_if_stubborn(tmp_path: Path) -> None:
    child = Child("stubborn", [sys.executable, "-c", STUBBORN], log_path=tmp_path / "log", new_session=False)
    child.start(die_with_parent=False)
    _wait_for(lambda: "ready" in child.log_tail(), "the child started")
    assert child.running() and os.getpgid(child.pid) == os.getpgrp()
    assert child.stop(grace_s=0.2) == [child.pid]
    assert not child.running() and not alive(child.pid)


def test_stop_process_says_whether_it_killed(tmp_path: Path) -> None:
    polite = Child("polite", [sys.executable, "-c", "import time; time.sleep(600)"], log_path=tmp_path / "a")
    assert stop_process(polite.start().proc) is False
    assert polite.proc is not None and polite.proc.returncode is not None
    assert stop_process(polite.proc) is False  # already gone: a no-op


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_child_is_pinned_to_its_cpu(tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    code = "import json, os; print(json.dumps(sorted(os.sched_getaffinity(0))), flush=True)"
    child = Child("pinned", [sys.executable, "-c", code], log_path=tmp_path / "log", cpu=cpu).start()
    assert child.proc is not None and child.proc.wait(timeout=60) == 0
    assert json.loads(child.log_tail()) == [cpu]


def test_status_kb_reads_proc_status() -> None:
    peak, now = status_kb(os.getpid(), "VmHWM"), status_kb(os.getpid(), "VmRSS")
    assert peak is not None and now is not None and 0 < now <= peak  # kB: the peak is never below the current
    assert status_kb(os.getpid(), "NoSuchField") is None
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    assert status_kb(int(done.stdout), "VmHWM") is None  # the process is gone
