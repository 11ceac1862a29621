"""The results table: numbers against scipy/statsmodels, rendering against golden files, CLI.

    python -m pytest tests/ablate/test_tables.py -q
    python tests/ablate/test_tables.py --update-golden     # after an intended format change

Golden files live in tests/ablate/golden/; a diff there is a decision, review it.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for `python tests/ablate/test_tables.py`

from ablate import tables  # noqa: E402
from ablate.sequential import SeqPlan  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"

# six seeds per arm, fixed numbers; seed s ran in round s on node-a (even) / node-b (odd)
LOSS = {
    "baseline": [3.2791, 3.2775, 3.2803, 3.2786, 3.2797, 3.2779],
    "lr-0.03": [3.2770, 3.2761, 3.2783, 3.2769, 3.2758, 3.2774],
    "fast": [3.2795, 3.2781, 3.2799, 3.2790, 3.2784],
}
TIME_S = {
    "baseline": [131.21, 131.28, 131.19, 131.25, 131.17, 131.30],
    "lr-0.03": [131.18, 131.31, 131.16, 131.27, 131.20, 131.24],
    "fast": [130.62, 130.71, 130.58, 130.66, 130.60],
}


def runs_frame(nodes: bool = True) -> pd.DataFrame:
    rows, order = [], 0
    for seed in range(6):
        for arm in LOSS:
            ok = seed < len(LOSS[arm])
            rows.append(dict(
                experiment="golden", arm=arm, seed=seed, run_id=f"{arm}-s{seed}-abc123-a0", attempt=0,
                round=seed, order=order, source="ablate", status="ok" if ok else "failed",
                error=None if ok else "exit 1: NCCL watchdog timeout",
                final_val_loss=LOSS[arm][seed] if ok else None,
                train_time_ms=TIME_S[arm][seed] * 1000 if ok else None,
                node_id=("node-a" if seed % 2 == 0 else "node-b") if nodes else None, hostname=None))
            order += 1
    return pd.DataFrame(rows)


def settings_paired() -> tables.Settings:
    return tables.Settings(baseline="baseline", target=3.28, alternative="two-sided", correction="holm")


def settings_welch() -> tables.Settings:
    return tables.Settings(baseline="baseline", target=None, alternative="less", correction="bh")


def paired_table() -> pd.DataFrame:
    s = settings_paired()
    return tables.table_from_runs(runs_frame(), s.baseline, s.target, s.alternative, s.correction)


def welch_table() -> pd.DataFrame:
    s = settings_welch()
    return tables.table_from_runs(runs_frame(nodes=False), s.baseline, s.target, s.alternative, s.correction)


def rendered() -> dict[str, str]:
    return {
        "paired.md": tables.format_table(paired_table(), settings_paired(), "md", "golden"),
        "paired.csv": tables.format_table(paired_table(), settings_paired(), "csv", "golden"),
        "paired.json": tables.format_table(paired_table(), settings_paired(), "json", "golden"),
        "welch_bh.md": tables.format_table(welch_table(), settings_welch(), "md", "golden"),
        "welch_bh.csv": tables.format_table(welch_table(), settings_welch(), "csv", "golden"),
    }


# ---------------------------------------------------------------- numbers

def test_rows_order_counts_and_summaries():
    t = paired_table()
    assert list(t["arm"]) == ["baseline", "lr-0.03", "fast"]
    fast = t.set_index("arm").loc["fast"]
    assert (fast["runs"], fast["failed"]) == (5, 1)
    assert fast["loss_mean"] == pytest.approx(np.mean(LOSS["fast"]))
    assert fast["time_std"] == pytest.approx(np.std(TIME_S["fast"], ddof=1))


def test_paired_comparison_and_holm_match_scipy_statsmodels():
    t = paired_table().set_index("arm")
    assert t.loc["lr-0.03", "loss_method"] == "paired" and t.loc["lr-0.03", "n_pairs"] == 6
    raw = {a: sps.ttest_rel(LOSS[a], LOSS["baseline"][: len(LOSS[a])]).pvalue for a in ("lr-0.03", "fast")}
    assert t.loc["lr-0.03", "loss_p_raw"] == pytest.approx(raw["lr-0.03"], rel=1e-10)
    assert t.loc["fast", "loss_p_raw"] == pytest.approx(raw["fast"], rel=1e-10)
    holm = multipletests([raw["lr-0.03"], raw["fast"]], method="holm")[1]
    assert list(t.loc[["lr-0.03", "fast"], "loss_p"]) == pytest.approx(list(holm), rel=1e-10)
    assert t.loc["baseline", "p_target"] == pytest.approx(
        sps.ttest_1samp(LOSS["baseline"], 3.28, alternative="less").pvalue)


def test_welch_one_sided_and_bh():
    t = welch_table().set_index("arm")
    assert t.loc["fast", "time_method"] == "welch"
    ref = {a: sps.ttest_ind(TIME_S[a], TIME_S["baseline"], equal_var=False, alternative="less").pvalue
           for a in ("lr-0.03", "fast")}
    assert t.loc["fast", "time_p_raw"] == pytest.approx(ref["fast"], rel=1e-10)
    bh = multipletests([ref["lr-0.03"], ref["fast"]], method="fdr_bh")[1]
    assert list(t.loc[["lr-0.03", "fast"], "time_p"]) == pytest.approx(list(bh), rel=1e-10)
    assert np.isnan(t.loc["fast", "p_target"])


def test_verdicts_in_plain_words():
    v = paired_table().set_index("arm")["verdict"]
    assert v["baseline"].startswith("baseline; ")
    assert v["fast"].startswith("faster, p")
    assert "lower loss, p" in v["lr-0.03"]
    assert "no detectable time change" in v["lr-0.03"] or "time: needs ~" in v["lr-0.03"]


def test_more_runs_suggested_when_underpowered():
    runs = runs_frame(nodes=False)
    runs = runs[runs["seed"] < 3]          # 3 seeds: loss Δ of lr-0.03 not yet detectable
    t = tables.table_from_runs(runs, "baseline", None, "two-sided", "holm").set_index("arm")
    assert "loss: needs ~" in t.loc["lr-0.03", "verdict"]
    need = t.loc["lr-0.03", "loss_runs_needed"]
    assert f"~{int(need) - 3} more runs per arm" in t.loc["lr-0.03", "verdict"]


def test_missing_baseline_is_explained_not_fatal():
    t = tables.table_from_runs(runs_frame(), "control", None, "two-sided", "holm")
    md = tables.to_markdown(t, tables.Settings(baseline="control"))
    assert "No arm named `control`" in md and "--baseline" in md
    assert t["loss_p"].isna().all()


def test_sequential_p_values_replace_fixed_ones():
    plan = SeqPlan(3, 8, 0.05)
    t = tables.table_from_runs(runs_frame(), "baseline", None, "two-sided", "holm", sequential=plan)
    s = t.set_index("arm")
    assert s.loc["fast", "time_decision"] == "efficacy"
    fixed = paired_table().set_index("arm")
    assert s.loc["fast", "time_p_raw"] != fixed.loc["fast", "time_p_raw"]
    assert 0 <= s.loc["fast", "time_p_raw"] < 0.05
    md = tables.to_markdown(t, tables.Settings(sequential=plan))
    assert "group-sequential p-values" in md and "needs ~" not in md


# ---------------------------------------------------------------- rendering

@pytest.mark.parametrize("name", ["paired.md", "paired.csv", "paired.json", "welch_bh.md", "welch_bh.csv"])
def test_golden(name):
    expected = (GOLDEN / name).read_text()
    assert rendered()[name] == expected, (f"{name} changed; if intended, run: "
                                          "python tests/ablate/test_tables.py --update-golden")


def test_json_is_valid_and_has_no_nan():
    doc = json.loads(rendered()["paired.json"])
    assert doc["baseline"] == "baseline" and doc["target"] == 3.28
    assert [a["arm"] for a in doc["arms"]] == ["baseline", "lr-0.03", "fast"]
    assert doc["arms"][0]["loss_p"] is None          # NaN → null


def test_rich_table_has_the_record_layout():
    from rich.console import Console

    t = tables.format_table(paired_table(), settings_paired(), "rich", "golden")
    assert [c.header for c in t.columns] == tables.LAYOUT
    console = Console(width=250, record=True)
    console.print(t)
    text = console.export_text()
    assert "5 (+1 failed)" in text and "faster, p" in text


# ---------------------------------------------------------------- store and CLI

def full_row(r: dict) -> dict:
    now = datetime(2026, 11, 22, tzinfo=timezone.utc)
    return {**dict(schema_version=1, attempt=0, source="ablate", search_trial=None, config_hash="abc123",
                   config_json="{}", overrides_json="{}", steps=2160, tokens=None, peak_mem_mib=None,
                   warmup_s=None, compile_s=None, world_size=8, node_ip=None, hostname=None, gpu_model="H100",
                   gpu_count=8, gpu_uuids="", python_version="3.12", torch_version="2.10", triton_version=None,
                   cuda_version=None, driver=None, git_commit=None, ablate_version="0.1.0", started_at=now,
                   ended_at=now, launch_s=None, wall_s=140.0), **r}


@pytest.fixture
def store(tmp_path):
    from ablate.store import Store

    st = Store(str(tmp_path / "results"))
    for r in runs_frame().to_dict("records"):
        r = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        st.write_run(full_row(r), [], [])
    st.write_bytes("golden", "spec.yaml", yaml.safe_dump({"name": "golden", "baseline": "baseline",
                                                          "target_loss": 3.28}).encode())
    return st


def test_render_table_reads_spec_and_matches_golden(store):
    assert tables.render_table(store, "golden", "md") == (GOLDEN / "paired.md").read_text()
    out = tables.render_table(store, "golden", "md", baseline="lr-0.03", target=3.3)
    assert "Δ = arm − `lr-0.03`" in out and "3.3" in out


def test_cli_table(store):
    import typer
    from typer.testing import CliRunner

    from ablate.cli_analysis import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["table", "golden", "--store", store.uri, "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.stdout == (GOLDEN / "paired.csv").read_text()
    res = runner.invoke(app, ["table", "golden", "--store", store.uri, "--format", "json"])
    assert json.loads(res.stdout)["experiment"] == "golden"
    res = runner.invoke(app, ["table", "golden", "--store", store.uri, "--format", "html"])
    assert res.exit_code == 2 and "--format" in res.output
    res = runner.invoke(app, ["table", "nope", "--store", store.uri, "--format", "md"])
    assert res.exit_code == 1 and "experiments: golden" in res.output


if __name__ == "__main__":
    if "--update-golden" in sys.argv:
        GOLDEN.mkdir(exist_ok=True)
        for name, text in rendered().items():
            (GOLDEN / name).write_text(text)
            print(f"wrote {GOLDEN / name}")
