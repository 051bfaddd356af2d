"""Torch training and inference jobs on vehicle telemetry, and the runners that execute them
(``LocalRunner``: CUDA when available, else CPU; remote GPU-network runners come later)."""
