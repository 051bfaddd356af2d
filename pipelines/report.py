"""Reports for people: the plots and metrics of a model artifact (and of its dataset) as markdown for Prefect
artifacts, and as one self-contained HTML file (``depin report``).

The PNGs are embedded as ``data:image/png;base64,…`` (Prefect's artifact page and browsers show both
``![](data:…)`` and ``<img src="data:…">``). Numbers are for people here (3 significant digits, units);
the JSON outputs keep full precision. Model plots come from the artifact (``plots/``, drawn after training
by ``gpu_jobs.plots.render``; drawn now when an older artifact has none), fleet plots are drawn from the
dataset (``connectors.dimo.plots``).
"""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.dimo.plots import render_fleet
from depin_core import plots as P
from depin_core.fs import atomic_write_bytes
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.plots import read_plots
from gpu_jobs.plots import render as render_plots
from gpu_jobs.registry import family_names, load_family

# units of the metrics the families report, for people (a metric not named here is shown bare)
UNITS = {
    "mae": "kWh/100 km",
    "baseline_mae": "kWh/100 km",
    "fleet_model_mae": "kWh/100 km",
    "history_baseline_mae": "kWh/100 km",
    "mape": "%",
    "range_mae_km": "km",
    "baseline_range_mae_km": "km",
    "recall": "%",
    "window_recall": "%",
    "false_positive_rate": "%",
    "heldout_flagged_share": "%",
    "flagged_share": "%",
}


def human(key: str, value: Any) -> str:
    """A metric's value for people: numbers to 3 significant digits with the metric's unit; dicts as
    ``k: v`` pairs; anything else as text."""
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')}: {human(k, v)}" for k, v in value.items())
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    return P.quantity(value, UNITS.get(key))


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(metric, value for people, full-precision value) for every scalar metric."""
    return [(k, human(k, v), v) for k, v in metrics.items() if v is None or isinstance(v, int | float | str)]


def model_plots(model_dir: Path | str, *, render_missing: bool = True) -> dict[str, dict[str, Any]]:
    """The artifact's plots: ``{name: {"title", "png" bytes, "file"} | {"title", "missing": reason}}``; an
    artifact without a ``plots`` record (trained before plots) is rendered first when ``render_missing``."""
    d = Path(model_dir)
    listed = read_plots(d)
    if not listed and render_missing and "plots" not in json.loads((d / "manifest.json").read_bytes()):
        listed = render_plots(d)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in listed.items():
        title = str(entry.get("title", name))
        path = d / str(entry.get("file", ""))
        if "missing" in entry or not path.is_file():
            out[name] = {"title": title, "missing": str(entry.get("missing", f"{path.name} is not there"))}
        else:
            out[name] = {"title": title, "png": path.read_bytes(), "file": str(path)}
    return out


def plots_markdown(plots: dict[str, dict[str, Any]], heading: str = "## Plots") -> str:
    """A markdown section with each plot inline, or the reason it is missing."""
    if not plots:
        return ""
    lines = [heading, ""]
    for p in plots.values():
        if "png" in p:
            lines += [f"**{p['title']}**", "", P.markdown_image(p["png"], p["title"]), ""]
        else:
            lines += [f"*{p['title']}: plot missing ({p['missing']})*", ""]
    return "\n".join(lines).rstrip() + "\n"


def model_plots_markdown(model_dir: Path | str) -> str:
    """The model report's plots section (never raises: an unreadable artifact gives a line saying so)."""
    try:
        return plots_markdown(model_plots(model_dir))
    except Exception as e:
        return f"*plots unavailable: {type(e).__name__}: {e}*\n"


def fleet_plots_markdown(dataset: Path | str) -> str:
    """The ingest report's plots section: tracks and coverage of the dataset (missing ones say why)."""
    return plots_markdown(render_fleet(dataset), heading="## Fleet")


def _md_inline(text: str) -> str:
    """``**bold**`` and ``code`` of a family's one-paragraph summary as HTML."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1.5rem 0}img{max-width:100%}
figcaption{font-weight:600;margin-bottom:.4rem}.missing{color:#a33}code{font-size:.9em}"""


def html_report(
    model_dir: Path | str,
    *,
    dataset: Path | str | None = None,
    fleet: dict[str, dict[str, Any]] | None = None,
) -> str:
    """One self-contained HTML page: the family's summary, the metrics table, the model's plots and, with
    ``dataset``, the fleet plots (or pass them drawn as ``fleet``)."""
    d = Path(model_dir)
    art = load_artifact(d)  # every file against the manifest before anything is shown
    family_name = str(art.model_config.get("family"))
    family = load_family(family_name, allow_import_path=False) if family_name in family_names() else None
    summary = family.summary(art.metrics) if family is not None and hasattr(family, "summary") else ""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(family_name)} model report</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(family_name)} model report</h1>",
        f"<p>Artifact <code>{html.escape(str(d))}</code>, trained {html.escape(str(art.manifest.get('created_at')))}"
        f" on {html.escape(_device(art.manifest.get('device')))}.</p>",
    ]
    if summary:
        parts.append(f"<p>{_md_inline(summary)}</p>")
    held = art.model_config.get("heldout_vehicles")
    if isinstance(held, list):
        parts.append(f"<p>Held-out vehicles: {html.escape(', '.join(str(v) for v in held))}</p>")
    parts += ["<h2>Metrics</h2>", "<table><tr><th>metric</th><th>value</th></tr>"]
    for key, shown, raw in metric_rows(art.metrics):
        parts.append(
            f'<tr><td>{html.escape(key)}</td><td class="n" title="{html.escape(repr(raw))}">'
            f"{html.escape(shown)}</td></tr>"
        )
    parts.append("</table>")
    parts += _figures("Plots", model_plots(d))
    if fleet is None and dataset is not None:
        fleet = render_fleet(dataset)
    if fleet:
        parts += _figures("Fleet", fleet)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p><small>depin report, {stamp}.</small></p></body></html>")
    return "\n".join(parts) + "\n"


def _device(info: Any) -> str:
    """``cuda:0 (NVIDIA H100)`` / ``cpu`` from the manifest's device record."""
    if not isinstance(info, dict):
        return "an unrecorded device"
    kind = str(info.get("type", "?"))
    label = f"cuda:{info.get('index', 0)}" if kind == "cuda" else kind
    return f"{label} ({info['name']})" if info.get("name") and kind == "cuda" else label


def _figures(heading: str, plots: dict[str, dict[str, Any]]) -> list[str]:
    out = [f"<h2>{html.escape(heading)}</h2>"]
    for p in plots.values():
        title = html.escape(p["title"])
        if "png" in p:
            out.append(
                f"<figure><figcaption>{title}</figcaption>{P.html_image(p['png'], p['title'])}</figure>"
            )
        else:
            out.append(f'<p class="missing">{title}: plot missing ({html.escape(p["missing"])})</p>')
    return out


def write_report(
    model_dir: Path | str, out: Path | str, *, dataset: Path | str | None = None
) -> dict[str, Any]:
    """Write :func:`html_report` to ``out``; the paths: ``{"report", "model", "plots": {name: file |
    None}, "fleet_plots": {name: None}, "missing": {name: reason}}`` (fleet PNGs live only in the page)."""
    fleet = render_fleet(dataset) if dataset is not None else None
    page = html_report(model_dir, dataset=dataset, fleet=fleet)
    atomic_write_bytes(Path(out), page.encode())
    plots = model_plots(model_dir, render_missing=False)
    missing = {n: p["missing"] for n, p in {**plots, **{f"fleet.{k}": v for k, v in (fleet or {}).items()}}.items()
               if "missing" in p}  # fmt: skip
    return {
        "report": str(Path(out).resolve()),
        "model": str(Path(model_dir).resolve()),
        "dataset": str(Path(dataset).resolve()) if dataset is not None else None,
        "plots": {n: p.get("file") for n, p in plots.items()},
        "fleet_plots": sorted(fleet or {}),
        "missing": missing,
        "bytes": Path(out).stat().st_size,
    }
