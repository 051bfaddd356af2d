"""A man in the middle on loopback: a TLS-terminating proxy that presents its own certificate to clients and
forwards what they send, over a TLS connection of its own, to the real server.

It counts the TCP connections it accepts and the TLS handshakes that failed (a pinning client hangs up), and
records every application byte a client got through it (which a pinning client must never send). It runs on
an asyncio loop in a thread of its own: asyncio's TLS is safe to read and write at once, a blocking
``ssl.SSLSocket`` shared by two pump threads is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

from depin_core import tls

_IO_ERRORS = (OSError, ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)


class MitmProxy:
    """``url`` (``https://127.0.0.1:<port>``) relays to ``upstream``, trusted with ``upstream_ctx`` (default:
    any certificate, as an attacker would)."""

    def __init__(
        self, upstream: str, upstream_ctx: ssl.SSLContext | None = None, workdir: Path | None = None
    ):
        self.cert = tls.make_certificate()  # not the server's: what a man in the middle has
        self._tmp = None if workdir is not None else tempfile.mkdtemp(prefix="mitm-")
        cert_file, key_file = self.cert.write(Path(workdir or self._tmp or "."))
        self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.load_cert_chain(cert_file, key_file)
        if upstream_ctx is None:
            upstream_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            upstream_ctx.check_hostname = False
            upstream_ctx.verify_mode = ssl.CERT_NONE
        self._upstream_ctx = upstream_ctx
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 443)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.connections = 0
        self.handshakes_failed = 0
        self.received = bytearray()  # application bytes clients sent through the proxy (= what went upstream)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mitm-proxy")
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the man-in-the-middle proxy did not start")

    @property
    def forwarded(self) -> bytearray:
        """What the proxy sent upstream (the same bytes as ``received``)."""
        return self.received

    def __enter__(self) -> MitmProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, let the connections in flight end (bounded), stop the loop; counts are final after."""
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accepted, sock=self._sock)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=10)
            for task in self._tasks:
                task.cancel()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(*_IO_ERRORS):
                writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self._server_ctx, ssl_handshake_timeout=30)
        except (*_IO_ERRORS, TimeoutError):
            self.handshakes_failed += 1
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                *self._upstream, ssl=self._upstream_ctx, server_hostname=self._upstream[0]
            )
        except (*_IO_ERRORS, TimeoutError):
            return
        try:
            await asyncio.gather(self._pump(reader, up_writer, record=True), self._pump(up_reader, writer))
        finally:
            with contextlib.suppress(*_IO_ERRORS):
                up_writer.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool = False) -> None:
        try:
            while data := await src.read(65536):
                if record:
                    self.received.extend(data)
                dst.write(data)
                await dst.drain()
        except _IO_ERRORS:
            pass
        finally:  # one side is done: end the other too (TLS transports cannot half-close)
            with contextlib.suppress(*_IO_ERRORS):
                dst.close()
