"""The train loop: determinism, events, warmup restore, grad accumulation, failures, CLI errors.

    python -m pytest tests/trainer/test_train.py -q                 # fast + dist
    python -m pytest tests/trainer/test_train.py -q -m e2e          # torchrun, 2 gloo ranks
"""
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import apply_overrides
from trainer.presets import load_config
from trainer.train import cli, main

REPO = Path(__file__).resolve().parents[2]
KEYS = {
    "start": {"config", "config_hash", "seed", "world_size", "grad_accum", "env", "data"},
    "warmup": {"warmup_s", "compile_s", "skipped"},
    "val": {"step", "val_loss", "train_time_ms"},
    "step": {"step", "train_time_ms", "step_ms"},
    "end": {"final_val_loss", "train_time_ms", "steps", "tokens", "peak_mem_mib", "warmup_s", "compile_s", "eval_s"},
    "error": {"type", "message"},
}
ENV_KEYS = {"python", "torch", "triton", "cuda", "gpu_name", "gpu_count", "gpu_uuids", "driver", "hostname",
            "git_commit", "cuda_visible_devices"}
DATA_KEYS = {"dir", "synthetic", "hash", "train_shards", "val_shards", "train_tokens"}


def _fast(data_dir, **extra):
    """The tiny preset shortened to 8 steps on the session's synthetic data."""
    over = {
        "data.data_dir": str(data_dir), "data.synthetic": False,
        "schedule.num_scheduled_iterations": 6, "schedule.num_extension_iterations": 2,
        "schedule.train_bs_schedule": [1024, 1024, 2048], "schedule.train_bs_extension": 2048,
        "eval.val_tokens": 4096, "eval.val_batch_size": 2048, "eval.val_loss_every": 4,
        "optim.muon.momentum_warmup_steps": 2, "optim.muon.momentum_cooldown_steps": 2,
    }
    over.update(extra)
    return apply_overrides(load_config("tiny"), over)


def _events(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]


def _check_contract(events):
    for e in events:
        assert set(e) == {"event", "t"} | KEYS[e["event"]], e["event"]
        assert isinstance(e["t"], float)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[1] == "warmup" and kinds[-1] == "end"
    assert set(events[0]["env"]) == ENV_KEYS
    assert set(events[0]["data"]) == DATA_KEYS


def test_same_seed_same_curve_and_event_contract(tiny_data, capsys):
    cfg = _fast(tiny_data)
    end1 = main(cfg)
    ev1 = _events(capsys.readouterr().out)
    end2 = main(cfg)
    ev2 = _events(capsys.readouterr().out)
    main(apply_overrides(cfg, {"seed": 1}))
    ev3 = _events(capsys.readouterr().out)
    _check_contract(ev1)
    curve = lambda evs: [(e["step"], e["val_loss"]) for e in evs if e["event"] == "val"]  # noqa: E731
    assert [s for s, _ in curve(ev1)] == [0, 4, 8]
    assert curve(ev1) == curve(ev2)
    assert end1["final_val_loss"] == end2["final_val_loss"] == ev1[-1]["final_val_loss"]
    assert curve(ev3)[0] == curve(ev1)[0]  # same val data, init differs only slightly at step 0
    assert curve(ev3)[-1][1] != curve(ev1)[-1][1]
    steps = [e for e in ev1 if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9))
    times = [e["train_time_ms"] for e in steps]
    assert times == sorted(times) and all(e["step_ms"] > 0 for e in steps)
    start = ev1[0]
    assert start["world_size"] == 1 and start["grad_accum"] == 2 and start["seed"] == 0
    assert start["config"]["schedule"]["num_scheduled_iterations"] == 6
    end = ev1[-1]
    assert end["steps"] == 8 and end["tokens"] == 2 * 1024 + 2 * 1024 + 2 * 2048 + 2 * 2048
    assert end["warmup_s"] == 0.0 and end["final_val_loss"] < curve(ev1)[0][1]


def test_warmup_restores_state(tiny_data, capsys):
    cold = main(_fast(tiny_data))
    capsys.readouterr()
    warm = main(_fast(tiny_data, **{"runtime.warmup": True, "runtime.warmup_steps_per_stage": 2}))
    evs = _events(capsys.readouterr().out)
    w = next(e for e in evs if e["event"] == "warmup")
    assert w["warmup_s"] > 0 and 0 < w["compile_s"] <= w["warmup_s"]
    assert warm["final_val_loss"] == cold["final_val_loss"]  # model, optimizers, YaRN, data restored


def test_timed_loop_syncs_only_at_validation_whatever_log_every(tiny_data, capsys, monkeypatch):
    """Timed like the record: the device is synchronised around validation only; step events
    (every step at log_every=1) come from marks the device has passed, never from a wait, so
    runtime.log_every cannot change the measured time. The old loop synced at every step event."""
    import trainer.train as T

    calls: list[str] = []
    monkeypatch.setattr(T, "_sync", lambda device: calls.append("sync"))
    for every in (1, 3):
        calls.clear()
        main(_fast(tiny_data, **{"runtime.log_every": every}))
        evs = _events(capsys.readouterr().out)
        # one sync before the timer starts and two around each of the 3 validations (steps 0, 4, 8;
        # warmup is off); none per step
        assert len(calls) == 1 + 2 * 3, (every, len(calls))
        steps = [e["step"] for e in evs if e["event"] == "step"]
        assert steps == [n for n in range(1, 9) if n % every == 0]


def test_step_clock_marks_and_means():
    from trainer.clock import StepClock

    clock = StepClock(torch.device("cpu"), every=2)
    clock.restart(100.0, 0)
    for n in range(1, 6):
        clock.mark(n)
    got = clock.ready()
    assert [g[0] for g in got] == [2, 4] and got[0][1] >= 100.0 and got[1][1] >= got[0][1]
    assert all(g[2] >= 0 for g in got) and clock.ready() == []
    clock.restart(200.0, 5)  # after a validation: the next mark's step time counts from here
    clock.mark(6)
    (step, t_ms, s_ms), = clock.ready(wait=True)
    assert step == 6 and t_ms >= 200.0 and s_ms == pytest.approx(t_ms - 200.0)


def test_sum_reduction_and_adam_every_step_run(tiny_data, capsys):
    end = main(_fast(tiny_data, **{"optim.grad_reduction": "sum", "optim.adam.every_other_step": False}))
    capsys.readouterr()
    assert end["final_val_loss"] < 6.0


def test_injected_failure_exit_code_and_error_event(tiny_data, capsys):
    rc = cli(["--preset", "tiny", "--set", f"data.data_dir={tiny_data}", "--set", "data.synthetic=false",
              "--set", "debug.fail_at_step=2", "--set", "debug.exit_code=3"])
    out = capsys.readouterr()
    assert rc == 3
    evs = _events(out.out)
    assert evs[-1]["event"] == "error" and evs[-1]["type"] == "InjectedFailure"
    assert "debug.fail_at_step=2" in evs[-1]["message"]
    assert [e["step"] for e in evs if e["event"] == "step"] == [1, 2]


def test_file_order_same_batches_for_every_seed_different_init(tiny_data):
    """data.order=file (every preset): seeds 0 and 1 read identical batches, step after step, and
    start from different weights. With data.order=shuffled the batches differ too."""
    from trainer.data import list_shards
    from trainer.train import _build, _loader

    files = list_shards(tiny_data, "fineweb_train_*.bin")
    cfgs = [apply_overrides(_fast(tiny_data), {"seed": s}) for s in (0, 1)]
    assert all(c.data.order == "file" for c in cfgs)
    loaders = [_loader(c, files, 0, 1) for c in cfgs]
    try:
        for _ in range(6):
            a, b = (ld.next_batch(1024) for ld in loaders)
            np.testing.assert_array_equal(a.inputs, b.inputs)
    finally:
        for ld in loaders:
            ld.close()
    val = list_shards(tiny_data, "fineweb_val_*.bin")
    w0, w1 = (dict(_build(c, torch.device("cpu"), 0, 1, 2, val).model.named_parameters()) for c in cfgs)
    assert not torch.equal(w0["embed.weight"], w1["embed.weight"])
    assert not torch.equal(w0["blocks.1.attn.qkvo_w"], w1["blocks.1.attn.qkvo_w"])
    shuffled = [apply_overrides(c, {"data.order": "shuffled"}) for c in cfgs]
    loaders = [_loader(c, files, 0, 1) for c in shuffled]
    try:
        a, b = (ld.next_batch(1024) for ld in loaders)
        assert not np.array_equal(a.inputs, b.inputs)
    finally:
        for ld in loaders:
            ld.close()


def test_start_event_says_what_data_ran(tiny_data, tmp_path, capsys):
    """`start.data`: synthetic (the generator's manifest is there) and a hash of the shard headers
    and first tokens, equal for the same shards, different for other shards."""
    from trainer.data import data_provenance, list_shards

    main(_fast(tiny_data, **{"schedule.num_scheduled_iterations": 2, "schedule.num_extension_iterations": 0}))
    start = _events(capsys.readouterr().out)[0]
    files = (list_shards(tiny_data, "fineweb_train_*.bin"), list_shards(tiny_data, "fineweb_val_*.bin"))
    assert start["data"] == data_provenance(tiny_data, *files)
    assert start["data"]["synthetic"] is True and len(start["data"]["hash"]) == 16
    assert start["data"]["train_shards"] == 2 and start["data"]["train_tokens"] == 400_000
    # Copy the shards without the manifest and change one token of one shard: "real" data, other hash.
    other = tmp_path / "copy"
    other.mkdir()
    for f in files[0] + files[1]:
        (other / f.name).write_bytes(f.read_bytes())
    assert data_provenance(other, *(list_shards(other, p) for p in ("fineweb_train_*.bin", "fineweb_val_*.bin"))) \
        == {**start["data"], "dir": str(other.resolve()), "synthetic": False}
    raw = bytearray((other / files[0][1].name).read_bytes())
    raw[1024:1026] = b"\x07\x00"
    (other / files[0][1].name).write_bytes(bytes(raw))
    moved = data_provenance(other, *(list_shards(other, p) for p in ("fineweb_train_*.bin", "fineweb_val_*.bin")))
    assert moved["hash"] != start["data"]["hash"]


def test_family_optimizer_map_moves_the_smear_gate_to_adam(tiny_data, capsys):
    """optim.optimizer.smear_gate=adam: NorMuon no longer holds the gate, DistAdam does (replicated:
    its dim 0 of 1 does not shard), it is stepped with Adam's lr·lr_mul, and it keeps its gradient
    over Adam's pair of steps (not zeroed on even steps with the NorMuon gradients)."""
    from trainer.data import list_shards
    from trainer.train import _build, _loader

    cfg = _fast(tiny_data, **{"optim.optimizer.smear_gate": "adam", "optim.lr_mul.smear_gate": 0.5})
    run = _build(cfg, torch.device("cpu"), 0, 1, 2, list_shards(tiny_data, "fineweb_val_*.bin"))
    gate = run.model.smear_gate
    assert "smear_gate" not in {f for g in run.muon.groups for f in g.families}
    assert "smear_gate" in run.adam.families and all(p is not gate for p in run.muon_params)
    base = _build(_fast(tiny_data), torch.device("cpu"), 0, 1, 2, list_shards(tiny_data, "fineweb_val_*.bin"))
    assert "smear_gate" in {f for g in base.muon.groups for f in g.families}
    loader = _loader(cfg, list_shards(tiny_data, "fineweb_train_*.bin"), 0, 1)
    with torch.no_grad():  # the zero lm_head and smear λ = 0 zero the gate's first gradients: switch on
        run.model.scalars[5 * cfg.model.num_layers] = 1.0
        run.model.lm_head.normal_(0, 0.05)
    try:
        g0 = gate.detach().clone()
        run.train_step(loader, 0, 0)  # even step: NorMuon only; the gate keeps its gradient
        assert gate.grad is not None and torch.equal(gate.detach(), g0)
        run.train_step(loader, 1, 1)  # odd step: Adam moves it by about lr·lr_mul per entry
        step = (gate.detach().float() - g0.float()).abs()
        lr = cfg.optim.adam.lr * 0.5
        assert 0.3 * lr < step.max().item() < 3 * lr
    finally:
        loader.close()
    end = main(apply_overrides(cfg, {"schedule.num_scheduled_iterations": 4, "schedule.num_extension_iterations": 0}))
    capsys.readouterr()
    assert end["final_val_loss"] < 7.0


def test_print_config_and_list_keys(capsys):
    assert cli(["--preset", "tiny", "--set", "optim.muon.lr=0.05", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["muon"]["lr"] == 0.05 and cfg["preset"] == "tiny"
    assert cli(["--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split(None, 3) for ln in lines[1:]}
    assert "optim.muon.lr" in rows and "model.attn_backend" in rows
    assert rows["optim.muon.lr"][1:3] == ["float", "0.023"] and "base LR" in rows["optim.muon.lr"][3]
    assert rows["data.order"][1:3] == ["file|shuffled", '"file"']
    assert all(len(r) == 4 and r[3].strip() for r in rows.values())  # every key has a meaning
    assert cli(["--list-keys", "--preset", "speedrun-1027"]) == 0
    rows = {ln.split()[0]: ln.split(None, 3) for ln in capsys.readouterr().out.splitlines()[1:]}
    assert rows["optim.muon.lr"][2] == "0.03"


def _run_cli(args, env_extra=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=120)


@pytest.mark.parametrize("args,env,needle", [
    (["--preset", "tiny", "--set", "optim.muon.lrr=0.1"], None, "optim.muon.lr"),
    (["--preset", "tiny", "--set", "optim.muon.lr=fast"], None, "expected a number"),
    (["--preset", "tinyy"], None, "choose one of"),
    (["--preset", "tiny"], {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}, "reference_world_size=2"),
    (["--preset", "tiny", "--set", "data.synthetic=false", "--set", "data.data_dir=EMPTY"], None, "data.data_dir"),
    (["--preset", "speedrun", "--set", "model.attn_backend=sdpa"], None,
     "python -m trainer.data fineweb --out data/fineweb10B"),
    (["--preset", "tiny", "--set", "runtime.device=cuda"], None, "CUDA is not available"),
    (["--preset", "tiny", "--bogus"], None, "unrecognized arguments"),
], ids=["unknown-key", "wrong-type", "unknown-preset", "world-size-3", "missing-shards", "speedrun-no-fineweb",
        "no-cuda", "bad-flag"])
def test_bad_input_exits_2_with_one_clean_line(tmp_path, args, env, needle):
    if "runtime.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = [a.replace("EMPTY", str(tmp_path)) for a in args]
    r = _run_cli(args, env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr
    evs = _events(r.stdout)
    assert len(evs) >= 1 and evs[-1]["event"] == "error" and set(evs[-1]) == {"event", "t", "type", "message"}
    assert all(e["event"] in ("start", "error") for e in evs)


# -- grad accumulation: 1 rank × 2 micro-batches == 2 gloo ranks × 1 micro-batch --------------------
def _grads_on_rank(rank, world, port, data_dir, out_path):
    import torch.distributed as dist

    from trainer.data import TrainLoader, list_shards
    from trainer.model import GPT

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = _fast(data_dir)
        torch.manual_seed(0)
        model = GPT(cfg.model, world_size=world)
        loader = TrainLoader(list_shards(data_dir, "fineweb_train_*.bin"), bos_id=511, max_seq_len=256,
                             rank=rank, world_size=world, seed=0)
        b = loader.next_batch(512)
        loader.close()
        loss = model(*(torch.from_numpy(a) for a in (b.inputs, b.targets, b.docs)), 64, 32)
        loss.backward()  # grad_accum 1: loss / 1
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_grad_accumulation_matches_two_ranks(tiny_data, tmp_path):
    from trainer.data import TrainLoader, list_shards
    from trainer.model import GPT

    out = tmp_path / "grads.pt"
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_grads_on_rank, args=(r, 2, port, tiny_data, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    two_ranks = torch.load(out)

    cfg = _fast(tiny_data)
    torch.manual_seed(0)
    model = GPT(cfg.model, world_size=2)
    loader = TrainLoader(list_shards(tiny_data, "fineweb_train_*.bin"), bos_id=511, max_seq_len=256, rank=0,
                         world_size=1, seed=0)
    for _ in range(2):  # grad_accum 2, "mean": each micro-batch loss / 2
        b = loader.next_batch(512)
        (model(*(torch.from_numpy(a) for a in (b.inputs, b.targets, b.docs)), 64, 32) / 2).backward()
    loader.close()
    one_rank = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(one_rank) == set(two_ranks) and len(one_rank) > 10
    for n in one_rank:
        torch.testing.assert_close(one_rank[n].float(), two_ranks[n].float(), rtol=1e-5, atol=1e-6, msg=n)
    assert any(g.abs().sum() > 0 for g in one_rank.values())


# -- end to end under torchrun ------------------------------------------------------------------
@pytest.mark.e2e
def test_tiny_under_torchrun_two_ranks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # generate the preset's synthetic data first so the timing below is the training run itself
    subprocess.run([sys.executable, "-m", "trainer.data", "synth", "--out", str(tmp_path / "data/synth-tiny"),
                    "--train-tokens", "2000000", "--val-tokens", "32768", "--vocab", "512", "--seed", "1234",
                    "--mean-doc-len", "120", "--shard-tokens", "1000000"], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "trainer.train", "--preset", "tiny"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines and all(ln.startswith("{") and ln.endswith("}") for ln in lines), r.stdout[:2000]
    evs = [json.loads(ln) for ln in lines]
    _check_contract(evs)
    assert evs[0]["world_size"] == 2 and evs[0]["grad_accum"] == 1
    vals = [e for e in evs if e["event"] == "val"]
    assert [v["step"] for v in vals] == [0, 20, 40, 60, 64]
    assert vals[-1]["val_loss"] < 0.7 * vals[0]["val_loss"]
    assert [e["step"] for e in evs if e["event"] == "step"] == list(range(1, 65))
    print(f"tiny, torchrun 2 ranks: wall {wall:.1f} s, train {evs[-1]['train_time_ms'] / 1000:.1f} s, "
          f"val {vals[0]['val_loss']:.3f} → {vals[-1]['val_loss']:.3f}")
    assert wall < 90  # target < 30 s on an idle 2-core machine; generous against CI noise
