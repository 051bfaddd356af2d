"""Hand-registered worker nodes: GPUnet rentals, lab servers, anything that runs ``depin worker serve``.

GPUnet has no documented compute API (see the README), so a GPUnet node is rented by hand, bootstrapped with
the script of :class:`~gpu_jobs.providers.base.Bootstrap`, and registered here with its URL and token
(``depin worker register NAME --url https://… --token-file … --fingerprint …``): the node's TLS certificate is
pinned (its PEM, read once and kept when its sha256 is the fingerprint given; plain ``http://`` only for
loopback). The registry is one JSON file (default :data:`depin_core.paths.NODES_FILE`),
mode 0600 (it holds the agents' tokens), written atomically.

As a provider ("manual", or "gpunet"): offers are the registered nodes whose ``/v1/health`` answers with their
token; ``launch`` returns the node (with its own token: the bootstrap's is not used); ``destroy`` does nothing
(we rent nothing); ``instances`` is empty.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from depin_core import paths
from depin_core import tls as tlslib
from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.fs import atomic_write_bytes
from gpu_jobs.providers._http import HealthCheck
from gpu_jobs.providers.base import MIN_TOKEN_CHARS, Bootstrap, Instance, Offer, Worker
from gpu_jobs.spec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_NODES_FILE = paths.NODES_FILE
_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Node(BaseModel):
    """A registered worker node."""

    model_config = ConfigDict(extra="forbid")

    name: str
    url: str
    token: SecretStr
    gpu: str | None = None  # what the operator says it has (the health check reports what it really has)
    usd_per_hour: float = Field(0.0, ge=0)
    registered_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    tls_fingerprint: str | None = None  # sha256 of the node's certificate (the pin)
    tls_cert: str | None = None  # the certificate itself, once read (its sha256 is tls_fingerprint)

    @model_validator(mode="after")
    def _pinned(self) -> Node:
        try:
            tlslib.check_url(self.url, "url")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("url: ")) from None
        try:
            self.tls_fingerprint = tlslib.agreed_fingerprint(self.tls_cert, self.tls_fingerprint)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.url.startswith("https://") and self.tls_fingerprint is None:
            raise ValueError(
                "an https node needs its certificate pinned: --fingerprint (the tls_fingerprint that "
                "`depin worker serve --json` prints)"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NODE_NAME.match(v):
            raise ValueError("use 1-63 of a-z, 0-9, '.', '_', '-' (starting with a letter or digit)")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")) or len(v) < 10:
            raise ValueError("must be the agent's base URL, http(s)://host:port")
        return v

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value().strip()) < MIN_TOKEN_CHARS:
            raise ValueError(f"the agent token needs at least {MIN_TOKEN_CHARS} characters")
        return SecretStr(v.get_secret_value().strip())

    def to_file(self) -> dict[str, Any]:
        doc = self.model_dump(mode="json")
        doc["token"] = self.token.get_secret_value()
        return doc


class ManualProvider:
    """Registered nodes as a provider (see the module doc). ``name`` is "manual" or "gpunet"."""

    def __init__(
        self,
        nodes_file: Path | str = DEFAULT_NODES_FILE,
        *,
        name: str = "manual",
        health_timeout_s: float = 5.0,
        poll_s: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.nodes_file = Path(nodes_file)
        self.name = name
        self.poll_s = poll_s
        self._health = HealthCheck(timeout=health_timeout_s, transport=transport)
        self._timeout = health_timeout_s

    def __repr__(self) -> str:
        return f"ManualProvider({str(self.nodes_file)!r}, name={self.name!r})"

    def close(self) -> None:
        self._health.close()

    def __enter__(self) -> ManualProvider:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the registry ----------------------------------------------------------------------------------------
    def _rows(self) -> dict[str, Any]:
        """The file's node entries by name, as stored (not validated: register and remove may mend it)."""
        if not self.nodes_file.exists():
            return {}
        try:
            doc = json.loads(self.nodes_file.read_text())
            rows = doc.get("nodes", [])
            if not isinstance(rows, list):
                raise ValueError("nodes is not a list")
            return {str(row.get("name", "?")): row for row in rows}
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"nodes file {self.nodes_file}: unreadable ({type(exc).__name__}); fix or remove it and "
                "register the nodes again"
            ) from None

    def _load(self) -> dict[str, Node]:
        nodes: dict[str, Node] = {}
        for name, row in self._rows().items():
            try:
                nodes[name] = Node.model_validate(row)
            except ValidationError as exc:  # e.g. an entry from before pinning: plain HTTP, no fingerprint
                why = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise ConfigError(
                    f"nodes file {self.nodes_file}: node {name!r}: {why}; register it again "
                    f"(depin worker register {name} --url https://… --fingerprint …) or remove it "
                    f"(depin worker remove {name})"
                ) from None
        return nodes

    def _save(self, rows: dict[str, Any]) -> None:
        doc = {"nodes": [rows[k] for k in sorted(rows)]}
        self.nodes_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self.nodes_file, (json.dumps(doc, indent=2) + "\n").encode())
        os.chmod(self.nodes_file, 0o600)  # mkstemp already made it 0600; say so explicitly

    def register(
        self,
        name: str,
        url: str,
        token: SecretStr,
        *,
        gpu: str | None = None,
        usd_per_hour: float = 0.0,
        tls_fingerprint: str | None = None,
        tls_cert: str | None = None,
    ) -> Node:
        """Add (or replace) node ``name``, pinning its certificate (``tls_cert``, or ``tls_fingerprint``: the
        certificate is read now when the node answers; ``PinMismatch`` when it presents another one).
        ``ConfigError`` naming the field when a value is invalid."""
        if not isinstance(token, SecretStr):
            raise ConfigError("token must be a pydantic SecretStr (keeps it out of logs and reprs)")
        try:
            node = Node(
                name=name,
                url=url,
                token=token,
                gpu=gpu,
                usd_per_hour=usd_per_hour,
                tls_fingerprint=tls_fingerprint,
                tls_cert=tls_cert,
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "node"
            raise ConfigError(f"{field}: {err['msg']}") from None
        if node.tls_cert is None and node.tls_fingerprint is not None:
            node = node.model_copy(update={"tls_cert": self._certificate(node)})
        rows = self._rows()  # another entry that no longer validates stays as it is
        rows[name] = node.to_file()
        self._save(rows)
        return node

    def list(self) -> list[Node]:
        """The registered nodes, by name."""
        return [n for _, n in sorted(self._load().items())]

    def get(self, name: str) -> Node:
        """Node ``name`` (``ConfigError`` listing the known names when there is none)."""
        nodes = self._load()
        if name not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            raise ConfigError(
                f"node {name!r} is not registered (known: {known}); depin worker register {name} …"
            )
        return nodes[name]

    def by_url(self, url: str) -> Node | None:
        """The registered node whose URL is ``url`` (trailing slash ignored), or None."""
        url = url.strip().rstrip("/")
        return next((n for n in self._load().values() if n.url == url), None)

    def remove(self, name: str) -> bool:
        """Forget node ``name``; False when it was not registered."""
        rows = self._rows()  # works for an entry that no longer validates, too
        if rows.pop(name, None) is None:
            return False
        self._save(rows)
        return True

    def _certificate(self, node: Node) -> str | None:
        """The node's pinned certificate: stored, or read now and kept only if its sha256 is the node's
        fingerprint (``PinMismatch`` otherwise); None when the node cannot be reached now (or is http)."""
        if node.tls_cert is not None or node.tls_fingerprint is None:
            return node.tls_cert
        try:
            return tlslib.fetch_certificate(node.url, node.tls_fingerprint, timeout_s=self._timeout)
        except tlslib.PinMismatch as exc:
            raise tlslib.PinMismatch(f"node {node.name}: {exc}") from None
        except (OSError, ValueError) as exc:
            self._health.last_problem = f"cannot read its certificate ({type(exc).__name__})"
            return None

    def health(self, node: Node) -> dict[str, Any] | None:
        """The node's ``/v1/health`` document, or None when it does not answer. A refused token, or a
        certificate other than the pinned one, raises ``PermanentError``."""
        cert = self._certificate(node)
        if node.tls_fingerprint is not None and cert is None:
            return None
        return self._health.check(node.url, node.token, cert)

    @property
    def last_problem(self) -> str:
        return self._health.last_problem

    # ---- the provider protocol -------------------------------------------------------------------------------
    def _offer(self, node: Node, health: dict[str, Any]) -> Offer:
        gpus = [g for g in health.get("gpus") or [] if isinstance(g, dict)]
        mem = [float(g.get("memory_gb") or 0.0) for g in gpus]
        return Offer(
            provider=self.name,
            offer_id=node.name,
            host=node.name,
            gpu_name=str(gpus[0].get("name")) if gpus else (node.gpu or "cpu"),
            gpu_count=len(gpus),
            vram_gb=min(mem) if mem else 0.0,
            usd_per_hour=node.usd_per_hour,
            reliability=None,
            region=None,
        )

    def quote(self, spec: JobSpec) -> builtins.list[Offer]:
        """One offer per registered node that answers ``/v1/health`` with its token (others are skipped)."""
        offers = []
        for node in self.list():
            try:
                health = self.health(node)
            except PermanentError as exc:
                log.warning("%s: node %s skipped: %s", self.name, node.name, exc)
                continue
            if health is None:
                log.info("%s: node %s skipped: %s", self.name, node.name, self._health.last_problem)
                continue
            offers.append(self._offer(node, health))
        return offers

    def launch(self, offer: Offer, bootstrap: Bootstrap, *, name: str) -> Worker:
        """The registered node of ``offer`` as a worker (with the node's own token)."""
        node = self.get(offer.offer_id)
        return Worker(
            provider=self.name,
            instance_id=node.name,
            name=name,
            url=node.url,
            token=node.token,
            offer=offer,
            tls_cert=self._certificate(node),
        )

    def wait_ready(self, worker: Worker, *, timeout_s: float) -> Worker:
        """Wait until the node's agent answers ``/v1/health``; ``TransientError`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._health.check(worker.url, worker.token, worker.tls_cert) is not None:
                return worker
            if time.monotonic() >= deadline:
                raise TransientError(
                    f"{self.name}: node {worker.instance_id} at {worker.url} does not answer /v1/health "
                    f"({self._health.last_problem}); is `depin worker serve` running there?"
                )
            time.sleep(self.poll_s)

    def destroy(self, target: Worker | Instance) -> None:
        """Nothing to stop: the node is not rented by us."""

    def instances(self) -> builtins.list[Instance]:
        """Nothing rented, nothing to reap."""
        return []
