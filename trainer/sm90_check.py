"""Compile every Triton kernel the trainer launches, at each preset's shapes, for a Hopper GPU, on any machine.

    python -m trainer.sm90_check                           # speedrun, speedrun-1027, small; needs triton, no GPU
    python -m trainer.sm90_check --preset small --set model.fused_qkv=true --sweep --json out.json

Why: a kernel that compiles in Triton's interpreter (the CPU tests) can still fail to compile for a GPU, or
compile and then need more shared memory than an sm90 block may have (232,448 bytes on an H100 / H200) and
fail at launch, as one of mlp_relu2's persistent launches did on an H200 (session 8). Triton compiles for a
target given to it, without a GPU: this swaps Triton's driver for one that names sm90 and makes a kernel
launch compile instead (Triton's own binder, specialization and cache; nothing runs), then checks the
kernel's shared memory against the limit. What it covers: the kernels of trainer/qk_rotary.py,
trainer/head_ce.py, trainer/mlp_relu2.py and trainer/triton_polar.py, called through their Python launchers
with each preset's dimensions and every micro-batch size of its batch stages and eval where a size is a compile-time constant
(uninitialized tensors: shapes only). What it does not: Inductor's kernels (flex attention, the fused elementwise passes)
and FlashAttention-4 need a GPU to generate; register spills and speed are not looked at.
`benchmarks/gpu_acceptance.sh` on a GPU stays the definition of done; this is the check before it.

Each row's `use`: "default" (the preset runs it as configured), "option" (a config flag turns it on, or
the other value of one: both must compile) or "sweep" (mlp_relu2.SWEEP's benchmark candidates, which may
be too big for the GPU: reported, not failed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Iterator

import torch

SM90_SHARED_BYTES = 232_448  # the most dynamic shared memory one block may use on sm90 (227 KiB)
SM90_SMS = 132  # streaming multiprocessors of an H100 SXM / H200 (the persistent kernel's program count)
PRESETS = ("speedrun", "speedrun-1027", "small")
# Rows (tokens) where the row count is a runtime argument: Triton specializes an integer argument only on
# being 1, a multiple of 16 or ≥ 2³¹, so any multiple of 16 compiles what every micro-batch size runs.
ROWS = 1024


@dataclass
class Compiled:
    preset: str
    where: str  # which launcher and variant, e.g. "qk_rotary fwd (q, k)"
    use: str  # default | option | sweep
    kernel: str
    shared: int = 0  # bytes of shared memory per block
    warps: int = 0
    stages: int = 0
    seconds: float = 0.0  # compile time (0 when Triton's cache had it)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.shared <= SM90_SHARED_BYTES

    @property
    def verdict(self) -> str:
        if self.error:
            return "FAIL (compile)"
        return "PASS" if self.ok else f"FAIL (shared {self.shared:,} > {SM90_SHARED_BYTES:,} B)"


class _Sm90Driver:
    """What Triton's JIT asks of its driver when it compiles: the target, a device and stream key."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return "sm90-check"  # its own key in each kernel's per-device caches

    def get_current_stream(self, device=None):
        return 0


class Recorder:
    """Collects one Compiled per kernel launch made inside `compile_only`; `label` names the launches."""

    def __init__(self) -> None:
        self.rows: list[Compiled] = []
        self.context = ("", "", "default")

    @contextlib.contextmanager
    def label(self, preset: str, where: str, use: str) -> Iterator[None]:
        old, self.context = self.context, (preset, where, use)
        try:
            yield
        finally:
            self.context = old


@contextlib.contextmanager
def compile_only(capability: int = 90) -> Iterator[Recorder]:
    """Inside: a Triton kernel launch compiles for sm`capability` and is recorded, nothing runs; torch
    tensors say they are CUDA tensors (so the launchers pick their GPU variants) and torch.cuda reports
    an sm90 device of SM90_SMS multiprocessors. Everything is restored on exit."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sm90_check: unset TRITON_INTERPRET (the interpreter runs kernels, this compiles them)")
    from triton.runtime.driver import driver
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    rec = Recorder()
    run = JITFunction.run

    def compile_instead(fn, *args, grid, warmup, **kwargs):
        preset, where, use = rec.context
        row = Compiled(preset=preset, where=where, use=use, kernel=fn.fn.__name__)
        t0 = time.perf_counter()
        try:
            k = run(fn, *args, grid=grid, warmup=True, **kwargs)
            row.shared, row.warps, row.stages = k.metadata.shared, k.metadata.num_warps, k.metadata.num_stages
        except Exception as e:  # noqa: BLE001 (a compile error is this check's finding, not its failure)
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            row.error = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]
        row.seconds = time.perf_counter() - t0
        rec.rows.append(row)
        return None

    def interpreted(fn, *args, **kwargs):
        raise RuntimeError(f"sm90_check: {fn.fn.__name__} was defined under TRITON_INTERPRET=1 (an interpreted "
                           "kernel runs instead of compiling): run the check in a process without it")

    saved_driver, saved_interp = driver._active, InterpretedFunction.run
    saved = (torch.Tensor.is_cuda, torch.cuda.get_device_capability, torch.cuda.get_device_properties)
    driver.set_active(_Sm90Driver(capability))
    JITFunction.run = compile_instead
    InterpretedFunction.run = interpreted
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.get_device_capability = lambda device=None: (capability // 10, capability % 10)
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(multi_processor_count=SM90_SMS)
    try:
        yield rec
    finally:
        JITFunction.run, InterpretedFunction.run = run, saved_interp
        driver._active = saved_driver
        (torch.Tensor.is_cuda, torch.cuda.get_device_capability, torch.cuda.get_device_properties) = saved


def micro_tokens(cfg) -> list[int]:
    """Tokens per micro-batch (rows of every token-wise kernel) of each batch stage and of eval."""
    from trainer.schedule import stages

    ref = cfg.runtime.reference_world_size
    return sorted({bs // ref for _, bs in stages(cfg.schedule)} | {cfg.eval.val_batch_size // ref})


def polar_shapes(cfg) -> list[tuple[int, int]]:
    """(m, n), m ≤ n, of the matrices NorMuon hands Polar Express (trainer/normuon.py: attention viewed as
    d × d blocks, the rest whole), from the model built on the meta device."""
    from trainer.model import GPT
    from trainer.normuon import NorMuon

    with torch.device("meta"):
        model = GPT(cfg.model)
    on = cfg.optim.normuon_families()
    opt = NorMuon([(f, p) for f, p in model.param_families() if f in on], cfg, 0, 1)
    shapes = {tuple(sorted((r.attn_d, r.attn_d) if r.attn_d else g.shape)) for g in opt.groups for r in g.runs}
    return sorted(shapes)


def _empty(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)  # never touched: the pages of a large one are not even mapped


def check_config(cfg, name: str, rec: Recorder, sweep: bool = False) -> None:
    """Launch (compile) every Triton kernel `cfg` can use, at its shapes, under `compile_only`."""
    from trainer import head_ce, mlp_relu2, qk_rotary, triton_polar

    m = cfg.model
    rows = micro_tokens(cfg)
    d, H, D, V, hid = m.model_dim, m.num_heads, m.head_dim, m.padded_vocab, m.hidden_dim
    if m.qk_norm and qk_rotary.fits(D):
        T = ROWS
        cos = _empty(T, 1, D // 2)
        qkv = _empty(T, 3, H, D)
        q, k, _ = qkv.unbind(1)
        fused = "default" if m.fused_qk_rotary else "option"
        with rec.label(name, "qk_rotary fwd + bwd (q, k)", fused if not m.fused_qkv else "option"):
            out_q, out_k, rstd = qk_rotary.qk_norm_rotary_fwd(q, k, cos, cos, 1e-6)
            qk_rotary.qk_norm_rotary_bwd(q, k, out_q, out_k, cos, cos, rstd)
        for ve in (None, _empty(T, H, D)):
            use = fused if m.fused_qkv else "option"
            with rec.label(name, f"qk_rotary fwd + bwd (qkv{' + ve' if ve is not None else ''})", use):
                out_q, out_k, out_v, rstd = qk_rotary.qkv_norm_rotary_fwd(qkv, ve, cos, cos, 1e-6)
                qk_rotary.qkv_norm_rotary_bwd(qkv, out_q, out_k, out_v, cos, cos, rstd)
    if m.fp8_head:
        use = "default" if m.fused_head_ce else "option"
        N = ROWS
        logits, targets = _empty(N, V), _empty(N, dtype=torch.int64)
        for save_z in (head_ce.SAVE_Z, not head_ce.SAVE_Z):
            with rec.label(name, f"head_ce lse + grad{' (z kept)' if save_z else ''}",
                           use if save_z == head_ce.SAVE_Z else "option"):
                _, lse, *z = head_ce.lse_pass(logits, targets, 30.0, 7.5, **head_ce.LSE_LAUNCH, store_z=save_z)
                head_ce.grad_pass(z[0] if save_z else logits, targets, lse, _empty(1, dtype=torch.float32), 30.0,
                                  7.5, 1 / 448, **head_ce.GRAD_LAUNCH, from_z=save_z)
        with rec.label(name, "head_ce Gᵀ copy", use if not head_ce.GRAD_WRITES_T else "option"):
            head_ce.transpose_pass(_empty(N, V, dtype=torch.float8_e5m2), **head_ce.TRANSPOSE_LAUNCH)
        for save_z in (head_ce.SAVE_Z, not head_ce.SAVE_Z):
            both = use if head_ce.GRAD_WRITES_T and save_z == head_ce.SAVE_Z else "option"
            with rec.label(name, f"head_ce G + Gᵀ in one pass{' (from z)' if save_z else ''}", both):
                head_ce.grad_both_pass(logits, targets, _empty(N, dtype=torch.float32),
                                       _empty(1, dtype=torch.float32), 30.0, 7.5, 1 / 448, **head_ce.GRAD_BOTH_LAUNCH,
                                       from_z=save_z)
    if m.mlp_activation == "relu2":
        tall = m.weight_layout == "tall"
        w_fc = _empty(hid, d) if tall else _empty(d, hid)
        w1, w2 = mlp_relu2._w1(w_fc, tall), mlp_relu2._w2(w_fc, tall)
        launches = [("model", mlp_relu2.FWD_LAUNCH, mlp_relu2.BWD_LAUNCH, "default" if m.fused_relu2 else "option")]
        if sweep:
            launches += [(f"SWEEP[{i}]", s, s, "sweep") for i, s in enumerate(mlp_relu2.SWEEP)]
        for tag, fwd, bwd, use in launches:
            kind = "persistent" if fwd.get("persistent") else "TMA" if fwd["tma"] else "pointers"
            desc = f"{fwd['block_m']}×{fwd['block_n']}×{fwd['block_k']} w{fwd['warps']} s{fwd['stages']} {kind}"
            for M in (rows if fwd.get("persistent") else rows[-1:]):  # M is a constexpr of the persistent one
                with rec.label(name, f"mlp_relu2 A {tag} ({desc}, M={M})", use):
                    mlp_relu2.up_relu2(_empty(M, d), w1, fwd, keep_pre=mlp_relu2.KEEP_PRE)
                with rec.label(name, f"mlp_relu2 B {tag} ({desc}, M={M})", use):
                    mlp_relu2.relu2_grad(_empty(M, d), w2.t(), _empty(M, hid), bwd)
    if cfg.optim.muon.polar_backend != "torch":
        for mm, nn in polar_shapes(cfg):
            with rec.label(name, f"polar {mm}×{nn}", "default"):
                a = triton_polar.xxt(_empty(1, mm, nn))
                triton_polar.ba_plus_caa(a, -4.0, 2.0)


def check(presets: list[str], sets: list[str], sweep: bool = False) -> list[Compiled]:
    from trainer.config import parse_set
    from trainer.presets import load_config

    with compile_only() as rec:
        for p in presets:
            check_config(load_config(p, parse_set(sets)), p, rec, sweep)
    return rec.rows


def summarize(rows: list[Compiled]) -> list[Compiled]:
    """One row per (preset, where, kernel): the largest shared memory, any error, the compile time summed."""
    out: dict[tuple[str, str, str], Compiled] = {}
    for r in rows:
        key = (r.preset, r.where, r.kernel)
        if key not in out:
            out[key] = Compiled(**asdict(r))
            continue
        o = out[key]
        o.seconds += r.seconds
        o.error = o.error or r.error
        if r.shared > o.shared:
            o.shared, o.warps, o.stages = r.shared, r.warps, r.stages
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.sm90_check", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 when every default and option kernel compiles and fits, "
                                        "1 otherwise, 2 on bad input (e.g. no triton).")
    ap.add_argument("--preset", action="append", choices=PRESETS + ("tiny",),
                    help=f"repeatable; default: {', '.join(PRESETS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--sweep", action="store_true", help="also mlp_relu2.SWEEP's launches (bench_mlp's candidates)")
    ap.add_argument("--json", metavar="FILE", help="write every row as JSON here")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("sm90_check: triton is not importable; install it (pip install triton==3.6.0: the GPU machine's "
              "version) to compile for a GPU without one", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sm90_check: TRITON_INTERPRET=1 makes Triton run kernels in its interpreter; run the check "
              "without it (env -u TRITON_INTERPRET python -m trainer.sm90_check)", file=sys.stderr)
        return 2
    from trainer.config import ConfigError

    try:
        rows = summarize(check(args.preset or list(PRESETS), args.set, args.sweep))
    except ConfigError as e:
        print(f"sm90_check: {e}", file=sys.stderr)
        return 2
    w = max(len(r.where) for r in rows)
    print(f"{'preset':<14} {'use':<7} {'kernel':<22} {'where':<{w}} {'shared B':>9} {'warps':>5} {'st':>3} "
          f"{'compile s':>9}  verdict")
    for r in rows:
        print(f"{r.preset:<14} {r.use:<7} {r.kernel:<22} {r.where:<{w}} {r.shared:>9,} {r.warps:>5} {r.stages:>3} "
              f"{r.seconds:>9.1f}  {r.verdict}{'  ' + r.error if r.error else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "ok": r.ok} for r in rows], f, indent=1)
    bad = [r for r in rows if not r.ok and r.use != "sweep"]
    sweep_bad = [r for r in rows if not r.ok and r.use == "sweep"]
    print(f"{len(rows)} kernels × shapes compiled for sm90: {len(rows) - len(bad) - len(sweep_bad)} pass, "
          f"{len(bad)} fail" + (f", {len(sweep_bad)} sweep candidates cannot launch on sm90" if sweep_bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
