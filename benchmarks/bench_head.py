"""The fused head's memory-bound passes alone, at one micro-batch of the speedrun's last stage.

    python benchmarks/bench_head.py [--rows 49152] [--vocab 50304] [--reps 10] [--only-both]

Times, on random bf16 logits of (rows, vocab):
  - the log-sum-exp pass and the gradient pass of trainer/head_ce.py for several launch
    parameters (column block × warps), each checked bit-equal to the bit-arithmetic rounding
    (the interpreter's path) and to the trainer's current launch;
  - both passes with z stored by the first and read by the second (head_ce.SAVE_Z) against the
    current pair, checked for the same lse and gradient bits;
  - the transposed copy of the e5m2 gradient that the FP8 weight-gradient product needs:
    PyTorch eager, Inductor, and trainer.head_ce.transpose_fp8 at several tiles;
  - G and Gᵀ from the gradient pass + that copy against one tiled pass writing both
    (head_ce.GRAD_WRITES_T, grad_both_pass) at several tiles, checked for the same bits.
Prints ms per call, GB/s of the bytes each must move, and the ratio to the current choice. GPU only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def timed(fn, reps: int) -> float:
    """ms per call: one untimed call (compiles), then `reps` between CUDA events (bench_polar's timer)."""
    from bench_polar import time_ms

    return time_ms(fn, reps, warmup=1)


def main(argv: list[str] | None = None) -> int:
    from trainer import head_ce

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=49152)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only-both", action="store_true",
                    help="only the last section: G + Gᵀ, the pair against one pass (GRAD_WRITES_T)")
    args = ap.parse_args(argv)
    N, V, cap, div, g_s = args.rows, args.vocab, 30.0, 7.5, 2.0 ** -8
    torch.manual_seed(0)
    logits = (torch.randn(N, V, device="cuda") * 6).bfloat16()
    targets = torch.randint(0, V, (N,), device="cuda")
    grad_out = torch.ones(1, device="cuda")
    gb_lse, gb_grad = N * V * 2 / 1e9, N * V * 3 / 1e9

    # reference: the bit-arithmetic rounding (NATIVE=False), the current launch
    cur, cur_g = head_ce.LSE_LAUNCH, head_ce.GRAD_LAUNCH
    ref_loss, ref_lse = head_ce.lse_pass(logits, targets, cap, div, cur["block"], cur["warps"], native=False)
    ref_g = head_ce.grad_pass(logits, targets, ref_lse, grad_out, cap, div, g_s, cur_g["block"], cur_g["warps"],
                              native=False)
    ref_g8 = ref_g.view(torch.uint8)
    if args.only_both:
        both_passes(head_ce, logits, targets, grad_out, cap, div, g_s, ref_g8, args.reps)
        return 0

    def bits_lse():
        head_ce.lse_pass(logits, targets, cap, div, cur["block"], cur["warps"], native=False)

    base = timed(bits_lse, args.reps)
    print(f"lse pass, bit-arithmetic rounding, block {cur['block']} warps {cur['warps']}: {base:.3f} ms "
          f"({gb_lse / base * 1e3:.0f} GB/s)")
    print(f"{'pass':>5} {'block':>6} {'warps':>5} {'ms':>8} {'GB/s':>6} {'vs bits':>8}  equal")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            try:
                loss, lse = head_ce.lse_pass(logits, targets, cap, div, block, warps)
                ms = timed(lambda: head_ce.lse_pass(logits, targets, cap, div, block, warps), args.reps)
            except Exception as e:  # noqa: BLE001 - a launch that does not fit is a row, not a stop
                print(f"{'lse':>5} {block:>6} {warps:>5}  failed: {type(e).__name__}")
                continue
            eq = bool(torch.equal(lse, ref_lse) and torch.equal(loss, ref_loss))
            print(f"{'lse':>5} {block:>6} {warps:>5} {ms:8.3f} {gb_lse / ms * 1e3:6.0f} {base / ms:8.2f}  {eq}")

    def bits_grad():
        head_ce.grad_pass(logits, targets, ref_lse, grad_out, cap, div, g_s, cur_g["block"], cur_g["warps"],
                          native=False)

    base = timed(bits_grad, args.reps)
    print(f"grad pass, bit-arithmetic rounding: {base:.3f} ms ({gb_grad / base * 1e3:.0f} GB/s)")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            try:
                g = head_ce.grad_pass(logits, targets, ref_lse, grad_out, cap, div, g_s, block, warps)
                ms = timed(lambda: head_ce.grad_pass(logits, targets, ref_lse, grad_out, cap, div, g_s, block, warps),
                           args.reps)
            except Exception as e:  # noqa: BLE001
                print(f"{'grad':>5} {block:>6} {warps:>5}  failed: {type(e).__name__}")
                continue
            eq = bool(torch.equal(g.view(torch.uint8), ref_g8))
            print(f"{'grad':>5} {block:>6} {warps:>5} {ms:8.3f} {gb_grad / ms * 1e3:6.0f} {base / ms:8.2f}  {eq}")
            del g

    # head_ce.SAVE_Z: the lse pass also writes z, the gradient pass reads it (no sigmoid per logit)
    L, G = head_ce.LSE_LAUNCH, head_ce.GRAD_LAUNCH
    now_lse = timed(lambda: head_ce.lse_pass(logits, targets, cap, div, **L), args.reps)
    now_grad = timed(lambda: head_ce.grad_pass(logits, targets, ref_lse, grad_out, cap, div, g_s, **G), args.reps)
    loss_z, lse_z, z = head_ce.lse_pass(logits, targets, cap, div, **L, store_z=True)
    z_lse = timed(lambda: head_ce.lse_pass(logits, targets, cap, div, **L, store_z=True), args.reps)
    g_z = head_ce.grad_pass(z, targets, lse_z, grad_out, cap, div, g_s, **G, from_z=True)
    z_grad = timed(lambda: head_ce.grad_pass(z, targets, lse_z, grad_out, cap, div, g_s, **G, from_z=True), args.reps)
    same = bool(torch.equal(lse_z, ref_lse) and torch.equal(g_z.view(torch.uint8), ref_g8))
    print(f"SAVE_Z=False (raw logits to both passes): lse {now_lse:.3f} + grad {now_grad:.3f} = "
          f"{now_lse + now_grad:.3f} ms")
    print(f"SAVE_Z=True  (z stored, gradient from z):  lse {z_lse:.3f} + grad {z_grad:.3f} = {z_lse + z_grad:.3f} ms"
          f"  ({(now_lse + now_grad) / (z_lse + z_grad):.2f}×, same bits {same}; "
          f"currently SAVE_Z={head_ce.SAVE_Z})")
    del z, g_z

    # the transposed copy of G (what _scaled_mm needs for dW): 2 × N·V bytes moved
    gb_t = 2 * N * V / 1e9
    ref_t = ref_g8.t().contiguous()
    eager = timed(lambda: ref_g.t().contiguous(), args.reps)
    print(f"transpose, eager .t().contiguous(): {eager:.3f} ms ({gb_t / eager * 1e3:.0f} GB/s)")
    comp = torch.compile(lambda g: g.t().contiguous(), fullgraph=True)
    ms = timed(lambda: comp(ref_g), args.reps)
    print(f"transpose, Inductor: {ms:.3f} ms ({gb_t / ms * 1e3:.0f} GB/s, {eager / ms:.2f}× eager)")
    if hasattr(head_ce, "transpose_pass"):
        for bm, bn, warps in ((64, 64, 4), (128, 128, 4), (128, 128, 8), (256, 128, 8), (128, 256, 8),
                              (256, 256, 8), (256, 256, 16)):
            try:
                out = head_ce.transpose_pass(ref_g, bm, bn, warps)
                ms = timed(lambda: head_ce.transpose_pass(ref_g, bm, bn, warps), args.reps)
            except Exception as e:  # noqa: BLE001
                print(f"transpose {bm}x{bn} w{warps}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            eq = bool(torch.equal(out.view(torch.uint8), ref_t))
            print(f"transpose {bm}x{bn} w{warps}: {ms:.3f} ms ({gb_t / ms * 1e3:.0f} GB/s, {eager / ms:.2f}× eager)"
                  f"  equal {eq}")
            del out
    if hasattr(head_ce, "grad_both_pass"):
        both_passes(head_ce, logits, targets, grad_out, cap, div, g_s, ref_g8, args.reps)
    return 0


def both_passes(head_ce, logits, targets, grad_out, cap, div, g_s, ref_g8, reps: int) -> None:
    """G and Gᵀ: the gradient pass then the tiled transpose (GRAD_WRITES_T=False) against one tiled pass that
    stores both (grad_both_pass), each from z as the trainer runs them with SAVE_Z."""
    L, G, T = head_ce.LSE_LAUNCH, head_ce.GRAD_LAUNCH, head_ce.TRANSPOSE_LAUNCH
    _, lse, z = head_ce.lse_pass(logits, targets, cap, div, **L, store_z=True)
    ref_t = ref_g8.t().contiguous()

    def pair():
        return head_ce.transpose_pass(head_ce.grad_pass(z, targets, lse, grad_out, cap, div, g_s, **G, from_z=True),
                                      **T)

    base = timed(pair, reps)
    print(f"G + Gᵀ, gradient pass then transpose (GRAD_WRITES_T=False): {base:.3f} ms")
    for bm, bn, warps in ((64, 128, 4), (64, 128, 8), (128, 64, 8), (128, 128, 4), (128, 128, 8), (64, 256, 8),
                          (128, 256, 8), (256, 128, 8)):
        try:
            g, gt = head_ce.grad_both_pass(z, targets, lse, grad_out, cap, div, g_s, bm, bn, warps, from_z=True)
            ms = timed(lambda: head_ce.grad_both_pass(z, targets, lse, grad_out, cap, div, g_s, bm, bn, warps,
                                                      from_z=True), reps)
        except Exception as e:  # noqa: BLE001 - a launch that does not fit is a row, not a stop
            print(f"G + Gᵀ one pass {bm}x{bn} w{warps}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        eq = bool(torch.equal(g.view(torch.uint8), ref_g8) and torch.equal(gt.view(torch.uint8), ref_t))
        print(f"G + Gᵀ one pass {bm}x{bn} w{warps}: {ms:.3f} ms ({base / ms:.2f}× the pair)  same bits {eq}"
              f"{'  ← GRAD_BOTH_LAUNCH' if (bm, bn, warps) == tuple(head_ce.GRAD_BOTH_LAUNCH.values()) else ''}")
        del g, gt
    print(f"currently GRAD_WRITES_T={head_ce.GRAD_WRITES_T}")


if __name__ == "__main__":
    sys.exit(main())
