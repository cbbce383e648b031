""".dockerignore: which context paths a build may not see, with the rules of moby's patternmatcher.

Docker, BuildKit and buildah all read the file the same way (moby/patternmatcher and its ignorefile
reader): one pattern a line, lines starting with ``#`` are comments, surrounding space is trimmed, each
pattern is cleaned like Go's ``filepath.Clean`` (so ``/a/../b`` is ``b``) and a leading ``/`` dropped;
``!`` re-includes. A pattern is a regular expression anchored at both ends where ``*`` and ``?`` stop at
``/``, ``**`` spans any number of directories, ``\\`` escapes, and ``[...]`` is a character class. A path
is excluded when the last pattern that matches it, or one of its parent directories, is not a ``!``.
No maintained PyPI package implements these rules exactly (docker-py carries a copy inside the whole
Docker API client), so they are here, tested against a table of moby's own cases.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _Pattern:
    text: str
    exclusion: bool
    regex: re.Pattern


def _clean(p: str) -> str:
    """Go's filepath.Clean for slash paths."""
    rooted = p.startswith("/")
    out: list[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(part)
    s = ("/" if rooted else "") + "/".join(out)
    return s or "."


def _compile(pattern: str) -> re.Pattern:
    """moby patternmatcher's translation of one cleaned pattern into a regular expression."""
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c in ".$+()|{}^" and not _in_class(out):
            out.append("\\" + c)
        elif c == "\\":
            if i + 1 < n:
                out.append(re.escape(pattern[i + 1]))
                i += 1
            else:
                out.append("\\\\")
        elif c == "[" and i + 1 < n and pattern[i + 1] == "^":
            out.append("[^")  # Go's class negation, same in Python
            i += 1
        else:
            out.append(c)
        i += 1
    out.append("$")
    return re.compile("".join(out), re.S)


def _in_class(parts: list[str]) -> bool:
    text = "".join(parts)
    return text.rfind("[") > text.rfind("]")


class IgnoreRules:
    """The patterns of one .dockerignore; `excluded(path)` answers for a context-relative path."""

    def __init__(self, patterns):
        self.patterns: list[_Pattern] = []
        for raw in patterns:
            p = raw.strip()
            if not p:
                continue
            exclusion = p.startswith("!")
            if exclusion:
                p = p[1:].strip()
                if not p:
                    raise ValueError('illegal exclusion pattern: "!"')
            p = _clean(p)
            if len(p) > 1 and p.startswith("/"):
                p = p[1:]
            try:
                regex = _compile(p)
            except re.error as e:
                raise ValueError(f".dockerignore: bad pattern {raw.strip()!r}: {e}") from None
            self.patterns.append(_Pattern(p, exclusion, regex))

    @classmethod
    def parse(cls, text: str) -> "IgnoreRules":
        """The file's text: a UTF-8 byte order mark is dropped, lines starting with `#` are comments."""
        return cls(line for line in text.removeprefix("\ufeff").splitlines() if not line.startswith("#"))

    @classmethod
    def for_context(cls, root) -> "IgnoreRules":
        import os
        path = os.path.join(root, ".dockerignore")
        if not os.path.isfile(path):
            return cls([])
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return cls.parse(f.read())

    @property
    def has_exceptions(self) -> bool:
        return any(p.exclusion for p in self.patterns)

    def excluded(self, path: str) -> bool:
        """MatchesOrParentMatches: the last pattern that matches the path or one of its parents decides."""
        path = _clean(path).lstrip("/")
        parents = posixpath.dirname(path).split("/") if "/" in path else []
        matched = False
        for pat in self.patterns:
            if pat.exclusion != matched:
                continue
            hit = bool(pat.regex.match(path))
            if not hit:
                hit = any(pat.regex.match("/".join(parents[:i + 1])) for i in range(len(parents)))
            if hit:
                matched = not pat.exclusion
        return matched

    def may_include_under(self, directory: str) -> bool:
        """Whether an excluded directory must still be walked: some `!` pattern may re-include below it."""
        d = _clean(directory).lstrip("/") + "/"
        for pat in self.patterns:
            if pat.exclusion and (pat.text.startswith(d) or any(c in pat.text for c in "*?[\\")):
                return True
        return False

    def __bool__(self):
        return bool(self.patterns)
