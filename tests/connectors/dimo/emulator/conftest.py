"""Fixtures of the emulator's Auth and Identity tests: one uvicorn server per test module, on a free port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette

from connectors.dimo.emulator import auth, identity
from connectors.dimo.emulator.state import EmulatorState
from depin_core.net import free_port
from tests.support.emulator_auth import Server, make_fleet


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """Auth + Identity routes of one emulator state under uvicorn on a free loopback port."""
    port = free_port()
    clock = [time.time()]
    state = EmulatorState(fleet=make_fleet(12), public_url=f"http://127.0.0.1:{port}", clock=lambda: clock[0])
    app = Starlette(routes=[*auth.routes(state), *identity.routes(state)])
    srv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield Server(state, state.public_url, clock)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def srv(server: Server) -> Iterator[Server]:
    """The module server with its clock reset to real time after each test."""
    yield server
    server.clock[0] = time.time()
