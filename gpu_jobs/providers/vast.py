"""Vast.ai: rent an on-demand instance of a stock PyTorch image whose on-start script runs our agent.

The endpoints and bodies are those of Vast's official client (PyPI ``vastai`` 1.9, ``vastai/api/*.py``), on the
server root ``https://console.vast.ai`` (``…/api/v0`` is accepted too), ``Authorization: Bearer <key>``:

- offers: ``POST /api/v0/bundles/`` with filters ``{"verified": {"eq": true}, "external": {"eq": false},
  "rentable": {"eq": true}, "rented": {"eq": false}, "num_gpus": {"gte": n}, "gpu_ram": {"gte": MB}, "order":
  [["dph_total", "asc"]], "type": "on-demand", "limit", "allocated_storage"}`` → ``{"offers": [...]}``
  (``id``, ``machine_id``, ``gpu_name``, ``num_gpus``, ``gpu_ram`` MB, ``dph_total`` $/h, ``reliability``,
  ``geolocation``, ``duration`` s);
- launch: ``PUT /api/v0/asks/{offer_id}/`` with the client's ``create_instance`` body (``client_id: "me"``,
  ``image``, ``env``, ``price: null`` = on-demand, ``disk``, ``label``, ``onstart``, ``runtype``, …) →
  ``{"success": true, "new_contract": instance_id}``. ``env`` is the client's parsed form:
  ``{"DEPIN_AGENT_TOKEN": …, "-p 8900:8900": "1"}`` (the ``-p`` key exposes the agent port). Refusals
  (``{"error", "msg", "ask_id"}``): 400 ``invalid_args`` / ``invalid_price`` / ``no_ssh_key_for_vm`` → a
  ``ConfigError`` with Vast's message; 404 / 410 ``no_such_ask`` (the offer is gone) → ``NoCapacity``, quote
  again; 403 (e.g. "Offer … is not your own") → ``PermanentError`` (the offer, not the key);
- status: ``GET /api/v0/instances/{id}/?owner=me`` → ``{"instances": {...} | null}`` (``actual_status``,
  ``intended_status``, ``status_msg``, ``public_ipaddr``, ``ports`` = ``{"8900/tcp": [{"HostIp",
  "HostPort"}]}``); the agent is ``http://<public_ipaddr>:<HostPort of 8900/tcp>``;
- ours: ``GET /api/v1/instances/`` in keyset pages (``limit`` 25, ``order_by`` by id, ``after_token`` =
  the previous ``next_token``) with a server-side ``select_filters`` on ``label``; an API without v1 (404)
  is listed through ``GET /api/v0/instances/?owner=me`` instead;
- destroy: ``DELETE /api/v0/instances/{id}/`` (404 = already gone).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, NoReturn

import httpx
from pydantic import SecretStr

from depin_core.errors import ConfigError, PermanentError, TransientError
from gpu_jobs.errors import NoCapacity, ProviderRefused
from gpu_jobs.providers._market import MarketProvider
from gpu_jobs.providers.base import (
    DEFAULT_AGENT_PORT,
    Bootstrap,
    Instance,
    Offer,
    Worker,
    is_ours,
)
from gpu_jobs.spec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_URL = "https://console.vast.ai"  # the official client's server root (VAST_URL)
KEY_ENV = "DEPIN_VAST_API_KEY"
# the client's ssh=True, direct=True (resolve_runtype): the on-start script runs, ports map directly
RUNTYPE = "ssh_direc ssh_proxy"
PAGE_LIMIT = 25  # the v1 instance list's largest page
MAX_PAGES = 400  # 10,000 instances; a list that never ends is an API fault, not a reason to loop forever
_FAILED = {"exited", "offline", "dead", "failed"}
_API_SUFFIX = re.compile(r"/api/v\d+/?$")
_CONFIG_HINTS = {
    "invalid_price": "the price must be between 0.001 and 128 $/h",
    "no_ssh_key_for_vm": "the offer is a VM, which needs an SSH key on the Vast account first "
    "(`vastai create ssh-key`), or choose another offer",
}


def server_root(url: str) -> str:
    """The server root of a Vast URL: ``https://console.vast.ai`` from itself or from ``…/api/v0`` (the
    official client's ``VAST_URL`` is the root; older settings here named ``…/api/v0``)."""
    return _API_SUFFIX.sub("", url.strip().rstrip("/"))


def _refusal(r: httpx.Response) -> tuple[str, str]:
    """``(error code, message)`` of a Vast error body (``{"error", "msg"}``; some send ``message`` or text)."""
    try:
        doc = r.json()
    except ValueError:
        return "", " ".join(r.text.split())[:300]
    if not isinstance(doc, dict):
        return "", str(doc)[:300]
    msg = doc.get("msg") or doc.get("message") or doc.get("detail") or ""
    return str(doc.get("error") or ""), " ".join(str(msg).split())[:300]


def _label_is(rows: list[dict[str, Any]], filters: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` that pass a label filter of ours (``{"label": {"in": [...]}}``), for the v0 list."""
    wanted = (filters.get("label") or {}).get("in")
    return rows if wanted is None else [r for r in rows if r.get("label") in wanted]


def agent_url(row: dict[str, Any], port: int, scheme: str = "https") -> str | None:
    """``https://<public_ipaddr>:<host port mapped to port/tcp>`` of an instance row, when both are known."""
    ip = str(row.get("public_ipaddr") or "").strip()
    ports = row.get("ports") or {}
    if isinstance(ports, str):  # some API versions serialise the mapping as a JSON string
        try:
            ports = json.loads(ports)
        except ValueError:
            ports = {}
    binding = ports.get(f"{port}/tcp") if isinstance(ports, dict) else None
    if not ip or not binding:
        return None
    host_port = binding[0].get("HostPort") if isinstance(binding, list) and binding else None
    return f"{scheme}://{ip}:{int(host_port)}" if host_port else None


class VastProvider(MarketProvider):
    """Vast.ai on-demand instances (see the module doc for the endpoints).

    ``poll_s``: the longest pause between ``wait_ready`` polls (it starts at 0.25 s and doubles up to it).
    ``transport`` (the Vast API) and ``agent_transport`` (agent health probes) are test seams. The API key is
    a ``SecretStr`` and never leaves the ``Authorization`` header.
    """

    name = "vast"

    def __init__(
        self,
        api_key: SecretStr,
        base_url: str = DEFAULT_URL,
        *,
        poll_s: float = 5.0,
        timeout: float = 30.0,
        search_limit: int = 64,
        verified_only: bool = True,
        agent_port: int = DEFAULT_AGENT_PORT,
        transport: httpx.BaseTransport | None = None,
        agent_transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            api_key,
            server_root(base_url),
            auth_headers=lambda key: {"Authorization": f"Bearer {key}", "Accept": "application/json"},
            key_hint=KEY_ENV,
            poll_s=poll_s,
            timeout=timeout,
            transport=transport,
            agent_transport=agent_transport,
        )
        self.search_limit = search_limit
        self.verified_only = verified_only
        self.agent_port = agent_port
        self._ports: dict[str, int] = {}  # instance id → agent port of the launches made here
        self._v1 = True  # False once the API answered 404 for /api/v1/instances/

    # ---- offers ----------------------------------------------------------------------------------------------
    def search_query(self, spec: JobSpec, *, disk_gb: float = 32.0) -> dict[str, Any]:
        """The ``POST /bundles/`` body for ``spec`` (cheapest first)."""
        q: dict[str, Any] = {
            "external": {"eq": False},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "num_gpus": {"gte": max(1, spec.resources.gpu_count)},
        }
        if self.verified_only:
            q["verified"] = {"eq": True}
        if spec.resources.min_vram_gb > 0:
            q["gpu_ram"] = {"gte": spec.resources.min_vram_gb * 1000}  # MB, vast-cli's multiplier
        q["order"] = [["dph_total", "asc"]]
        q["type"] = "on-demand"
        q["limit"] = self.search_limit
        q["allocated_storage"] = disk_gb
        return q

    def quote(self, spec: JobSpec) -> list[Offer]:
        """On-demand offers that meet ``spec.resources`` (``[]`` when none)."""
        doc = self._api.json("POST", "/api/v0/bundles/", json=self.search_query(spec))
        rows = (doc.get("offers") if isinstance(doc, dict) else None) or []
        offers = []
        for row in rows:
            try:
                offers.append(self._offer(row))
            except (KeyError, TypeError, ValueError) as exc:
                log.debug("vast: skipping an offer the API described oddly (%s)", exc)
        return offers

    def _offer(self, row: dict[str, Any]) -> Offer:
        host = row.get("machine_id") if row.get("machine_id") is not None else row.get("host_id")
        reliability = row.get("reliability", row.get("reliability2"))  # the client's Offer has reliability
        return Offer(
            provider=self.name,
            offer_id=str(row["id"]),
            host=None if host is None else str(host),
            gpu_name=str(row.get("gpu_name") or "unknown"),
            gpu_count=int(row.get("num_gpus") or 0),
            vram_gb=float(row.get("gpu_ram") or 0) / 1000.0,
            usd_per_hour=float(row["dph_total"]),
            reliability=None if reliability is None else float(reliability),
            region=(str(row["geolocation"]) if row.get("geolocation") else None),
            spot=False,
            max_duration_s=None if row.get("duration") is None else float(row["duration"]),
        )

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def _rows(self, select_filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Our instances (all pages) that pass ``select_filters`` (Vast's ``{column: {op: value}}``)."""
        filters = select_filters or {}
        if self._v1:
            try:
                return self._rows_v1(filters)
            except ProviderRefused as exc:
                if exc.status != 404:
                    raise
                log.info("vast: %s has no /api/v1/instances/ (404); listing with /api/v0", self._api.base_url)
                self._v1 = False
        doc = self._api.json("GET", "/api/v0/instances/", params={"owner": "me"})
        rows = doc.get("instances") if isinstance(doc, dict) else None
        return _label_is([r for r in rows or [] if isinstance(r, dict)], filters)

    def _rows_v1(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        params: dict[str, Any] = {
            "select_filters": json.dumps(filters),
            "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            "limit": PAGE_LIMIT,
        }
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = self._api.json("GET", "/api/v1/instances/", params=params)
            doc = doc if isinstance(doc, dict) else {}
            rows.extend(r for r in doc.get("instances") or [] if isinstance(r, dict))
            token = doc.get("next_token")
            if not token:
                return rows
            if str(token) in seen:
                raise PermanentError(
                    f"vast: the instance list repeated its page token after {len(rows)} rows"
                )
            seen.add(str(token))
            params["after_token"] = str(token)
        raise PermanentError(f"vast: the instance list did not end after {MAX_PAGES} pages of {PAGE_LIMIT}")

    def find(self, name: str) -> dict[str, Any] | None:
        """Our instance labelled ``name`` (the newest when several), or None."""
        rows = [r for r in self._rows({"label": {"in": [name]}}) if r.get("label") == name]
        return max(rows, key=lambda r: int(r.get("id") or 0)) if rows else None

    def launch(self, offer: Offer, bootstrap: Bootstrap, *, name: str) -> Worker:
        """Rent ``offer`` as instance ``name`` running the bootstrap on start; an instance already labelled
        ``name`` is returned instead (no second rental). ``NoCapacity`` when the offer is gone, ``ConfigError``
        when Vast refuses the request as invalid (400), ``PermanentError`` when it refuses this account (403)."""
        if not is_ours(name):
            raise PermanentError(f"vast: instance name {name!r} must start with 'depin-' (see worker_name)")
        existing = self.find(name)
        if existing is not None:
            log.info("vast: %s exists already (instance %s); not renting again", name, existing.get("id"))
            iid = str(existing["id"])
            self._ports.setdefault(iid, bootstrap.port)
            return Worker(
                provider=self.name,
                instance_id=iid,
                name=name,
                url=agent_url(existing, bootstrap.port) or "",
                token=bootstrap.token,
                offer=offer,
                tls_cert=bootstrap.tls_cert,
            )
        body = {  # the official client's create_instance body, with its defaults for what we leave unset
            "client_id": "me",
            "image": bootstrap.image,
            "env": {**bootstrap.env(), f"-p {bootstrap.port}:{bootstrap.port}": "1"},
            "price": None,  # on-demand (a bid price would make it interruptible)
            "disk": bootstrap.disk_gb,
            "label": name,
            "extra": None,
            "onstart": bootstrap.script(background=True),
            "image_login": None,
            "python_utf8": False,
            "lang_utf8": False,
            "use_jupyter_lab": False,
            "jupyter_dir": None,
            "force": False,
            "cancel_unavail": True,
            "template_hash_id": None,
            "user": None,
            "runtype": RUNTYPE,
        }
        r = self._api.request(
            "PUT",
            f"/api/v0/asks/{offer.offer_id}/",
            json=body,
            idempotent=False,
            ok=(200, 201, 400, 403, 404, 410),
        )
        if r.status_code not in (200, 201):
            self._refused(offer, r, bootstrap)
        try:
            doc = r.json()
        except ValueError:
            doc = {}
        if not isinstance(doc, dict) or not doc.get("success", True) or doc.get("new_contract") is None:
            error, msg = _refusal(r)
            raise NoCapacity(
                f"vast: renting offer {offer.offer_id} failed: {msg or error or r.text[:200]}; quote again"
            )
        iid = str(doc["new_contract"])
        self._ports[iid] = bootstrap.port
        log.info("vast: rented offer %s as instance %s (%s)", offer.offer_id, iid, name)
        return Worker(
            provider=self.name,
            instance_id=iid,
            name=name,
            token=bootstrap.token,
            offer=offer,
            tls_cert=bootstrap.tls_cert,
        )

    def _refused(self, offer: Offer, r: httpx.Response, bootstrap: Bootstrap) -> NoReturn:
        """Raise what a refused ``PUT /asks/`` means (see the module doc); Vast's message is kept."""
        error, msg = _refusal(r)
        msg = msg.replace(bootstrap.token.get_secret_value(), "***")
        parts = (  # Vast's msg often starts "error 410/3907: no_such_ask …" already
            "" if str(r.status_code) in msg else str(r.status_code),
            "" if not error or error in msg else f"{error}:",
            msg,
        )
        said = " ".join(part for part in parts if part)
        what = f"vast: renting offer {offer.offer_id} was refused ({said})"
        if r.status_code in (404, 410) or "no_such_ask" in f"{error} {msg}":
            raise NoCapacity(f"{what}; the offer is gone: quote again")
        if r.status_code == 403:
            raise PermanentError(
                f"{what}; this account may not rent this offer (not an API-key problem): choose another offer, "
                "or check the key's permissions if Vast's message names one"
            )
        hint = _CONFIG_HINTS.get(
            error, "check the bootstrap (image, disk >= 8 GB, on-start script) and the label"
        )
        raise ConfigError(f"{what}; {hint}")

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        """``GET /instances/{id}/?owner=me``: the row, or None when the instance does not exist (any more)."""
        return self._get_object(f"/api/v0/instances/{instance_id}/", "instances", params={"owner": "me"})

    def wait_ready(self, worker: Worker, *, timeout_s: float) -> Worker:
        """Poll until the instance runs and its agent answers ``/v1/health`` with the token; the worker with
        its ``url``. ``TransientError`` when it failed, vanished or is not ready within ``timeout_s``."""
        port = self._ports.get(worker.instance_id, self.agent_port)
        what = f"vast: instance {worker.instance_id} ({worker.name})"

        def probe() -> tuple[str | None, str]:
            row = self.instance(worker.instance_id)
            if row is None:
                raise TransientError(f"{what} is gone")
            status = str(row.get("actual_status") or "unknown")
            last = f"status {status}" + (f" ({row['status_msg']})" if row.get("status_msg") else "")
            if status in _FAILED or row.get("intended_status") == "stopped":
                raise TransientError(f"{what} failed: {last}")
            if status != "running":
                return None, last
            url = agent_url(row, port, "https" if worker.tls_cert else "http")
            return url, last if url else f"running, but port {port}/tcp is not mapped yet"

        return self._poll_until_healthy(worker, probe, what=what, timeout_s=timeout_s)

    def destroy(self, target: Worker | Instance) -> None:
        """``DELETE /instances/{id}/``; an instance already gone is fine."""
        try:
            r = self._api.request(
                "DELETE", f"/api/v0/instances/{target.instance_id}/", json={}, ok=(200, 201, 204)
            )
        except ProviderRefused as exc:
            if exc.status in (404, 410) or "no_such" in exc.detail or "not found" in exc.detail.lower():
                return
            raise
        self._ports.pop(target.instance_id, None)
        if r.content:
            try:
                doc = r.json()
            except ValueError:
                return
            if isinstance(doc, dict) and doc.get("success") is False:
                msg = str(doc.get("msg") or doc.get("error") or "")
                if "no_such" not in msg and "not found" not in msg.lower():
                    raise TransientError(f"vast: destroying instance {target.instance_id} failed: {msg}")
        log.info("vast: destroyed instance %s (%s)", target.instance_id, target.name)

    def instances(self) -> list[Instance]:
        """Our instances whose label starts with ``depin-``."""
        out = []
        for row in self._rows():
            label = row.get("label")
            if not is_ours(label):
                continue
            iid = str(row.get("id"))
            out.append(
                Instance(
                    provider=self.name,
                    instance_id=iid,
                    name=str(label),
                    status=str(row.get("actual_status") or "unknown"),
                    url=agent_url(row, self._ports.get(iid, self.agent_port)),
                    usd_per_hour=None if row.get("dph_total") is None else float(row["dph_total"]),
                )
            )
        return out
