"""A built layer must not depend on who built it (root in CI, uid 1000 on Binder)."""
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from overlaykit.images import Layer
from overlaykit.ondisk import Encoding

SCRIPT = textwrap.dedent("""
    import os, sys
    from overlaykit.images import Layer
    from overlaykit.ondisk import Encoding
    root = sys.argv[1]
    os.makedirs(os.path.join(root, "etc"))
    with open(os.path.join(root, "etc", "hello"), "w") as f:
        f.write("hi")
    for d, _, fs in os.walk(root):
        for n in fs + [""]:
            os.utime(os.path.join(d, n) if n else d, (0, 0))
    layer = Layer.from_dir(root, Encoding("fallback", "user"), mtime=0)
    print(layer.diff_id, [(e.path, e.uid, e.gid) for e in layer.entries()])
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the same build as another user")
def test_same_layer_as_root_and_as_another_user():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path sits in a folder only root may enter
        os.chmod(tmp, 0o777)
        _compare(Path(tmp), env)


def _compare(tmp_path: Path, env: dict) -> None:
    as_root = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "r")], env=env,
                             capture_output=True, text=True, check=True).stdout
    def drop():
        os.setgid(1000)
        os.setuid(1000)
    try:
        as_user = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "u")], env=env, preexec_fn=drop,
                                 capture_output=True, text=True)
    except PermissionError:
        pytest.skip(f"uid 1000 may not run {sys.executable} (the venv of ./dev test uses Debian's python3)")
    assert as_user.returncode == 0, as_user.stderr
    assert as_root == as_user.stdout
    assert "('etc/hello', 0, 0)" in as_root


def test_files_of_other_owners_keep_their_ids(tmp_path):
    (tmp_path / "f").write_text("x")
    if os.geteuid() == 0:
        os.chown(tmp_path / "f", 1234, 1234)
    layer = Layer.from_dir(tmp_path, Encoding("fallback", "user"))
    (entry,) = [e for e in layer.entries() if e.path == "f"]
    assert (entry.uid, entry.gid) == ((1234, 1234) if os.geteuid() == 0 else (0, 0))
