"""A stand-in for `trainer.train` that prints contract events without torch (fast launch tests).

    python tests/ablate/fake_trainer.py --preset tiny --config ov.yaml --seed 0 [--steps 5]
        [--sleep 0.01] [--spawn-orphan] [--noise] [--hang]
    FAKE_TRAINER_SLEEP_S=0.4 python tests/ablate/fake_trainer.py ...   # default of --sleep (seconds per step)

Loss falls with the step and depends on `optim.muon.lr` and the seed, so arms differ; with
`optim.muon.lr` ≥ 1 it diverges: val_loss is null (the trainer's non-finite loss) from step 2 on.
`debug.fail_at_step` (in the --config file) makes it print an `error` event and exit
`debug.exit_code` (default 1), like the real trainer. `runtime.warmup_steps_per_stage: N` (in the
--config file) makes its warmup take N × 0.1 s (a slow run for timing tests). `--spawn-orphan`
starts a grandchild in a new session that sleeps (what torchrun's ranks look like) and prints its
pid on stderr as `ORPHAN <pid>`, so tests can check the guard kills it. `--hang` sleeps forever
after `start`.

What a trial under Ray gave it is echoed, for the multi-node tests: `start.env` carries
`cuda_visible_devices`, `ray_raylet_pid` (which Ray node's raylet started the trial's worker) and
fake GPU UUIDs `fake-GPU-<id>` for each id in CUDA_VISIBLE_DEVICES (so `gpu_uuids`/`gpu_count` of
the run's row show Ray's assignment); `start.config.fake_observed` repeats them (→ `config_json`).
The step sleep defaults to $FAKE_TRAINER_SLEEP_S (a test's `ray start` node sets it for its trials,
whose command line ablate fixes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, also when run as a script
from trainer.config import flatten  # noqa: E402  (no torch: config.py imports only the stdlib and yaml)


def emit(event: str, **kw) -> None:
    print(json.dumps({"event": event, "t": time.time(), **kw}), flush=True)


flat = flatten  # nested → dotted keys, the trainer's own


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sleep", type=float, default=float(os.environ.get("FAKE_TRAINER_SLEEP_S", "0")))
    ap.add_argument("--spawn-orphan", action="store_true")
    ap.add_argument("--noise", action="store_true")
    ap.add_argument("--hang", action="store_true")
    a = ap.parse_args()
    cfg = {}
    if a.config:
        import yaml

        with open(a.config) as f:
            cfg = flat(yaml.safe_load(f) or {})
    if int(os.environ.get("RANK", "0")) != 0:
        time.sleep(a.sleep * a.steps)
        return 0
    lr = float(cfg.get("optim.muon.lr", 0.023))
    fail_at = int(cfg.get("debug.fail_at_step", -1))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [f"fake-GPU-{i.strip()}" for i in (cvd or "").split(",") if i.strip()]
    observed = {"cuda_visible_devices": cvd, "ray_raylet_pid": os.environ.get("RAY_RAYLET_PID"), "pid": os.getpid()}
    emit("start", config={"preset": a.preset, "seed": a.seed, **cfg, "fake_observed": observed},
         config_hash="fakefakefake", seed=a.seed, world_size=world, grad_accum=max(1, 2 // world),
         env={"python": sys.version.split()[0], "torch": None, "triton": None, "cuda": None,
              "gpu_name": "fake" if gpus else None, "gpu_count": len(gpus), "gpu_uuids": gpus, "driver": None,
              "hostname": os.uname().nodename, "git_commit": None, "cuda_visible_devices": cvd,
              "ray_raylet_pid": observed["ray_raylet_pid"]},
         data={"dir": str(cfg.get("data.data_dir", "")), "synthetic": True, "hash": "fakedatafakedata",
               "train_shards": 1, "val_shards": 1, "train_tokens": 4096})
    if a.spawn_orphan:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        print(f"ORPHAN {p.pid}", file=sys.stderr, flush=True)
    if a.noise:
        print("this line is not JSON", flush=True)
    if a.hang:
        time.sleep(600)
    warmup_s = 0.1 * int(cfg.get("runtime.warmup_steps_per_stage", 0))
    time.sleep(warmup_s)
    emit("warmup", warmup_s=warmup_s, compile_s=0.0, skipped=False)
    base = 5.0 + 0.01 * a.seed - 10.0 * (lr - 0.023)
    t = 0.0
    for step in range(a.steps + 1):
        if step == fail_at:
            print(f"RuntimeError: debug.fail_at_step={step}", file=sys.stderr, flush=True)
            emit("error", type="RuntimeError", message=f"debug.fail_at_step={step}")
            return int(cfg.get("debug.exit_code", 1))
        if step % 2 == 0 or step == a.steps:
            emit("val", step=step, val_loss=None if lr >= 1 and step >= 2 else base - 0.1 * step, train_time_ms=t)
        if step < a.steps:
            time.sleep(a.sleep)
            t += 10.0
            emit("step", step=step + 1, train_time_ms=t, step_ms=10.0)
    emit("end", final_val_loss=None if lr >= 1 else base - 0.1 * a.steps, train_time_ms=t, steps=a.steps,
         tokens=4096 * a.steps,
         peak_mem_mib=0.0, warmup_s=0.0, compile_s=0.0, eval_s=0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
