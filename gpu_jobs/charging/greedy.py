"""The baseline: charge on arrival. Slot by slot, plugged-in vehicles that still need energy charge at once,
first come first served (ties: earlier departure, then vehicle id), as far as chargers and grid cap allow."""

from __future__ import annotations

from gpu_jobs.charging.layout import Layout, Schedule


def solve_greedy(lay: Layout) -> Schedule:
    """The charge-on-arrival schedule; never exceeds chargers, grid cap or windows (it may fall short)."""
    left = [int(k) for k in lay.target]
    out: Schedule = {v: [] for v in lay.ids}
    order = sorted(range(len(lay.ids)), key=lambda v: (lay.arrive[v], lay.depart[v], lay.ids[v]))
    for t in range(lay.problem.site.slots):
        used_n, used_kw = 0, 0.0
        for v in order:
            if used_n >= lay.chargers:
                break
            if left[v] <= 0 or not (lay.arrive[v] <= t < lay.depart[v]):
                continue
            if used_kw + lay.kw[v] > lay.cap_kw + 1e-9:
                continue
            out[lay.ids[v]].append(t)
            left[v] -= 1
            used_n += 1
            used_kw += float(lay.kw[v])
    return out
