"""One git_commit (trainer.env), used by the trainer's start event and by ablate's driver."""
from __future__ import annotations

import subprocess
import sys

from ablate import provenance
from trainer import env


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_git_commit_clean_dirty_and_outside(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f").write_text("a")
    _git(repo, "add", "f")
    _git(repo, "commit", "-qm", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert env.git_commit(repo) == head
    assert provenance.git_commit(str(repo)) == head
    (repo / "f").write_text("b")
    assert env.git_commit(repo) == head + "+dirty"
    assert env.git_commit(tmp_path / "nowhere") is None


def test_the_driver_gets_it_without_loading_torch():
    code = "import sys; from ablate.provenance import git_commit; git_commit(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
