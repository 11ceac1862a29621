"""Run matrix: seed-major interleaving, resume planning (skip ok, retry budget, changed hash), rows.

    python -m pytest tests/ablate/test_matrix.py -q
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd

from ablate.spec.matrix import expand, make_request, plan, resource_plan
from ablate.spec.model import parse_spec_text

SPEC = """\
name: m
trainer: {preset: tiny}
arms:
  baseline: {}
  a: {optim.muon.lr: 0.03}
  b: {optim.muon.lr: 0.04}
seeds: 3
retries: 1
resources: {gpus_per_run: 0, cpu_ranks_per_run: 2, cpus_per_run: 4}
"""


def test_expand_is_seed_major_with_arms_interleaved() -> None:
    spec = parse_spec_text(SPEC)
    reqs = expand(spec)
    assert [(r.arm, r.seed) for r in reqs] == [
        ("baseline", 0), ("a", 0), ("b", 0),
        ("baseline", 1), ("a", 1), ("b", 1),
        ("baseline", 2), ("a", 2), ("b", 2)]
    # the hash belongs to the arm, not the seed
    assert len({r.config_hash for r in reqs if r.arm == "a"}) == 1
    assert len({r.config_hash for r in reqs}) == 3
    # a subset of arms keeps spec order whatever order it is given in
    assert [r.arm for r in expand(spec, [5], ["b", "baseline"], round=2)] == ["baseline", "b"]
    assert {r.round for r in expand(spec, [5], ["b"], round=2)} == {2}


def test_sequential_first_round_and_rounds() -> None:
    spec = parse_spec_text(SPEC.replace("seeds: 3", "seeds: {min: 2, max: 5, alpha: 0.05}"))
    assert [(r.arm, r.seed) for r in expand(spec)][:4] == [("baseline", 0), ("a", 0), ("b", 0), ("baseline", 1)]
    assert len(expand(spec)) == 6


def test_make_request_and_run_id() -> None:
    spec = parse_spec_text(SPEC)
    req = make_request(spec, "a", 4)
    assert req.overrides == {"optim.muon.lr": 0.03, "runtime.device": "cpu"}
    assert req.run_id(2) == f"a-s4-{req.config_hash}-a2"
    # a search passes its own overrides (arm not in the spec); CPU specs still force the device
    s = make_request(spec, "t7", 0, overrides={"optim.muon.lr": 0.03}, source="search", search_trial=7)
    assert s.overrides["runtime.device"] == "cpu"
    assert s.config_hash == req.config_hash and s.source == "search" and s.search_trial == 7


def _rows(*items: tuple) -> pd.DataFrame:
    return pd.DataFrame([{"arm": a, "seed": s, "config_hash": h, "status": st, "attempt": at,
                          "run_id": f"{a}-s{s}-{h}-a{at}"} for a, s, h, st, at in items])


def test_plan_resume_rules() -> None:
    spec = parse_spec_text(SPEC)
    reqs = expand(spec, seeds=[0])
    h = {r.arm: r.config_hash for r in reqs}
    df = _rows(("baseline", 0, h["baseline"], "ok", 1),
               ("a", 0, h["a"], "failed", 1), ("a", 0, h["a"], "failed", 2),   # retries=1: budget spent
               ("b", 0, h["b"], "failed", 1), ("b", 0, h["b"], "cancelled", 2),  # cancelled is free
               ("baseline", 0, "oldhash00000", "failed", 1))
    got = {p.request.arm: p for p in plan(reqs, df, spec.retries)}
    assert got["baseline"].state == "done" and got["baseline"].done_run_id.endswith("-a1")
    assert got["a"].state == "exhausted"
    assert got["b"].state == "todo" and got["b"].attempt == 3 and got["b"].attempts_left == 1
    # an arm whose overrides changed has a new hash: nothing of the old one counts
    changed = parse_spec_text(SPEC.replace("a: {optim.muon.lr: 0.03}", "a: {optim.muon.lr: 0.031}"))
    p = plan(expand(changed, seeds=[0], arms=["a"]), df, changed.retries)[0]
    assert p.state == "todo" and p.attempt == 1 and p.attempts_left == 2
    # empty store: everything todo, attempt 1
    assert {(p.state, p.attempt) for p in plan(reqs, pd.DataFrame(), 0)} == {("todo", 1)}


def test_resource_plan() -> None:
    rp = resource_plan(parse_spec_text(SPEC))
    assert rp["ranks_per_run"] == 2 and rp["device"] == "cpu"
    assert rp["bundle"] == {"CPU": 4.0, "GPU": 0.0}
    assert rp["omp_num_threads"] == 2  # cpus_per_run // ranks
    assert rp["max_runs"] == 9


def test_max_concurrency_counts_whole_bundles() -> None:
    from ablate.run.placement import max_concurrency

    spec = parse_spec_text(SPEC)  # 4 CPU per run
    nodes = [{"Alive": True, "Resources": {"CPU": 10.0}}, {"Alive": True, "Resources": {"CPU": 3.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    assert max_concurrency(spec, nodes) == 2
    gpu = parse_spec_text(SPEC.replace("gpus_per_run: 0, cpu_ranks_per_run: 2, cpus_per_run: 4", "gpus_per_run: 2"))
    assert max_concurrency(gpu, [{"Alive": True, "Resources": {"CPU": 128.0, "GPU": 8.0}}]) == 4


def test_build_row_from_payload() -> None:
    from ablate.spec.matrix import PlannedRun
    from ablate.run.driver import Attempt, build_row
    from ablate.store.record import CurvePoint, RunRecord

    spec = parse_spec_text(SPEC)
    req = make_request(spec, "a", 1)
    att = Attempt(PlannedRun(req, "todo", 2, 1), order=7)
    env = {"python": "3.11.7", "torch": "2.13.0", "triton": None, "cuda": None, "gpu_name": None, "gpu_count": 0,
           "gpu_uuids": [], "driver": None, "hostname": "h1", "git_commit": "abc", "cuda_visible_devices": ""}
    data = {"dir": "/d", "synthetic": True, "hash": "0123456789abcdef", "train_shards": 1, "val_shards": 1,
            "train_tokens": 10}
    payload = {"ok": True, "start": {"config": {"seed": 1}, "world_size": 2, "env": env, "data": data},
               "end": {"final_val_loss": 4.5, "train_time_ms": 1000.0, "steps": 12, "tokens": 24576,
                       "peak_mem_mib": 1.0, "warmup_s": 0.0, "compile_s": 0.0},
               "curve": [{"step": 0, "val_loss": 6.0, "train_time_ms": 0.0}], "steps": [],
               "started_at": 100.0, "start_event_at": 103.5, "ended_at": 110.0, "node_id": "n1", "node_ip": "1.2.3.4"}
    row, curve, steps = build_row(spec, att, payload, {"python": "x", "git_commit": "drv"})
    assert isinstance(row, RunRecord) and row.run_id == f"a-s1-{req.config_hash}-a2"
    assert row["run_id"] == row.run_id and row["attempt"] == 2 and row["order"] == 7
    assert row["status"] == "ok" and row["error"] is None and row["final_val_loss"] == 4.5
    assert row["launch_s"] == 3.5 and row["wall_s"] == 10.0 and row["world_size"] == 2
    assert row["git_commit"] == "abc" and row["hostname"] == "h1" and row["node_ip"] == "1.2.3.4"
    assert row["data_synthetic"] is True and row["data_hash"] == "0123456789abcdef"
    assert json.loads(row["overrides_json"]) == {"optim.muon.lr": 0.03, "runtime.device": "cpu"}
    assert row.started_at == datetime(1970, 1, 1, 0, 1, 40, tzinfo=timezone.utc)  # epoch seconds → UTC
    assert curve == [CurvePoint(run_id=row.run_id, experiment="m", arm="a", seed=1, step=0, val_loss=6.0,
                                train_time_ms=0.0)]
    # died before `start`: provenance from the driver, config from the trial's own resolution
    row, _, _ = build_row(spec, att, {"ok": False, "error": "boom", "resolved_config": {"seed": 1},
                                      "started_at": 1.0, "ended_at": 2.0}, {"python": "3.11", "git_commit": "drv"})
    assert row["status"] == "failed" and row["error"] == "boom" and row["git_commit"] == "drv"
    assert row["world_size"] == 2 and row["launch_s"] is None and json.loads(row["config_json"]) == {"seed": 1}
    assert row["data_synthetic"] is None and row["data_hash"] is None  # unknown, not "real data"


def test_diverged_identity_is_done_not_retried() -> None:
    spec = parse_spec_text(SPEC)
    reqs = expand(spec, seeds=[0])
    h = {r.arm: r.config_hash for r in reqs}
    df = _rows(("a", 0, h["a"], "diverged", 1), ("b", 0, h["b"], "failed", 1), ("b", 0, h["b"], "diverged", 2))
    got = {p.request.arm: p for p in plan(reqs, df, spec.retries)}
    assert got["a"].state == "done" and got["a"].done_run_id.endswith("-a1")
    assert got["b"].state == "done" and got["b"].done_run_id.endswith("-a2")
    assert got["baseline"].state == "todo"


def _payload(**kw) -> dict:
    env = {"hostname": "h1", "gpu_uuids": [], "gpu_count": 0}
    base = {"ok": True, "start": {"config": {"seed": 1}, "world_size": 2, "env": env},
            "end": {"final_val_loss": 4.5, "train_time_ms": 1000.0},
            "curve": [{"step": 0, "val_loss": 6.0, "train_time_ms": 0.0},
                      {"step": 6, "val_loss": 5.0, "train_time_ms": 500.0}],
            "steps": [], "started_at": 100.0, "ended_at": 110.0}
    return {**base, **kw}


def test_build_row_marks_a_non_finite_loss_as_diverged() -> None:
    from ablate.spec.matrix import PlannedRun
    from ablate.run.driver import Attempt, build_row

    spec = parse_spec_text(SPEC)
    att = Attempt(PlannedRun(make_request(spec, "a", 1), "todo", 1, 2), order=0)
    drv = {"python": "x", "git_commit": "drv"}
    row, curve, _ = build_row(spec, att, _payload(), drv)
    assert row["status"] == "ok" and row["error"] is None
    # the trainer writes a NaN loss as null; the run exits 0 with a null final loss
    nan_mid = _payload(curve=[{"step": 0, "val_loss": 6.0, "train_time_ms": 0.0},
                              {"step": 6, "val_loss": None, "train_time_ms": 500.0},
                              {"step": 12, "val_loss": None, "train_time_ms": 900.0}],
                       end={"final_val_loss": None, "train_time_ms": 1000.0})
    row, curve, _ = build_row(spec, att, nan_mid, drv)
    assert row["status"] == "diverged" and row["final_val_loss"] is None
    assert row["error"] == "diverged: val_loss is not finite at step 6 (and 1 later eval(s))"
    assert [c["val_loss"] for c in curve] == [6.0, None, None]
    row, _, _ = build_row(spec, att, _payload(curve=[{"step": 0, "val_loss": float("nan")}]), drv)
    assert row["status"] == "diverged"
    row, _, _ = build_row(spec, att, _payload(end={"final_val_loss": float("inf"), "train_time_ms": 1.0}), drv)
    assert row["status"] == "diverged" and "final_val_loss" in row["error"]
    # a crash after the loss went NaN is still a divergence (a retry would diverge again)
    crash = _payload(ok=False, error="RuntimeError: boom\nexit code 1", end=None,
                     curve=[{"step": 6, "val_loss": None, "train_time_ms": 500.0}])
    row, _, _ = build_row(spec, att, crash, drv)
    assert row["status"] == "diverged" and row["error"].endswith("RuntimeError: boom\nexit code 1")
    # trainer-reported divergence (an `error` event of a divergence type)
    told = _payload(ok=False, error="Diverged: loss 1e9", end=None,
                    error_event={"type": "Diverged", "message": "loss 1e9 at step 7"})
    row, _, _ = build_row(spec, att, told, drv)
    assert row["status"] == "diverged" and "loss 1e9 at step 7" in row["error"]
    # an ordinary failure and a cancellation stay what they are
    row, _, _ = build_row(spec, att, _payload(ok=False, error="exit code 1", end=None), drv)
    assert row["status"] == "failed"
    row, _, _ = build_row(spec, att, _payload(status="cancelled", error="cancelled", curve=[]), drv)
    assert row["status"] == "cancelled"


def test_missing_runs_of_a_finished_search_and_of_a_plain_spec(tmp_path) -> None:
    from ablate.spec.matrix import missing_runs
    from ablate.store.parquet import Store
    from tests.ablate.searchstore import SEARCH_SPEC, write_search_experiment

    store = Store(str(tmp_path / "res"))
    write_search_experiment(store)
    spec, runs = parse_spec_text(SEARCH_SPEC), store.runs("srch")
    missing, note = missing_runs(spec, runs)
    assert missing == {"baseline": 0, "t0": 0, "t1": 0, "t2": 0}     # t2's diverged seed is an outcome
    assert note.startswith("search: 3 of 3 suggestions have runs")
    missing, _ = missing_runs(spec, runs[~((runs["arm"] == "baseline") & (runs["seed"] == 1001))])
    assert missing["baseline"] == 1
    plain = parse_spec_text(SPEC)
    df = pd.DataFrame([dict(arm="a", seed=0, config_hash=plain.config_hash("a"), status="diverged"),
                       dict(arm="a", seed=1, config_hash="old000000000", status="ok")])
    missing, note = missing_runs(plain, df)
    assert missing == {"baseline": 3, "a": 2, "b": 3} and note is None   # diverged is an outcome; old hash is not
