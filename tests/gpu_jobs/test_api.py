"""The package's public API: ``import gpu_jobs`` is cheap and names what it exports; ``train`` / ``score``
refuse bad arguments before any job runs, with the flag and the fix; the library prints nothing (no CLI
libraries in the package). Jobs through the API run in ``tests/e2e/test_dispatch.py``,
``tests/e2e/test_minimise.py`` and (through the CLI) ``tests/e2e/test_cli_jobs.py``."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_jobs
from depin_core.errors import ConfigError
from gpu_jobs import api

_IMPORT_COST = """
import json, sys
import gpu_jobs
heavy = sorted({"torch", "httpx", "pydantic", "pyarrow"} & set(sys.modules))
names = {name: type(getattr(gpu_jobs, name)).__name__ for name in gpu_jobs.__all__}
print(json.dumps({"heavy": heavy, "names": names}))
"""


def test_import_gpu_jobs_is_cheap_and_every_public_name_resolves() -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_COST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["heavy"] == []  # measured before any public name is touched
    assert {"train", "score", "run_chain", "JobSpec", "LocalRunner", "AgentRunner", "make_provider"} <= set(
        report["names"]
    )
    assert set(gpu_jobs.__all__) <= set(dir(gpu_jobs))
    assert gpu_jobs.train is api.train and gpu_jobs.score is api.score
    with pytest.raises(AttributeError):
        gpu_jobs.no_such_name  # noqa: B018


def test_the_package_imports_no_cli_library() -> None:
    """Progress reaches callers through ``on_log`` / ``on_status``; printing is the CLI's business."""
    root = Path(gpu_jobs.__file__).parent
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {
            (n.module or "").split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.level == 0
        }
        if roots & {"rich", "typer", "click"}:
            offenders[str(path.relative_to(root))] = sorted(roots & {"rich", "typer", "click"})
    assert offenders == {}


def test_bad_arguments_are_config_errors_before_any_job_runs(tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    data = tmp_path / "telemetry"
    data.mkdir()
    (data / "part-0.parquet").write_bytes(b"not read: nothing runs")
    with pytest.raises(ConfigError, match=r"--model 'gpt': choose one of anomaly, charging, range"):
        api.train(dataset=data, model="gpt", out=tmp_path / "m", jobs_dir=jobs_dir)
    with pytest.raises(ConfigError, match=r"--dataset .*missing: does not exist"):
        api.train(dataset=tmp_path / "missing", model="range", out=tmp_path / "m", jobs_dir=jobs_dir)
    with pytest.raises(ConfigError, match=r"--ground-truth .*nope: does not exist"):
        api.train(
            dataset=data, model="range", out=tmp_path / "m", ground_truth=tmp_path / "nope", jobs_dir=jobs_dir
        )

    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(
        ConfigError, match=r"not a model artifact \(no model\.json\); train one with `depin train`"
    ):
        api.score(model_dir=model, dataset=data, out=tmp_path / "s.parquet", jobs_dir=jobs_dir)
    for content, message in (
        ('{"family": "gpt"}', "model.json names family 'gpt', not one of anomaly, charging, range"),
        ("{not json", "model.json is not a JSON object"),
        ("[1]", "model.json is not a JSON object"),
    ):
        (model / "model.json").write_text(content)
        with pytest.raises(ConfigError, match=re.escape(message)):
            api.score(model_dir=model, dataset=data, out=tmp_path / "s.parquet", jobs_dir=jobs_dir)
    (model / "model.json").write_text('{"family": "anomaly"}')
    assert api.model_family(model) == "anomaly"
    with pytest.raises(ConfigError, match=r"--dataset .*missing: does not exist"):
        api.score(
            model_dir=model, dataset=tmp_path / "missing", out=tmp_path / "s.parquet", jobs_dir=jobs_dir
        )
    assert not jobs_dir.exists() and not (tmp_path / "s.parquet").exists()
