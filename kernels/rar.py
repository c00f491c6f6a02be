"""Iterative aggregation reweighting (RAR), fused. One launch per step; on it, one Triton program
takes GP pairs (GP = 128 // Lq in bf16/fp16: t2i, 11 captions of 11 words or 5 of 24; 64 // Lq
in fp32), their Lq rows each packed back to back into M rows (no padding between pairs), with
their alignment vectors E (M x s) held on chip (bf16/fp16; fp32, the exact-product path, reads E
from memory where it is used instead: see _keys), so the key weight Wk is read once per GP pairs
and the key product is M rows tall. Each pair's softmax runs over its own rows by segmented
scans, and its weighted sum of E is one product with a matrix of the pairs' weights (_pair_sums).

Per step t (weights of module t, stacked on a leading axis):
  g = tanh(Wq h + bq)          (s per pair: Wq h + bq as ONE GEMM over every pair, outside the
                                kernel, in E's dtype (tensor cores for bf16/fp16); tanh in the
                                kernel, fp32)
  K = tanh(E Wk^T + bk)        (Lq x s per pair, computed BN columns at a time, never stored)
  logit[q] = sum_n K[q, n] g[n] wv[n] + bv;   a = softmax over the pair's valid q
  h = l2n(sum_q a[q] E[q])
h starts from the given h0 or from the plain mean of E over the valid positions: then, in
bf16/fp16, step 0's program makes it on chip, and its gate with it (FIRST: the mean's GPP x s
tile times Wq on the tensor cores; no launch for the mean, no GEMM for step 0's gates; fp32
takes the mean from torch). Between steps h is kept in
E's dtype (as a launch per step keeps it, which the backward's recompute does).
Dropout (training): optional keep-masks already scaled by 1/(1-p), mk (B, P, Lq, s) on K and
mg (B, P, s) on g, for a single step (T = 1); the caller draws them so backward can reuse them.
The backward (_rar_bwd_kernel, one program per pair, one step) recomputes g itself.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from rcar_fast.backends import contract

from . import _alloc
from .attention import (EPS, FWD_ROWS_HALF, MAX_REGISTERS, ROWS, _dot, _pow2, _segment_max, _segment_sum,
                        check_rows, check_width)

Tensor = torch.Tensor

@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: tl.sigmoid exists in the interpreter (no libdevice there)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _e_tile(e_base, se_s, rs, qmask, smask):
    """E of one pair (BQ x BS), zeros past the query length and s."""
    return tl.load(e_base + rs[None, :] * se_s, mask=qmask[:, None] & smask[None, :], other=0.0)


@triton.jit
def _keys(E, e_base, se_s, qmask, wk_ptr, bk_ptr, w0, n0, rs, smask, S_DIM,
          IEEE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Columns n0 .. n0 + BN of one step's K = tanh(E Wk^T + bk) (rows x BN), before dropout;
    w0 is the step's offset into the stacked weights (t s^2, biases t s). Rows: e_base's.
    bf16/fp16: E is the tile held in registers, one tensor-core product over all of s.
    fp32 (IEEE, exact FMA products): E is streamed from memory BK columns at a time (E unused):
    an FMA product holds a thread's rows of E for its whole K, which spilled at K = s."""
    rn = n0 + tl.arange(0, BN)
    nm = rn < S_DIM
    wrow = wk_ptr + w0 * S_DIM + rn[:, None] * S_DIM
    if IEEE:
        rk = tl.arange(0, BK)
        acc = tl.zeros((e_base.shape[0], BN), dtype=tl.float32)
        for k0 in range(0, S_DIM, BK):
            km = (k0 + rk) < S_DIM
            Ec = tl.load(e_base + (k0 + rk)[None, :] * se_s, mask=qmask[:, None] & km[None, :], other=0.0)
            Wkc = tl.load(wrow + (k0 + rk)[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc += tl.dot(Ec, tl.trans(Wkc), input_precision="ieee")
    else:
        Wk = tl.load(wrow + rs[None, :], mask=nm[:, None] & smask[None, :], other=0.0)
        acc = tl.dot(E.to(Wk.dtype), tl.trans(Wk))
    K = _tanh(acc + tl.load(bk_ptr + w0 + rn, mask=nm, other=0.0).to(tl.float32)[None, :])
    return K, rn, nm


@triton.jit
def _key_chunk(E, e_base, se_s, qmask, h, wk_ptr, bk_ptr, wq_ptr, bq_ptr, w0, n0, rs, smask, S_DIM,
               IEEE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Columns n0 .. n0 + BN of one pair's K (_keys) and of its gate g = tanh(Wq h + bq) (BN),
    the gate in fp32 SIMT (the backward, one pair per program)."""
    K, rn, nm = _keys(E, e_base, se_s, qmask, wk_ptr, bk_ptr, w0, n0, rs, smask, S_DIM, IEEE, BN, BK)
    Wq = tl.load(wq_ptr + w0 * S_DIM + rn[:, None] * S_DIM + rs[None, :], mask=nm[:, None] & smask[None, :],
                 other=0.0).to(tl.float32)
    g = _tanh(tl.sum(Wq * h[None, :], axis=1) + tl.load(bq_ptr + w0 + rn, mask=nm, other=0.0).to(tl.float32))
    return K, g, rn, nm


@triton.jit
def _rar_pair(e_ptr, qlen_ptr, P, S_DIM, se_b, se_p, se_l, se_s, IEEE: tl.constexpr, BQ: tl.constexpr,
              BS: tl.constexpr):
    """This program's pair (b, p), its valid rows, row/column ranges and masks, the pointers to
    its rows of E and E itself (bf16/fp16: the tile held in registers; fp32: E is read from
    memory where it is used, not held (see _key_chunk), and E is a placeholder)."""
    pid = tl.program_id(0)
    b = (pid // P).to(tl.int64)
    p = (pid % P).to(tl.int64)
    qlen = tl.load(qlen_ptr + p)
    rq = tl.arange(0, BQ)
    rs = tl.arange(0, BS)
    qmask = rq < qlen
    smask = rs < S_DIM
    e_base = e_ptr + b * se_b + p * se_p + rq[:, None] * se_l
    if IEEE:
        E = qmask
    else:
        E = _e_tile(e_base, se_s, rs, qmask, smask)
    return b, p, qlen, rq, rs, qmask, smask, e_base, E


@triton.jit
def _step_weights(E, e_base, se_s, qmask, h, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, t,
                  mk_base, smk_s, mg_base, smg_s, rs, smask, S_DIM, HAS_DROP: tl.constexpr,
                  IEEE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One step's attention weights a = softmax over valid rows of sum_n K g wv + bv (step t of
    the stacked weights), K and g in BN-column chunks with their dropout keep-masks."""
    logit = tl.zeros(qmask.shape, dtype=tl.float32)
    for n0 in range(0, S_DIM, BN):
        K, g, rn, nm = _key_chunk(E, e_base, se_s, qmask, h, wk_ptr, bk_ptr, wq_ptr, bq_ptr, t * S_DIM, n0,
                                  rs, smask, S_DIM, IEEE, BN, BK)
        if HAS_DROP:
            K = K * tl.load(mk_base + rn[None, :] * smk_s, mask=qmask[:, None] & nm[None, :],
                            other=0.0).to(tl.float32)
            g = g * tl.load(mg_base + rn * smg_s, mask=nm, other=0.0).to(tl.float32)
        wv = tl.load(wv_ptr + t * S_DIM + rn, mask=nm, other=0.0).to(tl.float32)
        logit += tl.sum(K * (g * wv)[None, :], axis=1)
    logit += tl.load(bv_ptr + t).to(tl.float32)
    logit = tl.where(qmask, logit, float("-inf"))
    a = tl.exp(logit - tl.max(logit, axis=0))
    return a / tl.sum(a, axis=0)


@triton.jit
def _pair_sums(a, E, e_base, se_s, rs, qmask, smask, g, rg, IEEE: tl.constexpr):
    """sum over each pair's rows of a[r] E[r] (GPP x BS, fp32; row j of the result is pair j of
    the program): the product of A (GPP x M, A[j, r] = a[r] where row r is pair j's, else 0)
    with E on the tensor cores. bf16/fp16: A in two halves of the inputs' dtype (A = hi + lo, the
    rest of hi's rounding in lo: about 16 bits of each weight, against 8 for bf16 alone);
    fp32: exact products (E read from memory here)."""
    A = tl.where(g[None, :] == rg[:, None], a[None, :], 0.0)
    if IEEE:
        out = _dot(A, _e_tile(e_base, se_s, rs, qmask, smask), IEEE)
    else:
        hi = A.to(E.dtype)
        lo = (A - hi.to(tl.float32)).to(E.dtype)
        out = tl.dot(hi, E, tl.dot(lo, E))
    return out


@triton.jit
def _rar_fwd_kernel(
    e_ptr, qlen_ptr, gate_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wq_ptr, bq_ptr, mk_ptr, mg_ptr, out_ptr,
    sw_ptr, sb_ptr, score_ptr,
    P, NG, GP, LQ, S_DIM, t,
    se_b, se_p, se_l, se_s,
    smk_b, smk_p, smk_l, smk_s,
    smg_b, smg_p, smg_s,
    so_b, so_p, so_s,
    FIRST: tl.constexpr, HAS_DROP: tl.constexpr, IEEE: tl.constexpr, SCORE: tl.constexpr,
    M: tl.constexpr, GPP: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """GP pairs (b, p0 .. p0 + GP - 1) per program, their LQ rows each packed back to back into M
    rows (row r: row qr = r % LQ of pair j = r // LQ; M the power of two at or above GP * LQ,
    GPP >= GP the pairs' rows of the result tiles). One step t: the pre-activation of the gate,
    Wq h + bq, read per pair from gate_ptr ((B, P, s), contiguous), or, FIRST (step 0 without a
    given h), made here: h = the mean of E over each pair's valid rows (_pair_sums with ones,
    rounded to out_ptr's dtype as a stored h is), times Wq's BN rows per chunk (GPP x s x BN on
    the tensor cores), plus bq, rounded as the GEMM's output is, handed to each row by a gather;
    its tanh taken here in fp32; K by _keys; a = softmax over each pair's valid rows (its maximum
    and sum by segmented scans down the rows, as the attention's column norms); store
    h = l2n(sum_q a[q] E[q]) (_pair_sums). h is stored in out_ptr's dtype; SCORE (the last step at
    inference): not h but each pair's score sigmoid(sw . h + sb) (fp32, (B, P) contiguous at
    score_ptr), h rounded to out_ptr's dtype first, as a stored h is."""
    pid = tl.program_id(0)
    b = (pid // NG).to(tl.int64)
    p0 = (pid % NG).to(tl.int64) * GP
    r = tl.arange(0, M)
    g = r // LQ
    qr = r - g * LQ
    p = p0 + g
    live = r < tl.minimum(GP, P - p0) * LQ      # g < GP and p < P
    qmask = qr < tl.load(qlen_ptr + p, mask=live, other=0)
    rs = tl.arange(0, BS)
    smask = rs < S_DIM
    e_base = e_ptr + b * se_b + p[:, None] * se_p + qr[:, None] * se_l
    if IEEE:
        E = qmask
    else:
        E = _e_tile(e_base, se_s, rs, qmask, smask)
    rg = tl.arange(0, GPP)
    pp = p0 + rg
    if FIRST:
        n = tl.maximum(tl.load(qlen_ptr + pp, mask=(rg < GP) & (pp < P), other=1), 1).to(tl.float32)
        h0 = (_pair_sums(tl.where(qmask, 1.0, 0.0), E, e_base, se_s, rs, qmask, smask, g, rg, IEEE)
              / n[:, None]).to(out_ptr.dtype.element_ty)
        gi = tl.broadcast_to(tl.minimum(g, GPP - 1)[:, None], (M, BN))   # rows past the pairs: masked
    mk_base = mk_ptr + b * smk_b + p[:, None] * smk_p + qr[:, None] * smk_l
    g_base = gate_ptr + (b * P + p)[:, None] * S_DIM
    logit = tl.zeros((M,), dtype=tl.float32)
    for n0 in range(0, S_DIM, BN):
        K, rn, nm = _keys(E, e_base, se_s, qmask, wk_ptr, bk_ptr, t * S_DIM, n0, rs, smask, S_DIM, IEEE, BN, BK)
        m2 = qmask[:, None] & nm[None, :]
        if FIRST:
            wq = tl.load(wq_ptr + t * S_DIM * S_DIM + rn[:, None] * S_DIM + rs[None, :],
                         mask=nm[:, None] & smask[None, :], other=0.0).to(h0.dtype)
            gp = _dot(h0, tl.trans(wq), IEEE) + tl.load(bq_ptr + t * S_DIM + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            gt = _tanh(tl.gather(gp.to(out_ptr.dtype.element_ty).to(tl.float32), gi, 0))
        else:
            gt = _tanh(tl.load(g_base + rn[None, :], mask=m2, other=0.0).to(tl.float32))
        if HAS_DROP:
            K = K * tl.load(mk_base + rn[None, :] * smk_s, mask=m2, other=0.0).to(tl.float32)
            gt = gt * tl.load(mg_ptr + b * smg_b + p[:, None] * smg_p + rn[None, :] * smg_s, mask=m2,
                              other=0.0).to(tl.float32)
        wv = tl.load(wv_ptr + t * S_DIM + rn, mask=nm, other=0.0).to(tl.float32)
        logit += tl.sum(K * gt * wv[None, :], axis=1)
    logit += tl.load(bv_ptr + t).to(tl.float32)
    # softmax over each pair's valid rows: its maximum, then its sum, handed to every row by a
    # scan down the rows and one back up (a pair past P has no valid row: a = 0, not NaN)
    L = tl.where(qmask, logit, float("-inf"))
    run, _ = tl.associative_scan((L, g), 0, _segment_max)
    mx = tl.associative_scan((run, g), 0, _segment_max, reverse=True)[0]
    ex = tl.where(qmask, tl.exp(L - tl.where(mx > float("-inf"), mx, 0.0)), 0.0)
    run, _ = tl.associative_scan((ex, g), 0, _segment_sum)
    tot = tl.associative_scan((run, g), 0, _segment_max, reverse=True)[0]
    # a valid pair's sum is >= 1 (its largest term is exp(0))
    h = _pair_sums(ex / tl.maximum(tot, 1.0), E, e_base, se_s, rs, qmask, smask, g, rg, IEEE)
    h = h / (tl.sqrt(tl.sum(h * h, axis=1)) + EPS)[:, None]
    if SCORE:
        sw = tl.load(sw_ptr + rs, mask=smask, other=0.0)
        x = tl.sum(h.to(out_ptr.dtype.element_ty).to(tl.float32) * sw[None, :], axis=1) + tl.load(sb_ptr)
        tl.store(score_ptr + b * P + pp, 1.0 / (1.0 + tl.exp(-x)), mask=(rg < GP) & (pp < P))
    else:
        tl.store(out_ptr + b * so_b + pp[:, None] * so_p + rs[None, :] * so_s, h,
                 mask=((rg < GP) & (pp < P))[:, None] & smask[None, :])


#: the most pairs one forward program takes (queries of 1 to 3 rows use fewer than its 128 rows):
#: the per-pair sums are a GPP x s fp32 tile (GPP = GP rounded up to a power of two)
MAX_PAIRS = 32


def rar_config(Lq: int, S: int, block_n: int = 32, half: bool = True, grouped: bool = False) -> dict:
    """The block sizes and launch options the launcher picks (the compile report checks these);
    grouped: the forward, GP = rows // Lq pairs per program (at most MAX_PAIRS; a run-time
    argument, popped by the
    launcher), their Lq rows each packed into M = GP * Lq rounded up to a power of two, GPP = GP
    rounded up (the rows of the per-pair sums); rows: kernels/attention.py's FWD_ROWS_HALF = 128
    for half, ROWS = 64 for fp32. Else the backward, one pair of BQ = Lq rounded up rows per
    program. 8 warps: with 4, BQ = 32 and s = 256 spilled on sm_80 and sm_90 (python -m
    bench.resources). fp32 (half False: exact products, no tensor cores) is not
    software-pipelined (num_stages 1): the pipelined loads spilled there."""
    BS = max(16, triton.next_power_of_2(S))
    cfg = dict(BS=BS, BN=max(16, min(block_n, BS)), BK=16, num_warps=8, num_stages=3 if half else 1,
               maxnreg=MAX_REGISTERS)
    if grouped:
        GP = max(1, min(MAX_PAIRS, (FWD_ROWS_HALF if half else ROWS) // Lq))
        cfg.update(GP=GP, M=_pow2(GP * Lq), GPP=_pow2(GP))
    else:
        cfg["BQ"] = max(16, triton.next_power_of_2(Lq))
    return cfg


#: the forward's column chunk of K (BN): with 32, the dropout forward (keep-masks loaded per row
#: of the GP pairs) spilled 24-40 B on sm_80 in bf16/fp16; 16 compiles without spills everywhere
FWD_BLOCK_N = 16


def rar_fwd(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k=None, keep_g=None, block_n: int = FWD_BLOCK_N,
            score=None):
    """Run T RAR steps (T = wq.shape[0]) on every pair of E (B, P, Lq, s).

    qlens (P,) int32 valid query rows; h0 None (start from the mean) or (B, P, s);
    wq, wk (T, s, s), bq, bk (T, s), wv (T, s), bv (T,), all contiguous;
    keep_k (B, P, Lq, s) and keep_g (B, P, s): dropout keep-masks scaled by 1/(1-p), T = 1 only.
    Returns h (B, P, s) in E's dtype. One launch per step; before each step the gates'
    pre-activations of every pair, h Wq^T + bq, as one GEMM in E's dtype (bf16/fp16: tensor
    cores, fp32 accumulation; fp32 follows torch's TF32 switch, as the backward's products with
    the shared weights do), except for step 0 without h0 in bf16/fp16, whose program makes the
    mean and its gate on chip (FIRST; fp32 takes the mean from torch, contract.mean_start); the
    kernel takes the gates' tanh in fp32. h is kept in E's dtype
    between steps, so T steps in one call equal T calls of one step (the backward's recompute).
    score (sw (s,) fp32 contiguous, sb (1,) fp32): the last launch returns the scores
    sigmoid(sw . h + sb) (B, P) fp32 instead of h (the scoring layer on h rounded to E's dtype;
    never stored), without dropout.
    """

    B, P, Lq, S = E.shape
    check_rows("E", Lq, "rows")
    check_width("E", S)
    T = wq.shape[0]
    has_drop = keep_k is not None
    if has_drop and T != 1:
        raise ValueError("keep_k: dropout masks are per step; launch one step at a time")
    if score is not None:
        check_score(score, S, E.device, has_drop, T)
    if B * P == 0:
        return E.new_empty(B, P, S) if score is None else E.new_empty(B, P, dtype=torch.float32)
    mk, mg = (keep_k, keep_g) if has_drop else (E, E)
    smk = keep_k.stride() if has_drop else (0, 0, 0, 0)
    smg = keep_g.stride() if has_drop else (0, 0, 0)
    cfg = rar_config(Lq, S, block_n, E.dtype != torch.float32, grouped=True)
    GP = cfg.pop("GP")
    NG = triton.cdiv(P, GP)

    def launch(t, gate=None):
        """One launch of step t, its gates' pre-activations ``gate`` (B * P, s) or, None, made on
        chip from the mean of E (step 0 without h0); h (B, P, s) in E's dtype, contiguous, or, the
        last step given ``score``, the scores (B, P) fp32."""
        scoring = score is not None and t == T - 1
        if scoring:
            out, h_out, (sw, sb) = _alloc.empty((B, P), dtype=torch.float32, device=E.device), E, score
        else:
            out = h_out = _alloc.empty((B, P, S), dtype=E.dtype, device=E.device)
            sw = sb = h_out
        _rar_fwd_kernel[(B * NG,)](
            E, qlens, h_out if gate is None else gate, wk, bk, wv, bv, wq, bq, mk, mg, h_out, sw, sb, out,
            P, NG, GP, Lq, S, t, *E.stride(), *smk, *smg, *((0, 0, 0) if scoring else h_out.stride()),
            FIRST=gate is None, HAS_DROP=has_drop, IEEE=E.dtype == torch.float32, SCORE=scoring, **cfg)
        return out

    if h0 is None and E.dtype == torch.float32:    # fp32: the mean in torch (held on chip with the
        h0 = contract.mean_start(E, qlens)        # exact products' operands, it spilled 400-500 B)
    h = launch(0) if h0 is None else h0.to(E.dtype)
    for t in range(0 if h0 is not None else 1, T):
        h = launch(t, torch.addmm(bq[t].to(E.dtype), h.reshape(B * P, S), wq[t].to(E.dtype).t()))
    return h


def check_score(score, S: int, device, has_drop: bool, T: int) -> None:
    """A clear error, before any launch, for a scoring layer that is not (sw (S,), sb (1,))
    contiguous float32 on E's device, one asked for with dropout (inference only), or without a
    step to take it (T = 0)."""
    if has_drop:
        raise ValueError("score: the fused scoring layer is for inference; it takes no dropout masks")
    if T < 1:
        raise ValueError(f"wq: the fused scoring layer is taken in the last RAR step; got {T} steps (wq.shape[0])")
    sw, sb = score
    for name, t, shape in (("score_w", sw, (S,)), ("score_b", sb, (1,))):
        if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != device or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous float32 tensor of shape {shape} on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                             f"{'' if t.is_contiguous() else ', not contiguous'}")


@triton.jit
def _rar_bwd_kernel(
    g_ptr, e_ptr, qlen_ptr, h_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, mk_ptr, mg_ptr,
    de_ptr, dkp_ptr, dgp_ptr, dwv_ptr,
    P, LQ, S_DIM,
    sg_b, sg_p, sg_s,
    se_b, se_p, se_l, se_s,
    sh_b, sh_p, sh_s,
    smk_b, smk_p, smk_l, smk_s,
    smg_b, smg_p, smg_s,
    HAS_DROP: tl.constexpr, IEEE: tl.constexpr,
    BQ: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Backward of ONE RAR step for one pair; h is the step's input. Outputs (fp32, contiguous):
    dE's direct term a[q] du (B, P, LQ, s), dKp = dL/d(E Wk^T + bk) (B, P, LQ, s),
    dgp = dL/d(Wq h + bq) and dwv[n] = sum_q dlogit[q] K[q, n] g[n] (B, P, s). The products
    with the shared weights (dE += dKp Wk, dh = dgp Wq, and the weight gradients) are GEMMs over
    these, outside: accumulating dE (LQ x s fp32) and dh here kept a second LQ x s tile alive
    beside E and spilled (bench/results/resources.md). BN-column chunks of s, in passes: the
    forward's logits (K and g chunk by chunk); |u| and u . go, then du, da = E du and dE's direct
    term (E's columns read from memory in fp32: a BQ x s fp32 copy of E held beside it spilled
    under triton 3.6); then the gradients, K and g recomputed."""
    b, p, qlen, rq, rs, qmask, smask, e_base, E = _rar_pair(e_ptr, qlen_ptr, P, S_DIM, se_b, se_p, se_l, se_s,
                                                            IEEE, BQ, BS)
    mk_base = mk_ptr + b * smk_b + p * smk_p + rq[:, None] * smk_l
    mg_base = mg_ptr + b * smg_b + p * smg_p
    h = tl.load(h_ptr + b * sh_b + p * sh_p + rs * sh_s, mask=smask, other=0.0).to(tl.float32)
    # pass 1: the forward's attention weights and output norm
    a = _step_weights(E, e_base, se_s, qmask, h, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, 0,
                      mk_base, smk_s, mg_base, smg_s, rs, smask, S_DIM, HAS_DROP, IEEE, BN, BK)
    # the output u = sum_q a[q] E[q] and d l2n(u): du = go / (|u| + eps) - u (u . go) / (|u| (|u| +
    # eps)^2) (u = 0 has no second term), then da = E du and dE's direct term a du, all in BN-column
    # chunks of E read from memory in fp32 (u's chunks summed twice): a whole BQ x s fp32 tile
    # held beside E spilled with triton 3.6 (BQ 64 with dropout; bench/results/resources_triton36.md)
    out_row = (b * P + p) * LQ
    go_base = g_ptr + b * sg_b + p * sg_p
    nu2 = 0.0
    ug = 0.0
    for n0 in range(0, S_DIM, BN):
        rn = n0 + tl.arange(0, BN)
        nm = rn < S_DIM
        Ec = tl.load(e_base + rn[None, :] * se_s, mask=qmask[:, None] & nm[None, :], other=0.0).to(tl.float32)
        uc = tl.sum(a[:, None] * Ec, axis=0)
        nu2 += tl.sum(uc * uc, axis=0)
        ug += tl.sum(uc * tl.load(go_base + rn * sg_s, mask=nm, other=0.0).to(tl.float32), axis=0)
    nu = tl.sqrt(nu2)
    coef = tl.where(nu > 0, ug / (tl.maximum(nu, 1e-30) * (nu + EPS) * (nu + EPS)), 0.0)
    da = tl.zeros(qmask.shape, dtype=tl.float32)
    for n0 in range(0, S_DIM, BN):
        rn = n0 + tl.arange(0, BN)
        nm = rn < S_DIM
        Ec = tl.load(e_base + rn[None, :] * se_s, mask=qmask[:, None] & nm[None, :], other=0.0).to(tl.float32)
        uc = tl.sum(a[:, None] * Ec, axis=0)
        du = tl.load(go_base + rn * sg_s, mask=nm, other=0.0).to(tl.float32) / (nu + EPS) - uc * coef
        da += tl.sum(Ec * du[None, :], axis=1)
        tl.store(de_ptr + (out_row + rq[:, None]) * S_DIM + rn[None, :],
                 tl.where(qmask[:, None], a[:, None] * du[None, :], 0.0), mask=(rq[:, None] < LQ) & nm[None, :])
    dlogit = tl.where(qmask, a * (da - tl.sum(a * da, axis=0)), 0.0)
    # pass 2: per column chunk, the gradients through K, g and wv
    for n0 in range(0, S_DIM, BN):
        tk, tg, rn, nm = _key_chunk(E, e_base, se_s, qmask, h, wk_ptr, bk_ptr, wq_ptr, bq_ptr, 0, n0, rs, smask,
                                  S_DIM, IEEE, BN, BK)
        K = tk
        g = tg
        if HAS_DROP:
            mk = tl.load(mk_base + rn[None, :] * smk_s, mask=qmask[:, None] & nm[None, :], other=0.0).to(tl.float32)
            mg = tl.load(mg_base + rn * smg_s, mask=nm, other=0.0).to(tl.float32)
            K = tk * mk
            g = tg * mg
        wv = tl.load(wv_ptr + rn, mask=nm, other=0.0).to(tl.float32)
        dK = dlogit[:, None] * (g * wv)[None, :]
        KdL = tl.sum(dlogit[:, None] * K, axis=0)                  # (BN,) sum_q dlogit K
        dg = KdL * wv
        dwv = KdL * g
        if HAS_DROP:
            dK = dK * mk
            dg = dg * mg
        dKp = tl.where(qmask[:, None] & nm[None, :], dK * (1.0 - tk * tk), 0.0)
        dgp = tl.where(nm, dg * (1.0 - tg * tg), 0.0)
        tl.store(dkp_ptr + (out_row + rq[:, None]) * S_DIM + rn[None, :], dKp,
                 mask=(rq[:, None] < LQ) & nm[None, :])
        tl.store(dgp_ptr + (b * P + p) * S_DIM + rn, dgp, mask=nm)
        tl.store(dwv_ptr + (b * P + p) * S_DIM + rn, dwv, mask=nm)


#: the backward's column chunk: with 32, fp32 needed 168-225 KB of shared memory (over the
#: A100's 163 KB) and every variant spilled; with 16 every configuration fits without spills
#: (bench/results/resources.md)
BWD_BLOCK_N = 16


def rar_bwd(grad, E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k=None, keep_g=None,
            block_n: int = BWD_BLOCK_N):
    """Backward of one RAR step (wq ... bv with a leading axis of 1, contiguous) on every pair:
    grad (B, P, s) the gradient of the step's output, h (B, P, s) the step's input. Returns fp32
    (dE (B, P, Lq, s), dh (B, P, s), dKp (B, P, Lq, s), dgp (B, P, s), dwv (B, P, s)), see
    _rar_bwd_kernel; zero at rows past a pair's query length."""

    B, P, Lq, S = E.shape
    check_rows("E", Lq, "rows")
    check_width("E", S)
    if wq.shape[0] != 1:
        raise ValueError(f"wq: rar_bwd runs one step, got {wq.shape[0]} stacked modules")
    f32 = dict(dtype=torch.float32, device=E.device)
    dE, dKp = _alloc.empty((B, P, Lq, S), **f32), _alloc.empty((B, P, Lq, S), **f32)
    dh, dgp, dwv = (_alloc.empty((B, P, S), **f32) for _ in range(3))
    if B * P == 0:
        return dE, dh, dKp, dgp, dwv
    has_drop = keep_k is not None
    mk, mg = (keep_k, keep_g) if has_drop else (E, E)
    smk = keep_k.stride() if has_drop else (0, 0, 0, 0)
    smg = keep_g.stride() if has_drop else (0, 0, 0)
    cfg = rar_config(Lq, S, block_n, E.dtype != torch.float32)
    _rar_bwd_kernel[(B * P,)](
        grad, E, qlens, h, wq, bq, wk, bk, wv, bv, mk, mg, dE, dKp, dgp, dwv,
        P, Lq, S, *grad.stride(), *E.stride(), *h.stride(), *smk, *smg,
        HAS_DROP=has_drop, IEEE=E.dtype == torch.float32, **cfg)
    # the products with the shared weights, as fp32 GEMMs over all pairs (as the weight gradients
    # in rcar_fast.backends.contract.rar_backward: they follow torch's TF32 switch)
    dE.view(-1, S).addmm_(dKp.view(-1, S), wk[0].float())
    torch.mm(dgp.view(-1, S), wq[0].float(), out=dh.view(-1, S))
    return dE, dh, dKp, dgp, dwv


# ----------------------------------------------------------------------------- the custom ops

@torch.library.custom_op("rcar_fast::triton_rar", mutates_args=())
def triton_rar(E: Tensor, qlens: Tensor, h0: Optional[Tensor], wq: Tensor, bq: Tensor, wk: Tensor,
               bk: Tensor, wv: Tensor, bv: Tensor, keep_k: Optional[Tensor],
               keep_g: Optional[Tensor]) -> Tensor:
    """The rar op of the backend contract: T = wq.shape[0] RAR steps on every pair of E
    (B, P, Lq, s); h0 None (the mean of E) or (B, P, s); keep_k (B, P, Lq, s), keep_g (B, P, s):
    dropout keep-masks scaled by 1/(1-p), for T = 1. Returns h (B, P, s)."""
    return rar_fwd(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g)


@torch.library.custom_op("rcar_fast::triton_rar_bwd", mutates_args=())
def triton_rar_bwd(grad: Tensor, E: Tensor, qlens: Tensor, h: Tensor, wq: Tensor, bq: Tensor,
                   wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, keep_k: Optional[Tensor],
                   keep_g: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One RAR step's backward (csrc/README.md's ``rar_bwd``): (dE, dh, dKp, dgp, dwv), computed in
    fp32, returned in fp32 (fp64 for fp64 inputs)."""
    outs = rar_bwd(grad, E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g)
    return tuple(o.to(contract.accumulation_dtype(E)) for o in outs)


@torch.library.custom_op("rcar_fast::triton_rar_scores", mutates_args=())
def triton_rar_scores(E: Tensor, qlens: Tensor, h0: Optional[Tensor], wq: Tensor, bq: Tensor, wk: Tensor,
                      bk: Tensor, wv: Tensor, bv: Tensor, score_w: Tensor, score_b: Tensor) -> Tensor:
    """RAR and the scoring layer in one, at inference (KernelSet.rar_scores): T = wq.shape[0] RAR
    steps as ``triton_rar`` (no dropout), then each pair's score sigmoid(score_w . h + score_b)
    taken in the last step's launch (h rounded to E's dtype, as triton_rar returns it; then
    float32): (B, P) float32. score_w (s,), score_b (1,): float32, contiguous. No autograd (the
    pipeline calls it only when nothing needs a gradient)."""
    return rar_fwd(E, qlens, h0, wq, bq, wk, bk, wv, bv, score=(score_w, score_b))


@triton_rar_scores.register_fake
def _rar_scores_fake(E, qlens, h0, wq, bq, wk, bk, wv, bv, score_w, score_b):
    return E.new_empty(E.shape[0], E.shape[1], dtype=torch.float32)


triton_rar.register_fake(contract.rar_fake)
triton_rar_bwd.register_fake(contract.rar_bwd_fake)
contract.register_rar_autograd(triton_rar, triton_rar_bwd)
