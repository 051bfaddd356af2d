"""A function registry on object storage, shared by several gateways: immutable bundles plus an append-only
log of registry snapshots whose keys are created only once.

Layout under ``s3://bucket/prefix``::

    bundles/<name>/<version>/<sha256>.tar   a packed, signed bundle, named by the sha256 of its bytes
                                             (written once; a reader checks the bytes against the name)
    log/<revision:020d>.json                 the whole registry after change ``revision`` (1, 2, …): per
                                             function its versions ({version: {sha256, bytes}}), aliases,
                                             alias history and the revision each version was added at
    HEAD.json                                {"revision": n}: a hint for cold readers (may lag; never trusted)

A writer uploads the bundle first, then reads the newest snapshot ``n``, applies its change and creates
``log/<n+1>.json`` with ``If-None-Match: *``. Exactly one writer can create a key, so concurrent changes made
through different gateways never overwrite each other: the loser re-reads snapshot ``n+1`` and retries on top
of it. A snapshot names only bundles that were complete before it was written, so a reader never sees a
version whose bytes are not all there. The alias rules (``latest`` moves to each new version, history,
rollback, weighted splits) are those of ``serving.registry.Registry``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from depin_core.errors import PermanentError, TransientError
from serving.errors import NotFound
from serving.object_store import ObjectStore
from serving.registry import LATEST, NAME_RE, VERSION_RE, Registry, Target, _State, valid_alias

log = logging.getLogger(__name__)

FORMAT = "depin-registry/1"
LOG_DIR = "log/"
HEAD_KEY = "HEAD.json"
_LOG_KEY = re.compile(r"log/(\d{20})\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
COMMIT_ATTEMPTS = 50

T = TypeVar("T")


def log_key(revision: int) -> str:
    """The key of snapshot ``revision``."""
    return f"{LOG_DIR}{revision:020d}.json"


def bundle_key(name: str, version: str, sha256: str) -> str:
    """The key of the bundle of ``name``@``version`` whose packed bytes hash to ``sha256``."""
    return f"bundles/{name}/{version}/{sha256}.tar"


@dataclasses.dataclass
class FunctionState:
    """One function in a snapshot: its bundles (``{version: {"sha256", "bytes"}}``) and alias state."""

    bundles: dict[str, dict[str, Any]]
    state: _State

    def to_json(self) -> dict[str, Any]:
        s = self.state
        return {"bundles": self.bundles, "aliases": s.aliases, "history": s.history, "added": s.added}


@dataclasses.dataclass
class Snapshot:
    """The whole shared registry after change ``revision`` (0 = empty, nothing written yet)."""

    revision: int
    functions: dict[str, FunctionState]

    def require(self, name: str) -> FunctionState:
        fn = self.functions.get(name)
        if fn is None:
            raise NotFound("function", name, sorted(self.functions))
        return fn

    def to_bytes(self, change: str) -> bytes:
        body = {
            "format": FORMAT,
            "revision": self.revision,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "writer": f"{socket.gethostname()}:{os.getpid()}",
            "change": change,
            "functions": {n: f.to_json() for n, f in sorted(self.functions.items())},
        }
        return json.dumps(body, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Snapshot:
        """Parse and check a snapshot (names, versions and hashes become keys and paths: all validated)."""
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
            functions: dict[str, FunctionState] = {}
            for name, f in doc["functions"].items():
                bundles: dict[str, dict[str, Any]] = {
                    v: {"sha256": str(b["sha256"]), "bytes": int(b["bytes"])} for v, b in f["bundles"].items()
                }
                if not NAME_RE.fullmatch(name):
                    raise ValueError(f"function name {name[:80]!r} is malformed")
                for v, b in bundles.items():
                    if not VERSION_RE.fullmatch(v) or not _SHA256.fullmatch(b["sha256"]):
                        raise ValueError(f"bundle {name}@{v[:40]!r} is malformed")
                state = _State(
                    aliases={
                        valid_alias(a): {str(v): float(w) for v, w in t.items()}
                        for a, t in f["aliases"].items()
                    },
                    history={a: [dict(t) for t in ts] for a, ts in f["history"].items()},
                    added={str(v): int(n) for v, n in f["added"].items()},
                )
                for target in [*state.aliases.values(), *(t for ts in state.history.values() for t in ts)]:
                    if not set(target) <= set(bundles):
                        raise ValueError(f"an alias of {name} names a version without a bundle")
                functions[name] = FunctionState(bundles, state)
            return cls(int(doc["revision"]), functions)
        except (ValueError, TypeError, KeyError, AttributeError, PermanentError) as exc:
            raise PermanentError(
                f"{where} is not a registry snapshot ({exc}); it was not written by a depin gateway — remove it "
                "from the bucket (the log goes on from the entry before it)"
            ) from None


EMPTY = Snapshot(0, {})


class SharedRegistry:
    """The registry at ``store`` (see the module docstring). Methods block (run them off the event loop);
    ``NotFound``/``InvalidTarget``/``NoHistory`` as in ``Registry``; store errors per ``ObjectStore``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._head: Snapshot | None = None

    @property
    def url(self) -> str:
        return self.store.url

    # ---- reads -------------------------------------------------------------------------------------------
    def head(self) -> Snapshot:
        """The newest snapshot (one LIST while nothing changed; cached)."""
        current = self._head
        start = current.revision if current is not None else self._hint()
        keys = self.store.list_after(LOG_DIR, log_key(start))
        if not keys and current is None and start > 0:  # a HEAD.json ahead of the log: list it all
            keys = self.store.list_after(LOG_DIR, log_key(0))
        revisions = [int(m.group(1)) for k in keys if (m := _LOG_KEY.fullmatch(k))]
        if revisions:
            current = self._head = self._read(max(revisions))
        elif current is None:
            current = self._head = EMPTY
        return current

    def _hint(self) -> int:
        stored = self.store.get(HEAD_KEY)
        if stored is None:
            return 0
        try:
            return max(0, int(json.loads(stored.data)["revision"]) - 1)
        except (ValueError, TypeError, KeyError):
            return 0

    def _read(self, revision: int) -> Snapshot:
        key = log_key(revision)
        stored = self.store.get(key)
        if stored is None:
            raise TransientError(f"registry {self.url}: {key} was listed but cannot be read yet; retrying")
        snap = Snapshot.from_bytes(stored.data, f"{self.url}/{key}")
        if snap.revision != revision:
            raise PermanentError(
                f"{self.url}/{key} says it is revision {snap.revision}; remove it from the bucket"
            )
        return snap

    def fetch_bundle(self, name: str, version: str, ref: Mapping[str, Any]) -> bytes:
        """The bundle bytes the snapshot names, checked against its size and sha256 (``PermanentError``
        naming the fix if they are missing or damaged)."""
        key = bundle_key(name, version, ref["sha256"])
        stored = self.store.get(key)
        if stored is None:
            raise PermanentError(
                f"bundle {self.url}/{key} is missing from the store; publish {name}@{version} again through any "
                "gateway to restore it"
            )
        got = hashlib.sha256(stored.data).hexdigest()
        if got != ref["sha256"] or len(stored.data) != ref["bytes"]:
            raise PermanentError(
                f"bundle {self.url}/{key} is damaged: {len(stored.data)} bytes with sha256 {got[:16]}…, the log "
                f"records {ref['bytes']} bytes with sha256 {ref['sha256'][:16]}…; publish {name}@{version} again "
                "through any gateway to repair it"
            )
        return stored.data

    # ---- writes ------------------------------------------------------------------------------------------
    def commit(
        self, change: Callable[[Snapshot], T], what: str, *, force: bool = False
    ) -> tuple[Snapshot, T]:
        """Apply ``change`` (it mutates a copy of the newest snapshot and returns a result) and write the
        next snapshot with a create-only put; on losing the race to another writer, re-read and re-apply.
        Nothing is written when the change changed nothing (unless ``force``)."""
        for attempt in range(COMMIT_ATTEMPTS):
            head = self.head()
            work = copy.deepcopy(head)
            result = change(work)
            if not force and work.functions == head.functions:
                return head, result
            work.revision = head.revision + 1
            if self.store.put_new(log_key(work.revision), work.to_bytes(what)):
                self._head = work
                try:
                    self.store.put(HEAD_KEY, json.dumps({"revision": work.revision}).encode())
                except (TransientError, PermanentError) as exc:  # only a hint: readers list the log anyway
                    log.warning("registry %s: HEAD.json not updated: %s", self.url, exc)
                log.info("registry %s: revision %d: %s", self.url, work.revision, what)
                return work, result
            # another gateway wrote this revision first: back off a little (jitter breaks lockstep), re-read
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
        raise TransientError(
            f"registry {self.url}: {COMMIT_ATTEMPTS} other changes won the race for the next revision; retry"
        )

    def upload_bundle(self, name: str, version: str, data: bytes) -> dict[str, Any]:
        """Store packed bundle bytes (before any snapshot names them); returns their ``{sha256, bytes}``. An
        object already under that name whose bytes do not match it (damage) is replaced."""
        sha256 = hashlib.sha256(data).hexdigest()
        ref: dict[str, Any] = {"sha256": sha256, "bytes": len(data)}
        key = bundle_key(name, version, sha256)
        if not self.store.put_new(key, data):
            stored = self.store.get(key)
            if stored is None or hashlib.sha256(stored.data).hexdigest() != sha256:
                log.warning("registry %s: replacing the damaged %s", self.url, key)
                self.store.put(key, data)
                ref["repaired"] = True
        return ref

    def publish(self, name: str, version: str, data: bytes, *, move_latest: bool = True) -> bool:
        """Upload the bundle of ``name``@``version`` (verified by the caller), then add the version (moving
        ``latest`` to it if ``move_latest``). Idempotent; True when the version is new to the registry."""
        ref = self.upload_bundle(name, version, data)
        repaired = bool(ref.pop("repaired", False))

        def change(snap: Snapshot) -> bool:
            fn = snap.functions.setdefault(name, FunctionState({}, _State({}, {}, {})))
            recorded = fn.bundles.get(version)
            if recorded is None:
                fn.bundles[version] = ref
                fn.state.added[version] = snap.revision + 1
                if move_latest:
                    Registry._move(fn.state, LATEST, {version: 1.0})
                return True
            if recorded != ref and not self._intact(name, version, recorded):
                fn.bundles[version] = ref  # the recorded copy is damaged: ours replaces it
            if move_latest and LATEST not in fn.state.aliases:
                Registry._move(fn.state, LATEST, {version: 1.0})
            return False

        # a repaired bundle gets a new revision even though the snapshot is the same: replicas that refused
        # the damaged copy retry on every new revision
        return self.commit(change, f"publish {name}@{version}", force=repaired)[1]

    def _intact(self, name: str, version: str, ref: Mapping[str, Any]) -> bool:
        try:
            self.fetch_bundle(name, version, ref)
            return True
        except PermanentError:
            return False

    def set_alias(self, name: str, alias: str, target: str | Mapping[str, float]) -> Target:
        """Point ``alias`` at a version, another alias's target or a weighted split; returns the previous
        target (``{}`` if new). Same rules as ``Registry.set_alias``."""
        valid_alias(alias)

        def change(snap: Snapshot) -> Target:
            fn = snap.require(name)
            new = Registry._target(name, target, fn.state, fn.bundles)
            previous = fn.state.aliases.get(alias, {})
            if new != previous:
                Registry._move(fn.state, alias, new)
            return dict(previous)

        return self.commit(change, f"alias {name}@{alias}")[1]

    def rollback(self, name: str, alias: str) -> Target:
        """Restore ``alias``'s previous target (popping the history); returns it."""

        def change(snap: Snapshot) -> Target:
            return snap.require(name).state.roll_back(name, alias)

        return self.commit(change, f"rollback {name}@{alias}")[1]


__all__ = ["EMPTY", "FORMAT", "FunctionState", "SharedRegistry", "Snapshot", "bundle_key", "log_key"]
