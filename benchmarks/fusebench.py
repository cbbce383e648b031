"""Child process of benchmarks/run.py's FUSE section: os.stat and os.walk on one stack through the kernel's
overlay, overlaykit-fuse and fuse-overlayfs, each mounted in turn in this process's private mount namespace
and unmounted (FUSE daemons waited for) before the next.  Reads a JSON job on stdin, writes JSON on stdout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from mounted import mount as kernel_mount, timed, umount as kernel_umount  # noqa: E402
from overlaykit import _nsworker  # noqa: E402


def daemon_pids(marker: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def fuse_mount(impl: str, lowers, upper, work, merged) -> None:
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    if impl.startswith("overlaykit-fuse"):
        argv = [sys.executable, "-m", "overlaykit.fuse"]
        if impl.endswith("attr_timeout=1"):  # the kernel caches attributes for a second: faster, and a
            opts += ",attr_timeout=1"       # hard link's count may then be a second late
    else:
        argv = ["fuse-overlayfs"]
    subprocess.run(argv + ["-o", opts, merged], check=True, capture_output=True, timeout=300)


def fuse_umount(merged: str) -> None:
    subprocess.run(["fusermount3", "-u", merged], check=True, timeout=300)
    deadline = time.monotonic() + 60
    while daemon_pids(merged) and time.monotonic() < deadline:
        time.sleep(0.05)


def measure(impl: str, job: dict) -> dict:
    scratch = os.path.join(job["root"], f"fuse-{impl.replace('=', '-')}")
    upper, work, merged = (os.path.join(scratch, x) for x in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        os.makedirs(d)
    if impl == "kernel":
        kernel_mount(job["lowers"], upper, work, merged)
    else:
        fuse_mount(impl, job["lowers"], upper, work, merged)
    try:
        existing = [merged + "/" + p for p in job["existing"]]

        def stat_existing():
            for p in existing:
                os.stat(p)

        def walk():
            n = 0
            for _, dirs, files in os.walk(merged):
                n += len(dirs) + len(files)
            return n

        stat_existing()  # warm, as run.py's kernel side does
        out = {"stat": timed(stat_existing, job["reps"], job["budget"])}
        t = time.perf_counter()
        out["walk_entries"] = walk()
        out["first_walk"] = time.perf_counter() - t
        out["walk"] = timed(walk, job["walk_reps"], job["budget"])
        return out
    finally:
        (kernel_umount if impl == "kernel" else fuse_umount)(merged)
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    job = json.load(sys.stdin)
    _nsworker.enter_namespaces(False)
    result = {}
    for impl in job["impls"]:
        try:
            result[impl] = measure(impl, job)
        except (OSError, subprocess.SubprocessError) as e:
            result[impl] = {"error": str(e)}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
