"""A Dockerfile builder: each filesystem-changing instruction runs in a container and is committed as a layer.

This is the lesson's central experiment made runnable without Docker: build the redis Dockerfile with
eight RUN lines and with one, and compare the layers.  The mechanics follow Docker's classic builder:
every RUN, COPY and ADD mounts the image so far as lower layers under a fresh upper directory
(:class:`overlaykit.images.Container`), makes its changes through the overlay, and commits the upper
as a new layer, so ``rm`` in a later step only adds whiteouts.  ENV, ARG, WORKDIR (for an existing
directory), USER, CMD, ENTRYPOINT, LABEL, EXPOSE, VOLUME, STOPSIGNAL, SHELL, HEALTHCHECK, ONBUILD and
MAINTAINER change only the config and add a history entry with ``empty_layer``, exactly as ``docker
history`` shows them; a base image's ONBUILD triggers run right after FROM.

buildah is the reference (tests/test_build_fidelity.py and test_build_run.py build the same contexts with
both): ``.dockerignore`` follows moby's patternmatcher (:mod:`overlaykit.dockerignore`); COPY/ADD take
modes and mtimes from the context and owners from ``--chown`` only (0:0 otherwise), never from the
builder's umask; a top-level symlink source is followed; ``--chmod`` applies to directories below the
copied one; ENV expands with the values from before the instruction; FROM scratch gets Docker's PATH.
Heredocs (``RUN <<EOF``, ``COPY <<EOF /file``) follow BuildKit, which buildah 1.28 lacks.

RUN runs as the config's USER (uid, gid and groups from the image's /etc/passwd and /etc/group), with
a minimal /dev, /proc and /sys and the instruction's ``--mount=type=bind|cache|tmpfs``, none of which
reaches the layer: for real (a chroot into the kernel overlay's merged root, root only, the mounts made
in the helper's namespace; a mount's content is copied into a tmpfs there, and a cache is copied back to
``<store>/build-cache/<id>`` after the RUN) when the overlay uses the kernel backend and the image's
shell is a real ELF binary (e.g. ``FROM busybox:host``, built from the OS's busybox-static); otherwise
the simulated shell of :mod:`overlaykit.shell` runs it against :class:`overlaykit.runfs.RunFS`.

Reproducibility: layer mtimes are clamped to :data:`BUILD_EPOCH`, or to ``SOURCE_DATE_EPOCH`` when it is
set (BuildKit's ``rewrite-timestamp``: only newer times change), so layer digests do not depend on when
or where a build runs. The config's ``created`` and every history entry's ``created`` are
``SOURCE_DATE_EPOCH`` when set (two builds then give the same image id) and the build's clock time
otherwise, as Docker records them. The Dockerfile is parsed by ``dockerfile-parse``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import os
import posixpath
import re
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import catalogue
from .dockerfile import (SUPPORTED, BuildError, Instruction, exec_form, flag_words, key_values, parse_dockerfile,
                         parse_healthcheck, run_flags, substitute)
from .dockerignore import IgnoreRules
from .images import Container, History, Image, ImageConfig, Store, human_size, inspect
from .runfs import MemFS, ReadOnly, RunFS
from .shell import Shell

BUILD_EPOCH = 1556668800.0
"""Layer mtimes are clamped to this instant (2019-05-01), so a rebuild gives the same layer digests; with
SOURCE_DATE_EPOCH set they are clamped to that instead (BuildKit's ``rewrite-timestamp``: only newer times
change, so a context file's older mtime survives)."""

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""What Docker and buildah put in the Env of an image built FROM scratch."""


def _source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise BuildError(f"SOURCE_DATE_EPOCH must be a number of seconds, got {value!r}") from None


def _iso(seconds: float) -> str:
    import datetime
    t = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{t.microsecond:06d}".rstrip("0") if t.microsecond else "") + "Z"



@dataclass
class Step:
    """What one instruction did: reported to `progress` and kept in the build log."""

    number: int
    total: int
    instruction: Instruction
    stage: str
    layer_size: int | None = None  # uncompressed tar bytes of the new layer; None for config-only steps
    output: str = ""
    seconds: float = 0.0
    mode: str = ""  # "sim", "kernel", "config"

    def describe(self) -> str:
        text = f"{self.instruction.name} {self.instruction.value}".replace("\n", " ")
        return f"Step {self.number}/{self.total} : {text}"




class _Stage:
    def __init__(self, name: str, image: Image, index: int):
        self.name, self.image, self.index = name, image, index
        self.args: dict[str, str] = {}
        self.cmd_set = False
        self.author = image.author


class Builder:
    """Runs one Dockerfile; `build()` is the convenient entry point."""

    def __init__(self, store: Store, context_dir, *, backend: str = "auto", progress=None,
                 build_args: dict[str, str] | None = None, run_mode: str = "auto",
                 source_date_epoch: int | None = None):
        self.store = store
        self.context = Path(context_dir).resolve() if context_dir is not None else None
        self.backend = backend
        self.progress = progress
        self.build_args = dict(build_args or {})
        self.run_mode = run_mode  # "auto", "sim" (always simulate) or "real" (fail if RUN cannot run for real)
        self.steps: list[Step] = []
        self._scratch_root = Path(store.root) / "build-scratch"
        self.epoch = _source_date_epoch() if source_date_epoch is None else int(source_date_epoch)
        self.clamp = BUILD_EPOCH if self.epoch is None else self.epoch

    def _now(self) -> str:
        """`created` of history entries and of the image: SOURCE_DATE_EPOCH when set, else the clock."""
        return _iso(self.epoch if self.epoch is not None else time.time())

    # ------------------------------------------------------------------ driver
    def build(self, text: str, tag: str) -> Image:
        # Modes must not depend on who builds: a RUN sees umask 022 as in Docker, and every mkdir or
        # create of the builder (simulated or through the kernel helper, which inherits it) gets it too.
        old = os.umask(0o022)
        try:
            return self._build(text, tag)
        finally:
            os.umask(old)

    def _build(self, text: str, tag: str) -> Image:
        instructions = parse_dockerfile(text)
        for ins in instructions:
            if ins.name not in SUPPORTED:
                raise BuildError(f"line {ins.line}: unsupported instruction {ins.name} "
                                 f"(supported: {', '.join(sorted(SUPPORTED))})")
        if not any(i.name == "FROM" for i in instructions):
            raise BuildError("no FROM instruction: a Dockerfile must start with FROM (after ARGs)")
        total = len(instructions)
        stages: dict[str, _Stage] = {}
        self._stages = stages
        stage: _Stage | None = None
        global_args: dict[str, str] = {}
        self._scratch_root.mkdir(parents=True, exist_ok=True)
        for number, ins in enumerate(instructions, 1):
            step = Step(number, total, ins, stage.name if stage else "")
            started = time.monotonic()
            if self.progress:
                self.progress("start", step)
            if ins.name == "FROM":
                stage = self._from(ins, stages, global_args, len(stages))
                stages[stage.name] = stage
                stages[str(stage.index)] = stage
                step.stage, step.mode = stage.name, "config"
                self._onbuild_triggers(stage, ins, step, stages, global_args)
            elif stage is None:
                if ins.name != "ARG":
                    raise BuildError(f"line {ins.line}: {ins.name} before the first FROM (only ARG may come first)")
                for k, v in key_values(ins.value, ins.line, "ARG", global_args):
                    global_args[k] = self.build_args.get(k, v or "")
                step.mode = "config"
            else:
                self._step(stage, ins, step, stages, global_args)
            step.seconds = time.monotonic() - started
            self.steps.append(step)
            if self.progress:
                self.progress("done", step)
        image = Image(tag, list(stage.image.layers), stage.image.config, list(stage.image.history),
                      created=self._now(), author=stage.author)
        return self.store.add_image(image)

    def _from(self, ins, stages, global_args, index) -> _Stage:
        words = substitute(ins.value, global_args).split()
        flags = [w for w in words if w.startswith("--")]
        words = [w for w in words if not w.startswith("--")]
        if flags and not all(f.startswith("--platform") for f in flags):
            raise BuildError(f"line {ins.line}: FROM: unsupported flag {flags[0]}")
        if len(words) == 3 and words[1].upper() == "AS":
            ref, name = words[0], words[2].lower()
        elif len(words) == 1:
            ref, name = words[0], str(index)
        else:
            raise BuildError(f"line {ins.line}: FROM expects 'image' or 'image AS name', got {ins.value!r}")
        if ref == "scratch":
            image = Image(ref, [], ImageConfig(env=[DEFAULT_PATH]), [])
        elif ref.lower() in stages:
            image = stages[ref.lower()].image
        else:
            try:
                image = self.store.image(ref)
            except KeyError:
                if catalogue.resolve_name(ref) is None:
                    raise BuildError(f"line {ins.line}: FROM {ref}: no such image in the store, and not a "
                                     f"simulated base ({', '.join(sorted(catalogue.BASE_IMAGES))})") from None
                image = catalogue.base_image(ref, self.store)
        stage = _Stage(name, image, index)
        return stage

    def _onbuild_triggers(self, stage, ins, step, stages, global_args):
        """Docker runs the base image's ONBUILD triggers right after FROM, and does not pass them on."""
        triggers = list(stage.image.config.on_build)
        if not triggers:
            return
        stage.image = Image(stage.image.name, list(stage.image.layers),
                            dataclasses.replace(stage.image.config, on_build=[]), list(stage.image.history))
        for trigger in triggers:
            for t in parse_dockerfile(trigger):
                t = dataclasses.replace(t, line=ins.line)
                if t.name in ("ONBUILD", "FROM", "MAINTAINER") or t.name not in SUPPORTED:
                    raise BuildError(f"line {ins.line}: ONBUILD trigger {trigger!r} of {stage.image.name}: "
                                     f"{t.name} is not allowed as a trigger")
                sub = Step(step.number, step.total, t, stage.name)
                self._step(stage, t, sub, stages, global_args)
                step.output += sub.output
                if sub.layer_size is not None:
                    step.layer_size = (step.layer_size or 0) + sub.layer_size

    # ------------------------------------------------------------------ one instruction
    def _variables(self, stage: _Stage) -> dict[str, str]:
        return {**stage.args, **stage.image.config.env_dict()}

    def _config_step(self, stage: _Stage, created_by: str, config: ImageConfig):
        stage.image = Image(stage.image.name, list(stage.image.layers), config,
                            stage.image.history + [History(created_by, True, created=self._now())])

    def _step(self, stage: _Stage, ins: Instruction, step: Step, stages, global_args):
        cfg = dataclasses.replace(stage.image.config, env=list(stage.image.config.env),
                                  labels=dict(stage.image.config.labels),
                                  exposed_ports=list(stage.image.config.exposed_ports),
                                  volumes=list(stage.image.config.volumes))
        variables = self._variables(stage)
        nop = "/bin/sh -c #(nop) "
        name, value = ins.name, ins.value
        step.mode = "config"
        if name == "ARG":
            for k, v in key_values(value, ins.line, "ARG", variables):
                default = global_args.get(k, "") if v is None else v
                stage.args[k] = self.build_args.get(k, default)
            self._config_step(stage, f"{nop} ARG {value}", cfg)
        elif name == "ENV":
            env = cfg.env_dict()
            pairs = key_values(value, ins.line, "ENV", variables)  # all expanded with the values from before
            for k, v in pairs:
                env[k] = v
            cfg.env = [f"{k}={v}" for k, v in env.items()]
            self._config_step(stage, f"{nop} ENV " + " ".join(f"{k}={v}" for k, v in pairs), cfg)
        elif name == "LABEL":
            for k, v in key_values(value, ins.line, "LABEL", variables):
                cfg.labels[substitute(k, variables)] = v
            self._config_step(stage, f"{nop} LABEL {value}", cfg)
        elif name == "EXPOSE":
            for port in substitute(value, variables).split():
                cfg.exposed_ports = sorted(set(cfg.exposed_ports) | {port if "/" in port else port + "/tcp"})
            self._config_step(stage, f"{nop} EXPOSE {value}", cfg)
        elif name == "VOLUME":
            vols = exec_form(value) or substitute(value, variables).split()
            cfg.volumes = sorted(set(cfg.volumes) | set(vols))
            self._config_step(stage, f"{nop} VOLUME {json.dumps(vols)}", cfg)
        elif name == "SHELL":
            argv = exec_form(value)
            if not argv:
                raise BuildError(f"line {ins.line}: SHELL requires the arguments in JSON form, "
                                 f"e.g. SHELL [\"/bin/bash\", \"-c\"]")
            cfg.shell = argv
            self._config_step(stage, f"{nop} SHELL {json.dumps(argv)}", cfg)
        elif name == "HEALTHCHECK":
            cfg.healthcheck = parse_healthcheck(value, ins.line)
            self._config_step(stage, f"{nop} HEALTHCHECK {json.dumps(cfg.healthcheck)}", cfg)
        elif name == "ONBUILD":
            trigger = value.strip()
            first = trigger.split(None, 1)[0].upper() if trigger else ""
            if first in ("ONBUILD", "FROM", "MAINTAINER") or first not in SUPPORTED:
                raise BuildError(f"line {ins.line}: ONBUILD {first or '(nothing)'}: not allowed as a trigger")
            cfg.on_build = list(cfg.on_build) + [trigger]
            self._config_step(stage, f"{nop} ONBUILD {trigger}", cfg)
        elif name == "MAINTAINER":
            stage.author = value.strip()
            self._config_step(stage, f"{nop} MAINTAINER {stage.author}", cfg)
        elif name == "STOPSIGNAL":
            cfg.stop_signal = substitute(value, variables)
            self._config_step(stage, f"{nop} STOPSIGNAL {cfg.stop_signal}", cfg)
        elif name == "USER":
            cfg.user = substitute(value, variables)
            self._config_step(stage, f"{nop} USER {cfg.user}", cfg)
        elif name in ("CMD", "ENTRYPOINT"):
            argv = exec_form(value)
            if argv is None:
                argv = ["/bin/sh", "-c", value]
            if name == "CMD":
                cfg.cmd = argv
            else:
                cfg.entrypoint = argv
                if not stage.cmd_set:  # Docker: ENTRYPOINT resets a CMD inherited from the base image
                    cfg.cmd = None
            stage.cmd_set = stage.cmd_set or name == "CMD"
            self._config_step(stage, f"{nop} {name} {json.dumps(argv)}", cfg)
        elif name == "WORKDIR":
            path = posixpath.normpath(posixpath.join(cfg.working_dir or "/", substitute(value, variables)))
            cfg.working_dir = path
            self._layer_step(stage, ins, step, f"{nop} WORKDIR {path}", cfg,
                             lambda c: None if c.overlay.exists(path) else c.overlay.mkdir(path, mode=0o755, parents=True),
                             only_if_changed=True)
        elif name == "RUN":
            self._run(stage, ins, step, cfg, variables)
        elif name in ("COPY", "ADD"):
            self._copy(stage, ins, step, cfg, variables, stages)

    def _layer_step(self, stage, ins, step, created_by, cfg, action, only_if_changed=False):
        """Run `action(overlay)` in a container of the stage's image and commit the upper as a layer."""
        scratch = Path(tempfile.mkdtemp(prefix="step-", dir=self._scratch_root))
        try:
            container = Container(stage.image, self.store, scratch, backend=self.backend)
            container.overlay.tracing = False  # a build does thousands of operations; nobody reads the trace
            container.lchowns = []  # (path, uid, gid) of symlinks to chown once the overlay is unmounted
            if container.overlay.backend == "kernel":
                # attached to a directory in the helper's namespace (not a detached mount), so RUN's /dev,
                # /proc, /sys and --mount targets can be mounted on it there
                container.overlay.merged = scratch / "merged"
                container.overlay.merged.mkdir()
            with container:
                step.mode = step.mode if step.mode not in ("", "config") else container.overlay.backend
                action(container)
            for path, uid, gid in container.lchowns:
                _lchown_in_upper(container.upper, path, uid, gid)
            if only_if_changed and not any(scratch.joinpath("upper").iterdir()):
                self._config_step(stage, created_by, cfg)
                step.mode = "config"
                return
            new = container.commit(created_by, config=cfg, mtime=self.clamp)
            history = new.history[:-1] + [dataclasses.replace(new.history[-1], created=self._now())]
            stage.image = Image(stage.image.name, new.layers, new.config, history)
            step.layer_size = new.layers[-1].size
        finally:
            _rmtree(scratch)

    # ------------------------------------------------------------------ RUN
    def _run(self, stage, ins, step, cfg, variables):
        """RUN as the image's USER, with /dev, /proc, /sys and the instruction's --mounts, none of which
        reaches the layer: for real (chroot into the kernel overlay's merged root, root only) where the
        image's shell is a real program, else in the simulated shell."""
        mounts, script = run_flags(ins)
        argv = exec_form(script)
        shell_cmd = list(cfg.shell or ["/bin/sh", "-c"])
        shebang = None
        if ins.heredocs and argv is None:
            name, body, _ = ins.heredocs[0]
            if len(ins.heredocs) == 1 and script.strip() in (f"<<{name}", f"<<-{name}", f"<<'{name}'",
                                                             f'<<"{name}"', f"<<-'{name}'", f'<<-"{name}"'):
                if body.startswith("#!"):
                    shebang = (name, body)  # BuildKit runs it as a program from /dev/pipes/NAME
                script = body
            else:  # BuildKit: the command line and its documents go to the shell as they are
                script = script + "".join(f"\n{body}{name}" for name, body, _ in ins.heredocs)
        created_by = f"{' '.join(shell_cmd)} {script}" if argv is None else script
        env = {**stage.args, **cfg.env_dict()}

        def action(container):
            ov = container.overlay
            program = argv[0] if argv else (shebang_program(shebang) if shebang else shell_cmd[0])
            real = self.run_mode != "sim" and _real_root(ov, program) is not None and os.geteuid() == 0
            if self.run_mode == "real" and not real:
                raise BuildError(f"line {ins.line}: RUN cannot run for real here (needs root, the kernel backend "
                                 f"and a real {program} in the image)")
            if argv is None and not shebang and not _lexists(ov, shell_cmd[0]):
                raise BuildError(f"line {ins.line}: RUN {ins.value}: the image has no {shell_cmd[0]} "
                                 f"(exec: \"{shell_cmd[0]}\": stat {shell_cmd[0]}: no such file or directory)")
            uid, gid, groups, home = _resolve_user(ov, cfg.user, ins.line)
            run_env = {"HOME": home, **env}
            workdir = cfg.working_dir or "/"
            if cfg.working_dir and not ov.exists(cfg.working_dir):
                _mkdirs(ov, cfg.working_dir, None, None)
            sources = [self._mount_source(m, ins, stages=self._stages) for m in mounts]
            if real:
                step.mode = "kernel"
                status, output = self._run_real(ov, ins, mounts, sources, shebang, run_env, workdir,
                                                (uid, gid, groups),
                                                argv or (shell_cmd + [script] if not shebang else None))
            else:
                step.mode = "sim"
                fs_mounts = {}
                for m, entries in zip(mounts, sources):
                    mem = MemFS(_mount_mode(m, entries))
                    _fill(mem, "/", entries)
                    mem.root.uid, mem.root.gid = int(m.get("uid", 0)), int(m.get("gid", 0))
                    fs_mounts[m["target"]] = ReadOnly(mem) if m["type"] == "bind" and not m["rw"] else mem
                fs = RunFS(ov, uid=uid, gid=gid, groups=groups, mounts=fs_mounts, cwd=workdir,
                           lchown=lambda p, u, g: container.lchowns.append((p, u, g)))
                shell = Shell(fs, env=run_env, cwd=workdir)
                if argv is not None:
                    result = shell.run_argv(argv)
                elif shebang is not None and not _sh_like(shebang_program(shebang)):
                    raise BuildError(f"line {ins.line}: RUN <<{shebang[0]}: the simulated shell cannot run "
                                     f"{shebang_program(shebang)} scripts")
                elif not _sh_like(shell_cmd[0]) or shell_cmd[1:] != ["-c"]:
                    raise BuildError(f"line {ins.line}: RUN: the simulated shell runs only SHELL [\"/bin/sh\", "
                                     f"\"-c\"] (this stage has SHELL {json.dumps(shell_cmd)})")
                else:
                    result = shell.run(script)
                status, output = result.status, result.output
                for m in mounts:
                    if m["type"] == "cache":
                        self._save_cache(m, _tree(fs_mounts[m["target"]], "/"))
            step.output = output
            if status != 0:
                shown = ins.value if argv is None else json.dumps(argv)
                raise BuildError(f"line {ins.line}: RUN {shown}\n{output.rstrip()}\n"
                                 f"returned a non-zero code: {status}")

        self._layer_step(stage, ins, step, created_by, cfg, action)

    def _run_real(self, ov, ins, mounts, sources, shebang, env, workdir, user, argv):
        """Mount /dev, /proc, /sys and tmpfs file systems for the --mount targets in the helper's namespace,
        fill them, run the command chrooted as the user, keep the caches, and take every mount away again."""
        worker = ov._impl.worker
        targets = [m["target"] for m in mounts]

        def call(*args):
            reply = worker.call("run_mounts", *args)
            if reply[0] == "err":
                raise BuildError(f"line {ins.line}: RUN: cannot mount /dev, /proc, /sys or a --mount target: "
                                 f"{os.strerror(reply[1])}")
            return reply[1]

        made = call("mount", None, targets)
        try:
            for m, entries in zip(mounts, sources):
                _fill(ov, m["target"], entries)
                ov.chmod(m["target"], _mount_mode(m, entries))
                if m.get("uid") or m.get("gid"):
                    ov.chown(m["target"], int(m.get("uid", 0)), int(m.get("gid", 0)))
            if any(m["type"] == "bind" and not m["rw"] for m in mounts):
                call("readonly", None, [m["target"] for m in mounts if m["type"] == "bind" and not m["rw"]])
            if shebang is not None:
                ov.mkdir("/dev/pipes", mode=0o755, exist_ok=True)
                ov.write_bytes(f"/dev/pipes/{shebang[0]}", shebang[1].encode())
                ov.chmod(f"/dev/pipes/{shebang[0]}", 0o755)
                # /dev is mounted noexec: run the script's interpreter on it, as the kernel would
                interpreter = shebang[1].splitlines()[0][2:].strip().split(None, 1)
                argv = interpreter + [f"/dev/pipes/{shebang[0]}"]
            status, output = _run_chroot(_real_root(ov, argv[0] if not shebang else "/dev/pipes/"), argv, env,
                                         workdir, user)
            for m in mounts:
                if m["type"] == "cache":
                    self._save_cache(m, _tree(ov, m["target"]))
        finally:
            call("unmount", made, targets)
        return status, output

    def _mount_source(self, m, ins, stages):
        """What a --mount shows at first: entries (rel, kind, mode, bytes, link, mtime)."""
        if m["type"] == "tmpfs":
            return []
        if m["type"] == "cache":
            d = self._cache_dir(m)
            return list(_ContextSource(d, ins.line).walk(".")) if d.is_dir() else []
        source = m.get("source", "/")
        if m.get("from"):
            ref = m["from"].lower()
            image = stages[ref].image if ref in stages else None
            if image is None:
                try:
                    image = self.store.image(m["from"])
                except KeyError:
                    raise BuildError(f"line {ins.line}: RUN --mount from={m['from']}: no such stage or image") from None
            scratch = Path(tempfile.mkdtemp(prefix="mount-", dir=self._scratch_root))
            try:
                c = Container(image, self.store, scratch, backend="sim")
                c.overlay.tracing = False
                with c:
                    src = _OverlaySource(c.overlay)
                    p = posixpath.normpath("/" + source)
                    if not _lexists(c.overlay, p):
                        raise BuildError(f"line {ins.line}: RUN --mount source={source}: not found in {m['from']}")
                    return list(src.walk(p)) if src.is_dir(p) else [("", "dir", 0o755, b"", None, None),
                                                                    (posixpath.basename(p),) + src.entry(p)]
            finally:
                _rmtree(scratch)
        if self.context is None:
            raise BuildError(f"line {ins.line}: RUN --mount=type=bind needs a build context directory")
        src = _ContextSource(self.context, ins.line, self._ignore_rules())
        rel = posixpath.normpath(source.lstrip("/")) or "."
        if not src.glob(rel) and rel != ".":
            raise BuildError(f"line {ins.line}: RUN --mount source={source}: not found in the build context")
        return list(src.walk(rel))

    def _cache_dir(self, m) -> Path:
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", m.get("id") or m["target"])
        return Path(self.store.root) / "build-cache" / key

    def _save_cache(self, m, entries):
        """Keep what the RUN left in a cache mount for the next build: written to a sibling, then renamed."""
        final = self._cache_dir(m)
        final.parent.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=".new-", dir=final.parent))
        for rel, kind, mode, data, target, _ in entries:
            if not rel:
                continue
            p = fresh / rel
            if kind == "dir":
                p.mkdir(mode=0o700)
                os.chmod(p, mode)
            elif kind == "symlink":
                os.symlink(target, p)
            elif kind == "file":
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(p, mode)
        old = final.parent / f".old-{fresh.name}"
        if final.exists():
            os.rename(final, old)
        os.rename(fresh, final)
        _rmtree(old)

    def _ignore_rules(self) -> IgnoreRules:
        if getattr(self, "_rules", None) is None:
            try:
                self._rules = IgnoreRules.for_context(self.context)
            except ValueError as e:
                raise BuildError(str(e)) from None
        return self._rules

    # ------------------------------------------------------------------ COPY / ADD
    def _copy(self, stage, ins, step, cfg, variables, stages):
        flags, words = flag_words(ins.value)
        json_form = exec_form(ins.value[ins.value.find("["):]) if "[" in ins.value else None
        if json_form is not None:
            words = json_form
        words = [substitute(w, variables) for w in words]
        if len(words) < 2:
            raise BuildError(f"line {ins.line}: {ins.name} needs at least one source and a destination")
        *sources, dest = words
        unknown = set(flags) - {"from", "chown", "chmod"}
        if unknown:
            raise BuildError(f"line {ins.line}: {ins.name}: unsupported flag --{sorted(unknown)[0]}")
        if "from" in flags and ins.name == "ADD":
            raise BuildError(f"line {ins.line}: ADD does not support --from (use COPY)")
        workdir = cfg.working_dir or "/"
        dest_abs = posixpath.normpath(posixpath.join(workdir, dest))
        dest_is_dir = dest.endswith("/") or len(sources) > 1
        chown = flags.get("chown")
        chmod = int(flags["chmod"], 8) if flags.get("chmod") else None
        created_by = f"/bin/sh -c #(nop) {ins.name} {ins.value}"
        # `COPY <<EOF /file`: the document is a file named after it (BuildKit), mode 0644 unless --chmod;
        # an unquoted delimiter expands build variables in it
        docs = {name: (body if quoted else substitute(body, variables)) for name, body, quoted in ins.heredocs}
        inline = [(n, docs[n]) for n in (w.lstrip("<").lstrip("-").strip("'\"") for w in sources
                                         if w.startswith("<<")) if n in docs]
        sources = [w for w in sources if not (docs and w.startswith("<<"))]

        source_stage = None
        if "from" in flags:
            ref = flags["from"].lower()
            if ref in stages:
                source_stage = stages[ref].image
            else:
                try:
                    source_stage = self.store.image(flags["from"])
                except KeyError:
                    raise BuildError(f"line {ins.line}: COPY --from={flags['from']}: no such stage or image") from None
        elif self.context is None and sources:
            raise BuildError(f"line {ins.line}: {ins.name} needs a build context directory")

        def action(container):
            try:
                copy(container)
            except PermissionError as e:
                if chown and os.geteuid() != 0:
                    raise BuildError(f"line {ins.line}: {ins.name} --chown={chown}: an unprivileged builder cannot "
                                     f"make files owned by another user ({e.strerror}: {e.filename})") from None
                raise

        def copy(container):
            ov = container.overlay
            if inline:
                uid, gid = _owner(ov, chown) if chown else (None, None)
                for name, body in inline:
                    target = posixpath.join(dest_abs, name) if dest_is_dir else dest_abs
                    _mkdirs(ov, posixpath.dirname(target), uid, gid)
                    self._put(ov, target, "file", 0o644, body.encode(), None, uid, gid, chmod, None,
                              container.lchowns)
            if not sources:
                return
            if source_stage is not None:
                scratch = Path(tempfile.mkdtemp(prefix="from-", dir=self._scratch_root))
                try:
                    src_container = Container(source_stage, self.store, scratch, backend="sim")
                    src_container.overlay.tracing = False
                    with src_container:
                        src = _OverlaySource(src_container.overlay)
                        self._copy_sources(ins, src, sources, ov, dest_abs, dest_is_dir, chown, chmod, False,
                                           container.lchowns)
                finally:
                    _rmtree(scratch)
            else:
                src = _ContextSource(self.context, ins.line, self._ignore_rules())
                self._copy_sources(ins, src, sources, ov, dest_abs, dest_is_dir, chown, chmod,
                                   ins.name == "ADD", container.lchowns)

        self._layer_step(stage, ins, step, created_by, cfg, action)

    def _copy_sources(self, ins, src, sources, ov, dest, dest_is_dir, chown, chmod, add, lchowns):
        """Copy what the sources match to `dest`. Modes, owners and mtimes come from the source and the
        instruction only: a created directory is 0755 root, `--chown` owns everything copied (links too,
        recorded in `lchowns` and applied to the upper after unmount), `--chmod` every file and
        directory below the copied one; a top-level symlink is followed, as Docker and buildah do."""
        matched = []
        for pattern in sources:
            if add and re.match(r"https?://", pattern):
                if pattern not in catalogue.DOWNLOADS:
                    raise BuildError(f"line {ins.line}: ADD {pattern}: the simulated network does not know this URL")
                target = posixpath.join(dest, posixpath.basename(pattern)) if dest_is_dir else dest
                _mkdirs(ov, posixpath.dirname(target), None, None)
                ov.write_bytes(target, catalogue.download_bytes(pattern))
                ov.chmod(target, 0o600)  # like Docker: remote ADD files are 0600
                continue
            found = src.glob(pattern)
            if not found:
                raise BuildError(f"line {ins.line}: {ins.name} failed: no source files were specified "
                                 f"matching {pattern!r}")
            matched += [m for m in found if m not in matched]
        if len(matched) > 1 and not dest_is_dir and not any(src.is_dir(m) for m in matched):
            raise BuildError(f"line {ins.line}: When using {ins.name} with more than one source file, "
                             f"the destination must be a directory and end with a /")
        uid, gid = _owner(ov, chown) if chown else (None, None)
        dir_times = []
        for m in matched:
            if src.is_dir(m):
                _mkdirs(ov, dest, uid, gid)
                for rel, kind, mode, data, target, mtime in src.walk(m):
                    if not rel:
                        continue  # the destination directory itself: made above, not a copy of the source's
                    path = posixpath.join(dest, rel)
                    self._put(ov, path, kind, mode, data, target, uid, gid, chmod, mtime, lchowns)
                    if kind == "dir":
                        dir_times.append((path, mtime))
            elif add and _is_tar(src.read(m)):
                _mkdirs(ov, dest, uid, gid)
                _extract(ov, src.read(m), dest, uid, gid, lchowns)
            else:
                target = posixpath.join(dest, posixpath.basename(m)) if dest_is_dir or _isdir(ov, dest) else dest
                _mkdirs(ov, posixpath.dirname(target), uid, gid)
                kind, mode, data, link, mtime = src.entry(m)
                self._put(ov, target, kind, mode, data, link, uid, gid, chmod, mtime, lchowns)
        for path, mtime in reversed(dir_times):  # after their contents, which change a directory's mtime
            ov.utime(path, (mtime, mtime))

    @staticmethod
    def _put(ov, path, kind, mode, data, target, uid, gid, chmod, mtime, lchowns):
        if kind == "dir":
            if not _isdir(ov, path):
                if _lexists(ov, path):
                    ov.remove(path)
                ov.mkdir(path, mode=0o700)
                ov.chmod(path, chmod if chmod is not None else mode)
        else:
            if _lexists(ov, path) and not _isdir(ov, path):
                ov.remove(path)
            if kind == "symlink":
                ov.symlink(target, path)
                if uid is not None:
                    lchowns.append((path, uid, gid))
                return
            ov.write_bytes(path, data)
            ov.chmod(path, chmod if chmod is not None else mode)
        if uid is not None:
            ov.chown(path, uid, gid)
        if mtime is not None and kind != "dir":
            ov.utime(path, (mtime, mtime))


def _segments_match(pattern: str, rel: str) -> bool:
    """Go's filepath.Match, as COPY uses it: `*`, `?` and `[...]` never cross a `/`."""
    p, r = pattern.split("/"), rel.split("/")
    return len(p) == len(r) and all(fnmatch.fnmatchcase(b, a) for a, b in zip(p, r))


class _ContextSource:
    """Files of the build context less what .dockerignore excludes; nothing outside it can be named
    (like Docker's 'forbidden path')."""

    def __init__(self, root: Path, line: int, rules: IgnoreRules | None = None):
        self.root, self.line = root, line
        self.rules = rules if rules is not None else IgnoreRules([])

    def _real(self, rel: str) -> Path:
        p = (self.root / rel.lstrip("/")).resolve()
        if p != self.root and self.root not in p.parents:
            raise BuildError(f"line {self.line}: forbidden path outside the build context: {rel}")
        return p

    def _visible(self, rel: str) -> bool:
        if rel in ("", ".") or not self.rules.excluded(rel):
            return True
        return os.path.isdir(self.root / rel) and self.rules.may_include_under(rel)

    def glob(self, pattern: str) -> list[str]:
        norm = posixpath.normpath(pattern.lstrip("/")) if pattern not in ("", ".", "/") else "."
        if norm.startswith(".."):
            raise BuildError(f"line {self.line}: forbidden path outside the build context: {pattern}")
        if not any(c in norm for c in "*?["):
            return [norm] if os.path.lexists(self._real(norm)) and self._visible(norm) else []
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for n in sorted(dirnames + filenames):
                rel = os.path.relpath(os.path.join(dirpath, n), self.root)
                if _segments_match(norm, rel) and self._visible(rel):
                    out.append(rel)
        return sorted(out)

    def is_dir(self, rel) -> bool:
        return self._real(rel).is_dir()

    def read(self, rel) -> bytes:
        p = self._real(rel)
        return p.read_bytes() if p.is_file() else b""

    def entry(self, rel):
        """A named source: a symlink is followed (inside the context), as Docker and buildah do."""
        p = self._real(rel)
        st = p.stat()
        return "file", st.st_mode & 0o7777, p.read_bytes(), None, st.st_mtime

    def walk(self, rel):
        """(relative path, kind, mode, bytes, link target, mtime) of a directory and all below it, less
        what .dockerignore excludes (a directory stays if something below it is re-included)."""
        top = self._real(rel)
        base = os.path.relpath(top, self.root)
        base = "" if base == "." else base

        def visit(d: str) -> list:
            here = os.path.join(top, d) if d else str(top)
            out = []
            for n in sorted(os.listdir(here)):
                r = posixpath.join(d, n) if d else n
                ctx_rel = posixpath.join(base, r) if base else r
                p = os.path.join(here, n)
                st = os.lstat(p)
                excluded = self.rules.excluded(ctx_rel)
                if stat.S_ISDIR(st.st_mode):
                    if excluded and not self.rules.may_include_under(ctx_rel):
                        continue
                    below = visit(r)
                    if not excluded or below:
                        out.append((r, "dir", stat.S_IMODE(st.st_mode), b"", None, st.st_mtime))
                        out += below
                elif excluded:
                    continue
                elif stat.S_ISLNK(st.st_mode):
                    out.append((r, "symlink", 0o777, b"", os.readlink(p), st.st_mtime))
                elif stat.S_ISREG(st.st_mode):
                    out.append((r, "file", stat.S_IMODE(st.st_mode), Path(p).read_bytes(), None, st.st_mtime))
            return out

        st = os.stat(top)
        yield "", "dir", stat.S_IMODE(st.st_mode), b"", None, st.st_mtime
        yield from visit("")


class _OverlaySource:
    """Files of an earlier stage, read through its (simulated) overlay."""

    def __init__(self, ov):
        self.ov = ov

    def glob(self, pattern):
        p = posixpath.normpath("/" + pattern)
        if not any(c in p for c in "*?["):
            return [p] if _lexists(self.ov, p) else []
        parent = posixpath.dirname(p)
        try:
            names = self.ov.listdir(parent)
        except OSError:
            return []
        return [posixpath.join(parent, n) for n in names if fnmatch.fnmatchcase(n, posixpath.basename(p))]

    def is_dir(self, p):
        return _isdir(self.ov, p)

    def read(self, p):
        return self.ov.read_bytes(p)

    def entry(self, p, follow: bool = True):
        st = self.ov.stat(p, follow_symlinks=follow)
        if st.kind == "symlink":
            return "symlink", 0o777, b"", st.target, st.mtime_ns / 1e9
        return "file", st.mode, self.ov.read_bytes(p), None, st.mtime_ns / 1e9

    def walk(self, top):
        for dirpath, dirnames, filenames in self.ov.walk(top):
            rel = posixpath.relpath("/" + dirpath.lstrip("/"), "/" + top.lstrip("/"))
            rel = "" if rel == "." else rel
            st = self.ov.stat(dirpath)
            yield rel, "dir", st.mode, b"", None, st.mtime_ns / 1e9
            links = [d for d in dirnames if self.ov.stat(posixpath.join(dirpath, d), follow_symlinks=False).kind == "symlink"]
            for n in filenames + links:
                p = posixpath.join(dirpath, n)
                kind, mode, data, target, mtime = self.entry(p, follow=False)
                yield posixpath.join(rel, n) if rel else n, kind, mode, data, target, mtime


# ---------------------------------------------------------------------- helpers

def _lexists(ov, p) -> bool:
    try:
        ov.stat(p, follow_symlinks=False)
        return True
    except OSError:
        return False


def _isdir(ov, p) -> bool:
    try:
        return ov.stat(p).kind == "dir"
    except OSError:
        return False


def _ensure_dir(ov, p):
    _mkdirs(ov, p, None, None)


def _mkdirs(ov, p, uid, gid):
    """mkdir -p with mode 0755 whatever the umask; the directories it makes get `uid:gid` when given."""
    if not p or _isdir(ov, p):
        return
    parts = [x for x in p.split("/") if x]
    for i in range(1, len(parts) + 1):
        q = "/" + "/".join(parts[:i])
        if _isdir(ov, q):
            continue
        ov.mkdir(q, mode=0o755)
        ov.chmod(q, 0o755)
        if uid is not None:
            ov.chown(q, uid, gid)


def _lchown_in_upper(upper: Path, path: str, uid: int, gid: int) -> None:
    """chown a symlink in a committed-to-be upper dir without following any symlink on the host (the
    overlay API's chown follows links; Docker's --chown changes the link itself)."""
    parts = [x for x in path.split("/") if x]
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.chown(parts[-1], uid, gid, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        pass  # not in this upper (the path went through a lower layer's symlink)
    finally:
        os.close(fd)


def _owner(ov, spec: str) -> tuple[int, int]:
    user, _, group = spec.partition(":")

    def lookup(path, name):
        if name.isdigit():
            return int(name)
        try:
            for line in ov.read_text(path).splitlines():
                f = line.split(":")
                if f[0] == name:
                    return int(f[2])
        except OSError:
            pass
        raise BuildError(f"unable to find user or group {name!r} in {path}")

    uid = lookup("/etc/passwd", user)
    gid = lookup("/etc/group", group) if group else uid
    if (uid, gid) == (0, 0) and os.geteuid() != 0:
        return None, None  # an unprivileged builder's own files are root's in the layer already
    return uid, gid


def _is_tar(data: bytes) -> bool:
    if not data:
        return False
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            tf.next()
        return True
    except (tarfile.TarError, EOFError, OSError):
        return False


def _extract(ov, data: bytes, dest: str, uid=None, gid=None, lchowns=None):
    """ADD's auto-extraction: through the overlay, refusing members that would leave `dest`. Modes and
    mtimes come from the archive, owners too (as Docker and buildah extract them) unless --chown gives
    them; an unprivileged builder keeps its own (root's in the layer)."""
    dir_times = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for m in tf.getmembers():
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            if ".." in parts:
                raise BuildError(f"ADD: archive member {m.name!r} would escape {dest}")
            if not parts:
                continue
            p = posixpath.join(dest, *parts)
            _mkdirs(ov, posixpath.dirname(p), uid, gid)
            owner = (uid, gid) if uid is not None else ((m.uid, m.gid) if os.geteuid() == 0 else (None, None))
            if m.isdir():
                if not _isdir(ov, p):
                    if _lexists(ov, p):
                        ov.remove(p)
                    ov.mkdir(p, mode=0o700)
                ov.chmod(p, m.mode & 0o7777)
                dir_times.append((p, m.mtime))
            elif m.issym():
                if _lexists(ov, p):
                    ov.remove(p)
                ov.symlink(m.linkname, p)
                if owner[0] is not None and lchowns is not None:
                    lchowns.append((p, *owner))
                continue
            elif m.isfile():
                if _lexists(ov, p) and not _isdir(ov, p):
                    ov.remove(p)
                ov.write_bytes(p, tf.extractfile(m).read())
                ov.chmod(p, m.mode & 0o7777)
                ov.utime(p, (m.mtime, m.mtime))
            else:
                continue
            if owner[0] is not None:
                ov.chown(p, *owner)
    for p, mtime in reversed(dir_times):
        ov.utime(p, (mtime, mtime))


def _real_root(ov, program: str = "/bin/sh") -> str | None:
    """Where a chroot finds the merged root of a kernel overlay whose `program` is a real ELF, else None.

    The kernel backend keeps its mount inside a helper process's private mount namespace, with the
    merged root as that process's root directory, so ``/proc/<pid>/root`` reaches it from outside.
    """
    if ov.backend != "kernel":
        return None
    pid = getattr(getattr(ov, "_impl", None), "pid", None)
    if pid is None:
        return None
    root = f"/proc/{pid}/root"
    if program.startswith("/dev/pipes/"):
        return root if os.access(root, os.R_OK) else None
    try:
        target = ov.stat(program).kind == "file" and ov.read_bytes(program)[:4] == b"\x7fELF"
    except OSError:
        return None
    return root if target and os.access(root, os.R_OK) else None


def _sh_like(program: str) -> bool:
    return posixpath.basename(program) in ("sh", "bash", "ash", "dash")


def shebang_program(shebang) -> str:
    line = shebang[1].splitlines()[0][2:].strip()
    words = line.split()
    if words and posixpath.basename(words[0]) == "env" and len(words) > 1:
        return words[1]
    return words[0] if words else "/bin/sh"


def _run_chroot(merged, argv, env, workdir, user=(0, 0, ())) -> tuple[int, str]:
    """RUN for real: the merged root of a kernel overlay as the root directory, as the RUN user (root only)."""
    uid, gid, groups = user

    def enter():
        os.chroot(merged)
        os.chdir(workdir if os.path.isdir(workdir) else "/")
        os.setgroups(sorted(set(groups)))
        os.setgid(gid)
        os.setuid(uid)
        os.umask(0o022)

    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", **env}
    proc = subprocess.run(argv, env=env, preexec_fn=enter, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, timeout=600)
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def _resolve_user(ov, spec: str, line: int) -> tuple[int, int, list[int], str]:
    """USER as RUN runs it: (uid, gid, supplementary groups, home) from the image's /etc/passwd and
    /etc/group, the way runc resolves it (a numeric uid missing from passwd runs with gid 0 and home /)."""
    spec = (spec or "").strip()
    if not spec:
        return 0, 0, [], "/root"
    user, _, group = spec.partition(":")

    def table(path):
        try:
            return [l.split(":") for l in ov.read_text(path).splitlines() if l and not l.startswith("#")]
        except (OSError, UnicodeDecodeError):
            return []

    passwd, groups_t = table("/etc/passwd"), table("/etc/group")
    entry = next((f for f in passwd if len(f) >= 6 and (f[0] == user or (user.isdigit() and f[2] == user))), None)
    if entry is None and not user.isdigit():
        raise BuildError(f"line {line}: unable to find user {user}: no matching entries in passwd file")
    uid = int(user) if user.isdigit() else int(entry[2])
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    home = entry[5] if entry is not None and entry[5] else "/"
    name = entry[0] if entry is not None else None
    if group:
        g = next((f for f in groups_t if len(f) >= 3 and (f[0] == group or f[2] == group)), None)
        if g is None and not group.isdigit():
            raise BuildError(f"line {line}: unable to find group {group}: no matching entries in group file")
        gid = int(group) if group.isdigit() else int(g[2])
    extra = [int(f[2]) for f in groups_t if len(f) >= 4 and name and name in f[3].split(",") and f[2].isdigit()]
    return uid, gid, sorted({gid, *extra}) if not group else [gid], home




def _mount_mode(m, entries) -> int:
    """The mode of a --mount's root: `mode=`, else a bind's source directory's, a tmpfs's 1777 (the
    kernel's default for a tmpfs root, as BuildKit and buildah leave it) or a new cache's 0755."""
    if "mode" in m:
        return m["mode"]
    if m["type"] == "bind" and entries and not entries[0][0]:
        return entries[0][2]
    return 0o1777 if m["type"] == "tmpfs" else 0o755


def _fill(fs, top: str, entries) -> None:
    """Write walked entries (rel, kind, mode, bytes, link, mtime) under `top` of an overlay-like fs."""
    for rel, kind, mode, data, target, _ in entries:
        p = posixpath.join(top, rel) if rel else top
        if not rel:
            continue
        if kind == "dir":
            fs.mkdir(p, mode=0o755, exist_ok=True)
            fs.chmod(p, mode)
        elif kind == "symlink":
            fs.symlink(target, p)
        elif kind == "file":
            fs.write_bytes(p, data)
            fs.chmod(p, mode)


def _tree(fs, top: str) -> list:
    """The entries below `top` of an overlay-like fs, parents first (what a cache mount keeps)."""
    out = [("", "dir", 0o755, b"", None, None)]

    def visit(d, rel):
        for n in fs.listdir(d):
            p, r = posixpath.join(d, n), posixpath.join(rel, n) if rel else n
            st = fs.stat(p, follow_symlinks=False)
            if st.kind == "dir":
                out.append((r, "dir", st.mode, b"", None, None))
                visit(p, r)
            elif st.kind == "symlink":
                out.append((r, "symlink", 0o777, b"", st.target, None))
            elif st.kind == "file":
                out.append((r, "file", st.mode, fs.read_bytes(p), None, None))

    visit(top, "")
    return out


def _rmtree(p: Path):
    import shutil
    shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------- API

def build(dockerfile, context_dir, store: Store, tag: str, *, backend: str = "auto", progress=None,
          build_args: dict[str, str] | None = None, run_mode: str = "auto",
          source_date_epoch: int | None = None) -> Image:
    """Build a Dockerfile (a path, or its text) with `context_dir` as context; the image is stored as `tag`.

    `progress(event, step)` is called with event "start" and "done" for every instruction; a "done" step
    carries the new layer's size (None for config-only instructions). `source_date_epoch` stands for the
    ``SOURCE_DATE_EPOCH`` environment variable (which it overrides): the instant recorded as ``created``.
    """
    text = _read_dockerfile(dockerfile)
    builder = Builder(store, context_dir, backend=backend, progress=progress, build_args=build_args,
                      run_mode=run_mode, source_date_epoch=source_date_epoch)
    return builder.build(text, tag)


def _read_dockerfile(dockerfile) -> str:
    if isinstance(dockerfile, Path) or (isinstance(dockerfile, str) and "\n" not in dockerfile
                                         and os.path.exists(dockerfile)):
        return Path(dockerfile).read_text()
    if isinstance(dockerfile, str) and "\n" in dockerfile:
        return dockerfile
    raise FileNotFoundError(2, "no such Dockerfile", str(dockerfile))


@dataclass(frozen=True)
class LayerRow:
    index: int
    created_by: str
    size: int
    wasted: int


@dataclass(frozen=True)
class BuildReport:
    """Per-layer sizes, total size and wasted bytes of an image, all measured from its layers."""

    name: str
    rows: tuple[LayerRow, ...]
    total_size: int
    wasted_bytes: int
    final_bytes: int
    efficiency: float

    def table(self) -> str:
        lines = [f"{self.name}", f"{'#':>3} {'size':>10} {'wasted':>10}  created by"]
        for r in self.rows:
            cb = r.created_by.replace("/bin/sh -c #(nop) ", "").replace("/bin/sh -c ", "RUN ")
            cb = cb if len(cb) <= 58 else cb[:55] + "..."
            lines.append(f"{r.index:>3} {human_size(r.size):>10} {human_size(r.wasted):>10}  {cb}")
        lines.append(f"total {human_size(self.total_size)}, wasted {human_size(self.wasted_bytes)}, "
                     f"efficiency {self.efficiency:.1%}")
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def report(image: Image) -> BuildReport:
    ins = inspect(image)
    rows = tuple(LayerRow(l.index, l.created_by, l.size, l.wasted_bytes) for l in ins.layers)
    return BuildReport(image.name, rows, image.size, ins.wasted_bytes, ins.final_bytes, ins.efficiency)


def compare(*images: Image) -> str:
    """Side-by-side summary: layers, total size and wasted bytes of each image."""
    reps = [report(im) for im in images]
    width = max(len(r.name) for r in reps)
    lines = [f"{'image':<{width}} {'layers':>6} {'total size':>11} {'wasted':>10} {'efficiency':>10}"]
    for r in reps:
        lines.append(f"{r.name:<{width}} {len(r.rows):>6} {human_size(r.total_size):>11} "
                     f"{human_size(r.wasted_bytes):>10} {r.efficiency:>10.1%}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line

class TextProgress:
    """Plain-text progress for terminals and notebooks alike: one line per step, dots for long steps."""

    def __init__(self, stream=None, verbose: bool = False):
        self.stream = stream or sys.stdout
        self.verbose = verbose

    def __call__(self, event, step: Step):
        if event == "start":
            print(step.describe(), file=self.stream, flush=True)
        elif event == "done":
            if self.verbose and step.output:
                for line in step.output.rstrip().splitlines():
                    print(f" | {line}", file=self.stream)
            size = "no layer (config only)" if step.layer_size is None else f"layer {human_size(step.layer_size)}"
            how = f" [{step.mode}]" if step.mode and step.mode != "config" else ""
            print(f" ---> {size}{how}", file=self.stream, flush=True)


def cli_build(argv: list[str]) -> int:
    """`python -m overlaykit build -f Dockerfile CONTEXT -t NAME [--store DIR] [--build-arg K=V] [--sim]`."""
    import argparse
    ap = argparse.ArgumentParser(prog="overlaykit build", description="Build a Dockerfile into overlaykit's store")
    ap.add_argument("context", help="build context directory")
    ap.add_argument("-f", "--file", help="Dockerfile (default: CONTEXT/Dockerfile)")
    ap.add_argument("-t", "--tag", required=True, help="name of the image")
    ap.add_argument("--store", default=None,
                    help="store directory (default: $OVERLAYKIT_STORE or ~/.cache/overlaykit/store)")
    ap.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    ap.add_argument("--backend", default="auto", choices=["auto", "sim", "kernel"])
    ap.add_argument("--sim", action="store_true", help="always run RUN in the simulated shell")
    ap.add_argument("-v", "--verbose", action="store_true", help="show each step's output")
    args = ap.parse_args(argv)
    dockerfile = args.file or os.path.join(args.context, "Dockerfile")
    from .images import default_store_root
    store = Store(args.store or default_store_root())
    build_args = dict(a.split("=", 1) if "=" in a else (a, os.environ.get(a, "")) for a in args.build_arg)
    try:
        image = build(dockerfile, args.context, store, args.tag, backend=args.backend,
                      progress=TextProgress(verbose=args.verbose), build_args=build_args,
                      run_mode="sim" if args.sim else "auto")
    except (BuildError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report(image).table())
    print(f"Successfully tagged {image.name}")
    return 0
