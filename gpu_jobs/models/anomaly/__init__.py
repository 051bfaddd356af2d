"""The anomaly family (anomaly detector): one small forecaster per vehicle type (EV, combustion) over fixed windows.

Each window (default 30 min, epoch-aligned, per vehicle) becomes a vector of physically meaningful features
(``features.ANOMALY_FEATURES``), robustly normalized (median/MAD of the training split). The window's
score is the largest squared residual of its *condition* features (tyres, 12 V, battery or coolant temperature)
against what a small MLP expects from the window's *context* (driving, charging, power, air), each residual
divided by that feature's typical residual on the training windows (``model.residual_scales``), so a loosely
predictable signal (coolant) does not set the threshold for a tight one (12 V). The threshold per type is the
``threshold_quantile`` of the training windows' scores after dropping gross outliers (above ``outlier`` × the
median): the training vehicles carry unlabelled faults, and fault labels are never used in training.

Evaluation against injected-fault ground truth (``faults.parquet``), on held-out vehicles only:

- a fault's *visible* windows are the windows fully inside ``[start, end)`` where its effect can physically
  be seen: ``tire_leak`` once the tyre has lost 3 kPa (``start + 3 kPa / rate``); ``weak_12v`` windows at least
  half parked (the voltage sags at rest, not while the alternator runs); ``battery_overheat`` windows at least
  a quarter spent driving (the pack heats under load);
- ``recall`` = share of faults with at least one visible window of which **at least half are flagged** (a
  majority rule, so a detector that flags 5 % of windows at random scores ~0, not ~1 as with "any overlap");
  ``window_recall`` = share of all visible windows flagged; faults with no visible window are counted in
  ``faults_not_visible`` and left out;
- ``false_positive_rate`` = flagged share of the windows that overlap no fault (each fault extended by
  ``FAULT_TAIL`` for the pack to cool down).

Files: ``features.py`` (fixed windows, tyre baselines), ``model.py`` (nets, scores, scales, thresholds),
``faults.py`` (evaluation against the ground truth), ``train.py`` (training, held-out evaluation), ``infer.py``
(batch scoring), ``online.py`` (the gateway's row-level model), ``quality.py`` (the bar, the baseline and the
report text), ``family.py`` (:class:`AnomalyFamily`, what the registry loads).
"""

from gpu_jobs.models.anomaly.family import AnomalyFamily
from gpu_jobs.models.anomaly.faults import evaluate, visible_windows
from gpu_jobs.models.anomaly.infer import score_dataset
from gpu_jobs.models.anomaly.model import (
    DEFAULTS,
    TYPES,
    ConditionNet,
    build_net,
    norms,
    residual_scales,
    residuals,
    score_windows,
    threshold_from,
)
from gpu_jobs.models.anomaly.train import heldout_metrics

__all__ = [
    "DEFAULTS",
    "TYPES",
    "AnomalyFamily",
    "ConditionNet",
    "build_net",
    "evaluate",
    "heldout_metrics",
    "norms",
    "residual_scales",
    "residuals",
    "score_dataset",
    "score_windows",
    "threshold_from",
    "visible_windows",
]
