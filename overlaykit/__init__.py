"""overlaykit: container images layer by layer, on a faithful OverlayFS simulator or the real kernel.

Heavy modules (graphviz, ipywidgets) load only when a diagram or widget is used, so ``import overlaykit``
stays fast.
"""
from .engine import (DOCKER_MAX_LOWERS, MAX_LOWERS, RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT,
                     BackendUnavailable, Change, Overlay, Stat, TraceEvent)
from .capabilities import capabilities

__all__ = ["Overlay", "Stat", "RENAME_NOREPLACE", "RENAME_EXCHANGE", "RENAME_WHITEOUT", "Change", "TraceEvent", "BackendUnavailable", "capabilities", "MAX_LOWERS",
           "DOCKER_MAX_LOWERS"]
__version__ = "0.1.0"
