"""The relu² MLP with relu² and its derivative in matmul epilogues (model.fused_relu2, off by default).

    from trainer.mlp_relu2 import mlp_relu2
    out = mlp_relu2(x, c_fc, c_proj, tall)    # == linear(relu(x @ W1)², W2), bf16 (M, d) in and out
    python -m pytest tests/trainer/test_mlp_relu2.py -q     # CPU: Triton's interpreter; GPU: the kernels

What it computes is the model's MLP with mlp_activation relu2 on either weight layout ("wide": c_fc
and c_proj stored (d, 4d); "tall": (4d, d)), with the unfused path's roundings: h = x @ W1 rounded
to bf16 from an fp32 accumulator, a = relu(h)² in fp32 from the bf16 h, rounded once (what
Inductor emits for `relu(h).square()`), and in the backward ga = g @ W2ᵀ rounded to bf16, then
gh = 2·relu(h)·ga in fp32, rounded once (relu(h) ≤ 0 gives +0). It differs from the unfused
path only by the matmuls' accumulation order. Why: on the speedrun preset the relu² forward and
backward ran as separate memory-bound elementwise passes, 30.4 ms of the 393k step on an H200
(docs/performance.md, session 6). Timed on an H200 (session 7, benchmarks/bench_mlp.py, the speedrun's
shape): each kernel beats its unfused pair (A 0.442 vs 0.474 ms, B 0.466 vs 0.537) but the op's forward
+ backward took 2.355 ms against the compiled unfused MLP's 2.211 (tall; wide 2.454 vs 2.206), bit-equal
results; hence off. The Triton GEMMs run at ~500 TFLOP/s where cuBLAS runs these at ~705.

The op boundary is the whole MLP (`trainer::mlp_relu2`, one autograd node), so its backward can
fuse the down-projection's input gradient with the relu² derivative and never write ga:
  forward   kernel A: acc = x @ W1 (fp32); writes pre = bf16(acc) and a = bf16(relu(pre)²);
            out = a @ W2 in cuBLAS. Saved for the backward: x, c_fc, c_proj, pre, a.
  backward  kernel B: acc = g @ W2ᵀ (fp32); reads pre, writes gh = bf16(2·relu(pre)·bf16(acc));
            dx = gh @ W1ᵀ, dW1 = xᵀ @ gh, dW2 = aᵀ @ g (or its transpose) in cuBLAS.
Per call at the speedrun's shape (M = 49,152 tokens, d = 768, hidden 3,072, bf16; an (M, hidden)
tensor is 302 MB, an (M, d) one 75.5 MB) that removes 906 MB of HBM traffic: the forward pass's
read of h (its write of a moves into the matmul's epilogue; the matmul's write of h stays, as pre)
and, in the backward, the write and the read of ga (302 MB each). Both kernels are the same
(M × d) @ (d × hidden) GEMM with another epilogue (`_mm_relu2` / `_mm_relu2_tma`).

Three kernel variants, chosen by the launch's "tma" and "persistent": plain pointer loads (the
default; masked at the edges, so any M, d, hidden), host-side TMA tensor descriptors (sm90+, and every
row stride a multiple of 8 elements; otherwise the pointer kernel runs), and a persistent TMA kernel
(one program per SM walking the tiles, the epilogue on two halves of each; not yet timed). KEEP_PRE =
False (not yet timed) writes only a in the forward and has the backward take relu(pre) as √a, as the
record's own fused kernel does (2026-01-10). All run on the GPU and in Triton's
interpreter (TRITON_INTERPRET=1, the CPU tests). Where the interpreter differs from the GPU the
kernels take NATIVE=False: the interpreter's tl.dot mishandles bf16 operands (it multiplies their
uint16 storage) and truncates fp32 → bf16, so there the operands are widened to fp32 before the
dot (the same exact products) and rounding is head_ce's bit arithmetic (the same bits).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it (then this path is off)
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - exercised on CPU machines without triton
    triton = None


if triton is not None:
    from trainer.head_ce import _bf16  # x rounded to the nearest bf16, as fp32 (native or bit arithmetic)

    @triton.jit
    def _tile_ids(M, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of this program, in groups of GROUP_M row tiles that sweep all column tiles
        together, so the A rows and the B columns they share stay in L2."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        per_group = GROUP_M * ((N + BLOCK_N - 1) // BLOCK_N)
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % rows, (pid % per_group) // rows

    @triton.jit
    def _dot(x, w, acc, NATIVE: tl.constexpr):
        """acc + x @ w in fp32. NATIVE: bf16 operands straight to the tensor cores; else widened to
        fp32 first (the interpreter multiplies bf16's uint16 storage); the products are exact either way."""
        if NATIVE:
            return tl.dot(x, w, acc)
        else:
            return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")

    @triton.jit
    def _relu2_fwd(acc, NATIVE: tl.constexpr):
        """(pre, a) as bf16 tiles: pre = acc rounded, a = relu(pre)² in fp32, rounded once."""
        h = _bf16(acc, NATIVE)
        r = tl.maximum(h, 0.0)
        return h.to(tl.bfloat16), _bf16(r * r, NATIVE).to(tl.bfloat16)  # both exact bf16 values already

    @triton.jit
    def _relu2_bwd(acc, aux, NATIVE: tl.constexpr, FROM_POST: tl.constexpr):
        """gh as a bf16 tile: ga = acc rounded to bf16, then 2·r·ga in fp32 (exact), rounded once, with
        r = relu(pre) from aux = pre, or with FROM_POST r = √a from aux = a = bf16(relu(pre)²) (the record's
        way since 2026-01-10: pre need not be kept; r then carries a's rounding). +0 where r = 0 (as
        Inductor's threshold_backward)."""
        ga = _bf16(acc, NATIVE)
        p = aux.to(tl.float32)
        if FROM_POST:
            p = tl.sqrt_rn(p)
        return _bf16(tl.where(p > 0, ga * (2.0 * p), 0.0), NATIVE).to(tl.bfloat16)

    @triton.jit
    def _mm_relu2(a, b, pre, out, M, s_am, s_ak, s_bk, s_bn, N: tl.constexpr, K: tl.constexpr,
                  BACKWARD: tl.constexpr, NATIVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN: tl.constexpr, KEEP_PRE: tl.constexpr,
                  FROM_POST: tl.constexpr):
        """acc = A (M, K) @ B (K, N) over any strides, then the epilogue: forward writes pre and
        out = a; BACKWARD reads pre and writes out = gh. pre and out are contiguous (M, N).
        EVEN: the tiles divide K and N (no masks in the loop). N and K are constexprs (the model's
        widths; Triton 3.6's interpreter with numpy 2 also cannot loop to a runtime bound)."""
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        am = (rm % M).to(tl.int64)  # rows past M read a valid row (discarded at the store): no mask in the loop
        a_ptrs = a + am[:, None] * s_am + rk[None, :] * s_ak
        b_ptrs = b + rk[:, None] * s_bk + rn[None, :] * s_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, (K + BLOCK_K - 1) // BLOCK_K):
            if EVEN:
                x = tl.load(a_ptrs)
                w = tl.load(b_ptrs)
            else:
                k_left = K - kt * BLOCK_K
                x = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
                w = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
            acc = _dot(x, w, acc, NATIVE)
            a_ptrs += BLOCK_K * s_ak
            b_ptrs += BLOCK_K * s_bk
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if BACKWARD:
            gh = _relu2_bwd(acc, tl.load(pre + offs, mask=mask, other=0.0), NATIVE, FROM_POST)
            tl.store(out + offs, gh, mask=mask)
        else:
            h, act = _relu2_fwd(acc, NATIVE)
            if KEEP_PRE:
                tl.store(pre + offs, h, mask=mask)
            tl.store(out + offs, act, mask=mask)

    @triton.jit
    def _tma_acc(a_desc, b_desc, off_m, off_n, K: tl.constexpr, B_NK: tl.constexpr, NATIVE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The fp32 (BLOCK_M, BLOCK_N) tile of A @ B at (off_m, off_n) from TMA loads: A (M, K); B (K, N),
        or (N, K) with B_NK (the tall layout's weights, both ways). Loads past the edges read zeros."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, (K + BLOCK_K - 1) // BLOCK_K):
            x = a_desc.load([off_m, kt * BLOCK_K])
            if B_NK:
                w = b_desc.load([off_n, kt * BLOCK_K]).T
            else:
                w = b_desc.load([kt * BLOCK_K, off_n])
            acc = _dot(x, w, acc, NATIVE)
        return acc

    @triton.jit
    def _tma_epilogue(acc, off_m, off_n, pre_desc, out_desc, BACKWARD: tl.constexpr, NATIVE: tl.constexpr,
                      KEEP_PRE: tl.constexpr, FROM_POST: tl.constexpr):
        """Forward: out = a and, with KEEP_PRE, pre at (off_m, off_n); BACKWARD: reads pre (or a, FROM_POST)
        there and writes out = gh. The descriptors' block is acc's shape; stores past the edges are clipped."""
        if BACKWARD:
            out_desc.store([off_m, off_n], _relu2_bwd(acc, pre_desc.load([off_m, off_n]), NATIVE, FROM_POST))
        else:
            h, act = _relu2_fwd(acc, NATIVE)
            if KEEP_PRE:
                pre_desc.store([off_m, off_n], h)
            out_desc.store([off_m, off_n], act)

    @triton.jit
    def _mm_relu2_tma(a_desc, b_desc, pre_desc, out_desc, M, N: tl.constexpr, K: tl.constexpr,
                      B_NK: tl.constexpr, BACKWARD: tl.constexpr, NATIVE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, KEEP_PRE: tl.constexpr,
                      FROM_POST: tl.constexpr):
        """_mm_relu2 through TMA descriptors: A (M, K); B (K, N), or (N, K) with B_NK (the tall
        layout's weights, both ways); pre, out (M, N). The descriptors zero-fill loads past the
        edges and clip the stores."""
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tma_acc(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, B_NK, NATIVE, BLOCK_M, BLOCK_N, BLOCK_K)
        _tma_epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, pre_desc, out_desc, BACKWARD, NATIVE, KEEP_PRE, FROM_POST)

    @triton.jit
    def _mm_relu2_persistent(a_desc, b_desc, pre_desc, out_desc, M: tl.constexpr, N: tl.constexpr,
                             K: tl.constexpr, PROGRAMS: tl.constexpr, B_NK: tl.constexpr, BACKWARD: tl.constexpr,
                             NATIVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, KEEP_PRE: tl.constexpr, FROM_POST: tl.constexpr):
        """_mm_relu2_tma as a persistent kernel: PROGRAMS programs (one per SM) walk the output tiles in
        row-major order, and the epilogue runs on two (BLOCK_M, BLOCK_N/2) halves of the accumulator
        (pre_desc / out_desc have that block). The shape the record's fused relu² kernel has (2026-01-10).
        M is a constexpr too (a few micro-batch sizes per run; the interpreter needs its loop bounds)."""
        HALF: tl.constexpr = BLOCK_N // 2
        tiles_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        tiles: tl.constexpr = (M + BLOCK_M - 1) // BLOCK_M * tiles_n
        # Every program walks the same count of tiles (a program's last may lie past M: its loads read zeros,
        # its stores are clipped); flatten lets Triton overlap a tile's epilogue with the next one's loads.
        for i in tl.range(0, (tiles + PROGRAMS - 1) // PROGRAMS, flatten=True):
            tile = tl.program_id(0) + i * PROGRAMS
            off_m = (tile // tiles_n) * BLOCK_M
            off_n = (tile % tiles_n) * BLOCK_N
            acc = _tma_acc(a_desc, b_desc, off_m, off_n, K, B_NK, NATIVE, BLOCK_M, BLOCK_N, BLOCK_K)
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
            _tma_epilogue(acc0, off_m, off_n, pre_desc, out_desc, BACKWARD, NATIVE, KEEP_PRE, FROM_POST)
            _tma_epilogue(acc1, off_m, off_n + HALF, pre_desc, out_desc, BACKWARD, NATIVE, KEEP_PRE, FROM_POST)


# Launch parameters of kernel A (forward) and kernel B (backward): tile, group of row tiles, warps,
# pipeline stages, and the TMA variant or the pointer one. benchmarks/bench_mlp.py times every entry of
# SWEEP at the speedrun's shape; on an H200 the best were within 5 % of these (A: 0.438 ms with 4 stages
# vs 0.442; B: 0.460 with TMA vs 0.466), none near cuBLAS's 0.329 ms for the bare product.
FWD_LAUNCH = {"block_m": 128, "block_n": 256, "block_k": 64, "group_m": 8, "warps": 8, "stages": 3, "tma": False}
BWD_LAUNCH = {"block_m": 128, "block_n": 256, "block_k": 64, "group_m": 8, "warps": 8, "stages": 3, "tma": False}
SWEEP = [
    {"block_m": bm, "block_n": bn, "block_k": bk, "group_m": 8, "warps": w, "stages": s, "tma": tma}
    for tma in (False, True)
    for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
                             (256, 128, 64, 8, 3), (64, 256, 64, 4, 4), (128, 256, 32, 8, 4), (128, 128, 32, 4, 5))
] + [  # the persistent kernel (one program per SM, epilogue in two halves; TMA). The first entry is the
    # GPU tests' persistent launch: it fits both kernels; with 4 stages kernel B needs 262,192 bytes of shared
    # memory, over an H200's 232,448 (kernel A fits and was the fastest A on an H200, 0.405 ms; session 8)
    {"block_m": bm, "block_n": bn, "block_k": bk, "group_m": 1, "warps": w, "stages": s, "tma": True,
     "persistent": True}
    for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 256, 32, 8, 4))
]
# Whether the forward writes pre for the backward (True, the timed path) or only a, the backward then taking
# relu(pre) as √a as the record's kernel does (302 MB less written per call at the speedrun's shape; gh
# rounds differently by up to ~1 bf16 ulp). Not yet timed on a GPU: bench_mlp.py's (ii) times both.
KEEP_PRE = True


def available() -> bool:
    """Whether Triton imports (the kernels' compiler; CPU-only torch installs may lack it)."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(x: Tensor) -> bool:
    """Whether the kernels can run on `x`: bf16 on a CUDA device (bf16 tensor-core dots: sm80+, the
    trainer's GPUs are sm90), or on any device under TRITON_INTERPRET=1 (the CPU tests)."""
    return available() and x.dtype == torch.bfloat16 and (x.is_cuda or _interpreting())


def _tma_ok(*ts: Tensor) -> bool:
    """TMA descriptors need sm90+, unit last strides and 16-byte aligned bases and row strides."""
    if _interpreting():
        ok_dev = True
    else:
        ok_dev = all(t.is_cuda for t in ts) and torch.cuda.get_device_capability(ts[0].device) >= (9, 0)
    return ok_dev and all(t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 for t in ts)


def _programs(a: Tensor, tiles: int) -> int:
    """Programs of the persistent kernel: one per SM (4 in the interpreter, so each walks several tiles)."""
    sms = 4 if _interpreting() else torch.cuda.get_device_properties(a.device).multi_processor_count
    return max(1, min(sms, tiles))


def _launch(a: Tensor, b: Tensor, pre: Tensor, out: Tensor, backward: bool, launch: dict, keep_pre: bool = True,
            from_post: bool = False) -> None:
    """out (and pre, forward with keep_pre) from A (M, K) @ B (K, N), B any strides; pre and out contiguous
    (M, N). Backward: pre holds pre, or with from_post the forward's a. Without keep_pre pre is not written
    (pass out)."""
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk = launch["block_m"], launch["block_n"], launch["block_k"]
    native = a.is_cuda and not _interpreting()
    common = dict(N=N, K=K, BACKWARD=backward, NATIVE=native, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                  KEEP_PRE=keep_pre, FROM_POST=from_post, num_warps=launch["warps"], num_stages=launch["stages"])
    b_nk = b.stride(0) == 1 and b.stride(1) != 1  # B is the transpose of an (N, K) row-major weight
    b_rows = b.t() if b_nk else b
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if (launch["tma"] or launch.get("persistent")) and _tma_ok(a, b_rows, pre, out):
        a_d = TensorDescriptor.from_tensor(a, [bm, bk])
        b_d = TensorDescriptor.from_tensor(b_rows, [bn, bk] if b_nk else [bk, bn])
        if launch.get("persistent"):
            pre_d, out_d = (TensorDescriptor.from_tensor(t, [bm, bn // 2]) for t in (pre, out))
            programs = _programs(a, tiles)
            _mm_relu2_persistent[(programs,)](a_d, b_d, pre_d, out_d, M=M, PROGRAMS=programs, B_NK=b_nk, **common)
        else:
            pre_d, out_d = TensorDescriptor.from_tensor(pre, [bm, bn]), TensorDescriptor.from_tensor(out, [bm, bn])
            _mm_relu2_tma[(tiles,)](a_d, b_d, pre_d, out_d, M, B_NK=b_nk, GROUP_M=launch["group_m"], **common)
    else:
        _mm_relu2[(tiles,)](a, b, pre, out, M, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                            EVEN=K % bk == 0 and N % bn == 0, GROUP_M=launch["group_m"], **common)


def _check(x: Tensor, w_fc: Tensor, w_proj: Tensor, tall: bool) -> tuple[int, int, int]:
    M, d = x.shape
    hid = w_fc.shape[0] if tall else w_fc.shape[1]
    want = (hid, d) if tall else (d, hid)
    if tuple(w_fc.shape) != want or tuple(w_proj.shape) != want or x.dtype != torch.bfloat16 \
            or w_fc.dtype != x.dtype or w_proj.dtype != x.dtype:
        raise ValueError(f"mlp_relu2: x (M, d) and c_fc, c_proj {'(4d, d)' if tall else '(d, 4d)'}, all bf16, "
                         f"expected; got x {tuple(x.shape)} {x.dtype}, c_fc {tuple(w_fc.shape)} {w_fc.dtype}, "
                         f"c_proj {tuple(w_proj.shape)} {w_proj.dtype}")
    return M, d, hid


def up_relu2(x: Tensor, w1: Tensor, launch: dict | None = None, keep_pre: bool = True) -> tuple[Tensor, Tensor]:
    """Kernel A alone: (pre, a) = (bf16(x @ w1), bf16(relu(pre)²)) for x (M, K) and w1 (K, N), any strides;
    without keep_pre pre is not written (an empty (0,) tensor is returned in its place)."""
    M, N = x.shape[0], w1.shape[1]
    act = torch.empty((M, N), device=x.device, dtype=torch.bfloat16)
    pre = torch.empty((M, N), device=x.device, dtype=torch.bfloat16) if keep_pre else act
    _launch(x, w1, pre, act, False, FWD_LAUNCH if launch is None else launch, keep_pre=keep_pre)
    return (pre if keep_pre else act.new_empty((0,))), act


def relu2_grad(g: Tensor, w2t: Tensor, aux: Tensor, launch: dict | None = None, from_post: bool = False) -> Tensor:
    """Kernel B alone: gh = bf16(2·r·bf16(g @ w2t)) for g (M, K), w2t (K, N) any strides, with r = relu(aux)
    (aux = pre), or with from_post r = √aux (aux = the forward's a)."""
    gh = torch.empty(aux.shape, device=g.device, dtype=torch.bfloat16)
    _launch(g, w2t, aux.contiguous(), gh, True, BWD_LAUNCH if launch is None else launch, from_post=from_post)
    return gh


def _w1(w_fc: Tensor, tall: bool) -> Tensor:
    """W1 as (d, hidden): x @ W1 is the up-projection."""
    return w_fc.t() if tall else w_fc


def _w2(w_proj: Tensor, tall: bool) -> Tensor:
    """W2 as (hidden, d): a @ W2 is the down-projection."""
    return w_proj if tall else w_proj.t()


@torch.library.custom_op("trainer::mlp_relu2", mutates_args=())
def mlp_relu2_fwd(x: Tensor, w_fc: Tensor, w_proj: Tensor, tall: bool,
                  keep_pre: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(out, pre, a) for x (M, d): out (M, d) the MLP's output; pre, a (M, hidden) kept for the backward
    (without keep_pre pre is an empty (0,) tensor and the backward takes relu(pre) as √a)."""
    _check(x, w_fc, w_proj, tall)
    pre, act = up_relu2(x, _w1(w_fc, tall), keep_pre=keep_pre)
    return torch.mm(act, _w2(w_proj, tall)), pre, act


@mlp_relu2_fwd.register_fake
def _(x, w_fc, w_proj, tall, keep_pre=True):
    M, d, hid = _check(x, w_fc, w_proj, tall)
    return x.new_empty((M, d)), x.new_empty((M, hid) if keep_pre else (0,)), x.new_empty((M, hid))


@torch.library.custom_op("trainer::mlp_relu2_grad_h", mutates_args=())
def mlp_relu2_grad_h(g: Tensor, w_proj: Tensor, aux: Tensor, tall: bool, from_post: bool = False) -> Tensor:
    """gh (M, hidden): the gradient at the up-projection's output, from the MLP output's gradient g (M, d);
    aux is pre, or with from_post the forward's a."""
    return relu2_grad(g, _w2(w_proj, tall).t(), aux, from_post=from_post)


@mlp_relu2_grad_h.register_fake
def _(g, w_proj, aux, tall, from_post=False):
    return aux.new_empty(aux.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, w_fc, w_proj, tall, keep_pre = inputs
    _, pre, act = output
    ctx.save_for_backward(x, w_fc, w_proj, pre, act)
    ctx.tall, ctx.keep_pre = tall, keep_pre
    ctx.mark_non_differentiable(pre, act)  # internal: no gradient flows into them
    ctx.set_materialize_grads(False)


def _backward(ctx, g_out, _g_pre, _g_act):
    x, w_fc, w_proj, pre, act = ctx.saved_tensors
    need_x, need_fc, need_proj = ctx.needs_input_grad[:3]
    gx = g_fc = g_proj = None
    if g_out is None:
        return gx, g_fc, g_proj, None, None
    if need_proj:  # out = a @ W2: dW2 = aᵀ g, stored transposed in the wide layout
        g_proj = act.t() @ g_out if ctx.tall else g_out.t() @ act
    if need_x or need_fc:
        gh = mlp_relu2_grad_h(g_out, w_proj, pre if ctx.keep_pre else act, ctx.tall, not ctx.keep_pre)
        if need_x:  # pre = x @ W1: dx = gh W1ᵀ
            gx = gh @ _w1(w_fc, ctx.tall).t()
        if need_fc:  # dW1 = xᵀ gh, stored transposed in the tall layout
            g_fc = gh.t() @ x if ctx.tall else x.t() @ gh
    return gx, g_fc, g_proj, None, None


mlp_relu2_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlp_relu2(x: Tensor, w_fc: Tensor, w_proj: Tensor, tall: bool) -> Tensor:
    """The MLP's output linear(relu(linear(x, W1))², W2) for bf16 x (..., d) and bf16 weights stored
    (4d, d) with tall, else (d, 4d); one autograd node (see the module docstring)."""
    out, _, _ = mlp_relu2_fwd(x.reshape(-1, x.shape[-1]), w_fc, w_proj, tall, KEEP_PRE)
    return out.view(x.shape)


__all__ = ["mlp_relu2", "available", "usable", "up_relu2", "relu2_grad", "mlp_relu2_fwd", "mlp_relu2_grad_h",
           "FWD_LAUNCH", "BWD_LAUNCH", "SWEEP", "KEEP_PRE"]
