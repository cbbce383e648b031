"""The Dockerfile language: instructions with their lines, heredocs, words, variables and flags.

What a Dockerfile says, read the way Docker and BuildKit read it, before anything runs: the instructions
(parsed by ``dockerfile-parse``, with BuildKit's heredocs taken out first), ``$VAR`` substitution, the
shell-like words of ENV/LABEL/ARG (Docker's ProcessWords), ``--flag`` words, HEALTHCHECK's options and
RUN's ``--mount`` specs. :mod:`overlaykit.build` runs what this module reads.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import shlex
from dataclasses import dataclass

from dockerfile_parse import DockerfileParser

CONFIG_INSTRUCTIONS = {"ENV", "ARG", "USER", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE", "VOLUME", "STOPSIGNAL",
                       "SHELL", "HEALTHCHECK", "ONBUILD", "MAINTAINER"}
LAYER_INSTRUCTIONS = {"RUN", "COPY", "ADD"}
SUPPORTED = CONFIG_INSTRUCTIONS | LAYER_INSTRUCTIONS | {"FROM", "WORKDIR"}


class BuildError(Exception):
    """A build step failed; the message names the Dockerfile line and instruction."""


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line of the Dockerfile where the instruction starts
    name: str  # upper case
    value: str  # the arguments, continuations joined
    original: str
    heredocs: tuple = ()  # ((name, body, quoted), ...) of `<<NAME` documents, in order (BuildKit syntax)


_HEREDOC = re.compile(r"\d*<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their line numbers, parsed by dockerfile-parse.

    BuildKit drops comment lines and blank lines *inside* continuations; dockerfile-parse ends the
    instruction there instead, so those lines are removed first (keeping line numbers right). Heredocs
    (`RUN <<EOF` ... `EOF`, BuildKit's syntax, which dockerfile-parse does not know) are taken out here and
    attached to their instruction: the document starts on the line after the instruction and ends at a
    line that is only its name (`<<-` strips leading tabs).
    """
    lines = text.splitlines()
    cleaned, continuing, heredocs = [], False, {}
    start, first, markers, i = 0, "", [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if continuing and (stripped.startswith("#") or not stripped):
            cleaned.append(None)  # dropped, like BuildKit
            i += 1
            continue
        if not continuing:
            start, markers = i + 1, []
            first = stripped.split(None, 1)[0].upper() if stripped and not stripped.startswith("#") else ""
        cleaned.append(line)
        if first in ("RUN", "COPY", "ADD"):  # a word that is `<<NAME` (not text inside quotes), as BuildKit
            markers += [m.groups() for w in raw_words(line.rstrip("\\")) if (m := _HEREDOC.fullmatch(w))]
        continuing = stripped.endswith("\\") and not stripped.startswith("#")
        i += 1
        if continuing or not markers:
            continue
        docs = []
        for strip, quote, name in markers:
            body = []
            while i < len(lines) and (lines[i].lstrip("\t") if strip else lines[i]) != name:
                body.append(lines[i].lstrip("\t") if strip else lines[i])
                cleaned.append(None)
                i += 1
            if i >= len(lines):
                raise BuildError(f"line {start}: {first}: heredoc <<{name} has no line {name!r} to end it")
            cleaned.append(None)
            i += 1
            docs.append((name, "".join(b + "\n" for b in body), bool(quote)))
        heredocs[start] = tuple(docs)
        markers = []
    kept = [(i + 1, l) for i, l in enumerate(cleaned) if l is not None]
    parser = DockerfileParser(fileobj=io.BytesIO("\n".join(l for _, l in kept).encode() + b"\n"))
    out = []
    for item in parser.structure:
        name = item["instruction"].upper()
        if name == "COMMENT":
            continue
        line = kept[item["startline"]][0]
        out.append(Instruction(line, name, item["value"].strip(), item["content"].strip(), heredocs.get(line, ())))
    return out


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, variables: dict[str, str]) -> str:
    """Dockerfile variable substitution ($VAR, ${VAR}, ${VAR:-default}, ${VAR:+alt}; \\$ stays literal)."""
    def repl(m):
        if m.start() > 0 and text[m.start() - 1] == "\\":
            return m.group(0)
        name = m.group(1) or m.group(4)
        value = variables.get(name, "")
        if m.group(2) == "-":
            return value or m.group(3)
        if m.group(2) == "+":
            return m.group(3) if value else ""
        return value
    return _VAR.sub(repl, text).replace("\\$", "$")


def exec_form(value: str) -> list[str] | None:
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return parsed
    return None


def shell_words(value: str, variables: dict[str, str] | None, split: bool = True) -> list[str]:
    """Split and expand like Docker's shell lexer (ProcessWords): `'...'` is literal, `"..."` expands
    variables but is one word, a backslash escapes the next character, `$VAR`/`${VAR...}` expand (with
    `variables` None nothing expands). Expanded text is never split again; with `split` False the whole
    value is one word, its blanks kept (ProcessWord, for the legacy `ENV key value` form)."""
    words, cur, started, i, n = [], [], False, 0, len(value)

    def expand(j):
        m = _VAR.match(value, j)
        if not m or variables is None:
            return "$", j + 1
        name = m.group(1) or m.group(4)
        got = variables.get(name, "")
        if m.group(2) == "-":
            got = got or m.group(3)
        elif m.group(2) == "+":
            got = m.group(3) if got else ""
        return got, m.end()

    while i < n:
        c = value[i]
        if c in " \t\n" and split:
            if started:
                words.append("".join(cur))
                cur, started = [], False
            i += 1
            continue
        started = True
        if c == "'":
            end = value.find("'", i + 1)
            end = n if end < 0 else end
            cur.append(value[i + 1:end])
            i = end + 1
        elif c == '"':
            i += 1
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n and value[i + 1] in '"$\\':
                    cur.append(value[i + 1])
                    i += 2
                elif value[i] == "$":
                    text, i = expand(i)
                    cur.append(text)
                else:
                    cur.append(value[i])
                    i += 1
            i += 1
        elif c == "\\":
            cur.append(value[i + 1] if i + 1 < n else "")
            i += 2
        elif c == "$":
            text, i = expand(i)
            cur.append(text)
        else:
            cur.append(c)
            i += 1
    if started:
        words.append("".join(cur))
    return words


def key_values(value: str, line: int, name: str, variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """`K=V K2="v 2"` or the legacy `K V with spaces` form of ENV / LABEL / ARG, expanded with the
    variables as they were before the instruction (Docker: `ENV a=2 b=$a` gives b the old a)."""
    raw = shell_words(value, None)
    if not raw:
        raise BuildError(f"line {line}: {name} needs arguments")
    if "=" not in raw[0]:
        if name == "ARG":
            return [(w, None) for w in raw]
        key, _, rest = value.strip().partition(" ")
        return [(key, "".join(shell_words(rest.strip(), variables, split=False)) if rest.strip() else "")]
    out = []
    for w in raw_words(value):
        if "=" not in w:
            if name == "ARG":
                out.append((w, None))
                continue
            raise BuildError(f"line {line}: {name}: expected KEY=VALUE, got {w!r}")
        k, _, v = w.partition("=")
        k = "".join(shell_words(k, variables)) if any(c in k for c in "'\"\\$") else k
        expanded = shell_words(v, variables) if v else [""]
        out.append((k, expanded[0] if expanded else ""))
    return out


def raw_words(value: str) -> list[str]:
    """Words split on unquoted blanks, quotes and escapes kept (they are processed per value)."""
    words, cur, quote, i = [], [], None, 0
    while i < len(value):
        c = value[i]
        if quote:
            cur.append(c)
            if c == "\\" and quote == '"' and i + 1 < len(value):
                cur.append(value[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in " \t\n":
            if cur:
                words.append("".join(cur))
                cur = []
        elif c == "\\" and i + 1 < len(value):
            cur += [c, value[i + 1]]
            i += 1
        else:
            cur.append(c)
            if c in "'\"":
                quote = c
        i += 1
    if cur:
        words.append("".join(cur))
    return words


_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1000, "µs": 1000, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def _duration(text: str, flag: str, line: int) -> int:
    """A Go duration (`30s`, `1m30s`) in nanoseconds, as Docker stores HEALTHCHECK times."""
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNIT_NS[m.group(2)])
        pos = m.end()
    if not text or pos != len(text):
        raise BuildError(f"line {line}: HEALTHCHECK --{flag}: {text!r} is not a duration (e.g. 30s, 1m30s)")
    return total


def parse_healthcheck(value: str, line: int) -> dict:
    """HEALTHCHECK [--interval --timeout --start-period --start-interval --retries] CMD ... | NONE."""
    rest = value.strip()
    if rest.upper() == "NONE":
        return {"Test": ["NONE"]}
    check: dict = {}
    keys = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
            "start-interval": "StartInterval", "retries": "Retries"}
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, _, arg = word[2:].partition("=")
        if name not in keys:
            raise BuildError(f"line {line}: HEALTHCHECK: unknown flag --{name}")
        if name == "retries":
            if not arg.isdigit():
                raise BuildError(f"line {line}: HEALTHCHECK --retries needs a whole number, got {arg!r}")
            check["Retries"] = int(arg)
        else:
            check[keys[name]] = _duration(arg, name, line)
    word, _, cmd = rest.partition(" ")
    if word.upper() != "CMD" or not cmd.strip():
        raise BuildError(f"line {line}: HEALTHCHECK expects NONE or [flags] CMD command, got {value!r}")
    argv = exec_form(cmd.strip())
    return {"Test": (["CMD"] + argv) if argv is not None else ["CMD-SHELL", cmd.strip()], **check}


def flag_words(value: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(value, posix=True)
    flags = {}
    while words and words[0].startswith("--"):
        k, _, v = words.pop(0)[2:].partition("=")
        flags[k] = v
    return flags, words


_MOUNT_KEYS = {"type", "target", "dst", "destination", "source", "src", "from", "id", "ro", "readonly", "rw",
               "readwrite", "sharing", "mode", "uid", "gid", "size"}


def run_flags(ins) -> tuple[list[dict], str]:
    """RUN's flags (`--mount=...` repeated, `--network=default|none`) and the command after them."""
    rest, mounts = ins.value.lstrip(), []
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, _, arg = word[2:].partition("=")
        if name == "mount":
            mounts.append(mount_spec(arg, ins.line))
        elif name == "network" and arg in ("default", "none"):
            continue  # no network either way in this builder
        else:
            raise BuildError(f"line {ins.line}: RUN: unsupported flag --{name}"
                             + (f"={arg}" if arg else "") + " (supported: --mount, --network=default|none)")
    return mounts, rest


def mount_spec(arg: str, line: int) -> dict:
    m: dict = {"type": "bind", "rw": False}
    for field_ in [f for f in arg.split(",") if f]:
        key, eq, value = field_.partition("=")
        key = key.strip().lower()
        if key not in _MOUNT_KEYS:
            raise BuildError(f"line {line}: RUN --mount: unknown option {key!r}")
        if key in ("ro", "readonly", "rw", "readwrite"):
            on = value.lower() not in ("false", "0") if eq else True
            m["rw"] = on if key in ("rw", "readwrite") else not on
        elif key in ("target", "dst", "destination"):
            m["target"] = posixpath.normpath("/" + value)
        elif key in ("source", "src"):
            m["source"] = value
        elif key == "mode":
            m["mode"] = int(value, 8)
        elif key in ("uid", "gid"):
            if not value.isdigit():
                raise BuildError(f"line {line}: RUN --mount {key}={value}: a number is needed")
            m[key] = value
        elif key in ("size", "sharing"):
            m[key] = value
        else:
            m[key] = value
    if m["type"] not in ("bind", "cache", "tmpfs"):
        raise BuildError(f"line {line}: RUN --mount=type={m['type']}: not supported (bind, cache and tmpfs are)")
    if "target" not in m or m["target"] == "/":
        raise BuildError(f"line {line}: RUN --mount: a target other than / is required")
    if m["type"] == "cache":
        m["rw"] = True
    if m["type"] == "tmpfs":
        m["rw"] = True
    return m
