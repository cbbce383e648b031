"""The kernel judges `Options`: for a table of option strings (valid, conflicting, bad values) a real
overlay mount (overlaykit.kernelopts: root in a private mount namespace, anyone else in a user namespace
with userxattr) and the simulator's ``Overlay(..., backend="sim", options=S).mount()`` must succeed or
fail together (EINVAL), and where both mount, the options the sim resolved must be what the kernel's
/proc/self/mountinfo line says the mount does.  The kernel backend must agree with both.

Run as root and as the unprivileged user (``test_the_table_as_learner`` does the latter from root)."""
from __future__ import annotations

import errno
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from overlaykit import Overlay
from overlaykit.capabilities import capabilities
from overlaykit.kernelopts import try_mount

KERNEL = capabilities()["kernel"]
pytestmark = pytest.mark.skipif(not KERNEL.available, reason=f"no kernel overlay here: {KERNEL.reason}")
REPO = Path(__file__).resolve().parent.parent

VALID = ["", "redirect_dir=on", "redirect_dir=follow", "redirect_dir=nofollow", "redirect_dir=off",
         "index=on", "index=off", "metacopy=on", "metacopy=off", "xino=on", "xino=off", "xino=auto",
         "nfs_export=on", "nfs_export=off"]
COMBINED = ["metacopy=on,redirect_dir=on", "metacopy=on,redirect_dir=off", "metacopy=on,redirect_dir=follow",
            "metacopy=on,redirect_dir=nofollow", "redirect_dir=nofollow,metacopy=on", "metacopy=off,redirect_dir=on",
            "nfs_export=on,metacopy=on", "nfs_export=on,metacopy=off", "metacopy=on,nfs_export=off",
            "nfs_export=on,index=on", "nfs_export=on,index=off", "index=off,nfs_export=on",
            "index=on,metacopy=on", "redirect_dir=on,index=on", "nfs_export=on,redirect_dir=on",
            "nfs_export=on,redirect_dir=nofollow", "index=on,redirect_dir=off,metacopy=off",
            "metacopy=on,metacopy=off", "index=on,index=off", "redirect_dir=on,redirect_dir=nofollow"]
BAD = ["index=maybe", "redirect_dir=yes", "xino=1", "metacopy=", "metacopy", "index=ON", "nfs_export=true",
       "bogus=1"]
TABLE = VALID + COMBINED + BAD


def _layers(root: Path, layout: str):
    """Fresh layer directories: ``rw`` (a lower, upper and work on one fs), ``ro`` (two lowers, no
    upper), ``xdev`` (the lower on /dev/shm, another filesystem: xino has work to do)."""
    root.mkdir()
    if layout == "xdev":
        import tempfile
        low = Path(tempfile.mkdtemp(prefix="overlaykit-xdev-", dir="/dev/shm"))
    else:
        low = root / "lower"
        low.mkdir()
    (low / "f").write_text("x")
    if layout == "ro":
        (root / "lower2").mkdir()
        return [low, root / "lower2"], None, None
    (root / "upper").mkdir()
    (root / "work").mkdir()
    return [low], root / "upper", root / "work"


def _cleanup(lowers):
    for x in lowers:
        if str(x).startswith("/dev/shm/"):
            shutil.rmtree(x, ignore_errors=True)


def _overlay_outcome(root: Path, layout: str, options: str, backend: str):
    lowers, upper, work = _layers(root, layout)
    ov = None
    try:
        ov = Overlay(lowers, upper, work, backend=backend, options=options)
        ov.mount()
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP and backend == "sim":  # resolved by the kernel's rules, not modelled
            return "unmodelled", str(e), ov.options
        return e.errno, str(e), None
    except ValueError as e:  # not an OSError: the test fails on it below (mount(2) says EINVAL)
        return "ValueError", str(e), None
    else:
        ov.unmount()
        return 0, "", ov.options
    finally:
        _cleanup(lowers)


def _semantics_of_options(o, has_upper: bool) -> dict:
    d = {"follows_redirects": o.follows_redirects, "index": o.index, "metacopy": o.metacopy,
         "nfs_export": o.nfs_export, "xino": o.xino}
    if has_upper:
        d["creates_redirects"] = o.creates_redirects
    return d


def _semantics_of_mountinfo(eff: dict, has_upper: bool) -> dict:
    d = {"follows_redirects": eff["redirect_dir"] in ("on", "follow"), "index": eff["index"],
         "metacopy": eff["metacopy"], "nfs_export": eff["nfs_export"], "xino": eff["xino"]}
    if has_upper:
        d["creates_redirects"] = eff["redirect_dir"] == "on"
    return d


def _judge(tmp_path: Path, layout: str, options: str):
    lowers, upper, work = _layers(tmp_path / "k", layout)
    try:
        real = try_mount(lowers, upper, work, options)
    finally:
        _cleanup(lowers)
    assert real.stage == "mount", f"the judge could not even create its namespace: errno {real.errno}"
    sim = _overlay_outcome(tmp_path / "s", layout, options, "sim")
    kern = _overlay_outcome(tmp_path / "b", layout, options, "kernel")
    who = "root" if os.geteuid() == 0 else "unprivileged (userxattr)"
    where = f"{layout} {options!r} as {who}"
    if not real.ok:
        assert real.errno == errno.EINVAL, f"{where}: the kernel refuses with {errno.errorcode[real.errno]}"
        assert sim[0] == errno.EINVAL, f"{where}: mount(2) says EINVAL, the sim says {sim[:2]}"
        assert kern[0] == errno.EINVAL, f"{where}: mount(2) says EINVAL, the kernel backend says {kern[:2]}"
        return
    if sim[0] == "unmodelled":  # the rules agree (below); the sim then says it does not model the option
        assert "nfs_export" in sim[1] and sim[2].nfs_export, f"{where}: {sim[1]}"
    else:
        assert sim[0] == 0, f"{where}: mount(2) mounts, the sim refuses: {sim[1]}"
    assert kern[0] == 0, f"{where}: mount(2) mounts, the kernel backend refuses: {kern[1]}"
    eff = real.effective()
    assert eff["userxattr"] == (os.geteuid() != 0)
    want = _semantics_of_mountinfo(eff, upper is not None)
    assert _semantics_of_options(sim[2], upper is not None) == want, \
        f"{where}: the sim resolved {sim[2]}, the kernel's mountinfo says {real.super_options}"
    assert _semantics_of_options(kern[2], upper is not None) == want


@pytest.mark.parametrize("options", TABLE)
def test_sim_mounts_exactly_when_the_kernel_does(tmp_path, options):
    _judge(tmp_path, "rw", options)


@pytest.mark.parametrize("options", ["", "index=on", "nfs_export=on", "redirect_dir=nofollow", "redirect_dir=on",
                                     "metacopy=on", "nfs_export=on,index=off", "index=off,nfs_export=on",
                                     "nfs_export=on,redirect_dir=on", "nfs_export=on,redirect_dir=nofollow"])
def test_read_only_overlay_options(tmp_path, options):
    _judge(tmp_path, "ro", options)


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
                    reason="needs /dev/shm on a filesystem of its own")
@pytest.mark.parametrize("options", ["", "xino=on", "xino=off", "xino=auto"])
def test_xino_across_filesystems(tmp_path, options):
    _judge(tmp_path, "xdev", options)


def test_mountinfo_parsing_knows_the_defaults():
    from overlaykit.kernelopts import effective
    e = effective("rw,lowerdir=/l,upperdir=/u,workdir=/w,redirect_dir=on,index=on,userxattr")
    assert (e["redirect_dir"], e["index"], e["userxattr"], e["metacopy"]) == ("on", True, True, False)


def test_the_table_as_learner(tmp_path):
    """This file again as `learner` (user namespace + userxattr), when run as root."""
    if os.geteuid() != 0:
        pytest.skip("already unprivileged")
    try:
        pw = pwd.getpwnam(os.environ.get("OVERLAYKIT_TEST_USER", "learner"))
    except KeyError:
        pytest.skip("no user 'learner'")
    if shutil.which("runuser") is None:
        pytest.skip("no runuser")
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "overlaykit", repo / "overlaykit", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "tests").mkdir()
    shutil.copy(Path(__file__), repo / "tests")
    home = tmp_path / "home"
    home.mkdir()
    for dirpath, _, filenames in os.walk(tmp_path):
        for name in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.chown(name, pw.pw_uid, pw.pw_gid)
    opened, p = [], tmp_path
    while p != p.parent and p != Path("/tmp"):
        mode = p.stat().st_mode & 0o7777
        opened.append((p, mode))
        os.chmod(p, mode | 0o001)
        p = p.parent
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYKIT_", "PYTEST_"))}
        env.update(HOME=str(home), PYTHONPATH=str(repo), USER=pw.pw_name, LOGNAME=pw.pw_name)
        out = subprocess.run(["runuser", "-u", pw.pw_name, "--", sys.executable, "-m", "pytest", "-q", "-x",
                              "-p", "no:cacheprovider", f"--basetemp={home / 'pt'}", "-k", "not as_learner",
                              "tests/test_options_kernel.py"],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    finally:
        for p, mode in opened:
            os.chmod(p, mode)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_kernel_options_report_what_a_real_mount_does(tmp_path):
    """capabilities()["kernel"].options: each option turned on, as this kernel took it for this user,
    and the same as what the sim's rules (`Options.resolve`) predict for a one-filesystem overlay."""
    from overlaykit.capabilities import SIM_OPTIONS, kernel_options, sim_options
    report = capabilities()["kernel"].options
    assert report == kernel_options() and set(report) == {"redirect_dir", "index", "metacopy", "xino", "nfs_export"}
    for name, support in report.items():
        assert support.mounts is not None, support.note
        lowers, upper, work = _layers(tmp_path / name, "rw")
        real = try_mount(lowers, upper, work, f"{name}={support.value}")
        assert support.mounts == real.ok, (support, real)
        sim = sim_options()[name]
        assert sim.mounts == support.mounts or not SIM_OPTIONS[name] and not sim.mounts, (sim, support)
        if support.mounts and SIM_OPTIONS[name]:
            # the sim's rules fall back exactly where the kernel's do (sim.in_effect also needs SIM_OPTIONS)
            assert ("falls back" in sim.note or "nothing to do" in sim.note) == (not support.in_effect), (sim, support)
    if os.geteuid() == 0:
        assert report["redirect_dir"].in_effect and report["index"].in_effect and report["metacopy"].in_effect
    else:
        assert not report["redirect_dir"].mounts and not report["metacopy"].mounts
        assert report["index"].mounts and not report["index"].in_effect
    assert not report["xino"].in_effect  # all layers on one filesystem
