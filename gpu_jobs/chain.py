"""The runner chain: run one job on the first runner of a list that completes it, with fallback and verification.

A chain is a list of entries, tried in order::

    ["agent:https://node-a:8900", "vast", "ionet", "local"]

- ``local`` — :class:`gpu_jobs.local.LocalRunner` on this machine (CUDA when present, else CPU). Trusted.
- ``agent:<url>`` — a worker agent at ``url`` (:class:`gpu_jobs.remote.AgentRunner`); the token is the registered
  node's with that URL (``depin worker register``), else ``DEPIN_AGENT_TOKEN``.
- ``node:<name>`` — a registered node (the nodes file, :data:`depin_core.paths.NODES_FILE`).
- ``vast``, ``ionet`` — rent a machine on the marketplace (quote → cheapest offer that fits → launch → agent
  ready → job → destroy, always); API keys from ``DEPIN_VAST_API_KEY`` / ``DEPIN_IONET_API_KEY``.
- ``gpunet`` / ``manual`` — the cheapest healthy registered node.

How failures move along the chain (one ``job_id`` for the whole run; every attempt is recorded as a
:class:`ChainAttempt` with its runner, node, reason, cost and duration):

- infrastructure failures — the runner is unreachable or has no capacity (``TransientError`` from provisioning
  or submit), the job ended ``FAILED(infra)`` (killed, out of memory, timed out, heartbeat lost) or was cancelled
  by the other side (preempted) — go on to the next entry, which resumes from the newest checkpoint the failed
  runner left (``checkpoint_dir(job_id)`` → ``spec.checkpoint.resume_from``);
- user failures (``FAILED(user)``: the spec, data or family code is wrong) stop the chain after
  ``max_user_retries`` more tries on the same runner;
- results from every runner except ``local`` are untrusted: they are staged beside the destination and checked
  (:func:`gpu_jobs.verify.verify_result`: artifact hashes, local hold-out evaluation of a trained model, local
  re-scoring of a random sample of vehicles for inference) before they are moved into place. A result that does
  not verify is recorded as ``FAILED(verify)``, its runner/node is blocked for the rest of the run, and the next
  entry runs the job.
- with any untrusted entry, the run's inputs are minimised and pseudonymised first (:mod:`gpu_jobs.minimise`:
  the family's columns only, no location, keyed-hash vehicle ids), scores are mapped back to the real ids after
  verification, and an untrusted runner is asked to delete the job's data (``purge``) once its results are here.

The whole run is bounded by ``max_total_s``; a runner that cannot be reached fails within its connect timeout.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from depin_core import paths
from depin_core.errors import ConfigError, DepinError, TransientError
from depin_core.tls import check_url
from gpu_jobs.errors import FailureKind, JobNotFinished
from gpu_jobs.local import LocalRunner
from gpu_jobs.minimise import Pseudonyms, prepare, restore_outputs
from gpu_jobs.providers import Bootstrap, make_provider, new_agent_token, pick_offer, worker_name
from gpu_jobs.providers.base import Provider
from gpu_jobs.providers.manual import ManualProvider, Node
from gpu_jobs.remote import AgentRunner
from gpu_jobs.runner import JobRunner, JobStatus
from gpu_jobs.settings import AGENT_FINGERPRINT_ENV, AGENT_TOKEN_ENV, PROVIDER_KEYS, GpuJobsSettings
from gpu_jobs.spec import JobResult, JobSpec, JobState, Outputs
from gpu_jobs.verify import Verification, Verifier, verify_result

LogSink = Callable[[str], None]
StatusSink = Callable[[str, JobStatus], None]  # (chain entry, status)

PROVIDERS = ("vast", "ionet", "gpunet", "manual")
DEFAULT_NODES_FILE = paths.NODES_FILE
_CKPT = re.compile(r"^ckpt-(\d{9})\.json$")
_FIX = (
    "use local, agent:<http(s)://host:port>, node:<registered name>, vast, ionet, gpunet or manual "
    "(e.g. --runner agent:http://10.0.0.5:8900 --runner local)"
)


# ------------------------------------------------------------------------------------------------ entries


@dataclass(frozen=True)
class Entry:
    """One parsed chain entry: ``kind`` is local | agent | node | provider; ``arg`` the URL / name / provider."""

    text: str
    kind: str
    arg: str | None = None

    @property
    def trusted(self) -> bool:
        return self.kind == "local"


def parse_entry(text: str) -> Entry:
    """Parse a chain entry; ``ConfigError`` naming the entry and the accepted forms when it is not one."""
    t = text.strip()
    if t == "local":
        return Entry(t, "local")
    if t in PROVIDERS:
        return Entry(t, "provider", t)
    kind, sep, arg = t.partition(":")
    if sep and kind == "agent":
        if not arg.startswith(("http://", "https://")) or len(arg) <= len("https://"):
            raise ConfigError(f"runner {text!r}: the agent URL must start with http:// or https://; {_FIX}")
        return Entry(t, "agent", arg.rstrip("/"))
    if sep and kind == "node":
        if not arg:
            raise ConfigError(f"runner {text!r}: name the registered node (depin worker list); {_FIX}")
        return Entry(t, "node", arg)
    raise ConfigError(f"runner {text!r}: unknown runner; {_FIX}")


# ------------------------------------------------------------------------------------------------ records


class ChainAttempt(BaseModel):
    """One try of the job on one chain entry."""

    model_config = ConfigDict(extra="forbid")

    attempt: int
    runner: str  # the chain entry as written
    node: str | None = None
    job_id: str
    state: JobState
    failure: FailureKind | None = None
    reason: str | None = None
    cost_usd: float | None = None  # offer price × lease time (None: no price known, e.g. local)
    seconds: float
    resumed_from_step: int | None = None
    verified: bool | None = None  # None: trusted runner (local) or the job did not succeed there
    verification: str | None = None  # what was checked


class ChainResult(BaseModel):
    """The final job result, the entry that produced it (None when every entry failed), every attempt."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    result: JobResult
    runner: str | None
    attempts: list[ChainAttempt] = Field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.result.state == JobState.SUCCEEDED


# ------------------------------------------------------------------------------------------------- leases


class ChainRunner(JobRunner, Protocol):
    """A ``JobRunner`` that takes the chain's job id. The chain also uses ``checkpoint_dir(job_id)`` (to resume
    elsewhere) and ``purge(job_id)`` (untrusted runners) where a runner has them."""

    def submit(self, spec: JobSpec, *, job_id: str | None = None) -> str:
        """Queue the job under ``job_id`` (a new id when None) and return the id."""
        ...


@dataclass
class Lease:
    """A runner ready to take the job, and what the chain needs to know about where it runs."""

    runner: ChainRunner
    node: str | None = None
    usd_per_hour: float | None = None
    block_key: tuple[str, str] | None = None  # (runner/provider, host): blocked after a failed verification


class RunnerFactory(Protocol):
    """Turns chain entries into runners."""

    def check(self, entry: Entry) -> None:
        """Raise ``ConfigError`` now if ``entry`` cannot work (no token, no API key, unknown node)."""
        ...

    def lease(
        self, entry: Entry, *, spec: JobSpec, job_id: str, attempt: int, blocked: set[tuple[str, str]]
    ) -> AbstractContextManager[Lease]:
        """A runner for ``entry`` for one attempt; everything it rented is released on exit, always."""
        ...


def new_job_id(spec: JobSpec) -> str:
    """A job id in the runners' format: ``<spec_hash[:12]>-<8 hex>``."""
    return f"{spec.spec_hash[:12]}-{secrets.token_hex(4)}"


# --------------------------------------------------------------------------------------------------- chain


@dataclass
class _Run:
    spec: JobSpec
    factory: RunnerFactory
    verifier: Verifier | None
    work: Path
    max_user_retries: int
    deadline: float | None
    on_log: LogSink | None
    on_status: StatusSink | None
    poll_s: float
    stall_s: float
    attempt_grace_s: float
    job_id: str = ""
    blocked: set[tuple[str, str]] = field(default_factory=set)
    attempts: list[ChainAttempt] = field(default_factory=list)
    resume: Path | None = None
    resume_step: int | None = None

    def log(self, message: str) -> None:
        if self.on_log is not None:
            self.on_log(f"chain: {message}")


def run_chain(
    spec: JobSpec,
    entries: Sequence[str],
    *,
    factory: RunnerFactory | None = None,
    jobs_dir: Path | str | None = None,
    verify: bool | Verifier = True,
    max_user_retries: int = 0,
    max_total_s: float | None = None,
    on_log: LogSink | None = None,
    on_status: StatusSink | None = None,
    poll_s: float = 0.2,
    stall_s: float = 60.0,
    attempt_grace_s: float = 300.0,
    pseudonym_key: Path | str | None = None,
) -> ChainResult:
    """Run ``spec`` on the first entry of ``entries`` that completes it (see the module doc).

    ``factory`` defaults to :class:`DefaultRunnerFactory` over ``jobs_dir`` (default
    :data:`depin_core.paths.JOBS_DIR`).
    ``verify``: True → :func:`gpu_jobs.verify.verify_result` for untrusted runners; False → no verification;
    a callable → that verifier. ``max_total_s`` bounds the whole run (default: no bound beyond each attempt's
    ``limits.max_wall_s`` + ``attempt_grace_s``). ``stall_s``: how long a runner may stay unanswerable while
    the job runs before the attempt counts as lost. With an untrusted entry the whole run uses minimised
    inputs (:mod:`gpu_jobs.minimise`; ``pseudonym_key``, default ``<jobs_dir>/../keys/pseudonym.key``) and
    scored outputs and a trained model's vehicle lists are mapped back to the real ``token_id``s after
    verification. Returns the final result,
    never raises for job failures; ``ConfigError`` for entries that cannot work.
    """
    if not entries:
        raise ConfigError("runners: the chain is empty; give at least one runner, e.g. local")
    if max_user_retries < 0:
        raise ConfigError("max_user_retries must be ≥ 0")
    parsed = [parse_entry(e) for e in entries]
    root = Path(jobs_dir or paths.JOBS_DIR)
    factory = factory or DefaultRunnerFactory(root)
    for e in parsed:
        factory.check(e)
    prepared = None
    # with an untrusted entry, the whole run (one spec_hash) uses minimised, pseudonymised inputs
    if any(not e.trusted for e in parsed):
        key = Path(pseudonym_key) if pseudonym_key else root.parent / "keys" / "pseudonym.key"
        prepared = prepare(spec, root / "chain" / f"data-{secrets.token_hex(4)}", Pseudonyms.from_file(key))
        spec = prepared.spec
    if verify is True:
        verifier: Verifier | None = verify_result
    else:
        verifier = verify or None
    run = _Run(
        spec=spec,
        factory=factory,
        verifier=verifier,
        work=root / "chain",
        max_user_retries=max_user_retries,
        deadline=None if max_total_s is None else time.monotonic() + max_total_s,
        on_log=on_log,
        on_status=on_status,
        poll_s=poll_s,
        stall_s=stall_s,
        attempt_grace_s=attempt_grace_s,
        job_id=new_job_id(spec),
    )
    if prepared is not None:  # the lineage from the user's data to what the runners (and the artifact) see
        for i, (raw, sent) in enumerate(zip(prepared.original.inputs, prepared.sent, strict=True)):
            if sent is None:
                run.log(f"input {i} ({raw.role}) kept here: {spec.model.family} reads no {raw.role}")
            elif raw.sha256 != sent.sha256:
                run.log(
                    f"input {i} ({raw.role}) minimised for untrusted runners: sha256 {raw.sha256[:16]}… → "
                    f"{sent.sha256[:16]}… (vehicle ids pseudonymised; columns left here: "
                    f"{sorted({c for cols in prepared.dropped.values() for c in cols}) or 'none'})"
                )
    try:
        out = _run_entries(run, parsed, max_total_s)
        if prepared is not None and out.result.state == JobState.SUCCEEDED:
            restored = restore_outputs(out.result.artifacts, prepared)  # pseudonyms → token_ids, locally
            out = out.model_copy(update={"result": out.result.model_copy(update={"artifacts": restored})})
        return out
    finally:  # the chain's checkpoint copies: the runners that used them hold their own
        for jid in {a.job_id for a in run.attempts}:
            shutil.rmtree(run.work / jid, ignore_errors=True)
        if prepared is not None:
            prepared.cleanup()


def _run_entries(run: _Run, parsed: list[Entry], max_total_s: float | None) -> ChainResult:
    spec = run.spec
    last: JobResult | None = None
    for i, entry in enumerate(parsed):
        user_retries = 0
        while True:
            if run.deadline is not None and time.monotonic() >= run.deadline:
                return _give_up(run, last, f"the chain ran out of time (max_total_s={max_total_s:g})")
            result = _attempt(run, entry)
            last = result
            if result.state == JobState.SUCCEEDED:
                return ChainResult(job_id=run.job_id, result=result, runner=entry.text, attempts=run.attempts)
            if result.failure == FailureKind.USER:
                if user_retries < run.max_user_retries:
                    user_retries += 1
                    run.job_id = new_job_id(spec)  # a failed job id is final on its runner
                    run.log(f"{entry.text}: user failure, retry {user_retries}/{run.max_user_retries}")
                    continue
                return ChainResult(job_id=run.job_id, result=result, runner=None, attempts=run.attempts)
            if run.deadline is not None and time.monotonic() >= run.deadline:
                return _give_up(run, last, f"the chain ran out of time (max_total_s={max_total_s:g})")
            if i + 1 < len(parsed):
                nxt = parsed[i + 1].text
                how = f" (resuming from step {run.resume_step})" if run.resume is not None else ""
                run.log(f"{entry.text} failed ({_short(result.error)}); trying {nxt}{how}")
            break
    return _give_up(run, last, "every runner of the chain failed")


def _give_up(run: _Run, last: JobResult | None, why: str) -> ChainResult:
    reasons = " | ".join(f"{a.runner}: {a.reason}" for a in run.attempts if a.state != JobState.SUCCEEDED)
    failure = last.failure if last is not None and last.failure else FailureKind.INFRA
    base = last or JobResult(job_id=run.job_id, spec_hash=run.spec.spec_hash, state=JobState.FAILED)
    result = base.model_copy(
        update={"state": JobState.FAILED, "failure": failure, "artifacts": {}, "error": f"{why}: {reasons}"}
    )
    return ChainResult(job_id=run.job_id, result=result, runner=None, attempts=run.attempts)


def _short(text: str | None, n: int = 300) -> str:
    lines = (text or "").strip().splitlines()
    return (lines[-1] if lines else "no reason given")[:n]


def _attempt(run: _Run, entry: Entry) -> JobResult:
    """One attempt on one entry: lease → submit → wait → harvest checkpoints → verify → promote outputs."""
    spec, n = run.spec, len(run.attempts) + 1
    started = time.monotonic()
    rec: dict[str, Any] = {"attempt": n, "runner": entry.text, "job_id": run.job_id}
    if run.resume_step is not None:
        rec["resumed_from_step"] = run.resume_step
    lease: Lease | None = None
    result: JobResult | None = None
    staging: Path | None = None
    trusted_resume = (run.resume, run.resume_step)
    try:
        with run.factory.lease(entry, spec=spec, job_id=run.job_id, attempt=n, blocked=run.blocked) as lease:
            rec["node"] = lease.node
            if _is_blocked(run, entry, lease):
                raise _Blocked(
                    f"{entry.text} ({lease.node}) is blocked for this run after a failed verification"
                )
            att_spec = _attempt_spec(run, entry)
            if not entry.trusted:
                staging = Path(att_spec.outputs.dir)
            run.log(f"attempt {n}: {entry.text}" + (f" on {lease.node}" if lease.node else ""))
            jid, submitted = run.job_id, False
            try:
                jid = rec["job_id"] = _submit(lease.runner, att_spec, run.job_id)
                submitted = True
                rec["node"] = rec.get("node") or getattr(lease.runner, "node", None)
                result = _wait(run, entry, lease.runner, att_spec, jid)
            finally:
                _harvest(run, lease.runner, jid, n)
                if submitted and not entry.trusted:
                    _purge(run, entry, lease.runner, jid)
    except _Blocked as e:
        result = _failed(run, FailureKind.INFRA, str(e))
    except ConfigError:
        raise
    except (TransientError, JobNotFinished) as e:
        result = _failed(run, FailureKind.INFRA, f"{type(e).__name__}: {e}")
    except (
        DepinError
    ) as e:  # PermanentError that is not the user's spec (e.g. a wrong agent token): next entry
        result = _failed(run, FailureKind.INFRA, f"{type(e).__name__}: {e}")
    except OSError as e:
        result = _failed(run, FailureKind.INFRA, f"{type(e).__name__}: {e}")
    assert result is not None
    seconds = time.monotonic() - started
    if lease is not None and result.attempts:
        rec["node"] = rec.get("node") or result.attempts[-1].node
    if result.state == JobState.SUCCEEDED and not entry.trusted and run.verifier is not None:
        assert staging is not None
        check = _verify(run, result, Path(staging))
        rec["verified"], rec["verification"] = check.ok, check.detail
        if not check.ok:
            result = result.model_copy(
                update={
                    "state": JobState.FAILED,
                    "failure": FailureKind.VERIFY,
                    "artifacts": {},
                    "error": f"verification failed: {check.detail}",
                }
            )
    if result.failure == FailureKind.VERIFY:  # ours, or the runner's own check (artifact sha256s)
        rec["verified"] = False
        rec.setdefault("verification", "the runner's artifact check")
        key = lease.block_key if lease is not None else None
        for k in (key, ("entry", entry.text)):  # not the node's self-reported name: a node can pick any
            if k is not None:
                run.blocked.add(k)
        run.log(f"{entry.text}: {_short(result.error)}; {entry.text} is blocked for this run")
        run.resume, run.resume_step = trusted_resume  # nor do we resume from its checkpoints
    if result.state == JobState.SUCCEEDED and staging is not None:
        result = _promote(result, staging, Path(spec.outputs.dir))
    elif staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    infra = result.state == JobState.FAILED and result.failure == FailureKind.INFRA
    if infra and entry.kind == "provider" and lease is not None and lease.block_key is not None:
        run.blocked.add(lease.block_key)  # a rented host that failed is not rented again in this run
    usd = lease.usd_per_hour if lease is not None else None
    run.attempts.append(
        ChainAttempt(
            **rec,
            state=result.state,
            failure=result.failure,
            reason=None if result.state == JobState.SUCCEEDED else _short(result.error, 500),
            cost_usd=None if usd is None else round(usd * seconds / 3600.0, 6),
            seconds=round(seconds, 3),
        )
    )
    return result


class _Blocked(DepinError):
    pass


def _is_blocked(run: _Run, entry: Entry, lease: Lease) -> bool:
    keys = [("entry", entry.text), lease.block_key]
    return any(k is not None and k in run.blocked for k in keys)


def _failed(run: _Run, kind: FailureKind, reason: str) -> JobResult:
    return JobResult(
        job_id=run.job_id, spec_hash=run.spec.spec_hash, state=JobState.FAILED, failure=kind, error=reason
    )


def _attempt_spec(run: _Run, entry: Entry) -> JobSpec:
    """The spec this attempt runs: resuming from the last checkpoint, outputs staged when untrusted."""
    spec = run.spec
    update: dict[str, Any] = {}
    if run.resume is not None:
        update["checkpoint"] = spec.checkpoint.model_copy(update={"resume_from": str(run.resume)})
    if not entry.trusted:
        dest = Path(spec.outputs.dir)
        staging = dest.parent / f".{dest.name}.{run.job_id}-{len(run.attempts) + 1}.verify"
        shutil.rmtree(staging, ignore_errors=True)
        update["outputs"] = Outputs(dir=str(staging))
    return spec.model_copy(update=update) if update else spec


def _submit(runner: ChainRunner, spec: JobSpec, job_id: str) -> str:
    """Submit under the chain's job id; the id the runner answers with."""
    got = str(runner.submit(spec, job_id=job_id))
    if got != job_id:
        raise TransientError(
            f"runner {getattr(runner, 'name', '?')} answered with job id {got}, not {job_id}"
        )
    return got


def _wait(run: _Run, entry: Entry, runner: ChainRunner, spec: JobSpec, job_id: str) -> JobResult:
    """Poll until terminal, streaming log lines to ``on_log``; cancel on the chain's deadline."""
    offset = 0
    limit = time.monotonic() + spec.limits.max_wall_s + run.attempt_grace_s
    if run.deadline is not None:
        limit = min(limit, run.deadline)
    unanswered: float | None = None
    while True:
        try:
            status = runner.status(job_id)
            text, offset = runner.logs(job_id, offset)
            unanswered = None
        except TransientError as e:
            unanswered = unanswered or time.monotonic()
            if time.monotonic() - unanswered > run.stall_s:
                raise TransientError(f"{entry.text} did not answer for {run.stall_s:g} s: {e}") from e
            time.sleep(run.poll_s)
            continue
        if run.on_log is not None:
            for line in text.splitlines():
                run.on_log(line)
        if run.on_status is not None:
            run.on_status(entry.text, status)
        if status.state.terminal:
            break
        if time.monotonic() > limit:
            with contextlib.suppress(DepinError):
                runner.cancel(job_id)
            raise TransientError(
                f"{entry.text}: job {job_id} still {status.state.value} at the deadline; cancelled it"
            )
        time.sleep(run.poll_s)
    remaining = None if run.deadline is None else max(run.deadline - time.monotonic(), 1.0)
    result: JobResult = runner.result(job_id, timeout=remaining)
    if result.state == JobState.CANCELLED:  # we never cancel a job we still wait for: the node stopped it
        result = result.model_copy(
            update={
                "state": JobState.FAILED,
                "failure": FailureKind.INFRA,
                "error": f"cancelled on the runner's side (preempted or stopped): {result.error or ''}",
            }
        )
    return result


def newest_checkpoint(directory: Path | None) -> int | None:
    """The step of the newest complete checkpoint pair in ``directory`` (None when there is none)."""
    if directory is None or not directory.is_dir():
        return None
    steps = [
        int(m.group(1))
        for p in directory.iterdir()
        if (m := _CKPT.match(p.name)) and p.with_suffix(".safetensors").is_file()
    ]
    return max(steps) if steps else None


def _harvest(run: _Run, runner: ChainRunner, job_id: str, attempt: int) -> None:
    """Copy the runner's newest checkpoint pair (if newer than the one we hold) into the chain's work dir."""
    get = getattr(runner, "checkpoint_dir", None)
    try:
        src = get(job_id) if callable(get) else None
    except DepinError:
        return
    step = newest_checkpoint(Path(src) if src else None)
    if step is None or (run.resume_step is not None and step <= run.resume_step):
        return
    assert src is not None
    dest = run.work / run.job_id / f"resume-{attempt}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        name = f"ckpt-{step:09d}{suffix}"
        shutil.copy2(Path(src) / name, dest / name)
    run.resume, run.resume_step = dest.resolve(), step


def _purge(run: _Run, entry: Entry, runner: ChainRunner, job_id: str) -> None:
    """Have an untrusted runner delete the job's data (inputs, checkpoints, outputs) once its results are here."""
    purge = getattr(runner, "purge", None)
    if not callable(purge):
        return
    try:
        removed = purge(job_id)
        run.log(f"{entry.text}: removed {len(removed)} item(s) of job {job_id} from the node")
    except DepinError as e:  # still running (a lost job) or unreachable: the node is destroyed or distrusted
        run.log(f"{entry.text}: could not remove job {job_id}'s data from the node: {_short(str(e))}")


def _verify(run: _Run, result: JobResult, staging: Path) -> Verification:
    assert run.verifier is not None
    spec = run.spec.model_copy(update={"outputs": Outputs(dir=str(staging))})
    try:
        return run.verifier(spec, result)
    except ConfigError as e:
        return Verification(False, f"cannot verify: {e}")
    except Exception as e:  # a result that makes the verifier fail is not verified
        return Verification(False, f"verification error {type(e).__name__}: {e}")


def _promote(result: JobResult, staging: Path, dest: Path) -> JobResult:
    """Move the verified outputs from ``staging`` into ``dest`` (replacing an older artifact there)."""
    staging, dest = staging.resolve(), dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    old: Path | None = None
    if dest.exists():
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(3)}")
            dest.rename(old)
    staging.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    artifacts = {}
    for path, digest in result.artifacts.items():
        p = Path(path)
        artifacts[str(dest / p.relative_to(staging)) if p.is_relative_to(staging) else path] = digest
    return result.model_copy(update={"artifacts": artifacts})


# ------------------------------------------------------------------------------------------ default factory


class DefaultRunnerFactory:
    """Real runners for the chain entries: ``LocalRunner`` under ``jobs_dir``, ``AgentRunner`` for agents and
    registered nodes, marketplace providers (``gpu_jobs.providers``) for ``vast``/``ionet``/``gpunet``.

    Every agent is reached over HTTPS with its certificate pinned: a registered node's (``depin worker register
    --fingerprint``), a rented node's (made here per node), or for an ``agent:URL`` not registered the
    fingerprint in ``DEPIN_AGENT_TLS_FINGERPRINT``; plain ``http://`` only to loopback.

    ``env`` (default ``os.environ``, read through :class:`gpu_jobs.settings.GpuJobsSettings`) supplies
    ``DEPIN_AGENT_TOKEN``, ``DEPIN_VAST_API_KEY``, ``DEPIN_IONET_API_KEY`` and the base-URL overrides
    ``DEPIN_VAST_URL``, ``DEPIN_IONET_URL``; or pass ``settings``. ``providers``
    injects provider objects by name (tests); ``local_env`` is passed to the local worker processes.
    """

    def __init__(
        self,
        jobs_dir: Path | str,
        *,
        env: Mapping[str, str] | None = None,
        settings: GpuJobsSettings | None = None,
        nodes_file: Path | str | None = None,
        providers: Mapping[str, Provider] | None = None,
        local_env: Mapping[str, str] | None = None,
        max_usd_per_hour: float | None = None,
        provision_timeout_s: float = 600.0,
        heartbeat_timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        bootstrap_package: str | None = None,
        provider_poll_s: float | None = None,
    ) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.settings = settings if settings is not None else GpuJobsSettings.from_env(env)
        self.nodes_file = Path(nodes_file) if nodes_file is not None else DEFAULT_NODES_FILE
        self.providers = dict(providers or {})
        self.local_env = dict(local_env or {})
        self.max_usd_per_hour = max_usd_per_hour
        self.provision_timeout_s = provision_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.bootstrap_package = bootstrap_package
        self.provider_poll_s = provider_poll_s

    # --- RunnerFactory ---------------------------------------------------------------------------------------
    def check(self, entry: Entry) -> None:
        if entry.kind == "agent":
            self._agent_token(entry)
            self._check_agent_url(entry)
        elif entry.kind == "node":
            self._node(entry)
        elif entry.kind == "provider" and entry.arg not in self.providers:
            key = PROVIDER_KEYS.get(entry.arg or "")
            if key is not None and self.settings.provider_key(entry.arg or "") is None:
                raise ConfigError(f"runner {entry.text!r}: set {key} to your {entry.arg} API key")

    @contextlib.contextmanager
    def lease(
        self, entry: Entry, *, spec: JobSpec, job_id: str, attempt: int, blocked: set[tuple[str, str]]
    ) -> Iterator[Lease]:
        if entry.kind == "local":
            with LocalRunner(self.jobs_dir, env=self.local_env) as runner:
                yield Lease(runner, node=_hostname())
        elif entry.kind == "agent":
            assert entry.arg is not None
            token = self._agent_token(entry)
            cert, fp = self._agent_pin(entry)
            with self._agent(entry, entry.arg, token, tls_cert=cert, tls_fingerprint=fp) as runner:
                yield Lease(runner, node=getattr(runner, "node", None), block_key=("agent", entry.arg))
        elif entry.kind == "node":
            node = self._node(entry)
            pin = {"tls_cert": node.tls_cert, "tls_fingerprint": node.tls_fingerprint}
            with self._agent(entry, node.url, _secret(node.token), **pin) as runner:
                yield Lease(
                    runner, node=node.name, usd_per_hour=node.usd_per_hour, block_key=("agent", node.url)
                )
        else:
            with self._rent(entry, spec=spec, job_id=job_id, attempt=attempt, blocked=blocked) as lease:
                yield lease

    # --- internals -------------------------------------------------------------------------------------------
    def _agent(
        self,
        entry: Entry,
        url: str,
        token: SecretStr,
        *,
        tls_cert: str | None = None,
        tls_fingerprint: str | None = None,
    ) -> AgentRunner:
        try:
            return AgentRunner(
                url,
                token,
                workdir_root=self.jobs_dir / "remote",
                name=entry.text,
                heartbeat_timeout_s=self.heartbeat_timeout_s,
                connect_timeout_s=self.connect_timeout_s,
                tls_cert=tls_cert,
                tls_fingerprint=tls_fingerprint,
            )
        except ConfigError as e:
            raise ConfigError(f"runner {entry.text!r}: {e}") from e

    def _agent_pin(self, entry: Entry) -> tuple[str | None, str | None]:
        """``(certificate, fingerprint)`` pinning an ``agent:URL``: its registered node's, else
        ``DEPIN_AGENT_TLS_FINGERPRINT``."""
        assert entry.arg is not None
        node = self._nodes().by_url(entry.arg) if self.nodes_file.is_file() else None
        if node is not None:
            return node.tls_cert, node.tls_fingerprint
        return None, self.settings.agent_tls_fingerprint or None

    def _nodes(self) -> ManualProvider:
        return ManualProvider(self.nodes_file)

    def _check_agent_url(self, entry: Entry) -> None:
        """Before any connection: plain http only to loopback; an https agent needs a pin."""
        assert entry.arg is not None
        check_url(entry.arg, f"runner {entry.text!r}")
        cert, fp = self._agent_pin(entry)
        if entry.arg.startswith("https://") and not (cert or fp):
            raise ConfigError(
                f"runner {entry.text!r}: no pinned certificate for this agent; register it (depin worker "
                f"register NAME --url … --fingerprint …) or set {AGENT_FINGERPRINT_ENV}"
            )

    def _agent_token(self, entry: Entry) -> SecretStr:
        assert entry.arg is not None
        node = self._nodes().by_url(entry.arg) if self.nodes_file.is_file() else None
        if node is not None:
            return _secret(node.token)
        token = self.settings.agent_token
        if token is None or not token.get_secret_value():
            raise ConfigError(
                f"runner {entry.text!r}: no token for this agent; register it (depin worker register) or set "
                f"{AGENT_TOKEN_ENV}"
            )
        return token

    def _node(self, entry: Entry) -> Node:
        assert entry.arg is not None
        try:
            return self._nodes().get(entry.arg)
        except ConfigError as e:
            raise ConfigError(f"runner {entry.text!r}: {e} (nodes file {self.nodes_file})") from e

    def _provider(self, name: str) -> Provider:
        if name in self.providers:
            return self.providers[name]
        return make_provider(
            name, nodes_file=self.nodes_file, settings=self.settings, poll_s=self.provider_poll_s
        )

    @contextlib.contextmanager
    def _rent(
        self, entry: Entry, *, spec: JobSpec, job_id: str, attempt: int, blocked: set[tuple[str, str]]
    ) -> Iterator[Lease]:
        """quote → cheapest fitting offer → launch → wait_ready → AgentRunner; destroy in ``finally``, always."""
        assert entry.arg is not None
        provider = self._provider(entry.arg)
        offer = pick_offer(provider, spec, max_usd_per_hour=self.max_usd_per_hour, blocked=blocked)
        name = worker_name(job_id, attempt)
        boot: dict[str, Any] = {"token": new_agent_token()}
        if self.bootstrap_package:
            boot["package"] = self.bootstrap_package
        worker = None
        try:
            worker = provider.launch(offer, Bootstrap(**boot), name=name)
            worker = provider.wait_ready(worker, timeout_s=self.provision_timeout_s)
            with self._agent(entry, worker.url, worker.token, tls_cert=worker.tls_cert) as runner:
                yield Lease(
                    runner,
                    node=offer.host or worker.instance_id,
                    usd_per_hour=offer.usd_per_hour,
                    block_key=offer.block_key,
                )
        finally:
            if worker is not None:
                provider.destroy(worker)
            else:
                _destroy_by_name(provider, name)


def _destroy_by_name(provider: Provider, name: str) -> None:
    """After a failed launch: destroy whatever instance carries our name (launch may have half-succeeded)."""
    with contextlib.suppress(Exception):
        for inst in provider.instances():
            if inst.name == name:
                provider.destroy(inst)


def _secret(value: Any) -> SecretStr:
    return value if isinstance(value, SecretStr) else SecretStr(str(value))


def _hostname() -> str:
    import socket

    return socket.gethostname()
