"""The kernel backend's helper stays in step and alive: Ctrl-C at any moment, requests it cannot serve,
a helper killed from outside (issue 10 items 1 and 4)."""
from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlaykit import Overlay, kernel
from overlaykit.kernel import WorkerGone, probe

OK, WHY = probe()
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(not OK, reason=f"kernel backend not allowed: {WHY}")]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ov(tmp_path):
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "a.txt").write_text("a")
    (tmp_path / "lower" / "b.txt").write_text("bb")
    with Overlay([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", backend="kernel") as o:
        yield o


def test_sigint_at_many_moments_leaves_every_next_call_its_own_answer(tmp_path):
    """A child process interrupts itself (timer thread, and at fixed points of the protocol) during
    read_bytes of a 128 MiB file, a large listdir, a 16 MiB write, a copy-up, a stat, a read through
    ``ov.open`` and a pwrite on an open handle; after each, reads, listings, stats and pread on handles
    that stay open answer right, writes are whole or absent, and no helper was restarted."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "interrupt_child.py"), str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child hung after an interrupt (calls out of step): {e.stdout}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = proc.stdout.split()[-2:]
    assert done[0] == "DONE" and int(done[1]) >= 20, proc.stdout  # most rounds really were interrupted


def test_a_reply_cut_by_an_unexpected_error_restarts_the_helper_on_the_same_layers(ov):
    ov.write_text("kept.txt", "in upper")
    worker = ov._impl.worker
    pid = worker.pid

    def hook(stage):
        if stage == "reply":
            raise MemoryError("injected while a reply was crossing")

    kernel._test_hook = hook
    try:
        with pytest.raises(MemoryError):
            ov.read_bytes("a.txt")
    finally:
        kernel._test_hook = None
    assert ov.read_bytes("b.txt") == b"bb"  # its own answer, from a new helper
    assert worker.restarts == 1 and worker.pid != pid
    assert ov.read_text("kept.txt") == "in upper" and ov.listdir(".") == ["a.txt", "b.txt", "kept.txt"]


def test_the_helper_answers_requests_it_cannot_serve_and_keeps_running(ov):
    w = ov._impl.worker
    assert w.call("no-such-op", "x")[0] == "exc"
    assert w.call("truncate", "a.txt", 2**63)[:2] == ("exc", "OverflowError")
    assert w.call("chmod", "a.txt", "rw")[:2] == ("exc", "TypeError")
    assert w.call("read_bytes")[:2] == ("exc", "TypeError")  # missing argument
    assert w.call("stat", "a.txt", True)[0] == "ok"
    # frames that are no request at all: not a pickle, a pickle of the wrong shape
    for body in (b"\x00 not a pickle", pickle.dumps("just a string"), pickle.dumps(("read_bytes", "a.txt"))):
        rid, w._next_id = w._next_id, w._next_id + 1
        w._send(rid, body, pickled=True)
        assert w._recv(rid, None)[0] == "exc"
    assert w.call("read_bytes", "a.txt") == ("ok", b"a")
    assert ov.read_bytes("b.txt") == b"bb" and w.restarts == 0


def test_a_killed_helper_gives_enotconn_from_the_first_call_and_unmounted(ov):
    pid = ov._impl.pid
    assert ov.mounted
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while ov.mounted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not ov.mounted
    for call in (lambda: ov.read_bytes("a.txt"), lambda: ov.listdir("."), lambda: ov.write_text("n", "x")):
        with pytest.raises(OSError) as info:
            call()
        assert isinstance(info.value, WorkerGone) and info.value.errno == errno.ENOTCONN
        assert "helper process" in str(info.value) and "ended" in str(info.value)
