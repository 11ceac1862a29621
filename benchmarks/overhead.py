"""Where an experiment's wall time goes: useful (train + val) time against everything else.

    python benchmarks/overhead.py EXPERIMENT --store results --wall-s 412.3 [--slots 2]

Reads the experiment's `runs` rows and prints, summed over ok runs:
  train       train_time_ms (the timed optimizer steps)
  val         eval_s (validation after warmup)
  compile+warmup  warmup_s (compile + kernel warmup + state restore)
  launch      launch_s (process start → `start` event: interpreter, torch import, rendezvous)
  in-run rest wall_s − the four above (data check, model build, teardown)
and, against the experiment's wall time × concurrent slots, what Ray start, trial scheduling and
idle slots cost. Ratio = experiment wall × slots ÷ Σ(train + val); goal ≤ 1.10 with warm caches.
`--wall-s` is the driver's wall time (e.g. from `time ablate run ...`); without it the span from
the first run's start to the last run's end is used (which leaves Ray start-up out).

Steady state: a slot (the GPUs of a run, by gpu_uuids; node + order for CPU runs) spends, per run
after its first, the time from the previous run's end to this run's end (scheduling, launch,
compile + warmup, train, val, teardown). Σ of that ÷ Σ(train + val) of the same runs is the ratio
once the slot is warm (compile caches filled; with resources.reuse_workers, its worker started).
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ablate.store.parquet import Store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment")
    ap.add_argument("--store", default="results")
    ap.add_argument("--wall-s", type=float, default=None, help="driver wall time of `ablate run`")
    ap.add_argument("--slots", type=int, default=1, help="runs that could execute at once")
    args = ap.parse_args(argv)
    runs = Store(args.store).runs(args.experiment)
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        print(f"no ok runs in {args.experiment!r}", file=sys.stderr)
        return 1
    train = ok["train_time_ms"].sum() / 1000
    val = ok["eval_s"].fillna(0).sum()
    warm = ok["warmup_s"].fillna(0).sum()
    launch = ok["launch_s"].fillna(0).sum()
    wall_runs = ok["wall_s"].sum()
    rest = wall_runs - train - val - warm - launch
    span = (ok["ended_at"].max() - ok["started_at"].min()).total_seconds()
    wall = args.wall_s if args.wall_s is not None else span
    capacity = wall * args.slots
    useful = train + val
    print(f"experiment {args.experiment}: {len(ok)} ok runs ({len(runs) - len(ok)} other), "
          f"wall {wall:.1f} s × {args.slots} slots = {capacity:.1f} slot-s")
    rows = [("train", train), ("val", val), ("compile+warmup", warm), ("launch", launch),
            ("in-run rest", rest), ("outside runs (Ray start, scheduling, idle slots)", capacity - wall_runs)]
    for name, v in rows:
        print(f"  {name:<50} {v:9.1f} s  {v / capacity:6.1%}")
    print(f"  first/later compile_s: {ok.sort_values('started_at')['compile_s'].round(1).tolist()}")
    print(f"  first/later warmup_s:  {ok.sort_values('started_at')['warmup_s'].round(1).tolist()}")
    print(f"ratio wall×slots / Σ(train+val) = {capacity / useful:.2f}  (goal ≤ 1.10 with warm caches)")
    print(f"ratio excluding compile+warmup   = {(capacity - warm) / useful:.2f}")
    steady = steady_state(ok)
    if steady is not None:
        n, slot_s, use_s = steady
        print(f"steady state: {n} runs after each slot's first: {slot_s:.1f} slot-s for {use_s:.1f} s of "
              f"train+val, ratio = {slot_s / use_s:.2f}")
    if "worker_runs_before" in ok and ok["worker_runs_before"].notna().any():
        print(f"  worker_runs_before: {ok.sort_values('started_at')['worker_runs_before'].astype('Int64').tolist()}")
    return 0


def steady_state(ok) -> tuple[int, float, float] | None:
    """(runs, Σ slot time from the previous end on the same slot, Σ train+val) over each slot's
    runs after its first; None if no slot ran twice."""
    slots = ok["gpu_uuids"].where(ok["gpu_uuids"].fillna("") != "", ok["node_ip"].fillna("") + "/cpu")
    n, slot_s, use_s = 0, 0.0, 0.0
    for _, g in ok.assign(slot=slots).groupby("slot"):
        g = g.sort_values("started_at")
        ends = g["ended_at"].tolist()
        for i in range(1, len(g)):
            row = g.iloc[i]
            n += 1
            slot_s += (ends[i] - ends[i - 1]).total_seconds()
            use_s += row["train_time_ms"] / 1000 + (0.0 if pd.isna(row["eval_s"]) else row["eval_s"])
    return (n, slot_s, use_s) if n else None


if __name__ == "__main__":
    sys.exit(main())
