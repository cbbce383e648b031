"""The trace is a bounded ring with a count of dropped events, plus per-operation views (issue 10 item 5)."""
from __future__ import annotations

import pytest

from overlaykit import Overlay
from overlaykit.engine import TRACE_LIMIT, Trace, TraceEvent


@pytest.fixture
def ov(tmp_path):
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "a.txt").write_text("a")
    with Overlay([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", backend="sim") as o:
        yield o


def test_the_ring_keeps_the_last_events_and_counts_the_dropped_ones(ov):
    ops = TRACE_LIMIT + 500
    for i in range(ops):
        ov.stat("a.txt")  # one lookup event each
    assert len(ov.trace) == ops
    assert ov.trace.kept == TRACE_LIMIT == len(list(ov.trace))
    assert ov.trace.dropped == ops - TRACE_LIMIT
    first_line = str(ov.trace).splitlines()[0]
    assert first_line.startswith(f"({ops - TRACE_LIMIT} earlier events dropped")
    assert len(str(ov.trace).splitlines()) == TRACE_LIMIT + 1
    with pytest.raises(IndexError, match="dropped"):
        ov.trace[0]
    assert ov.trace[-1] is list(ov.trace)[-1] and ov.trace[len(ov.trace) - 1] is ov.trace[-1]
    # the list idiom of the lessons and widgets stays right however long the session
    n = len(ov.trace)
    ov.write_text("new.txt", "x")
    since = ov.trace[n:]
    assert [e.kind for e in since] == ["lookup", "create"] and since == ov.last_events()
    assert ov.trace[:5] == [] and len(ov.trace[n - 3:]) == 5


def test_recording_collects_every_event_of_the_block_and_only_those(ov):
    ov.write_text("before.txt", "x")
    with ov.recording() as steps:
        for i in range(TRACE_LIMIT):
            ov.write_text(f"f{i}", "x")  # two events each
    ov.remove("a.txt")
    assert len(steps) == steps.kept == 2 * TRACE_LIMIT and steps.dropped == 0
    assert {e.path for e in steps} == {f"f{i}" for i in range(TRACE_LIMIT)}
    assert ov.trace.kept == TRACE_LIMIT  # the overlay's own trace stayed bounded
    assert [e.kind for e in ov.last_events()] == ["lookup", "whiteout"]


def test_recording_traces_an_overlay_made_without_tracing(tmp_path):
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    with Overlay([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", backend="sim", trace=False) as ov:
        ov.write_text("a", "x")
        with ov.recording() as steps:
            ov.write_text("b", "x")
        ov.write_text("c", "x")
        assert [e.path for e in steps] == ["b", "b"] and [e.path for e in ov.trace] == ["b", "b"]


def test_a_small_trace_prints_like_before():
    t = Trace([TraceEvent("remove", "whiteout", "x", "whiteout created")], limit=3)
    assert str(t) == "remove     whiteout  x: whiteout created" and t.dropped == 0 and len(t) == 1
    t.extend([TraceEvent("stat", "lookup", str(i)) for i in range(4)])
    assert t.dropped == 2 and [e.path for e in t] == ["1", "2", "3"] and len(t) == 5
