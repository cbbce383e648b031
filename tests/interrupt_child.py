"""Run by tests/test_interrupts.py in a child process: SIGINT at many moments of kernel-backend calls.

Prints one line per check that went wrong and ``DONE <interrupts seen>`` at the end; exit status 0
only when every call after every interrupt returned its own, right answer.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time

from overlaykit import Overlay, kernel

BIG = 128 << 20          # a lower file large enough that its reply streams for a while
COPY = 24 << 20          # lower files copied up by an append
NAMES = 20000            # a directory whose listing is a large reply
failures: list[str] = []
seen = 0


def check(what: str, ok: bool) -> None:
    if not ok:
        failures.append(what)
        print("FAIL", what, flush=True)


def settle() -> None:
    """Give a pending SIGINT the chance to arrive while we are still inside the try block."""
    for _ in range(5):
        time.sleep(0.01)


def interrupted(action, *, delay: float | None = None, stage: str | None = None, times: int = 1):
    """Run ``action`` with SIGINT sent after ``delay`` seconds, or ``times`` times at the worker's ``stage``
    (twice: the learner presses Ctrl-C again while a change is still running)."""
    global seen
    armed = [True]

    def fire():
        os.kill(os.getpid(), signal.SIGINT)

    def hook(at):
        if at == stage and armed[0]:
            armed[0] = False
            for _ in range(times):
                fire()
                time.sleep(0.01)

    timer = None
    if stage is not None:
        kernel._test_hook = hook
    else:
        timer = threading.Timer(delay, fire)
    try:
        if timer:
            timer.start()
        try:
            result = action()
        finally:
            kernel._test_hook = None
            if timer:
                timer.join()
            settle()
    except KeyboardInterrupt:
        seen += 1
        return "interrupted"
    return result


def _read_through_open(ov, path: str) -> bytes:
    with ov.open(path, "rb") as f:
        return f.read()


def main() -> None:
    t = tempfile.mkdtemp(prefix="overlaykit-interrupt-", dir=sys.argv[1] if len(sys.argv) > 1 else None)
    lower, upper, work = (os.path.join(t, x) for x in ("lower", "upper", "work"))
    for d in (lower, upper, work, os.path.join(lower, "many")):
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(lower, "big.bin"), "wb") as f:
        f.truncate(BIG - 3)
        f.seek(BIG - 3)
        f.write(b"END")
    with open(os.path.join(lower, "a.txt"), "w") as f:
        f.write("a")
    for i in range(NAMES):
        open(os.path.join(lower, "many", f"n{i:05d}"), "w").close()
    rounds = [("delay", d) for d in (0.0, 0.002, 0.01, 0.03, 0.08, 0.2)] + \
             [("stage", s) for s in ("send", "sent", "reply")] + [("twice", "sent")]
    for i in range(len(rounds)):
        with open(os.path.join(lower, f"cu{i}.bin"), "wb") as f:
            f.write(os.urandom(1 << 16) * (COPY >> 16))

    data = os.urandom(1 << 16) * ((16 << 20) >> 16)
    ov = Overlay([lower], upper, work, backend="kernel").mount()
    hb = ov.os_open("big.bin", os.O_RDONLY)  # handles that live through every round
    hw = ov.os_open("pw.bin", os.O_RDWR | os.O_CREAT)
    try:
        for i, (how, when) in enumerate(rounds):
            kw = {"delay": when} if how == "delay" else {"stage": when, "times": 2 if how == "twice" else 1}
            actions = {
                "read_bytes": lambda: ov.read_bytes("big.bin"),
                "listdir": lambda: ov.listdir("many"),
                "write_bytes": lambda: ov.write_bytes(f"w{i}.bin", data),
                "copy-up": lambda: ov.write_bytes(f"cu{i}.bin", b"+", append=True),
                "stat": lambda: ov.stat("a.txt"),
                "open-read": lambda: _read_through_open(ov, "big.bin"),
                "pwrite": lambda: ov.pwrite(hw, data, 0),
            }
            for name, action in actions.items():
                label = f"{name} interrupted by {how} {when}"
                r = interrupted(action, **kw)
                if name in ("read_bytes", "open-read") and r != "interrupted":
                    check(f"{label}: own answer", len(r) == BIG and r[-3:] == b"END")
                # whatever happened, the next calls get their own answers
                check(f"{label}: read a.txt", ov.read_bytes("a.txt") == b"a")
                names = ov.listdir(".")
                check(f"{label}: listdir . gives names", all(isinstance(x, str) for x in names)
                      and {"a.txt", "big.bin", "many"} <= set(names))
                check(f"{label}: stat a.txt", ov.stat("a.txt").size == 1)
                check(f"{label}: listdir many", len(ov.listdir("many")) == NAMES)
                if name == "write_bytes":  # a write is made wholly or not at all
                    wname = f"w{i}.bin"
                    check(f"{label}: write whole or absent", wname not in names
                          or ov.read_bytes(wname) == data)
                check(f"{label}: pread on a handle", ov.pread(hb, 3, BIG - 3) == b"END")
                if name == "pwrite":  # one request: made wholly or not at all
                    size = ov.fstat(hw).size
                    check(f"{label}: pwrite whole or absent", size in (0, len(data))
                          and (size == 0 or ov.pread(hw, 1 << 20, len(data) - (1 << 20)) == data[-(1 << 20):]))
                    ov.ftruncate(hw, 0)
                if name == "copy-up":
                    body = ov.read_bytes(f"cu{i}.bin")
                    check(f"{label}: copy-up whole or not made", len(body) in (COPY, COPY + 1)
                          and (len(body) == COPY or body.endswith(b"+")))
        big = ov.read_bytes("big.bin")
        check("big.bin in full at the end", len(big) == BIG and big.endswith(b"END"))
        check("the helper is still the first one", ov._impl.worker.restarts == 0)
        ov.close(hb)
        ov.close(hw)
    finally:
        ov.unmount()
        kernel.remove_tree(t)
    print("DONE", seen, flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
