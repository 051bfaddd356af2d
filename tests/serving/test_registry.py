"""Function registry: content-addressed versions, aliases, weighted sticky splits, rollback, concurrency."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from depin_core.errors import ConfigError, PermanentError
from serving.bundle import Bundle, pack_bundle
from serving.errors import BundleError, InvalidTarget, NoHistory, NotFound
from serving.registry import (
    HISTORY_LIMIT,
    Registry,
    normalise_weights,
    pick_version,
    valid_alias,
)

REPO = Path(__file__).resolve().parents[2]
V = ["0123456789abcdef", "fedcba9876543210", "00000000000000aa"]


# ------------------------------------------------------------------------------------------------ pure logic


@pytest.mark.parametrize("alias", ["latest", "prod", "a", "canary-2", "blue_green", "a" * 32])
def test_valid_alias_accepts(alias: str) -> None:
    assert valid_alias(alias) == alias


@pytest.mark.parametrize(
    "alias", ["", "Prod", "1abc", "-x", "a" * 33, "0123456789abcdef", "abcdefabcdefabcd", "pro d", "p/x", 3]
)
def test_valid_alias_refuses(alias) -> None:
    with pytest.raises(InvalidTarget, match="not a valid alias name") as e:
        valid_alias(alias)
    assert e.value.field == "alias" and isinstance(e.value, ConfigError)


def test_normalise_weights() -> None:
    assert normalise_weights({V[0]: 9, V[1]: 1}) == pytest.approx({V[0]: 0.9, V[1]: 0.1})
    assert normalise_weights({V[0]: 0.25}) == {V[0]: 1.0}
    w = normalise_weights({V[0]: 1, V[1]: 1, V[2]: 1})
    assert math.fsum(w.values()) == pytest.approx(1.0) and list(w) == sorted(w)


@pytest.mark.parametrize(
    ("weights", "field"),
    [
        ({}, "weights"),
        ([(V[0], 1)], "weights"),
        ({V[0]: 0}, f"weights.{V[0]}"),
        ({V[0]: -1.0}, f"weights.{V[0]}"),
        ({V[0]: float("nan")}, f"weights.{V[0]}"),
        ({V[0]: float("inf")}, f"weights.{V[0]}"),
        ({V[0]: True}, f"weights.{V[0]}"),
        ({V[0]: "1"}, f"weights.{V[0]}"),
        ({V[0]: None}, f"weights.{V[0]}"),
        ({"prod": 1}, "weights.prod"),
        ({V[0].upper(): 1}, f"weights.{V[0].upper()}"),
        ({V[0]: 10**400}, f"weights.{V[0]}"),
        ({V[0]: 1e308, V[1]: 1e308}, "weights"),
    ],
)
def test_normalise_weights_refuses(weights, field: str) -> None:
    with pytest.raises(InvalidTarget) as e:
        normalise_weights(weights)
    assert e.value.field == field


def test_pick_version_is_sticky_and_matches_the_weights() -> None:
    weights = normalise_weights({V[0]: 7, V[1]: 2, V[2]: 1})
    keys = [f"req-{i}" for i in range(10_000)]
    picks = [pick_version(weights, k, salt="fn") for k in keys]
    assert picks == [pick_version(weights, k, salt="fn") for k in keys]  # same key → same version
    shares = Counter(picks)
    for v, w in weights.items():
        assert shares[v] / len(keys) == pytest.approx(w, abs=0.02)
    # a different salt (function) decorrelates the choice but keeps the shares
    other = [pick_version(weights, k, salt="other") for k in keys]
    assert other != picks
    assert Counter(other)[V[0]] / len(keys) == pytest.approx(0.7, abs=0.02)


def test_pick_version_moves_only_the_keys_it_must() -> None:
    keys = [f"k{i}" for i in range(5_000)]
    before = {k: pick_version(normalise_weights({V[0]: 9, V[1]: 1}), k) for k in keys}
    # raising the canary's weight only moves keys onto the canary
    after = {k: pick_version(normalise_weights({V[0]: 9, V[1]: 3}), k) for k in keys}
    assert all(after[k] == V[1] for k in keys if before[k] == V[1])
    assert sum(before[k] != after[k] for k in keys) > 0
    # adding a version to the split only moves keys onto the new version
    added = {k: pick_version(normalise_weights({V[0]: 9, V[1]: 1, V[2]: 2}), k) for k in keys}
    assert all(added[k] in (before[k], V[2]) for k in keys)


def test_pick_version_does_not_depend_on_the_process() -> None:
    """No use of Python's per-process salted ``hash``: another interpreter picks the same versions."""
    weights = {V[0]: 0.5, V[1]: 0.3, V[2]: 0.2}
    keys = [f"r{i}" for i in range(200)]
    code = (
        "import json,sys; from serving.registry import pick_version; "
        f"print(json.dumps([pick_version({weights!r}, k, salt='fn') for k in {keys!r}]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        pick_version(weights, k, salt="fn") for k in keys
    ]


def test_pick_version_without_a_key_is_random_by_weight() -> None:
    weights = {V[0]: 0.8, V[1]: 0.2}
    picks = Counter(pick_version(weights) for _ in range(4_000))
    assert set(picks) == {V[0], V[1]}
    assert picks[V[0]] / 4_000 == pytest.approx(0.8, abs=0.05)
    assert pick_version({V[2]: 1.0}) == V[2]


# ---------------------------------------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def three(make_bundle, range_artifact: Path) -> list[Bundle]:
    """Three versions of ``range-fn`` (same model, different max batch size). Do not modify them."""
    bundles = [make_bundle(range_artifact, "range-fn", max_batch_size=n) for n in (64, 128, 256)]
    assert len({b.manifest.version for b in bundles}) == 3
    return bundles


@pytest.fixture
def reg(tmp_path: Path, publisher) -> Registry:
    return Registry(tmp_path / "registry", trusted=[publisher.address])


def _v(b: Bundle) -> str:
    return b.manifest.version


def test_add_installs_a_verified_read_only_copy_and_moves_latest(reg: Registry, range_bundle: Bundle) -> None:
    assert reg.functions() == [] and reg.revision() == 0
    b = reg.add(range_bundle.path)
    v = _v(range_bundle)
    assert b.manifest == range_bundle.manifest and b.publisher == range_bundle.publisher
    assert b.path == reg.root / "functions" / "range-fn" / "versions" / v and b.path != range_bundle.path
    assert {p.stat().st_mode & 0o777 for p in b.path.rglob("*") if p.is_file()} == {0o444}
    assert reg.revision() == 1
    assert reg.functions() == ["range-fn"]
    assert reg.version_ids("range-fn") == [v]
    assert [x.manifest.version for x in reg.versions("range-fn")] == [v]
    assert reg.aliases("range-fn") == {"latest": {v: 1.0}}
    assert reg.resolve("range-fn") == v == reg.resolve("range-fn", "latest") == reg.resolve("range-fn", v)
    assert reg.bundle("range-fn", v).manifest.version == v
    assert reg.aliased_versions("range-fn") == [v]
    assert list((reg.root / ".tmp").iterdir()) == []  # staging cleaned up
    state = json.loads((reg.root / "functions" / "range-fn" / "aliases.json").read_text())
    assert state["aliases"] == {"latest": {v: 1.0}} and state["added"] == {v: 1}


def test_add_is_idempotent_from_dir_bytes_and_tar_file(
    reg: Registry, range_bundle: Bundle, tmp_path: Path
) -> None:
    first = reg.add(range_bundle.path)
    packed = pack_bundle(range_bundle.path)
    tar = tmp_path / "bundle.tar"
    tar.write_bytes(packed)
    for source in (range_bundle.path, packed, tar, str(tar)):
        again = reg.add(source)
        assert again.manifest == first.manifest and again.path == first.path
    assert reg.revision() == 1  # nothing changed after the first add
    assert len(list((reg.root / "functions" / "range-fn" / "versions").iterdir())) == 1
    assert reg.history("range-fn", "latest") == []


def test_add_from_bytes_into_an_empty_registry(reg: Registry, range_bundle: Bundle) -> None:
    b = reg.add(pack_bundle(range_bundle.path), expect_name="range-fn", expect_version=_v(range_bundle))
    assert reg.resolve("range-fn") == _v(b)


def test_add_refuses_untrusted_tampered_and_mismatched_bundles(
    tmp_path: Path, make_bundle, range_artifact: Path, range_bundle: Bundle, other_publisher
) -> None:
    reg = Registry(tmp_path / "registry", trusted=[range_bundle.publisher])
    foreign = make_bundle(range_artifact, "range-fn", account=other_publisher)
    with pytest.raises(BundleError):
        reg.add(foreign.path)
    with pytest.raises(BundleError, match="version"):
        reg.add(range_bundle.path, expect_version="0" * 16)
    with pytest.raises(BundleError, match="name"):
        reg.add(range_bundle.path, expect_name="other-fn")
    weights = next(p for p in range_bundle.path.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        reg.add(range_bundle.path)
    with pytest.raises(BundleError, match="no such file"):
        reg.add(tmp_path / "missing")
    assert reg.functions() == [] and reg.revision() == 0
    assert list((reg.root / ".tmp").iterdir()) == []
    # any valid signer is accepted when no trust list is configured
    assert Registry(tmp_path / "open", trusted=None).add(foreign.path).publisher == foreign.publisher


def test_add_refuses_a_bundle_dir_holding_a_symlink(
    reg: Registry, range_bundle: Bundle, tmp_path: Path
) -> None:
    src = tmp_path / "linked"
    shutil.copytree(range_bundle.path, src)
    (src / "model" / "extra").symlink_to("/etc/hostname")
    with pytest.raises(BundleError, match="not a regular file"):
        reg.add(src)


def test_the_directory_name_is_rechecked_against_the_content(reg: Registry, range_bundle: Bundle) -> None:
    b = reg.add(range_bundle.path)
    fake = b.path.with_name("abcdefabcdefabcd")
    shutil.copytree(b.path, fake)
    reg = Registry(reg.root, trusted=reg.trusted)  # hand edits bump no revision: look with a fresh object
    assert "abcdefabcdefabcd" in reg.version_ids("range-fn")  # the cheap listing sees it ...
    with pytest.raises(BundleError, match="stored as range-fn@abcdefabcdefabcd"):
        reg.bundle("range-fn", "abcdefabcdefabcd")  # ... but it never loads
    with pytest.raises(BundleError):
        reg.versions("range-fn")


def test_a_file_changed_after_install_is_caught_and_a_re_add_repairs_it(
    reg: Registry, range_bundle: Bundle
) -> None:
    b = reg.add(range_bundle.path)
    v = _v(b)
    assert reg.bundle("range-fn", v) is reg.bundle("range-fn", v)  # cached while nothing changes
    model_json = b.path / "model" / "model.json"
    model_json.chmod(0o644)
    model_json.write_text(model_json.read_text().replace("{", "{ ", 1))
    with pytest.raises(BundleError):
        reg.bundle("range-fn", v)
    repaired = reg.add(range_bundle.path)  # same version: the damaged copy is replaced
    assert reg.bundle("range-fn", v).manifest == repaired.manifest
    assert reg.revision() == 2


def test_latest_moves_on_add_and_rolls_back(reg: Registry, three: list[Bundle]) -> None:
    v0, v1, v2 = (_v(b) for b in three)
    for b in three:
        reg.add(b.path)
    assert reg.revision() == 3
    assert reg.version_ids("range-fn") == [v0, v1, v2]  # order of addition
    assert [b.manifest.version for b in reg.versions("range-fn")] == [v0, v1, v2]
    assert reg.resolve("range-fn") == v2
    assert reg.history("range-fn", "latest") == [{v0: 1.0}, {v1: 1.0}]
    assert reg.rollback("range-fn", "latest") == {v1: 1.0}
    assert reg.resolve("range-fn") == v1
    assert reg.rollback("range-fn", "latest") == {v0: 1.0}
    with pytest.raises(NoHistory, match="'latest' of function 'range-fn' has no earlier target"):
        reg.rollback("range-fn", "latest")
    assert reg.resolve("range-fn") == v0 and reg.revision() == 5
    # re-adding an existing version is a no-op: latest stays where it was rolled back to
    reg.add(three[2].path)
    assert reg.resolve("range-fn") == v0 and reg.revision() == 5


def test_set_alias_single_split_copy_and_rollback(reg: Registry, three: list[Bundle]) -> None:
    v0, v1, v2 = (_v(b) for b in three)
    for b in three:
        reg.add(b.path)
    rev = reg.revision()
    assert reg.set_alias("range-fn", "prod", v0) == {}
    assert reg.set_alias("range-fn", "prod", v1) == {v0: 1.0}
    assert reg.set_alias("range-fn", "prod", {v1: 3, v2: 1}) == {v1: 1.0}
    assert reg.aliases("range-fn")["prod"] == pytest.approx({v1: 0.75, v2: 0.25})
    assert reg.revision() == rev + 3
    # same target again: nothing recorded
    assert reg.set_alias("range-fn", "prod", {v1: 6, v2: 2}) == pytest.approx({v1: 0.75, v2: 0.25})
    assert reg.revision() == rev + 3
    # an alias may be pointed at another alias's current target (a copy, not a link)
    assert reg.set_alias("range-fn", "canary", "prod") == {}
    assert reg.aliases("range-fn")["canary"] == reg.aliases("range-fn")["prod"]
    reg.set_alias("range-fn", "prod", v0)
    assert reg.aliases("range-fn")["canary"] == pytest.approx({v1: 0.75, v2: 0.25})
    assert reg.aliased_versions("range-fn") == sorted({v0, v1, v2})
    assert reg.history("range-fn", "prod") == [{v0: 1.0}, {v1: 1.0}, pytest.approx({v1: 0.75, v2: 0.25})]
    assert reg.rollback("range-fn", "prod") == pytest.approx({v1: 0.75, v2: 0.25})
    assert reg.rollback("range-fn", "prod") == {v1: 1.0}
    assert reg.rollback("range-fn", "prod") == {v0: 1.0}
    with pytest.raises(NoHistory):
        reg.rollback("range-fn", "prod")


def test_resolve_a_split_is_sticky_and_follows_the_weights(reg: Registry, three: list[Bundle]) -> None:
    v0, v1, v2 = (_v(b) for b in three)
    for b in three:
        reg.add(b.path)
    reg.set_alias("range-fn", "prod", {v0: 0.6, v1: 0.3, v2: 0.1})
    keys = [f"req-{i:05d}" for i in range(10_000)]
    picks = [reg.resolve("range-fn", "prod", request_key=k) for k in keys]
    assert picks == [reg.resolve("range-fn", "prod", request_key=k) for k in keys]
    shares = Counter(picks)
    assert shares[v0] / 1e4 == pytest.approx(0.6, abs=0.02)
    assert shares[v1] / 1e4 == pytest.approx(0.3, abs=0.02)
    assert shares[v2] / 1e4 == pytest.approx(0.1, abs=0.02)
    # another Registry object on the same root (e.g. another gateway process) picks the same
    other = Registry(reg.root, trusted=reg.trusted)
    assert [other.resolve("range-fn", "prod", request_key=k) for k in keys[:500]] == picks[:500]
    assert {reg.resolve("range-fn", "prod") for _ in range(300)} == {v0, v1, v2}  # no key: random


def test_unknown_things_are_not_found_naming_what_exists(reg: Registry, three: list[Bundle]) -> None:
    v0, v1 = _v(three[0]), _v(three[1])
    with pytest.raises(NotFound, match="function 'range-fn' not found; there are none yet"):
        reg.resolve("range-fn")
    reg.add(three[0].path)
    reg.add(three[1].path)
    rev = reg.revision()
    cases = [
        (lambda: reg.resolve("nope"), "function 'nope' not found; available: range-fn"),
        (lambda: reg.resolve("../../etc"), "function '../../etc' not found"),
        (lambda: reg.aliases("nope"), "function 'nope'"),
        (lambda: reg.version_ids("nope"), "function 'nope'"),
        (lambda: reg.bundle("nope", v0), "function 'nope'"),
        (
            lambda: reg.resolve("range-fn", "prod"),
            "alias 'prod' of function 'range-fn' not found; available: latest",
        ),
        (lambda: reg.resolve("range-fn", "0" * 16), f"version '{'0' * 16}' of function 'range-fn' not found"),
        (lambda: reg.bundle("range-fn", "0" * 16), f"available: {', '.join(sorted([v0, v1]))}"),
        (lambda: reg.bundle("range-fn", "../x"), "version '../x'"),
        (lambda: reg.set_alias("nope", "prod", v0), "function 'nope'"),
        (lambda: reg.set_alias("range-fn", "prod", "0" * 16), "version or alias"),
        (lambda: reg.set_alias("range-fn", "prod", "staging"), "version or alias 'staging'"),
        (lambda: reg.set_alias("range-fn", "prod", {v0: 1, "0" * 16: 1}), f"version '{'0' * 16}'"),
        (lambda: reg.rollback("range-fn", "prod"), "alias 'prod'"),
        (lambda: reg.rollback("nope", "latest"), "function 'nope'"),
    ]
    for call, message in cases:
        with pytest.raises(NotFound, match=re.escape(message)) as e:
            call()
        assert isinstance(e.value, PermanentError)
    for alias, target, field in [
        ("Prod", v0, "alias"),
        (v1, v0, "alias"),
        ("prod", {v0: 0}, f"weights.{v0}"),
        ("prod", {}, "weights"),
    ]:
        with pytest.raises(InvalidTarget) as e:
            reg.set_alias("range-fn", alias, target)
        assert e.value.field == field
    assert reg.revision() == rev and set(reg.aliases("range-fn")) == {"latest"}


def test_history_is_bounded(reg: Registry, three: list[Bundle]) -> None:
    v0, v1 = _v(three[0]), _v(three[1])
    reg.add(three[0].path)
    reg.add(three[1].path)
    for i in range(HISTORY_LIMIT + 10):
        reg.set_alias("range-fn", "prod", (v0, v1)[i % 2])
    assert len(reg.history("range-fn", "prod")) == HISTORY_LIMIT


def test_several_functions(reg: Registry, range_bundle: Bundle, anomaly_bundle: Bundle) -> None:
    reg.add(anomaly_bundle.path)
    reg.add(range_bundle.path)
    assert reg.functions() == ["anomaly-fn", "range-fn"]
    assert reg.resolve("anomaly-fn") == _v(anomaly_bundle)
    with pytest.raises(NotFound):
        reg.set_alias("range-fn", "prod", _v(anomaly_bundle))  # a version of another function


def test_stale_staging_dirs_are_swept(reg: Registry, range_bundle: Bundle) -> None:
    stale = reg.root / ".tmp" / "add-crashed"
    (stale / "bundle").mkdir(parents=True)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = reg.root / ".tmp" / "add-running"
    fresh.mkdir()
    reg.add(range_bundle.path)
    assert not stale.exists() and fresh.exists()


def test_concurrent_writers_in_threads_lose_no_update(reg: Registry, three: list[Bundle]) -> None:
    versions = [_v(b) for b in three]
    for b in three:
        reg.add(b.path)
    rev = reg.revision()
    errors: list[BaseException] = []

    def flip(alias: str) -> None:
        try:
            for i in range(10):
                reg.set_alias("range-fn", alias, versions[i % 3])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=flip, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert reg.revision() == rev + 80
    aliases = reg.aliases("range-fn")
    assert all(aliases[f"t{i}"] == {versions[0]: 1.0} for i in range(8))
    assert all(len(reg.history("range-fn", f"t{i}")) == 9 for i in range(8))


# ------------------------------------------------------------------------------------------ other processes

CHILD = textwrap.dedent(
    """
    import fcntl, json, logging, os, sys, time
    from pathlib import Path
    from serving.registry import Registry

    installs = []
    handler = logging.Handler()
    handler.emit = lambda record: installs.append(record.getMessage().startswith("added "))
    logging.getLogger("serving.registry").addHandler(handler)
    logging.getLogger("serving.registry").setLevel(logging.INFO)

    root, mode, *args = sys.argv[1:]
    reg = Registry(Path(root), trusted=None)
    go = Path(args[0])

    def flock(fd, op, _flock=fcntl.flock):
        if op == fcntl.LOCK_EX:  # staged and verified: about to queue on the registry lock
            Path(f"{go}.locking.{os.getpid()}").touch()
        return _flock(fd, op)

    fcntl.flock = flock
    Path(f"{go}.ready.{os.getpid()}").touch()  # imports done: wait for the others
    deadline = time.monotonic() + 300  # never outlive a test that failed before touching go
    while not go.exists():
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.001)
    if mode == "add":
        version = reg.add(Path(args[1])).manifest.version
        print(json.dumps({"version": version, "installed": any(installs)}), flush=True)
    elif mode == "flip":
        alias, n, targets = args[1], int(args[2]), args[3:]
        for i in range(n):
            reg.set_alias("range-fn", alias, targets[i % len(targets)])
        print("done", flush=True)
    """
)


def _child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(what: str, cond: Callable[[], bool], procs: list[subprocess.Popen[str]]) -> None:
    """Poll ``cond`` until true (bounded); fail at once if a child died."""
    deadline = time.monotonic() + 120
    while not cond():
        assert all(p.poll() is None for p in procs), f"a child exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _start_together(procs: list[subprocess.Popen[str]], go: Path) -> None:
    """Release the children at once, after every one has finished importing."""
    _wait_for(
        "the children to start", lambda: len(list(go.parent.glob(f"{go.name}.ready.*"))) == len(procs), procs
    )
    go.touch()


def _flock_waiters(lock: Path) -> set[int]:
    """Pids blocked in ``flock`` on ``lock`` (the ``->`` lines of Linux's /proc/locks)."""
    ino = str(lock.stat().st_ino)
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 6 and f[1] == "->" and f[6].rsplit(":", 1)[-1] == ino:
            pids.add(int(f[5]))
    return pids


def _queued_on_lock(procs: list[subprocess.Popen[str]], go: Path, lock: Path) -> None:
    """Wait until every child has staged its bundle and queued on ``lock`` (blocked in ``flock``, where
    /proc/locks shows it; else at the ``flock`` call)."""
    pids = {p.pid for p in procs}
    _wait_for(
        "the children to reach the lock",
        lambda: len(list(go.parent.glob(f"{go.name}.locking.*"))) == len(procs),
        procs,
    )
    if Path("/proc/locks").exists():
        _wait_for("the children to block on the lock", lambda: pids <= _flock_waiters(lock), procs)


def _wait(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out.strip()


def test_processes_adding_the_same_version_at_once_install_it_once(
    tmp_path: Path, range_bundle: Bundle
) -> None:
    root, go, v = tmp_path / "registry", tmp_path / "go", _v(range_bundle)
    root.mkdir()
    procs = [_child(str(root), "add", str(go), str(range_bundle.path)) for _ in range(3)]
    try:
        with open(root / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # the adders stage + verify, then queue on the lock
            _start_together(procs, go)
            _queued_on_lock(procs, go, root / ".lock")
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        results = [json.loads(_wait(p)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [r["version"] for r in results] == [v] * 3
    assert sorted(r["installed"] for r in results) == [False, False, True]  # the others found it, verified
    reg = Registry(root, trusted=None)
    assert reg.revision() == 1
    assert [p.name for p in (root / "functions" / "range-fn" / "versions").iterdir()] == [v]
    assert list((root / ".tmp").iterdir()) == []
    assert reg.aliases("range-fn") == {"latest": {v: 1.0}}
    assert reg.history("range-fn", "latest") == []
    assert reg.bundle("range-fn", v).manifest == range_bundle.manifest


def test_revision_is_monotonic_across_processes(reg: Registry, three: list[Bundle], tmp_path: Path) -> None:
    versions = [_v(b) for b in three]
    for b in three:
        reg.add(b.path)
    assert reg.resolve("range-fn") == versions[2]
    start, n = reg.revision(), 40
    go = tmp_path / "go"
    child = _child(str(reg.root), "flip", str(go), "child", str(n), *versions)
    _start_together([child], go)
    seen = [reg.revision()]
    for i in range(n):  # this process writes too, interleaved with the child
        reg.set_alias("range-fn", "parent", versions[i % 3])
        seen.append(reg.revision())
    while child.poll() is None:
        seen.append(reg.revision())
    assert _wait(child) == "done"
    seen.append(reg.revision())
    assert seen == sorted(seen)  # never goes backwards
    assert reg.revision() == start + 2 * n  # no lost update
    state = json.loads((reg.root / "functions" / "range-fn" / "aliases.json").read_text())
    assert len(state["history"]["child"]) == len(state["history"]["parent"]) == n - 1
    # the child's last move is visible here (the cached view follows the revision)
    assert reg.resolve("range-fn", "child") == versions[(n - 1) % 3]
    assert reg.aliases("range-fn")["parent"] == {versions[(n - 1) % 3]: 1.0}
