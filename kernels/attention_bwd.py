"""Backward of the fused adaptive attention (kernels/attention.py): two kernels. The first takes,
as the forward does, GP pairs of one context item per program on the pair grid (one pair in the
paired form), so W is read and dC is accumulated once per program; the second takes one pair
per program. Nothing of the forward is stored: each program recomputes its pairs on chip
(scores, softmax, the norm of the attended context through G = C C^T) and streams d in chunks.

_attention_bwd_kernel, passes A to D:
  pass A  S = (F Q) C^T, P, |U| through G = C C^T read from the forward's attention.gram (once
          per context item, not per pair)
  pass B  MODE_ALIGNMENT: Y = (Q - A)^2 W^T + b, BSB columns of s per pass over d (A rebuilt each time),
          parked in an fp32 scratch (B, P, Lq, s) with the row norms |Y| and Y . dE; then
          dY = d l2n(Y) overwrites Y there, BSC columns at a time
  pass C  dA (MODE_ALIGNMENT: 2 (dY W) (A - Q), dY read back BSC columns at a time), accumulates U . dA
          per row; MODE_ALIGNMENT also adds dQ += -dA and stores (Q - A)^2 (the inputs' dtype) to
          a d2 scratch (B, P, Lq, d)
  pass D  dU = dA / (|U| + eps) - U (U . dA) / (|U| (|U| + eps)^2); dP = dU C^T; dC += P^T dU;
          dP (BQ x BC fp32) goes to a scratch (B, P, BQ, BC)
between the kernels (MODE_ALIGNMENT, torch): dW = dY^T (Q - A)^2, one GEMM over every row of the
          two scratches (fp32 output: mm_f32); db = the column sums of dY
_attention_bwd_scores_kernel, after it:
  on chip S0 = (F Q) C^T and P recomputed (no G); dZ = P (dP - rowsum(P dP)); dlam = rowsum(dZ Sn);
          dS through the normalisation across queries and the LeakyReLU
  pass E  dX = dS0 C; dF = dX Q; dQ += dX F
  pass F  dC += dS0^T (F Q)

The split into chunks, scratches and two kernels is what keeps every configuration free of
register spills on sm_80 and sm_90 (python -m bench.resources; tests/test_compile.py): holding Y
or dY s wide, or dP through the recompute of S0, spilled. dF (B, P, Lq, d) and dlam (B, P, Lq)
belong to one pair and are stored; dQ and dC are shared across pairs and accumulated with fp32
atomics, relaxed (sem="relaxed": the adds commute, and no other memory is ordered by them; the
default acq_rel adds fences). dW and db, shared by every pair, take no atomics: one GEMM and one
sum after the first kernel, in a fixed order (so they are the same from run to run), with the d2
scratch in dF's storage where there is a dF (it is free until the second kernel stores dF) and
the inputs' dtype is at most 4 bytes (fp64 inputs: a buffer of its own).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from rcar_fast.backends import contract

from . import _alloc
from .attention import (EPS, MODE_ALIGNMENT, MODE_ATTENDED, _attention_probs, _dot, _gram_tile, _group, _pair,
                        _projection_chunk, _scores, _temperatures, check_rows, check_width, context_rows, gram,
                        triton_attention)

Tensor = torch.Tensor


@triton.jit
def _grad_context_chunk(c_base, q_base, g_base, w_ptr, dy_row, d2_row, sc_d, sq_d, sg_x, sw_s, sw_d, d0, D,
                        S_DIM, Pm, inv_un, qmask, rows, cmask,
                        MODE: tl.constexpr, IEEE: tl.constexpr, WITH_D2: tl.constexpr,
                        BQ: tl.constexpr, BD: tl.constexpr, BSC: tl.constexpr):
    """One d-chunk of U = P C and of dA (MODE_ALIGNMENT: 2 (dY W) (A - Q), dY streamed from the
    scratch BSC columns at a time; MODE_ATTENDED: the given gradient). WITH_D2 (MODE_ALIGNMENT) also
    stores this chunk of (Q - A)^2, in the inputs' dtype as the projection took it, to the d2
    scratch (its rows: d2_row; zeros past a query length), for dW = dY^T (Q - A)^2 as one GEMM
    after the kernel. Rows past the query length: dA = 0."""
    rd = tl.arange(0, BD)
    dm = (d0 + rd) < D
    qd = qmask[:, None] & dm[None, :]
    Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
    U = _dot(Pm.to(Cc.dtype), Cc, IEEE)
    if MODE == MODE_ALIGNMENT:
        Qc = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qd, other=0.0).to(tl.float32)
        Dq = Qc - U * inv_un[:, None]
        if WITH_D2:
            tl.store(d2_row[:, None] + (d0 + rd)[None, :], tl.where(qd, Dq * Dq, 0.0).to(Cc.dtype),
                     mask=rows[:, None] & dm[None, :])
        dYW = tl.zeros((BQ, BD), dtype=tl.float32)
        for s0 in range(0, S_DIM, BSC):
            rs = s0 + tl.arange(0, BSC)
            sm = rs < S_DIM
            Wc = tl.load(w_ptr + rs[:, None] * sw_s + (d0 + rd)[None, :] * sw_d,
                         mask=sm[:, None] & dm[None, :], other=0.0)
            dYc = tl.load(dy_row[:, None] + rs[None, :], mask=rows[:, None] & sm[None, :], other=0.0)
            dYW += _dot(dYc.to(Wc.dtype), Wc, IEEE)
        dA = tl.where(qd, -2.0 * dYW * Dq, 0.0)
    else:
        dA = tl.load(g_base + (d0 + rd)[None, :] * sg_x, mask=qd, other=0.0).to(tl.float32)
    return Cc, U, dA, qd, dm


@triton.jit
def _attention_bwd_kernel(
    q_ptr, qlen_ptr, c_ptr, clen_ptr, cidx_ptr, gram_ptr, f_ptr, lam_ptr, w_ptr, bias_ptr, g_ptr,
    dq_ptr, dc_ptr, d2_ptr, dy_ptr, dp_ptr,
    P, NG, LQ, D, S_DIM, lam_scalar,
    sq_p, sq_l, sq_d,
    sc_b, sc_l, sc_d,
    sx_b, sx_p,
    sf_b, sf_p, sf_l, sf_d,
    sl_b, sl_p, sl_l,
    sw_s, sw_d,
    sg_b, sg_p, sg_l, sg_x,
    HAS_F: tl.constexpr, HAS_LAM: tl.constexpr, MODE: tl.constexpr,
    IEEE: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
    BS: tl.constexpr, BSB: tl.constexpr, BSC: tl.constexpr,
):
    """Passes A to D for GP pairs of one context item (as the forward's programs: their GP * BQ
    rows in every product, so W is read and dC accumulated once per program); dP (BQ x BC per
    pair, fp32) goes to dp_ptr for the second kernel, MODE_ALIGNMENT's (Q - A)^2 to d2_ptr (for
    dW's GEMM); gram_ptr: the context items' Gram matrices (attention.gram). The context (and
    dC's atomics) at the pairs' context item bc, the rest at each pair's place b, p."""
    b, bc, p, rq, rc, qmask, cmask = _group(qlen_ptr, clen_ptr, cidx_ptr, sx_b, sx_p, NG, P, GP, BQ, BC)
    rd = tl.arange(0, BD)
    rows = (rq < LQ) & (p < P)
    q_base = q_ptr + p[:, None] * sq_p + rq[:, None] * sq_l
    c_base = c_ptr + bc * sc_b + rc[:, None] * sc_l
    f_base = f_ptr + b * sf_b + p[:, None] * sf_p + rq[:, None] * sf_l
    g_base = g_ptr + b * sg_b + p[:, None] * sg_p + rq[:, None] * sg_l
    # fp32 accumulators, contiguous: dq (P, LQ, D), dc (B, Lc_max = BC rows used);
    # MODE_ALIGNMENT scratch for dY: (B, P, LQ, S_DIM) fp32, these pairs' rows only
    dq_base = dq_ptr + p[:, None] * LQ * D + rq[:, None] * D
    dc_base = dc_ptr + bc * BC * D + rc[:, None] * D
    dy_row = dy_ptr + ((b * P + p) * LQ + rq) * S_DIM
    d2_row = d2_ptr + ((b * P + p) * LQ + rq) * D

    # pass A: as the forward
    S0 = _scores(q_base, c_base, f_base, sq_d, sc_d, sf_d, qmask, cmask, D, HAS_F, IEEE, GP * BQ, BC, BD)
    G = _gram_tile(gram_ptr, bc, rc, cmask, BC)
    lam = _temperatures(lam_ptr, lam_scalar, b, p, rq, qmask, sl_b, sl_p, sl_l, HAS_LAM)
    S, N, Sn, Pm, un = _attention_probs(S0, G, lam, qmask, cmask, IEEE, True, GP)
    inv_un = 1.0 / (un + EPS)
    # passes B-D need P only as a product operand: keep it in the inputs' dtype (the fp32 copy
    # is recomputed by _attention_bwd_scores_kernel; holding it through the passes spilled)
    Pm = Pm.to(c_ptr.dtype.element_ty)

    if MODE == MODE_ALIGNMENT:
        # pass B: Y = (Q - A)^2 W^T + b, BSB columns at a time (each chunk one pass over d with the
        # attended context recomputed: holding Y s wide spilled), parked in the scratch, with its
        # row norms r and Y . dE
        r2 = tl.zeros((GP * BQ,), dtype=tl.float32)
        ydE = tl.zeros((GP * BQ,), dtype=tl.float32)
        for s0 in range(0, S_DIM, BSB):
            rsc = s0 + tl.arange(0, BSB)
            scm = rsc < S_DIM
            Yc = _projection_chunk(c_base, q_base, w_ptr, bias_ptr, sc_d, sq_d, sw_s, sw_d, D, S_DIM, s0,
                                   Pm, inv_un, qmask, cmask, IEEE, GP * BQ, BD, BSB)
            r2 += tl.sum(Yc * Yc, axis=1)
            m = qmask[:, None] & scm[None, :]
            dEc = tl.load(g_base + rsc[None, :] * sg_x, mask=m, other=0.0).to(tl.float32)
            ydE += tl.sum(tl.where(m, Yc * dEc, 0.0), axis=1)
            tl.store(dy_row[:, None] + rsc[None, :], Yc, mask=rows[:, None] & scm[None, :])
        tl.debug_barrier()   # the stores' layout is not the loads': other threads read them
        # dY = d l2n(Y) from dE, chunk by chunk, over Y in the scratch. Rows qlen <= q < LQ hold a
        # Y (with Q = 0 there) that is never read: their loads are masked and they get dY = 0,
        # which passes C and D read back
        r = tl.sqrt(r2)
        rs_ = tl.where(r > 0, r, 1.0)      # guarded divisions divide by a safe value
        coef = tl.where(r > 0, ydE / (rs_ * (r + EPS) * (r + EPS)), 0.0)
        for s0 in range(0, S_DIM, BSC):
            rsc = s0 + tl.arange(0, BSC)
            scm = (rsc < S_DIM)[None, :]
            m = qmask[:, None] & scm
            Yc = tl.load(dy_row[:, None] + rsc[None, :], mask=m, other=0.0)
            dEc = tl.load(g_base + rsc[None, :] * sg_x, mask=m, other=0.0).to(tl.float32)
            dYc = tl.where(m, dEc / (r + EPS)[:, None] - Yc * coef[:, None], 0.0)
            tl.debug_barrier()   # every thread has read this chunk of Y before any overwrites it
            tl.store(dy_row[:, None] + rsc[None, :], dYc, mask=rows[:, None] & scm)
        tl.debug_barrier()

    # pass C: U . dA per row; MODE_ALIGNMENT also (Q - A)^2 to d2, and dQ's direct term -dA
    udA = tl.zeros((GP * BQ,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        Cc, U, dA, qd, dm = _grad_context_chunk(
            c_base, q_base, g_base, w_ptr, dy_row, d2_row, sc_d, sq_d, sg_x, sw_s, sw_d, d0, D, S_DIM,
            Pm, inv_un, qmask, rows, cmask, MODE, IEEE, True, GP * BQ, BD, BSC)
        if MODE == MODE_ALIGNMENT:
            tl.atomic_add(dq_base + (d0 + rd)[None, :], -dA, mask=qd, sem="relaxed")
        udA += tl.sum(U * dA, axis=1)

    # pass D: dU, dP = dU C^T, dC += P^T dU
    coefU = tl.where(un > 0, udA * inv_un * inv_un / tl.where(un > 0, un, 1.0), 0.0)
    dP = tl.zeros((GP * BQ, BC), dtype=tl.float32)
    for d0 in range(0, D, BD):
        Cc, U, dA, qd, dm = _grad_context_chunk(
            c_base, q_base, g_base, w_ptr, dy_row, d2_row, sc_d, sq_d, sg_x, sw_s, sw_d, d0, D, S_DIM,
            Pm, inv_un, qmask, rows, cmask, MODE, IEEE, False, GP * BQ, BD, BSC)
        dU = tl.where(qd, dA * inv_un[:, None] - U * coefU[:, None], 0.0)
        dP += _dot(dU.to(Cc.dtype), tl.trans(Cc), IEEE)
        tl.atomic_add(dc_base + (d0 + rd)[None, :], _dot(tl.trans(Pm).to(Cc.dtype), dU.to(Cc.dtype), IEEE),
                      mask=cmask[:, None] & dm[None, :], sem="relaxed")

    tl.store(dp_ptr + ((b * P + p[:, None]) * BQ + rq[:, None]) * BC + rc[None, :], dP, mask=(p < P)[:, None])


@triton.jit
def _attention_bwd_scores_kernel(
    q_ptr, qlen_ptr, c_ptr, clen_ptr, cidx_ptr, f_ptr, lam_ptr, dp_ptr,
    dq_ptr, dc_ptr, df_ptr, dlam_ptr,
    P, LQ, D, lam_scalar,
    sq_p, sq_l, sq_d,
    sc_b, sc_l, sc_d,
    sx_b, sx_p,
    sf_b, sf_p, sf_l, sf_d,
    sl_b, sl_p, sl_l,
    HAS_F: tl.constexpr, HAS_LAM: tl.constexpr, NEED_DF: tl.constexpr, IEEE: tl.constexpr,
    BQ: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
):
    """From dP (the first kernel's) to the scores' gradient dS0, then dQ, dC, dF and dlam, for
    one pair. A kernel of its own: in the first kernel this part spilled (dP held through the
    recompute of S0, fp32)."""
    b, bc, p, rq, rc, qmask, cmask = _pair(qlen_ptr, clen_ptr, cidx_ptr, sx_b, sx_p, P, BQ, BC)
    rd = tl.arange(0, BD)
    q_base = q_ptr + p * sq_p + rq[:, None] * sq_l
    c_base = c_ptr + bc * sc_b + rc[:, None] * sc_l
    f_base = f_ptr + b * sf_b + p * sf_p + rq[:, None] * sf_l
    dq_base = dq_ptr + p * LQ * D + rq[:, None] * D
    dc_base = dc_ptr + bc * BC * D + rc[:, None] * D
    df_base = df_ptr + (b * P + p) * LQ * D + rq[:, None] * D
    lam = _temperatures(lam_ptr, lam_scalar, b, p, rq, qmask, sl_b, sl_p, sl_l, HAS_LAM)

    # on chip: softmax, temperatures, normalisation across queries, LeakyReLU, with S0, S, N and
    # P recomputed; |U| is not needed here, so neither is G. S > 0 exactly where S0 > 0 on
    # valid rows, so only S is held, and Sn = S / (N + eps) is not held as a tile either
    S0 = _scores(q_base, c_base, f_base, sq_d, sc_d, sf_d, qmask, cmask, D, HAS_F, IEEE, BQ, BC, BD)
    S, N, Sn, Pm, un = _attention_probs(S0, S0, lam, qmask, cmask, IEEE, False)   # no |U|: G unused
    valid = qmask[:, None] & cmask[None, :]
    dP = tl.load(dp_ptr + (b * P + p) * BQ * BC + rq[:, None] * BC + rc[None, :])
    dZ = tl.where(valid, Pm * (dP - tl.sum(Pm * dP, axis=1)[:, None]), 0.0)
    inv_n = 1.0 / (N + EPS)
    if HAS_LAM:
        dlam = tl.sum(dZ * S * inv_n[None, :], axis=1)
        tl.store(dlam_ptr + (b * P + p) * LQ + rq, tl.where(qmask, dlam, 0.0), mask=rq < LQ)
    dSn = dZ * lam[:, None]
    coefN = tl.where(N > 0, tl.sum(S * dSn, axis=0) / (tl.where(N > 0, N, 1.0) * (N + EPS) * (N + EPS)), 0.0)
    dS = dSn * inv_n[None, :] - S * coefN[None, :]
    dS0 = tl.where(valid, tl.where(S > 0, dS, 0.1 * dS), 0.0)

    # pass E: dX = dS0 C; dF, dQ
    for d0 in range(0, D, BD):
        dm = (d0 + rd) < D
        qd = qmask[:, None] & dm[None, :]
        Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
        Qc = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qd, other=0.0)
        dX = _dot(dS0.to(Cc.dtype), Cc, IEEE)
        if HAS_F:
            Fc = tl.load(f_base + (d0 + rd)[None, :] * sf_d, mask=qd, other=0.0)
            if NEED_DF:
                tl.store(df_base + (d0 + rd)[None, :], tl.where(qd, dX * Qc.to(tl.float32), 0.0),
                         mask=(rq < LQ)[:, None] & dm[None, :])
            tl.atomic_add(dq_base + (d0 + rd)[None, :], dX * Fc.to(tl.float32), mask=qd, sem="relaxed")
        else:
            tl.atomic_add(dq_base + (d0 + rd)[None, :], dX, mask=qd, sem="relaxed")

    # pass F: dC += dS0^T (F Q), in a loop of its own: with pass E's, dS0 was held in both operand
    # layouts at once (spills in fp32)
    dS0t = tl.trans(dS0).to(c_ptr.dtype.element_ty)
    for d0 in range(0, D, BD):
        dm = (d0 + rd) < D
        qd = qmask[:, None] & dm[None, :]
        X = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qd, other=0.0)
        if HAS_F:
            X = X * tl.load(f_base + (d0 + rd)[None, :] * sf_d, mask=qd, other=0.0)
        tl.atomic_add(dc_base + (d0 + rd)[None, :], _dot(dS0t, X.to(dS0t.dtype), IEEE),
                      mask=cmask[:, None] & dm[None, :], sem="relaxed")


def _four_warps(half: bool, mode: int, BQ: int, BC: int) -> bool:
    """Where the first backward kernel runs 4 warps, not 8: where 8 spilled and 4 did not
    (ptxas sweeps, python -m bench.resources). fp32 with the projection at 2048 rows x context
    rows (BQ 32 x BC 64): 8 warps spilled 4 B (sm_80 and sm_90) in the variant the JIT compiles
    at run time (unit strides constant), 4 did not."""
    attended = mode == MODE_ATTENDED.value
    return (attended and BQ * BC <= 2048) or (not half and BQ * BC == 2048)


def attention_bwd_config(half: bool, Lq: int, Lc: int, D: int, width: int, mode: int,
                         grouped: bool = False) -> dict:
    """Block sizes and launch options of the first backward kernel (half: any dtype but fp32,
    which takes the exact-product path). From ptxas sweeps (no GPU run yet): block_d 16; Y in
    chunks of BSB = 32 columns and dY read back 16 at a time (s-wide tiles of either spilled, up to
    914/1008 B of spill stores/loads); 8 warps (16 spilled more: 128 registers a thread), 4 where 8 spilled (_four_warps);
    fp32 without software pipelining (num_stages 1, from attention_config)."""
    from .attention import ROWS, attention_config

    cfg = attention_config(half, Lq, Lc, D, width, mode, grouped, rows=ROWS)
    cfg.update(BD=min(16, cfg["BD"]), BSB=min(32, cfg["BS"]), BSC=min(16, cfg["BS"]),
               num_warps=4 if _four_warps(half, mode, cfg["GP"] * cfg["BQ"], cfg["BC"]) else 8)
    return cfg


def scores_config(cfg: dict) -> dict:
    """The second kernel's block sizes and launch options, from the first kernel's config."""
    return dict(BQ=cfg["BQ"], BC=cfg["BC"], BD=cfg["BD"], num_warps=8, num_stages=cfg["num_stages"],
                maxnreg=cfg["maxnreg"])


def _d2_scratch(df: Optional[Tensor], shape: Tuple[int, int, int, int], query: Tensor) -> Tensor:
    """The (Q - A)^2 scratch (B, P, Lq, d) in the inputs' dtype for dW's GEMM: in dF's storage
    where there is one and the dtype is at most 4 bytes (dF: fp32, the same shape; free until the
    second kernel stores dF over it), else a buffer of its own."""
    if df is None or query.element_size() > df.element_size():
        return _alloc.empty(shape, dtype=query.dtype, device=query.device)
    return df.view(-1).view(query.dtype)[:df.numel()].view(shape)


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32 from operands of one dtype: the products exact and summed in fp32 (what a
    kernel's tl.dot does with fp32 accumulation). On CUDA for fp16/bf16 one cuBLAS GEMM with an
    fp32 output (torch.mm's out_dtype, tensor cores); elsewhere, or in a torch without it, the
    operands widened to fp32 first (the same products, exact in fp32). fp32 and fp64 operands:
    torch.mm in their dtype (fp32 as the user's TF32 setting has it), the result in fp32."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b).float()
    if a.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


#: torch.mm(a, b, out_dtype=...) (aten::mm.dtype; CUDA only)
_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def attention_bwd(grad, query, qlens, context, clens, factors=None, lam=10.0, weight=None,
                  bias=None, need_dfactors=True, context_index=None):
    """Gradients of attention_fwd's output (grad: (B, P, Lq, s or d)) with respect to
    (query, context, factors, lam, weight, bias); None where an input is absent. fp32.
    Paired (context_index (P,) int32, B = 1): dcontext (context items, Lc, d) gets each pair's
    part added atomically at row context_index[p] (a repeated index adds up).
    Two launches: passes A-D (_attention_bwd_kernel), then the scores' gradient and what
    follows from it (_attention_bwd_scores_kernel), through an fp32 scratch for dP
    (B, P, BQ, BC) and, with a weight, one for Y and dY (B, P, Lq, s) and one for (Q - A)^2
    (B, P, Lq, d, the inputs' dtype; in dF's storage where there is a dF); between them, with a
    weight, dW = dY^T (Q - A)^2 (one GEMM, mm_f32) and db = dY's column sums."""
    P, Lq, D = query.shape
    Lc = context.shape[1]
    B, cidx, sx = context_rows(context, context_index)
    projection = weight is not None
    mode = (MODE_ALIGNMENT if projection else MODE_ATTENDED).value
    width = weight.shape[0] if projection else D
    check_rows("query", Lq, "query rows")
    check_rows("context", Lc, "context rows")
    if projection:
        check_width("weight", width)
    cfg = attention_bwd_config(query.dtype != torch.float32, Lq, Lc, D, width, mode, grouped=context_index is None)
    f32 = dict(dtype=torch.float32, device=query.device)
    dq = torch.zeros(P, Lq, D, **f32)
    dc = torch.zeros(context.shape[0], cfg["BC"], D, **f32)
    has_f, has_lam = factors is not None, isinstance(lam, torch.Tensor)
    need_df = has_f and need_dfactors
    # dF: every element stored by the second kernel (zeros at padded rows), so not zeroed here
    df = _alloc.empty((B, P, Lq, D), **f32) if need_df else dq
    dlam = torch.zeros(B, P, Lq, **f32) if has_lam else dq
    dw = db = None
    if B * P:
        dy = _alloc.empty((B, P, Lq, width), **f32) if projection else dq   # Y, then dY
        dp = _alloc.empty((B, P, cfg["BQ"], cfg["BC"]), **f32)               # dP
        d2 = _d2_scratch(df if need_df else None, (B, P, Lq, D), query) if projection else dq
        f = factors if has_f else query
        lt = lam if has_lam else query
        sf = factors.stride() if has_f else (0, 0, 0, 0)
        sl = lam.stride() if has_lam else (0, 0, 0)
        lam_scalar = 0.0 if has_lam else float(lam)
        ieee = query.dtype == torch.float32
        NG = triton.cdiv(P, cfg["GP"])
        _attention_bwd_kernel[(B * NG,)](
            query, qlens, context, clens, cidx, gram(context, clens, cfg["BC"]), f, lt,
            weight if projection else query, bias if projection else query, grad,
            dq, dc, d2, dy, dp,
            P, NG, Lq, D, width, lam_scalar,
            *query.stride(), *context.stride(), *sx, *sf, *sl,
            *(weight.stride() if projection else (0, 0)), *grad.stride(),
            HAS_F=has_f, HAS_LAM=has_lam, MODE=mode, IEEE=ieee, **cfg)
        if projection:   # before the second kernel, which overwrites d2 where it lives in dF
            dyr = dy.view(-1, width)
            dw = mm_f32(dyr.t().to(query.dtype), d2.view(-1, D))
            db = dyr.sum(dim=0)
        _attention_bwd_scores_kernel[(B * P,)](
            query, qlens, context, clens, cidx, f, lt, dp, dq, dc, df, dlam,
            P, Lq, D, lam_scalar, *query.stride(), *context.stride(), *sx, *sf, *sl,
            HAS_F=has_f, HAS_LAM=has_lam, NEED_DF=need_df, IEEE=ieee, **scores_config(cfg))
    elif projection:
        dw, db = torch.zeros(width, D, **f32), torch.zeros(width, **f32)
    return dq, dc[:, :Lc], df if need_df else None, dlam if has_lam else None, dw, db


# ----------------------------------------------------------------------------- the custom op

@torch.library.custom_op("rcar_fast::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(grad: Tensor, query: Tensor, qlens: Tensor, context: Tensor, clens: Tensor,
                         factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
                         weight: Optional[Tensor], bias: Optional[Tensor], need_dfactors: bool,
                         context_index: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The attention's backward (csrc/README.md's ``attention_bwd`` contract): (dquery, dcontext,
    dfactors, dlam, dweight, dbias), computed in fp32 and returned in fp32 (fp64 for fp64
    inputs); an absent one is an empty tensor. context_index: the paired form (dcontext
    accumulated into the indexed rows)."""
    outs = attention_bwd(grad, query, qlens, context, clens, factors, lam_scalar if lam is None else lam,
                         weight, bias, need_dfactors, context_index)
    acc = contract.accumulation_dtype(query)
    return tuple(query.new_empty(0, dtype=acc) if o is None else o.to(acc).contiguous() for o in outs)


triton_attention_bwd.register_fake(contract.attention_bwd_fake)
contract.register_attention_autograd(triton_attention, triton_attention_bwd)
