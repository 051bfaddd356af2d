"""Draw a model artifact's report plots here, after verification: ``plots/<name>.png`` in the artifact,
listed in its manifest with their sha256, and the manifest's ``plots`` section saying for each plot its
file, or that it is missing and why.

The family's ``plots(model_dir)`` (optional; see ``gpu_jobs.models.base.Plot``) computes each plot's data
from the artifact's ``report/`` files, which name the real vehicles by now (``restore_outputs`` ran). A plot
that fails is logged and recorded as missing; :func:`render` never raises, so a plot never fails a training
run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from depin_core import plots as P
from gpu_jobs.artifacts import MANIFEST, MODEL, update_artifact
from gpu_jobs.registry import load_family

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"


def plot_file(name: str) -> str:
    """The artifact path of plot ``name``."""
    return f"{PLOTS_DIR}/{name}.png"


def render(
    model_dir: Path | str, *, on_log: Callable[[str], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Draw the family's plots of the artifact at ``model_dir`` into it (replacing earlier ones) and list
    them in its manifest; ``{name: {"file", "title", "bytes", "data_sha256"} | {"title", "missing": reason}}``.
    Never raises: a failure is logged (and sent to ``on_log``) and recorded as missing."""
    d = Path(model_dir)

    def note(message: str) -> None:
        log.warning(message)
        if on_log is not None:
            on_log(message)

    try:
        family = load_family(str(json.loads((d / MODEL).read_bytes()).get("family")))
        specs = family.plots(d) if callable(getattr(family, "plots", None)) else []
    except Exception as e:
        note(f"plots of {d}: none drawn ({type(e).__name__}: {e})")
        return _record(d, {}, {"all": {"title": "model report plots", "missing": f"{type(e).__name__}: {e}"}})
    files: dict[str, bytes | None] = {}
    listed: dict[str, dict[str, Any]] = {}
    for spec in specs:
        try:
            data = spec.data()
            fig = spec.draw(data)
            png = P.encode_png(fig, data)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"[:500]
            note(f"plot {spec.name} of {d} is missing: {reason}")
            listed[spec.name] = {"title": spec.title, "missing": reason}
            continue
        files[plot_file(spec.name)] = png
        listed[spec.name] = {"title": spec.title, "file": plot_file(spec.name), "bytes": len(png),
                             "data_sha256": P.data_digest(data)}  # fmt: skip
    return _record(d, files, listed)


def _record(
    d: Path, files: dict[str, bytes | None], listed: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    try:
        manifest = json.loads((d / MANIFEST).read_bytes())
        stale = [n for n in manifest.get("files", {}) if n.startswith(f"{PLOTS_DIR}/") and n not in files]
        update_artifact(d, {**dict.fromkeys(stale), **files}, manifest={"plots": listed})
    except Exception as e:  # the artifact itself is fine; only its plots could not be recorded
        log.warning("plots of %s: could not be recorded in the manifest (%s: %s)", d, type(e).__name__, e)
        return {n: {"title": v.get("title", n), "missing": f"not recorded: {e}"} for n, v in listed.items()}
    return listed


def read_plots(model_dir: Path | str) -> dict[str, dict[str, Any]]:
    """The manifest's ``plots`` section of the artifact at ``model_dir`` ({} when it was never rendered)."""
    manifest = json.loads((Path(model_dir) / MANIFEST).read_bytes())
    plots = manifest.get("plots")
    return plots if isinstance(plots, dict) else {}
