"""The kernel side of the benchmarks: Python's own os.stat / os.listdir / os.walk on a real overlay mount.

Run as ``python benchmarks/mounted.py`` with a JSON job on stdin; prints JSON results on stdout.  The
process enters a private mount namespace (as root) or a user + mount namespace (otherwise, with
``userxattr``) -- the same steps as the kernel backend's helper, `overlaykit._nsworker` -- and mounts the
overlays of the job there, so the timed loops are plain system calls with no pipe round trip.  The
mounts exist only in this process's namespace: when it ends, for whatever reason, they are gone.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overlaykit import _nsworker  # noqa: E402
from overlaykit.kernel import DEFAULT_OPTIONS  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
USERNS = os.geteuid() != 0


def mount(lowers, upper, work, merged) -> None:
    opts = ([o for o in DEFAULT_OPTIONS if o[0] != "redirect_dir"] + [("userxattr", None)]) if USERNS \
        else list(DEFAULT_OPTIONS)
    cfg = {"lowers": lowers, "upper": upper, "work": work, "merged": merged, "options": opts}
    try:
        os.close(_nsworker.mount_new_api(cfg))
    except _nsworker.MountError as e:
        if e.code != 22:  # EINVAL: no "lowerdir+" on this kernel; fall back to mount(2)
            raise OSError(e.code, e.message or os.strerror(e.code), e.path) from None
        _nsworker.mount_legacy(cfg, merged)


def umount(merged: str) -> None:
    if _libc.umount2(os.fsencode(merged), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), merged)


def timed(fn, reps: int, budget: float | None = None) -> list[float]:
    """Times of ``reps`` runs of ``fn``; fewer (at least one) when they would take over ``budget`` seconds."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        if budget is not None and sum(out) > budget:
            break
    return out


def lookups(job: dict) -> dict:
    merged = job["merged"]
    mount(job["lowers"], job.get("upper"), job.get("work"), merged)
    try:
        existing = [merged + "/" + p for p in job["existing"]]
        missing = [merged + "/" + p for p in job["missing"]]
        stat = os.stat

        def stat_existing():
            for p in existing:
                stat(p)

        def stat_missing():
            for p in missing:
                try:
                    stat(p)
                except (FileNotFoundError, NotADirectoryError):
                    pass

        found = 0
        for p in existing + missing:
            found += os.path.lexists(p)
        res = {"found": found}
        reps = job["reps"]
        stat_existing(), stat_missing()  # warm the dentry cache, as the sim's cache is warmed
        res["stat_existing"] = timed(stat_existing, reps)
        res["stat_missing"] = timed(stat_missing, reps)
        res["listdir"] = {}
        for d in job["listdirs"]:
            real = merged + "/" + d if d else merged
            res["listdir"][d] = {"n": len(os.listdir(real)),
                                 "t": timed(lambda: os.listdir(real), reps)}

        def walk():
            n = 0
            for _, dirs, files in os.walk(merged):
                n += len(dirs) + len(files)
            return n

        res["walk_entries"] = walk()
        res["walk"] = timed(walk, job["walk_reps"])
        return res
    finally:
        umount(merged)


def copyup(job: dict) -> dict:
    """Per case, a fresh upper per repetition: append one byte (data copy-up) or chmod (metadata)."""
    out = {}
    for case in job["cases"]:
        times, copied = [], []
        for r in range(job["reps"]):
            upper, work, merged = (os.path.join(job["scratch"], f"{x}-{case['name']}-{r}") for x in ("u", "w", "m"))
            for d in (upper, work, merged):
                os.mkdir(d)
            mount([job["lower"]], upper, work, merged)
            try:
                p = merged + "/" + case["path"]
                t = time.perf_counter()
                if case["op"] == "append":
                    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
                    os.write(fd, b"x")
                    os.close(fd)
                else:
                    os.chmod(p, 0o600)
                times.append(time.perf_counter() - t)
            finally:
                umount(merged)
            copied.append(os.lstat(os.path.join(upper, case["path"])).st_size)
            os.rmdir(merged)
        out[case["name"]] = {"t": times, "bytes": copied}
    return out


def main() -> None:
    job = json.load(sys.stdin)
    _nsworker.enter_namespaces(USERNS)
    result = {"lookups": lookups, "copyup": copyup}[job["kind"]](job)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
