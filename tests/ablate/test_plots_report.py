"""Figures (values behind them, PNG output) and report.md, from frames and through a Store.

    python -m pytest tests/ablate/test_plots_report.py -q
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from scipy import stats as sps

from ablate.analysis import plots

from ablate.analysis import report

from ablate.cli import results

from ablate.analysis import tables
from ablate.spec.model import parse_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VAL_STEPS = [0, 500, 1000, 1500, 2000]


def frames():
    """3 arms × 4 seeds; fast/s3 failed; seed 2 of lr-0.03 stalls at step 1201; s3 runs on torch 2.11."""
    runs, curves, steps, order = [], [], [], 0
    finals = {"baseline": 3.2790, "lr-0.03": 3.2770, "fast": 3.2795}
    times = {"baseline": 131.2, "lr-0.03": 131.1, "fast": 130.6}
    for seed in range(4):
        for arm in finals:
            rid = f"{arm}-s{seed}-h-a0"
            failed = arm == "fast" and seed == 3
            loss = finals[arm] + 0.0004 * (seed - 1.5)
            t_ms = (times[arm] + 0.02 * seed) * 1000
            runs.append(dict(experiment="e", arm=arm, seed=seed, run_id=rid, status="failed" if failed else "ok",
                             error="exit 1: CUDA error" if failed else None,
                             final_val_loss=None if failed else loss, train_time_ms=t_ms, round=seed,
                             order=order, node_id="n1", hostname=None, source="ablate", steps=2000,
                             gpu_model="NVIDIA H100 80GB HBM3", gpu_count=8,
                             torch_version="2.11.0" if seed == 3 else "2.10.0"))
            order += 1
            for st in VAL_STEPS:
                curves.append(dict(run_id=rid, experiment="e", arm=arm, seed=seed, step=st,
                                   val_loss=loss + 7.5 * np.exp(-st / 300), train_time_ms=t_ms * st / 2000))
            for st in range(1, 2001, 100):
                ms = 60.0 + 0.1 * seed + (500 if st == 1 else 0) + (120 if (arm == "lr-0.03" and seed == 2
                                                                            and st == 1201) else 0)
                steps.append(dict(run_id=rid, experiment="e", arm=arm, seed=seed, step=st, step_ms=ms,
                                  train_time_ms=ms * st))
    return pd.DataFrame(runs), pd.DataFrame(curves), pd.DataFrame(steps)


def test_curve_bands_mean_and_t_interval():
    runs, curves, _ = frames()
    ok = curves[curves["run_id"].isin(set(runs.loc[runs["status"] == "ok", "run_id"]))]
    b = plots.curve_bands(ok).set_index(["arm", "step"])
    vals = ok[(ok["arm"] == "baseline") & (ok["step"] == 2000)]["val_loss"].to_numpy()
    row = b.loc[("baseline", 2000)]
    assert row["n"] == 4 and row["mean"] == pytest.approx(vals.mean())
    lo, hi = sps.t.interval(0.95, 3, loc=vals.mean(), scale=sps.sem(vals))
    assert row["half"] == pytest.approx((hi - lo) / 2)
    assert b.loc[("fast", 2000), "n"] == 3                     # the failed run is not in the band
    assert row["time_s"] == pytest.approx(np.mean([131.2 + 0.02 * s for s in range(4)]))


@pytest.mark.parametrize("x", ["step", "time"])
def test_curves_figure_draws_each_ok_arm(x):
    runs, curves, _ = frames()
    fig = plots.curves_figure(curves, runs, x, baseline="baseline")
    full, zoom = fig.axes
    assert [t.get_text() for t in full.get_legend().get_texts()] == ["baseline (n=4)", "lr-0.03 (n=4)", "fast (n=3)"]
    assert len(full.lines) == 3 and len(zoom.lines) == 3
    xs = full.lines[0].get_xdata()
    expected = VAL_STEPS if x == "step" else [131.23 * s / 2000 for s in VAL_STEPS]
    assert list(xs) == pytest.approx(expected)
    assert plots.to_png(fig).startswith(PNG_MAGIC)


def test_curves_figure_rejects_bad_axis():
    runs, curves, _ = frames()
    with pytest.raises(ValueError, match="'step' or 'time'"):
        plots.curves_figure(curves, runs, "tokens")


def test_finals_figure_points_and_means():
    runs, _, _ = frames()
    fig = plots.finals_figure(runs, target=3.28, baseline="baseline")
    ax_loss, ax_time = fig.axes
    n_points = sum(len(c.get_offsets()) for c in ax_loss.collections if isinstance(c, PathCollection))
    assert n_points == 11                                     # 12 runs, one failed
    assert [t.get_text() for t in ax_loss.get_xticklabels()] == ["baseline\n(n=4)", "lr-0.03\n(n=4)", "fast\n(n=3)"]
    assert any(abs(line.get_ydata()[0] - 3.28) < 1e-12 for line in ax_loss.lines)   # target line
    ok = runs[runs["status"] == "ok"]
    for ax, col, scale in ((ax_loss, "final_val_loss", 1.0), (ax_time, "train_time_ms", 1e-3)):
        # mean ± 95% CI per arm (error bars), the baseline's mean as a reference line
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 3
        vals = ok.loc[ok["arm"] == "fast", col].to_numpy() * scale
        lo, hi = sps.t.interval(0.95, len(vals) - 1, loc=vals.mean(), scale=sps.sem(vals))
        seg = bars[2].lines[2][0].get_segments()[0]
        assert (seg[0][1], seg[1][1]) == (pytest.approx(lo), pytest.approx(hi))
        base_mean = ok.loc[ok["arm"] == "baseline", col].mean() * scale
        assert any(line.get_label().startswith("baseline mean") and line.get_ydata()[0] == pytest.approx(base_mean)
                   for line in ax.lines)
    assert plots.to_png(fig).startswith(PNG_MAGIC)


def test_stalls_found_and_step_one_ignored():
    _, _, steps = frames()
    st = plots.stalls(steps)
    assert list(zip(st["run_id"], st["step"])) == [("lr-0.03-s2-h-a0", 1201)]
    png = plots.to_png(plots.step_times_figure(steps, frames()[0]))
    assert png.startswith(PNG_MAGIC)


def test_stalls_compare_a_step_with_its_own_batch_size_stage():
    """Three stages of 30, 60 and 100 ms (a batch-size schedule) and one real stall at step 700:
    only the stall is marked, not every step of the slower later stages."""
    ms = [30.0] * 400 + [60.0] * 400 + [100.0] * 400
    ms[699] = 150.0                                     # step 700: 2.5× its stage, < 1.5× the last stage
    steps = pd.DataFrame({"run_id": "r", "arm": "a", "seed": 0, "step": range(1, 1201), "step_ms": ms})
    st = plots.stalls(steps)
    assert list(st["step"]) == [700] and st["ref_ms"].iloc[0] == 60.0


def test_stalls_on_a_record_log():
    """A 2026-07-17 record log (stages of ~31, 57 and 83 ms): two slow steps right after an eval,
    not the 38 last-stage steps a run-wide median marks."""
    from ablate.store.importlogs import parse_log

    log = parse_log((Path(__file__).parent / "fixtures" / "record_log" / "fp8_9829ec4f.txt").read_bytes())
    steps = pd.DataFrame(log.steps).assign(run_id="r", arm="record", seed=0)
    assert list(plots.stalls(steps)["step"]) == [251, 501]


def test_a_single_eval_point_in_the_zoom_still_draws():
    """Evals at 0, 500, 1000 and 2000: only the final one lies in the last 30%."""
    runs, curves, _ = frames()
    curves = curves[curves["step"] != 1500]
    fig = plots.curves_figure(curves, runs, "step", baseline="baseline")
    _, zoom = fig.axes
    drawn = [line for line in zoom.lines if line.get_marker() == "o"]
    assert len(drawn) == 3 and all(list(line.get_xdata()) == [2000] for line in drawn)
    assert sum(isinstance(c, ErrorbarContainer) for c in zoom.containers) == 3    # the CI as an error bar


def test_report_files_content():
    runs, curves, steps = frames()
    settings = tables.settings_from_spec(None, target=3.28)
    table = tables.table_from_runs(runs, settings)
    spec = parse_spec({"name": "e", "description": "Muon lr sweep", "trainer": {"preset": "speedrun"},
                       "arms": {"baseline": {}}, "seeds": 2})
    files = report.report_files("e", table, settings, runs, curves, steps, spec)
    assert set(files) == {"report.md", *report.FIGURES}
    assert all(files[name].startswith(PNG_MAGIC) for name in report.FIGURES)
    md = files["report.md"].decode()
    assert md.startswith("# Experiment `e`") and "Muon lr sweep" in md and "Trainer preset `speedrun`" in md
    assert tables.to_markdown(table, settings).strip() in md
    for name in report.FIGURES:
        assert f"]({name})" in md
    assert "`fast-s3-h-a0` (failed): exit 1: CUDA error" in md
    assert "| `lr-0.03-s2-h-a0` | 1201 |" in md
    assert "mix 2 torch versions" in md


def test_write_report_through_store_and_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from ablate.cli.analysis import register
    from ablate.store.parquet import Store

    store = Store(str(tmp_path / "res"))
    runs, curves, steps = frames()
    now = datetime(2026, 11, 22, tzinfo=timezone.utc)
    for r in runs.to_dict("records"):
        r = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        row = dict(schema_version=1, attempt=0, search_trial=None, config_hash="h", config_json="{}",
                   overrides_json="{}", tokens=None, peak_mem_mib=None, warmup_s=None, compile_s=None,
                   world_size=8, node_ip=None, gpu_uuids="", python_version=None, triton_version=None,
                   cuda_version=None, driver=None, git_commit=None, ablate_version="0.1.0", started_at=now,
                   ended_at=now, launch_s=None, wall_s=140.0, **r)
        store.write_run(row, curves[curves["run_id"] == r["run_id"]].to_dict("records"),
                        steps[steps["run_id"] == r["run_id"]].to_dict("records"))
    written = report.write_report(tables.read_experiment(store, "e"))
    assert set(written) == {"report.md", *report.FIGURES}
    assert store.read_bytes("e", "curves_time.png").startswith(PNG_MAGIC)
    assert b"## Results" in store.read_bytes("e", "report.md")

    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["report", "e", "--store", store.uri, "--target", "3.28"])
    assert res.exit_code == 0, res.output
    assert res.output.count("wrote ") == 5
    assert b"p(<target)" in store.read_bytes("e", "report.md") and b"3.28" in store.read_bytes("e", "report.md")


def test_report_on_imported_search_and_mixed_experiments(tmp_path):
    """Imported runs have no host (NaN under pandas 3), search experiments list their trials,
    and an experiment may hold both `ablate run` and imported runs."""
    from ablate.store.importlogs import import_logs
    from ablate.store.parquet import Store
    from tests.ablate.searchstore import row, write_search_experiment

    logs = Path(__file__).parent / "fixtures" / "logs"
    store = Store(str(tmp_path / "res"))
    import_logs(store, [logs], "imp", "record")
    written = report.write_report(tables.read_experiment(store, "imp"), target=3.28)
    md = store.read_bytes("imp", "report.md").decode()
    assert set(written) == {"report.md", *report.FIGURES}
    assert "| record | 2 (+1 failed) |" in md and "log ends at step 13/20" in md
    assert "| record | 0 | 0 | ok | 3.2791 | 1.6250 | 20 |" in md      # host unknown: "—", not a crash

    write_search_experiment(store, "srch")
    results.write_report(tables.read_experiment(store, "srch"))
    md = store.read_bytes("srch", "report.md").decode()
    assert "### srch: search trials" in md and "### srch: confirmation" in md
    assert "| t1 | COMPLETE | 0.03 | 2 | 3.4905 | 0.0007 | ✓ |" in md      # the trials listing
    assert "| t2 | FAIL | 0.04 | 1 |" in md                               # its seed 1 diverged
    assert "| t1 | 2 | 1.0000 |" in md                                    # the confirmation's t1 row

    runs, curves, steps = frames()
    for r in runs.to_dict("records"):
        r = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        store.write_run(row(**{**r, "experiment": "mix", "config_hash": "h", "run_id": r["run_id"]}),
                        curves[curves["run_id"] == r["run_id"]].to_dict("records"),
                        steps[steps["run_id"] == r["run_id"]].to_dict("records"))
    import_logs(store, [logs / "complete_a.txt", logs / "complete_b.txt"], "mix", "record")
    results.write_report(tables.read_experiment(store, "mix"))
    md = store.read_bytes("mix", "report.md").decode()
    assert "| record | 2 |" in md and "| baseline | 4 |" in md and "| import |" in md


def test_without_matplotlib_the_cli_works_and_report_names_the_extra(tmp_path):
    """matplotlib is the `report` extra: importing the CLI and running table/status must not need it;
    `ablate report` exits 1 with the install command, no traceback."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # `import matplotlib...` now raises ImportError
        "import ablate.cli, ablate.analysis.report, ablate.analysis.tables\n"
        "from ablate.analysis import plots\n"
        "try:\n    plots.curves_figure(None, None)\nexcept plots.PlotsUnavailable as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and 'pip install -e ".[report]"' in out.stdout
