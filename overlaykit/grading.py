"""Graded hands-on exercises: the learner types a listing, a script or a Dockerfile, and the package grades it.

Each exercise has a prompt, a hint and an answer (shown folded, in ``<details>``), and grades in plain
Python with ``grade(answer) -> Result(ok, message)``: no browser needed, and never an exception (a
mistake in the learner's input comes back as a sentence).  In a notebook the exercise displays as a
widget: a text area, a Check button, the feedback with a "try N" counter, and the folded hint and answer.

Three kinds, each reusable by any lesson:

* `ListingExercise`: predict ``ls -la upper/`` after some operations.  Graded against the real listing of
  upper/ after the engine runs the operations on a fresh lesson overlay: names, kinds and sizes must
  match; whitespace, link counts, owners and date columns are ignored.
* `TreeExercise`: make merged/ show a given tree by writing only to upper/ (shell lines such as
  ``echo new > upper/a.txt`` and ``ov_whiteout upper/old.txt``, or Python with ``upper`` a `Path` and
  ``ov_whiteout(path)``/``ov_opaque(path)``).  Graded by mounting the overlay and comparing merged/.
* `DockerfileExercise`: fix a Dockerfile so the image is under a size with an efficiency over a bar.
  Graded by building it with `overlaykit.build` (simulated bases and shell) and `overlaykit.images.inspect`.

Example::

    >>> from overlaykit.grading import ListingExercise
    >>> ex = ListingExercise("Predict ls -la upper/ after rm merged/in_lower.txt",
    ...                      "rm merged/in_lower.txt", hint="A deletion leaves a marker.")
    >>> ex.grade("-rw-r--r-- 29 in_both.txt\\n-rw-r--r-- 17 in_upper.txt")
    Result(ok=False, message='Missing from your listing: in_lower.txt (a whiteout, c--------- 0,0).')
    >>> ex          # in a notebook: the widget

Every grading run works in a fresh temporary folder that it removes, on the sim backend unless
``backend=`` says otherwise.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import stat as st
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    """The verdict on one answer: ``ok`` and one or more sentences for the learner."""

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok


class AnswerError(Exception):
    """A mistake in the learner's answer, said as a sentence (graded as wrong, not as a failure to grade)."""


class Exercise:
    """The common part: prompt, hint, folded answer, `grade` that never raises, and the widget."""

    kind = "exercise"
    placeholder = "your answer"

    def __init__(self, prompt: str, *, hint: str = "", answer: str | None = None, explanation: str = ""):
        self.prompt = prompt
        self.hint = hint
        self._answer = answer
        self.explanation = explanation
        self.tries = 0
        self._ui = None

    # -- grading -----------------------------------------------------------------------------------
    def grade(self, answer: str) -> Result:
        """Grade ``answer``; an error in it (or while grading) becomes a sentence, never a traceback."""
        if answer is None or not str(answer).strip():
            return Result(False, "Type your answer first.")
        try:
            return self._grade(str(answer))
        except AnswerError as e:
            return Result(False, str(e))
        except Exception as e:  # noqa: BLE001 - the learner sees a sentence
            return Result(False, "Could not grade this: " + _explain(e))

    def _grade(self, answer: str) -> Result:  # pragma: no cover - subclasses
        raise NotImplementedError

    def answer(self) -> str:
        """The model answer (computed from the engine where the kind allows it)."""
        return self._answer if self._answer is not None else self._model_answer()

    def _model_answer(self) -> str:
        return "(no model answer given)"

    def check(self, answer: str) -> Result:
        """`grade`, counting tries and adding "try N" to repeated wrong answers (what the widget calls)."""
        res = self.grade(answer)
        if res.message == "Type your answer first.":
            return res
        self.tries += 1
        if res.ok:
            extra = f" {self.explanation}" if self.explanation else ""
            return Result(True, f"Right! {res.message}{extra}".strip())
        head = "Not yet" + (f" (try {self.tries})" if self.tries > 1 else "") + ":"
        tail = " Open the hint below." if self.tries >= 2 and self.hint else ""
        return Result(False, f"{head} {res.message}{tail}")

    # -- display -----------------------------------------------------------------------------------
    def folded_html(self) -> str:
        """The hint and the answer, each folded in a ``<details>``."""
        parts = []
        if self.hint:
            parts.append(f"<details><summary>Hint</summary>{html.escape(self.hint)}</details>")
        try:
            ans = self.answer()
        except Exception as e:  # noqa: BLE001
            ans = "(the answer could not be computed here: " + _explain(e) + ")"
        expl = f"<p>{html.escape(self.explanation)}</p>" if self.explanation else ""
        parts.append(f"<details><summary>Show the answer</summary><pre>{html.escape(ans)}</pre>{expl}</details>")
        return "".join(parts)

    def widget(self):
        """The ipywidgets UI (built once): prompt, text area, Check, feedback, folded hint and answer."""
        if self._ui is None:
            self._ui = GradedWidget(self)
        return self._ui.box

    def _repr_mimebundle_(self, include=None, exclude=None):
        try:
            from .widgets import _bundle
            # where the widget cannot be drawn (untrusted notebook, static viewer) a sentence, not its repr
            return _bundle(self.widget(), f"Graded exercise: {self.prompt}\nRun this cell to answer it here "
                           "(your answer is checked in the notebook).", include=include, exclude=exclude)
        except ImportError:
            return {"text/plain": f"{self.prompt}\n(ipywidgets is not installed: call .grade(answer))",
                    "text/html": f"<b>{html.escape(self.prompt)}</b>{self.folded_html()}"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prompt!r})"


class GradedWidget:
    """The widget of one `Exercise`.  Enter checks a one-line answer (``multiline=False``); the button always."""

    def __init__(self, exercise: Exercise):
        import ipywidgets as W
        from .widgets import _message_html
        self.exercise = exercise
        self._message_html = _message_html
        multiline = getattr(exercise, "multiline", True)
        self.prompt = W.HTML(f"<b>{html.escape(exercise.prompt)}</b>")
        if multiline:
            self.input = W.Textarea(placeholder=exercise.placeholder, rows=6,
                                    layout=W.Layout(width="100%"))
        else:  # Enter commits the value: check it then
            self.input = W.Text(placeholder=exercise.placeholder, continuous_update=False,
                                layout=W.Layout(width="100%"))
            self.input.observe(lambda ch: self.check(), names="value")
        self.check_button = W.Button(description="Check", button_style="primary")
        self.check_button.on_click(lambda _b: self.check())
        self.feedback = W.HTML()
        self.folded = W.HTML(exercise.folded_html())
        self.box = W.VBox([self.prompt, self.input, self.check_button, self.feedback, self.folded])
        self.box.add_class("overlaykit-graded")

    def check(self) -> Result:
        try:
            res = self.exercise.check(self.input.value)
        except Exception as e:  # noqa: BLE001 - never a traceback in a widget
            res = Result(False, "Could not grade this: " + _explain(e))
        kind = "ok" if res.ok else ("info" if res.message == "Type your answer first." else "error")
        self.feedback.value = "<br>".join(self._message_html(line, kind) for line in res.message.split("\n"))
        return res


def _explain(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or os.strerror(e.errno)}{where}."
    if isinstance(e, SyntaxError):
        return f"line {e.lineno}: {e.msg}."
    msg = str(e) or type(e).__name__
    return (msg[:1].upper() + msg[1:]).rstrip(".") + "."


# ==================================================================================================
# (a) predict a listing

_MODE = re.compile(r"^[-dlcbps?][-rwxsStT]{9}[.+@]?$")
_KIND_OF_CHAR = {"-": "file", "d": "dir", "l": "symlink", "c": "char", "b": "block", "p": "fifo", "s": "socket"}
_KIND_WORD = {"file": "a file", "dir": "a directory", "symlink": "a symlink", "char": "a character device",
              "block": "a block device", "fifo": "a fifo", "socket": "a socket", "whiteout": "a whiteout"}


@dataclass(frozen=True)
class ListingLine:
    name: str
    kind: str          # file, dir, symlink, char, ..., or whiteout (char 0/0)
    size: str | None   # bytes, or "major,minor" for a device; None for a directory
    mode: str


def parse_listing(text: str) -> dict[str, ListingLine]:
    """Parse ``ls -l``-style lines (ours or the real ``ls -la``): mode, size or device, name.

    Link counts, owners, groups and dates are skipped; ``total N``, ``.`` and ``..`` lines are ignored;
    a trailing ``/`` on a directory name, our ``(whiteout)`` notes and ``-> target`` are allowed.
    Raises ValueError with the line number for a line without a mode column or a name.
    """
    out: dict[str, ListingLine] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"\s+\((whiteout|OCI [^)]*)\)\s*$", "", raw.strip())
        line = re.sub(r"\s+\[[^\]]*overlay\.[^\]]*\]\s*$", "", line)
        if not line or re.match(r"^total\s+\d+", line):
            continue
        if " -> " in line:
            line = line.split(" -> ", 1)[0]
        tokens = line.split()
        if not _MODE.match(tokens[0]):
            raise ValueError(f"line {n} ({raw.strip()!r}) does not start with a mode such as -rw-r--r--")
        if len(tokens) < 2:
            raise ValueError(f"line {n} ({raw.strip()!r}) has no name")
        mode, name = tokens[0], tokens[-1].rstrip("/")
        if name in (".", ".."):
            continue
        kind = _KIND_OF_CHAR.get(mode[0], "file")
        size = None
        middle = tokens[1:-1]
        dev = [t.rstrip(",") for t in middle if re.fullmatch(r"\d+,\d*", t)]
        if kind in ("char", "block"):
            if dev and dev[0].count(",") == 0:  # real ls writes "0, 0" as two tokens
                i = middle.index(dev[0] + ",")
                nxt = middle[i + 1] if i + 1 < len(middle) else ""
                size = f"{dev[0]},{nxt}" if nxt.isdigit() else None
            elif dev:
                size = dev[0]
            if size == "0,0" and kind == "char":
                kind = "whiteout"
        elif kind != "dir":
            nums = [t for t in middle if t.isdigit()]
            size = _size_of(middle, nums)
        out[name] = ListingLine(name, kind, size, mode[:10])
    return out


_MONTHS = {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"}


def _size_of(middle: list[str], nums: list[str]) -> str | None:
    """The size column: the number before a date (real ``ls -l``) or the last number (our short form)."""
    for i, t in enumerate(middle):
        if t[:3].lower() in _MONTHS or re.fullmatch(r"\d{4}-\d\d-\d\d", t):
            before = [x for x in middle[:i] if x.isdigit()]
            return before[-1] if before else None
    return nums[-1] if nums else None


def diff_listings(expected: dict[str, ListingLine], got: dict[str, ListingLine]) -> list[str]:
    """Sentences for every difference in names, kinds and sizes (empty when they agree)."""
    def show(e: ListingLine) -> str:
        what = _KIND_WORD.get(e.kind, e.kind)
        if e.kind == "whiteout":
            return f"{what}, c--------- 0,0"
        return what + (f", {e.size} bytes" if e.kind == "file" and e.size is not None else "")

    problems = []
    for name in sorted(expected.keys() - got.keys()):
        problems.append(f"Missing from your listing: {name} ({show(expected[name])}).")
    for name in sorted(got.keys() - expected.keys()):
        problems.append(f"{name} is not in upper/.")
    for name in sorted(expected.keys() & got.keys()):
        want, have = expected[name], got[name]
        if want.kind != have.kind:
            problems.append(f"{name} is {show(want)}, not {_KIND_WORD.get(have.kind, have.kind)}.")
        elif want.size != have.size and want.kind in ("file", "char", "block", "whiteout"):
            if have.size is None:
                problems.append(f"{name}: give its size too.")
            else:
                unit = " bytes" if want.kind == "file" else ""
                problems.append(f"{name}: the size is not {have.size}{unit}.")
    return problems


class _Scratch:
    """A temporary folder, removed on exit (the kernel's work/work is mode 000, so chmod first)."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="overlaykit-grade-"))
        return self.path

    def __exit__(self, *exc):
        from .course import _rmtree
        _rmtree(self.path)


def _operate(ov, ops) -> None:
    if callable(ops):
        ops(ov)
        return
    from .workspace_shell import run
    res = run(ov, ops)
    if res.status != 0:
        raise RuntimeError(f"the exercise's own operations failed: {res.output.strip()}")


class ListingExercise(Exercise):
    """Predict ``ls -la <folder>/`` after ``ops`` run on a fresh lesson overlay.

    ``ops`` is a shell script in the seed's terms (``"echo hi > merged/new.txt; rm merged/in_lower.txt"``)
    or a callable taking the mounted `Overlay`.  ``lower``/``upper`` are the starting layers (default: the
    lesson's, `course.LESSON_LOWER`/`LESSON_UPPER`).  ``folder`` is the layer folder to predict
    (``"upper"``, or ``"merged"`` for the merged view).  Only top-level entries are compared.
    """

    kind = "listing"
    placeholder = "one line per entry, e.g.  -rw-r--r--  17  in_upper.txt"

    def __init__(self, prompt: str, ops, *, lower: dict | None = None, upper: dict | None = None,
                 folder: str = "upper", hint: str = "", explanation: str = "", backend: str = "sim"):
        super().__init__(prompt, hint=hint, explanation=explanation)
        self.ops, self.lower, self.upper, self.folder, self.backend = ops, lower, upper, folder, backend
        self._expected: str | None = None

    def expected_listing(self) -> str:
        """The real listing, computed by running the operations (once; then remembered)."""
        if self._expected is None:
            from . import course
            from .workspace_shell import run
            with _Scratch() as tmp:
                ov = course.lesson_overlay(tmp, backend=self.backend, lower=self.lower, upper=self.upper)
                with ov:
                    _operate(ov, self.ops)
                    self._expected = run(ov, f"ls -la {self.folder}/").output.rstrip("\n")
        return self._expected

    def _model_answer(self) -> str:
        return f"$ ls -la {self.folder}/\n{self.expected_listing()}"

    def _grade(self, answer: str) -> Result:
        try:
            got = parse_listing(answer)
        except ValueError as e:
            return Result(False, _explain(e))
        problems = diff_listings(parse_listing(self.expected_listing()), got)
        if problems:
            return Result(False, "\n".join(problems))
        return Result(True, f"That is {self.folder}/ exactly.")


# ==================================================================================================
# (b) write only to upper/ so merged/ shows a tree

def merged_tree(ov) -> dict[str, str | None]:
    """merged/ as ``{path: text}`` (directories as ``"path/": None``, symlinks as ``"-> target"``)."""
    out: dict[str, str | None] = {}
    for dirpath, dirnames, filenames in ov.walk("."):
        base = "" if dirpath in (".", "") else dirpath.strip("/") + "/"
        for d in dirnames:
            out[base + d + "/"] = None
        for f in filenames:
            p = base + f
            s = ov.stat(p, follow_symlinks=False)
            if s.kind == "symlink":
                out[p] = "-> " + s.target
            elif s.kind == "file":
                out[p] = ov.read_bytes(p).decode("utf-8", "replace")
            else:
                out[p] = f"({s.kind})"
    return out


def _norm_tree(tree: dict) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for k, v in tree.items():
        k = k.strip().lstrip("/")
        if k.endswith("/") or v is None:
            k = k.rstrip("/") + "/"
            out[k] = None
        else:
            out[k] = v
        parts = k.rstrip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.setdefault("/".join(parts[:i]) + "/", None)
    return out


def tree_text(tree: dict) -> str:
    """A tree dict as lines ``path  'content'`` (the target shown to the learner)."""
    t = _norm_tree(tree)
    return "\n".join(k if v is None else f"{k}  {v!r}" for k, v in sorted(t.items())) or "(empty)"


def looks_like_python(code: str) -> bool:
    """Is this Python (it compiles) rather than shell lines?"""
    try:
        compile(code, "<answer>", "exec")
        return True
    except SyntaxError:
        return False


class TreeExercise(Exercise):
    """Make merged/ show ``target`` (``{path: text}``, ``"dir/": None``) by writing only to upper/.

    The learner's answer runs in a fresh workspace (``lower`` and the starting ``upper`` written first),
    as shell lines (``echo x > upper/a``, ``mkdir upper/d``, ``ov_whiteout upper/old``, ``ov_opaque
    upper/d``; lower/ and merged/ are read-only) or as Python (``upper`` is its `Path`;
    ``ov_whiteout(path)`` and ``ov_opaque(path)`` take paths inside upper/).  Then the overlay is mounted
    and merged/ compared with ``target``.  ``language`` is ``"auto"`` (Python if it compiles), ``"shell"``
    or ``"python"``.
    """

    kind = "tree"
    placeholder = "shell lines on upper/ (echo x > upper/a.txt, ov_whiteout upper/old.txt) or Python"

    def __init__(self, prompt: str, lower: dict, target: dict, *, upper: dict | None = None, hint: str = "",
                 answer: str | None = None, explanation: str = "", language: str = "auto", backend: str = "sim"):
        super().__init__(prompt, hint=hint, answer=answer, explanation=explanation)
        if language not in ("auto", "shell", "python"):
            raise ValueError(f"language={language!r}: choose 'auto', 'shell' or 'python'")
        self.lower, self.target, self.upper = dict(lower), dict(target), dict(upper or {})
        self.language, self.backend = language, backend

    def target_text(self) -> str:
        return tree_text(self.target)

    def _model_answer(self) -> str:
        return "(no model answer given)"

    def result_tree(self, answer: str) -> dict[str, str | None]:
        """merged/ after running ``answer`` on upper/ (raises on an error in the answer)."""
        from . import course
        from .engine import Overlay
        with _Scratch() as tmp:
            d = course.lesson_dirs(tmp, lower=self.lower, upper=self.upper)
            ov = Overlay([d["lower"]], d["upper"], d["work"], backend=self.backend)
            enc = ov._pick_encoding()  # the encoding the mount will read (kernel xattrs, or .wh. files)
            before = _snapshot(d["lower"])
            python = self.language == "python" or (self.language == "auto" and looks_like_python(answer))
            if python:
                _run_python(answer, d["upper"], enc)
            else:
                res = _run_shell(answer, d, enc)
                if res.status != 0:
                    raise AnswerError(f"Your commands failed: {res.output.strip()}")
            if _snapshot(d["lower"]) != before:
                raise AnswerError("Your answer changed lower/: write only to upper/.")
            with ov:
                return merged_tree(ov)

    def _grade(self, answer: str) -> Result:
        got = self.result_tree(answer)
        want = _norm_tree(self.target)
        problems = []
        for p in sorted(want.keys() - got.keys()):
            problems.append(f"merged/ has no {p}.")
        for p in sorted(got.keys() - want.keys()):
            problems.append(f"merged/ still shows {p}, which should not be there.")
        for p in sorted(want.keys() & got.keys()):
            if want[p] != got[p]:
                problems.append(f"merged/{p} holds {got[p]!r}, not {want[p]!r}.")
        if problems:
            return Result(False, "\n".join(problems))
        return Result(True, "merged/ shows exactly the tree asked for.")


def _snapshot(root: Path) -> list:
    """Every path under ``root`` with its type, mode, size and content hash (to notice writes to lower/)."""
    import hashlib
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            digest = hashlib.sha256(Path(p).read_bytes()).hexdigest() if st.S_ISREG(s.st_mode) else ""
            out.append((os.path.relpath(p, root), s.st_mode, s.st_size, s.st_rdev, digest))
    return out


def _inside(upper: Path, path) -> Path:
    """``path`` (relative to upper/, or starting with ``upper/``, or absolute inside it) as a path in upper/."""
    p = Path(path)
    if not p.is_absolute():
        parts = p.parts[1:] if p.parts[:1] == ("upper",) else p.parts
        p = upper.joinpath(*parts)
    p = Path(os.path.normpath(p))
    if p != upper and upper not in p.parents:
        raise AnswerError(f"{path} is not inside upper/: write only to upper/.")
    return p


def _run_python(code: str, upper: Path, enc) -> None:
    """Run the learner's Python with ``upper`` (a Path), ``ov_whiteout`` and ``ov_opaque`` defined."""
    def ov_whiteout(path):
        p = _inside(upper, path)
        enc.make_whiteout(str(p.parent), p.name)

    def ov_opaque(path):
        p = _inside(upper, path)
        enc.set_opaque(str(p))

    cwd = os.getcwd()
    os.chdir(upper.parent)  # so relative paths such as "upper/x" work as in the shell
    try:
        exec(compile(code, "<your answer>", "exec"),
             {"__name__": "__answer__", "upper": upper, "Path": Path, "os": os,
              "ov_whiteout": ov_whiteout, "ov_opaque": ov_opaque})
    except AnswerError:
        raise
    except SyntaxError as e:
        raise AnswerError(f"Your Python has a syntax error on line {e.lineno}: {e.msg}.") from None
    except Exception as e:  # noqa: BLE001 - the learner's code; said as a sentence
        line = _answer_line(e)
        raise AnswerError(f"Your Python stopped{line} with {type(e).__name__}: {_explain(e)}") from None
    finally:
        os.chdir(cwd)


def _answer_line(e: BaseException) -> str:
    tb, line = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<your answer>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" on line {line}" if line else ""


def _run_shell(script: str, d: dict, enc):
    """Shell lines with only upper/ writable; ``ov_whiteout``/``ov_opaque`` write markers in ``enc``."""
    from .workspace_shell import WorkspaceFS, WorkspaceShell

    class _FS(WorkspaceFS):
        def encoding(self):
            return enc

    # merged/ is not mounted while the learner writes: read-only (EROFS), like lower/
    fs = _FS(None, {"upper": d["upper"], "lower": d["lower"], "merged": d["merged"]}, writable=("upper",))
    return WorkspaceShell(fs).run(script)


# ==================================================================================================
# (c) fix a Dockerfile

MB = 1_000_000


class DockerfileExercise(Exercise):
    """Fix ``dockerfile`` so the image is under ``max_size`` bytes with efficiency at least ``min_efficiency``.

    Graded by building the learner's Dockerfile with `overlaykit.build` (simulated bases from
    `overlaykit.catalogue`, the simulated shell; ``context`` is the build context folder, by default the
    shipped ``hello/`` example) and measuring it with `overlaykit.images.inspect`: size is the sum of the
    layer tars, efficiency the share of stored file bytes still visible in the final root filesystem
    (dive's measure).  A build takes a few seconds.
    """

    kind = "dockerfile"
    placeholder = "the whole Dockerfile"

    def __init__(self, prompt: str, dockerfile: str, *, max_size: int = 150 * MB, min_efficiency: float = 0.95,
                 context=None, hint: str = "", answer: str | None = None, explanation: str = "",
                 backend: str = "sim"):
        super().__init__(prompt, hint=hint, answer=answer, explanation=explanation)
        self.dockerfile = dockerfile
        self.max_size, self.min_efficiency = max_size, min_efficiency
        self.context, self.backend = context, backend

    def measure(self, dockerfile: str):
        """Build ``dockerfile`` in a scratch store and return its `images.Inspection`."""
        from . import course
        from .build import BuildError
        from .images import Store, inspect
        context = self.context if self.context is not None else course.example("hello")
        with _Scratch() as tmp:
            store = Store(tmp / "store")
            try:
                image = course.build(dockerfile, context, store, "exercise", log=False, backend=self.backend)
            except BuildError as e:
                raise AnswerError(f"The build failed: {e}") from None
            return inspect(image)

    def _grade(self, answer: str) -> Result:
        from .diagrams import human_size
        r = self.measure(answer)
        size_ok = r.size < self.max_size
        eff_ok = r.efficiency >= self.min_efficiency
        facts = (f"The image is {human_size(r.size)} in {len(r.layers)} layers, "
                 f"efficiency {r.efficiency:.1%}.")
        if size_ok and eff_ok:
            return Result(True, facts)
        wants = []
        if not size_ok:
            wants.append(f"under {self.max_size / MB:.0f} MB")
        if not eff_ok:
            wants.append(f"over {self.min_efficiency:.0%} efficiency")
        return Result(False, f"{facts} It should be {' and '.join(wants)}.")


__all__ = ["Result", "AnswerError", "Exercise", "ListingExercise", "TreeExercise", "DockerfileExercise", "GradedWidget",
           "parse_listing", "diff_listings", "merged_tree", "tree_text", "MB"]
