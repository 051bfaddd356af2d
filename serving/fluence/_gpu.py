"""Fluence GPU Cloud containers (``/gpu``): plans, instances, logs.

A container gets an image, a start command, environment and ports, and the API reports a domain plus the
external port forwarded to each exposed port. Limits enforced here before sending: at most 10 ports and 64
environment variables, only port 80 may use ``http``, names ``[a-z0-9-]{1,25}``. Billed hourly, 3 hours charged
at creation (``pricing.upfront_hours``).

Errors are FastAPI's ``{"detail": ...}``: a string for business errors (400, e.g. "Insufficient balance to
deploy instance" → ``InsufficientBalance``, permanent) and ``[{loc, msg}, ...]`` for invalid fields (422).
Only ``ACTIVE`` instances can be terminated (``DELETE`` answers 204): :meth:`GpuContainers.delete` treats
``ENDED``/``FAILED`` as done and raises ``NotTerminable`` (transient) while the instance is ``INITIALIZED``.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping, Sequence
from typing import Any

from depin_core.errors import ConfigError
from serving.fluence._api import FluenceApi
from serving.fluence.errors import FluenceNotFound, FluenceRefused, NotTerminable
from serving.fluence.models import GpuInstance, GpuPlan

_NAME = re.compile(r"^[a-z0-9-]{1,25}$")
MAX_PORTS = 10
MAX_ENV = 64


class GpuContainers:
    """``/gpu/plans`` and ``/gpu/instances`` calls of a :class:`FluenceClient`."""

    def __init__(self, client: FluenceApi) -> None:
        self._c = client

    def plans(self) -> list[GpuPlan]:
        """``GET /gpu/plans/``: container plans with hourly prices."""
        return [GpuPlan.from_api(p) for p in self._c.get_json("/gpu/plans/", gen="A")]

    def create(
        self,
        *,
        plan_id: str,
        name: str,
        image: str,
        ports: Sequence[int],
        env: Mapping[str, str] | None = None,
        startup_command: str | None = None,
        location: str | None = None,
        ssh_key: str | None = None,
        http_port_80: bool = False,
    ) -> str:
        """``POST /gpu/instances/`` → the instance id. Not idempotent: reconcile with :meth:`list` by name."""
        if not _NAME.match(name):
            raise ConfigError(f"GPU instance name {name!r}: 1-25 of a-z, 0-9 and '-'")
        if not 1 <= len(ports) <= MAX_PORTS:
            raise ConfigError(f"expose: 1 to {MAX_PORTS} ports, not {len(ports)}")
        env = dict(env or {})
        if len(env) > MAX_ENV:
            raise ConfigError(f"environment: at most {MAX_ENV} variables, not {len(env)}")
        expose = [
            {"port": str(p), "protocol": "http" if (p == 80 and http_port_80) else "tcp"} for p in ports
        ]
        settings: dict[str, Any] = {
            "image": image,
            "expose": expose,
            "environment": [{"name": k, "value": str(v)} for k, v in env.items()],
        }
        if startup_command:
            settings["startup_command"] = startup_command
        body: dict[str, Any] = {"plan_id": plan_id, "name": name, "container_settings": settings}
        if location:
            body["constraints"] = {"location": location}
        if ssh_key:
            body["ssh_key"] = ssh_key
        r = self._c.request("POST", "/gpu/instances/", gen="A", json=body, idempotent=False)
        return str(r.json()["instance_id"])

    def get(self, instance_id: str) -> GpuInstance:
        """``GET /gpu/instances/{id}``."""
        return GpuInstance.model_validate(self._c.get_json(f"/gpu/instances/{instance_id}", gen="A"))

    def list(self) -> list[GpuInstance]:
        """``GET /gpu/instances/``."""
        doc = self._c.get_json("/gpu/instances/", gen="A")
        items = doc.get("data", doc.get("items", [])) if isinstance(doc, dict) else doc
        return [GpuInstance.model_validate(i) for i in items or []]

    def delete(self, instance_id: str) -> None:
        """``DELETE /gpu/instances/{id}`` (only ``ACTIVE`` instances can be terminated). Already ended, failed
        or unknown is not an error; ``NotTerminable`` while the instance is still ``INITIALIZED``."""
        try:
            current = self.get(instance_id)
        except FluenceNotFound:
            return
        if current.gone:
            return
        if current.instance_status != "ACTIVE":
            raise NotTerminable(
                f"GPU instance {instance_id} is {current.instance_status}: only ACTIVE instances can be "
                "terminated; retry once it is ACTIVE (or FAILED, which needs nothing)"
            )
        try:
            self._c.request("DELETE", f"/gpu/instances/{instance_id}", gen="A")
        except FluenceNotFound:
            return
        except FluenceRefused as exc:
            if exc.status == 400:  # it may have ended meanwhile
                try:
                    if self.get(instance_id).gone:
                        return
                except FluenceNotFound:
                    return
            raise

    def logs(self, instance_id: str, last: int = 100) -> builtins.list[str]:
        """``GET /gpu/instances/{id}/logs?last=N``: the container's last log lines."""
        r = self._c.request("GET", f"/gpu/instances/{instance_id}/logs", gen="A", params={"last": last})
        try:
            doc = r.json()
        except ValueError:
            return r.text.splitlines()
        if isinstance(doc, dict):
            doc = doc.get("logs", doc.get("data", []))
        if isinstance(doc, str):
            return doc.splitlines()
        return [str(line.get("message", line)) if isinstance(line, dict) else str(line) for line in doc]
