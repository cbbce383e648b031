"""A build must give the same layers, byte for byte, on the simulator and on the kernel.

Layer digests cover every entry's mode, owner, size, content and mtime, so this catches any difference in
what the two backends leave in upper/ (a parent directory's time after a copy-up, a whiteout, an opaque dir).
"""
import pytest

from overlaykit import capabilities
from overlaykit.build import build
from overlaykit.images import Store

KERNEL = capabilities()["kernel"]

DOCKERFILE = """\
FROM busybox
RUN mkdir -p /srv/app && echo hello > /srv/app/greeting && echo extra >> /etc/passwd
RUN rm -rf /usr/sbin && mkdir /usr/sbin && echo fresh > /usr/sbin/rc && rm /bin/vi
COPY note.txt /etc/note.txt
"""


@pytest.mark.kernel
@pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")
def test_same_layers_on_both_backends(tmp_path):
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "note.txt").write_text("a note\n")
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    images = {}
    for backend in ("sim", "kernel"):
        store = Store(tmp_path / f"store-{backend}")
        images[backend] = build(str(tmp_path / "Dockerfile"), str(tmp_path / "ctx"), store, "t",
                                backend=backend, run_mode="sim")
    sim, ker = images["sim"], images["kernel"]
    assert len(sim.layers) == 4
    assert [layer.diff_id for layer in sim.layers] == [layer.diff_id for layer in ker.layers]
    kinds = {e.type for e in sim.layers[2].entries()}
    assert {"whiteout", "opaque"} <= kinds
