"""The plot of a charging plan: chargers in use per slot against the tariff (data, then drawing)."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from depin_core import plots as P
from gpu_jobs.charging import ChargingProblem, Plan, ev_kw

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plan_data(problem: ChargingProblem, plan: Plan) -> dict[str, Any]:
    """Per slot: its start (UTC), chargers in use, charging power (kW) and tariff; plus the site's limits."""
    site = problem.site
    kw = {ev.vehicle: ev_kw(site, ev) for ev in problem.vehicles}
    in_use, power = [0] * site.slots, [0.0] * site.slots
    for vehicle, slots in plan.schedule.items():
        for s in slots:
            in_use[s] += 1
            power[s] += kw[vehicle]
    step = timedelta(minutes=site.slot_minutes)
    return {
        "start": [(site.start + i * step).isoformat() for i in range(site.slots)],
        "chargers_in_use": in_use,
        "power_kw": [round(p, 6) for p in power],
        "tariff": site.prices(),
        "chargers": site.chargers,
        "grid_cap_kw": site.cap_kw,
        "solver": plan.solver,
        "cost": plan.cost,
    }


def draw_plan(data: dict[str, Any]) -> Figure:
    """Chargers in use per slot (bars) with the charger count, and the tariff per slot on a second axis."""
    fig = P.figure(8.0, 3.8)
    ax = fig.add_subplot()
    x = list(range(len(data["start"])))
    ax.bar(x, data["chargers_in_use"], width=1.0, color="tab:blue", alpha=0.7, label="chargers in use")
    ax.axhline(data["chargers"], color="tab:blue", linestyle="--", linewidth=1, label="chargers at the site")
    ax.set_ylim(0, data["chargers"] + 0.5)
    ax.set_ylabel("chargers in use")
    step = max(1, len(x) // 8)
    ax.set_xticks(x[::step], [s[5:16].replace("T", " ") for s in data["start"][::step]], rotation=30)
    ax.set_xlabel(f"slot start (site time, {data['start'][0][-6:] if data['start'] else ''})")
    right = ax.twinx()
    right.step(x, data["tariff"], where="mid", color="tab:orange", label="tariff")
    right.set_ylabel("tariff (per kWh)")
    ax.set_title(f"Charging plan ({data['solver']}): cost {P.sig(data['cost'])}")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return fig


def plan_png(problem: ChargingProblem, plan: Plan) -> bytes:
    """The plan's plot as PNG bytes carrying the digest of its data (``depin_core.plots.encode_png``)."""
    data = plan_data(problem, plan)
    return P.encode_png(draw_plan(data), data)
