"""RUN as buildah runs it (issue 14, items 3 and 5): as the USER, with /dev, /proc and /sys that leave
nothing in the layer; SHELL, HEALTHCHECK, ONBUILD, MAINTAINER, heredocs and RUN --mount.

Both RUN paths are checked: the simulated shell (run_mode="sim") and, as root with the kernel backend,
the real busybox chrooted into the merged root. buildah is the reference where it can build the same
context; BuildKit's documented results where buildah 1.28 cannot (heredocs).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from build_peers import buildah_image, busybox_rootfs, config_fields, content, ours, peer_content  # noqa: E402

from overlaykit import capabilities  # noqa: E402
from overlaykit.build import BuildError  # noqa: E402
from overlaykit.images import Store  # noqa: E402


def _real_run_reason():
    if os.geteuid() != 0:
        return "a real RUN chroots: root only"
    kernel = capabilities()["kernel"]
    return None if kernel.available else f"kernel backend not allowed: {kernel.reason}"


MODES = [pytest.param({"backend": "sim", "run_mode": "sim"}, id="sim"),
         pytest.param({"backend": "kernel", "run_mode": "real"}, id="kernel",
                      marks=[pytest.mark.kernel, pytest.mark.skipif(_real_run_reason() is not None,
                                                                    reason=str(_real_run_reason()))])]


def context(tmp_path: Path, dockerfile: str, **files) -> Path:
    ctx = tmp_path / "ctx"
    busybox_rootfs(ctx)
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in files.items():
        p = ctx / name.replace("__", "/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return ctx


def peer(ctx, tmp, **kw):
    try:
        return buildah_image(ctx, tmp, **kw)
    except RuntimeError as e:
        pytest.fail(str(e))


def no_mounts_left():
    assert not [l for l in Path("/proc/self/mountinfo").read_text().splitlines() if "build-scratch" in l]


# ---------------------------------------------------------------------- 3. USER, /dev, /proc, /sys

USER_FILE = """\
FROM scratch
COPY rootfs/ /
USER 1000
RUN id -u > /tmp/uid && id -g > /tmp/gid && echo x > /dev/null && cat /dev/zero | head -c 5 > /tmp/zeros \\
    && head -c 3 /dev/urandom > /dev/null && cat /proc/self/status > /dev/null && ls /sys > /dev/null \\
    && touch /tmp/mine && mkdir /tmp/dir && touch /tmp/dir/inside && ln -s mine /tmp/link && echo shm > /dev/shm/x
USER root
RUN echo root > /tmp/root
"""


@pytest.mark.parametrize("mode", MODES)
def test_run_as_user_with_dev_proc_sys(tmp_path, mode):
    ctx = context(tmp_path, USER_FILE)
    image = ours(ctx, tmp_path, **mode)
    layer = content(image.layers[1])
    assert layer["tmp/uid"][5] == b"1000\n" and layer["tmp/gid"][5] == b"1000\n"
    assert layer["tmp/zeros"][5] == bytes(5)
    # an unprivileged builder cannot give files to uid 1000: they stay its own, root's in the layer
    who = 1000 if os.geteuid() == 0 else 0
    assert layer["tmp/mine"][:4] == ("file", "0o644", who, who)
    assert layer["tmp/dir"][:4] == ("dir", "0o755", who, who)
    assert layer["tmp/link"][:5] == ("symlink", "0o777", who, who, "mine")
    assert not [p for p in layer if p.split("/")[0] in ("dev", "proc", "sys")]
    assert content(image.layers[2])["tmp/root"][2:4] == (0, 0)
    no_mounts_left()


def test_run_as_user_like_buildah(tmp_path):
    ctx = context(tmp_path, USER_FILE)
    theirs = peer(ctx, tmp_path)
    mine = ours(ctx, tmp_path, backend="sim", run_mode="sim")
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        assert content(a) == peer_content(b)


@pytest.mark.parametrize("mode", MODES)
def test_user_cannot_write_where_root_owns(tmp_path, mode):
    ctx = context(tmp_path, "FROM scratch\nCOPY rootfs/ /\nUSER 1000\nRUN touch /etc/nope\n")
    with pytest.raises(BuildError, match=r"(?s)line 4: RUN .*Permission denied"):
        ours(ctx, tmp_path, **mode)
    no_mounts_left()


@pytest.mark.parametrize("mode", MODES)
def test_dev_null_leaves_nothing_in_the_layer(tmp_path, mode):
    ctx = context(tmp_path, "FROM scratch\nCOPY rootfs/ /\n"
                            "RUN echo x > /dev/null && cat /dev/null > /empty && echo kept > /kept\n")
    layer = content(ours(ctx, tmp_path, **mode).layers[1])
    assert set(layer) == {"kept", "empty"} and layer["empty"][5] == b""


def test_unknown_user_is_an_error(tmp_path):
    ctx = context(tmp_path, "FROM scratch\nCOPY rootfs/ /\nUSER nobody\nRUN true\n")
    with pytest.raises(BuildError, match="line 4: unable to find user nobody"):
        ours(ctx, tmp_path, backend="sim", run_mode="sim")


# ---------------------------------------------------------------------- 5. SHELL, HEALTHCHECK, ONBUILD, MAINTAINER

CONFIG_FILE = """\
FROM scratch
COPY rootfs/ /
MAINTAINER Ada <ada@example.org>
SHELL ["/bin/sh", "-c"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=1m30s --retries=4 CMD wget -q -O- localhost || exit 1
ONBUILD RUN echo triggered > /onbuilt
ONBUILD ENV FROM_TRIGGER=1
"""
CHILD_FILE = "FROM parent\nRUN echo child > /child\n"


def test_shell_healthcheck_onbuild_maintainer_recorded(tmp_path):
    ctx = context(tmp_path, CONFIG_FILE)
    image = ours(ctx, tmp_path, backend="sim", run_mode="sim")
    cfg = image.config_json()
    assert cfg["author"] == "Ada <ada@example.org>"
    assert cfg["config"]["Shell"] == ["/bin/sh", "-c"]
    assert cfg["config"]["Healthcheck"] == {"Test": ["CMD-SHELL", "wget -q -O- localhost || exit 1"],
                                            "Interval": 30 * 10**9, "Timeout": 3 * 10**9,
                                            "StartPeriod": 90 * 10**9, "Retries": 4}
    assert cfg["config"]["OnBuild"] == ["RUN echo triggered > /onbuilt", "ENV FROM_TRIGGER=1"]
    assert Store(tmp_path / "ok-store").image("ours").config_json() == cfg  # kept by the store


def test_shell_healthcheck_onbuild_maintainer_like_buildah(tmp_path):
    ctx = context(tmp_path, CONFIG_FILE)
    theirs = peer(ctx, tmp_path, fmt="docker")
    mine = ours(ctx, tmp_path, backend="sim", run_mode="sim")
    assert config_fields(mine) == config_fields(theirs)
    assert mine.config_json()["author"] == theirs.config_json()["author"]


@pytest.mark.parametrize("mode", MODES)
def test_onbuild_triggers_run_in_the_child(tmp_path, mode):
    ctx = context(tmp_path, CONFIG_FILE)
    (ctx / "Child.Dockerfile").write_text(CHILD_FILE)
    ours(ctx, tmp_path, tag="parent", **mode)
    child = ours(ctx, tmp_path, dockerfile="Child.Dockerfile", **mode)
    assert content(child.layers[-2]) == {"onbuilt": ("file", "0o644", 0, 0, "", b"triggered\n")}
    assert child.config.env_dict()["FROM_TRIGGER"] == "1"
    assert "OnBuild" not in child.config_json()["config"]


def test_onbuild_like_buildah(tmp_path):
    ctx = context(tmp_path, CONFIG_FILE)
    (ctx / "Child.Dockerfile").write_text(CHILD_FILE)
    theirs = peer(ctx, tmp_path, dockerfile="Child.Dockerfile", fmt="docker", before=(("Dockerfile", "parent"),))
    ours(ctx, tmp_path, tag="parent", backend="sim", run_mode="sim")
    mine = ours(ctx, tmp_path, dockerfile="Child.Dockerfile", backend="sim", run_mode="sim")
    assert [content(layer) for layer in mine.layers] == [peer_content(layer) for layer in theirs.layers]
    assert config_fields(mine) == config_fields(theirs)


@pytest.mark.parametrize("mode", MODES)
def test_shell_instruction_is_used_by_run(tmp_path, mode):
    shell = '["/bin/busybox", "sh", "-c"]' if mode["run_mode"] == "real" else '["/bin/sh", "-c"]'
    ctx = context(tmp_path, f"FROM scratch\nCOPY rootfs/ /\nSHELL {shell}\nRUN echo ran > /shell-name\n")
    image = ours(ctx, tmp_path, **mode)
    assert image.history[-1].created_by == " ".join(image.config.shell) + " echo ran > /shell-name"
    assert content(image.layers[-1])["shell-name"][5] == b"ran\n"


def test_sim_refuses_a_shell_it_cannot_be(tmp_path):
    ctx = context(tmp_path, 'FROM scratch\nCOPY rootfs/ /\nSHELL ["/bin/busybox", "sh", "-c"]\nRUN true\n')
    with pytest.raises(BuildError, match=r"line 4: RUN: the simulated shell runs only SHELL"):
        ours(ctx, tmp_path, backend="sim", run_mode="sim")


# ---------------------------------------------------------------------- 5. heredocs (BuildKit semantics)

HEREDOC_FILE = """\
FROM scratch
COPY rootfs/ /
ARG NAME=world
RUN <<EOF
mkdir -p /hd
echo one > /hd/a
echo two >> /hd/a
EOF
COPY <<EOF /hd/expanded
hello $NAME
EOF
COPY --chmod=600 <<"EOF" /hd/literal
hello $NAME
EOF
COPY <<one <<two /hd/many/
first
one
second
two
RUN <<-EOT
\techo tabs > /hd/tabs
\tEOT
RUN echo "not a<<heredoc" > /hd/quoted
"""
SHEBANG = """\
RUN <<EOF
#!/bin/sh
echo script > /hd/script
EOF
RUN cat <<EOF > /hd/cat
given to the shell
EOF
"""


@pytest.mark.parametrize("mode", MODES)
def test_heredocs(tmp_path, mode):
    real = mode["run_mode"] == "real"
    ctx = context(tmp_path, HEREDOC_FILE + (SHEBANG if real else ""))
    image = ours(ctx, tmp_path, **mode)
    files = {}
    for layer in image.layers[1:]:
        files.update({p: v for p, v in content(layer).items() if v[0] == "file"})
    assert files["hd/a"][5] == b"one\ntwo\n"
    assert files["hd/expanded"][1:] == ("0o644", 0, 0, "", b"hello world\n")
    assert files["hd/literal"][1:] == ("0o600", 0, 0, "", b"hello $NAME\n")
    assert files["hd/many/one"][5] == b"first\n" and files["hd/many/two"][5] == b"second\n"
    assert files["hd/tabs"][5] == b"tabs\n"
    assert files["hd/quoted"][5] == b"not a<<heredoc\n"
    if real:
        assert files["hd/script"][5] == b"script\n"
        assert files["hd/cat"][5] == b"given to the shell\n"
        assert not [p for layer in image.layers[1:] for p in content(layer) if p.startswith("dev")]


def test_heredoc_without_end_is_an_error(tmp_path):
    ctx = context(tmp_path, "FROM scratch\nRUN <<EOF\necho never ends\n")
    with pytest.raises(BuildError, match="line 2: RUN: heredoc <<EOF"):
        ours(ctx, tmp_path, backend="sim")


# ---------------------------------------------------------------------- 5. RUN --mount

MOUNT_FILE = """\
FROM scratch
COPY rootfs/ /
RUN --mount=type=bind,source=data,target=/mnt/data cat /mnt/data/x > /copied && ! touch /mnt/data/new 2>/dev/null
RUN --mount=type=tmpfs,target=/scratch ls -A /scratch > /listing && echo hi > /scratch/f && cat /scratch/f > /tmpfs-ok
"""
CACHE_FILE = """\
FROM scratch
COPY rootfs/ /
RUN --mount=type=cache,target=/var/cache/app,id=app echo BUILD >> /var/cache/app/log && cat /var/cache/app/log > /seen
"""


@pytest.mark.parametrize("mode", MODES)
def test_run_mount_bind_and_tmpfs(tmp_path, mode):
    ctx = context(tmp_path, MOUNT_FILE, data__x="from the context\n")
    image = ours(ctx, tmp_path, **mode)
    bind, tmpfs = content(image.layers[-2]), content(image.layers[-1])
    assert set(bind) == {"copied"} and bind["copied"][5] == b"from the context\n"
    assert set(tmpfs) == {"listing", "tmpfs-ok"} and tmpfs["listing"][5] == b"" and tmpfs["tmpfs-ok"][5] == b"hi\n"
    no_mounts_left()


def test_run_mount_like_buildah(tmp_path):
    ctx = context(tmp_path, MOUNT_FILE, data__x="from the context\n")
    theirs = peer(ctx, tmp_path)
    mine = ours(ctx, tmp_path, backend="sim", run_mode="sim")
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        # buildah also commits the empty directory it made for a mount target (/mnt); issue 14 wants
        # nothing of a mount in the layer, so that one entry is left out of the comparison
        theirs_content = {p: v for p, v in peer_content(b).items() if not (p == "mnt" and v[0] == "dir")}
        assert content(a) == theirs_content


@pytest.mark.parametrize("mode", MODES)
def test_run_mount_cache_persists_across_builds(tmp_path, mode):
    ctx = context(tmp_path, CACHE_FILE.replace("BUILD", "first"))
    first = ours(ctx, tmp_path, **mode)
    (ctx / "Dockerfile").write_text(CACHE_FILE.replace("BUILD", "second"))
    second = ours(ctx, tmp_path, **mode)
    assert content(first.layers[-1])["seen"][5] == b"first\n"
    layer = content(second.layers[-1])
    assert layer["seen"][5] == b"first\nsecond\n"
    assert not [p for p in layer if p.startswith("var")]
    no_mounts_left()


@pytest.mark.parametrize("line,message", [
    ("RUN --frobnicate=1 true", r"line 3: RUN: unsupported flag --frobnicate=1"),
    ("RUN --mount=type=secret,id=x true", r"line 3: RUN --mount=type=secret: not supported"),
    ("RUN --mount=type=cache,target=/c,colour=red true", r"line 3: RUN --mount: unknown option 'colour'"),
    ("HEALTHCHECK --every=3s CMD true", r"line 3: HEALTHCHECK: unknown flag --every"),
])
def test_unsupported_flags_name_the_flag_and_line(tmp_path, line, message):
    ctx = context(tmp_path, f"FROM scratch\nCOPY rootfs/ /\n{line}\n")
    with pytest.raises(BuildError, match=message):
        ours(ctx, tmp_path, backend="sim", run_mode="sim")


@pytest.mark.parametrize("mode", MODES)
def test_run_mount_owner_and_mode_for_the_user(tmp_path, mode):
    ctx = context(tmp_path, "FROM scratch\nCOPY rootfs/ /\nUSER 1000\nRUN --mount=type=cache,target=/c,uid=1000,"
                            "mode=0700 echo ok > /c/f && cat /c/f > /tmp/ok\n")
    assert content(ours(ctx, tmp_path, **mode).layers[-1])["tmp/ok"][5] == b"ok\n"
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY rootfs/ /\nUSER 1000\n"
                                    "RUN --mount=type=cache,target=/c2 echo no > /c2/f\n")
    with pytest.raises(BuildError, match="(?s)line 4: RUN.*Permission denied"):
        ours(ctx, tmp_path, **mode)
    no_mounts_left()


MODES_FILE = """\
FROM scratch
COPY rootfs/ /
RUN --mount=type=tmpfs,target=/t --mount=type=cache,target=/c --mount=type=bind,target=/b \\
    stat -c "%a %u" /t /c /b > /modes
"""


@pytest.mark.parametrize("mode", MODES)
def test_run_mount_roots(tmp_path, mode):
    ctx = context(tmp_path, MODES_FILE)
    os.chmod(ctx, 0o750)
    assert content(ours(ctx, tmp_path, **mode).layers[-1])["modes"][5] == b"1777 0\n755 0\n750 0\n"


def test_run_mount_roots_like_buildah(tmp_path):
    ctx = context(tmp_path, MODES_FILE)
    os.chmod(ctx, 0o750)
    theirs = peer(ctx, tmp_path)
    mine = ours(ctx, tmp_path, backend="sim", run_mode="sim")
    assert mine.layers[-1].read("modes") == theirs.layers[-1].read("modes")
