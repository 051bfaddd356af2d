"""The range family (EV energy / range model): kWh/100 km per trip, and from it the remaining range.

Two stages:

1. a small torch MLP, trained across the fleet, predicts ``log(kWh/100 km)`` of a trip from its driving and
   weather features (``features.RANGE_FEATURES``: speed profile, stop-and-go, temperature). It is trained
   with one free log offset per training vehicle (fixed effects), so it learns how consumption moves *within*
   a vehicle instead of explaining hidden vehicle differences with whatever happens to correlate with them;
2. a per-vehicle calibration, as real range estimators do: a Bayesian linear fit of the fleet model's
   residual on ``[1, hours per 100 km, cold]`` over the vehicle's own *previous* trips (level, auxiliaries'
   draw, cold sensitivity), shrunk towards 0 (a vehicle with no history gets the fleet model). It is causal:
   a trip's prediction never uses that trip or later ones.

Remaining range (km) = SoC/100 × usable kWh (gross capacity × SoH) / predicted kWh/100 km × 100.

Evaluation is on held-out vehicles (seeded split by ``token_id``): ``mae`` (kWh/100 km) against
``baseline_mae`` (the training vehicles' mean consumption, the naive baseline), plus the fleet model alone
(``fleet_model_mae``) and the fleet mean with the same per-vehicle calibration (``history_baseline_mae``: what
the vehicle's own history gives without the learned model).

Files: ``features.py`` (trips), ``model.py`` (net, calibration, predictions), ``train.py`` (training, held-out
evaluation), ``infer.py`` (batch scoring), ``online.py`` (the gateway's row-level model), ``quality.py`` (the
bar, the baseline and the report text), ``family.py`` (:class:`RangeFamily`, what the registry loads).
"""

from gpu_jobs.models.range.family import RangeFamily
from gpu_jobs.models.range.infer import score_dataset
from gpu_jobs.models.range.model import (
    CAL_FEATURES,
    DEFAULTS,
    OUTPUT_COLUMNS,
    TARGET,
    Calibration,
    RangeNet,
    calibration,
    fleet_predict,
    net_from_config,
    predict_trips,
)
from gpu_jobs.models.range.train import heldout_metrics

__all__ = [
    "CAL_FEATURES",
    "DEFAULTS",
    "OUTPUT_COLUMNS",
    "TARGET",
    "Calibration",
    "RangeFamily",
    "RangeNet",
    "calibration",
    "fleet_predict",
    "heldout_metrics",
    "net_from_config",
    "predict_trips",
    "score_dataset",
]
