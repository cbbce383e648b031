"""overlaykit: container images layer by layer, on a faithful OverlayFS simulator or the real kernel.

Heavy modules (graphviz, ipywidgets) load only when a diagram or widget is used, so ``import overlaykit``
stays fast.
"""
from . import base
from .base import (DOCKER_MAX_LOWERS, MAX_LOWERS, RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT,
                   BackendUnavailable, Options, Stat)
from .engine import Change, Overlay, TraceEvent
from .capabilities import capabilities

__all__ = ["Overlay", "Options", "Stat", "RENAME_NOREPLACE", "RENAME_EXCHANGE", "RENAME_WHITEOUT", "Change", "TraceEvent", "BackendUnavailable", "capabilities", "MAX_LOWERS",
           "DOCKER_MAX_LOWERS"]
__version__ = "0.1.0"


def _draw_overlay(ov, include=None, exclude=None):
    """Stand-in display hook: the first overlay shown imports diagrams.py, which puts its own hook here."""
    from . import diagrams
    return diagrams.overlay_mimebundle(ov)


base.display_hooks.setdefault("overlay", _draw_overlay)


def load_ipython_extension(ipython):
    """``%load_ext overlaykit``: registers the ``%%overlay`` cell magic (IPython is imported only here)."""
    from .magic import load_ipython_extension as load
    load(ipython)
