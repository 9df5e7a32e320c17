"""Where sandbox workers run: ``local`` processes on this host (more backends to come)."""

from .local import LocalWorkers

__all__ = ["LocalWorkers"]
