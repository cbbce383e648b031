"""The kernel backend for real: mounts in a helper's namespace, never left behind, kernel errnos, userxattr.

Every test skips with the probe's reason where this machine does not allow the kernel backend.
"""
from __future__ import annotations

import errno
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from overlaykit import Overlay
from overlaykit.kernel import KernelBackend, Worker, WorkerGone, probe

OK, WHY = probe()
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(not OK, reason=f"kernel backend not allowed: {WHY}")]

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0
NS = "trusted" if ROOT else "user"


def mount_lines(marker: str) -> list[str]:
    """Every line of every readable /proc/*/mountinfo that mentions ``marker`` (our tmp_path)."""
    found = []
    for path in glob.glob("/proc/[0-9]*/mountinfo"):
        try:
            with open(path) as f:
                found += [f"{path}: {line}" for line in f if marker in line]
        except OSError:
            pass
    return found


def upper_in_use(t: Path, lowers=("lower0", "lower1"), upper="upper", work="work") -> bool:
    """Does a live overlay superblock still hold ``upper``/``work``?  The kernel marks them in use while
    mounted, and a second mount with index=on is then refused with EBUSY.  This sees detached mounts and
    mounts in other namespaces, which no mountinfo shows."""
    try:
        Worker([str(t / x) for x in lowers], str(t / upper), str(t / work), options=(("index", "on"),)).start().stop()
    except OSError as e:
        if e.errno == errno.EBUSY:
            return True
        raise
    return False


def released(t: Path, **kw) -> bool:
    return mount_lines(str(t)) == [] and not upper_in_use(t, **kw)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Has process ``pid`` ended (gone, or a zombie, which holds no namespaces any more)?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if re.search(r"^State:\s+Z", f.read(), re.M):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def stack(tmp_path):
    """lower0 (top) and lower1, an empty upper and work: the lesson's starting point."""
    for d in ("lower0", "lower1", "upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower0" / "in_lower.txt").write_text("lower\n")
    (tmp_path / "lower0" / "in_both.txt").write_text("from lower0\n")
    (tmp_path / "lower1" / "in_both.txt").write_text("from lower1\n")
    (tmp_path / "lower1" / "d").mkdir()
    (tmp_path / "lower1" / "d" / "f").write_text("f\n")
    return tmp_path


def overlay(t: Path, **kw) -> Overlay:
    return Overlay([t / "lower0", t / "lower1"], t / "upper", t / "work", backend="kernel", **kw)


def test_mount_shows_the_layers_and_unmount_leaves_nothing(stack):
    with overlay(stack) as ov:
        assert ov.backend == "kernel"
        pid = ov._impl.pid
        assert ov.listdir() == ["d", "in_both.txt", "in_lower.txt"]
        assert ov.read_text("in_both.txt") == "from lower0\n"
        assert upper_in_use(stack)
    assert gone(pid)
    assert released(stack)


def test_an_operation_that_raises_leaves_nothing_mounted(stack):
    with pytest.raises(FileNotFoundError) as info:
        with overlay(stack) as ov:
            pid = ov._impl.pid
            ov.read_bytes("/no/such/file")
    assert info.value.errno == errno.ENOENT and info.value.filename == "no/such/file"
    assert gone(pid) and released(stack)


def test_errors_carry_the_callers_paths_not_the_helpers(stack):
    with overlay(stack) as ov:
        with pytest.raises(OSError) as info:
            ov.rename("missing", "elsewhere")
        assert (info.value.errno, info.value.filename, info.value.filename2) == (errno.ENOENT, "missing", "elsewhere")
        with pytest.raises(OSError) as info:
            ov.rename("d", "d2")  # a lower directory: redirect_dir is off
        assert (info.value.errno, info.value.filename, info.value.filename2) == (errno.EXDEV, "d", "d2")


def _mount_then_die(stack: Path, how: str) -> int:
    script = textwrap.dedent(f"""
        import os, signal, sys
        from overlaykit import Overlay
        ov = Overlay([{str(stack / 'lower0')!r}, {str(stack / 'lower1')!r}], {str(stack / 'upper')!r},
                     {str(stack / 'work')!r}, backend="kernel").mount()
        assert ov.read_text("in_lower.txt") == "lower\\n"
        print(ov._impl.pid, flush=True)
        os.kill(os.getpid(), signal.{how})
        signal.pause()
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == -getattr(signal, how), proc.stderr
    return int(proc.stdout.split()[0])


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_python_process_leaves_no_mount(stack, how):
    pid = _mount_then_die(stack, how)
    assert gone(pid), f"helper {pid} outlived its parent"
    assert released(stack)


def test_a_killed_helper_is_reported_and_unmount_still_works(stack):
    ov = overlay(stack).mount()
    pid = ov._impl.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerGone):
        ov.read_text("in_lower.txt")
    ov.unmount()
    assert gone(pid) and released(stack)


def test_500_lowers_mount_and_read(tmp_path):
    lowers = []
    for i in range(500):
        d = tmp_path / f"layer-with-a-fairly-long-name-{i:03d}"
        d.mkdir()
        (d / f"f{i}").write_text(str(i))
        (d / "same").write_text(str(i))
        lowers.append(d)
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    assert len(":".join(map(str, lowers))) > os.sysconf("SC_PAGE_SIZE")  # too long for mount(2)'s string
    with Overlay(lowers, tmp_path / "u", tmp_path / "w", backend="kernel") as ov:
        assert ov._impl.worker.api == "new"
        assert ov.read_text("same") == "0"
        assert ov.read_text("f499") == "499"
        assert len(ov.listdir()) == 501
        ov.write_text("f499", "changed")
        assert upper_in_use(tmp_path, lowers=[x.name for x in lowers[:2]], upper="u", work="w")
    assert (tmp_path / "u" / "f499").read_text() == "changed"
    assert released(tmp_path, lowers=[x.name for x in lowers[:2]], upper="u", work="w")


def test_501_lowers_give_einval_naming_the_501st(tmp_path):
    lowers = [tmp_path / f"l{i}" for i in range(501)]
    for d in lowers:
        d.mkdir()
    with pytest.raises(OSError) as info:
        Worker([str(x) for x in lowers], None, None).start()
    assert info.value.errno == errno.EINVAL
    assert info.value.filename == str(lowers[500])
    assert "500" in info.value.strerror
    assert mount_lines(str(tmp_path)) == []


def test_legacy_mount_string_with_short_links_for_long_stacks(tmp_path, monkeypatch):
    monkeypatch.setattr(KernelBackend, "legacy_mount", True)
    lowers = []
    for i in range(150):
        d = tmp_path / f"a-long-layer-directory-name-{i:03d}"
        d.mkdir()
        (d / f"f{i}").write_text(str(i))
        lowers.append(d)
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    with Overlay(lowers, tmp_path / "u", tmp_path / "w", backend="kernel") as ov:
        assert ov._impl.worker.api == "legacy"
        assert ov.read_text("f149") == "149" and len(ov.listdir()) == 150
        scratch = ov._impl.worker.scratch
    assert not os.path.exists(scratch)  # the mount point out here is removed again
    assert not glob.glob(os.path.join(os.path.dirname(scratch), "overlaykit-l-*"))
    assert released(tmp_path, lowers=[lowers[0].name], upper="u", work="w")


def _bad_configs(t: Path):
    for d in ("l1", "l2", "u", "w", "l1/sub", "u/sub"):
        (t / d).mkdir()
    L1, L2, U, W = (str(t / x) for x in ("l1", "l2", "u", "w"))
    return {
        "missing lower": ([str(t / "nope"), L2], U, W, errno.ENOENT, str(t / "nope")),
        "same lower twice": ([L1, L1], U, W, errno.ELOOP, L1),
        "lower is the upper": ([L1, U], U, W, errno.ELOOP, U),
        "lower inside another lower": ([L1, str(t / "l1/sub")], U, W, errno.ELOOP, str(t / "l1/sub")),
        "sub lower above its parent": ([str(t / "l1/sub"), L1], U, W, errno.ELOOP, str(t / "l1/sub")),
        "upper is work": ([L1], U, U, errno.EINVAL, U),
        "work inside upper": ([L1], U, str(t / "u/sub"), errno.EINVAL, str(t / "u/sub")),
        "read-only with one lower": ([L1], None, None, errno.EINVAL, L1),
        "upper without work": ([L1], U, None, errno.EINVAL, U),
    }


@pytest.mark.parametrize("case", ["missing lower", "same lower twice", "lower is the upper",
                                  "lower inside another lower", "sub lower above its parent", "upper is work",
                                  "work inside upper", "read-only with one lower", "upper without work"])
def test_bad_configurations_get_the_kernels_errno_and_the_path(tmp_path, case):
    lowers, upper, work, code, path = _bad_configs(tmp_path)[case]
    with pytest.raises(OSError) as info:
        Worker(lowers, upper, work).start()
    assert (errno.errorcode[info.value.errno], info.value.filename) == (errno.errorcode[code], path)
    assert mount_lines(str(tmp_path)) == []


def test_work_on_another_filesystem_is_einval(tmp_path):
    other = "/dev/shm"
    if not os.path.isdir(other) or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second writable filesystem at /dev/shm")
    for d in ("l1", "u"):
        (tmp_path / d).mkdir()
    work = Path(__import__("tempfile").mkdtemp(dir=other, prefix="overlaykit-test-"))
    try:
        with pytest.raises(OSError) as info:
            Worker([str(tmp_path / "l1")], str(tmp_path / "u"), str(work)).start()
        assert (info.value.errno, info.value.filename) == (errno.EINVAL, str(work))
    finally:
        shutil.rmtree(work)


def test_read_only_overlay_gives_erofs(stack):
    with Overlay([stack / "lower0", stack / "lower1"], backend="kernel") as ov:
        assert ov.read_text("in_both.txt") == "from lower0\n"
        for op in (lambda: ov.write_text("new", "x"), lambda: ov.remove("in_lower.txt"),
                   lambda: ov.mkdir("dir"), lambda: ov.chmod("in_both.txt", 0o600)):
            with pytest.raises(OSError) as info:
                op()
            assert info.value.errno == errno.EROFS


def test_symlinks_are_not_followed_out_of_the_merged_root(stack):
    (stack / "lower0" / "etc").mkdir()
    (stack / "lower0" / "etc" / "hostname").write_text("inside the overlay\n")
    os.symlink("/etc/hostname", stack / "lower0" / "abs")
    os.symlink("../../../../../../../../etc/hostname", stack / "lower0" / "rel")
    with overlay(stack) as ov:
        assert ov.read_text("abs") == "inside the overlay\n"
        assert ov.read_text("rel") == "inside the overlay\n"
        ov.write_text("abs", "written through the link\n")
    assert (stack / "upper" / "etc" / "hostname").read_text() == "written through the link\n"


def test_rm_rf_then_mkdir_gives_an_opaque_dir_with_the_mounters_xattr(stack):
    (stack / "merged").mkdir()  # mounted on merged/, the mount shows in the helper's mountinfo
    with overlay(stack, merged=stack / "merged") as ov:
        ov.remove("d/f")
        ov.rmdir("d")
        ov.mkdir("d")
        assert ov.listdir("d") == []
        info = Path(f"/proc/{ov._impl.pid}/mountinfo").read_text()
    assert " overlay " in info and ("userxattr" in info) == (not ROOT), info
    assert os.getxattr(stack / "upper" / "d", f"{NS}.overlay.opaque") == b"y"
    other = "user" if ROOT else "trusted"
    with pytest.raises(OSError):
        os.getxattr(stack / "upper" / "d", f"{other}.overlay.opaque")


def test_how_to_look_gives_commands_that_work(stack):
    (stack / "merged").mkdir()
    for merged in (None, stack / "merged"):
        with overlay(stack, merged=merged) as ov:
            text = ov._impl.how_to_look()
            commands = re.findall(r"`([^`]+)`", text)
            assert len(commands) == (2 if merged else 1)
            for cmd in commands:
                out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30)
                assert out.returncode == 0, (cmd, out.stderr)
                assert "in_lower.txt" in out.stdout, (cmd, out.stdout)
        assert os.listdir(stack / "merged") == []  # the mount never showed outside the helper


def _learner():
    try:
        return pwd.getpwnam("learner")
    except KeyError:
        return None


def _learner_python() -> str | None:
    """A Python with pytest that `learner` may run: $OVERLAYKIT_LEARNER_PYTHON, this one, or the system's."""
    for py in (os.environ.get("OVERLAYKIT_LEARNER_PYTHON"), sys.executable, "/usr/bin/python3"):
        if py and subprocess.run(["runuser", "-u", "learner", "--", py, "-c", "import pytest"],
                                 capture_output=True).returncode == 0:
            return py
    return None


@pytest.mark.skipif(not ROOT or _learner() is None or shutil.which("runuser") is None,
                    reason="needs root, runuser and a non-root user named learner")
def test_the_unprivileged_path_runs_as_learner(tmp_path):
    """This file's tests again, as the non-root user `learner`: user namespace + userxattr."""
    pw = _learner()
    python = _learner_python()
    if python is None:
        pytest.skip("no Python with pytest that learner can run (set OVERLAYKIT_LEARNER_PYTHON)")
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "overlaykit", repo / "overlaykit", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "tests").mkdir()
    shutil.copy(REPO / "tests" / "test_kernel.py", repo / "tests")
    shutil.copy(REPO / "pyproject.toml", repo)
    (repo / "basetemp").mkdir()
    for dirpath, dirnames, filenames in os.walk(repo):
        for name in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.chown(name, pw.pw_uid, pw.pw_gid)
    opened = []  # let learner through pytest's private temp directories, and close them again afterwards
    p = tmp_path
    while p != p.parent and p != Path(os.path.realpath(__import__("tempfile").gettempdir())):
        mode = p.stat().st_mode & 0o7777
        opened.append((p, mode))
        os.chmod(p, mode | 0o001)
        p = p.parent
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERLAYKIT_", "PYTEST_"))}
        env.update(HOME=pw.pw_dir, PYTHONPATH=str(repo), USER="learner", LOGNAME="learner")
        out = subprocess.run(["runuser", "-u", "learner", "--", python, "-m", "pytest", "-q", "-rs",
                              "-m", "kernel", "-p", "no:cacheprovider", f"--basetemp={repo / 'basetemp'}",
                              "tests/test_kernel.py"],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for p, mode in opened:
            os.chmod(p, mode)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert re.search(r"\d+ passed", report), report
    skipped = re.findall(r"SKIPPED \[\d+\] [^\n]*", report)
    # Only the tests that need root to start with (this one, and a second filesystem) may skip.
    assert all("needs root" in s or "/dev/shm" in s for s in skipped), skipped


def test_chown_to_another_user_is_eperm_unless_root(stack):
    with overlay(stack) as ov:
        if ROOT:
            ov.chown("in_lower.txt", 1234, 1234)
            assert (ov.stat("in_lower.txt").uid, ov.stat("in_lower.txt").gid) == (1234, 1234)
        else:
            with pytest.raises(PermissionError) as info:
                ov.chown("in_lower.txt", 1234, -1)
            assert (info.value.errno, info.value.filename) == (errno.EPERM, "in_lower.txt")
