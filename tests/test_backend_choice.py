"""Which backend an Overlay gets: OVERLAYKIT_BACKEND decides what "auto" means, an explicit choice is
honoured or fails with the capability's reason (issue 12 item 8)."""
from __future__ import annotations

import importlib

import pytest

from overlaykit import BackendUnavailable, Overlay, capabilities, course
from overlaykit.capabilities import BackendInfo

KERNEL = capabilities()["kernel"]
capabilities_module = importlib.import_module("overlaykit.capabilities")  # the package's name is the function


def backend_of(tmp_path, backend: str) -> str:
    return Overlay([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", backend=backend).backend


@pytest.fixture
def no_kernel(monkeypatch):
    """A machine where the kernel backend is not allowed, with its reason."""
    table = {"sim": BackendInfo("sim", True, "pure Python"),
             "kernel": BackendInfo("kernel", False, "this kernel has no overlay filesystem (test double)")}
    monkeypatch.setattr(capabilities_module, "capabilities", lambda: table)


@pytest.mark.parametrize("env", ["sim", "kernel", "auto", ""])
def test_an_explicit_sim_is_honoured_whatever_the_variable_says(tmp_path, monkeypatch, env):
    monkeypatch.setenv("OVERLAYKIT_BACKEND", env)
    assert backend_of(tmp_path, "sim") == "sim"


@pytest.mark.kernel
@pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")
@pytest.mark.parametrize("env", ["sim", "kernel", "auto", ""])
def test_an_explicit_kernel_is_honoured_whatever_the_variable_says(tmp_path, monkeypatch, env):
    monkeypatch.setenv("OVERLAYKIT_BACKEND", env)
    assert backend_of(tmp_path, "kernel") == "kernel"


def test_the_variable_decides_what_auto_means(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERLAYKIT_BACKEND", "sim")
    assert backend_of(tmp_path, "auto") == "sim"
    assert course.lesson_overlay(tmp_path / "ws").backend == "sim"  # the lessons' overlays use auto
    monkeypatch.setenv("OVERLAYKIT_BACKEND", "auto")
    assert backend_of(tmp_path, "auto") == ("kernel" if KERNEL.available else "sim")
    monkeypatch.delenv("OVERLAYKIT_BACKEND")
    assert backend_of(tmp_path, "auto") == ("kernel" if KERNEL.available else "sim")
    if KERNEL.available:
        monkeypatch.setenv("OVERLAYKIT_BACKEND", "kernel")
        assert backend_of(tmp_path, "auto") == "kernel"


def test_an_explicit_kernel_this_machine_cannot_give_fails_with_the_reason(tmp_path, monkeypatch, no_kernel):
    monkeypatch.setenv("OVERLAYKIT_BACKEND", "sim")
    with pytest.raises(BackendUnavailable, match=r"backend='kernel'.*this kernel has no overlay filesystem"):
        backend_of(tmp_path, "kernel")
    monkeypatch.setenv("OVERLAYKIT_BACKEND", "kernel")  # auto pinned to the kernel: the same reason
    with pytest.raises(BackendUnavailable, match=r"OVERLAYKIT_BACKEND=kernel.*no overlay filesystem"):
        backend_of(tmp_path, "auto")
    monkeypatch.delenv("OVERLAYKIT_BACKEND")
    assert backend_of(tmp_path, "auto") == "sim"


def test_bad_names_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="backend='kernal'"):
        backend_of(tmp_path, "kernal")
    monkeypatch.setenv("OVERLAYKIT_BACKEND", "fuse")
    with pytest.raises(ValueError, match="OVERLAYKIT_BACKEND='fuse'"):
        backend_of(tmp_path, "auto")
    assert backend_of(tmp_path, "sim") == "sim"  # the variable only matters for auto
