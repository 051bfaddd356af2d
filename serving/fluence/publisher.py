"""Publish functions to a gateway running on a Fluence VM: :class:`FluencePublisher` (a ``serving.publish``
``Publisher``).

``publish(model_dir, name, alias=…)``:

1. **Ensure a gateway VM** for the target (``depin-gw-<target>``). The API has no idempotency keys, so the VM
   is found by name through list calls: a running one is reused (no second VM); a failed/ended one is
   deleted and recreated. The state record (with the admin key) is written *before* the create call, so a
   crash between create and record is reconciled by name on the next run.
2. **Price guard** (only when a VM must be created): the price is estimated first (gen A ``/vms/v3/estimate``,
   gen B ``/v1/prices/cost``) and a price above ``max_usd_per_day`` raises ``ConfigError`` naming
   ``DEPIN_FLUENCE_MAX_USD_PER_DAY`` — nothing is created.
3. **Bootstrap** (``serving.fluence.bootstrap``, driven by the API generation's VM lifecycle, a
   ``serving.fluence.vms.VmBackend``: ``_lifecycle_a`` / ``_lifecycle_b``): gen B passes cloud-init user
   data at create and attaches a security group opening 22 and the gateway port to the VM's interface; gen A
   creates the VM with ``openPorts = [22, port]`` (``openPorts`` replaces the list: 22 is always kept), waits
   for ``Active`` and runs the bootstrap script over SSH as the default image's user.
4. **Wait** for ``Active``/``launched`` (``vm_timeout_s``) and then for the gateway's ``/readyz``
   (``ready_timeout_s``). A VM created by this call that fails or times out is deleted (no orphan), and the
   error says what happened.
5. **Publish** through ``serving.publish.GatewayPublisher`` with the target's admin key (verified upload, then
   the alias moves) and record the version in the state file (``serving.fluence.state``).

**TLS, pinned**: per VM a self-signed certificate and key are made here (``depin_core.tls``) and handed to
the VM in its bootstrap (cloud-init ``write_files`` / the SSH script); the gateway serves HTTPS with them, and
every connection to it (readiness, uploads, alias moves, ``depin invoke``) trusts exactly that certificate
(``<target>.tls-cert.pem`` in the state directory; the key file beside it is deleted once the gateway is
ready). A plain-HTTP non-loopback URL is refused before connecting.

The gateway's admin key is generated here; only its sha256 goes to the VM. The key is kept in a 0600 file
beside the state, never printed. ``status()`` and ``down()`` back ``depin fluence status|down``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from pydantic import SecretStr

from depin_core.errors import ConfigError, DepinError, PermanentError, TransientError
from depin_core.tls import (
    NodeCertificate,
    check_url,
    client_context,
    is_certificate_refusal,
    make_certificate,
    pin_refused,
)
from serving._auth import new_admin_key
from serving.bundle import DEFAULT_MAX_BATCH_SIZE, valid_name
from serving.fluence import bootstrap as boot
from serving.fluence._client import FluenceClient
from serving.fluence._lifecycle_a import LifecycleA
from serving.fluence._lifecycle_b import LifecycleB
from serving.fluence.errors import FluenceUnavailable, VmFailed
from serving.fluence.settings import FluenceSettings
from serving.fluence.state import Deployment, PublishedVersion, StateStore
from serving.fluence.vms import VM_PREFIX, LiveVm, Quote, VmBackend
from serving.publish import GatewayPublisher, PublishResult
from serving.registry import valid_alias

log = logging.getLogger(__name__)


class _RecordingGatewayPublisher(GatewayPublisher):
    """A ``GatewayPublisher`` that records each published version in the Fluence state file."""

    def __init__(self, store: StateStore, name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store, self._name = store, name

    def publish(self, model_dir: Path | str, name: str, *, alias: str | None = None) -> PublishResult:
        result = super().publish(model_dir, name, alias=alias)
        item = PublishedVersion(name=result.name, version=result.version, moved=list(result.moved))
        self._store.add_published(self._name, item)
        return result


class FluencePublisher:
    """Publish functions to a gateway on a Fluence VM (see the module docstring).

    ``client``: a :class:`FluenceClient` (closed by :meth:`close` only if ``own_client``). ``account``: the
    publisher account that signs bundles (the VM's gateway trusts exactly it). ``ssh_port_for``: the SSH port
    of a VM id (tests: the fake's per-VM port), default ``settings.ssh_port``. ``gateway_options`` go to
    :class:`serving.client.GatewayClient`; ``sleep`` is a test seam."""

    def __init__(
        self,
        client: FluenceClient,
        account: LocalAccount,
        settings: FluenceSettings | None = None,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        ssh_port_for: Callable[[str], int] | None = None,
        gateway_options: dict[str, Any] | None = None,
        own_client: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.account = account
        self.settings = settings or FluenceSettings()
        self.max_batch_size = max_batch_size
        self._ssh_port_for = ssh_port_for
        self.gateway_options = dict(gateway_options or {})
        self.own_client = own_client
        self._sleep = sleep
        self.store = StateStore(self.settings.state_dir)
        self._backend: VmBackend | None = None

    def __repr__(self) -> str:
        return f"FluencePublisher(target={self.settings.target!r}, api={self.client.base_url!r})"

    def close(self) -> None:
        if self.own_client:
            self.client.close()

    def __enter__(self) -> FluencePublisher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- small helpers ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.settings.target

    @property
    def vm_name(self) -> str:
        return VM_PREFIX + self.settings.target

    @property
    def target(self) -> str:
        """The gateway URL once the VM is up (``PublishResult.target``), else ``fluence:<target>``."""
        dep = self.store.get(self.name)
        return (dep.url if dep is not None else None) or f"fluence:{self.name}"

    @property
    def backend(self) -> VmBackend:
        """The VM lifecycle of the account's API generation."""
        if self._backend is None:
            gen_a = self.client.generation == "A"
            self._backend = LifecycleA(self, self.client.a) if gen_a else LifecycleB(self, self.client.b)
        return self._backend

    def ssh_port_for(self, vm_id: str) -> int:
        return self._ssh_port_for(vm_id) if self._ssh_port_for is not None else self.settings.ssh_port

    def record(self, dep: Deployment, **changes: Any) -> Deployment:
        """Save ``dep`` with ``changes`` to the state file; returns the saved record."""
        return self.store.put(dep.model_copy(update=changes))

    def gateway_env(self, dep: Deployment) -> dict[str, str]:
        return boot.gateway_env(
            port=dep.port,
            admin_key_hash=dep.admin_key_hash,
            trusted_publishers=[self.account.address],
            tls=True,
        )

    def tls_pair(self, dep: Deployment) -> NodeCertificate:
        """The certificate and key made for ``dep``'s VM (they go to it in the bootstrap)."""
        pair = self.store.tls_pair(dep.target)
        if pair is None or pair.fingerprint != dep.tls_fingerprint:
            raise ConfigError(
                f"the TLS certificate/key of Fluence target {dep.target!r} are missing from {self.store.root} "
                f"or do not match the state; run `depin fluence down --fluence-target {dep.target}` and "
                "publish again (a new gateway VM with a new certificate)"
            )
        return pair

    def pinned_cert(self, dep: Deployment) -> str:
        """``dep``'s gateway certificate (PEM): the only one its connections trust. ``ConfigError`` when the
        deployment has none (made before TLS) or the file does not match the recorded fingerprint."""
        return self.store.pinned_cert(dep)

    def admin_key(self) -> SecretStr:
        key = self.store.admin_key(self.name)
        if key is None:
            raise ConfigError(
                f"no admin key for Fluence target {self.name!r} in {self.store.root} "
                f"({self.store.key_path(self.name).name}); restore it, or run `depin fluence down --fluence-target "
                f"{self.name}` and publish again (a new gateway VM)"
            )
        return key

    def quote(self) -> Quote:
        """What a new gateway VM would cost (raises ``NoOffer`` when nothing matches)."""
        return self.backend.quote()

    def check_price(self, quote: Quote) -> None:
        """``ConfigError`` when ``quote`` is above ``max_usd_per_day``."""
        cap = self.settings.max_usd_per_day
        if quote.usd_per_day > cap:
            raise ConfigError(
                f"a Fluence gateway VM costs {quote.usd_per_day:.2f} USD/day ({quote.detail}), above the cap "
                f"DEPIN_FLUENCE_MAX_USD_PER_DAY (--max-usd-per-day) = {cap:.2f}; raise the cap or pick a "
                "smaller VM (DEPIN_FLUENCE_BASIC_CONFIGURATION / DEPIN_FLUENCE_CONFIGURATION) — nothing was "
                "created"
            )

    # ---- ensure -----------------------------------------------------------------------------------------
    def ensure(self) -> Deployment:
        """A running, bootstrapped gateway VM for the target whose ``/readyz`` answers 200 (see the module
        docstring); reused when it exists."""
        backend = self.backend
        dep = self.store.get(self.name)
        if dep is not None and dep.generation != backend.generation:
            raise ConfigError(
                f"Fluence target {self.name!r} was deployed with API generation {dep.generation}, the account "
                f"now answers {backend.generation}; run `depin fluence down --fluence-target {self.name}` first"
            )
        live = backend.find(self.vm_name)
        failed = [v for v in live if v.failed]
        usable = [v for v in live if not v.failed]
        if failed:
            log.warning("deleting failed gateway VM(s) %s", ", ".join(f"{v.id} ({v.status})" for v in failed))
            probe = dep or self._new_record("0" * 64)
            backend.delete(probe, [v.id for v in failed])
            if dep is not None and dep.vm_id in {v.id for v in failed}:
                dep = self.record(
                    dep,
                    vm_id=None,
                    public_ip=None,
                    bootstrapped=False,
                    security_group_id=None,
                    ssh_host_key=None,
                    status="creating",
                )
        if usable:
            if dep is None:
                raise ConfigError(
                    f"a VM named {self.vm_name} ({usable[0].id}) exists on the Fluence account but this machine "
                    f"has no record of it in {self.store.path} (so no admin key for its gateway); run "
                    f"`depin fluence down --fluence-target {self.name}` (deletes it) and publish again, or use another "
                    "--fluence-target"
                )
            vm = next((v for v in usable if v.id == dep.vm_id), usable[0])
            self.admin_key()  # the key must be here before anything is reused
            self.pinned_cert(dep)  # and the certificate it pins
            if dep.vm_id != vm.id:  # adopted after a crash between create and record
                dep = self.record(dep, vm_id=vm.id)
            return self._bring_up(dep, created=False)
        return self._create()

    def _new_record(self, digest: str, *, name: str | None = None) -> Deployment:
        return Deployment(
            target=name or self.name,
            vm_name=VM_PREFIX + (name or self.name),
            generation=self.backend.generation,
            port=self.settings.port,
            ssh_port=self.settings.ssh_port,
            admin_key_hash=digest,
        )

    def _create(self) -> Deployment:
        backend = self.backend
        quote = backend.quote()  # NoOffer (422) propagates: nothing created
        self.check_price(quote)
        public_key = boot.ensure_ssh_key(self.settings.key_file())
        raw, digest = new_admin_key()  # a new VM, a new key (only its sha256 goes to the VM)
        self.store.write_admin_key(self.name, SecretStr(raw))
        del raw
        cert = make_certificate((self.vm_name, "localhost"), ("127.0.0.1",))  # pinned; SANs for a local proxy
        self.store.write_tls(self.name, cert)
        dep = self.record(
            self._new_record(digest).model_copy(update={"tls_fingerprint": cert.fingerprint}),
            usd_per_day=quote.usd_per_day,
            usd_per_hour=quote.usd_per_hour,
            status="creating",
        )
        log.info("creating Fluence VM %s (%s)", self.vm_name, quote.detail)
        try:
            vm_id = backend.create(dep, public_key)
        except FluenceUnavailable:
            # the create may have been applied: reconcile by name before giving up
            found = [v for v in backend.find(self.vm_name) if not v.failed]
            if not found:  # keep the record: the next run adopts the VM if it shows up after all
                raise
            vm_id = found[0].id
        except BaseException:
            self.store.remove(self.name)
            raise
        dep = self.record(dep, vm_id=vm_id)
        return self._bring_up(dep, created=True)

    def _bring_up(self, dep: Deployment, *, created: bool) -> Deployment:
        """Wait running → bootstrap → /readyz. A VM created by this call is deleted on any failure."""
        try:
            vm = self._wait_running(dep)
            dep = self.record(dep, public_ip=vm.ip, usd_per_hour=dep.usd_per_hour or vm.usd_per_hour)
            dep = self.backend.prepare(dep, vm)
            self._wait_ready(dep, created=created)
            self.store.tls_key_path(self.name).unlink(missing_ok=True)  # the VM has it; no copy stays here
            return self.record(dep, status="ready")
        except BaseException as exc:
            if created or isinstance(exc, VmFailed):
                self._discard(dep, exc)
            raise

    def _discard(self, dep: Deployment, exc: BaseException) -> None:
        """Delete a VM that failed to come up (no orphan); keep the record only if that fails too."""
        log.warning("deleting Fluence VM %s after a failed start: %s", dep.vm_id, type(exc).__name__)
        ids = {v.id for v in self.backend.find(self.vm_name)} if dep.vm_id is None else {dep.vm_id}
        try:
            problems = self.backend.delete(dep, sorted(ids))
        except DepinError as err:
            self.record(dep, status="failed")
            raise PermanentError(
                f"the Fluence VM {dep.vm_id} did not come up ({exc}) and deleting it failed too ({err}); run "
                f"`depin fluence down --fluence-target {self.name}` to stop paying for it"
            ) from exc
        for problem in problems:
            log.warning("%s", problem)
        self.store.remove(self.name)

    def _wait_running(self, dep: Deployment) -> LiveVm:
        assert dep.vm_id is not None
        deadline = time.monotonic() + self.settings.vm_timeout_s
        last = "unknown"
        while True:
            vm = self.backend.get(dep.vm_id)
            if vm is None:
                raise VmFailed(f"the Fluence VM {dep.vm_id} ({dep.vm_name}) disappeared while starting")
            last = vm.status
            if vm.failed:
                hint = (
                    " (invalid cloud-init user data shows up this way in generation B)"
                    if vm.status == "failed"
                    else ""
                )
                raise VmFailed(
                    f"the Fluence VM {dep.vm_id} ({dep.vm_name}) went {vm.status}{hint}; it was deleted — "
                    "publish again to create a new one"
                )
            if vm.running and vm.ip:
                return vm
            if time.monotonic() >= deadline:
                raise TransientError(
                    f"the Fluence VM {dep.vm_id} was still {last} after {self.settings.vm_timeout_s:.0f} s "
                    "(DEPIN_FLUENCE_VM_TIMEOUT_S); it was deleted — publish again, or raise the timeout"
                )
            self._sleep(self.settings.poll_s)

    def _wait_ready(self, dep: Deployment, *, created: bool) -> None:
        url = dep.url
        assert url is not None
        check_url(url, "gateway URL")
        verify = client_context(self.pinned_cert(dep))
        deadline = time.monotonic() + self.settings.ready_timeout_s
        last = ""
        with httpx.Client(timeout=httpx.Timeout(5.0, connect=5.0), verify=verify) as http:
            while True:
                try:
                    r = http.get(f"{url}/readyz")
                    if r.status_code == 200:
                        return
                    last = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                    if is_certificate_refusal(exc):  # a VM still booting does not answer TLS at all: no retry
                        raise pin_refused(
                            exc,
                            url,
                            dep.tls_fingerprint,
                            f"Check the address; `depin fluence down --fluence-target {self.name}` and publish "
                            "again for a fresh VM and certificate",
                        ) from None
                if time.monotonic() >= deadline:
                    what = (
                        "it was deleted (no orphan) — check DEPIN_FLUENCE_PACKAGE is installable on the VM and "
                        "publish again, or raise DEPIN_FLUENCE_READY_TIMEOUT_S"
                        if created
                        else f"the VM was kept; see `depin fluence status`, or `depin fluence down --fluence-target "
                        f"{self.name}` and publish again for a fresh one"
                    )
                    raise TransientError(
                        f"the gateway on Fluence VM {dep.vm_id} ({url}) was not ready after "
                        f"{self.settings.ready_timeout_s:.0f} s (last: {last or 'no answer'}); {what}"
                    )
                self._sleep(min(self.settings.poll_s, 1.0))

    # ---- publish ----------------------------------------------------------------------------------------
    def gateway_publisher(self) -> GatewayPublisher:
        """A :class:`GatewayPublisher` for the target's gateway (the VM is ensured first) whose ``publish``
        also records the version in the state file. Close it (context manager)."""
        dep = self.ensure()
        assert dep.url is not None
        return _RecordingGatewayPublisher(
            self.store,
            self.name,
            dep.url,
            self.admin_key(),
            self.account,
            max_batch_size=self.max_batch_size,
            **{**self.gateway_options, "tls_cert_pem": self.pinned_cert(dep)},
        )

    def publish(self, model_dir: Path | str, name: str, *, alias: str | None = None) -> PublishResult:
        """Ensure the gateway VM, then publish ``model_dir`` as ``name`` through its admin API and move
        ``alias``; the version is recorded in the state file."""
        valid_name(name)
        if alias is not None:
            valid_alias(alias)
        if not Path(model_dir).is_dir():  # before anything costs money
            raise ConfigError(
                f"--model {model_dir}: not a directory; pass a model artifact from `depin train`"
            )
        with self.gateway_publisher() as gateway:
            return gateway.publish(model_dir, name, alias=alias)

    # ---- status / down ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What this machine created on Fluence (the state file) and how it is now (the API, ``/readyz``),
        plus VMs named ``depin-gw-*`` the state does not know."""
        state = self.store.load()
        backend = self.backend
        out = []
        known_ids: set[str] = set()
        for target, dep in sorted(state.deployments.items()):
            live = backend.get(dep.vm_id) if dep.vm_id else None
            if dep.vm_id:
                known_ids.add(dep.vm_id)
            ready = False
            if live is not None and live.ip:
                dep = dep.model_copy(update={"public_ip": live.ip})
            url = dep.url
            pem = self.store.tls_cert(target)
            if url and pem and live is not None and live.running and url.startswith("https://"):
                try:
                    r = httpx.get(f"{url}/readyz", timeout=5, verify=client_context(pem))
                    ready = r.status_code == 200
                except httpx.HTTPError:
                    ready = False
            out.append(
                {
                    "target": target,
                    "vm_name": dep.vm_name,
                    "vm_id": dep.vm_id,
                    "generation": dep.generation,
                    "recorded_status": dep.status,
                    "vm_status": live.status if live is not None else "gone",
                    "public_ip": live.ip if live is not None else dep.public_ip,
                    "port": dep.port,
                    "url": url,
                    "tls_fingerprint": dep.tls_fingerprint,
                    "tls_cert_file": str(self.store.tls_cert_path(target)) if pem else None,
                    "ready": ready,
                    "usd_per_hour": dep.usd_per_hour,
                    "usd_per_day": dep.usd_per_day,
                    "security_group_id": dep.security_group_id,
                    "admin_key_file": str(self.store.key_path(target)),
                    "created_at": dep.created_at,
                    "published": [p.model_dump(mode="json") for p in dep.published],
                }
            )
        untracked = []
        for vm in backend.list_ours():
            if vm.id not in known_ids:
                untracked.append(
                    {"vm_id": vm.id, "vm_name": vm.name, "vm_status": vm.status, "public_ip": vm.ip}
                )
        return {"state_file": str(self.store.path), "deployments": out, "untracked": untracked}

    def down(self, *, all_targets: bool = False) -> dict[str, Any]:
        """Delete the target's gateway VM(s) — the recorded one and any named ``depin-gw-<target>`` — and its
        security group, and forget it (its functions are unpublished with it). ``all_targets``: every
        recorded target and every ``depin-gw-*`` VM."""
        state = self.store.load()
        backend = self.backend
        targets = sorted(state.deployments) if all_targets else [self.name]
        deleted: list[dict[str, Any]] = []
        for target in targets:
            name = VM_PREFIX + target
            dep = state.deployments.get(target)
            ids = {v.id for v in backend.find(name)}
            if dep is not None and dep.vm_id:
                live = backend.get(dep.vm_id)
                if live is not None and live.status not in ("terminating", "terminated"):
                    ids.add(dep.vm_id)
            probe = dep or self._new_record("0" * 64, name=target)
            problems = backend.delete(probe, sorted(ids))  # no ids: gen B still deletes the security group
            self.store.remove(target)
            deleted.append({"target": target, "vm_name": name, "vm_ids": sorted(ids), "problems": problems})
        if all_targets:
            for vm in backend.list_ours():
                orphan = self._new_record("0" * 64, name=vm.name.removeprefix(VM_PREFIX) or "orphan")
                problems = backend.delete(orphan.model_copy(update={"vm_name": vm.name}), [vm.id])
                deleted.append({"target": None, "vm_name": vm.name, "vm_ids": [vm.id], "problems": problems})
        return {"deleted": deleted}


__all__ = ["FluencePublisher"]
