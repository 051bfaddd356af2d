"""Small charging problems for the tests (seeded, deterministic)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from gpu_jobs.charging import ChargingProblem, EvDemand, Site
from gpu_jobs.charging.dynex import INSTALL_HINT
from tests.support.ci import require

START = datetime(2026, 1, 5, 12, tzinfo=UTC)
KEY = "dnx-test-key-5b7e1c9a44f0d2"  # the fake Dynex's SDK key: it must never appear in a log or an error


def require_sdk() -> None:
    """Skip (fail under CI) without the Dynex SDK: the fake is built on its stubs."""
    try:
        import dynex  # noqa: F401
    except ImportError:
        require(f"the Dynex SDK is not installed: {INSTALL_HINT}")


def site(**kw: object) -> Site:
    args: dict[str, object] = {"chargers": 2, "charger_kw": 11.0, "start": START}
    args.update(kw)
    return Site.model_validate(args)


def random_problem(n: int, seed: int = 0, *, slots: int = 96, mixed_kw: bool = True) -> ChargingProblem:
    """A depot of ``n`` EVs arriving in the evening and leaving in the morning; chargers and grid cap bind."""
    rng = np.random.default_rng(seed)
    chargers = max(2, round(0.4 * n))
    s = site(chargers=chargers, grid_cap_kw=0.75 * chargers * 11.0, slots=slots)
    scale = slots / 96
    vehicles = []
    for i in range(n):
        a = int(rng.integers(int(20 * scale), int(33 * scale)))
        d = int(rng.integers(int(72 * scale), int(81 * scale)))
        vehicles.append(
            EvDemand(
                vehicle=str(1000 + i),
                need_kwh=round(float(rng.uniform(5, 40)), 2),
                arrive_slot=a,
                depart_slot=max(d, a + 1),
                max_kw=7.4 if mixed_kw and rng.random() < 0.3 else None,
            )
        )
    return ChargingProblem(site=s, vehicles=vehicles)
