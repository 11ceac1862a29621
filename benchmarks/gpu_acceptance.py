"""GPU acceptance suite: every shape of every preset with every GPU attention backend, the GPU
tests, and `ablate run` end to end; one PASS/FAIL row each, written to docs/gpu-acceptance.md.

    bash benchmarks/gpu_acceptance.sh            # the command (installs carried wheels, then this)
    python3 benchmarks/gpu_acceptance.py --out DIR [--doc docs/gpu-acceptance.md] [--commit SHA]

Rows:
- mask: benchmarks/gpu_mask_check.py — the flex BlockMask compiles and lists exactly the dense
  reference's blocks at 1 … 2048 blocks.
- preset × backend: the trainer under torchrun on one GPU with the preset's real shapes (every
  batch stage, window and the eval batch) and its schedule shortened to 4 steps per batch stage:
  the warmup compiles and runs runtime.warmup_steps_per_stage=3 steps at every (window, batch)
  stage and an eval forward at each window, then the shortened run trains and validates every 4
  steps. PASS when it exits 0, warms up every stage, resolves to the backend asked for, and its val
  losses are finite and fall. Backends: fa4 (when flash-attn-4 imports on sm90+) and flex for
  `speedrun`, `speedrun-1027` and `small`; sdpa (the CPU path, never chosen by `auto` on GPU) for
  `small`. With 2 or 4 GPUs the speedrun preset also runs at world size 2 / 4.
- pytest: the GPU tests (tests/trainer/test_attention_gpu.py: fa4 and flex against an fp32
  reference, 50 `small` steps fa4 vs flex; Polar Express kernels; FP8 head; micro-batches replayed
  from CUDA graphs train like eager ones, fa4 and flex; the fused q/k norm + rotary kernels; the
  fused relu² MLP kernels).
- ablate: `ablate run experiments/gpu_acceptance.yaml` (2 arms × 1 seed, `small`, 1 GPU per run) with
  resources.reuse_workers off and on: every run ok, losses finite and falling; and script arms (the
  CPU tests' fake record script, one GPU bundle per run): one ok, one diverged, GPU ids recorded.
  Needs ray and optuna (on the lent GPU machines: the carried .devwheels bundle).

Jobs run up to --parallel at a time on the GPU (compiles are CPU-bound; the speedrun preset peaks
near 30 GiB at world size 1), so timings printed here are not benchmarks (benchmarks/bench_trainer.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ("speedrun", "speedrun-1027", "small")
STEPS_PER_STAGE = 4


@dataclass
class Row:
    name: str
    status: str = "FAIL"  # PASS / FAIL / SKIP
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Job:
    name: str
    fn: object
    weight: int = 1  # GPU memory share (speedrun = 3)
    rows: list = field(default_factory=list)


def sh(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout, cwd=ROOT,
                               env={**os.environ, **(env or {})})
            out, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout) or "", 124
    with open(log, "a") as fh:
        fh.write("\n==== stdout ====\n" + out)
    return rc, out, time.perf_counter() - t0


def synth(out: Path, train_tokens: int, val_tokens: int) -> None:
    if (out / "synth.json").exists():
        return
    subprocess.run([sys.executable, "-m", "trainer.data", "synth", "--out", str(out), "--train-tokens",
                    str(train_tokens), "--val-tokens", str(val_tokens)], check=True, cwd=ROOT)


def short_overrides(preset: str, backend: str, data: Path) -> dict:
    """The preset's shapes with its schedule shortened to STEPS_PER_STAGE steps per batch stage.
    sdpa runs eagerly: compiled, its banded mask recompiles per window (293 s of a cold run on an
    H200, 2026-12-01), and `auto` never picks it on a GPU."""
    from trainer.presets import load_config

    cfg = load_config(preset)
    s = cfg.schedule
    n = len(s.train_bs_schedule) * STEPS_PER_STAGE
    return {**({"runtime.compile": False} if backend == "sdpa" else {}),
        "model.attn_backend": backend, "data.data_dir": str(data), "data.synthetic": False,
        "schedule.num_scheduled_iterations": n, "schedule.num_extension_iterations": STEPS_PER_STAGE,
        "eval.val_loss_every": STEPS_PER_STAGE, "eval.val_tokens": cfg.eval.val_batch_size,
        "runtime.warmup_steps_per_stage": 3, "optim.muon.momentum_warmup_steps": 2,
        "optim.muon.momentum_cooldown_steps": 2,
    }


def preset_row(preset: str, backend: str, data: Path, out: Path, nproc: int = 1) -> Row:
    import yaml

    from trainer.presets import load_config
    from trainer.schedule import stages

    name = f"{preset} · {backend}" + (f" · {nproc} GPUs" if nproc > 1 else "")
    over = short_overrides(preset, backend, data)
    want_stages = stages(load_config(preset, over).schedule)
    tag = f"{preset}_{backend}_ws{nproc}"
    cfg_file = out / f"{tag}.yaml"
    cfg_file.write_text(yaml.safe_dump(over))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trainer.train", "--preset", preset, "--config", str(cfg_file)]
    rc, stdout, secs = sh(cmd, out / f"{tag}.log", timeout=540, env={"OMP_NUM_THREADS": "4"})
    events = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    start = next((e for e in events if e["event"] == "start"), {})
    warm = next((e for e in events if e["event"] == "warmup"), {})
    vals = [e["val_loss"] for e in events if e["event"] == "val"]
    err = next((e for e in events if e["event"] == "error"), None)
    got_backend = ((start.get("config") or {}).get("model") or {}).get("attn_backend")
    staged = len(re.findall(r"\[trainer\] warmup stage", (out / f"{tag}.log").read_text()))
    problems = []
    if rc != 0:
        problems.append(f"exit {rc}" + (f": {err['type']}: {err['message'][:200]}" if err else ""))
    if got_backend != backend:
        problems.append(f"ran {got_backend}")
    if staged != len(want_stages):
        problems.append(f"warmed {staged}/{len(want_stages)} stages")
    finite = bool(vals) and all(v is not None and math.isfinite(v) for v in vals)
    if not finite:
        problems.append(f"val losses {vals}")
    elif not vals[-1] < vals[0]:
        problems.append(f"loss did not fall ({vals[0]:.3f} → {vals[-1]:.3f})")
    detail = (f"{len(want_stages)} stages {[f'w{w}/bs{b}' for w, b in want_stages]}, "
              f"warmup {warm.get('warmup_s', float('nan')):.0f} s, "
              f"val {vals[0]:.3f} → {vals[-1]:.3f}" if finite else "")
    return Row(name, "FAIL" if problems else "PASS", secs, "; ".join(problems) or detail)


def mask_row(out: Path) -> Row:
    rc, stdout, secs = sh([sys.executable, "benchmarks/gpu_mask_check.py"], out / "mask_check.log", timeout=400)
    lines = [ln for ln in stdout.splitlines() if "blocks=" in ln]
    bad = [ln.strip() for ln in lines if ": ok" not in ln]
    sizes = [re.search(r"blocks=\s*(\d+)", ln).group(1) for ln in lines]
    return Row("mask · flex BlockMask, blocks " + ",".join(sizes), "PASS" if rc == 0 and lines and not bad else "FAIL",
               secs, "; ".join(bad)[:300] or "compiles and lists exactly the dense blocks, both orientations")


def pytest_row(out: Path) -> Row:
    files = ["tests/trainer/test_attention_gpu.py", "tests/trainer/test_head_ce.py", "tests/trainer/test_polar_gpu.py",
             "tests/trainer/test_model.py", "tests/trainer/test_graphs_gpu.py", "tests/trainer/test_qk_rotary.py",
             "tests/trainer/test_mlp_relu2.py"]
    rc, stdout, secs = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files],
                          out / "pytest_gpu.log", timeout=540)
    tail = [ln for ln in stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    summary = tail[-1].strip("= ") if tail else f"exit {rc}"
    failed = [ln.split(" - ")[0] for ln in stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return Row("pytest -m gpu (attention backends, fused head, polar, fp8, CUDA graphs)",
               "PASS" if rc == 0 else "FAIL", secs, summary + ("; " + "; ".join(failed)[:300] if failed else ""))


def ablate_rows(data: Path, out: Path) -> list[Row]:
    import yaml

    try:
        import optuna  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        return [Row("ablate run · reuse_workers off/on", "SKIP", 0.0, f"ray/optuna not importable ({e})")]
    spec = yaml.safe_load((ROOT / "experiments/gpu_acceptance.yaml").read_text())
    rows = []
    store = out / "store"
    for reuse in (False, True):
        s = json.loads(json.dumps(spec))
        s["name"] = spec["name"] + ("-reuse" if reuse else "")
        s["trainer"]["set"].update({"data.data_dir": str(data), "data.synthetic": False})
        s["resources"]["reuse_workers"] = reuse
        f = out / f"{s['name']}.yaml"
        f.write_text(yaml.safe_dump(s, sort_keys=False))
        name = f"ablate run · {s['name']} (2 arms × 1 seed, reuse_workers {'on' if reuse else 'off'})"
        rc, stdout, secs = sh([sys.executable, "-m", "ablate", "run", str(f), "--store", str(store)],
                              out / f"{s['name']}.log", timeout=420, env={"COLUMNS": "160"})
        problems = [f"exit {rc}"] if rc else []
        try:
            from ablate.store.parquet import Store

            st = Store(str(store))
            runs = st.runs(s["name"])
            curves = st.curves(s["name"])
            ok = runs[runs["status"] == "ok"]
            if len(ok) < 2:
                problems.append(f"{len(ok)}/2 runs ok ({', '.join(map(str, runs['status']))})")
            losses = [float(x) for x in ok["final_val_loss"]]
            if not all(math.isfinite(x) for x in losses):
                problems.append(f"final losses {losses}")
            if len(curves):
                for rid, c in curves[curves["run_id"].isin(ok["run_id"])].groupby("run_id"):
                    c = c.sort_values("step")
                    if not c["val_loss"].iloc[-1] < c["val_loss"].iloc[0]:
                        problems.append(f"{rid}: loss did not fall")
            detail = f"final val {', '.join(f'{x:.3f}' for x in losses)}; train_time_ms " + \
                     ", ".join(f"{x:.0f}" for x in ok["train_time_ms"])
        except Exception as e:  # noqa: BLE001
            problems.append(f"store: {type(e).__name__}: {e}")
            detail = ""
        rows.append(Row(name, "FAIL" if problems else "PASS", secs, "; ".join(problems) or detail))
    return rows


def script_row(out: Path) -> Row:
    """`ablate run` of script arms on GPU bundles: the fake record script of the CPU tests
    (tests/ablate/fixtures/script/, the record's log format, no model) placed on one GPU per run,
    launched by torchrun in its own working directory and parsed like a record log."""
    import shutil as _sh

    try:
        import optuna  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        return Row("ablate run · script arms", "SKIP", 0.0, f"ray/optuna not importable ({e})")
    work = out / "script-arms"
    _sh.rmtree(work, ignore_errors=True)
    _sh.copytree(ROOT / "tests/ablate/fixtures/script", work / "fork")
    (work / "data" / "fineweb10B").mkdir(parents=True)
    spec = work / "script-arms.yaml"
    spec.write_text(f"""name: gpu-acceptance-script
trainer: {{script: fork/train_gpt.py, files: [fork/fake_kernels.py]}}
data_root: {work / 'data'}
arms:
  baseline: {{}}
  nan: {{env: {{FAKE_NAN_AT: "4"}}}}
seeds: [1]
resources: {{gpus_per_run: 1}}
""")
    store = out / "store"
    rc, _, secs = sh([sys.executable, "-m", "ablate", "run", str(spec), "--store", str(store)],
                     out / "script-arms.log", timeout=300, env={"COLUMNS": "160"})
    try:
        from ablate.store.parquet import Store

        runs = Store(str(store)).runs("gpu-acceptance-script").set_index("arm")
        got = {a: runs.loc[a, "status"] for a in runs.index}
        ok = got == {"baseline": "ok", "nan": "diverged"} and str(runs.loc["baseline", "gpu_uuids"]).startswith("GPU")
        detail = f"statuses {got}; baseline final {runs.loc['baseline', 'final_val_loss']}, " \
                 f"gpu {runs.loc['baseline', 'gpu_uuids']}"
    except Exception as e:  # noqa: BLE001
        ok, detail = False, f"store: {type(e).__name__}: {e}"
    # exit 1 is expected: a diverged run is an outcome, but the command reports it
    return Row("ablate run · script arms (fake record script, 1 GPU per run)", "PASS" if ok else "FAIL", secs,
               detail + ("" if ok else f"; exit {rc}"))


def machine() -> dict:
    import torch

    info = {"host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "none"
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    from trainer.fa4 import fa4_available

    ok, why = fa4_available(torch.device("cuda")) if info["gpus"] else (False, "no GPU")
    try:
        from importlib.metadata import version

        info["flash_attn_4"] = version("flash-attn-4") if ok else f"unavailable: {why}"
    except Exception:  # noqa: BLE001
        info["flash_attn_4"] = "available" if ok else f"unavailable: {why}"
    info["fa4"] = ok
    return info


def commit_of(arg: str | None) -> str:
    """--commit, else the checkout's HEAD (trainer.env.git_commit: "+dirty" when tracked files changed)."""
    from trainer.env import git_commit

    return arg or git_commit(ROOT) or "unknown (no git; pass --commit)"


def write_doc(path: Path, rows: list[Row], info: dict, commit: str, wall: float, machine_name: str,
              calls: int = 1) -> None:
    ok = all(r.status != "FAIL" for r in rows)
    lines = [
        "# GPU acceptance record",
        "",
        "Written by `bash benchmarks/gpu_acceptance.sh` (benchmarks/gpu_acceptance.py); re-run it on an H200",
        "for every change to `trainer/` or to how runs are launched, and commit this file with the result.",
        "",
        f"- commit: {commit}",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine_name} — {len(info['gpus'])} × {info['gpus'][0] if info['gpus'] else 'no GPU'}, "
        f"host {info['host']}",
        f"- software: Python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
        f"flash-attn-4 {info['flash_attn_4']}",
        f"- result: **{'PASS' if ok else 'FAIL'}** in {wall:.0f} s wall"
        + (f" over {calls} calls (`--resume`: each row says its call)" if calls > 1 else "")
        + " (jobs in parallel; times are not benchmarks)",
        "",
        "| check | result | s | detail |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.detail.replace('|', '/')} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-acceptance"))
    ap.add_argument("--doc", default=str(ROOT / "docs/gpu-acceptance.md"))
    ap.add_argument("--commit", default=os.environ.get("ACCEPT_COMMIT"))
    ap.add_argument("--machine", default=os.environ.get("ACCEPT_MACHINE", ""))
    ap.add_argument("--parallel", type=int, default=5,
                    help="GPU memory weight running at once (speedrun presets 2, the rest 1); 2026-12-01: two "
                         "speedrun-size jobs beside a third ran out of the H200's 140 GiB")
    ap.add_argument("--only", nargs="*", default=None, help="run only rows whose name contains one of these")
    ap.add_argument("--state", default=os.environ.get("ACCEPT_STATE", "/tmp/gpu-acceptance-state.json"),
                    help="where each finished job's rows are kept (JSON), for --resume")
    ap.add_argument("--resume", action="store_true",
                    help="keep the jobs that passed in an earlier call at the same commit (from --state) and run "
                         "the rest: a suite cut off by a time limit finishes in a second call, one record")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    if not info["gpus"]:
        print("gpu_acceptance: no CUDA GPU visible; this suite runs on a GPU node", file=sys.stderr)
        return 2
    print(json.dumps(info), flush=True)
    data_root = Path(os.environ.get("ACCEPT_DATA", "/tmp/acc-data"))
    synth(data_root / "speedrun", 16_000_000, 2_097_152)
    synth(data_root / "small", 24_000_000, 1_048_576)
    backends = (["fa4"] if info["fa4"] else []) + ["flex"]
    jobs: list[Job] = [Job("mask", lambda: [mask_row(out)])]
    for preset in PRESETS:
        data = data_root / ("small" if preset == "small" else "speedrun")
        for b in backends + (["sdpa"] if preset == "small" else []):
            jobs.append(Job(f"{preset} · {b}", (lambda p=preset, b=b, d=data: [preset_row(p, b, d, out)]),
                            weight=1 if preset == "small" else 2))  # speedrun*: ~30-40 GiB each
    n_gpu = len(info["gpus"])
    for nproc in (2, 4):
        if n_gpu >= nproc:
            jobs.append(Job(f"speedrun · {backends[0]} · {nproc} GPUs",
                            (lambda n=nproc: [preset_row("speedrun", backends[0], data_root / "speedrun", out, n)]),
                            weight=3))
    jobs.append(Job("pytest", lambda: [pytest_row(out)]))
    jobs.append(Job("ablate run", lambda: ablate_rows(data_root / "small", out)))
    jobs.append(Job("ablate script", lambda: [script_row(out)]))
    if args.only:
        jobs = [j for j in jobs if any(k in j.name for k in args.only)]
    commit = commit_of(args.commit)
    machine_name = args.machine or f"{n_gpu}×{info['gpus'][0]}"
    state_path = Path(args.state)
    state = {"commit": commit, "calls": 0, "seconds": 0.0, "jobs": {}}
    if args.resume:
        try:
            old = json.loads(state_path.read_text())
        except (OSError, ValueError) as e:
            print(f"gpu_acceptance: --resume: no earlier state at {state_path} ({e}); running every job",
                  file=sys.stderr)
            old = None
        if old and old.get("commit") == commit:
            state = old
            for j in jobs:
                kept = state["jobs"].get(j.name)
                if kept and all(r["status"] == "PASS" for r in kept):
                    j.rows = [Row(r["name"], r["status"], r["seconds"], r["detail"] + f" (call {r.get('call', 1)})")
                              for r in kept]
            print(f"gpu_acceptance: --resume: {sum(bool(j.rows) for j in jobs)} jobs passed in earlier calls "
                  f"at {commit[:12]}; running {sum(not j.rows for j in jobs)}", flush=True)
        elif old:
            print(f"gpu_acceptance: --resume: the earlier state is for commit {old.get('commit')}, not {commit}; "
                  "running every job", file=sys.stderr)
    state["calls"] += 1
    call = state["calls"]
    kept_before = {j.name for j in jobs if j.rows}
    done_before = float(state["seconds"])

    def keep(job: Job) -> None:
        state["jobs"][job.name] = [{**r.__dict__, "call": call} for r in job.rows]
        state["seconds"] = done_before + time.perf_counter() - t0
        with contextlib.suppress(OSError):
            state_path.write_text(json.dumps(state))
    # The order is the critical path: small fa4/flex first (their compiled graphs serve pytest and
    # ablate, which wait for them), then the long jobs (speedrun, pytest, ablate), then the rest.
    rank = ["mask", "small · fa4", "small · flex", "speedrun · fa4", "speedrun · flex", "pytest", "ablate run",
            "ablate script", "speedrun-1027 · fa4", "speedrun-1027 · flex", "small · sdpa"]
    order = sorted(jobs, key=lambda j: rank.index(j.name) if j.name in rank else len(rank))
    gates = ("small · fa4", "small · flex")
    running: dict[cf.Future, Job] = {}
    load = 0
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        pending = [j for j in order if not j.rows]
        while pending or running:
            while pending and (load + pending[0].weight <= args.parallel or not running):
                j = pending[0]
                if j.name in ("pytest", "ablate run") and any(r.name in gates for r in running.values()):
                    break
                pending.pop(0)
                load += j.weight
                running[pool.submit(j.fn)] = j
                print(f"[acceptance {time.perf_counter() - t0:5.0f} s] start {j.name}", flush=True)
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in done:
                j = running.pop(f)
                load -= j.weight
                try:
                    j.rows = f.result()
                except Exception as e:  # noqa: BLE001
                    j.rows = [Row(j.name, "FAIL", 0.0, f"{type(e).__name__}: {e}")]
                keep(j)
                for r in j.rows:
                    print(f"[acceptance {time.perf_counter() - t0:5.0f} s] {r.status} {r.name}: {r.detail}", flush=True)
                # the record so far, so that a run cut off by a time limit still leaves its rows
                partial = [r for jj in jobs for r in jj.rows]
                write_doc(out / "gpu-acceptance.partial.md", partial, info, commit,
                          done_before + time.perf_counter() - t0,
                          machine_name)
    if call > 1:
        for j in order:
            if j.name not in kept_before:
                for r in j.rows:
                    r.detail += f" (call {call})"
    rows = [r for j in jobs for r in j.rows]
    wall = done_before + time.perf_counter() - t0
    write_doc(Path(args.doc), rows, info, commit, wall, machine_name, calls=call)
    shutil.copy(args.doc, out / "gpu-acceptance.md")
    print()
    print(f"{'result':6}  {'s':>5}  check")
    for r in rows:
        print(f"{r.status:6}  {r.seconds:5.0f}  {r.name}  {r.detail[:150]}")
    ok = all(r.status != "FAIL" for r in rows)
    print(f"\n{'PASS' if ok else 'FAIL'}: {sum(r.status == 'PASS' for r in rows)} passed, "
          f"{sum(r.status == 'FAIL' for r in rows)} failed, {sum(r.status == 'SKIP' for r in rows)} skipped "
          f"in {wall:.0f} s → {args.doc}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
