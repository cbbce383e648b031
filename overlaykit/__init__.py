"""overlaykit: container images layer by layer, on a faithful OverlayFS simulator or the real kernel.

Heavy modules (graphviz, ipywidgets) load only when a diagram or widget is used, so ``import overlaykit``
stays fast.
"""
from .engine import (DOCKER_MAX_LOWERS, MAX_LOWERS, RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT,
                     BackendUnavailable, Change, Overlay, Stat, TraceEvent)
from .capabilities import capabilities
from .options import Options

__all__ = ["Overlay", "Options", "Stat", "RENAME_NOREPLACE", "RENAME_EXCHANGE", "RENAME_WHITEOUT", "Change", "TraceEvent", "BackendUnavailable", "capabilities", "MAX_LOWERS",
           "DOCKER_MAX_LOWERS"]
__version__ = "0.1.0"


def load_ipython_extension(ipython):
    """``%load_ext overlaykit``: registers the ``%%overlay`` cell magic (IPython is imported only here)."""
    from .magic import load_ipython_extension as load
    load(ipython)
