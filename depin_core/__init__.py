"""Shared kernel of depin-pipeline: the error tree, time parsing, atomic files.

Every package (connectors, gpu_jobs, serving, pipelines) may import this one; it imports none of them.
"""

from depin_core.errors import ConfigError, DepinError, PermanentError, TransientError

__all__ = ["ConfigError", "DepinError", "PermanentError", "TransientError"]
