"""benchmarks/gpu_acceptance.py --resume: a suite cut off by a time limit finishes in a second call
at the same commit, keeping the jobs that passed and re-running the rest, into one record. The GPU
rows are replaced by fakes; this checks the bookkeeping only (CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ga(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_acceptance as mod

    ran: list[str] = []
    fail_once = {"small · flex"}

    def preset_row(p, b, d, out, n=1):
        name = f"{p} · {b}"
        ran.append(name)
        if name in fail_once:
            fail_once.discard(name)
            return mod.Row(name, "FAIL", 1.0, "boom")
        return mod.Row(name, "PASS", 1.0, "ok")

    info = {"gpus": ["FAKE GPU"], "fa4": False, "host": "h", "python": "3", "torch": "t", "triton": "x",
            "flash_attn_4": "no"}
    monkeypatch.setattr(mod, "machine", lambda: info)
    monkeypatch.setattr(mod, "synth", lambda *a, **k: None)
    monkeypatch.setattr(mod, "preset_row", preset_row)
    monkeypatch.setattr(mod, "mask_row", lambda out: (ran.append("mask"), mod.Row("mask", "PASS", 1, "m"))[1])
    monkeypatch.setattr(mod, "pytest_row", lambda out: mod.Row("pytest", "PASS", 1, "p"))
    monkeypatch.setattr(mod, "ablate_rows", lambda d, out: [mod.Row("ablate run", "PASS", 1, "a")])
    monkeypatch.setattr(mod, "script_row", lambda out: mod.Row("ablate script", "PASS", 1, "s"))
    mod.ran = ran
    yield mod
    sys.modules.pop("gpu_acceptance", None)


def _args(tmp_path, commit, *extra):
    return ["--out", str(tmp_path / "out"), "--doc", str(tmp_path / "doc.md"), "--commit", commit,
            "--state", str(tmp_path / "state.json"), *extra]


def test_resume_reruns_only_what_did_not_pass(ga, tmp_path):
    assert ga.main(_args(tmp_path, "abc")) == 1  # small · flex failed
    first = list(ga.ran)
    assert "mask" in first and "small · flex" in first
    ga.ran.clear()
    assert ga.main(_args(tmp_path, "abc", "--resume")) == 0
    assert ga.ran == ["small · flex"]  # only the failed job ran again
    doc = (tmp_path / "doc.md").read_text()
    assert "over 2 calls" in doc and "**PASS**" in doc
    assert "| small · flex | PASS | 1 | ok (call 2) |" in doc
    assert "| mask | PASS | 1 | m (call 1) |" in doc


def test_resume_at_another_commit_runs_everything(ga, tmp_path):
    ga.main(_args(tmp_path, "abc"))
    ga.ran.clear()
    assert ga.main(_args(tmp_path, "def", "--resume")) == 0
    assert "mask" in ga.ran and "small · sdpa" in ga.ran
    assert "over 2 calls" not in (tmp_path / "doc.md").read_text()
