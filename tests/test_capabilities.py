"""Why the kernel backend is unavailable: the reason must match unshare(2)'s errno (issue 13.2)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import overlaykit.capabilities  # noqa: E402,F401
C = sys.modules["overlaykit.capabilities"]
from overlaykit.kernel import explain_failure

REPO = Path(__file__).resolve().parents[1]


def namespace_error(code: int) -> OSError:
    e = OSError(code, os.strerror(code))
    e.stage = "namespace"  # as kernel.Worker.start raises it
    return e


@pytest.fixture
def permissive_sysctls(monkeypatch):
    """The sysctls this namespace reads all allow user namespaces, as in a sandbox that forbids nesting."""
    monkeypatch.setattr(C, "userns_status", lambda: (True, "user namespaces allowed (max_user_namespaces=15000)"))
    monkeypatch.setattr(C, "seccomp_mode", lambda: 0)


def test_enospc_is_the_namespace_limit_not_a_security_module(permissive_sysctls):
    why = explain_failure(namespace_error(errno.ENOSPC), root=False)
    assert "ENOSPC" in why and "user.max_user_namespaces is 0 or exhausted" in why
    assert "AppArmor" not in why and "seccomp" not in why


@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES])
def test_eperm_and_eacces_name_the_security_modules_and_the_sysctl(permissive_sysctls, code):
    why = explain_failure(namespace_error(code), root=False)
    assert errno.errorcode[code] in why
    assert "AppArmor" in why and "seccomp" in why and "unprivileged_userns_clone" in why
    assert "max_user_namespaces" not in why


def test_seccomp_is_named_when_the_process_has_a_filter(permissive_sysctls, monkeypatch):
    monkeypatch.setattr(C, "seccomp_mode", lambda: 2)
    assert "this process runs under a seccomp filter" in C.userns_refusal(errno.EPERM)


def test_einval_and_others(permissive_sysctls):
    assert "CONFIG_USER_NS" in explain_failure(namespace_error(errno.EINVAL), root=False)
    assert "out of memory" in C.userns_refusal(errno.ENOMEM)
    assert "ENOSYS" in C.userns_refusal(errno.ENOSYS)


def test_a_sysctl_that_says_no_still_wins(monkeypatch):
    monkeypatch.setattr(C, "userns_status", lambda: (False, "user namespaces are disabled (x is 0)"))
    assert explain_failure(namespace_error(errno.ENOSPC), root=False) == "user namespaces are disabled (x is 0)"


def _bwrap_learner(tmp_path, *cmd) -> subprocess.CompletedProcess:
    if os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("runuser"):
        pytest.skip("needs root, runuser and bubblewrap (to run as an unprivileged user in a sandbox)")
    user = os.environ.get("OVERLAYKIT_TEST_USER", "learner")
    try:
        import pwd
        pwd.getpwnam(user)
    except KeyError:
        pytest.skip(f"no user {user!r} to run as")
    home = tmp_path / "home"
    home.mkdir()
    shutil.chown(home, user)
    tmp_path.chmod(0o755)
    # As ./dev's binder_like stage: uid 1000 in a user namespace of bubblewrap's, nested ones disabled.
    bwrap = ["bwrap", "--dev-bind", "/", "/", "--unshare-user", "--uid", "1000", "--gid", "1000",
             "--disable-userns", "--die-with-parent", "--"]
    env = ["env", f"HOME={home}", f"PYTHONPATH={REPO}"]
    r = subprocess.run(["runuser", "-u", user, "--", *env, *bwrap, *cmd], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    if r.returncode and "bwrap" in r.stderr[:200] and "disable-userns" in r.stderr:
        pytest.skip(f"this bubblewrap cannot --disable-userns: {r.stderr.strip()}")
    return r


def test_doctor_in_a_sandbox_without_nested_user_namespaces(tmp_path):
    r = _bwrap_learner(tmp_path, sys.executable, "-m", "overlaykit", "doctor")
    assert r.returncode == 0, r.stderr
    kernel_line = next(line for line in r.stdout.splitlines() if line.strip().startswith("kernel "))
    assert "NOT available" in kernel_line and "ENOSPC" in kernel_line, r.stdout
    assert "user.max_user_namespaces is 0 or exhausted" in kernel_line, r.stdout
    assert "AppArmor" not in kernel_line, r.stdout
    fact = next(line for line in r.stdout.splitlines() if "unprivileged user namespaces" in line)
    assert "no: " in fact and "ENOSPC" in fact, r.stdout


def test_sim_options_follow_SIM_OPTIONS_and_the_kernels_rules(monkeypatch):
    monkeypatch.setattr(C, "SIM_OPTIONS", dict(C.SIM_OPTIONS, index=True, redirect_dir=False))  # as if not modelled
    report = C.sim_options()
    assert set(report) == set(C.SIM_OPTIONS)
    root = os.geteuid() == 0
    assert not report["redirect_dir"].mounts  # userxattr refuses it; as root, the sim refuses what it does not model
    if root:
        assert report["index"].in_effect and not report["redirect_dir"].in_effect
        assert "not modelled by the simulator" in report["redirect_dir"].note
    else:
        assert not report["index"].in_effect and "userxattr" in report["index"].note
    assert not report["xino"].in_effect and "one filesystem" in report["xino"].note


def test_the_sim_refuses_an_option_it_does_not_model(tmp_path):
    """nfs_export=on is not simulated: the mount says so (EOPNOTSUPP) rather than behave as with off."""
    from overlaykit import Overlay
    for d in ("l", "u", "w"):
        (tmp_path / d).mkdir()
    assert not C.SIM_OPTIONS["nfs_export"]
    ov = Overlay([tmp_path / "l"], tmp_path / "u", tmp_path / "w", backend="sim", options="nfs_export=on")
    if os.geteuid() == 0:
        with pytest.raises(OSError) as e:
            ov.mount()
        assert e.value.errno == errno.EOPNOTSUPP and "kernel backend" in str(e.value)
    else:  # userxattr: the kernel's own fallback turns nfs_export off, so there is nothing to refuse
        with ov:
            assert not ov.options.nfs_export


def test_doctor_lists_the_mount_options_of_both_backends(monkeypatch):
    from overlaykit.kernelopts import OptionSupport
    monkeypatch.setattr(C.BackendInfo, "options", property(
        lambda self: {"index": OptionSupport("index", "on", True, self.name == "kernel", "why not")}))
    text = C.doctor()
    assert "mount options" in text
    assert "  sim     index=on: mounts, but why not" in text.splitlines()
    assert "  kernel  index=on: works" in text.splitlines()


def test_readme_lists_what_the_sim_implements_as_SIM_OPTIONS_says():
    """README's "Mount options" list and capabilities.SIM_OPTIONS are flipped together when a branch merges."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- SIM-OPTIONS", 1)[1].split("\n\n", 1)[0]
    lines = [x for x in block.splitlines() if x.startswith("- ")]
    for name, done in C.SIM_OPTIONS.items():
        line = next(x for x in lines if f"`{name}`" in x)
        assert ("not yet" not in line) == done, f"README says {line!r}, SIM_OPTIONS[{name!r}] is {done}"
