"""``depin plan``: a charging plan for the fleet in a telemetry dataset (``pipelines._charging.run_plan``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from depin_core.errors import ConfigError
from depin_core.paths import PLANS_DIR
from depin_core.plots import quantity, sig
from pipelines.cli._output import JsonOpt, emit_json, say

SOLVER_NAMES = ("exact", "anneal", "dynex", "greedy")


def plan(
    dataset: Annotated[str, typer.Option(help="telemetry dataset: directory or s3://bucket/prefix")],
    site: Annotated[
        Path,
        typer.Option(
            help="site.json: chargers, charger_kw, grid_cap_kw, tariff, timezone, plug_in, departure"
        ),
    ],
    solver: Annotated[
        list[str] | None,
        typer.Option(
            help="solver, repeatable for a chain tried in order: exact, anneal, dynex, greedy (default exact); "
            "dynex reads DYNEX_SDK_KEY"
        ),
    ] = None,
    range_function: Annotated[
        str, typer.Option(help="the published range function giving each EV's kWh/100 km")
    ] = "range@prod",
    gateway_url: Annotated[
        str | None,
        typer.Option(help="gateway serving it (default: DEPIN_GATEWAY_URL, else http://127.0.0.1:8787)"),
    ] = None,
    kwh_per_100km: Annotated[
        float | None, typer.Option(help="use this consumption for every EV instead of the range function")
    ] = None,
    out: Annotated[Path | None, typer.Option(help=f"plans directory (default {PLANS_DIR})")] = None,
    seed: Annotated[int, typer.Option(help="seed of the stochastic solvers")] = 0,
    time_limit_s: Annotated[float, typer.Option(help="limit of one solver attempt (s)")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Plan tonight's charging: each EV's need from its telemetry and the range function, the cheapest
    schedule within the chargers and the grid cap; writes the plan (Parquet) and its plot (PNG)."""
    from pipelines._charging import PlanChargingParams, attempt_text, run_plan

    chain = solver or ["exact"]
    for s in chain:
        if s not in SOLVER_NAMES:
            raise ConfigError(f"--solver {s!r}: choose one of {', '.join(SOLVER_NAMES)}")
    fields = {"out": out} if out is not None else {}
    params = PlanChargingParams(
        dataset=dataset,
        site=site,
        solvers=chain,  # checked above
        range_function=range_function,
        gateway_url=gateway_url,
        kwh_per_100km=kwh_per_100km,
        seed=seed,
        time_limit_s=time_limit_s,
        **fields,
    )
    result, _, _ = run_plan(params)
    for a in result.attempts:
        say(f"solver {attempt_text(a)}")
    say(
        ("plan", "bold"),
        f" by {result.solver}: {result.vehicles} EVs, {quantity(result.energy_kwh, 'kWh')} of "
        f"{quantity(result.need_kwh, 'kWh')}, cost {sig(result.cost)} (on arrival {sig(result.baseline_cost)}), "
        f"{len(result.unmet)} unmet, {result.skipped} skipped → {result.plan_path}",
    )
    if as_json:
        emit_json(result.model_dump(mode="json"))
