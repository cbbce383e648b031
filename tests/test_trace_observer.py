"""The trace observer never changes an operation's outcome (issue 10 item 7, observer part).

The observer reads the layer directories with this process's rights; the kernel does its lookups and
copy-ups with the mounter's.  Unprivileged, a search-only directory in a lower layer (root-owned 0711,
as in the issue, when the test starts as root; the user's own 0111 otherwise) can be looked up through
but not listed: the operations must give the same results with ``trace=True`` as with ``trace=False``,
and the trace says where it is incomplete.  Lookups through a search-only directory are traced in full
(the observer looks names up there as ovl_lookup does, without listing the directory); a directory of
the user's own with mode 000 in the lower layer (0755 once copied up), which only the mounter may search
there, is where the trace is incomplete.
"""
from __future__ import annotations

import os
import pickle
import pwd
import tempfile

import pytest

from overlaykit import Overlay
from overlaykit.kernel import probe, remove_tree

OK, WHY = probe()
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(not OK, reason=f"kernel backend not allowed: {WHY}")]


def _unprivileged_uid() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("learner")
    except KeyError:
        pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def layers(base: str, uid: int, gid: int) -> tuple[str, str, str]:
    lower, upper, work = (os.path.join(base, x) for x in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        os.mkdir(d)
    os.mkdir(os.path.join(lower, "d"))
    with open(os.path.join(lower, "d", "f"), "w") as f:
        f.write("secret")
    os.chmod(os.path.join(lower, "d", "f"), 0o644)
    os.mkdir(os.path.join(lower, "n"))
    with open(os.path.join(lower, "n", "f"), "w") as f:
        f.write("hidden")
    if os.geteuid() == 0:
        os.chown(os.path.join(lower, "n"), uid, gid)
        os.chown(os.path.join(lower, "n", "f"), uid, gid)
    os.chmod(os.path.join(lower, "n"), 0o000)  # the mounter's own: it may search it, the observer may not
    if os.geteuid() == 0:  # the shape: root-owned, search-only for others
        os.chmod(os.path.join(lower, "d"), 0o711)
        for d in (upper, work):
            os.chown(d, uid, gid)
    else:  # our own directory, search-only even for us
        os.chmod(os.path.join(lower, "d"), 0o111)
    return lower, upper, work


def outcomes(lower: str, upper: str, work: str, trace: bool) -> tuple[list, list[str]]:
    def attempt(fn):
        try:
            return ("ok", fn())
        except OSError as e:
            return ("err", e.errno)

    with Overlay([lower], upper, work, backend="kernel", trace=trace) as ov:
        got = [attempt(lambda: ov.read_bytes("d/f")),
               attempt(lambda: ov.stat("d/f").size),
               attempt(lambda: ov.write_bytes("d/f", b"+", append=True)),
               attempt(lambda: ov.read_bytes("d/f")),
               attempt(lambda: ov.chmod("d/f", 0o600)),
               attempt(lambda: ov.stat("d/f").mode),
               attempt(lambda: ov.write_bytes("top.txt", b"t")),
               attempt(lambda: ov.chmod("n", 0o755)),  # the caller needs search permission on the merged n
               attempt(lambda: ov.read_bytes("n/f"))]
        return got, [str(e) for e in ov.trace]


def run_unprivileged(fn, *args):
    """``fn(*args)`` in a forked child, as an unprivileged user when we are root; its pickled result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            if os.geteuid() == 0:
                uid, gid = _unprivileged_uid()
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            data = pickle.dumps(("ok", fn(*args)))
            code = 0
        except BaseException as e:
            data = pickle.dumps(("exc", repr(e)))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    assert status == "ok", value
    return value


def test_the_observer_cannot_change_an_outcome_on_a_search_only_directory():
    uid, gid = _unprivileged_uid()
    results = {}
    for trace in (False, True):
        base = tempfile.mkdtemp(prefix="overlaykit-observer-")
        os.chmod(base, 0o755)
        try:
            lower, upper, work = layers(base, uid, gid)
            results[trace] = run_unprivileged(outcomes, lower, upper, work, trace)
        finally:
            for d in ("d", "n"):
                os.chmod(os.path.join(base, "lower", d), 0o755)
            remove_tree(base)
    plain, _ = results[False]
    traced, trace = results[True]
    assert plain[0] == ("ok", b"secret")  # the kernel looks through the search-only directory
    assert traced == plain
    assert plain[-1] == ("ok", b"hidden")  # the mounter searches its own lower directory of mode 000
    assert any(line.startswith("read") and "d/f: looked at lower[0]: file -> served by lower[0]" in line
               for line in trace), trace
    assert any("trace incomplete: could not read layer" in line and "EACCES" in line for line in trace), trace
    assert not any(base_part in line for line in trace for base_part in ("/tmp/", "overlaykit-observer-"))
