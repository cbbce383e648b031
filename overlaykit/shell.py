"""A small simulated POSIX shell, so RUN lines run where no container runtime can.

On Binder there is no Docker, no root and no network, but the lesson's RUN lines (``apt-get install``,
``wget``, ``tar -xzf``, ``make install``, ``rm -rf``) are what put bytes into layers.  This shell runs them
against any object with the engine's ``Overlay`` methods (``write_bytes``, ``read_bytes``, ``mkdir``,
``remove``, ``rmdir``, ``rename``, ``chmod``, ``symlink``, ``link``, ``listdir``, ``stat``, ``exists``), so
every file it makes or deletes goes through the overlay and lands in the container's upper directory
exactly as a real command's would.

What it understands (a useful subset of POSIX sh, tokenised with :mod:`shlex`):

* lists ``a && b``, ``a || b``, ``a; b``, newlines, pipelines ``a | b``; ``set -e`` and ``set -x``
  (``+ cmd`` traces, like dash), ``!``; exit status semantics of sh (127 for an unknown command);
* single and double quotes, backslash escapes, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``$?``,
  assignments, ``export``, ``unset``; unquoted expansions split into fields; globs (``*``, ``?``,
  ``[...]``) matched with :mod:`fnmatch` against the filesystem; redirections ``>``, ``>>``, ``<``,
  ``2>``, ``2>&1``, ``>/dev/null``;
* builtins ``cd pwd echo printf true false : exit set export unset test [``; programs ``mkdir rm
  rmdir touch cp mv ln chmod chown cat head ls id stat whoami tar wget curl make apt-get apt-mark groupadd
  useradd nproc`` (``id`` and ``whoami`` answer for the RUN user of :class:`overlaykit.runfs.RunFS`).

Programs, unlike builtins, must exist on ``PATH`` in the filesystem (``/usr/bin/wget`` only exists
after ``apt-get install wget``), just as in a real image.  Downloads, packages and the redis build come
from :mod:`overlaykit.catalogue`.  Compound commands (``if``, ``for``, ``while``, functions) and command
substitution are not supported: they fail with a message saying so.
"""

from __future__ import annotations

import errno
import fnmatch
import gzip
import io
import os
import posixpath
import re
import shlex
import tarfile
from dataclasses import dataclass, field

from . import catalogue

# Characters the pre-scan hides from shlex and from expansion when they were quoted or escaped.
_LITERAL = {"$": "\ue000", "*": "\ue001", "?": "\ue002", "[": "\ue003", ";": "\ue004", "&": "\ue005",
            "|": "\ue006", "<": "\ue007", ">": "\ue008", "#": "\ue009", "!": "\ue00a"}
_UNLITERAL = {v: k for k, v in _LITERAL.items()}
_DQ_DOLLAR = "\ue010"  # a `$` inside double quotes: expanded, but not split into fields
_OP = "\ue020"  # prefix of an operator token: _OP + one of && || ; | !
_REDIR = "\ue021"  # prefix of a redirection token: _REDIR + fd + (">" | ">>" | "<") + optional "&N"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PARAM = re.compile(r"[$\ue010](?:\{(" + _NAME + r")(?::?-([^}]*))?\}|(" + _NAME + r")|([?$#0-9]))")
_ASSIGN = re.compile(r"^(" + _NAME + r")=(.*)$", re.S)
_GLOB = re.compile(r"[*?[]")

BUILTINS = {"cd", "pwd", "echo", "printf", "true", "false", ":", "exit", "set", "export", "unset", "test", "["}
UNSUPPORTED_WORDS = {"if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac",
                     "function", "{", "}", "(", ")"}


class ShellSyntaxError(Exception):
    """The script uses shell syntax the simulation does not implement (reported with its line)."""


class _Exit(Exception):
    def __init__(self, status):
        self.status = status


@dataclass
class ShellResult:
    status: int
    output: str  # stdout and stderr interleaved, as `docker build` shows them

    @property
    def ok(self) -> bool:
        return self.status == 0


@dataclass
class _Command:
    argv: list[str]
    assigns: list[tuple[str, str]] = field(default_factory=list)
    redirs: list[tuple[int, str, str]] = field(default_factory=list)  # (fd, op, target word or "&N")


def _prescan(script: str) -> str:
    """Mark quoted/escaped specials, operators and redirections so shlex can split the rest safely."""
    out, i, n, line, quote = [], 0, len(script), 1, None
    at_word_start = True
    while i < n:
        c = script[i]
        if quote == "'":
            if c == "'":
                quote = None
            out.append(_LITERAL.get(c, c))
            line += c == "\n"
            i += 1
            continue
        if quote == '"':
            if c == "\\" and i + 1 < n and script[i + 1] in '$`"\\\n':
                nxt = script[i + 1]
                out.append(_LITERAL["$"] if nxt == "$" else ("" if nxt == "\n" else "\\" + nxt))
                i += 2
                continue
            if c == '"':
                quote = None
            elif c == "$":
                if script.startswith("$(", i):
                    raise ShellSyntaxError(f"line {line}: command substitution $(...) is not supported")
                out.append(_DQ_DOLLAR)
                i += 1
                continue
            elif c == "`":
                raise ShellSyntaxError(f"line {line}: command substitution `...` is not supported")
            out.append(_LITERAL.get(c, c) if c != '"' else c)
            line += c == "\n"
            i += 1
            continue
        # unquoted
        if c == "\\":
            if i + 1 < n and script[i + 1] == "\n":
                i += 2
                line += 1
                continue
            nxt = script[i + 1] if i + 1 < n else ""
            out.append(_LITERAL[nxt] if nxt in _LITERAL else "\\" + nxt)
            i += 2
            at_word_start = False
            continue
        if c in "'\"":
            quote = c
            out.append(c)
            i += 1
            at_word_start = False
            continue
        if c == "#" and at_word_start:
            while i < n and script[i] != "\n":
                i += 1
            continue
        if c == "`" or script.startswith("$(", i):
            raise ShellSyntaxError(f"line {line}: command substitution is not supported")
        m = re.match(r"(\d?)(>>|>|<)(&\d)?", script[i:]) if (at_word_start or c in "<>") else None
        if m and (m.group(1) == "" or at_word_start):
            fd = m.group(1) or ("0" if m.group(2) == "<" else "1")
            out.append(f" {_REDIR}{fd}{'g' if m.group(2) == '>' else 'a' if m.group(2) == '>>' else 'r'}"
                       f"{m.group(3)[1:] if m.group(3) else ''} ")
            i += len(m.group(0))
            at_word_start = True
            continue
        for op in ("&&", "||", ";", "|", "\n", "&"):
            if script.startswith(op, i):
                if op == "&":
                    raise ShellSyntaxError(f"line {line}: background jobs (&) are not supported")
                line += op == "\n"
                tok = f"N{line}" if op == "\n" else op
                out.append(f" {_OP}{tok} ")
                i += len(op)
                at_word_start = True
                break
        else:
            if c == "!" and at_word_start and (i + 1 == n or script[i + 1] in " \t"):
                out.append(f" {_OP}! ")
            else:
                out.append(c)
            at_word_start = c in " \t"
            i += 1
    if quote:
        raise ShellSyntaxError(f"line {line}: unterminated {quote} quote")
    return "".join(out)


def parse(script: str) -> list[tuple[int, list]]:
    """Parse into [(line, and_or)] where and_or = [(op, negated, [pipeline commands])]; op in "", "&&", "||"."""
    text = _prescan(script)
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    lexer.escape = ""  # escapes were resolved by the pre-scan
    tokens = list(lexer)
    program, and_or, pipeline, cmd = [], [], [], _Command([])
    line, op, negated = 1, "", False

    def end_command():
        nonlocal cmd
        if cmd.argv or cmd.assigns or cmd.redirs:
            pipeline.append(cmd)
        elif pipeline:
            raise ShellSyntaxError(f"line {line}: syntax error: missing command after |")
        cmd = _Command([])

    def end_and_or():
        nonlocal and_or, op, negated
        if pipeline:
            and_or.append((op, negated, list(pipeline)))
            pipeline.clear()
        elif op:
            raise ShellSyntaxError(f"line {line}: syntax error: missing command after {op}")
        if and_or:
            program.append((line, and_or))
        and_or, op, negated = [], "", False

    it = iter(tokens)
    for tok in it:
        if tok.startswith(_OP):
            o = tok[1:]
            end_command()
            if o == "!":
                negated = True
            elif o == "|":
                if not pipeline:
                    raise ShellSyntaxError(f"line {line}: syntax error near unexpected token '|'")
            elif o in ("&&", "||"):
                if not pipeline:
                    raise ShellSyntaxError(f"line {line}: syntax error near unexpected token '{o}'")
                and_or.append((op, negated, list(pipeline)))
                pipeline.clear()
                op, negated = o, False
            else:
                end_and_or()
                if o.startswith("N"):
                    line = int(o[1:])
            continue
        if tok.startswith(_REDIR):
            spec = tok[1:]
            fd, kind, dup = int(spec[0]), {"g": ">", "a": ">>", "r": "<"}[spec[1]], spec[2:]
            if dup:
                cmd.redirs.append((fd, kind, "&" + dup))
            else:
                target = next(it, None)
                if target is None or target.startswith((_OP, _REDIR)):
                    raise ShellSyntaxError(f"line {line}: syntax error: redirection without a file name")
                cmd.redirs.append((fd, kind, target))
            continue
        if not cmd.argv and _ASSIGN.match(tok):
            name, value = _ASSIGN.match(tok).groups()
            cmd.assigns.append((name, value))
            continue
        if not cmd.argv and tok in UNSUPPORTED_WORDS:
            raise ShellSyntaxError(f"line {line}: '{tok}' (compound commands) is not supported by the simulated shell")
        cmd.argv.append(tok)
    end_command()
    end_and_or()
    return program


class Shell:
    """Runs scripts against `fs`; keeps variables, cwd and options between `run` calls like one sh process."""

    def __init__(self, fs, *, env: dict[str, str] | None = None, cwd: str = "/", user: str = "root",
                 require_programs: bool = True):
        self.fs = fs
        self.vars: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        self.vars.update(env or {})
        self.exported = set(self.vars)
        self.cwd = cwd
        self.user = user
        self.require_programs = require_programs
        self.errexit = False
        self.xtrace = False
        self.status = 0
        self._out: list[str] = []

    # ------------------------------------------------------------------ running
    def run(self, script: str) -> ShellResult:
        """Run a script as `sh -c script` would; syntax the simulation lacks gives status 2 and a message."""
        self._out = []
        try:
            program = parse(script)
        except ShellSyntaxError as e:
            self._err(f"sh: {e}")
            return ShellResult(2, self._text())
        try:
            for line, and_or in program:
                self._line = line
                self._run_and_or(and_or)
        except _Exit as e:
            self.status = e.status
        return ShellResult(self.status, self._text())

    def run_argv(self, argv: list[str]) -> ShellResult:
        """Exec form (`RUN ["prog", "arg"]`): no shell processing at all (`["sh", "-c", script]` runs the
        script in this shell, as the real sh would)."""
        if (len(argv) >= 3 and posixpath.basename(argv[0]) in ("sh", "bash", "ash", "dash") and argv[1] == "-c"
                and self._on_path(argv[0])):
            return self.run(argv[2])
        self._out, self._line = [], 1
        try:
            self.status, out = self._exec(list(argv), b"", {})
            self._write_out(out)
        except _Exit as e:
            self.status = e.status
        return ShellResult(self.status, self._text())

    def _text(self) -> str:
        return "".join(self._out)

    def _err(self, msg: str):
        self._out.append(msg.rstrip("\n") + "\n")

    def _write_out(self, data: bytes):
        if data:
            self._out.append(data.decode("utf-8", "replace"))

    def _run_and_or(self, and_or):
        ran_last = False
        for index, (op, negated, pipeline) in enumerate(and_or):
            if op == "&&" and self.status != 0 or op == "||" and self.status == 0:
                ran_last = False
                continue
            status = self._run_pipeline(pipeline)
            self.status = (0 if status else 1) if negated else status
            ran_last = not negated
        # sh -e ignores failures on the left of && and ||, and of negated pipelines
        if self.errexit and self.status != 0 and ran_last:
            raise _Exit(self.status)

    def _run_pipeline(self, pipeline) -> int:
        data, status = b"", 0
        for index, cmd in enumerate(pipeline):
            last = index == len(pipeline) - 1
            status, data = self._run_command(cmd, data, capture=not last)
        return status

    def _run_command(self, cmd: _Command, stdin: bytes, capture: bool) -> tuple[int, bytes]:
        try:
            assigns = [(name, self._expand_word(value, split=False)[0]) for name, value in cmd.assigns]
            argv = [w for word in cmd.argv for w in self._expand_word(word)]
        except OSError as e:
            self._err(f"sh: {self._line}: {e.strerror}")
            return 1, b""
        if self.xtrace:
            shown = [f"{n}={v}" for n, v in assigns] + [_quote(a) for a in argv]
            if shown:
                self._err("+ " + " ".join(shown))
        if not argv:
            for name, value in assigns:
                self.vars[name] = value
            return 0, b""
        env = dict(assigns)
        # redirections
        out_target = err_target = None
        err_to_out = False
        for fd, kind, target in cmd.redirs:
            if target.startswith("&"):
                if fd == 2 and target == "&1":
                    err_to_out = True
                continue
            path = self._expand_word(target, split=False)[0]
            if kind == "<":
                try:
                    stdin = self.fs.read_bytes(self.path(path))
                except OSError as e:
                    self._err(f"sh: {self._line}: cannot open {path}: {_nofile(e)}")
                    return 1, b""
            elif fd == 1:
                out_target = (path, kind)
            elif fd == 2:
                err_target = (path, kind)
        mark = len(self._out)
        status, out = self._exec(argv, stdin, env)
        if err_target:
            err_text = "".join(self._out[mark:]).encode()
            del self._out[mark:]
            if not self._redirect(err_target, err_text):
                return 1, b""
        if err_to_out and (out_target or capture):
            out = "".join(self._out[mark:]).encode() + out
            del self._out[mark:]
        if out_target:
            if not self._redirect(out_target, out):
                return 1, b""
            out = b""
        if capture:
            return status, out
        self._write_out(out)
        return status, b""

    def _redirect(self, target, data: bytes) -> bool:
        path, kind = target
        if path == "/dev/null":
            return True
        try:
            self.fs.write_bytes(self.path(path), data, append=kind == ">>")
            return True
        except OSError as e:
            self._err(f"sh: {self._line}: cannot create {path}: {_nofile(e)}")
            return False

    def _exec(self, argv, stdin: bytes, env) -> tuple[int, bytes]:
        name = argv[0]
        if name in BUILTINS:
            return getattr(self, "_b_" + {":": "true", "[": "test"}.get(name, name))(argv, stdin)
        program = posixpath.basename(name)
        impl = getattr(self, "_p_" + program.replace("-", "_"), None)
        if self.require_programs and not self._on_path(name):
            impl = None
        elif impl is None:
            self._err(f"sh: {self._line}: {name}: found in the image, but the simulated shell cannot run it")
            return 127, b""
        if impl is None:
            self._err(f"sh: {self._line}: {name}: not found")
            return 127, b""
        self._env = env
        try:
            return impl(argv, stdin)
        except OSError as e:
            self._err(f"{program}: {e.filename or ''}: {e.strerror}")
            return 1, b""

    def _on_path(self, name: str) -> bool:
        candidates = [name] if "/" in name else [
            posixpath.join(d, name) for d in self.vars.get("PATH", "").split(":") if d]
        for c in candidates:
            try:
                st = self.fs.stat(self.path(c))
            except OSError:
                continue
            if st.kind == "file" and st.mode & 0o111:
                return True
        return False

    # ------------------------------------------------------------------ expansion
    def path(self, p: str) -> str:
        return posixpath.normpath(posixpath.join(self.cwd, p)) if p else self.cwd

    def _param(self, m) -> str:
        name = m.group(1) or m.group(3) or m.group(4)
        if name == "?":
            return str(self.status)
        if name in ("$", "#") or name.isdigit():
            return {"$": "1", "#": "0"}.get(name, "sh" if name == "0" else "")
        value = self.vars.get(name, "")
        if m.group(2) is not None and value == "":
            value = self._expand_word(m.group(2), split=False)[0]
        return value

    def _expand_word(self, word: str, split: bool = True) -> list[str]:
        """Parameter expansion, field splitting of unquoted results, globbing, then literal restoration."""
        fields: list[str] = [""]
        pos, keep_empty = 0, False
        for m in _PARAM.finditer(word):
            fields[-1] += word[pos:m.start()]
            keep_empty = keep_empty or m.start() > pos
            value = self._param(m)
            if split and m.group(0)[0] == "$":  # unquoted: split into fields on whitespace
                if value[:1].isspace():
                    fields.append("")
                parts = value.split()
                for i, part in enumerate(parts):
                    if i:
                        fields.append("")
                    fields[-1] += part
                if value[-1:].isspace():
                    fields.append("")
            else:
                fields[-1] += value
                keep_empty = True
            pos = m.end()
        fields[-1] += word[pos:]
        keep_empty = keep_empty or pos < len(word) or word == ""  # quoted '' or literal text
        fields = [f for f in fields if f] or ([""] if keep_empty else [])
        out = []
        for f in fields:
            f = f.replace(_DQ_DOLLAR, "$")
            if split and _GLOB.search(f):
                out.extend(self._glob(f))
            else:
                out.append(f)
        return [_restore(f) for f in out]

    def _glob(self, pattern: str) -> list[str]:
        absolute = pattern.startswith("/")
        parts = [p for p in pattern.split("/") if p]
        matches = ["/" if absolute else ""]
        for part in parts:
            nxt = []
            for base in matches:
                if not _GLOB.search(part):
                    nxt.append(posixpath.join(base, _restore(part)) if base else _restore(part))
                    continue
                directory = self.path(base or ".")
                try:
                    names = self.fs.listdir(directory)
                except OSError:
                    continue
                pat = _restore(part)
                for name in names:
                    if name.startswith(".") and not pat.startswith("."):
                        continue
                    if fnmatch.fnmatchcase(name, pat):
                        nxt.append(posixpath.join(base, name) if base else name)
            matches = nxt
        found = sorted(m for m in matches if self._lexists(self.path(m)))
        return found or [pattern]

    # ------------------------------------------------------------------ fs helpers
    def _lexists(self, p: str) -> bool:
        try:
            self.fs.stat(p, follow_symlinks=False)
            return True
        except OSError:
            return False

    def _lstat(self, p: str):
        return self.fs.stat(p, follow_symlinks=False)

    def _isdir(self, p: str) -> bool:
        try:
            return self.fs.stat(p).kind == "dir"
        except OSError:
            return False

    def _rmtree(self, p: str):
        if self._lstat(p).kind == "dir":
            for name in self.fs.listdir(p):
                self._rmtree(posixpath.join(p, name))
            self.fs.rmdir(p)
        else:
            self.fs.remove(p)

    def _makedirs(self, p: str, mode: int = 0o755):
        if not self._isdir(p):
            self.fs.mkdir(p, mode=mode, parents=True)

    def _copy(self, src: str, dst: str, recursive: bool):
        st = self._lstat(src)
        if st.kind == "symlink":
            if self._lexists(dst):
                self.fs.remove(dst)
            self.fs.symlink(st.target, dst)
        elif st.kind == "dir":
            if not recursive:
                raise OSError(errno.EISDIR, "-r not specified; omitting directory", src)
            if not self._isdir(dst):
                self.fs.mkdir(dst, mode=st.mode)
            for name in self.fs.listdir(src):
                self._copy(posixpath.join(src, name), posixpath.join(dst, name), True)
        else:
            self.fs.write_bytes(dst, self.fs.read_bytes(src))
            self.fs.chmod(dst, st.mode)

    def _install(self, entries) -> int:
        return catalogue.install_entries(self.fs, entries)

    # ------------------------------------------------------------------ builtins
    def _b_true(self, argv, stdin):
        return 0, b""

    def _b_false(self, argv, stdin):
        return 1, b""

    def _b_exit(self, argv, stdin):
        raise _Exit(int(argv[1]) if len(argv) > 1 else self.status)

    def _b_pwd(self, argv, stdin):
        return 0, (self.cwd + "\n").encode()

    def _b_cd(self, argv, stdin):
        target = self.path(argv[1] if len(argv) > 1 else self.vars.get("HOME", "/root"))
        if not self._isdir(target):
            self._err(f"sh: {self._line}: cd: can't cd to {argv[1] if len(argv) > 1 else target}")
            return 2, b""
        self.cwd = target
        return 0, b""

    def _b_set(self, argv, stdin):
        for arg in argv[1:]:
            if arg[:1] not in "-+" or len(arg) < 2:
                continue
            on = arg[0] == "-"
            for flag in arg[1:]:
                if flag == "e":
                    self.errexit = on
                elif flag == "x":
                    self.xtrace = on
                elif flag in "uo":
                    continue  # -u / -o pipefail: accepted, not enforced
        return 0, b""

    def _b_export(self, argv, stdin):
        for arg in argv[1:]:
            name, eq, value = arg.partition("=")
            if eq:
                self.vars[name] = value
            self.exported.add(name)
        return 0, b""

    def _b_unset(self, argv, stdin):
        for name in argv[1:]:
            self.vars.pop(name, None)
        return 0, b""

    def _b_echo(self, argv, stdin):
        args, newline = argv[1:], True
        if args and args[0] == "-n":
            args, newline = args[1:], False
        return 0, (" ".join(args) + ("\n" if newline else "")).encode()

    def _b_printf(self, argv, stdin):
        if len(argv) < 2:
            self._err("printf: usage: printf format [arguments]")
            return 2, b""
        fmt, args = argv[1], argv[2:]
        out, first = [], True
        while first or args:
            first = False
            text, args = _printf_once(fmt, args)
            out.append(text)
            if "%" not in fmt:
                break
        return 0, "".join(out).encode()

    def _b_test(self, argv, stdin):
        args = argv[1:]
        if argv[0] == "[":
            if not args or args[-1] != "]":
                self._err(f"sh: {self._line}: [: missing ]")
                return 2, b""
            args = args[:-1]
        negate = bool(args) and args[0] == "!"
        if negate:
            args = args[1:]
        if not args:
            result = False
        elif len(args) == 1:
            result = args[0] != ""
        elif len(args) == 2:
            op, x = args
            p = self.path(x)
            result = {"-z": lambda: x == "", "-n": lambda: x != "", "-e": lambda: self._lexists(p),
                      "-f": lambda: self._lexists(p) and self.fs.stat(p).kind == "file",
                      "-d": lambda: self._isdir(p), "-L": lambda: self._lexists(p) and self._lstat(p).kind == "symlink",
                      "-x": lambda: self._lexists(p) and bool(self.fs.stat(p).mode & 0o111),
                      "-s": lambda: self._lexists(p) and self.fs.stat(p).size > 0}.get(op, lambda: None)()
            if result is None:
                self._err(f"sh: {self._line}: test: {op}: unexpected operator")
                return 2, b""
        elif len(args) == 3:
            a, op, b = args
            ops = {"=": a == b, "!=": a != b}
            if op in ("-eq", "-ne", "-lt", "-gt", "-le", "-ge"):
                try:
                    ia, ib = int(a), int(b)
                except ValueError:
                    self._err(f"sh: {self._line}: test: Illegal number")
                    return 2, b""
                ops = {"-eq": ia == ib, "-ne": ia != ib, "-lt": ia < ib, "-gt": ia > ib, "-le": ia <= ib,
                       "-ge": ia >= ib}
            if op not in ops:
                self._err(f"sh: {self._line}: test: {op}: unexpected operator")
                return 2, b""
            result = ops[op]
        else:
            self._err(f"sh: {self._line}: test: too many arguments")
            return 2, b""
        return (1 if result else 0) if negate else (0 if result else 1), b""

    # ------------------------------------------------------------------ programs (must be on PATH)
    def _p_nproc(self, argv, stdin):
        return 0, b"2\n"

    def _p_head(self, argv, stdin):
        args = argv[1:]
        if args and re.fullmatch(r"-\d+", args[0]):
            args = ["-n", args[0][1:]] + args[1:]
        opts, files = _opts(args, with_value="cn")
        try:
            count = int(opts.get("c") or opts.get("n") or 10)
        except ValueError:
            self._err(f"head: invalid number '{opts.get('c') or opts.get('n')}'")
            return 1, b""
        out, status = [], 0
        for f in files or ["-"]:
            try:
                data = stdin if f == "-" else self.fs.read_bytes(self.path(f))
            except OSError as e:
                self._err(f"head: {f}: {_nofile(e)}")
                status = 1
                continue
            if "c" in opts:
                out.append(data[:count])
            else:
                out.append(b"".join(data.splitlines(keepends=True)[:count]))
        return status, b"".join(out)

    def _p_stat(self, argv, stdin):
        opts, files = _opts(argv[1:], with_value="c")
        fmt = opts.get("c")
        if fmt is None:
            self._err("stat: the simulated stat prints only with -c FORMAT (%a %u %g %n %s %F)")
            return 1, b""
        kinds = {"file": "regular file", "dir": "directory", "symlink": "symbolic link",
                 "char": "character special file"}
        out, status = [], 0
        for f in files:
            try:
                st = self.fs.stat(self.path(f), follow_symlinks="L" in opts)
            except OSError as e:
                self._err(f"stat: can't stat '{f}': {_nofile(e)}")
                status = 1
                continue
            fields = {"a": f"{st.mode & 0o7777:o}", "u": str(st.uid), "g": str(st.gid), "n": f, "s": str(st.size),
                      "F": kinds.get(st.kind, st.kind), "%": "%"}
            out.append(re.sub(r"%(.)", lambda m: fields.get(m.group(1), m.group(0)), fmt) + "\n")
        return status, "".join(out).encode()

    def _ids(self):
        """(uid, gid, groups) the RUN runs as (RunFS knows; a plain overlay is root)."""
        uid, gid = getattr(self.fs, "uid", 0), getattr(self.fs, "gid", 0)
        return uid, gid, sorted(getattr(self.fs, "groups", {gid}) or {gid})

    def _name_of(self, path, number) -> str | None:
        try:
            for line in self.fs.read_bytes(path).decode("utf-8", "replace").splitlines():
                f = line.split(":")
                if len(f) > 2 and f[2] == str(number):
                    return f[0]
        except OSError:
            pass
        return None

    def _p_id(self, argv, stdin):
        opts, _ = _opts(argv[1:], with_value="")
        uid, gid, groups = self._ids()
        user, group = self._name_of("/etc/passwd", uid), self._name_of("/etc/group", gid)
        if "u" in opts or "g" in opts:
            number, name = (uid, user) if "u" in opts else (gid, group)
            if "n" in opts:
                if name is None:
                    self._err(f"id: cannot find name for {'user' if 'u' in opts else 'group'} ID {number}")
                    return 1, f"{number}\n".encode()
                return 0, f"{name}\n".encode()
            return 0, f"{number}\n".encode()
        if "G" in opts:
            return 0, (" ".join(str(g) for g in groups) + "\n").encode()

        def named(number, name):
            return f"{number}({name})" if name else str(number)

        gs = ",".join(named(g, self._name_of("/etc/group", g)) for g in groups)
        return 0, f"uid={named(uid, user)} gid={named(gid, group)} groups={gs}\n".encode()

    def _p_whoami(self, argv, stdin):
        uid = self._ids()[0]
        name = self._name_of("/etc/passwd", uid)
        if name is None:
            self._err(f"whoami: unknown uid {uid}")
            return 1, b""
        return 0, f"{name}\n".encode()

    def _p_mkdir(self, argv, stdin):
        opts, args = _opts(argv[1:])
        mode = 0o755
        if "m" in opts:
            mode = int(opts["m"], 8)
        status = 0
        for a in args:
            p = self.path(a)
            try:
                if "p" in opts:
                    self._makedirs(p, mode)
                else:
                    self.fs.mkdir(p, mode=mode)
            except OSError as e:
                self._err(f"mkdir: cannot create directory '{a}': {_nofile(e)}")
                status = 1
        return status, b""

    def _p_rm(self, argv, stdin):
        opts, args = _opts(argv[1:])
        recursive, force = "r" in opts or "R" in opts, "f" in opts
        status = 0
        for a in args:
            p = self.path(a)
            if not self._lexists(p):
                if not force:
                    self._err(f"rm: cannot remove '{a}': No such file or directory")
                    status = 1
                continue
            if self._lstat(p).kind == "dir" and not recursive:
                self._err(f"rm: cannot remove '{a}': Is a directory")
                status = 1
                continue
            try:
                self._rmtree(p)
            except OSError as e:
                self._err(f"rm: cannot remove '{a}': {_nofile(e)}")
                status = 1
        return status, b""

    def _p_rmdir(self, argv, stdin):
        status = 0
        for a in _opts(argv[1:])[1]:
            try:
                self.fs.rmdir(self.path(a))
            except OSError as e:
                self._err(f"rmdir: failed to remove '{a}': {_nofile(e)}")
                status = 1
        return status, b""

    def _p_touch(self, argv, stdin):
        status = 0
        for a in _opts(argv[1:])[1]:
            p = self.path(a)
            try:
                if self._lexists(p):
                    self.fs.utime(p) if hasattr(self.fs, "utime") else None
                else:
                    self.fs.write_bytes(p, b"")
            except OSError as e:
                self._err(f"touch: cannot touch '{a}': {_nofile(e)}")
                status = 1
        return status, b""

    def _p_cat(self, argv, stdin):
        out, status = [], 0
        args = _opts(argv[1:])[1]
        if not args:
            return 0, stdin
        for a in args:
            if a == "-":
                out.append(stdin)
                continue
            try:
                out.append(self.fs.read_bytes(self.path(a)))
            except OSError as e:
                self._err(f"cat: {a}: {_nofile(e)}")
                status = 1
        return status, b"".join(out)

    def _p_ls(self, argv, stdin):
        opts, args = _opts(argv[1:])
        out = []
        for a in args or ["."]:
            p = self.path(a)
            if not self._lexists(p):
                self._err(f"ls: cannot access '{a}': No such file or directory")
                return 2, b"".join(out)
            names = self.fs.listdir(p) if self._isdir(p) else [a]
            if "a" not in opts:
                names = [n for n in names if not n.startswith(".")]
            out.append(("\n".join(names) + "\n" if names else "").encode())
        return 0, b"".join(out)

    def _p_cp(self, argv, stdin):
        opts, args = _opts(argv[1:])
        recursive = bool({"r", "R", "a"} & set(opts))
        if len(args) < 2:
            self._err("cp: missing destination file operand")
            return 1, b""
        *sources, dest = args
        dest_p = self.path(dest)
        into = self._isdir(dest_p)
        if len(sources) > 1 and not into:
            self._err(f"cp: target '{dest}' is not a directory")
            return 1, b""
        status = 0
        for s in sources:
            src = self.path(s)
            target = posixpath.join(dest_p, posixpath.basename(src)) if into else dest_p
            try:
                self._copy(src, target, recursive)
            except OSError as e:
                if e.errno == errno.EISDIR and not recursive:
                    self._err(f"cp: -r not specified; omitting directory '{s}'")
                else:
                    self._err(f"cp: cannot stat '{s}': {_nofile(e)}")
                status = 1
        return status, b""

    def _p_mv(self, argv, stdin):
        opts, args = _opts(argv[1:])
        if len(args) < 2:
            self._err("mv: missing destination file operand")
            return 1, b""
        *sources, dest = args
        dest_p = self.path(dest)
        into = self._isdir(dest_p)
        status = 0
        for s in sources:
            src = self.path(s)
            target = posixpath.join(dest_p, posixpath.basename(src)) if into else dest_p
            try:
                try:
                    self.fs.rename(src, target)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    self._copy(src, target, True)  # like mv(1): copy, then delete, across "devices"
                    self._rmtree(src)
            except OSError as e:
                self._err(f"mv: cannot move '{s}' to '{dest}': {_nofile(e)}")
                status = 1
        return status, b""

    def _p_ln(self, argv, stdin):
        opts, args = _opts(argv[1:])
        if len(args) != 2:
            self._err("ln: expected TARGET LINK_NAME")
            return 1, b""
        target, link = args
        p = self.path(link)
        if self._isdir(p) and not ("n" in opts and self._lstat(p).kind == "symlink"):
            p = posixpath.join(p, posixpath.basename(target))
        try:
            if self._lexists(p) and "f" in opts:
                self.fs.remove(p)
            if "s" in opts:
                self.fs.symlink(target, p)
            else:
                self.fs.link(self.path(target), p)
        except OSError as e:
            self._err(f"ln: failed to create link '{link}': {_nofile(e)}")
            return 1, b""
        return 0, b""

    def _p_chmod(self, argv, stdin):
        opts, args = _opts(argv[1:], with_value="")
        if len(args) < 2:
            self._err("chmod: missing operand")
            return 1, b""
        mode_s, files = args[0], args[1:]
        recursive = "R" in opts or "recursive" in opts
        status = 0

        def change(p: str, shown: str, kind: str, mode: int) -> None:
            self.fs.chmod(p, _chmod_mode(mode_s, mode, kind == "dir"))

        for f in files:
            p = self.path(f)
            try:
                s = self.fs.stat(p)  # an operand that is a symlink: its target (chmod cannot change links)
                change(p, f, s.kind, s.mode)
                if recursive and s.kind == "dir":
                    status |= self._walk_below("chmod", p, f, change, skip_symlinks=True)
            except ValueError:
                self._err(f"chmod: invalid mode: '{mode_s}'")
                return 1, b""
            except OSError as e:
                self._err(f"chmod: cannot access '{f}': {_nofile(e)}")
                status = 1
        return status, b""

    def _walk_below(self, cmd: str, p: str, shown: str, change, *, skip_symlinks: bool) -> int:
        """Apply ``change(path, shown, kind, mode)`` to everything below directory ``p``, parents first,
        never following a symlink (coreutils' -R with -P, the default): a symlink met on the way is
        skipped (chmod) or changed itself (chown). Returns 1 if some entry failed, as coreutils does."""
        status = 0
        try:
            names = sorted(self.fs.listdir(p))
        except OSError as e:
            self._err(f"{cmd}: cannot read directory '{shown}': {_nofile(e)}")
            return 1
        for name in names:
            child, child_shown = posixpath.join(p, name), posixpath.join(shown, name)
            try:
                s = self._lstat(child)
                if s.kind == "symlink" and skip_symlinks:
                    continue
                change(child, child_shown, s.kind, s.mode)
            except OSError as e:
                self._err(f"{cmd}: changing {'permissions' if cmd == 'chmod' else 'ownership'} of "
                          f"'{child_shown}': {_nofile(e)}")
                status = 1
                continue
            if s.kind == "dir":
                status |= self._walk_below(cmd, child, child_shown, change, skip_symlinks=skip_symlinks)
        return status

    def _p_chown(self, argv, stdin):
        opts, args = _opts(argv[1:])
        if len(args) < 2:
            self._err("chown: missing operand")
            return 1, b""
        owner, files = args[0], args[1:]
        user, colon, group = owner.partition(":")
        uid = self._lookup_id("/etc/passwd", user) if user else -1
        if user and uid == -1:
            self._err(f"chown: invalid user: '{owner}'")
            return 1, b""
        gid = self._lookup_id("/etc/group", group) if group else -1
        if group and gid == -1:
            self._err(f"chown: invalid group: '{owner}'")
            return 1, b""
        if colon and user and not group:  # `chown user:` sets the user's login group
            gid = self._login_gid(user)
        if not hasattr(self.fs, "chown"):
            return 0, b""
        recursive = "R" in opts or "recursive" in opts
        # coreutils: a symlink operand is followed unless -h; with -R (and -P, the default) never
        no_deref = "h" in opts or "no-dereference" in opts or recursive

        def change(p: str, shown: str, kind: str, mode: int) -> None:
            if kind == "symlink":
                self._lchown(p, uid, gid)
            else:
                self.fs.chown(p, uid, gid)

        status = 0
        for f in files:
            p = self.path(f)
            try:
                s = self._lstat(p) if no_deref else self.fs.stat(p)
            except OSError as e:
                self._err(f"chown: cannot access '{f}': {_nofile(e)}")
                status = 1
                continue
            try:
                change(p, f, s.kind, s.mode)
            except OSError as e:
                self._err(f"chown: changing ownership of '{f}': {_nofile(e)}")
                status = 1
                continue
            if recursive and s.kind == "dir":
                status |= self._walk_below("chown", p, f, change, skip_symlinks=False)
        return status, b""

    def _lchown(self, p: str, uid: int, gid: int) -> None:
        """chown a symlink itself, where the filesystem can: the overlay's ``lchown``, or in a build the
        RunFS callback that changes the link in upper/ after unmount (root only: it checks no permission)."""
        lchown = getattr(self.fs, "lchown", None)
        if callable(lchown) and getattr(self.fs, "uid", 0) == 0:
            lchown(p, uid, gid)

    def _login_gid(self, user: str) -> int:
        try:
            for line in self.fs.read_bytes("/etc/passwd").decode().splitlines():
                fields = line.split(":")
                if fields[0] == user or (user.isdigit() and len(fields) > 3 and fields[2] == user):
                    return int(fields[3])
        except (OSError, ValueError, IndexError):
            pass
        return -1

    def _lookup_id(self, path, name) -> int:
        if name.isdigit():
            return int(name)
        try:
            for line in self.fs.read_bytes(path).decode().splitlines():
                fields = line.split(":")
                if fields[0] == name:
                    return int(fields[2])
        except OSError:
            pass
        return -1

    def _p_tar(self, argv, stdin):
        # tar accepts bundled first arguments without a dash: `tar xzf a.tgz`
        args = list(argv[1:])
        if args and not args[0].startswith("-"):
            args[0] = "-" + args[0]
        directory, strip, archive, extract, files = self.cwd, 0, None, False, []
        i = 0
        while i < len(args):
            a = args[i]
            if a.startswith("--strip-components="):
                strip = int(a.split("=", 1)[1])
            elif a == "-C" or a == "--directory":
                i += 1
                directory = self.path(args[i])
            elif a.startswith("--directory="):
                directory = self.path(a.split("=", 1)[1])
            elif a.startswith("--"):
                pass
            elif a.startswith("-"):
                flags = a[1:]
                for j, fl in enumerate(flags):
                    if fl == "x":
                        extract = True
                    elif fl == "f":
                        rest = flags[j + 1:]
                        if rest:
                            archive = rest
                        else:
                            i += 1
                            archive = args[i]
                        break
                    elif fl == "C":
                        i += 1
                        directory = self.path(args[i])
            else:
                files.append(a)
            i += 1
        if not extract or archive is None:
            self._err("tar: only extraction (tar -xf ARCHIVE) is simulated")
            return 2, b""
        try:
            data = stdin if archive == "-" else self.fs.read_bytes(self.path(archive))
        except OSError as e:
            self._err(f"tar: {archive}: Cannot open: {_nofile(e)}")
            return 2, b""
        if not self._isdir(directory):
            self._err(f"tar: {directory}: Cannot open: No such file or directory")
            return 2, b""
        name = catalogue.sim_tarball_name(data)
        if name is not None:
            entries = catalogue.SOURCE_TREES[name]()
            self._install([_strip(e, strip, directory) for e in entries if _strip(e, strip, directory)])
            return 0, b""
        try:
            tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except (tarfile.TarError, gzip.BadGzipFile, EOFError) as e:
            self._err(f"tar: {archive}: not a tar archive ({e})")
            return 2, b""
        with tf:
            for m in tf.getmembers():
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if ".." in parts:
                    self._err(f"tar: {m.name}: Member name contains '..'")
                    return 2, b""
                parts = parts[strip:]
                if not parts:
                    continue
                dest = posixpath.join(directory, *parts)
                self._makedirs(posixpath.dirname(dest))
                if m.isdir():
                    self._makedirs(dest, m.mode & 0o7777)
                elif m.issym():
                    if self._lexists(dest):
                        self.fs.remove(dest)
                    self.fs.symlink(m.linkname, dest)
                elif m.isfile():
                    self.fs.write_bytes(dest, tf.extractfile(m).read())
                    self.fs.chmod(dest, m.mode & 0o7777)
        return 0, b""

    def _download(self, argv, out_flag) -> tuple[int, bytes]:
        prog = posixpath.basename(argv[0])
        args = argv[1:]
        out, url, quiet = None, None, False
        i = 0
        while i < len(args):
            a = args[i]
            if a == out_flag or (prog == "wget" and a == "--output-document"):
                i += 1
                out = args[i]
            elif a.startswith(out_flag) and len(a) > 2 and a[1] != "-":
                out = a[len(out_flag):]
            elif a.startswith("--output-document="):
                out = a.split("=", 1)[1]
            elif a.startswith("-"):
                quiet = quiet or "q" in a or "s" in a
            else:
                url = a
            i += 1
        if url is None:
            self._err(f"{prog}: missing URL")
            return 1 if prog == "wget" else 2, b""
        if url not in catalogue.DOWNLOADS:
            self._err(f"{prog}: unable to resolve host address for {url} (the simulated network only knows "
                      f"{len(catalogue.DOWNLOADS)} catalogue URLs)")
            return 4 if prog == "wget" else 6, b""
        data = catalogue.download_bytes(url)
        if out is None and prog == "curl":
            return 0, data
        target = out or posixpath.basename(url)
        if target == "-":
            return 0, data
        self.fs.write_bytes(self.path(target), data)
        if prog == "wget" and not quiet:
            self._err(f"Saving to: '{target}'\n'{target}' saved [{len(data)}/{len(data)}]")
        return 0, b""

    def _p_wget(self, argv, stdin):
        return self._download(argv, "-O")

    def _p_curl(self, argv, stdin):
        return self._download(argv, "-o")

    def _p_make(self, argv, stdin):
        args, directory, targets = argv[1:], self.cwd, []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "-C":
                i += 1
                directory = self.path(args[i])
            elif a.startswith("-C") and len(a) > 2:
                directory = self.path(a[2:])
            elif a == "-j" and i + 1 < len(args) and args[i + 1].isdigit():
                i += 1
            elif a.startswith("-") or "=" in a:
                pass
            else:
                targets.append(a)
            i += 1
        if not self._lexists(posixpath.join(directory, "Makefile")):
            self._err("make: *** No targets specified and no makefile found.  Stop.")
            return 2, b""
        if not self._lexists(posixpath.join(directory, "src", "server.c")):
            self._err(f"make: simulated make only knows how to build redis (no redis sources in {directory})")
            return 2, b""
        built = self._lexists(posixpath.join(directory, "src", "redis-server"))
        for target in targets or ["all"]:
            if target == "all":
                if built:
                    continue
                if not self._on_path("cc") and not self._on_path("gcc"):
                    self._err("cd src && make all\nmake[1]: cc: Command not found\n"
                              "make[1]: *** [Makefile:224: adlist.o] Error 127")
                    return 2, b""
                self._install(catalogue.redis_build_entries(directory))
                self._err("    LINK redis-server\n\nHint: It's a good idea to run 'make test' ;)")
                built = True
            elif target == "install":
                if not built:
                    ok, _ = self._p_make([argv[0], "-C", directory, "all"], stdin)
                    if ok:
                        return ok, b""
                self._install(catalogue.redis_install_entries("/usr/local"))
                self._err("".join(f"    INSTALL {n}\n" for n, _ in catalogue.REDIS_BINARIES))
            else:
                self._err(f"make: *** No rule to make target '{target}'.  Stop.")
                return 2, b""
        return 0, b""

    # apt -------------------------------------------------------------
    def _distro(self):
        try:
            text = self.fs.read_bytes("/etc/os-release").decode()
        except OSError:
            return None
        m = re.search(r"^VERSION_CODENAME=(\w+)", text, re.M)
        return catalogue.DISTROS.get(m.group(1)) if m else None

    def _dpkg(self) -> dict[str, dict[str, str]]:
        try:
            return catalogue.parse_dpkg_status(self.fs.read_bytes("/var/lib/dpkg/status").decode())
        except OSError:
            return {}

    def _auto(self) -> set[str]:
        try:
            text = self.fs.read_bytes("/var/lib/apt/extended_states").decode()
        except OSError:
            return set()
        return {s["Package"] for s in catalogue.parse_dpkg_status(text).values()
                if s.get("Auto-Installed") == "1"}

    def _write_auto(self, auto: set[str]):
        text = "".join(f"Package: {p}\nArchitecture: amd64\nAuto-Installed: 1\n\n" for p in sorted(auto))
        self.fs.write_bytes("/var/lib/apt/extended_states", text.encode())

    def _touch_dpkg_state(self, distro, log: str):
        """What every dpkg run rewrites: the debconf databases and logs (copied up into the layer)."""
        for path in ("/var/cache/debconf/templates.dat", "/var/cache/debconf/config.dat"):
            if self._lexists(path):
                data = self.fs.read_bytes(path)
                self.fs.write_bytes(path, data)
        self._makedirs("/var/log/apt")
        self.fs.write_bytes("/var/log/dpkg.log", log.encode(), append=True)
        self.fs.write_bytes("/var/log/apt/history.log", log.encode(), append=True)

    def _p_apt_get(self, argv, stdin):
        distro = self._distro()
        if distro is None:
            self._err("E: the simulated apt-get only knows Debian stretch and Ubuntu bionic images")
            return 100, b""
        args = [a for a in argv[1:] if not a.startswith("-o")]
        opts = [a for a in args if a.startswith("-")]
        words = [a for a in args if not a.startswith("-")]
        if any(a.startswith("-o") for a in argv[1:]):
            words = [w for w in words if "::" not in w]
        if not words:
            self._err("E: Invalid operation (none given)")
            return 100, b""
        action, names = words[0], words[1:]
        if action == "update":
            self._makedirs("/var/lib/apt/lists/partial")
            out = []
            for i, (name, size) in enumerate(distro.lists, 1):
                self.fs.write_bytes(f"/var/lib/apt/lists/{name}",
                                    catalogue.pseudo_content(f"{distro.codename}/{name}", size))
                out.append(f"Get:{i} {name.replace('_', '/')} [{size / 1000:.0f} kB]")
            total = sum(s for _, s in distro.lists)
            out.append(f"Fetched {total / 1e6:.1f} MB in 0s\nReading package lists...")
            return 0, ("\n".join(out) + "\n").encode()
        if action in ("clean", "autoclean"):
            for name in self._listdir("/var/cache/apt/archives"):
                if name.endswith(".deb"):
                    self.fs.remove(f"/var/cache/apt/archives/{name}")
            return 0, b""
        installed = self._dpkg()
        if action == "install":
            if "-y" not in opts and "--yes" not in opts and "-qq" not in opts and "--assume-yes" not in opts:
                self._err("Do you want to continue? [Y/n] Abort.")
                return 1, b""
            lists = [n for n in self._listdir("/var/lib/apt/lists") if n.endswith("Packages.gz")]
            for name in names:
                if not lists or name not in distro.archive and name not in distro.base:
                    self._err(f"E: Unable to locate package {name}")
                    return 100, b""
            recommends = "--no-install-recommends" not in opts
            new = catalogue.dependency_closure([n for n in names if n in distro.archive], distro.archive,
                                               installed, recommends)
            auto = self._auto() | (set(new) - set(names))
            auto -= set(names)
            log, status_text = [], self.fs.read_bytes("/var/lib/dpkg/status").decode() \
                if self._lexists("/var/lib/dpkg/status") else ""
            size_kb = 0
            for name in new:
                pkg = distro.archive[name]
                files = catalogue.package_entries(pkg, distro)
                self._install(files)
                listing = "".join(sorted(e.path + "\n" for e in files))
                self.fs.write_bytes(f"/var/lib/dpkg/info/{name}.list", listing.encode())
                status_text += catalogue.dpkg_stanza(pkg)
                log.append(f"install {name}:amd64 <none> {pkg.version}\n")
                size_kb += pkg.size_kb
            if new:
                self.fs.write_bytes("/var/lib/dpkg/status", status_text.encode())
                self._write_auto(auto)
                self._touch_dpkg_state(distro, "".join(log))
            msg = (f"The following NEW packages will be installed:\n  {' '.join(sorted(new))}\n"
                   f"0 upgraded, {len(new)} newly installed, 0 to remove and 0 not upgraded.\n"
                   f"After this operation, {size_kb * 1024 / 1e6:.1f} MB of additional disk space will be used.\n")
            return 0, msg.encode()
        if action in ("purge", "remove", "autoremove"):
            if action != "autoremove" and "-y" not in opts and "--yes" not in opts:
                self._err("Do you want to continue? [Y/n] Abort.")
                return 1, b""
            for name in names:
                if name not in installed:
                    self._err(f"Package '{name}' is not installed, so not removed")
            remove = {n for n in names if n in installed}
            auto = self._auto()
            if "--auto-remove" in opts or "--autoremove" in opts or action == "autoremove":
                keep_roots = [n for n in installed if n not in remove and n not in auto]
                archive = {**distro.base, **distro.archive}
                needed = set(catalogue.dependency_closure([n for n in keep_roots if n in archive], archive,
                                                         recommends=True))
                remove |= {n for n in auto if n in installed and n not in needed}
            freed = 0
            for name in sorted(remove):
                freed += self._remove_package(name)
            if remove:
                status_text = "".join(catalogue.dpkg_stanza(catalogue.Package(
                    n, f["Version"], int(f.get("Installed-Size", 0)), tuple(
                        d.strip() for d in f.get("Depends", "").split(",") if d.strip()),
                    priority=f.get("Priority", "optional")))
                    for n, f in installed.items() if n not in remove)
                self.fs.write_bytes("/var/lib/dpkg/status", status_text.encode())
                self._write_auto(auto - remove)
                self._touch_dpkg_state(distro, "".join(f"{action} {n}:amd64\n" for n in sorted(remove)))
            msg = (f"The following packages will be REMOVED:\n  {' '.join(sorted(remove))}\n"
                   f"0 upgraded, 0 newly installed, {len(remove)} to remove and 0 not upgraded.\n"
                   f"After this operation, {freed / 1e6:.1f} MB disk space will be freed.\n")
            return 0, msg.encode()
        self._err(f"E: the simulated apt-get does not implement '{action}'")
        return 100, b""

    def _remove_package(self, name: str) -> int:
        info = f"/var/lib/dpkg/info/{name}.list"
        try:
            paths = self.fs.read_bytes(info).decode().split()
        except OSError:
            return 0
        freed, dirs = 0, set()
        for p in paths:
            if self._lexists(p):
                st = self._lstat(p)
                if st.kind != "dir":
                    freed += st.size if st.kind == "file" else 0
                    self.fs.remove(p)
                    dirs.add(posixpath.dirname(p))
        for d in sorted(dirs, key=lambda d: -d.count("/")):
            while d not in ("/", "") and self._isdir(d) and not self.fs.listdir(d) and d.count("/") > 2:
                self.fs.rmdir(d)
                d = posixpath.dirname(d)
        for suffix in (".list", ".md5sums"):
            if self._lexists(f"/var/lib/dpkg/info/{name}{suffix}"):
                self.fs.remove(f"/var/lib/dpkg/info/{name}{suffix}")
        return freed

    def _listdir(self, p):
        try:
            return self.fs.listdir(p)
        except OSError:
            return []

    def _p_apt_mark(self, argv, stdin):
        args = [a for a in argv[1:] if not a.startswith("-")]
        if not args:
            self._err("E: No operation given")
            return 100, b""
        action, names = args[0], args[1:]
        installed, auto = self._dpkg(), self._auto()
        if action == "showmanual":
            return 0, "".join(n + "\n" for n in sorted(installed) if n not in auto).encode()
        if action == "showauto":
            return 0, "".join(n + "\n" for n in sorted(auto & set(installed))).encode()
        if action in ("auto", "manual"):
            chosen = {n for n in installed for pat in names if n == pat or re.fullmatch(pat, n)}
            auto = auto | chosen if action == "auto" else auto - chosen
            self._write_auto(auto)
            return 0, "".join(f"{n} set to {'automatically' if action == 'auto' else 'manually'} installed.\n"
                              for n in sorted(chosen)).encode()
        self._err(f"E: the simulated apt-mark does not implement '{action}'")
        return 100, b""

    # users -----------------------------------------------------------
    def _id_file(self, path):
        try:
            return self.fs.read_bytes(path).decode().splitlines()
        except OSError:
            return []

    def _p_groupadd(self, argv, stdin):
        opts, args = _opts(argv[1:], with_value="gK")
        if len(args) != 1:
            self._err("Usage: groupadd [options] GROUP")
            return 2, b""
        name = args[0]
        lines = self._id_file("/etc/group")
        if any(line.split(":")[0] == name for line in lines):
            self._err(f"groupadd: group '{name}' already exists")
            return 9, b""
        used = {int(line.split(":")[2]) for line in lines if line.count(":") >= 2}
        gid = int(opts["g"]) if "g" in opts else next(g for g in range(999, 99, -1) if g not in used) \
            if "r" in opts else next(g for g in range(1000, 60000) if g not in used)
        self.fs.write_bytes("/etc/group", f"{name}:x:{gid}:\n".encode(), append=True)
        return 0, b""

    def _p_useradd(self, argv, stdin):
        opts, args = _opts(argv[1:], with_value="gudsGcK")
        if len(args) != 1:
            self._err("Usage: useradd [options] LOGIN")
            return 2, b""
        name = args[0]
        lines = self._id_file("/etc/passwd")
        if any(line.split(":")[0] == name for line in lines):
            self._err(f"useradd: user '{name}' already exists")
            return 9, b""
        used = {int(line.split(":")[2]) for line in lines if line.count(":") >= 2}
        uid = int(opts["u"]) if "u" in opts else next(u for u in range(999, 99, -1) if u not in used) \
            if "r" in opts else next(u for u in range(1000, 60000) if u not in used)
        group = opts.get("g")
        if group is None:
            group = name
            if not any(line.split(":")[0] == name for line in self._id_file("/etc/group")):
                self.fs.write_bytes("/etc/group", f"{name}:x:{uid}:\n".encode(), append=True)
        gid = self._lookup_id("/etc/group", group)
        if gid < 0:
            self._err(f"useradd: group '{group}' does not exist")
            return 6, b""
        home = opts.get("d", f"/home/{name}")
        shell = opts.get("s", "/bin/sh")
        self.fs.write_bytes("/etc/passwd", f"{name}:x:{uid}:{gid}::{home}:{shell}\n".encode(), append=True)
        if "m" in opts:
            self._makedirs(home)
        return 0, b""


def _opts(args, with_value="m"):
    """Split `-rf`-style flags from operands (`--` ends options); `with_value` flags take the next word."""
    opts, rest, i = {}, [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i + 1:]
            break
        if a.startswith("--") and len(a) > 2:
            key, _, value = a[2:].partition("=")
            opts[key] = value
        elif a.startswith("-") and len(a) > 1:
            for j, fl in enumerate(a[1:]):
                if fl in with_value:
                    value = a[j + 2:]
                    if not value:
                        i += 1
                        value = args[i] if i < len(args) else ""
                    opts[fl] = value
                    break
                opts[fl] = ""
        else:
            rest.append(a)
        i += 1
    return opts, rest


def _chmod_mode(spec: str, current: int, is_dir: bool = False) -> int:
    if re.fullmatch(r"[0-7]{1,4}", spec):
        return int(spec, 8)
    mode = current
    for clause in spec.split(","):
        m = re.fullmatch(r"([ugoa]*)([-+=])([rwxXst]*)", clause)
        if not m:
            raise ValueError(spec)
        who, op, perms = m.groups()
        who = who or "a"
        bits = 0
        for w in ("u", "g", "o"):
            if w in who or "a" in who:
                shift = {"u": 6, "g": 3, "o": 0}[w]
                for p in perms:
                    if p in "rwx":
                        bits |= {"r": 4, "w": 2, "x": 1}[p] << shift
                    elif p == "X" and (is_dir or current & 0o111):
                        bits |= 1 << shift
        if "s" in perms:
            bits |= (0o4000 if "u" in who or "a" in who else 0) | (0o2000 if "g" in who or "a" in who else 0)
        if "t" in perms:
            bits |= 0o1000
        if op == "+":
            mode |= bits
        elif op == "-":
            mode &= ~bits
        else:
            mask = sum((0o7 << {"u": 6, "g": 3, "o": 0}[w]) for w in "ugo" if w in who or "a" in who)
            mode = (mode & ~mask) | bits
    return mode


def _printf_once(fmt: str, args: list[str]) -> tuple[str, list[str]]:
    out, i, args = [], 0, list(args)
    escapes = {"n": "\n", "t": "\t", "\\": "\\", "r": "\r", "a": "\a", "0": "\0"}
    while i < len(fmt):
        c = fmt[i]
        if c == "\\" and i + 1 < len(fmt):
            out.append(escapes.get(fmt[i + 1], "\\" + fmt[i + 1]))
            i += 2
        elif c == "%" and i + 1 < len(fmt):
            m = re.match(r"%([-0 +#]*\d*(?:\.\d+)?)([sdbxo%])", fmt[i:])
            if not m:
                out.append(c)
                i += 1
                continue
            flags, conv = m.groups()
            if conv == "%":
                out.append("%")
            else:
                arg = args.pop(0) if args else ""
                if conv in "dxo":
                    out.append(("%" + flags + conv) % int(arg or 0))
                elif conv == "b":
                    out.append(_printf_once(arg, [])[0])
                else:
                    out.append(("%" + flags + "s") % arg)
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out), args


def _strip(entry, strip: int, directory: str):
    parts = [p for p in entry.path.split("/") if p][strip:]
    if not parts:
        return None
    return catalogue.Entry(posixpath.join(directory, *parts), entry.kind, entry.size, entry.mode,
                           entry.target, entry.data)


def _restore(text: str) -> str:
    for k, v in _UNLITERAL.items():
        if k in text:
            text = text.replace(k, v)
    return text.replace(_DQ_DOLLAR, "$")


def _quote(arg: str) -> str:
    return arg if arg and re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _nofile(e: OSError) -> str:
    return e.strerror or os.strerror(e.errno or 0)
