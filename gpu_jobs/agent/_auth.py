"""The agent's bearer tokens: one admin token (kept only as its sha256) and per-job tokens minted by the admin.

A job token grants the blob routes, ``POST /v1/jobs`` for its job id and every ``/v1/jobs/{its id}/…`` route;
it expires after its ``ttl_s``, and is revoked when the job's data is deleted. Only sha256 digests are kept (in memory and in ``tokens.json``, mode 0600),
and every comparison is ``hmac.compare_digest`` over all stored digests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from gpu_jobs.errors import AgentTokenError
from gpu_jobs.settings import AGENT_TOKEN_ENV, GpuJobsSettings

TOKEN_ENV = AGENT_TOKEN_ENV
MIN_TOKEN_LEN = 16
JOB_TOKEN_PREFIX = "djt_"  # "depin job token": easy to recognise and grep for when leaked
_PRUNE_AFTER_S = 86400.0  # expired tokens are remembered a day (so they answer "expired", not "invalid")


def token_digest(token: str) -> str:
    """The sha256 hex digest stored for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_admin_token(token_file: Path | str | None = None, *, environ: dict[str, str] | None = None) -> str:
    """The admin token: ``token_file`` (first line) if given, else ``$DEPIN_AGENT_TOKEN``; ``ConfigError`` when
    missing or shorter than 16 characters. The caller keeps only its digest."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"--token-file {token_file}: cannot read it ({exc.strerror}); fix the path"
            ) from None
        where = f"--token-file {token_file}"
    else:
        secret = GpuJobsSettings.from_env(environ).agent_token
        token = secret.get_secret_value().strip() if secret is not None else ""
        where = TOKEN_ENV
    if not token:
        raise ConfigError(
            f"no agent token: set {TOKEN_ENV} or pass --token-file FILE (a random secret of ≥ {MIN_TOKEN_LEN} "
            "characters, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    if len(token) < MIN_TOKEN_LEN:
        raise ConfigError(
            f"{where}: the agent token must have at least {MIN_TOKEN_LEN} characters; use a longer one"
        )
    return token


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin (``job_id`` None) or the holder of a token for one job."""

    admin: bool
    job_id: str | None = None

    def may_access(self, job_id: str) -> bool:
        return self.admin or self.job_id == job_id


@dataclass(frozen=True)
class _JobToken:
    digest: str
    job_id: str
    expires_at: float  # unix time
    revoked: bool = False  # the job's data was deleted


class TokenStore:
    """The admin digest plus the minted job tokens (persisted as digests in ``path`` when given)."""

    def __init__(self, admin_digest: str, path: Path | None = None) -> None:
        self._admin = admin_digest.encode("ascii")
        self._path = path
        self._lock = threading.Lock()
        self._jobs: list[_JobToken] = self._load()

    def _load(self) -> list[_JobToken]:
        if self._path is None or not self._path.is_file():
            return []
        try:
            rows = json.loads(self._path.read_bytes())
            return [
                _JobToken(r["digest"], r["job_id"], float(r["expires_at"]), bool(r.get("revoked")))
                for r in rows
            ]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # a damaged file only loses the job tokens; the admin can mint new ones

    def _save(self) -> None:
        if self._path is None:
            return
        rows = [
            {"digest": t.digest, "job_id": t.job_id, "expires_at": t.expires_at, "revoked": t.revoked}
            for t in self._jobs
        ]
        atomic_write_bytes(self._path, json.dumps(rows).encode())
        os.chmod(self._path, 0o600)

    def mint(self, job_id: str, ttl_s: float) -> tuple[str, float]:
        """A new token for ``job_id`` valid for ``ttl_s`` seconds: ``(token, expires_at unix time)``."""
        token = JOB_TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        expires = now + ttl_s
        with self._lock:
            self._jobs = [t for t in self._jobs if t.expires_at + _PRUNE_AFTER_S > now]
            self._jobs.append(_JobToken(token_digest(token), job_id, expires))
            self._save()
        return token, expires

    def revoke(self, job_id: str) -> int:
        """Revoke every token of ``job_id`` (its data is gone); how many were live."""
        with self._lock:
            live = [t for t in self._jobs if t.job_id == job_id and not t.revoked]
            if live:
                self._jobs = [
                    _JobToken(t.digest, t.job_id, t.expires_at, True) if t.job_id == job_id else t
                    for t in self._jobs
                ]
                self._save()
        return len(live)

    def check(self, authorization: str | None) -> Principal:
        """The caller behind an ``Authorization: Bearer …`` header, or ``AgentTokenError(401)``."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AgentTokenError(
                401, "missing bearer token; send 'Authorization: Bearer <agent or job token>'"
            )
        digest = token_digest(token).encode("ascii")
        admin = hmac.compare_digest(digest, self._admin)
        match: _JobToken | None = None
        with self._lock:
            for t in self._jobs:  # every digest is compared: timing does not tell which one matched
                if hmac.compare_digest(digest, t.digest.encode("ascii")):
                    match = t
        if admin:
            return Principal(admin=True)
        if match is None:
            raise AgentTokenError(
                401, "invalid token; use the agent's token (DEPIN_AGENT_TOKEN) or a job token"
            )
        if match.revoked:
            raise AgentTokenError(
                401, f"the job token for {match.job_id} was revoked: the job's data was deleted on this agent"
            )
        if match.expires_at <= time.time():
            raise AgentTokenError(
                401, f"the job token for {match.job_id} has expired; mint a new one (POST /v1/tokens)"
            )
        return Principal(admin=False, job_id=match.job_id)
