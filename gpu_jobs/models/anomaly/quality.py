"""The anomaly family's quality bar, baseline and report text: recall and false-positive rate against ground truth."""

from __future__ import annotations

import math
from typing import Any

from depin_core.plots import quantity
from gpu_jobs.models.base import Quality

# the naive baselines a model must beat (only when ground truth makes recall measurable)
MIN_RECALL = 0.5
MAX_FPR = 0.2


def _finite(metrics: dict[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def quality(metrics: dict[str, Any]) -> Quality:
    """Accepted when ``recall ≥ 0.5`` and ``false_positive_rate ≤ 0.2``, or when no ground truth made them
    measurable."""
    baseline = {"min_recall": MIN_RECALL, "max_false_positive_rate": MAX_FPR}
    recall, fpr = _finite(metrics, "recall"), _finite(metrics, "false_positive_rate")
    if recall is None:
        return Quality(accepted=True, baseline=baseline, reasons=["no ground truth: recall not measurable"])
    reasons = []
    if recall < MIN_RECALL:
        reasons.append(f"recall {recall:.3f} < {MIN_RECALL}")
    if fpr is not None and fpr > MAX_FPR:
        reasons.append(f"false_positive_rate {fpr:.3f} > {MAX_FPR}")
    return Quality(accepted=not reasons, baseline=baseline, reasons=reasons)


def summary(m: dict[str, Any]) -> str:
    """The held-out recall and false-positive rate against the bars (markdown, numbers for people)."""
    recall, fpr = _finite(m, "recall"), _finite(m, "false_positive_rate")
    if recall is None:
        return (
            f"No ground truth: recall not measurable; {quantity(_finite(m, 'heldout_flagged_share'), '%')} of "
            "the held-out windows flagged."
        )
    faults = f" ({m['faults_detected']} of {m['n_faults']} faults)" if "n_faults" in m else ""
    return (
        f"Held-out recall **{quantity(recall, '%')}**{faults}, false-positive rate **{quantity(fpr, '%')}** "
        f"(bars: recall ≥ {quantity(MIN_RECALL, '%', 2)}, FPR ≤ {quantity(MAX_FPR, '%', 2)})."
    )
