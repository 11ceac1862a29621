"""End to end: Optuna search through Ray Tune and the real trainer on CPU (tiny preset).

    python -m pytest tests/ablate/test_search_e2e.py -q -m e2e       # ~3 min on 2 cores

One shared sweep, experiments/lr_mul_search_tiny.yaml (4 suggestions × 2 seeds, 2 gloo ranks per
run, then the best suggestion vs baseline on 2 fresh seeds), run in two sessions: a driver
subprocess is stopped with SIGTERM in the middle of the second suggestion, then the search is
resumed in-process. Every assertion about the sweep, the resume and the confirmation reads that
one store. A separate 3-run sweep checks the two-objective Pareto front.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ablate.search.driver import arm_name, run_search
from ablate.search.report import search_table
from ablate.analysis.tables import read_experiment
from ablate.spec.search_space import base_values
from ablate.spec.model import load_spec, parse_spec
from ablate.store.parquet import Store
from ablate.search.study import pareto_front

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "lr_mul_search_tiny.yaml"

DRIVER = """
import sys
from ablate.errors import Interrupted
from ablate.search.driver import run_search
from ablate.spec.model import load_spec
from ablate.store.parquet import Store
try:
    run_search(load_spec(sys.argv[1]), Store(sys.argv[2]))
except Interrupted:
    sys.exit(130)
"""


def _study(store_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{store_dir}/{name}/optuna.db")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Run the tiny sweep, interrupted once; return what each session left behind."""
    store_dir = tmp_path_factory.mktemp("search-store")
    spec = load_spec(TINY)
    store = Store(str(store_dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(TINY), str(store_dir)], cwd=str(ROOT), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        # 3 ok runs = suggestion 0 on both seeds and suggestion 1 on seed 0; seed 1 is in flight
        while time.time() < deadline and proc.poll() is None:
            runs = store.runs(spec.name)
            if len(runs) and ((runs["status"] == "ok") & (runs["source"] == "search")).sum() >= 3:
                break
            time.sleep(0.3)
        assert proc.poll() is None, f"driver ended before the interrupt:\n{proc.stderr.read()[-3000:]}"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = store.runs(spec.name)
    study = _study(store_dir, spec.name)
    states_before = {t.number: t.state for t in study.trials}
    outcome = run_search(load_spec(TINY), store)
    return {"spec": spec, "store": store, "dir": store_dir, "rc": rc, "before": before,
            "states_before": states_before, "outcome": outcome, "after": store.runs(spec.name)}


def test_interrupt_left_a_resumable_study(sweep):
    assert sweep["rc"] == 130  # Interrupted: SIGTERM → graceful stop
    states = sweep["states_before"]
    assert states[0] == TrialState.COMPLETE
    assert TrialState.RUNNING in states.values()  # the suggestion whose seed 1 was in flight
    assert len(states) <= 3


def test_sweep_four_suggestions_two_seeds(sweep):
    spec, store_dir = sweep["spec"], sweep["dir"]
    cfg = spec.search_config()
    study = _study(store_dir, spec.name)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]  # nothing re-suggested at a new number
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    runs = sweep["after"]
    search = runs[(runs["source"] == "search") & (runs["status"] == "ok")]
    for t in study.trials:
        mine = search[search["search_trial"] == t.number]
        assert sorted(mine["seed"]) == [0, 1] and set(mine["arm"]) == {arm_name(t.number)}
        assert t.value == pytest.approx(mine["final_val_loss"].mean(), rel=1e-12)
        assert t.user_attrs["n"] == 2
        # the run really trained with the suggested values
        cfg_json = json.loads(mine["config_json"].iloc[0])
        ov = cfg.to_overrides(t.params)
        assert cfg_json["optim"]["lr_mul"]["attn"] == pytest.approx(ov["optim.lr_mul.attn"])
        assert cfg_json["schedule"]["ws_schedule"] == ov["schedule.ws_schedule"]
    # suggestion 0 is the record's own values (enqueued baseline)
    base = cfg.encode(base_values(cfg, spec.resolve(spec.baseline)))
    assert study.trials[0].params == base
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 4


def test_resume_repeats_no_run(sweep):
    before, after = sweep["before"], sweep["after"]
    ok_before = before[before["status"] == "ok"]
    ok_after = after[after["status"] == "ok"]
    # every (arm, seed) has exactly one ok run, and the runs finished before the interrupt are those
    assert not ok_after.duplicated(["arm", "seed"]).any()
    kept = ok_after.set_index("run_id").loc[ok_before["run_id"]]
    assert (kept["final_val_loss"].to_numpy() == ok_before["final_val_loss"].to_numpy()).all()
    assert (after["status"] == "cancelled").sum() <= 1  # only the run killed by the interrupt
    assert set(after["status"]) <= {"ok", "cancelled"}
    assert 0 not in sweep["outcome"].evaluated  # the finished suggestion was not evaluated again
    reused = [r for r in sweep["outcome"].results if r.reused and r.request.source == "search"]
    assert reused and {r.run_id for r in reused} <= set(ok_before["run_id"])  # seed 0 of the cut suggestion
    assert len(after[(after["source"] == "search") & (after["status"] == "ok")]) == 8


def test_confirmation_runs_best_against_baseline(sweep):
    spec, store_dir = sweep["spec"], sweep["dir"]
    study = _study(store_dir, spec.name)
    # the best suggestion that is not the baseline config itself (t0 is the baseline's values)
    best = min((t for t in study.trials if t.number != 0), key=lambda t: t.value)
    assert study.user_attrs["confirmed"] == [best.number] == sweep["outcome"].confirmed
    conf = sweep["after"][sweep["after"]["source"] == "ablate"]
    assert sorted(zip(conf["arm"], conf["seed"])) == sorted(
        [("baseline", 1000), ("baseline", 1001), (arm_name(best.number), 1000), (arm_name(best.number), 1001)])
    assert (conf["status"] == "ok").all()
    # interleaved: seed 1000 of both arms before seed 1001 of either
    order = conf.sort_values("order")
    assert list(order["seed"]) == [1000, 1000, 1001, 1001]


def test_table_lists_trials_then_confirmation(sweep):
    spec, store = sweep["spec"], sweep["store"]
    doc = json.loads(search_table(read_experiment(store, spec.name), "json"))
    trials = doc["trials"]
    assert sorted(t["trial"] for t in trials) == [0, 1, 2, 3]
    assert all(t["state"] == "COMPLETE" and t["n"] == 2 for t in trials)
    losses = [t["loss_mean"] for t in trials]
    assert losses == sorted(losses)  # best first
    assert [t["trial"] for t in trials if t["confirmed"]] == sweep["outcome"].confirmed
    arms = [a["arm"] for a in doc["confirmation"]["arms"]]
    assert arms == ["baseline", arm_name(sweep["outcome"].confirmed[0])]
    md = search_table(read_experiment(store, spec.name), "md")
    assert "search trials" in md and "confirmation" in md and "| t3 |" in md


def test_two_objectives_give_a_pareto_front(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    data["name"] = "lr_mul_search_tiny_mo"
    data["search"].update(trials=3, seeds_per_trial=1, sampler="nsga2", population_size=2,
                          objectives=["val_loss", "train_time"])
    del data["search"]["confirm"]
    spec = parse_spec(data)
    store = Store(str(tmp_path))
    out = run_search(spec, store)
    study = _study(tmp_path, spec.name)
    assert len(study.directions) == 2 and out.complete == 3 and out.confirmed == []
    front = pareto_front(study)
    assert front and all(t.state == TrialState.COMPLETE for t in front)
    runs = store.runs(spec.name)
    for t in study.trials:
        row = runs[(runs["search_trial"] == t.number) & (runs["status"] == "ok")].iloc[0]
        assert t.values == pytest.approx([row["final_val_loss"], row["train_time_ms"] / 1000.0])
    doc = json.loads(search_table(read_experiment(store, spec.name), "json"))
    assert sorted(t["trial"] for t in doc["trials"] if t["pareto"]) == sorted(t.number for t in front)
