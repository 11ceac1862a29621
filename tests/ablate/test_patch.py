"""ablate.spec.patch: unified diffs applied in memory, checked against `git apply` on the same inputs.

    python -m pytest tests/ablate/test_patch.py -q
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ablate.spec.patch import PatchError, apply_file_patch, parse_patch

BASE = "".join(f"line {i}\n" for i in range(1, 41))


def _git_diff(tmp_path: Path, old: str, new: str, name: str = "train_gpt.py") -> str:
    """The diff git itself writes for old → new (a/ b/ prefixes, index line)."""
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    (repo / name).write_text(old)
    run = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    run("init", "-q")
    run("add", name)
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    (repo / name).write_text(new)
    return run("diff", "--", name).stdout


def _git_apply(tmp_path: Path, text: str, diff: str, name: str = "train_gpt.py") -> str:
    d = tmp_path / "apply"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    (d / "p.diff").write_text(diff)
    subprocess.run(["git", "apply", "p.diff"], cwd=d, check=True, capture_output=True)
    return (d / name).read_text()


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


@needs_git
def test_git_diff_applies_like_git_apply_also_when_lines_moved(tmp_path: Path) -> None:
    new = BASE.replace("line 5\n", "line five\n").replace("line 30\n", "line 30\nadded\n").replace("line 38\n", "")
    diff = _git_diff(tmp_path, BASE, new)
    fps = parse_patch(diff)
    assert [fp.path for fp in fps] == ["train_gpt.py"] and len(fps[0].hunks) == 3
    assert apply_file_patch(BASE, fps[0]) == new
    shifted = "header 1\nheader 2\n" + BASE  # the same diff on a file with two more lines on top
    assert apply_file_patch(shifted, fps[0]) == _git_apply(tmp_path, shifted, diff) == "header 1\nheader 2\n" + new


@needs_git
def test_no_newline_at_end_of_file(tmp_path: Path) -> None:
    old, new = "a\nb\nc", "a\nb\nC"
    diff = _git_diff(tmp_path, old, new)
    assert "\\ No newline at end of file" in diff
    assert apply_file_patch(old, parse_patch(diff)[0]) == new == _git_apply(tmp_path, old, diff)


def test_failing_hunk_is_quoted_with_the_line_that_differs() -> None:
    diff = ("--- a/train_gpt.py\n+++ b/train_gpt.py\n@@ -3,3 +3,3 @@\n line 3\n-line 4\n+line four\n line 5\n"
            "@@ -20,3 +20,3 @@\n line 20\n-line 21 (edited upstream)\n+line 21b\n line 22\n")
    with pytest.raises(PatchError) as e:
        apply_file_patch(BASE, parse_patch(diff, "my.diff")[0], "my.diff")
    msg = str(e.value)
    assert msg.startswith("my.diff: hunk 2 of 2 does not apply to the script")
    assert "at line 21 the hunk expects 'line 21 (edited upstream)' but the file has 'line 21'" in msg
    assert "@@ -20,3 +20,3 @@" in msg and "-line 21 (edited upstream)" in msg and "fix:" in msg


def test_stripped_blank_context_line_and_insertion_hunks() -> None:
    text = "a\n\nb\n"
    diff = "--- a/s.py\n+++ b/s.py\n@@ -0,0 +1 @@\n+top\n@@ -1,3 +2,3 @@\n a\n\n-b\n+B\n@@ -3,0 +5 @@\n+end\n"
    assert apply_file_patch(text, parse_patch(diff)[0]) == "top\na\n\nB\nend\n"


@pytest.mark.parametrize("diff, msg", [
    ("hello\n", "not a unified diff"),
    ("--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+x\n", "creates 'new.py'"),
    ("--- a/s.py\n+++ b/s.py\n@@ -1,2 +1,2 @@\n a\n", "ends early"),
    ("--- a/s.py\n+++ b/s.py\n@@ -1,2 +1,2 @@\n a\n*b\n", "starts with neither"),
    ("--- a/s.py\n+++ b/s.py\n@@ -x +1 @@\n", "malformed hunk header"),
])
def test_malformed_diffs_are_errors(diff: str, msg: str) -> None:
    with pytest.raises(PatchError, match=msg):
        parse_patch(diff)


def test_path_matching_for_a_diff_made_at_the_fork_root() -> None:
    fp = parse_patch("--- a/records/x/train_gpt.py\n+++ b/records/x/train_gpt.py\n@@ -1 +1 @@\n-a\n+b\n")[0]
    assert fp.matches("train_gpt.py") and not fp.matches("gpt.py") and not fp.matches("triton_kernels.py")
