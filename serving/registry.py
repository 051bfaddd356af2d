"""On-disk, content-addressed store of function bundles, with aliases, weighted splits and rollback.

Layout under ``root``::

    functions/<name>/versions/<version>/   an unpacked, verified bundle; the directory name IS the bundle's
                                           content-hash version (re-checked on every load); files read-only
    functions/<name>/aliases.json          {"aliases": {alias: {version: weight}},
                                            "history": {alias: [earlier targets, oldest first]},
                                            "added":   {version: registry revision when it was added}}
    REVISION                               a counter, +1 on every change (add of a new version, alias move)
    .lock                                  ``fcntl.flock`` lock taken by every writer
    .tmp/                                  staging area (same filesystem, so installs are one ``rename``)

Writers (``add``, ``set_alias``, ``rollback``) hold the lock and write files atomically, aliases.json before
REVISION, so a reader that sees a new revision also sees the aliases behind it. Readers take no lock.

An alias maps to one version (``{v: 1.0}``) or a weighted split over any number of versions. ``resolve``
picks a split member by weighted rendezvous hashing of the request key: the same key always gets the same
version, each version gets its weight's share of keys, and changing one weight only moves keys to or from
that version. ``latest`` moves to every newly added version; every alias move pushes the previous target on
the alias's history (bounded), which ``rollback`` pops. ``aliased_versions(name)`` lists the versions some alias
points to (what the gateway's ``/readyz`` waits for).

Errors (all ``PermanentError``): ``NotFound`` (unknown function/alias/version; ``kind``, ``ref``,
``available``: HTTP 404), ``InvalidTarget`` (a ``ConfigError``: bad alias name or weights; ``field``: 422),
``NoHistory`` (nothing to roll back to: 409), ``serving.bundle.BundleError`` (bundle refused or damaged).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import random
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from depin_core.errors import PermanentError
from depin_core.fs import atomic_write_bytes
from depin_core.names import FUNCTION_NAME_RE
from serving.bundle import Bundle, unpack_bundle, verify_bundle
from serving.errors import BundleError, InvalidTarget, NoHistory, NotFound

log = logging.getLogger(__name__)

LATEST = "latest"
HISTORY_LIMIT = 50
NAME_RE = FUNCTION_NAME_RE
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
VERSION_RE = re.compile(r"[0-9a-f]{16}")
_STALE_TMP_S = 3600.0

Target = dict[str, float]


# ---------------------------------------------------------------------------------------------- pure logic


def valid_alias(alias: str) -> str:
    """Return ``alias`` if it is a legal alias name (``^[a-z][a-z0-9_-]{0,31}$``, never 16 hex chars)."""
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or VERSION_RE.fullmatch(alias):
        raise InvalidTarget(
            f"alias {alias!r} is not a valid alias name: use 1-32 chars of a-z, 0-9, '_' or '-', starting "
            "with a letter, and not 16 hex chars (that would read as a version)",
            field="alias",
        )
    return alias


def normalise_weights(weights: Mapping[str, Any]) -> Target:
    """Check a split ``{version: weight}`` (≥ 1 entry, weights finite and > 0) and scale it to sum to 1."""
    if not isinstance(weights, Mapping) or not weights:
        raise InvalidTarget(
            "weights must be a non-empty mapping {version: weight}, e.g. {'<v1>': 0.9, '<v2>': 0.1}",
            field="weights",
        )
    out: dict[str, float] = {}
    for version, w in weights.items():
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            raise InvalidTarget(
                f"weights key {version!r} is not a version (16 lowercase hex chars)",
                field=f"weights.{version}",
            )
        try:
            out[version] = float(w) if isinstance(w, int | float) and not isinstance(w, bool) else math.nan
        except OverflowError:  # an int beyond float range
            out[version] = math.inf
        if not math.isfinite(out[version]) or out[version] <= 0:
            raise InvalidTarget(
                f"weight of version {version} is {w!r}; use a finite number > 0 (drop the version to give it "
                "no traffic)",
                field=f"weights.{version}",
            )
    total = sum(out.values())
    if not math.isfinite(total):
        raise InvalidTarget("weights are too large to add up; scale them down", field="weights")
    return {v: w / total for v, w in sorted(out.items())}


def _unit(salt: str, version: str, key: str) -> float:
    digest = hashlib.blake2b(f"{salt}\x00{version}\x00{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64  # in (0, 1]


def pick_version(weights: Mapping[str, float], request_key: str | None = None, *, salt: str = "") -> str:
    """Choose one version of a split. With a ``request_key`` the choice is stable (weighted rendezvous
    hashing: the version minimising ``-ln(u)/w`` wins, which happens with probability ``w / Σw``); without
    one it is random by weight."""
    if len(weights) == 1:
        return next(iter(weights))
    if request_key is None:
        return random.choices(list(weights), weights=list(weights.values()))[0]
    return min(weights, key=lambda v: (-math.log(_unit(salt, v, request_key)) / weights[v], v))


# -------------------------------------------------------------------------------------------------- registry


@dataclasses.dataclass
class _State:
    aliases: dict[str, Target]
    history: dict[str, list[Target]]
    added: dict[str, int]

    def to_bytes(self) -> bytes:
        body = {"aliases": self.aliases, "history": self.history, "added": self.added}
        return json.dumps(body, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"

    def roll_back(self, name: str, alias: str) -> Target:
        """Point ``alias`` back at its previous target (popped from the history) and return it."""
        if alias not in self.aliases:
            raise NotFound("alias", alias, self.aliases, function=name)
        past = self.history.get(alias)
        if not past:
            raise NoHistory(
                f"alias {alias!r} of function {name!r} has no earlier target to roll back to; point it "
                "somewhere with set_alias instead"
            )
        restored = past.pop()
        if not past:
            del self.history[alias]
        self.aliases[alias] = restored
        return dict(restored)


@dataclasses.dataclass(frozen=True)
class _View:
    versions: frozenset[str]
    state: _State


_EMPTY = _View(frozenset(), _State({}, {}, {}))


def _fingerprint(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out.append((p.relative_to(path).as_posix(), st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class Registry:
    """The function store under ``root``; ``trusted`` = publisher addresses accepted (None = any signer).

    Safe to share between threads and between processes on one host (writers serialise on a file lock).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        trusted: Collection[str] | None,
        max_bundle_bytes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.trusted = None if trusted is None else frozenset(trusted)
        self.max_bundle_bytes = max_bundle_bytes
        self._views: dict[str, tuple[int, _View]] = {}
        self._bundle_cache: dict[tuple[str, str], tuple[tuple, Bundle]] = {}

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------------------------

    def _fn_dir(self, name: str) -> Path:
        return self.root / "functions" / name

    def _versions_dir(self, name: str) -> Path:
        return self._fn_dir(name) / "versions"

    def _aliases_file(self, name: str) -> Path:
        return self._fn_dir(name) / "aliases.json"

    # -- reads ---------------------------------------------------------------------------------------------

    def revision(self) -> int:
        """A counter that grows on every change made through any Registry on this root (one small read)."""
        try:
            return int((self.root / "REVISION").read_bytes().strip() or 0)
        except FileNotFoundError:
            return 0

    def functions(self) -> list[str]:
        """Names of the functions holding at least one version, sorted."""
        base = self.root / "functions"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if self._view(p.name).versions)

    def version_ids(self, name: str) -> list[str]:
        """The versions of ``name`` in the order they were added (cheap: no verification)."""
        view = self._require(name)
        return sorted(view.versions, key=lambda v: (view.state.added.get(v, math.inf), v))

    def versions(self, name: str) -> list[Bundle]:
        """Every version of ``name``, verified, oldest (first added) first; ``BundleError`` if one is damaged."""
        return [self.bundle(name, v) for v in self.version_ids(name)]

    def bundle(self, name: str, version: str) -> Bundle:
        """The verified bundle of ``name``@``version`` (re-verified whenever a file's stat changes)."""
        path = self._version_path(name, version)
        fingerprint = _fingerprint(path)
        cached = self._bundle_cache.get((name, version))
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        bundle = self._verify_installed(path, name, version)
        self._bundle_cache[(name, version)] = (fingerprint, bundle)
        return bundle

    def aliases(self, name: str) -> dict[str, Target]:
        """``{alias: {version: weight}}`` of ``name`` (weights sum to 1)."""
        return {a: dict(t) for a, t in self._require(name).state.aliases.items()}

    def history(self, name: str, alias: str) -> list[Target]:
        """Earlier targets of ``alias``, oldest first (what ``rollback`` restores, last one first)."""
        return [dict(t) for t in self._require(name).state.history.get(alias, [])]

    def aliased_versions(self, name: str) -> list[str]:
        """Every version that some alias of ``name`` points to, sorted — what ``/readyz`` must see loaded."""
        return sorted({v for target in self._require(name).state.aliases.values() for v in target})

    def resolve(self, name: str, selector: str | None = None, *, request_key: str | None = None) -> str:
        """The version serving ``name``@``selector`` (None → ``latest``; a 16-hex version or an alias).

        A split picks by a stable hash of ``request_key`` (random when None). Unknown function, alias or
        version → ``NotFound``. Costs one small file read while nothing changes (state is cached per revision).
        """
        view = self._require(name)
        selector = LATEST if selector is None else selector
        if VERSION_RE.fullmatch(selector):
            if selector not in view.versions:
                raise NotFound("version", selector, view.versions, function=name)
            return selector
        target = view.state.aliases.get(selector)
        if target is None:
            raise NotFound("alias", selector, view.state.aliases, function=name)
        return pick_version(target, request_key, salt=name)

    # -- writes --------------------------------------------------------------------------------------------

    def add(
        self,
        source: Path | str | bytes,
        *,
        expect_name: str | None = None,
        expect_version: str | None = None,
        move_latest: bool = True,
    ) -> Bundle:
        """Verify a bundle (a directory, a packed tar file, or packed tar bytes) and install it; move alias
        ``latest`` to it (unless ``move_latest`` is False: a replica's cache installs versions first and takes
        its aliases from the shared store). Idempotent: adding a version that is already here changes nothing
        and returns it. ``expect_name``/``expect_version`` (e.g. from an upload URL) must match the manifest
        if given."""
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp(tmp_root)
        work = Path(tempfile.mkdtemp(dir=tmp_root, prefix="add-"))
        try:
            staged = self._stage(source, work / "bundle")
            bundle = verify_bundle(staged, trusted=self.trusted)
            m = bundle.manifest
            for field, want, got in (("name", expect_name, m.name), ("version", expect_version, m.version)):
                if want is not None and want != got:
                    raise BundleError(
                        f"bundle manifest.json {field} is {got!r} but {want!r} was expected; upload it under "
                        f"its own {field}"
                    )
            if not NAME_RE.fullmatch(m.name) or not VERSION_RE.fullmatch(m.version):
                raise BundleError(
                    f"bundle manifest.json name {m.name!r} / version {m.version!r} are malformed"
                )
            return self._install(staged, bundle, work, move_latest=move_latest)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def set_alias(self, name: str, alias: str, target: str | Mapping[str, float]) -> Target:
        """Point ``alias`` at a version, at another alias's current target (copied), or at a weighted split
        ``{version: weight}``; return the previous target (``{}`` if the alias is new). Atomic."""
        valid_alias(alias)
        with self._locked():
            versions = self._require(name, fresh=True).versions
            state = self._read_state(name)
            new = self._target(name, target, state, versions)
            previous = state.aliases.get(alias, {})
            if new != previous:
                self._move(state, alias, new)
                self._commit(name, state)
                log.info("alias %s@%s -> %s (was %s)", name, alias, new, previous or "unset")
            return dict(previous)

    def rollback(self, name: str, alias: str) -> Target:
        """Restore ``alias``'s previous target (popping it from the history) and return it."""
        with self._locked():
            self._require(name, fresh=True)
            state = self._read_state(name)
            restored = state.roll_back(name, alias)
            self._commit(name, state)
            log.info("alias %s@%s rolled back -> %s", name, alias, restored)
            return restored

    def apply_state(
        self,
        name: str,
        aliases: Mapping[str, Target],
        history: Mapping[str, list[Target]],
        added: Mapping[str, int],
    ) -> bool:
        """Replace ``name``'s aliases, history and added-revisions with a shared store's (a replica's cache).
        Every version an alias points to must be installed here already (``NotFound`` otherwise), so an alias
        never points at a version this replica lacks. True when something changed (REVISION bumped)."""
        with self._locked():
            versions = self._view(name, fresh=True).versions
            for alias, target in aliases.items():
                valid_alias(alias)
                if missing := sorted(set(target) - versions):
                    raise NotFound("version", missing[0], versions, function=name)
            new = _State(
                aliases={a: dict(t) for a, t in aliases.items()},
                history={a: [dict(t) for t in ts] for a, ts in history.items() if ts},
                added={v: int(n) for v, n in added.items() if v in versions},
            )
            if new.to_bytes() == self._read_state(name).to_bytes():
                return False
            self._commit(name, new)
            return True

    # -- internals -----------------------------------------------------------------------------------------

    def _view(self, name: str, *, fresh: bool = False) -> _View:
        """Versions + parsed aliases.json of ``name``, cached per registry revision (writers bump it after
        writing, so a cached view is never older than the revision it is filed under)."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            return _EMPTY  # never builds a path from an illegal name
        revision = self.revision()
        cached = self._views.get(name)
        if not fresh and cached is not None and cached[0] == revision:
            return cached[1]
        d = self._versions_dir(name)
        try:
            versions = frozenset(p.name for p in d.iterdir() if VERSION_RE.fullmatch(p.name) and p.is_dir())
        except FileNotFoundError:
            versions = frozenset()
        view = _View(versions, self._read_state(name))
        self._views[name] = (revision, view)
        return view

    def _require(self, name: str, *, fresh: bool = False) -> _View:
        view = self._view(name, fresh=fresh)
        if not view.versions:
            raise NotFound("function", name, self.functions())
        return view

    def _version_path(self, name: str, version: str) -> Path:
        versions = self._require(name).versions
        if not isinstance(version, str) or version not in versions:
            raise NotFound("version", str(version), versions, function=name)
        return self._versions_dir(name) / version

    def _verify_installed(self, path: Path, name: str, version: str) -> Bundle:
        bundle = verify_bundle(path, trusted=self.trusted)
        if bundle.manifest.name != name or bundle.manifest.version != version:
            raise BundleError(
                f"{path}: manifest.json says {bundle.manifest.name}@{bundle.manifest.version} but it is stored "
                f"as {name}@{version}; the registry was modified by hand — remove that directory and re-add"
            )
        return bundle

    def _read_state(self, name: str) -> _State:
        """A fresh, private copy of aliases.json."""
        try:
            raw = self._aliases_file(name).read_bytes()
        except FileNotFoundError:
            return _State({}, {}, {})
        return self._parse_state(self._aliases_file(name), raw)

    @staticmethod
    def _parse_state(f: Path, data: bytes) -> _State:
        try:
            raw = json.loads(data)
            return _State(
                aliases={a: dict(t) for a, t in raw.get("aliases", {}).items()},
                history={a: [dict(t) for t in ts] for a, ts in raw.get("history", {}).items()},
                added={v: int(n) for v, n in raw.get("added", {}).items()},
            )
        except (ValueError, TypeError, AttributeError) as e:
            raise PermanentError(f"{f} is not a valid aliases file ({e}); restore it from a backup") from e

    @staticmethod
    def _target(
        name: str, target: str | Mapping[str, float], state: _State, versions: Collection[str]
    ) -> Target:
        if isinstance(target, str):
            if VERSION_RE.fullmatch(target) and target in versions:
                return {target: 1.0}
            if target in state.aliases and not VERSION_RE.fullmatch(target):
                return dict(state.aliases[target])
            raise NotFound("version or alias", target, [*versions, *state.aliases], function=name)
        weights = normalise_weights(target)
        if missing := sorted(set(weights) - set(versions)):
            raise NotFound("version", missing[0], versions, function=name)
        return weights

    @staticmethod
    def _move(state: _State, alias: str, new: Target) -> None:
        previous = state.aliases.get(alias)
        if previous:
            past = state.history.setdefault(alias, [])
            past.append(previous)
            del past[:-HISTORY_LIMIT]
        state.aliases[alias] = new

    def _commit(self, name: str, state: _State) -> int:
        """Write aliases.json, then bump REVISION (caller holds the lock)."""
        atomic_write_bytes(self._aliases_file(name), state.to_bytes())
        return self._bump()

    def _bump(self) -> int:
        revision = self.revision() + 1
        atomic_write_bytes(self.root / "REVISION", f"{revision}\n".encode())
        return revision

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _stage(self, source: Path | str | bytes, dest: Path) -> Path:
        if isinstance(source, bytes | bytearray | memoryview):
            return self._unpack(bytes(source), dest)
        src = Path(source)
        if src.is_file():
            return self._unpack(src.read_bytes(), dest)
        if not src.is_dir():
            raise BundleError(f"bundle source {src}: no such file or directory; pass a bundle dir or tar")
        for p in src.rglob("*"):
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise BundleError(f"bundle {src}: {p.relative_to(src)} is not a regular file; remove it")
        shutil.copytree(src, dest, symlinks=True)
        return dest

    def _unpack(self, data: bytes, dest: Path) -> Path:
        if self.max_bundle_bytes is None:
            return unpack_bundle(data, dest)
        return unpack_bundle(data, dest, max_bytes=self.max_bundle_bytes)

    def _install(self, staged: Path, bundle: Bundle, work: Path, *, move_latest: bool = True) -> Bundle:
        name, version = bundle.manifest.name, bundle.manifest.version
        final = self._versions_dir(name) / version
        with self._locked():
            state = self._read_state(name)
            if final.exists():
                try:
                    existing = self._verify_installed(final, name, version)
                except BundleError as e:  # a damaged copy (crash, tampering): replace it with the fresh one
                    log.warning("replacing damaged %s@%s: %s", name, version, e)
                    final.rename(work / "damaged")
                else:
                    if move_latest and LATEST not in state.aliases:  # a crash between rename and commit
                        self._move(state, LATEST, {version: 1.0})
                        self._commit(name, state)
                    return existing
            for p in staged.rglob("*"):
                if p.is_file():
                    p.chmod(0o444)
            final.parent.mkdir(parents=True, exist_ok=True)
            staged.rename(final)
            state.added[version] = self.revision() + 1
            if move_latest:
                self._move(state, LATEST, {version: 1.0})
            self._commit(name, state)
        installed = dataclasses.replace(bundle, path=final)
        self._bundle_cache[(name, version)] = (_fingerprint(final), installed)
        log.info("added %s@%s (publisher %s)", name, version, bundle.publisher)
        return installed

    @staticmethod
    def _sweep_tmp(tmp_root: Path) -> None:
        """Remove staging dirs left by crashed writers (older than an hour)."""
        cutoff = time.time() - _STALE_TMP_S
        for p in tmp_root.iterdir():
            try:
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass


__all__ = [
    "ALIAS_RE",
    "HISTORY_LIMIT",
    "LATEST",
    "NAME_RE",
    "VERSION_RE",
    "InvalidTarget",
    "NoHistory",
    "NotFound",
    "Registry",
    "Target",
    "normalise_weights",
    "pick_version",
    "valid_alias",
]
