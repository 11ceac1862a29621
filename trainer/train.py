"""Train one run: `main(cfg) -> end event`, and the command line around it.

    torchrun --standalone --nproc_per_node=8 -m trainer.train --preset speedrun
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m trainer.train --preset tiny
    python -m trainer.train --preset tiny --set optim.muon.lr=0.03 --seed 3
    python -m trainer.train --list-keys | --print-config

stdout carries only JSON-lines events from rank 0 (trainer/events.py, docs/trainer.md); logs go
to stderr. Exit codes: 0 ok, 2 bad input (config, world size, data, missing CUDA) with a one-line
message on stderr, debug.exit_code for an injected failure, 1 otherwise; an `error` event is
printed first. Importing this module has no side effects (Ray and tests call `main`).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from trainer.clock import StepClock
from trainer.config import ConfigError, TrainConfig, apply_overrides, config_hash, parse_set, to_dict
from trainer.data import Batch, DataError, TrainLoader, data_provenance, ensure_data, val_batches
from trainer.events import Emitter
from trainer.feed import Feed
from trainer.graphs import MicroSteps
from trainer.presets import load_config
from trainer.schedule import batch_tokens, lr_multiplier, muon_momentum, short_window, stages, total_tokens, window_blocks


class InputError(ValueError):
    """Bad input detected by the trainer (world size, device): exit status 2."""


class InjectedFailure(RuntimeError):
    """debug.fail_at_step fired; `exit_code` is debug.exit_code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


INPUT_ERRORS = (ConfigError, DataError, InputError)


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------
def launcher_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    def env_int(name: str, default: int) -> int:
        raw = os.environ.get(name, str(default))
        try:
            return int(raw)
        except ValueError:
            raise InputError(f"environment {name}={raw!r} is not an integer (set by torchrun)") from None

    return env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0)


def resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    want = cfg.runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise InputError("runtime.device='cuda' but CUDA is not available (torch "
                         f"{torch.__version__}); use --set runtime.device=cpu or run on a GPU node")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                         "visible; start at most that many processes per node")
    return torch.device("cuda", local_rank)


def resolve_backend(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """cfg with model.attn_backend made concrete for `device` ("auto": fa4 on a Hopper+ GPU where
    flash-attn-4 imports, else flex on GPU, sdpa on CPU). Asking for fa4 where it cannot run is an
    InputError naming the fix. The resolved name is what the start event, the run's config hash
    and the result row carry."""
    from trainer.fa4 import FA4_INSTALL, fa4_available

    want = cfg.model.attn_backend
    if want == "auto":
        if device.type == "cpu":
            got = "sdpa"
        else:
            got = "fa4" if fa4_available(device)[0] else "flex"
        return apply_overrides(cfg, {"model.attn_backend": got})
    if want == "fa4":
        ok, why = fa4_available(device)
        if not ok:
            raise InputError(f"model.attn_backend='fa4' cannot run here: {why}. It needs flash-attn-4 "
                             f"(`{FA4_INSTALL}`) on a Hopper or newer GPU; use model.attn_backend=flex or auto")
    return cfg


def check_run(cfg: TrainConfig, world_size: int, device: torch.device) -> int:
    """Validate what depends on the world size and device; return grad_accum."""
    ref = cfg.runtime.reference_world_size
    if world_size < 1 or ref % world_size:
        raise InputError(f"world size {world_size} does not divide runtime.reference_world_size={ref}; run "
                         f"on a divisor of {ref} ranks or change runtime.reference_world_size")
    s = cfg.schedule
    for bs in (*s.train_bs_schedule, s.train_bs_extension):
        if bs % ref:
            raise ConfigError(f"schedule.train_bs_schedule/train_bs_extension={bs} is invalid: global batch "
                              f"tokens must be divisible by runtime.reference_world_size={ref}")
    e = cfg.eval
    if e.val_batch_size % ref or e.val_tokens % e.val_batch_size:
        raise ConfigError(f"eval.val_batch_size={e.val_batch_size} / eval.val_tokens={e.val_tokens} are invalid: "
                          f"val_batch_size must be divisible by runtime.reference_world_size={ref} and "
                          "val_tokens by val_batch_size")
    if cfg.model.attn_backend == "flex" and device.type == "cpu":
        raise ConfigError("model.attn_backend='flex' is invalid on CPU: PyTorch has no CPU backward for "
                          "FlexAttention; use --set model.attn_backend=sdpa (or run on a GPU)")
    if cfg.model.padded_vocab % world_size:
        raise ConfigError(f"model.vocab_pad_multiple={cfg.model.vocab_pad_multiple} is invalid for world size "
                          f"{world_size}: the padded vocabulary must be divisible by it (DistAdam shards rows)")
    return ref // world_size


def init_distributed(world_size: int, rank: int, device: torch.device) -> bool:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); True if this call created it.
    An existing group (a long-lived worker's, trainer.serve) is used if its backend fits the device."""
    import torch.distributed as dist

    if world_size == 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise InputError(f"the existing process group uses {dist.get_backend()} but runtime.device="
                             f"{device.type} needs {backend}; run this config in a new process (or worker)")
        return False
    if device.type == "cuda":
        dist.init_process_group(backend=backend, device_id=device)
    else:
        dist.init_process_group(backend=backend)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise InputError(f"process group is rank {dist.get_rank()}/{dist.get_world_size()} but the environment "
                         f"says {rank}/{world_size}")
    return True


def synth_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    sy = cfg.data.synth
    return dict(train_tokens=sy.train_tokens, val_tokens=sy.val_tokens, vocab=cfg.model.vocab_size,
                bos_id=cfg.data.bos_id, seed=sy.seed, mean_doc_len=sy.mean_doc_len, zipf_a=sy.zipf_a,
                shard_tokens=sy.shard_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass
class _Run:
    cfg: TrainConfig
    device: torch.device
    rank: int
    world_size: int
    grad_accum: int
    model: torch.nn.Module  # the GPT (state dict, rotary, families)
    fwd: Any  # model or its compiled wrapper
    muon: Any
    adam: Any
    muon_params: list
    all_params: list
    feed: Feed
    val: list  # DeviceBatch per validation forward
    steps: MicroSteps  # each micro-batch's forward + backward, from CUDA graphs where enabled
    long: int = 0  # long window (blocks) the rotary is currently extended to
    _win_cache: dict = dataclasses.field(default_factory=dict)
    kept: Any = None  # the worker's _Kept entry this run uses (trainer.serve), else None

    def win(self, blocks: int):
        """Window in tokens as the model wants it: a cached 0-d tensor for flex (on the device) and
        fa4 (on the CPU), so one compiled graph serves every window; a Python int for sdpa (its
        banded mask needs static sizes)."""
        tokens = blocks * self.cfg.schedule.block_size
        backend = self.cfg.model.attn_backend
        if backend not in ("flex", "fa4"):
            return tokens
        t = self._win_cache.get(tokens)
        if t is None:
            dev = self.device if backend == "flex" else torch.device("cpu")
            t = self._win_cache[tokens] = torch.tensor(tokens, dtype=torch.int32, device=dev)
        return t

    def forward(self, b, long: int, short: int):
        return self.fwd(b.inputs, b.targets, b.docs, self.win(long), self.win(short), cu_seqlens=b.cu_seqlens,
                        max_seqlen=b.max_seqlen)

    def set_window(self, long: int) -> None:
        if long != self.long:
            bsz = self.cfg.schedule.block_size
            self.model.rotary.extend(self.long * bsz, long * bsz)
            self.long = long

    def train_step(self, loader: TrainLoader, sched_step: int, parity: int,
                   window: tuple[int, int] | None = None, bs: int | None = None) -> None:
        """Forward/backward over grad_accum micro-batches, then the optimizer steps of `parity`."""
        cfg, s = self.cfg, self.cfg.schedule
        long, short = window or window_blocks(s, sched_step)
        self.set_window(long)
        T = (bs or batch_tokens(s, sched_step)) // cfg.runtime.reference_world_size
        div = self.grad_accum if cfg.optim.grad_reduction == "mean" else 1

        def fwd_bwd(b) -> None:
            loss = self.forward(b, long, short)
            (loss / div if div > 1 else loss).backward()

        key = (long, short, self.model.rotary.attn_scale)  # what a captured graph bakes in besides shapes
        for _ in range(self.grad_accum):
            self.steps.run(fwd_bwd, self.feed(loader.next_batch(T)), key)
        lr = lr_multiplier(s, sched_step)
        self.muon.step(lr, muon_momentum(cfg.optim.muon, s, sched_step))
        if cfg.optim.adam.every_other_step and parity % 2 == 0:
            self.steps.clear(self.muon_params)  # Adam keeps accumulating over the pair of steps
        else:
            self.adam.step(lr)
            self.steps.clear(self.all_params)

    @torch.no_grad()
    def evaluate(self, long: int, short: int, limit: int | None = None) -> float:
        self.model.eval()
        try:
            total = torch.zeros((), device=self.device, dtype=torch.float32)
            batches = self.val[:limit] if limit else self.val
            for b in batches:
                total += self.forward(b, long, short).float()
            total /= len(batches)
            if self.world_size > 1 and limit is None:
                import torch.distributed as dist

                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                total /= self.world_size
            return float(total.item())
        finally:
            self.model.train()


@dataclass
class _Kept:
    """What a long-lived worker (trainer.serve) keeps for the next run with the same model config:
    the model, its compiled wrapper, and the CUDA graphs of the micro-batches with the window
    tensors they read (trainer/graphs.py: a later run replays them instead of capturing its own)."""
    model: torch.nn.Module
    fwd: Any
    steps: MicroSteps | None = None
    win_cache: dict = dataclasses.field(default_factory=dict)
    warmed: set = dataclasses.field(default_factory=set)  # _warm_signature of every config warmed up here


# One entry, replaced when the model key changes.
_KEPT: dict[tuple, _Kept] = {}


def _model_key(cfg: TrainConfig, device: torch.device, world_size: int) -> tuple:
    return (json.dumps(dataclasses.asdict(cfg.model), sort_keys=True, default=str), str(device), world_size,
            bool(device.type == "cuda" and cfg.runtime.compile))


def _warm_signature(cfg: TrainConfig) -> str:
    """The config a warmup is good for: all of it but the seed (which only sets the initial weights
    and, with data.order shuffled, the batches: neither a shape nor a compiled constant)."""
    d = to_dict(cfg)
    d.pop("seed", None)
    return json.dumps(d, sort_keys=True, default=str)


@torch.no_grad()
def _adopt(kept: torch.nn.Module, fresh: torch.nn.Module, keep_grads: bool = False) -> None:
    """Give `kept` the exact initial state of `fresh` (same class and config), in place: every
    parameter and buffer (persistent or not) is copied, so the tensors a compiled graph was traced
    with stay the same objects and no recompile happens. The rotary tables are sized by the run's
    batch and eval shapes, which the model key leaves out: they are recomputed at the fresh run's
    length (new tensors, and one recompile, only where that length changed). Gradients are dropped,
    or with keep_grads kept as tensors (kept CUDA graphs accumulate into those very tensors; the run's
    MicroSteps.rebind zeroes them)."""
    for (_, dst), (_, src) in zip(kept.named_parameters(), fresh.named_parameters(), strict=True):
        dst.copy_(src)
        if not keep_grads:
            dst.grad = None
    tables = {"rotary.cos_table", "rotary.sin_table"}
    for (name, dst), (_, src) in zip(kept.named_buffers(), fresh.named_buffers(), strict=True):
        if name not in tables:
            dst.copy_(src)
    kept.rotary.reset()
    kept.rotary.precompute(fresh.rotary.cos_table.shape[0])
    kept.train()


def longest_forward(cfg: TrainConfig) -> int:
    """Tokens of the longest flat sequence one rank's forward sees: the largest training
    micro-batch (any batch stage or the extension) or eval batch."""
    s, ref = cfg.schedule, cfg.runtime.reference_world_size
    return max(*s.train_bs_schedule, s.train_bs_extension, cfg.eval.val_batch_size) // ref


def _build(cfg: TrainConfig, device: torch.device, rank: int, world_size: int, grad_accum: int,
           val_files: list, reuse: bool = False) -> _Run:
    from trainer.adam import DistAdam
    from trainer.model import GPT, fp8_supported
    from trainer.normuon import NorMuon

    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model, world_size=world_size).to(device)
    model.fp8 = bool(cfg.model.fp8_head and fp8_supported(device))
    model.rotary.precompute(longest_forward(cfg))
    key = _model_key(cfg, device, world_size)
    kept = _KEPT.get(key) if reuse else None
    if kept is not None:  # a warm worker: same weights as a fresh build, the compiled graphs kept
        _adopt(kept.model, model, keep_grads=kept.steps is not None and bool(kept.steps.graphs))
        del model  # fp8 is a function of the key (model config, device)
        model, fwd = kept.model, kept.fwd
    else:
        _KEPT.clear()
        fwd = model
        if device.type == "cuda" and cfg.runtime.compile:
            import torch._dynamo as dynamo

            if hasattr(dynamo.config, "recompile_limit"):
                dynamo.config.recompile_limit = 64
            else:
                dynamo.config.cache_size_limit = 64
            fwd = torch.compile(model, dynamic=False, fullgraph=True)
        if reuse:
            kept = _KEPT[key] = _Kept(model, fwd)
    fams = model.param_families()
    on_muon = cfg.optim.normuon_families()  # optim.optimizer: the rest go to Adam
    muon_params = [(f, p) for f, p in fams if f in on_muon]
    adam_params = [(f, p) for f, p in fams if f not in on_muon]
    muon = NorMuon(muon_params, cfg, rank, world_size)
    adam = DistAdam(adam_params, cfg, rank, world_size)
    ref = cfg.runtime.reference_world_size
    feed = Feed(cfg.model.attn_backend, device, max_seqlen=cfg.data.train_max_seq_len, aligned=cfg.data.align_bos)
    val: list[Batch] = val_batches(val_files, val_tokens=cfg.eval.val_tokens,
                                   tokens_per_forward=cfg.eval.val_batch_size // ref, rank=rank,
                                   world_size=world_size, bos_id=cfg.data.bos_id)
    rt = cfg.runtime
    graphs = (rt.cuda_graphs and rt.compile and device.type == "cuda" and cfg.model.attn_backend in ("fa4", "flex"))
    all_params = [p for _, p in fams]
    steps = kept.steps if kept is not None and kept.steps is not None and kept.steps.enabled == graphs else None
    if steps is None:
        steps = MicroSteps(device, all_params, enabled=graphs)
        if kept is not None:
            kept.steps = steps
            kept.warmed.clear()  # new graphs to capture: no config counts as warmed up any more
    # What the graphs bake in besides their keys: the loss scale and the rotary tables' memory.
    div = grad_accum if cfg.optim.grad_reduction == "mean" else 1
    rot = model.rotary
    if not steps.rebind(all_params, (div, rot.cos_table.data_ptr(), rot.sin_table.data_ptr())) and kept is not None:
        kept.warmed.clear()
    return _Run(cfg=cfg, device=device, rank=rank, world_size=world_size, grad_accum=grad_accum, model=model,
                fwd=fwd, muon=muon, adam=adam, muon_params=[p for _, p in muon_params],
                all_params=all_params, feed=feed, val=feed.eval_batches(val), steps=steps,
                long=window_blocks(cfg.schedule, 0)[0], _win_cache=kept.win_cache if kept is not None else {},
                kept=kept)


def _loader(cfg: TrainConfig, files: list, rank: int, world_size: int) -> TrainLoader:
    return TrainLoader(files, bos_id=cfg.data.bos_id, max_seq_len=cfg.data.train_max_seq_len, rank=rank,
                       world_size=world_size, seed=cfg.seed, align_bos=cfg.data.align_bos, order=cfg.data.order,
                       group=cfg.runtime.reference_world_size)


def _warmup(run: _Run, train_files: list) -> tuple[float, float]:
    """Run every (window, batch) stage, then restore the initial state. Returns (warmup_s, compile_s)."""
    cfg, s = run.cfg, run.cfg.schedule
    t0 = time.perf_counter()
    model_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    muon_state, adam_state = run.muon.state_dict(), run.adam.state_dict()
    loader = _loader(cfg, train_files, run.rank, run.world_size)
    compile_s, n = 0.0, 0
    try:
        for long, bs in stages(s):
            first = next(i for i in range(s.num_iterations) if window_blocks(s, i)[0] == long
                         and batch_tokens(s, i) == bs)
            t_stage = time.perf_counter()
            for _ in range(cfg.runtime.warmup_steps_per_stage):
                run.train_step(loader, first, n, window=(long, short_window(s, long)), bs=bs)
                if n == 0:
                    _sync(run.device)
                    compile_s = time.perf_counter() - t0
                n += 1
            run.evaluate(long, short_window(s, long), limit=1)
            if run.rank == 0:  # progress for humans on stderr; stdout stays JSON lines only
                _sync(run.device)
                print(f"[trainer] warmup stage window={long} batch={bs}: {time.perf_counter() - t_stage:.1f} s "
                      f"(total {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        run.evaluate(s.ws_validate, window_blocks(s, s.num_iterations)[1], limit=1)
    finally:
        loader.close()
    with torch.no_grad():
        run.model.load_state_dict(model_state)
    run.muon.load_state_dict(muon_state)
    run.adam.load_state_dict(adam_state)
    run.muon.reset()
    run.adam.reset()
    run.model.rotary.reset()
    run.long = window_blocks(s, 0)[0]
    run.steps.clear(run.all_params)
    del model_state, muon_state, adam_state
    gc.collect()
    _sync(run.device)
    return time.perf_counter() - t0, compile_s


def _train(cfg: TrainConfig, ev: Emitter, rank: int, world_size: int, device: torch.device,
           grad_accum: int, train_files: list, val_files: list, reuse: bool = False) -> dict:
    run = _build(cfg, device, rank, world_size, grad_accum, val_files, reuse=reuse)
    warmup_s = compile_s = 0.0
    kept = run.kept
    sig = _warm_signature(cfg)
    warmed = kept is not None and sig in kept.warmed  # this worker ran this very config's warmup before
    if cfg.runtime.warmup and cfg.runtime.warmup_steps_per_stage > 0 and not warmed:
        warmup_s, compile_s = _warmup(run, train_files)
        if kept is not None:
            kept.warmed.add(sig)
    ev.emit("warmup", warmup_s=warmup_s, compile_s=compile_s, skipped=warmed)

    s = cfg.schedule
    N = s.num_iterations
    loader = _loader(cfg, train_files, rank, world_size)
    train_ms, eval_s, final_val = 0.0, 0.0, float("nan")
    # Timed like the record: the device is synchronised only around validation; step events come
    # from timing events the device has already passed (trainer/clock.py), never from a wait.
    clock = StepClock(device, every=cfg.runtime.log_every) if ev.enabled else None

    def emit_steps(wait: bool = False) -> None:
        for n, t_ms, s_ms in clock.ready(wait) if clock else ():
            ev.emit("step", step=n, train_time_ms=t_ms, step_ms=s_ms)

    try:
        _sync(device)
        t0 = time.perf_counter()
        if clock:
            clock.restart(train_ms, 0)
        for step in range(N + 1):
            last = step == N
            if step == cfg.debug.fail_at_step:
                raise InjectedFailure(f"debug.fail_at_step={step} reached (injected failure)", cfg.debug.exit_code)
            long, short = window_blocks(s, step)
            run.set_window(long)
            if last or (cfg.eval.val_loss_every > 0 and step % cfg.eval.val_loss_every == 0):
                _sync(device)
                train_ms += 1000 * (time.perf_counter() - t0)
                emit_steps(wait=True)
                t_eval = time.perf_counter()
                final_val = run.evaluate(s.ws_validate if last else long, short)
                ev.emit("val", step=step, val_loss=final_val, train_time_ms=train_ms)
                _sync(device)
                t0 = time.perf_counter()
                eval_s += t0 - t_eval
                if clock:
                    clock.restart(train_ms, step)
            if last:
                break
            run.train_step(loader, step, step)
            if clock:
                clock.mark(step + 1)
                emit_steps()
    finally:
        loader.close()
    return ev.emit("end", final_val_loss=final_val, train_time_ms=train_ms, steps=N, tokens=total_tokens(s),
                   peak_mem_mib=_peak_mem_mib(device), warmup_s=warmup_s, compile_s=compile_s, eval_s=eval_s)


def main(cfg: TrainConfig, reuse: bool = False) -> dict:
    """Run the training described by cfg in this process (one rank); return the `end` event.

    Under torchrun every rank calls this; rank 0 prints the events. Raises ConfigError /
    DataError / InputError for bad input and InjectedFailure for debug.fail_at_step, after
    printing an `error` event. A process group that already exists is used and left alone.
    `reuse=True` (trainer.serve) keeps, for the next call, the process group and, while the model
    config stays the same, the model and its compiled graphs; that call then starts from the same
    initial weights without recompiling."""
    rank, world_size, local_rank = 0, 1, 0
    ev = Emitter(enabled=os.environ.get("RANK", "0") == "0")
    created = False
    try:
        rank, world_size, local_rank = launcher_world()
        ev.enabled = rank == 0
        device = resolve_device(cfg, local_rank)
        cfg = resolve_backend(cfg, device)
        grad_accum = check_run(cfg, world_size, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.reset_peak_memory_stats(device)
            if cfg.runtime.inductor_cache_dir:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cfg.runtime.inductor_cache_dir, "inductor")
                os.environ["TRITON_CACHE_DIR"] = os.path.join(cfg.runtime.inductor_cache_dir, "triton")
        created = init_distributed(world_size, rank, device)
        from trainer.env import provenance

        d = cfg.data  # shards first (generated when synthetic), so that `start` can say what they are
        train_files, val_files = ensure_data(d.data_dir, train_pattern=d.train_pattern, val_pattern=d.val_pattern,
                                             synthetic=d.synthetic, synth=synth_kwargs(cfg))
        ev.emit("start", config=to_dict(cfg), config_hash=config_hash(cfg), seed=cfg.seed, world_size=world_size,
                grad_accum=grad_accum, env=provenance(), data=data_provenance(d.data_dir, train_files, val_files))
        return _train(cfg, ev, rank, world_size, device, grad_accum, train_files, val_files, reuse=reuse)
    except BaseException as e:
        ev.emit("error", type=type(e).__name__, message=_one_line(e))
        raise
    finally:
        if created and not reuse:  # a long-lived worker keeps its group (trainer.serve ends it)
            import torch.distributed as dist

            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: error event + one line, exit 2
        if os.environ.get("RANK", "0") == "0":
            Emitter().emit("error", type="UsageError", message=message)
            print(f"error: {message} (see python -m trainer.train --help)", file=sys.stderr)
        raise SystemExit(2)


def cli(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="python -m trainer.train", description="Train one run; JSON-lines events on stdout.")
    ap.add_argument("--preset", default="speedrun", help="speedrun | speedrun-1027 | small | tiny")
    ap.add_argument("--config", help="YAML file of (nested or dotted) overrides, applied before --set")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (repeat)")
    ap.add_argument("--seed", type=int, help="run seed (init; document order too with data.order=shuffled)")
    ap.add_argument("--list-keys", action="store_true",
                    help="print every dotted config key with its type, value in --preset and meaning, and exit")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    args = ap.parse_args(argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    if args.list_keys:
        return _list_keys(args.preset, rank0)
    try:
        cfg = load_config(args.preset, parse_set(args.set), args.config, args.seed)
    except ConfigError as e:
        if rank0:
            Emitter().emit("error", type="ConfigError", message=_one_line(e))
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    return main_exit_code(cfg, rank0)


def _list_keys(preset: str, rank0: bool) -> int:
    """`--list-keys`: one line per key, `key  type  value-in-preset  meaning`, in aligned columns."""
    from trainer.config import describe_keys
    from trainer.presets import get_preset

    try:
        rows = describe_keys(get_preset(preset))
    except ConfigError as e:
        if rank0:
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    cells = [(r["key"], r["type"], json.dumps(r["default"], ensure_ascii=False), r["meaning"]) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(3)]
    print(f"# {len(cells)} keys; values of preset {preset!r}; set with --set KEY=VALUE")
    for c in cells:
        print(f"{c[0]:<{w[0]}}  {c[1]:<{w[1]}}  {c[2]:<{w[2]}}  {c[3]}")
    return 0


def main_exit_code(cfg: TrainConfig, rank0: bool, reuse: bool = False) -> int:
    """main(cfg) with the command line's exit codes: 0 ok, 2 bad input (one line on stderr),
    debug.exit_code for an injected failure, 130 interrupted, 1 otherwise (traceback on stderr)."""
    try:
        main(cfg, reuse=reuse)
    except INPUT_ERRORS as e:
        if rank0:
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except InjectedFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


__all__ = ["main", "main_exit_code", "cli", "InputError", "InjectedFailure", "INPUT_ERRORS", "check_run", "resolve_backend",
           "synth_kwargs"]

if __name__ == "__main__":
    sys.exit(cli())
