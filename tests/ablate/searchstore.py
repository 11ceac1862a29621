"""A finished search experiment written straight into a Store (no Ray, no Optuna study), for the
status, table and report tests: suggestions t0..t2 on seeds 0 and 1 (t2's seed 1 diverged), then
the baseline and t1 confirmed on seeds 1000 and 1001."""
from __future__ import annotations

import json

from datetime import datetime, timezone

from ablate.spec.model import parse_spec_text
from ablate.store.parquet import Store

SEARCH_SPEC = """\
name: srch
trainer: {preset: tiny}
arms: {baseline: {}}
seeds: 2
resources: {gpus_per_run: 0}
search:
  trials: 3
  seeds_per_trial: 2
  objectives: [val_loss]
  space:
    optim.muon.lr: {type: float, low: 0.01, high: 0.1, log: true}
  confirm: {top_k: 1, seeds: 2}
"""


def row(**kw) -> dict:
    """A complete runs row (schema v1) with neutral provenance; kw overrides."""
    now = datetime(2026, 11, 22, tzinfo=timezone.utc)
    base = dict(experiment="srch", attempt=1, round=0, source="ablate", search_trial=None, config_json="{}",
                overrides_json="{}", status="ok", error=None, train_time_ms=1000.0, steps=12, tokens=None,
                peak_mem_mib=None, warmup_s=None, compile_s=None, world_size=1, node_id=None, node_ip=None,
                hostname="h", gpu_model=None, gpu_count=0, gpu_uuids="", python_version="3.11",
                torch_version="2.13.0", triton_version=None, cuda_version=None, driver=None, git_commit=None,
                ablate_version="0.1.0", started_at=now, ended_at=now, launch_s=None, wall_s=10.0)
    return {**base, **kw}


def write_search_experiment(store: Store, name: str = "srch") -> None:
    text = SEARCH_SPEC.replace("name: srch", f"name: {name}")
    spec = parse_spec_text(text)
    store.write_bytes(name, "spec.yaml", text.encode())
    order = 0

    def put(arm, seed, h, source, trial, status="ok", loss=3.5, ov=None):
        nonlocal order
        rid = f"{arm}-s{seed}-{h}-a1"
        curve = [{"step": 0, "val_loss": 6.0, "train_time_ms": 0.0},
                 {"step": 12, "val_loss": loss, "train_time_ms": 1000.0}]
        steps = [{"step": k, "step_ms": 80.0, "train_time_ms": 80.0 * k} for k in range(1, 13)]
        store.write_run(row(experiment=name, arm=arm, seed=seed, run_id=rid, order=order, source=source,
                            search_trial=trial, config_hash=h, status=status, overrides_json=json.dumps(ov or {}),
                            error=None if status == "ok" else "diverged: val_loss is not finite at step 6",
                            final_val_loss=loss if status == "ok" else None), curve, steps)
        order += 1

    hashes = {}
    for seed in (0, 1):
        for n in range(3):
            ov = {**spec.overrides("baseline"), "optim.muon.lr": 0.02 + 0.01 * n}
            hashes[n] = spec.config_hash("baseline", ov)
            put(f"t{n}", seed, hashes[n], "search", n, "diverged" if (n, seed) == (2, 1) else "ok",
                3.5 - 0.01 * n + 0.001 * seed, ov)
    for seed in (1000, 1001):
        put("baseline", seed, spec.config_hash("baseline"), "ablate", None, loss=3.52 + 0.001 * (seed - 1000))
        put("t1", seed, hashes[1], "ablate", 1, loss=3.49 + 0.001 * (seed - 1000))


def write_wide_search(store: Store, root: str) -> str:
    """experiments/lr_mul_search_tiny.yaml (six searched knobs) with four finished suggestions;
    returns the experiment name."""
    from pathlib import Path

    text = (Path(root) / "experiments" / "lr_mul_search_tiny.yaml").read_text()
    spec = parse_spec_text(text)
    store.write_bytes(spec.name, "spec.yaml", text.encode())
    order = 0
    for n in range(4):
        ov = {**spec.overrides("baseline"), "optim.lr_mul.attn": 0.5123 + n, "optim.lr_mul.mlp_up": 1.2345,
              "optim.lr_mul.mlp_down": 2.71828, "optim.lr_mul.attn_gate": 0.98765, "optim.lr_mul.smear_gate": 1.5,
              "schedule.ws_schedule": [2, 3, 4, 5, 6, 8]}
        h = spec.config_hash("baseline", ov)
        for seed in (0, 1):
            store.write_run(row(experiment=spec.name, arm=f"t{n}", seed=seed, run_id=f"t{n}-s{seed}-{h}-a1",
                                order=order, source="search", search_trial=n, config_hash=h,
                                overrides_json=json.dumps(ov), final_val_loss=4.51234 + 0.01 * n + 0.001 * seed,
                                train_time_ms=12345.678 + seed), [], [])
            order += 1
    return spec.name
