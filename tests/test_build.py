"""The Dockerfile builder: layers come from real containers and commits; numbers are measured, not assumed."""

import io
import os
import tarfile
from importlib import resources

import pytest

from overlaykit import build as buildmod
from overlaykit.build import BuildError, build, cli_build, compare, parse_dockerfile, report
from overlaykit.images import Store, flatten

EXAMPLES = resources.files("overlaykit") / "examples"


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def test_parser_joins_continuations_and_drops_comment_lines():
    text = "FROM busybox\n# note\nRUN set -x; deps='a b' \\\n    # inner comment\n\n    && echo $deps\nCMD [\"sh\"]\n"
    ins = parse_dockerfile(text)
    assert [(i.line, i.name) for i in ins] == [(1, "FROM"), (3, "RUN"), (7, "CMD")]
    assert ins[1].value.split() == ["set", "-x;", "deps='a", "b'", "&&", "echo", "$deps"]


def test_hello_from_scratch(store):
    image = build(str(EXAMPLES / "hello-scratch.Dockerfile"), str(EXAMPLES / "hello"), store, "hello")
    assert len(image.layers) == 1
    assert [e.path for e in image.layers[0].entries()] == ["hello"]
    assert image.layers[0].read("hello") == (EXAMPLES / "hello" / "hello").read_bytes()
    assert image.config.cmd == ["/hello"]
    assert [h.empty_layer for h in image.history] == [False, True]
    assert store.image("hello").id == image.id


def test_config_instructions_make_empty_history_entries(store, tmp_path):
    steps = []
    image = build("ARG BASE=busybox\nFROM $BASE\nARG V=7\nENV A=1 B=\"two words\"\nENV C ${A}-$V\n"
                  "LABEL org.example=\"x y\"\nEXPOSE 6379\nUSER nobody\nWORKDIR /bin\n"
                  "ENTRYPOINT [\"sh\"]\nCMD echo hi\n", None, store, "cfg",
                  progress=lambda ev, st: steps.append((ev, st.number, st.layer_size)))
    assert len(image.layers) == 1  # only busybox's own layer
    cfg = image.config
    assert cfg.env_dict()["B"] == "two words" and cfg.env_dict()["C"] == "1-7"
    assert cfg.labels == {"org.example": "x y"} and cfg.exposed_ports == ["6379/tcp"]
    assert cfg.user == "nobody" and cfg.working_dir == "/bin"
    assert cfg.entrypoint == ["sh"] and cfg.cmd == ["/bin/sh", "-c", "echo hi"]
    assert all(h.empty_layer for h in image.history[2:])
    assert ("done", 11, None) in steps and len([s for s in steps if s[0] == "done"]) == 11


def test_run_copy_add_and_deletion_makes_whiteouts(store, tmp_path):
    ctx = tmp_path / "ctx"
    (ctx / "conf").mkdir(parents=True)
    (ctx / "conf" / "app.conf").write_text("port 6379\n")
    (ctx / "big.bin").write_bytes(b"\0" * 300_000)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ti = tarfile.TarInfo("pkg/readme")
        ti.size = 5
        tf.addfile(ti, io.BytesIO(b"hello"))
    (ctx / "bundle.tar.gz").write_bytes(buf.getvalue())
    image = build("FROM busybox\nCOPY conf /etc/app/\nCOPY big.bin /data/\nADD bundle.tar.gz /opt/\n"
                  "RUN rm /data/big.bin && echo done > /opt/status\n", ctx, store, "t")
    sizes = [l.size for l in image.layers]
    assert sizes[2] > 300_000  # the COPY of big.bin
    last = {e.path: e for e in image.layers[-1].entries()}
    assert last["data/big.bin"].type == "whiteout" and last["data/big.bin"].tar_name == "data/.wh.big.bin"
    root = tmp_path / "root"
    flatten(image, root)
    assert (root / "etc/app/app.conf").read_text() == "port 6379\n"
    assert (root / "opt/pkg/readme").read_text() == "hello"
    assert not (root / "data/big.bin").exists() and (root / "opt/status").read_text() == "done\n"
    rep = report(image)
    assert rep.wasted_bytes >= 300_000  # deleted later, still shipped
    assert rep.total_size == sum(sizes)


def test_multi_stage_copy_from(store, tmp_path):
    image = build("FROM busybox AS builder\nRUN mkdir -p /out && echo artefact > /out/app\n"
                  "FROM scratch\nCOPY --from=builder /out/app /app\n", None, store, "ms")
    assert len(image.layers) == 1
    assert image.layers[0].read("app") == b"artefact\n"


def test_errors_name_the_line(store, tmp_path):
    with pytest.raises(BuildError, match=r"line 2: unsupported instruction FROBNICATE"):
        build("FROM busybox\nFROBNICATE CMD true\n", None, store, "x")
    with pytest.raises(BuildError, match=r"(?s)line 3: RUN frobnicate.*frobnicate: not found.*code: 127"):
        build("FROM busybox\nRUN true\nRUN frobnicate\n", None, store, "x")
    with pytest.raises(BuildError, match="no /bin/sh"):
        build("FROM scratch\nRUN echo hi\n", None, store, "x")
    with pytest.raises(BuildError, match="outside the build context"):
        build("FROM scratch\nCOPY ../secret /\n", tmp_path, store, "x")
    with pytest.raises(BuildError, match="no such image"):
        build("FROM nosuch:1\n", None, store, "x")


def test_rebuild_is_reproducible(store, tmp_path):
    text = "FROM busybox\nRUN echo a > /a && mkdir /d\n"
    first = build(text, None, store, "r1")
    second = build(text, None, store, "r2")
    assert [l.diff_id for l in first.layers] == [l.diff_id for l in second.layers]


def test_cli_build_prints_steps_and_sizes(tmp_path, capsys):
    status = cli_build(["-f", str(EXAMPLES / "hello-scratch.Dockerfile"), str(EXAMPLES / "hello"),
                        "-t", "hello", "--store", str(tmp_path / "store")])
    out = capsys.readouterr().out
    assert status == 0
    assert "Step 2/3 : COPY hello /" in out and "---> layer 10.2 kB" in out
    assert "Successfully tagged hello" in out
    assert cli_build(["-f", str(tmp_path / "nope"), str(tmp_path), "-t", "x", "--store", str(tmp_path / "s")]) == 1


@pytest.mark.slow
def test_redis_eight_runs_versus_one_run(store):
    eight = build(str(EXAMPLES / "redis-eight-runs.Dockerfile"), str(EXAMPLES), store, "redis:eight")
    one = build(str(EXAMPLES / "redis-one-run.Dockerfile"), str(EXAMPLES), store, "redis:one")
    assert eight.layers[0] == one.layers[0]  # the same debian:stretch layer, stored once
    assert len(eight.layers) == 9 and len(one.layers) == 2
    r8, r1 = report(eight), report(one)
    # apt lists, compiler, tarball and build tree all still ship in the eight-RUN image
    assert r8.total_size > 2 * r1.total_size
    assert r8.wasted_bytes > 150_000_000 and r1.wasted_bytes < 2_000_000
    compiler = r8.rows[2]
    assert compiler.size > 100_000_000 and compiler.wasted > 0.9 * compiler.size
    # the last RUN deletes hundreds of MB but adds a layer: deleting cannot shrink an image
    assert r8.rows[-1].size < 2_000_000
    table = compare(eight, one)
    assert "redis:eight" in table and "redis:one" in table


@pytest.mark.kernel
def test_run_for_real_in_a_chroot(store):
    from overlaykit import capabilities, catalogue
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    if not capabilities()["kernel"].available:
        pytest.skip(capabilities()["kernel"].reason)
    if not catalogue.host_busybox_available():
        pytest.skip("no static /bin/busybox (Debian's busybox-static)")
    steps = []
    image = build("FROM busybox:host\nRUN uname -s > /kernel && rm /bin/vi\n", None, store, "real",
                  backend="kernel", progress=lambda ev, st: steps.append(st.mode))
    assert steps[-1] == "kernel"
    layer = {e.path: e for e in image.layers[-1].entries()}
    assert layer["kernel"].type == "file" and image.layers[-1].read("kernel") == b"Linux\n"
    assert layer["bin/vi"].type == "whiteout"
