"""Graded exercises: each kind grades right and wrong answers, in plain Python and through its widget."""
from __future__ import annotations

import os
import subprocess

import pytest

from overlaykit import capabilities
from overlaykit.grading import (MB, DockerfileExercise, ListingExercise, Result, TreeExercise, parse_listing)

KERNEL = capabilities()["kernel"]
SEED = "echo hi > merged/new.txt\nrm merged/in_lower.txt\necho more >> merged/in_both.txt"


@pytest.fixture
def listing():
    return ListingExercise("Predict ls -la upper/ after the seed's commands", SEED, hint="A deletion leaves a marker.")


def test_listing_answer_is_the_engines_listing(listing):
    text = listing.expected_listing()
    got = parse_listing(text)
    assert got["in_lower.txt"].kind == "whiteout" and got["in_lower.txt"].size == "0,0"
    assert got["new.txt"].size == "3"
    assert got["in_both.txt"].size == str(len("upper/'s copy of in_both.txt\n") + len("more\n"))
    assert listing.grade(text) == Result(True, "That is upper/ exactly.")


def test_listing_accepts_real_ls_output_with_dates_and_owners(listing, tmp_path):
    """A learner may paste what coreutils' ls -la prints: link counts, owners and dates are ignored."""
    from overlaykit import course
    ov = course.lesson_overlay(tmp_path, backend="sim")
    with ov:
        from overlaykit.workspace_shell import run
        assert run(ov, SEED).status == 0
    real = subprocess.run(["ls", "-la", str(tmp_path / "upper")], capture_output=True, text=True,
                          env={"LC_ALL": "C"}).stdout
    assert "total" in real and ":" in real  # dates with times, "0, 0" for the whiteout
    assert listing.grade(real).ok, listing.grade(real).message
    assert listing.grade("\n".join("   " + line + "   " for line in real.splitlines())).ok


@pytest.mark.parametrize("answer, words", [
    ("-rw-r--r-- 34 in_both.txt\n-rw-r--r-- 17 in_upper.txt\n-rw-r--r-- 3 new.txt",
     ["Missing from your listing: in_lower.txt (a whiteout"]),
    ("-rw-r--r-- 34 in_both.txt\n-rw-r--r-- 0 in_lower.txt\n-rw-r--r-- 17 in_upper.txt\n-rw-r--r-- 3 new.txt",
     ["in_lower.txt is a whiteout, c--------- 0,0, not a file"]),
    ("-rw-r--r-- 29 in_both.txt\nc--------- 0,0 in_lower.txt\n-rw-r--r-- 17 in_upper.txt\n-rw-r--r-- 3 new.txt",
     ["in_both.txt: the size is not 29 bytes"]),
    ("-rw-r--r-- 34 in_both.txt\nc--------- 0,0 in_lower.txt\n-rw-r--r-- 17 in_upper.txt\n-rw-r--r-- 3 new.txt\n"
     "-rw-r--r-- 17 in_lower2.txt", ["in_lower2.txt is not in upper/"]),
    ("in_both.txt new.txt", ["does not start with a mode"]),
])
def test_listing_wrong_answers_say_what_differs(listing, answer, words):
    res = listing.grade(answer)
    assert not res.ok
    for w in words:
        assert w in res.message


@pytest.mark.kernel
@pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")
def test_listing_expected_on_the_kernel_matches_the_sim():
    """The kernel is the judge: the expected listing computed on a real mount is the sim's."""
    sim = ListingExercise("q", SEED).expected_listing()
    kernel = ListingExercise("q", SEED, backend="kernel").expected_listing()
    assert sim == kernel


def test_listing_ops_may_be_a_callable():
    ex = ListingExercise("q", lambda ov: ov.mkdir("d"), folder="merged")
    assert "drwxr-xr-x      - d/" in ex.expected_listing()
    assert ex.grade(ex.expected_listing()).ok


def test_empty_answer_asks_for_one(listing):
    assert listing.grade("   ") == Result(False, "Type your answer first.")
    assert listing.check("") .message == "Type your answer first." and listing.tries == 0


def test_try_counter_and_hint(listing):
    first = listing.check("-rw-r--r-- 1 x")
    second = listing.check("-rw-r--r-- 1 x")
    assert first.message.startswith("Not yet:") and "(try" not in first.message
    assert second.message.startswith("Not yet (try 2):") and "Open the hint below." in second.message
    assert listing.check(listing.expected_listing()).message.startswith("Right!")


# -- tree exercise ------------------------------------------------------------------------------------

LOWER = {"etc/app.conf": "old\n", "etc/motd": "hello\n", "cache/a": "a", "cache/b": "b"}
TARGET = {"etc/app.conf": "new\n", "etc/motd": "hello\n", "cache/": None, "cache/c": "c"}


@pytest.fixture
def tree():
    return TreeExercise("Make merged/ show this tree by writing only to upper/", LOWER, TARGET)


@pytest.mark.parametrize("answer", [
    "mkdir -p upper/etc upper/cache\necho new > upper/etc/app.conf\nov_opaque upper/cache\nprintf c > upper/cache/c",
    "mkdir upper/etc upper/cache\necho new > upper/etc/app.conf\nov_whiteout upper/cache/a\n"
    "ov_whiteout upper/cache/b\nprintf c > upper/cache/c",
    "(upper / 'etc').mkdir()\n(upper / 'etc/app.conf').write_text('new\\n')\n(upper / 'cache').mkdir()\n"
    "ov_opaque(upper / 'cache')\n(upper / 'cache/c').write_text('c')",
])
def test_tree_right_answers(tree, answer):
    assert tree.grade(answer) == Result(True, "merged/ shows exactly the tree asked for.")


@pytest.mark.parametrize("answer, words", [
    ("mkdir -p upper/etc\necho new > upper/etc/app.conf", ["merged/ has no cache/c", "still shows cache/a"]),
    ("mkdir -p upper/etc upper/cache\necho new > upper/etc/app.conf\nprintf c > upper/cache/c",
     ["still shows cache/a", "still shows cache/b"]),
    ("echo x > merged/etc/app.conf", ["Your commands failed", "Read-only file system"]),
    ("rm lower/cache/a", ["Read-only file system"]),
    ("open('lower/cache/a', 'w').write('x')", ["changed lower/"]),
    ("ov_whiteout('/etc/passwd')", ["not inside upper/"]),
    ("x = 1/0", ["Your Python stopped on line 1 with ZeroDivisionError"]),
    ("if True\n  pass", ["Your commands failed"]),  # not Python, so run as shell: a sentence either way
])
def test_tree_wrong_answers_are_sentences(tree, answer, words):
    res = tree.grade(answer)
    assert not res.ok
    assert "Traceback" not in res.message
    for w in words:
        assert w in res.message, res.message


def test_tree_learner_never_touches_the_real_lower(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree.grade("open('lower/cache/a', 'w').write('x')")
    assert os.listdir(tmp_path) == []  # everything happened in a scratch folder, now removed


@pytest.mark.kernel
@pytest.mark.skipif(not KERNEL.available, reason=f"kernel backend not allowed: {KERNEL.reason}")
def test_tree_graded_on_a_real_mount():
    ex = TreeExercise("q", LOWER, TARGET, backend="kernel")
    assert ex.grade("mkdir -p upper/etc upper/cache\necho new > upper/etc/app.conf\nov_opaque upper/cache\n"
                    "printf c > upper/cache/c").ok
    assert not ex.grade("mkdir -p upper/etc\necho new > upper/etc/app.conf").ok


# -- Dockerfile exercise ------------------------------------------------------------------------------

APT_BAD = "FROM debian:stretch\nRUN apt-get update\nRUN rm -rf /var/lib/apt/lists/*\n"
APT_GOOD = "FROM debian:stretch\nRUN apt-get update && rm -rf /var/lib/apt/lists/*\n"


def test_dockerfile_exercise_grades_by_building():
    ex = DockerfileExercise("Fix this Dockerfile", APT_BAD)
    wrong = ex.grade(APT_BAD)
    assert not wrong.ok
    assert "in 3 layers, efficiency 90." in wrong.message and "It should be over 95% efficiency." in wrong.message
    right = ex.grade(APT_GOOD)
    assert right.ok and "in 2 layers, efficiency 100.0%" in right.message
    small = DockerfileExercise("Fix", APT_BAD, max_size=50 * MB)
    assert "It should be under 50 MB." in small.grade(APT_GOOD).message


@pytest.mark.slow
def test_dockerfile_exercise_on_the_redis_examples():
    from overlaykit import course
    bad = course.example("redis-eight-runs.Dockerfile").read_text()
    good = course.example("redis-one-run.Dockerfile").read_text()
    ex = DockerfileExercise("Fix this Dockerfile", bad)
    wrong = ex.grade(bad)
    assert not wrong.ok
    assert "It should be under 150 MB and over 95% efficiency." in wrong.message
    right = ex.grade(good)
    assert right.ok, right.message
    assert "efficiency 99." in right.message


def test_dockerfile_build_error_is_a_sentence():
    ex = DockerfileExercise("Fix", "FROM debian:stretch\nRUN frobnicate\n")
    res = ex.grade("FROM debian:stretch\nRUN frobnicate\n")
    assert not res.ok and res.message.startswith("The build failed:") and "Traceback" not in res.message


# -- widget -------------------------------------------------------------------------------------------

def test_widget_checks_and_counts_tries(listing):
    pytest.importorskip("ipywidgets")
    box = listing.widget()
    ui = listing._ui
    assert "<details><summary>Hint</summary>" in ui.folded.value
    assert "<details><summary>Show the answer</summary>" in ui.folded.value and "in_lower.txt" in ui.folded.value
    ui.input.value = "nonsense"
    ui.check_button.click()
    assert "does not start with a mode" in ui.feedback.value and "Traceback" not in ui.feedback.value
    ui.check_button.click()
    assert "try 2" in ui.feedback.value
    ui.input.value = listing.expected_listing()
    ui.check_button.click()
    assert "Right!" in ui.feedback.value
    assert box._repr_mimebundle_() is not None


def test_one_line_widget_checks_on_enter():
    pytest.importorskip("ipywidgets")
    ex = ListingExercise("q", "rm merged/in_lower.txt")
    ex.multiline = False
    ex.widget()
    ex._ui.input.value = "c--------- 0,0 in_lower.txt"  # Enter commits the value, which checks it
    assert "in_both.txt" in ex._ui.feedback.value and ex.tries == 1


def test_widget_never_shows_a_traceback(monkeypatch, listing):
    pytest.importorskip("ipywidgets")
    listing.widget()
    monkeypatch.setattr(listing, "check", lambda a: 1 / 0)
    listing._ui.input.value = "x"
    listing._ui.check_button.click()
    assert "Could not grade this" in listing._ui.feedback.value


def test_the_text_fallback_is_a_sentence_not_the_widgets_repr():
    """Issue 13.1: where the widget cannot be drawn, its text/plain is what the learner reads."""
    from overlaykit import grading
    ex = grading.ListingExercise("Type what `ls -la upper/` shows.", "rm merged/in_lower.txt")
    text = ex._repr_mimebundle_()["text/plain"]
    assert "VBox" not in text and "children=" not in text, text
    assert "Run this cell" in text and "Type what" in text
