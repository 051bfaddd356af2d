"""What every GPU provider shares: offers, workers, the bootstrap script, the ``Provider`` protocol, offer choice
and the reaper.

A provider *provisions* a machine that runs our worker agent (``depin worker serve``); execution goes through
``gpu_jobs.remote.AgentRunner`` against the worker's URL. The lifecycle, always in this order::

    offers = provider.quote(spec)
    offer = choose_offer(offers, spec, max_usd_per_hour=2.0, blocked=blocked)
    worker = provider.launch(offer, Bootstrap(token=token), name=worker_name(job_id, attempt))
    try:
        worker = provider.wait_ready(worker, timeout_s=600)
        ...  # AgentRunner(worker.url, worker.token)
    finally:
        provider.destroy(worker)

Names are ``depin-<job_id>-<attempt>`` (Vast ``label``, io.net ``resource_private_name``): ``launch`` looks the
name up first, so a flow that crashed after renting never rents twice, and ``reap`` finds what a crashed flow
left behind.
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Collection, Iterable
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from depin_core import tls as tlslib
from depin_core.errors import ConfigError
from gpu_jobs.errors import NoCapacity
from gpu_jobs.spec import JobSpec

NAME_PREFIX = "depin-"
TOKEN_ENV = "DEPIN_AGENT_TOKEN"  # the agent's admin token, passed to the node as a (secret) env variable
TLS_CERT_ENV = "DEPIN_AGENT_TLS_CERT"  # the node's certificate (PEM), made and pinned by the client
TLS_KEY_ENV = "DEPIN_AGENT_TLS_KEY"  # its private key (PEM), passed as a secret env variable
DEFAULT_AGENT_PORT = 8900
DEFAULT_IMAGE = "pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime"
DEFAULT_DATA_DIR = "/var/lib/depin/agent"
MIN_TOKEN_CHARS = 16

_NAME_RE = re.compile(r"^depin-(?P<job_id>[0-9a-f]{12}-[0-9a-f]{8})-(?P<attempt>[1-9][0-9]*)$")


def worker_name(job_id: str, attempt: int) -> str:
    """The provider-side name of attempt ``attempt`` of job ``job_id``: ``depin-<job_id>-<attempt>``."""
    name = f"{NAME_PREFIX}{job_id}-{attempt}"
    if parse_worker_name(name) is None:
        raise ConfigError(
            f"job_id {job_id!r} / attempt {attempt!r}: a worker name needs a job id like "
            "'0123456789ab-89abcdef' (spec_hash[:12]-8 hex) and an attempt >= 1"
        )
    return name


def parse_worker_name(name: str | None) -> tuple[str, int] | None:
    """``(job_id, attempt)`` of a name made by :func:`worker_name`; None for any other name."""
    m = _NAME_RE.match(name or "")
    return (m["job_id"], int(m["attempt"])) if m else None


def is_ours(name: str | None) -> bool:
    """True for names this project gives to rented instances (prefix ``depin-``)."""
    return bool(name) and str(name).startswith(NAME_PREFIX)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Offer(_Model):
    """One rentable configuration: what it has and what it costs per hour (USD)."""

    provider: str
    offer_id: str
    host: str | None = None  # the physical machine/host id when the provider says; blocklists key on it
    gpu_name: str
    gpu_count: int = Field(ge=0)
    vram_gb: float = Field(ge=0, description="per GPU")
    usd_per_hour: float = Field(ge=0)
    reliability: float | None = None
    region: str | None = None
    spot: bool = False
    max_duration_s: float | None = Field(
        None, ge=0, description="how long the machine may be rented (Vast `duration`); None = no limit"
    )

    @property
    def block_key(self) -> tuple[str, str]:
        """The ``(provider, host)`` pair a blocklist holds (the offer id when the host is unknown)."""
        return (self.provider, self.host or self.offer_id)


class Worker(_Model):
    """A launched instance running (or about to run) our agent. ``url`` is empty until it is known."""

    provider: str
    instance_id: str
    name: str
    url: str = ""
    token: SecretStr
    offer: Offer
    tls_cert: str | None = None  # the certificate the node serves (PEM): the runner's pin


class Instance(_Model):
    """One of our instances as the provider lists it (for idempotent launch and the reaper)."""

    provider: str
    instance_id: str
    name: str
    status: str  # the provider's own word (Vast actual_status, io.net status)
    url: str | None = None
    usd_per_hour: float | None = None


class Bootstrap(_Model):
    """How a stock PyTorch/CUDA image becomes a worker: ``pip install`` the project, run the agent.

    The token, and the TLS certificate and key made for this node (fresh per bootstrap unless given), reach
    the node only through the provider's (secret) environment variables (``DEPIN_AGENT_TOKEN``,
    ``DEPIN_AGENT_TLS_CERT``, ``DEPIN_AGENT_TLS_KEY``): never the script, the image or the command line. The
    client pins ``tls_cert``.
    """

    package: str = "depin-pipeline"  # a pip requirement: name, git URL, wheel URL, …
    port: int = Field(DEFAULT_AGENT_PORT, ge=1, le=65535)
    token: SecretStr
    image: str = DEFAULT_IMAGE
    data_dir: str = DEFAULT_DATA_DIR
    disk_gb: float = Field(32.0, gt=0)
    tls_cert: str | None = None
    tls_key: SecretStr | None = None

    @model_validator(mode="after")
    def _node_certificate(self) -> Bootstrap:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (or neither: a fresh certificate is made)")
        if self.tls_cert is None:
            made = tlslib.make_certificate()
            self.tls_cert, self.tls_key = made.cert_pem, SecretStr(made.key_pem)
        return self

    @field_validator("token")
    @classmethod
    def _token_length(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"the agent token needs at least {MIN_TOKEN_CHARS} characters")
        return v

    @field_validator("package", "image", "data_dir")
    @classmethod
    def _one_line(cls, v: str) -> str:
        if not v.strip() or any(c in v for c in "\r\n\0"):
            raise ValueError("must be one non-empty line")
        return v.strip()

    def env(self) -> dict[str, str]:
        """The environment the node needs (secret: send it as the provider's secret env variables)."""
        assert self.tls_cert is not None and self.tls_key is not None  # made by the validator
        return {
            TOKEN_ENV: self.token.get_secret_value(),
            **tlslib.to_env(TLS_CERT_ENV, self.tls_cert),  # one line, split to fit Vast's 256 characters
            **tlslib.to_env(TLS_KEY_ENV, self.tls_key.get_secret_value()),
        }

    def script(self, *, background: bool = False) -> str:
        """POSIX sh: install the package and start the agent (see :func:`bootstrap_script`)."""
        return bootstrap_script(
            package=self.package, port=self.port, data_dir=self.data_dir, background=background
        )


HOST_ENV = "DEPIN_AGENT_HOST"  # where the agent listens (default 0.0.0.0)
PORT_ENV = "DEPIN_AGENT_PORT"  # its port (default: the bootstrap's port; io.net sets it, Vast maps it)
DATA_DIR_ENV = "DEPIN_AGENT_DATA_DIR"  # its data directory (default: the bootstrap's data_dir)


def bootstrap_script(
    *,
    package: str = "depin-pipeline",
    port: int = DEFAULT_AGENT_PORT,
    data_dir: str = DEFAULT_DATA_DIR,
    background: bool = False,
) -> str:
    """POSIX sh that turns a stock PyTorch/CUDA image into a worker: refuse to run without
    ``$DEPIN_AGENT_TOKEN``, ``pip install`` the package with the image's Python, start ``depin worker serve``.

    Where it listens and keeps its data come from ``$DEPIN_AGENT_HOST`` (default 0.0.0.0), ``$DEPIN_AGENT_PORT``
    (default ``port``) and ``$DEPIN_AGENT_DATA_DIR`` (default ``data_dir``), so a provider's port mapping (or
    several agents on one host) need no other script. ``background`` (a Vast on-start script, which must
    return) starts the agent with ``nohup … &`` logging to ``$DATA/agent.log``; otherwise it ``exec``s (a
    container entrypoint, or a shell on a rented node)."""
    lines = [
        "#!/bin/sh",
        "# depin worker bootstrap: install depin-pipeline, run the worker agent.",
        f"# The agent token comes from ${TOKEN_ENV} (set by the provider), never from this script;",
        f"# ${HOST_ENV}, ${PORT_ENV} and ${DATA_DIR_ENV} override where the agent listens and keeps data.",
        "set -eu",
        f'if [ -z "${{{TOKEN_ENV}:-}}" ]; then echo "{TOKEN_ENV} is not set" >&2; exit 64; fi',
        f"HOST=${{{HOST_ENV}:-0.0.0.0}}",
        f"PORT=${{{PORT_ENV}:-{int(port)}}}",
        f"DATA=${{{DATA_DIR_ENV}:-{shlex.quote(data_dir)}}}",
        'mkdir -p "$DATA"',
        "PY=$(command -v python3 || command -v python)",
        f'"$PY" -m pip install --no-cache-dir --disable-pip-version-check {shlex.quote(package)}',
        # what was installed, in the node's log (the package may be a name, a pin or a wheel URL)
        '"$PY" -m pip show --disable-pip-version-check depin-pipeline'
        " | sed -n -e 's/^Name: /installed: /p' -e 's/^Version: /version: /p'",
    ]
    serve = 'depin worker serve --host "$HOST" --port "$PORT" --data-dir "$DATA"'
    if background:
        lines.append(f'nohup {serve} >> "$DATA/agent.log" 2>&1 &')
    else:
        lines.append(f"exec {serve}")
    return "\n".join(lines) + "\n"


def new_agent_token() -> SecretStr:
    """A fresh random agent token (43 URL-safe characters)."""
    return SecretStr(secrets.token_urlsafe(32))


@runtime_checkable
class Provider(Protocol):
    """A marketplace (or a list of hand-registered nodes) that can give us a machine running the agent."""

    name: str

    def quote(self, spec: JobSpec) -> list[Offer]:
        """Offers that could run ``spec`` now (unfiltered by price; see :func:`choose_offer`)."""
        ...

    def launch(self, offer: Offer, bootstrap: Bootstrap, *, name: str) -> Worker:
        """Rent ``offer`` and start the agent; idempotent by ``name`` (an existing instance is returned)."""
        ...

    def wait_ready(self, worker: Worker, *, timeout_s: float) -> Worker:
        """Wait until the instance runs and the agent's ``/v1/health`` answers with the token; the worker
        with its ``url``. ``TransientError`` on timeout or when the instance failed."""
        ...

    def destroy(self, target: Worker | Instance) -> None:
        """Stop paying for the instance; idempotent (an instance already gone is not an error)."""
        ...

    def instances(self) -> list[Instance]:
        """Our live instances (names starting with ``depin-``)."""
        ...


def choose_offer(
    offers: Iterable[Offer],
    spec: JobSpec,
    *,
    max_usd_per_hour: float | None = None,
    blocked: Collection[tuple[str, str]] = (),
) -> Offer | None:
    """The cheapest offer with at least ``spec.resources.gpu_count`` GPUs of at least ``min_vram_gb`` each, at
    most ``max_usd_per_hour``, rentable for the job's whole deadline (``limits.max_wall_s``), whose
    ``(provider, host)`` is not ``blocked`` (the offer id stands for an unknown host). Ties: the more reliable, then the lower id.
    None when nothing fits."""
    need_gpus = spec.resources.gpu_count
    fits = [
        o
        for o in offers
        if o.gpu_count >= need_gpus
        and o.vram_gb >= spec.resources.min_vram_gb
        and (o.max_duration_s is None or o.max_duration_s >= spec.limits.max_wall_s)
        and (max_usd_per_hour is None or o.usd_per_hour <= max_usd_per_hour)
        and o.block_key not in blocked
        and (o.provider, o.host) not in blocked
    ]
    if not fits:
        return None
    return min(fits, key=lambda o: (o.usd_per_hour, -(o.reliability or 0.0), o.offer_id))


def reap(provider: Provider, live: Collection[str] = ()) -> list[str]:
    """Destroy the provider's ``depin-`` instances whose name is not in ``live``; their names, sorted."""
    destroyed = []
    for inst in provider.instances():
        if is_ours(inst.name) and inst.name not in live:
            provider.destroy(inst)
            destroyed.append(inst.name)
    return sorted(destroyed)


def pick_offer(
    provider: Provider,
    spec: JobSpec,
    *,
    max_usd_per_hour: float | None = None,
    blocked: Collection[tuple[str, str]] = (),
) -> Offer:
    """``quote`` then :func:`choose_offer`; ``NoCapacity`` saying what was asked and what was seen when
    nothing fits."""
    offers = provider.quote(spec)
    offer = choose_offer(offers, spec, max_usd_per_hour=max_usd_per_hour, blocked=blocked)
    if offer is not None:
        return offer
    res = spec.resources
    cap = f" at most ${max_usd_per_hour:.2f}/h" if max_usd_per_hour is not None else ""
    n_blocked = sum(1 for o in offers if o.block_key in blocked or (o.provider, o.host) in blocked)
    raise NoCapacity(
        f"{provider.name}: no offer with >= {res.gpu_count} GPU(s) of >= {res.min_vram_gb:g} GB{cap} "
        f"({len(offers)} offer(s) seen, {n_blocked} on blocked hosts); raise the price cap, lower "
        "resources.min_vram_gb, try another provider, or retry later"
    )
