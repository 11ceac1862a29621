"""The relu² MLP fused into its matmuls (trainer/mlp_relu2.py) against the unfused compiled path.

    PYTHONPATH=$PWD python3 benchmarks/bench_mlp.py [--rows 49152] [--dim 768] [--reps 20] [--layouts wide,tall]

At one micro-batch of the speedrun's last stage (rows × dim bf16 activations, hidden = 4·dim), per
weight layout (`wide`, c_fc/c_proj (d, 4d): speedrun-1027; `tall`, (4d, d): speedrun, the 12-11
record), times:
  (i)   the MLP forward: the model's unfused code under torch.compile (cuBLAS matmuls and
        Inductor's relu² pass) against trainer.mlp_relu2.mlp_relu2 with the current launches;
  (ii)  forward + backward of both (torch.autograd.grad of x, c_fc, c_proj for a fixed output gradient),
        with the current constants, then the persistent kernel keeping pre, then the persistent kernel
        keeping only a (the backward's relu(pre) = √a; mlp_relu2.KEEP_PRE=False);
  (iii) the two fused kernels alone for every launch in mlp_relu2.SWEEP ("pers": the persistent kernel,
        also timed without writing pre / with the gradient from a): kernel A (x @ W1 with
        pre and relu² written) against cuBLAS's x @ W1 plus Inductor's relu² pass, and kernel B
        (g @ W2ᵀ with the relu² derivative) against cuBLAS's g @ W2ᵀ plus Inductor's 2·relu(pre)·ga;
        the bare cuBLAS matmul is printed as the floor.
Prints ms per call, TFLOP/s of the matmuls (2·rows·dim·hidden per GEMM) and the ratio unfused/fused
(> 1: the fused path is faster). Every fused result is checked against the unfused one (max abs
and norm-relative error printed); a check that fails stops the run with exit status 1. GPU only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

REL_TOL = 1e-2  # norm-relative difference fused vs unfused; bf16 roundings of the same math differ by ~1e-3


def timed(fn, reps: int) -> float:
    """ms per call: one untimed call (compiles), then `reps` between CUDA events (bench_polar's timer);
    on the CPU dry run (--device cpu) one call, wall clock."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from bench_polar import time_ms

    return time_ms(fn, reps, warmup=1)


class CheckFailed(Exception):
    pass


def compare(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = REL_TOL) -> str:
    """'max abs …, rel …' of got against want; raises CheckFailed past tol."""
    got, want = got.detach().float(), want.detach().float()
    diff = got - want
    rel = float(diff.norm() / want.norm().clamp_min(1e-30))
    text = f"{name}: max abs {float(diff.abs().max()):.3g}, rel {rel:.3g}"
    if not rel <= tol:  # also catches NaN
        raise CheckFailed(text + f" > {tol}")
    return text


def unfused_mlp(x: torch.Tensor, fc: torch.Tensor, pj: torch.Tensor, tall: bool) -> torch.Tensor:
    """trainer/model.py's MLP.forward with mlp_activation relu2."""
    if tall:
        return F.linear(F.relu(F.linear(x, fc)).square(), pj.t())
    return F.linear(F.relu(F.linear(x, fc.t())).square(), pj)


def bench_layout(tall: bool, M: int, d: int, reps: int, sweep: bool, dev: str = "cuda") -> None:
    from trainer import mlp_relu2 as mr

    hid = 4 * d
    name = "tall (4d, d), speedrun" if tall else "wide (d, 4d), speedrun-1027"
    print(f"\n=== layout {name}: x ({M}, {d}) bf16, hidden {hid}")
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (hid, d) if tall else (d, hid)
    x = torch.randn(M, d, device=dev, generator=gen).bfloat16()
    fc = ((torch.rand(shape, device=dev, generator=gen) * 2 - 1) * 3 ** 0.5 * 0.5 * d ** -0.5).bfloat16()
    pj = (torch.randn(shape, device=dev, generator=gen) * hid ** -0.5).bfloat16()
    g = torch.randn(M, d, device=dev, generator=gen).bfloat16()
    gemm_tf = 2 * M * d * hid / 1e12  # TFLOP per GEMM; the MLP forward has 2, forward + backward 6

    # (i) forward
    base_fwd = torch.compile(lambda x, fc, pj: unfused_mlp(x, fc, pj, tall), fullgraph=True)
    fused_fwd = torch.compile(lambda x, fc, pj: mr.mlp_relu2(x, fc, pj, tall), fullgraph=True)
    with torch.no_grad():
        want, got = base_fwd(x, fc, pj), fused_fwd(x, fc, pj)
        print("  check forward  " + compare("out", got, want))
        t_base = timed(lambda: base_fwd(x, fc, pj), reps)
        t_fused = timed(lambda: fused_fwd(x, fc, pj), reps)
    print(f"  (i)  forward           unfused {t_base:7.3f} ms {2 * gemm_tf / t_base * 1e3:6.0f} TFLOP/s | "
          f"fused {t_fused:7.3f} ms {2 * gemm_tf / t_fused * 1e3:6.0f} TFLOP/s | ratio {t_base / t_fused:.3f}")

    # (ii) forward + backward
    leaves = [t.clone().requires_grad_() for t in (x, fc, pj)]

    def step(fwd):
        out = fwd(*leaves)
        return (out, *torch.autograd.grad(out, leaves, g))

    def step_timed(fwd):
        return torch.autograd.grad(fwd(*leaves), leaves, g)

    ref = step(base_fwd)
    t_base2 = timed(lambda: step_timed(base_fwd), reps)
    # the op as the model runs it (KEEP_PRE, FWD/BWD_LAUNCH), then the persistent kernels with and without pre
    persistent = next(launch for launch in mr.SWEEP if launch.get("persistent"))
    now = (mr.KEEP_PRE, mr.FWD_LAUNCH, mr.BWD_LAUNCH)
    modes = [("current constants", now),
             ("persistent, pre kept", (True, persistent, persistent)),
             ("persistent, a only (relu(pre) = √a)", (False, persistent, persistent))]
    for label, (keep_pre, fwd_launch, bwd_launch) in modes:
        mr.KEEP_PRE, mr.FWD_LAUNCH, mr.BWD_LAUNCH = keep_pre, fwd_launch, bwd_launch
        try:
            fused_mode = torch.compile(lambda x, fc, pj: mr.mlp_relu2(x, fc, pj, tall), fullgraph=True)
            res = step(fused_mode)
            print(f"  check fwd+bwd [{label}]  " + "; ".join(
                compare(n, a, b) for n, a, b in zip(("out", "dx", "dc_fc", "dc_proj"), res, ref)))
            t_fused2 = timed(lambda: step_timed(fused_mode), reps)
        except CheckFailed:
            raise
        except Exception as e:  # noqa: BLE001 - a mode that does not compile is a row, not a stop
            print(f"  (ii) [{label}] failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        finally:
            mr.KEEP_PRE, mr.FWD_LAUNCH, mr.BWD_LAUNCH = now
        print(f"  (ii) forward+backward  unfused {t_base2:7.3f} ms {6 * gemm_tf / t_base2 * 1e3:6.0f} TFLOP/s | "
              f"fused {t_fused2:7.3f} ms {6 * gemm_tf / t_fused2 * 1e3:6.0f} TFLOP/s | ratio "
              f"{t_base2 / t_fused2:.3f}  [{label}]")
        print(f"       saved per MLP call: forward+backward {t_base2 - t_fused2:+.3f} ms (× 88 calls per 393k step "
              f"at world size 1, 11 MLP layers × 8 micro-batches: {88 * (t_base2 - t_fused2):+.1f} ms)")
        del res
    print(f"       forward alone (current constants): saved {t_base - t_fused:+.3f} ms per call")
    del leaves, ref

    # (iii) the kernels alone
    w1 = fc.t() if tall else fc  # (d, hid)
    w2t = pj.t() if tall else pj  # (d, hid): ga = g @ w2t
    mm = lambda a, b: a @ b  # noqa: E731
    up_base = torch.compile(lambda x, w1: (lambda h: (h, F.relu(h).square()))(x @ w1), fullgraph=True)
    grad_base = torch.compile(lambda g, w2t, pre: torch.where(pre > 0, 2 * pre.float() * (g @ w2t).float(), 0.0)
                              .bfloat16(), fullgraph=True)
    pre_ref, act_ref = up_base(x, w1)
    gh_ref = grad_base(g, w2t, pre_ref)
    t_mm = timed(lambda: mm(x, w1), reps)
    t_up = timed(lambda: up_base(x, w1), reps)
    t_mm2 = timed(lambda: mm(g, w2t), reps)
    t_gr = timed(lambda: grad_base(g, w2t, pre_ref), reps)
    print(f"  (iii) kernel A: cuBLAS x@W1 alone {t_mm:.3f} ms ({gemm_tf / t_mm * 1e3:.0f} TFLOP/s); "
          f"+ Inductor relu² (unfused) {t_up:.3f} ms")
    print(f"        kernel B: cuBLAS g@W2ᵀ alone {t_mm2:.3f} ms ({gemm_tf / t_mm2 * 1e3:.0f} TFLOP/s); "
          f"+ Inductor 2·relu(pre)·ga (unfused) {t_gr:.3f} ms")
    launches = mr.SWEEP if sweep else [mr.FWD_LAUNCH, mr.BWD_LAUNCH]
    print(f"  {'kernel':>6} {'BMxBNxBK':>12} {'grp':>3} {'w':>2} {'st':>2} {'tma':>5} {'ms':>8} {'TFLOP/s':>8} "
          f"{'vs unfused':>10} {'vs mm':>6}  check")
    kind = lambda launch: "pers" if launch.get("persistent") else str(launch["tma"])  # noqa: E731
    for launch in launches:
        tag = (f"{launch['block_m']}x{launch['block_n']}x{launch['block_k']:<3} {launch['group_m']:>3} "
               f"{launch['warps']:>2} {launch['stages']:>2} {kind(launch):>5}")
        for kernel in ("A", "B"):
            try:
                if kernel == "A":
                    pre, act = mr.up_relu2(x, w1, launch)
                    bits = float((pre == pre_ref).float().mean())
                    check = f"pre bit-equal {bits:.4f}; " + compare("pre", pre, pre_ref, 2e-3)
                    if not torch.equal(act, F.relu(pre).square()):
                        raise CheckFailed("a != bf16(relu(pre)²)")
                    check += "; a exact"
                    ms = timed(lambda: mr.up_relu2(x, w1, launch), reps)
                    base, floor = t_up, t_mm
                    if launch.get("persistent"):  # and without writing pre
                        ms_a = timed(lambda: mr.up_relu2(x, w1, launch, keep_pre=False), reps)
                        check += f"; without pre {ms_a:.3f} ms ({base / ms_a:.3f} vs unfused)"
                else:
                    gh = mr.relu2_grad(g, w2t, pre_ref, launch)
                    check = compare("gh", gh, gh_ref, 2e-3)
                    ms = timed(lambda: mr.relu2_grad(g, w2t, pre_ref, launch), reps)
                    base, floor = t_gr, t_mm2
                    if launch.get("persistent"):  # relu(pre) as √a, from the forward's a
                        gh_a = mr.relu2_grad(g, w2t, act_ref, launch, from_post=True)
                        check += "; from a: " + compare("gh", gh_a, gh_ref, 1e-2)
                        ms_b = timed(lambda: mr.relu2_grad(g, w2t, act_ref, launch, from_post=True), reps)
                        check += f" {ms_b:.3f} ms ({base / ms_b:.3f} vs unfused)"
            except CheckFailed:
                raise
            except Exception as e:  # noqa: BLE001 - a launch that does not fit is a row, not a stop
                print(f"  {kernel:>6} {tag}  failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            rate = gemm_tf / ms * 1e3
            print(f"  {kernel:>6} {tag} {ms:8.3f} {rate:8.0f} {base / ms:10.3f} {floor / ms:6.3f}  {check}")
    print(f"  current: FWD_LAUNCH {mr.FWD_LAUNCH}, BWD_LAUNCH {mr.BWD_LAUNCH}")


def main(argv: list[str] | None = None) -> int:
    from trainer import mlp_relu2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=49152, help="tokens per micro-batch (M)")
    ap.add_argument("--dim", type=int, default=768, help="model dim d; hidden = 4·d")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layouts", default="wide,tall", help="comma-separated: wide, tall")
    ap.add_argument("--no-sweep", action="store_true", help="(iii) with the current launches only")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of the script's checks in Triton's interpreter (TRITON_INTERPRET=1, "
                         "small --rows/--dim); its times mean nothing")
    args = ap.parse_args(argv)
    if not mlp_relu2.available() or (args.device == "cuda" and not torch.cuda.is_available()):
        print("bench_mlp needs a CUDA GPU with triton; nothing to time here.")
        return 0
    if args.device == "cpu" and not mlp_relu2.usable(torch.empty(0, dtype=torch.bfloat16)):
        ap.error("--device cpu needs TRITON_INTERPRET=1")
    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU dry run'}, torch {torch.__version__}")
    try:
        for layout in args.layouts.split(","):
            if layout not in ("wide", "tall"):
                ap.error(f"--layouts: wide or tall, not {layout!r}")
            bench_layout(layout == "tall", args.rows, args.dim, args.reps, not args.no_sweep, args.device)
    except CheckFailed as e:
        print(f"CHECK FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
