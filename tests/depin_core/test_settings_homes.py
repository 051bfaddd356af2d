"""Settings, default paths and the function-name rule each live in one place.

- Only settings modules (``*/settings.py``, pydantic-settings models) read ``DEPIN_*`` variables; the few
  other reads are listed in ``ENV_READS_ALLOWED`` with the reason each cannot go through a settings object.
- ``.depin`` paths are spelled only in ``depin_core/paths.py``.
- Every check of a function name agrees with ``serving.names``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from depin_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("connectors", "depin_core", "gpu_jobs", "serving", "pipelines")
READERS = {"get", "pop", "getenv", "setdefault"}

# (module, variable constant or literal) -> why it is read outside a settings model
_DIMO_PROBE = (
    "decides whether `depin up` starts the emulator; must not fail on a half-configured DIMO environment, "
    "which DimoSettings would refuse"
)
_POPPED = "a delete (os.environ.pop), not a read: job workers must not inherit the admin token"
_TLS = (
    "read and removed from os.environ in one step (depin_core.tls.from_env, pop=True), so job workers never "
    "inherit the node's TLS key; a settings object would leave it in the environment"
)
ENV_READS_ALLOWED = {
    ("gpu_jobs/agent/server.py", "TLS_CERT_ENV"): _TLS,
    ("gpu_jobs/agent/server.py", "TLS_KEY_ENV"): _TLS,
    ("gpu_jobs/agent/server.py", "TOKEN_ENV"): _POPPED,
    ("pipelines/cli/worker.py", "TOKEN_ENV"): _POPPED,
    ("pipelines/stack/up.py", "DEPIN_DIMO_ENV"): _DIMO_PROBE,
    ("pipelines/stack/up.py", "DEPIN_DIMO_ENVIRONMENT"): _DIMO_PROBE,
    ("pipelines/stack/up.py", "DEPIN_DIMO_CLIENT_ID"): _DIMO_PROBE,
    ("pipelines/stack/up.py", "DEPLOYMENTS_ENV"): (
        "the `depin up` child entry's module:function hand-off (set by its parent, or by a test for that "
        "child), not user configuration"
    ),
}


def package_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _depin_constants(trees: dict[Path, ast.Module]) -> set[str]:
    """Names bound at module level to a ``"DEPIN_…"`` string (or to another such name), in any module."""
    names: set[str] = set()
    for _ in range(3):  # X = "DEPIN_…"; Y = X
        for tree in trees.values():
            for node in tree.body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target, value = node.targets[0], node.value
                    if isinstance(target, ast.Name) and (
                        (isinstance(value, ast.Constant) and str(value.value).startswith("DEPIN_"))
                        or (isinstance(value, ast.Name) and value.id in names)
                    ):
                        names.add(target.id)
    return names


def _depin_key(node: ast.AST, constants: set[str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("DEPIN_"):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return node.id
    return None


def _is_os_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def env_reads(source: str, constants: set[str]) -> list[str]:
    """The ``DEPIN_*`` keys ``source`` reads from an environment mapping: ``x.get(KEY)`` / ``pop`` /
    ``setdefault`` / ``os.getenv(KEY)``, ``env[KEY]`` (load), or any call given both ``os.environ`` and KEY."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            keys = [k for a in node.args if (k := _depin_key(a, constants))]
            func = node.func
            name = getattr(func, "attr", None) or getattr(func, "id", "")
            if node.args and name in READERS and (k := _depin_key(node.args[0], constants)):
                found.append(k)
            elif keys and any(_is_os_environ(a) for a in [*node.args, *(kw.value for kw in node.keywords)]):
                found.extend(keys)
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and (k := _depin_key(node.slice, constants))
        ):
            found.append(k)
    return found


def test_the_env_read_check_finds_reads() -> None:
    consts = {"TOKEN_ENV"}
    src = (
        "import os\nA = os.environ.get('DEPIN_X')\nB = env['DEPIN_Y']\nC = os.getenv(TOKEN_ENV)\n"
        "D = from_env(TOKEN_ENV, os.environ)\nenv['DEPIN_Z'] = '1'\nE = {'DEPIN_W': 1}\n"
    )
    assert env_reads(src, consts) == ["DEPIN_X", "DEPIN_Y", "TOKEN_ENV", "TOKEN_ENV"]


def test_only_settings_modules_read_depin_variables() -> None:
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in package_modules()}
    constants = _depin_constants(trees)
    seen, unexpected = set(), []
    for path in trees:
        rel = _rel(path)
        if path.name == "settings.py":
            continue
        for key in env_reads(path.read_text(encoding="utf-8"), constants):
            if (rel, key) in ENV_READS_ALLOWED:
                seen.add((rel, key))
            else:
                unexpected.append(f"{rel}: {key}")
    assert not unexpected, f"read these through the package's settings model instead: {unexpected}"
    stale = set(ENV_READS_ALLOWED) - seen
    assert not stale, f"allowed reads that are gone; remove them from ENV_READS_ALLOWED: {sorted(stale)}"


_DEPIN_PATH = re.compile(r"\.depin(/|[\"'`])")


def test_depin_paths_are_spelled_only_in_depin_core_paths() -> None:
    offenders = [
        f"{_rel(p)}:{n}"
        for p in package_modules()
        if _rel(p) != "depin_core/paths.py"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
        if _DEPIN_PATH.search(line)
    ]
    assert not offenders, f"use depin_core.paths instead of spelling .depin paths: {offenders}"
    from depin_core import paths

    for name in paths.__all__:
        value = getattr(paths, name)
        assert value == paths.HOME or value.is_relative_to(paths.HOME), name
        assert not value.is_absolute(), name  # relative to the working directory, like today


# ------------------------------------------------------------------------------------------- settings


def test_gpu_jobs_settings_precedence_and_mapping() -> None:
    from gpu_jobs.settings import GpuJobsSettings

    s = GpuJobsSettings.from_env(
        {"DEPIN_VAST_URL": "", "VAST_URL": "http://root", "DEPIN_VAST_API_KEY": "  "}
    )
    assert s.vast_url == "http://root"  # empty DEPIN_VAST_URL counts as unset, then the official VAST_URL
    assert s.provider_key("vast") is None  # blank key = no key
    s = GpuJobsSettings.from_env({"DEPIN_VAST_URL": "http://ours", "VAST_URL": "http://root"})
    assert s.vast_url == "http://ours"
    s = GpuJobsSettings.from_env({"DEPIN_AGENT_TOKEN": "t" * 20}, ionet_url="http://kw")
    assert s.ionet_url == "http://kw" and "t" * 20 not in repr(s)
    assert s.agent_token is not None and s.agent_token.get_secret_value() == "t" * 20


def test_an_env_mapping_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_jobs.chain import DefaultRunnerFactory, parse_entry
    from gpu_jobs.providers import make_provider

    monkeypatch.setenv("DEPIN_VAST_API_KEY", "from-the-process")
    monkeypatch.setenv("DEPIN_AGENT_TOKEN", "x" * 24)
    with pytest.raises(ConfigError, match="set DEPIN_VAST_API_KEY"):
        make_provider("vast", env={})
    with pytest.raises(ConfigError, match="set DEPIN_VAST_API_KEY"):
        DefaultRunnerFactory("jobs", env={}).check(parse_entry("vast"))
    with pytest.raises(ConfigError, match="DEPIN_AGENT_TOKEN"):
        DefaultRunnerFactory("jobs", env={}, nodes_file="/nonexistent").check(
            parse_entry("agent:http://127.0.0.1:9")
        )
    provider = make_provider("ionet", env={"DEPIN_IONET_API_KEY": "k", "DEPIN_IONET_URL": "http://io.test"})
    assert "io.test" in repr(provider._api)  # type: ignore[union-attr]  # the URL came from the mapping


def test_gateway_client_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipelines._targets import local_gateway_url, read_admin_key

    monkeypatch.setenv("DEPIN_GATEWAY_URL", "http://gw.test:1/")
    monkeypatch.setenv("DEPIN_ADMIN_KEY", "  admin-key  ")
    assert local_gateway_url() == "http://gw.test:1" and local_gateway_url("http://a:2") == "http://a:2"
    assert read_admin_key(None, tmp_path).get_secret_value() == "admin-key"
    monkeypatch.setenv("DEPIN_GATEWAY_URL", "")
    monkeypatch.setenv("DEPIN_ADMIN_KEY", " ")
    assert local_gateway_url() == "http://127.0.0.1:8787"
    with pytest.raises(ConfigError, match="DEPIN_ADMIN_KEY"):
        read_admin_key(None, tmp_path)


# ------------------------------------------------------------------------------------- function names

NAMES = ["a", "range", "0-x_y", "a" * 63]
NOT_NAMES = ["", "A", "-a", "_a", "a" * 64, "a.b", "a b", "a\n", "é"]


@pytest.mark.parametrize("name", NAMES + NOT_NAMES)
def test_every_function_name_check_agrees(name: str) -> None:
    from pydantic import ValidationError

    from depin_core.names import is_function_name
    from pipelines.params import PublishParams
    from serving.bundle import valid_name
    from serving.errors import BundleError
    from serving.registry import NAME_RE

    legal = name in NAMES
    assert is_function_name(name) is legal
    assert bool(NAME_RE.fullmatch(name)) is legal
    try:
        valid_name(name)
        bundle_ok = True
    except BundleError:
        bundle_ok = False
    try:
        PublishParams(name=name)
        params_ok = True
    except ValidationError:
        params_ok = False
    assert bundle_ok is legal and params_ok is legal
