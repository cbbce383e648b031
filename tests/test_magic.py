"""``%%overlay``: the seed's shell commands against a lesson overlay, the same output on both backends."""
from __future__ import annotations

import subprocess
import sys

import pytest

from overlaykit import capabilities, course, magic

KERNEL = capabilities()["kernel"]

SEED = """echo hi > merged/new.txt
rm merged/in_lower.txt
ls -la upper/
cat merged/new.txt
"""

SEED_OUTPUT = """$ echo hi > merged/new.txt
$ rm merged/in_lower.txt
$ ls -la upper/
-rw-r--r--     29 in_both.txt
c---------    0,0 in_lower.txt   (whiteout)
-rw-r--r--     17 in_upper.txt
-rw-r--r--      3 new.txt
$ cat merged/new.txt
hi

upper/ after the cell:
    whiteout      in_lower.txt
    new           new.txt"""

# every command the brief names, and a few mistakes
MANY = """mkdir merged/d
touch merged/d/f merged/in_both.txt
chmod 600 merged/in_both.txt
mv merged/in_lower.txt merged/moved.txt
echo more >> merged/moved.txt
ls -l merged/ merged/d
ls -la lower/
rm lower/in_both.txt
cat merged/in_lower.txt
mkdir upper/own
ov_opaque upper/own
ov_whiteout merged/in_upper.txt
ls -la upper/
"""


def test_split_commands():
    assert magic.split_commands("a\n\n# note\nb \\\n  c\n  d  ") == ["a", "b \\\n  c", "d"]


def test_seed_experiment_on_the_sim(tmp_path):
    ov = course.lesson_overlay(tmp_path, backend="sim")
    res = magic.run_cell(ov, SEED)
    assert res.text == SEED_OUTPUT
    assert not ov.mounted  # mounted for the cell only
    assert (tmp_path / "upper" / "new.txt").read_text() == "hi\n"


def run_both(tmp_path, cell):
    out = {}
    for backend in ("sim", "kernel"):
        ov = course.lesson_overlay(tmp_path / backend, backend=backend)
        with ov:
            out[backend] = magic.run_cell(ov, cell)
    return out


@pytest.mark.kernel
@pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")
@pytest.mark.parametrize("cell", [SEED, MANY], ids=["seed", "many"])
def test_same_output_on_both_backends(tmp_path, cell):
    out = run_both(tmp_path, cell)
    assert out["sim"].text == out["kernel"].text
    assert out["sim"].status == out["kernel"].status
    if cell is SEED:
        assert out["kernel"].text == SEED_OUTPUT


def test_many_commands_on_the_sim(tmp_path):
    ov = course.lesson_overlay(tmp_path, backend="sim")
    text = magic.run_cell(ov, MANY).text
    assert "rm: cannot remove 'lower/in_both.txt': Read-only file system" in text
    assert "cat: merged/in_lower.txt: No such file or directory" in text
    assert "ov_whiteout: merged/in_upper.txt: only folders on disk (upper/) take markers" in text
    assert "drwxr-xr-x      - own/   [" in text and ".overlay.opaque=y]" in text
    assert "-rw-------     29 in_both.txt" in text
    assert "copied-up     moved.txt" in text  # a file renamed out of lower/ is copied up first


# -- IPython -----------------------------------------------------------------------------------------

@pytest.fixture
def ip():
    pytest.importorskip("IPython")
    from IPython.testing.globalipapp import get_ipython, start_ipython
    shell = start_ipython() or get_ipython()
    shell.run_line_magic("load_ext", "overlaykit")
    yield shell
    shell.user_ns.pop("ov", None)


def _run(ip, line, cell):
    from IPython.utils.capture import capture_output
    with capture_output() as cap:
        ip.run_cell_magic("overlay", line, cell)
    return cap


def test_cell_magic_prints_and_draws(ip, tmp_path):
    ov = course.lesson_overlay(tmp_path / "ws", backend="sim")
    ip.user_ns["ov"] = ov
    cap = _run(ip, "ov", SEED)
    assert cap.stdout.rstrip("\n") == SEED_OUTPUT
    assert len(cap.outputs) == 1 and "overlay stack" in cap.outputs[0].data["text/plain"]


def test_cell_magic_without_a_name_uses_the_last_workspace(ip, tmp_path):
    ws = course.workspace("w", tmp_path)
    course.lesson_dirs(ws)
    cap = _run(ip, "", "rm merged/in_lower.txt\nls upper")
    assert cap.stdout.startswith("$ rm merged/in_lower.txt\n$ ls upper\nin_both.txt\nin_lower.txt\n")
    ov = course.lesson_overlay(course.workspace("w2", tmp_path), backend="sim")
    cap = _run(ip, "", "echo x > merged/y")
    assert (tmp_path / "w2" / "upper" / "y").exists() and not ov.mounted


def test_cell_magic_errors_are_sentences(ip, tmp_path):
    cap = _run(ip, "nothing_here", "ls")
    assert cap.stdout.startswith("%%overlay: %%overlay nothing_here: there is no nothing_here")
    ip.user_ns["ov"] = 42
    assert "ov is a int, not an Overlay" in _run(ip, "ov", "ls").stdout
    assert "Traceback" not in cap.stdout


def test_import_does_not_load_ipython():
    code = "import overlaykit, sys; print('IPython' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


DOCKER_CELL = """rm merged/etc/motd
echo 'VERSION_ID="12"' >> merged/etc/os-release
mkdir merged/tmp/cache
ls -la merged/ diff/etc
"""


def _docker_layout(tmp_path, name):
    from overlaykit import dockerroot
    base = course.layer_from_files({"etc/os-release": "PRETTY\n", "etc/motd": "hi\n", "tmp/": ""})
    image = course.image_from_layers("img", [("ADD rootfs /", base)])
    return dockerroot.rebuild(image, tmp_path / name)


def test_docker_layout_cell_names_diff(tmp_path):
    """On Docker's layout the upper folder is diff/: the cell uses Docker's own names."""
    layout = _docker_layout(tmp_path, "sim")
    with layout.overlay(backend="sim") as ov:
        text = magic.run_cell(ov, DOCKER_CELL).text
    assert "-rwxr-xr-x      0 .dockerenv" in text          # the init layer's file, in merged/
    assert "c---------    0,0 motd   (whiteout)" in text   # the container layer, on disk
    assert "diff/ after the cell:\n" in text and "whiteout      etc/motd" in text


@pytest.mark.kernel
@pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")
def test_docker_layout_cell_same_on_the_kernel(tmp_path):
    out = {}
    for backend in ("sim", "kernel"):
        layout = _docker_layout(tmp_path, backend)
        with layout.overlay(backend=backend) as ov:
            out[backend] = magic.run_cell(ov, DOCKER_CELL).text
    assert out["sim"] == out["kernel"]


def test_kernel_needs_a_merged_folder(tmp_path):
    """An overlay without merged/ (an images.Container) is refused with a sentence on the kernel backend."""
    from overlaykit import Overlay
    d = course.lesson_dirs(tmp_path)
    ov = Overlay([d["lower"]], d["upper"], d["work"], backend="sim")
    ov.backend = "kernel"  # what the check sees; nothing is mounted
    ov._impl = type("Impl", (), {"worker": type("W", (), {"pid": 1, "userns": False})()})()
    with pytest.raises(RuntimeError, match="needs the overlay mounted on <workspace>/merged"):
        magic._run_real(ov, ["ls"])
    ov._impl = None
