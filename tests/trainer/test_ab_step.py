"""benchmarks/ab_step.py's pieces that need no GPU: the variant syntax, the paired summary, and the
clear refusal without a GPU.

    python -m pytest tests/trainer/test_ab_step.py -q
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ab_step  # noqa: E402


def test_variants_parse_into_set_overrides():
    assert ab_step.parse_variant("") == []
    assert ab_step.parse_variant("model.fused_qkv=true, model.fused_relu2=true") == [
        "model.fused_qkv=true", "model.fused_relu2=true"]
    with pytest.raises(SystemExit, match="not key=value"):
        ab_step.parse_variant("model.fused_qkv")


def test_summary_pairs_rounds_against_the_first_variant():
    rows = ab_step.summarize({"A": [100.0, 102.0, 101.0], "B": [98.0, 99.0, 100.0]})
    assert rows[0] == ("A", 101.0, 1.0, 1.0, 1.0)
    name, med, ratio, lo, hi = rows[1]
    assert name == "B" and med == 99.0
    # per round: 98/100, 99/102, 100/101 — paired by position, not medians over medians
    assert ratio == pytest.approx(0.98) and lo == pytest.approx(99 / 102) and hi == pytest.approx(100 / 101)


def test_one_variant_is_a_usage_error_and_no_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        ab_step.main(["--variant", ""])
    import torch

    if not torch.cuda.is_available():
        assert ab_step.main(["--variant", "", "--variant", "model.fused_qkv=true"]) == 2
        assert "needs a GPU" in capsys.readouterr().err
