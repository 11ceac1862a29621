"""The results table: numbers against scipy/statsmodels, rendering against golden files, CLI.

    python -m pytest tests/ablate/test_tables.py -q
    python tests/ablate/test_tables.py --update-golden     # after an intended format change

Golden files live in tests/ablate/golden/; a diff there is a decision, review it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for `python tests/ablate/test_tables.py`

from ablate.cli import results

from ablate.analysis import tables
from ablate.analysis.sequential import SeqPlan  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"

# six seeds per arm, fixed numbers; seed s ran in round s on host node-a (even) / node-b (odd)
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
                round=seed, order=order, source="ablate", config_hash="abc123", status="ok" if ok else "failed",
                error=None if ok else "exit 1: NCCL watchdog timeout",
                final_val_loss=LOSS[arm][seed] if ok else None,
                train_time_ms=TIME_S[arm][seed] * 1000 if ok else None,
                node_id=None, hostname=("node-a" if seed % 2 == 0 else "node-b") if nodes else None,
                gpu_uuids="GPU-0,GPU-1" if nodes else ""))
            order += 1
    return pd.DataFrame(rows)


def model_settings(**changes) -> tables.Settings:
    """The analysis settings of a spec that sets nothing (the model's defaults), with `changes`."""
    return replace(tables.settings_from_spec(None), **changes)


def settings_paired() -> tables.Settings:
    return model_settings(baseline="baseline", target=3.28, alternative="two-sided", correction="holm")


def settings_welch() -> tables.Settings:
    return model_settings(baseline="baseline", target=None, alternative="less", correction="bh")


def paired_table() -> pd.DataFrame:
    return tables.table_from_runs(runs_frame(), settings_paired())


def welch_table() -> pd.DataFrame:
    return tables.table_from_runs(runs_frame(nodes=False), settings_welch())


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
    t = tables.table_from_runs(runs, model_settings()).set_index("arm")
    assert "loss: needs ~" in t.loc["lr-0.03", "verdict"]
    need = t.loc["lr-0.03", "loss_runs_needed"]
    assert f"~{int(need) - 3} more runs per arm" in t.loc["lr-0.03", "verdict"]


def test_missing_baseline_is_explained_not_fatal():
    t = tables.table_from_runs(runs_frame(), model_settings(baseline="control"))
    md = tables.to_markdown(t, model_settings(baseline="control"))
    assert "No arm named `control`" in md and "--baseline" in md
    assert t["loss_p"].isna().all()


def test_sequential_p_values_replace_fixed_ones():
    plan = SeqPlan(3, 8, 0.05, "baseline", None, "two-sided")
    t = tables.table_from_runs(runs_frame(), model_settings(sequential=plan))
    s = t.set_index("arm")
    assert s.loc["fast", "time_decision"] == "efficacy"
    fixed = paired_table().set_index("arm")
    assert s.loc["fast", "time_p_raw"] != fixed.loc["fast", "time_p_raw"]
    assert 0 <= s.loc["fast", "time_p_raw"] < 0.05
    md = tables.to_markdown(t, model_settings(sequential=plan))
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


def rich_text(df: pd.DataFrame, settings: tables.Settings, width: int) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, color_system=None)
    console.print(tables.format_table(df, settings, "rich", "golden"))
    return console.export_text()


def test_rich_table_has_the_record_layout():
    t = tables.format_table(paired_table(), settings_paired(), "rich", "golden")
    assert t.columns == tables.LAYOUT
    text = rich_text(paired_table(), settings_paired(), 250)
    header = next(line for line in text.splitlines() if "Arm" in line)
    assert [h.strip() for h in header.strip("┃ ").split("┃")] == tables.LAYOUT   # one table, verdicts inline
    assert "5 (+1 failed)" in text and "faster, p" in text


@pytest.mark.parametrize("width", [80, 120])
def test_rich_table_readable_at_80_and_120_columns(width):
    """No line wider than the console, no number cut ("4.…"), no verdict cut mid-word (they go
    below the table when they do not fit on its lines)."""
    df, settings = paired_table(), settings_paired()
    text = rich_text(df, settings, width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text
    words = set(text.split())
    for row in tables.display_rows(df, settings.target):
        for cell in row[1:11]:
            assert cell in text, f"cell {cell!r} not shown whole at {width} columns"
        assert set(row[11].split()) <= words, f"verdict of {row[0]} cut at {width} columns"
        assert f"{row[0]}: {row[11].split(';')[0]}" in text.replace("\n", " ")   # verdicts below the table
    assert "Verdict" not in text


def test_numbers_four_decimals_never_negative_zero():
    assert tables._num(132.72165, ".4f") == "132.7217"
    assert tables._num(-0.00001, ".4f", signed=True) == "0.0000"
    assert tables._num(0.0, ".4f", signed=True) == "0.0000"
    assert tables._num(-0.0002, ".4f", signed=True) == "-0.0002"
    runs = runs_frame(nodes=False)
    runs.loc[runs["arm"] == "lr-0.03", "train_time_ms"] = runs.loc[runs["arm"] == "baseline", "train_time_ms"].to_numpy() + 0.02
    md = tables.to_markdown(tables.table_from_runs(runs, model_settings()), model_settings())
    row = next(line for line in md.splitlines() if line.startswith("| lr-0.03"))
    assert "| 131.2334 |" in row and "| 0.0000 |" in row and "-0.0000" not in md


def test_csv_and_json_keep_full_precision():
    df, settings = paired_table(), settings_paired()
    import csv
    import io

    rows = {r["arm"]: r for r in csv.DictReader(io.StringIO(tables.to_csv(df, settings)))}
    t = df.set_index("arm")
    for arm in ("baseline", "lr-0.03", "fast"):
        assert float(rows[arm]["time_mean_s"]) == t.loc[arm, "time_mean"]          # exact, not 131.233
        assert float(rows[arm]["loss_std"]) == t.loc[arm, "loss_std"]
    assert float(rows["fast"]["time_p"]) == t.loc["fast", "time_p"] < 1e-4        # a number, not "<0.0001"
    doc = json.loads(tables.to_json(df, settings, "golden"))
    fast = next(a for a in doc["arms"] if a["arm"] == "fast")
    assert fast["time_mean"] == t.loc["fast", "time_mean"] and fast["time_p_raw"] == t.loc["fast", "time_p_raw"]


# ---------------------------------------------------------------- configs and divergence

def with_old_config(runs: pd.DataFrame) -> pd.DataFrame:
    """lr-0.03 also ran 4 seeds of an earlier override (config old000000000), much worse."""
    old = runs[(runs["arm"] == "lr-0.03") & (runs["seed"] < 4)].copy()
    old["config_hash"] = "old000000000"
    old["run_id"] = old["run_id"].str.replace("abc123", "old000000000")
    old["final_val_loss"] += 0.05
    old["order"] = old["order"] - 100          # launched before the current config
    return pd.concat([old, runs], ignore_index=True)


def test_table_compares_only_the_current_config_and_counts_the_rest():
    runs = with_old_config(runs_frame())
    for current in (None, {"lr-0.03": "abc123"}):       # latest run's config, or the spec's
        t = tables.table_from_runs(runs, model_settings(), current).set_index("arm")
        assert t.loc["lr-0.03", "runs"] == 6 and t.loc["lr-0.03", "left_out_runs"] == 4
        assert t.loc["lr-0.03", "loss_mean"] == pytest.approx(np.mean(LOSS["lr-0.03"]))
        assert t.loc["lr-0.03", "loss_p"] == paired_table().set_index("arm").loc["lr-0.03", "loss_p"]
    # the spec's hash wins over the latest run: an override reverted to its earlier value
    t = tables.table_from_runs(runs, model_settings(), {"lr-0.03": "old000000000"}).set_index("arm")
    assert t.loc["lr-0.03", "runs"] == 4 and t.loc["lr-0.03", "left_out_runs"] == 6
    md = tables.to_markdown(tables.table_from_runs(runs, model_settings()), model_settings())
    assert "Left out: lr-0.03 (4 run(s) of 1 older config(s))" in md and "--all-configs" in md


def test_all_configs_shows_each_config_as_a_row():
    runs = with_old_config(runs_frame())
    t = tables.table_from_runs(runs, model_settings(all_configs=True))
    assert list(t["arm"]) == ["baseline", "lr-0.03", "lr-0.03@old000000000", "fast"]
    s = t.set_index("arm")
    assert (s.loc["lr-0.03", "runs"], s.loc["lr-0.03@old000000000", "runs"]) == (6, 4)
    assert s.loc["lr-0.03@old000000000", "config_hash"] == "old000000000"
    assert s.loc["lr-0.03@old000000000", "loss_delta"] > 0.04
    assert (t["left_out_runs"] == 0).all()


def test_diverged_runs_are_counted_in_the_table_and_the_verdict():
    runs = runs_frame()
    extra = runs[(runs["arm"] == "lr-0.03") & (runs["seed"] < 2)].copy()
    extra = extra.assign(seed=extra["seed"] + 10, run_id=extra["run_id"] + "-d", status="diverged",
                         final_val_loss=None, error="diverged: val_loss is not finite at step 500",
                         order=extra["order"] + 100)
    runs = pd.concat([runs, extra], ignore_index=True)
    t = tables.table_from_runs(runs, model_settings(target=3.28))
    s = t.set_index("arm")
    assert s.loc["lr-0.03", "diverged"] == 2 and s.loc["lr-0.03", "runs"] == 6
    assert s.loc["lr-0.03", "verdict"].startswith("diverged 2/8; ")
    settings = model_settings(target=3.28)
    md = tables.to_markdown(t, settings)
    assert "| lr-0.03 | 6 (+2 diverged) |" in md and "Diverged runs" in md
    import csv
    import io

    rows = {r["arm"]: r for r in csv.DictReader(io.StringIO(tables.to_csv(t, settings)))}
    assert rows["lr-0.03"]["diverged"] == "2" and rows["baseline"]["diverged"] == "0"


def test_mixed_data_sources_are_marked():
    """Runs that read different shards (data_synthetic / data_hash) mark the table: a first note
    naming each arm's data, the JSON flag and the rich title. One source, or unknown, is not mixed."""
    from rich.console import Console

    runs = runs_frame()
    runs["data_synthetic"] = pd.Series([False] * len(runs), dtype=object)  # nullable, as read from the store
    runs["data_hash"] = pd.Series(["aaaa111122223333"] * len(runs), dtype=object)
    one = tables.table_from_runs(runs, model_settings(target=3.28))
    assert not tables.mixed_data(one) and set(one["data"]) == {"non-synthetic aaaa111122223333"}
    assert not any("Mixed data" in n for n in tables.notes(one, settings_paired()))
    runs.loc[runs["arm"] == "fast", ["data_synthetic", "data_hash"]] = [True, "bbbb444455556666"]
    mixed = tables.table_from_runs(runs, model_settings(target=3.28))
    assert tables.mixed_data(mixed)
    first = tables.notes(mixed, settings_paired())[0]
    assert first.startswith("**Mixed data sources:**") and "fast: synthetic bbbb444455556666" in first
    assert json.loads(tables.format_table(mixed, settings_paired(), "json", "x"))["mixed_data"] is True
    console = Console(width=250, record=True)
    console.print(tables.format_table(mixed, settings_paired(), "rich", "x"))
    assert "MIXED DATA SOURCES" in console.export_text()
    # rows written before the columns existed (null) are unknown, not a second source
    runs.loc[runs["arm"] == "fast", ["data_synthetic", "data_hash"]] = [None, None]
    assert not tables.mixed_data(tables.table_from_runs(runs, model_settings(target=3.28)))


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
    from ablate.store.parquet import Store

    st = Store(str(tmp_path / "results"))
    for r in runs_frame().to_dict("records"):
        r = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        st.write_run(full_row(r), [], [])
    st.write_bytes("golden", "spec.yaml", yaml.safe_dump({"name": "golden", "baseline": "baseline",
                                                          "target_loss": 3.28}).encode())
    return st


def test_render_table_reads_spec_and_matches_golden(store):
    exp = tables.read_experiment(store, "golden")
    assert results.render_table(exp, "md") == (GOLDEN / "paired.md").read_text()
    out = results.render_table(exp, "md", baseline="lr-0.03", target=3.3)
    assert "Δ = arm − `lr-0.03`" in out and "3.3" in out


def test_cli_table(store):
    import typer
    from typer.testing import CliRunner

    from ablate.cli.analysis import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["table", "golden", "--store", store.uri, "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.stdout == (GOLDEN / "paired.csv").read_text()
    # the fixture's spec.yaml is no whole spec: a note naming what is used and the fix, no traceback
    assert "no longer validates" in res.stderr and "only its baseline, target_loss" in res.stderr
    assert "fix: " in res.stderr and "Traceback" not in res.output
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


def test_store_table_uses_the_stored_specs_config_hashes(tmp_path):
    """The spec says lr is 0.05; runs of an earlier (0.04) edit, launched later, are left out."""
    import typer
    from typer.testing import CliRunner

    from ablate.cli.analysis import register
    from ablate.spec.model import parse_spec_text
    from ablate.store.parquet import Store

    text = ("name: cfg\ntrainer: {preset: tiny}\narms: {baseline: {}, lr: {optim.muon.lr: 0.05}}\nseeds: 3\n"
            "resources: {gpus_per_run: 0}\n")
    spec = parse_spec_text(text)
    st = Store(str(tmp_path / "res"))
    st.write_bytes("cfg", "spec.yaml", text.encode())
    h_old = spec.config_hash("lr", {**spec.overrides("lr"), "optim.muon.lr": 0.04})
    order = 0
    for arm, h, loss in (("baseline", spec.config_hash("baseline"), 3.30), ("lr", spec.config_hash("lr"), 3.29),
                         ("lr", h_old, 3.50)):
        for seed in range(3):
            st.write_run(full_row(dict(experiment="cfg", arm=arm, seed=seed, run_id=f"{arm}-s{seed}-{h}-a1",
                                       round=0, order=order, config_hash=h, status="ok", error=None,
                                       final_val_loss=loss + 0.001 * seed, train_time_ms=1000.0 + seed,
                                       node_id=None, hostname="h", gpu_uuids="")), [], [])
            order += 1
    df, _ = tables.analyse(tables.read_experiment(st, "cfg"))
    lr = df.set_index("arm").loc["lr"]
    assert (lr["runs"], lr["left_out_runs"], lr["config_hash"]) == (3, 3, spec.config_hash("lr"))
    assert lr["loss_mean"] == pytest.approx(3.291)
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["table", "cfg", "--store", st.uri, "--format", "md", "--all-configs"])
    assert res.exit_code == 0, res.output
    assert f"| lr@{h_old} | 3 |" in res.stdout and "| lr | 3 |" in res.stdout


@pytest.mark.parametrize("width", [80, 120])
def test_search_trial_listing_readable_at_80_and_120_columns(tmp_path, width):
    from rich.console import Console

    from ablate.search.report import search_table
    from ablate.store.parquet import Store
    from tests.ablate.searchstore import write_wide_search

    st = Store(str(tmp_path / "res"))
    name = write_wide_search(st, str(Path(__file__).resolve().parents[2]))
    console = Console(width=width, record=True, color_system=None)
    console.print(search_table(tables.read_experiment(st, name), "rich"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width and "…" not in text
    for cell in ("0.5123", "3.512", "1.234", "2.718", "0.9877", "(2,3,4,5,6,8)", "4.5128", "4.5428", "COMPLETE"):
        assert cell in text


def test_pooled_gpu_counts_are_flagged():
    """Speedrun logs of 1-GPU (~595 s) and 8-GPU (~79 s) runs of one script in one arm."""
    runs = runs_frame().assign(gpu_count=8)
    runs.loc[(runs["arm"] == "lr-0.03") & (runs["seed"] < 2), "gpu_count"] = 1
    t = tables.table_from_runs(runs, model_settings())
    assert list(t["gpu_counts"]) == ["8", "1,8", "8"]
    md = tables.to_markdown(t, model_settings())
    assert "different GPU counts are pooled in lr-0.03 (1, 8 GPUs)" in md


# ---------------------------------------------------------------- spec parsed once, read once, resolved once

@pytest.fixture
def other_model_defaults():
    """The spec model's analysis defaults changed (baseline, alternative, correction, alpha,
    sequential alpha); put back after the test."""
    from ablate.spec.model import Analysis, SequentialSeeds, Spec

    changes = [(Analysis, "alternative", "less"), (Analysis, "correction", "bh"), (Analysis, "alpha", 0.01),
               (SequentialSeeds, "alpha", 0.02), (Spec, "baseline", "control")]
    saved = [(model, name, model.model_fields[name].default) for model, name, _ in changes]
    saved.append((Spec, "analysis", Spec.model_fields["analysis"].default))

    def apply(items):
        for model, name, value in items:
            model.model_fields[name].default = value
        for model in (Analysis, SequentialSeeds):
            model.model_rebuild(force=True)
        Spec.model_rebuild(force=True)

    apply(changes + [(Spec, "analysis", None)])
    Spec.model_fields["analysis"].default = Analysis()   # the field's default instance, rebuilt
    Spec.model_rebuild(force=True)
    yield
    apply(saved)


def test_no_default_of_the_spec_is_stated_twice(tmp_path, other_model_defaults):
    """Every analysis default comes from the pydantic model: changed there, it changes the table
    (no spec, a whole spec, a stored copy that no longer validates, the sequential plan)."""
    from ablate.spec.model import parse_spec, parse_stored_spec
    from ablate.store.parquet import Store

    want = ("control", None, "less", "bh", 0.01)
    got = tables.settings_from_spec(None)
    assert (got.baseline, got.target, got.alternative, got.correction, got.alpha) == want
    whole = parse_spec({"name": "x", "trainer": {"preset": "tiny"}, "arms": {"control": {}, "b": {}},
                        "seeds": {"min": 2, "max": 4}, "resources": {"gpus_per_run": 0}})
    old_copy = parse_stored_spec("name: x\nseeds: {min: 2, max: 4}\nretired_key: 1\n", "x", "x/spec.yaml")
    assert old_copy.spec is None and old_copy.kept == ("seeds",)
    for spec in (whole, old_copy.analysis):
        got = tables.settings_from_spec(spec)
        assert (got.baseline, got.target, got.alternative, got.correction, got.alpha) == want
        assert (got.sequential.alpha, got.sequential.baseline, got.sequential.alternative) == (0.02, "control", "less")
    # through the store and the CLI flags: the baseline flag still wins over the model's default
    st = Store(str(tmp_path / "res"))
    for r in runs_frame().assign(arm=lambda d: d["arm"].replace({"baseline": "control"})).to_dict("records"):
        st.write_run(full_row({k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}),
                     [], [])
    md = results.render_table(tables.read_experiment(st, "golden"), "md")
    assert "Δ = arm − `control`" in md and "Benjamini–Hochberg" in md and "α = 0.01" in md
    assert "one-sided (arm < baseline)" in md
    assert "Δ = arm − `fast`" in results.render_table(tables.read_experiment(st, "golden"), "md", baseline="fast")


def _one_per_command(monkeypatch):
    """Count, per CLI command, the runs-table reads of the store and the config resolutions."""
    from ablate.spec import model as spec_module
    from ablate.store.parquet import Store

    counts = {"reads": 0, "resolved": []}
    read, resolve = Store.read, spec_module.resolve_config

    def counting_read(self, experiment, dataset, *args, **kwargs):
        counts["reads"] += dataset == "runs"
        return read(self, experiment, dataset, *args, **kwargs)

    def counting_resolve(preset, overrides):
        counts["resolved"].append(json.dumps(overrides, sort_keys=True))
        return resolve(preset, overrides)

    monkeypatch.setattr(Store, "read", counting_read)
    monkeypatch.setattr(spec_module, "resolve_config", counting_resolve)
    return counts


CFG_SPEC = ("name: cfg\ntrainer: {preset: tiny}\narms: {baseline: {}, lr: {optim.muon.lr: 0.05}, "
            "wd: {optim.muon.weight_decay: 0.01}}\nseeds: 3\nresources: {gpus_per_run: 0}\n")


def _cfg_store(path: Path):
    from ablate.spec.model import parse_spec_text
    from ablate.store.parquet import Store

    spec = parse_spec_text(CFG_SPEC)
    st = Store(str(path))
    st.write_bytes("cfg", "spec.yaml", CFG_SPEC.encode())
    for i, (arm, seed) in enumerate((a, s) for s in range(3) for a in spec.arms):
        h = spec.config_hash(arm)
        st.write_run(full_row(dict(experiment="cfg", arm=arm, seed=seed, run_id=f"{arm}-s{seed}-{h}-a1", round=0,
                                   order=i, config_hash=h, status="ok", error=None,
                                   final_val_loss=3.3 + 0.01 * i, train_time_ms=1000.0 + i, node_id=None,
                                   hostname="h", gpu_uuids="")), [], [])
    return st, spec


@pytest.mark.parametrize("command", [["table", "cfg", "--format", "md"], ["status", "cfg"], ["report", "cfg"],
                                     ["run", "SPEC", "--dry-run"]])
def test_a_command_reads_the_runs_once_and_resolves_each_arm_once(tmp_path, monkeypatch, command):
    from typer.testing import CliRunner

    from ablate.cli.main import app

    st, spec = _cfg_store(tmp_path / "res")
    path = tmp_path / "cfg.yaml"
    path.write_text(CFG_SPEC)
    counts = _one_per_command(monkeypatch)
    args = [str(path) if a == "SPEC" else a for a in command] + ["--store", st.uri]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert counts["reads"] == 1, f"{command[0]} read the runs table {counts['reads']} times"
    assert sorted(counts["resolved"]) == sorted(json.dumps(spec.overrides(a), sort_keys=True) for a in spec.arms)


def test_the_table_after_a_run_reads_once_and_resolves_nothing_again(tmp_path, monkeypatch):
    """`ablate run` ends with the table: one read of the runs, the spec that ran (no re-parse)."""
    import io

    from rich.console import Console

    from ablate.cli import main as cli

    from ablate.spec.model import parse_spec_text

    st, _ = _cfg_store(tmp_path / "res")
    spec = parse_spec_text(CFG_SPEC)
    counts = _one_per_command(monkeypatch)
    monkeypatch.setattr(cli, "out", Console(width=250, record=True, color_system=None, file=io.StringIO()))
    cli.print_results_table(st, spec)
    assert counts == {"reads": 1, "resolved": []}
    text = cli.out.export_text()
    assert "│ lr " in text and "│ wd " in text and "Δ = arm − `baseline`" in text


def test_a_search_table_and_report_read_the_runs_once(tmp_path, monkeypatch):
    from ablate.analysis import report
    from ablate.store.parquet import Store
    from tests.ablate.searchstore import write_search_experiment

    st = Store(str(tmp_path / "res"))
    write_search_experiment(st, "srch")
    counts = _one_per_command(monkeypatch)
    exp = tables.read_experiment(st, "srch")
    assert "### srch: confirmation" in results.render_table(exp, "md")
    results.write_report(exp)
    assert counts["reads"] == 1
