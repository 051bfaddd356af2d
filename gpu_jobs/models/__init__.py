"""Model families, one folder each (``range/``, ``anomaly/``), and what they share: the ``ModelFamily``
protocol (``base.py``), telemetry features (``features.py``), the training loop (``_train.py``), streaming
batch scoring (``score.py``) and the online-predictor framework (``online.py``). Families are found by name
through ``gpu_jobs.registry``; nothing outside a family's folder imports it."""
