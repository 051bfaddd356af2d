"""Publish functions to a gateway running on a Fluence VM: :class:`FluencePublisher` (a ``serving.publish``
``Publisher``).

``publish(model_dir, name, alias=…)``:

1. **Ensure the gateway VMs** for the target: ``replicas`` of them (default 1), replica 0 named
   ``depin-gw-<target>`` (the single gateway's name), replica i ``depin-gw-<target>-r<i>``, each in a
   datacenter no other replica uses (``VmBackend.placements``: gen A by country, gen B by the clusters'
   ``dcId``); fewer datacenters than replicas → ``ConfigError`` naming ``--replicas`` before anything is
   created. The API has no idempotency keys, so VMs are found by name through list calls: a running one is
   reused (no second VM); a failed/ended one is deleted and recreated; replicas beyond ``replicas`` are
   deleted. Each state record (with its admin key) is written *before* its create call, so a crash between
   create and record is reconciled by name on the next run. A failing call deletes every VM it created.
2. **Price guard** (only when a VM must be created): the price is estimated first (gen A ``/vms/v3/estimate``,
   gen B ``/v1/prices/cost``) and the total of every replica above ``max_usd_per_day`` raises ``ConfigError``
   naming ``DEPIN_FLUENCE_MAX_USD_PER_DAY`` — nothing is created.
3. **Bootstrap** (``serving.fluence.bootstrap``, driven by the API generation's VM lifecycle, a
   ``serving.fluence.vms.VmBackend``: ``_lifecycle_a`` / ``_lifecycle_b``): gen B passes cloud-init user
   data at create and attaches a security group opening 22 and the gateway port to the VM's interface; gen A
   creates the VM with ``openPorts = [22, port]`` (``openPorts`` replaces the list: 22 is always kept), waits
   for ``Active`` and runs the bootstrap script over SSH as the default image's user.
4. **Wait** for ``Active``/``launched`` (``vm_timeout_s``) and then for the gateway's ``/readyz``
   (``ready_timeout_s``). A VM created by this call that fails or times out is deleted (no orphan), and the
   error says what happened.
5. **Publish** the bundle, built and signed once, to every replica's gateway with its admin key
   (``serving.fluence.replicas``: verified upload on all, then the alias moves on all) and record the version
   in the state file (``serving.fluence.state``).

**TLS, pinned**: per VM a self-signed certificate and key are made here (``depin_core.tls``) and handed to
the VM in its bootstrap (cloud-init ``write_files`` / the SSH script); the gateway serves HTTPS with them, and
every connection to it (readiness, uploads, alias moves, ``depin invoke``) trusts exactly that certificate
(``<target>[.r<i>].tls-cert.pem`` in the state directory; the key file beside it is deleted once the gateway is
ready). A plain-HTTP non-loopback URL is refused before connecting.

Each gateway's admin key is generated here; only its sha256 goes to the VM. The key is kept in a 0600 file
beside the state, never printed. ``status()`` and ``down()`` back ``depin fluence status|down``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
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
from serving.fluence.replicas import FluencePublishResult, probe, publish_to_all
from serving.fluence.settings import FluenceSettings
from serving.fluence.state import Deployment, PublishedVersion, StateStore
from serving.fluence.vms import VM_PREFIX, LiveVm, Placement, Quote, VmBackend, replica_of, vm_name
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
    of a VM id (tests: the fake's per-VM port), default ``settings.ssh_port``. ``replicas`` (default
    ``settings.replicas``, ``DEPIN_FLUENCE_REPLICAS``): how many gateway VMs, each in a datacenter of its own.
    ``gateway_options`` go to :class:`serving.client.GatewayClient`; ``sleep`` is a test seam."""

    def __init__(
        self,
        client: FluenceClient,
        account: LocalAccount,
        settings: FluenceSettings | None = None,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        replicas: int | None = None,
        ssh_port_for: Callable[[str], int] | None = None,
        gateway_options: dict[str, Any] | None = None,
        own_client: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.account = account
        self.settings = settings or FluenceSettings()
        if replicas is not None:
            self.settings = FluenceSettings.model_validate(
                {**self.settings.model_dump(), "replicas": replicas}
            )
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
        """Replica 0's VM name (``depin-gw-<target>``)."""
        return vm_name(self.settings.target)

    @property
    def replicas(self) -> int:
        """How many gateway VMs: ``settings.replicas``; unset, as many as the target has recorded (1 when
        none), so a publish without ``--replicas`` never shrinks a replicated target."""
        if self.settings.replicas is not None:
            return self.settings.replicas
        return max((d.replica + 1 for d in self.store.replicas(self.name)), default=1)

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
        pair = self.store.tls_pair(dep.key)
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

    def admin_key(self, dep: Deployment | None = None) -> SecretStr:
        """The admin key of ``dep``'s gateway (default: replica 0's)."""
        where = dep.key if dep is not None else self.name
        key = self.store.admin_key(where)
        if key is None:
            raise ConfigError(
                f"no admin key for Fluence target {self.name!r} in {self.store.root} "
                f"({self.store.key_path(where).name}); restore it, or run `depin fluence down --fluence-target "
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

    def check_total(self, quotes: list[Quote], kept: list[Deployment], replicas: int) -> None:
        """``ConfigError`` when the new VMs (``quotes``) and the running replicas ``kept`` cost more than
        ``max_usd_per_day`` together (the cap covers every replica of the target)."""
        if len(quotes) == 1 and not kept:
            self.check_price(quotes[0])
            return
        cap = self.settings.max_usd_per_day
        running = sum(d.usd_per_day or 0.0 for d in kept)
        total = running + sum(q.usd_per_day for q in quotes)
        if total > cap:
            each = ", ".join(f"{q.usd_per_day:.2f}" for q in quotes)
            raise ConfigError(
                f"{replicas} Fluence gateway VMs (--replicas) cost {total:.2f} USD/day together ({len(quotes)} "
                f"new at {each} USD/day, {running:.2f} for the {len(kept)} running), above the cap "
                f"DEPIN_FLUENCE_MAX_USD_PER_DAY (--max-usd-per-day) = {cap:.2f}; raise the cap, lower --replicas "
                "or pick a smaller VM — nothing was created"
            )

    # ---- ensure -----------------------------------------------------------------------------------------
    def ensure(self) -> Deployment:
        """Replica 0 of :meth:`ensure_replicas` (the target's only gateway unless ``replicas`` > 1)."""
        return self.ensure_replicas()[0]

    def ensure_replicas(self) -> list[Deployment]:
        """``replicas`` running, bootstrapped gateway VMs for the target, each in a datacenter of its own,
        whose ``/readyz`` answers 200 (see the module docstring). Running ones are reused, failed ones
        replaced, replicas beyond ``replicas`` deleted; a failing call deletes the VMs it created."""
        backend, n = self.backend, self.replicas
        recorded = {d.replica: d for d in self.store.replicas(self.name)}
        for dep in recorded.values():
            if dep.generation != backend.generation:
                raise ConfigError(
                    f"Fluence target {self.name!r} was deployed with API generation {dep.generation}, the "
                    f"account now answers {backend.generation}; run `depin fluence down --fluence-target "
                    f"{self.name}` first"
                )
        live = [v for v in backend.list_ours() if replica_of(self.name, v.name) is not None]
        reused: list[Deployment] = []
        missing: list[int] = []
        for i in range(n):
            mine = [v for v in live if v.name == vm_name(self.name, i)]
            found = self._drop_failed(recorded.get(i), i, [v for v in mine if v.failed])
            usable = [v for v in mine if not v.failed]
            if not usable:
                missing.append(i)
                continue
            if found is None:
                raise ConfigError(
                    f"a VM named {usable[0].name} ({usable[0].id}) exists on the Fluence account but this "
                    f"machine has no record of it in {self.store.path} (so no admin key for its gateway); run "
                    f"`depin fluence down --fluence-target {self.name}` (deletes it) and publish again, or use "
                    "another --fluence-target"
                )
            dep = found
            vm = next((v for v in usable if v.id == dep.vm_id), usable[0])
            self.admin_key(dep)  # the key must be here before anything is reused
            self.pinned_cert(dep)  # and the certificate it pins
            if dep.vm_id != vm.id:  # adopted after a crash between create and record
                dep = self.record(dep, vm_id=vm.id)
            if dep.datacenter is None and vm.datacenter is not None:
                dep = self.record(dep, datacenter=vm.datacenter, country=vm.country, location=vm.location)
            reused.append(dep)
        created = self._create_missing(missing, reused, n) if missing else []
        jobs = [(d, False) for d in reused] + [(d, True) for d in created]
        ready = self._bring_up_all(jobs)
        self._shrink(recorded, live, n)
        return sorted(ready, key=lambda d: d.replica)

    def _drop_failed(self, dep: Deployment | None, replica: int, failed: list[LiveVm]) -> Deployment | None:
        """Delete failed VMs of ``replica``; returns its record reset to "creating" if it was one of them."""
        if not failed:
            return dep
        log.warning("deleting failed gateway VM(s) %s", ", ".join(f"{v.id} ({v.status})" for v in failed))
        self.backend.delete(dep or self._new_record("0" * 64, replica=replica), [v.id for v in failed])
        if dep is None or dep.vm_id not in {v.id for v in failed}:
            return dep
        return self.record(
            dep,
            vm_id=None,
            public_ip=None,
            bootstrapped=False,
            security_group_id=None,
            ssh_host_key=None,
            status="creating",
        )

    def _create_missing(self, missing: list[int], kept: list[Deployment], n: int) -> list[Deployment]:
        """Create the VMs of replicas ``missing`` in datacenters none of ``kept`` uses, within the price cap:
        checked before anything is created. A failure deletes the VMs created so far (no orphan)."""
        backend = self.backend
        taken = {d.datacenter for d in kept if d.datacenter}
        places = backend.placements(len(missing), taken=taken, replicas=n)
        quotes = [backend.quote(p) for p in places]  # NoOffer (422) propagates: nothing created
        self.check_total(quotes, kept, n)
        public_key = boot.ensure_ssh_key(self.settings.key_file())
        created: list[Deployment] = []
        try:
            for replica, place, quote in zip(missing, places, quotes, strict=True):
                created.append(self._create(replica, place, quote, public_key))
        except BaseException as exc:
            for dep in created:
                self._discard(dep, exc)
            raise
        return created

    def _new_record(self, digest: str, *, name: str | None = None, replica: int = 0) -> Deployment:
        target = name or self.name
        return Deployment(
            target=target,
            replica=replica,
            vm_name=vm_name(target, replica),
            generation=self.backend.generation,
            port=self.settings.port,
            ssh_port=self.settings.ssh_port,
            admin_key_hash=digest,
        )

    def _create(self, replica: int, place: Placement, quote: Quote, public_key: str) -> Deployment:
        backend = self.backend
        raw, digest = new_admin_key()  # a new VM, a new key (only its sha256 goes to the VM)
        dep = self._new_record(digest, replica=replica)
        self.store.write_admin_key(dep.key, SecretStr(raw))
        del raw
        cert = make_certificate((dep.vm_name, "localhost"), ("127.0.0.1",))  # pinned; SANs for a local proxy
        self.store.write_tls(dep.key, cert)
        dep = self.record(
            dep,
            tls_fingerprint=cert.fingerprint,
            cluster_id=place.cluster_id,
            datacenter=place.datacenter,
            country=place.country,
            location=place.location if place.datacenter else None,
            usd_per_day=quote.usd_per_day,
            usd_per_hour=quote.usd_per_hour,
            status="creating",
        )
        log.info("creating Fluence VM %s in %s (%s)", dep.vm_name, place.location, quote.detail)
        try:
            vm_id = backend.create(dep, public_key)
        except FluenceUnavailable:
            # the create may have been applied: reconcile by name before giving up
            found = [v for v in backend.find(dep.vm_name) if not v.failed]
            if not found:  # keep the record: the next run adopts the VM if it shows up after all
                raise
            vm_id = found[0].id
        except BaseException:
            self.store.remove(dep.key)
            raise
        return self.record(dep, vm_id=vm_id)

    def _bring_up_all(self, jobs: list[tuple[Deployment, bool]]) -> list[Deployment]:
        """:meth:`_bring_up` each (deployment, created) at once (VMs boot in parallel); if any fails, the VMs
        this call created are deleted, all of them, and the first error is raised."""
        if len(jobs) == 1:
            dep, created = jobs[0]
            return [self._bring_up(dep, created=created)]
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="fluence-up") as pool:
            futures = [pool.submit(self._bring_up, dep, created=created) for dep, created in jobs]
            wait(futures)
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            for (_, created), future in zip(jobs, futures, strict=True):
                if created and future.exception() is None:  # it came up, but this call failed
                    self._discard(future.result(), errors[0])
            raise errors[0]
        return [f.result() for f in futures]

    def _bring_up(self, dep: Deployment, *, created: bool) -> Deployment:
        """Wait running → bootstrap → /readyz. A VM created by this call is deleted on any failure."""
        try:
            vm = self._wait_running(dep)
            where = {"datacenter": vm.datacenter, "country": vm.country}
            known = {k: v for k, v in where.items() if v is not None and getattr(dep, k) is None}
            dep = self.record(
                dep,
                public_ip=vm.ip,
                usd_per_hour=dep.usd_per_hour or vm.usd_per_hour,
                location=vm.location or dep.location,  # where the API says it is
                **known,
            )
            dep = self.backend.prepare(dep, vm)
            self._wait_ready(dep, created=created)
            self.store.tls_key_path(dep.key).unlink(missing_ok=True)  # the VM has it; no copy stays here
            return self.record(dep, status="ready")
        except BaseException as exc:
            if created or isinstance(exc, VmFailed):
                self._discard(dep, exc)
            raise

    def _discard(self, dep: Deployment, exc: BaseException) -> None:
        """Delete a VM that failed to come up (no orphan); keep the record only if that fails too."""
        log.warning("deleting Fluence VM %s after a failed start: %s", dep.vm_id, type(exc).__name__)
        ids = {v.id for v in self.backend.find(dep.vm_name)} if dep.vm_id is None else {dep.vm_id}
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
        self.store.remove(dep.key)

    def _shrink(self, recorded: dict[int, Deployment], live: list[LiveVm], n: int) -> None:
        """Delete the replicas numbered ``n`` and up (recorded, or only named like one)."""
        extra: dict[int, list[str]] = {}
        for vm in live:
            replica = replica_of(self.name, vm.name)
            if replica is not None and replica >= n:
                extra.setdefault(replica, []).append(vm.id)
        for replica, dep in recorded.items():
            if replica >= n:
                extra.setdefault(replica, [])
                if dep.vm_id and dep.vm_id not in extra[replica]:
                    extra[replica].append(dep.vm_id)
        for replica, ids in sorted(extra.items()):
            dep = recorded.get(replica) or self._new_record("0" * 64, replica=replica)
            log.info("deleting gateway replica %s (%s): --replicas %d", dep.vm_name, ids, n)
            for problem in self.backend.delete(dep, sorted(ids)):
                log.warning("%s", problem)
            self.store.remove(dep.key)

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
        """A :class:`GatewayPublisher` for replica 0's gateway (every replica is ensured first) whose
        ``publish`` also records the version in the state file. Close it (context manager)."""
        return self._recording(self.ensure())

    def _recording(self, dep: Deployment) -> _RecordingGatewayPublisher:
        assert dep.url is not None
        return _RecordingGatewayPublisher(
            self.store,
            dep.key,
            dep.url,
            self.admin_key(dep),
            self.account,
            max_batch_size=self.max_batch_size,
            **{**self.gateway_options, "tls_cert_pem": self.pinned_cert(dep)},
        )

    def publish(self, model_dir: Path | str, name: str, *, alias: str | None = None) -> FluencePublishResult:
        """Ensure the gateway VMs, then publish ``model_dir`` as ``name`` to every replica's gateway (verified
        upload on all, then ``alias`` moved on all); the version is recorded in the state file. The result is
        replica 0's, with ``urls`` naming every replica."""
        valid_name(name)
        if alias is not None:
            valid_alias(alias)
        if not Path(model_dir).is_dir():  # before anything costs money
            raise ConfigError(
                f"--model {model_dir}: not a directory; pass a model artifact from `depin train`"
            )
        deps = self.ensure_replicas()
        gateways = [self._recording(d) for d in deps]
        try:
            results = publish_to_all(
                gateways,
                model_dir,
                name,
                alias=alias,
                account=self.account,
                max_batch_size=self.max_batch_size,
            )
        finally:
            for gateway in gateways:
                gateway.close()
        for dep, result in zip(deps, results, strict=True):
            item = PublishedVersion(name=result.name, version=result.version, moved=list(result.moved))
            self.store.add_published(dep.key, item)
        return FluencePublishResult(**results[0].model_dump(), urls=[d.url or "" for d in deps])

    # ---- status / down ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What this machine created on Fluence (the state file: every replica of every target) and how it is
        now (the API, ``/readyz`` and its latency), plus VMs named ``depin-gw-*`` the state does not know."""
        state = self.store.load()
        backend = self.backend
        out = []
        known_ids: set[str] = set()
        deps = sorted(state.deployments.values(), key=lambda d: (d.target, d.replica))
        for dep in deps:
            live = backend.get(dep.vm_id) if dep.vm_id else None
            if dep.vm_id:
                known_ids.add(dep.vm_id)
            if live is not None and live.ip:
                dep = dep.model_copy(update={"public_ip": live.ip})
            url = dep.url
            pem = self.store.tls_cert(dep.key)
            health = None
            if url and pem and live is not None and live.running and url.startswith("https://"):
                health = probe(url, pem)
            latest = dep.published[-1] if dep.published else None
            out.append(
                {
                    "target": dep.target,
                    "replica": dep.replica,
                    "vm_name": dep.vm_name,
                    "vm_id": dep.vm_id,
                    "generation": dep.generation,
                    "datacenter": dep.datacenter or (live.datacenter if live else None),
                    "country": dep.country or (live.country if live else None),
                    "location": dep.location or (live.location if live else None),
                    "recorded_status": dep.status,
                    "vm_status": live.status if live is not None else "gone",
                    "public_ip": live.ip if live is not None else dep.public_ip,
                    "port": dep.port,
                    "url": url,
                    "tls_fingerprint": dep.tls_fingerprint,
                    "tls_cert_file": str(self.store.tls_cert_path(dep.key)) if pem else None,
                    "ready": bool(health and health.ready),
                    "readyz_ms": health.latency_ms if health else None,
                    "usd_per_hour": dep.usd_per_hour,
                    "usd_per_day": dep.usd_per_day,
                    "security_group_id": dep.security_group_id,
                    "admin_key_file": str(self.store.key_path(dep.key)),
                    "created_at": dep.created_at,
                    "latest_version": f"{latest.name}@{latest.version}" if latest else None,
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
        """Delete the target's gateway VMs — every replica, recorded or named ``depin-gw-<target>[-r<i>]`` —
        and their security groups, and forget them (their functions are unpublished with them).
        ``all_targets``: every recorded target and every ``depin-gw-*`` VM."""
        state = self.store.load()
        backend = self.backend
        targets = sorted({d.target for d in state.deployments.values()}) if all_targets else [self.name]
        ours = backend.list_ours()
        deleted: list[dict[str, Any]] = []
        for target in targets:
            recorded = {d.replica: d for d in state.deployments.values() if d.target == target}
            named: dict[int, set[str]] = {}
            for vm in ours:
                replica = replica_of(target, vm.name)
                if replica is not None:
                    named.setdefault(replica, set()).add(vm.id)
            for replica in sorted(set(recorded) | set(named) | {0}):
                dep = recorded.get(replica)
                ids = set(named.get(replica, set()))
                if dep is not None and dep.vm_id:
                    live = backend.get(dep.vm_id)
                    if live is not None and live.status not in ("terminating", "terminated"):
                        ids.add(dep.vm_id)
                probe_dep = dep or self._new_record("0" * 64, name=target, replica=replica)
                problems = backend.delete(probe_dep, sorted(ids))  # no ids: gen B still deletes the group
                self.store.remove(probe_dep.key)
                deleted.append(
                    {
                        "target": target,
                        "replica": replica,
                        "vm_name": probe_dep.vm_name,
                        "vm_ids": sorted(ids),
                        "problems": problems,
                    }
                )
        if all_targets:
            for vm in backend.list_ours():
                orphan = self._new_record("0" * 64, name=vm.name.removeprefix(VM_PREFIX) or "orphan")
                problems = backend.delete(orphan.model_copy(update={"vm_name": vm.name}), [vm.id])
                deleted.append({"target": None, "vm_name": vm.name, "vm_ids": [vm.id], "problems": problems})
        return {"deleted": deleted}


__all__ = ["FluencePublishResult", "FluencePublisher"]
