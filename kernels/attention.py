"""Fused region-word attention with adaptive factors, optionally fused with the alignment
projection. On the pair grid one Triton program takes GP pairs of one context item, their query
rows packed back to back into M rows (forward_config: up to 128 rows in bf16/fp16, e.g. t2i 11
captions of 11 words or 5 of 24 against one image, i2t 3 images of 36 regions; 64 in fp32), so
the context, its Gram matrix and the projection weight are read once per GP pairs and every
product is M rows tall with no padding between pairs; in the paired form (a pair list) one
program takes one pair.

Layout (block layout, ARCHITECTURE.md): B indexes the context side, P the query side.
  t2i: B = images (context = R regions), P = captions (query = words).
  i2t: B = captions (context = words), P = images (query = R regions).
First, once per context item (_gram_kernel): G = C C^T (BC x BC, fp32).
Per program, with Q (M rows x d: GP pairs' queries, Lq rows each, row r of pair r // Lq) and C
(Lc x d) read in place, never repeated:

  pass 1 over d:  S = (F * Q) C^T        (M x BC)
  on chip:        S = LeakyReLU_0.1(S); Sn = S / (||S[:, c]||_valid q of its pair + 1e-8)
                  (each pair's column norms by segmented scans down the rows: the sums of
                  S * S, then each pair's total handed to its rows)
                  P = softmax over valid c of lam[q] Sn[q, c]
                  ||U[q]||^2 = P[q] G P[q]^T  (the norm of U = P C known before U exists)
  pass 2 over d:  A = (P C) / (||U|| + 1e-8), chunk by chunk;
                  MODE_ATTENDED stores A (B, P, Lq, d);
                  MODE_ALIGNMENT accumulates Y = (Q - A)^2 W^T + b and stores E = l2n(Y) (B, P, Lq, s),
                  so the d-wide attended context never reaches memory. bf16/fp16 hold Y s wide
                  (one pass over d); fp32 builds it BSB columns per pass over d, parks Y in the
                  output and scales it by 1 / (||Y|| + 1e-8) afterwards.

Padding is masked by selection: masked loads (other=0) never read a padded word, softmax
columns past the context length are -inf, rows past the query length are stored as zeros.

fp32 inputs take exact products (input_precision "ieee": FMA, no tensor cores), split along K
into products of K = 16 (_dot_ieee): the FMA lowering holds a thread's rows of A and columns of
B for the whole K, which spilled for K = 64 and above. Every configuration the launchers pick
compiles without spills on sm_80 and sm_90 (python -m bench.resources, tests/test_compile.py),
for up to MAX_ROWS = 64 query and context rows per pair and s <= MAX_WIDTH = 256; past those the
launchers raise a ValueError.
"""

import contextlib
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from rcar_fast.backends import contract
from rcar_fast.constants import EPS as _EPS

from . import _alloc
Tensor = torch.Tensor

#: rcar_fast.constants.EPS as a compile-time constant (a plain global is rejected by the compiler)
EPS = tl.constexpr(_EPS)
#: the kernel's MODE: store the attended context l2n(A) (B, P, Lq, d), or the alignment vectors
#: E = l2n(W (Q - A)^2 + b) (B, P, Lq, s) with the projection fused
MODE_ATTENDED = tl.constexpr(0)
MODE_ALIGNMENT = tl.constexpr(1)


@triton.jit
def _dot_ieee(a, b):
    """a @ b with exact fp32 products, split along K into products of K = 16 (even and odd
    columns, recursively): the FMA lowering holds a thread's rows of a and columns of b for the
    whole K, which spills for K = 64 and above (bench/results/resources.md)."""
    if a.shape[1] > 16:
        a0, a1 = tl.split(tl.reshape(a, (a.shape[0], a.shape[1] // 2, 2)))
        b0, b1 = tl.split(tl.reshape(tl.trans(b), (b.shape[1], b.shape[0] // 2, 2)))
        return _dot_ieee(a0, tl.trans(b0)) + _dot_ieee(a1, tl.trans(b1))
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32 accumulation; IEEE: exact fp32 products (no tf32) for fp32 inputs."""
    if IEEE:
        return _dot_ieee(a, b)
    return tl.dot(a, b)


@triton.jit
def _segment_sum(v1, s1, v2, s2):
    """The segmented sum's combine (segments s non-decreasing along the scan): a run restarts
    where the segment changes."""
    return tl.where(s1 == s2, v1 + v2, v2), s2


@triton.jit
def _segment_max(v1, s1, v2, s2):
    """The segmented maximum's combine: scanned in reverse over the segmented sums (non-decreasing
    inside a segment), each row gets its segment's total. A NaN anywhere in a segment reaches
    every row of it, as torch's sum over the pair's rows does (the sum where either is NaN:
    propagate_nan=ALL instead spilled 32 B in the attention forward under triton 3.6, sm_90)."""
    return tl.where(s1 == s2, tl.where((v1 != v1) | (v2 != v2), v1 + v2, tl.maximum(v1, v2)), v2), s2


@triton.jit
def _pair(qlen_ptr, clen_ptr, cidx_ptr, sx_b, sx_p, P, BQ: tl.constexpr, BC: tl.constexpr):
    """This program's pair: b, p (int64) its place in the output (B, P, ...), bc its context
    item, read through the index (cidx_ptr + b * sx_b + p * sx_p: the launcher's arange(B) with
    strides (1, 0) on the grid, the pair list's context_index with (0, 1) in the paired form);
    its query and context row ranges and their masks."""
    pid = tl.program_id(0)
    b = (pid // P).to(tl.int64)
    p = (pid % P).to(tl.int64)
    bc = tl.load(cidx_ptr + b * sx_b + p * sx_p).to(tl.int64)
    rq = tl.arange(0, BQ)
    rc = tl.arange(0, BC)
    return b, bc, p, rq, rc, rq < tl.load(qlen_ptr + p), rc < tl.load(clen_ptr + bc)


@triton.jit
def _segments(qlen_ptr, clen_ptr, cidx_ptr, sx_b, sx_p, NG, P, LQ, GP, M: tl.constexpr, BC: tl.constexpr):
    """This program's GP pairs (b, p0 .. p0 + GP - 1) of one context item bc (NG programs per b),
    their query rows packed: row r of the M is row qr = r % LQ of pair g = r // LQ (pr = p0 + g;
    b, bc, p0, pr int64, r, qr and g int32). Returns b, bc, p0, r, pr, qr, g, rc, the row mask
    (qr < the pair's query length), the live rows (g < GP and pr < P: the rows with a place in
    the output) and the context's mask. GP = 1 is one pair (either form); GP > 1 only on the
    grid, where every pair of b has the same context item."""
    pid = tl.program_id(0)
    b = (pid // NG).to(tl.int64)
    p0 = (pid % NG).to(tl.int64) * GP
    bc = tl.load(cidx_ptr + b * sx_b + p0 * sx_p).to(tl.int64)
    r = tl.arange(0, M)
    g = r // LQ
    qr = r - g * LQ
    pr = p0 + g
    live = r < tl.minimum(GP, P - p0) * LQ    # g < GP and pr < P
    qlen = tl.load(qlen_ptr + pr, mask=live, other=0)
    rc = tl.arange(0, BC)
    return b, bc, p0, r, pr, qr, g, rc, qr < qlen, live, rc < tl.load(clen_ptr + bc)


@triton.jit
def _group(qlen_ptr, clen_ptr, cidx_ptr, sx_b, sx_p, NG, P, GP: tl.constexpr, BQ: tl.constexpr,
           BC: tl.constexpr):
    """_segments with BQ rows per pair (a power of two, so rows of pair g are a (GP, BQ) block of
    the GP * BQ): b, bc, pr, qr, rc, the row mask, the context's mask (the backward's layout)."""
    b, bc, p0, r, pr, qr, g, rc, qmask, live, cmask = _segments(qlen_ptr, clen_ptr, cidx_ptr, sx_b, sx_p, NG, P, BQ,
                                                                GP, GP * BQ, BC)
    return b, bc, pr, qr, rc, qmask, cmask


@triton.jit
def _gram_kernel(c_ptr, clen_ptr, gram_ptr, D, sc_b, sc_l, sc_d,
                 IEEE: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    """G = C C^T (BC x BC, fp32) of one context item, rows and columns past its length zero:
    the norm of the attended context |P C|^2 = P G P^T needs it, once per item, not per pair."""
    b = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, BD)
    cmask = rc < tl.load(clen_ptr + b)
    G = tl.zeros((BC, BC), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dm = (d0 + rd) < D
        Cc = tl.load(c_ptr + b * sc_b + rc[:, None] * sc_l + (d0 + rd)[None, :] * sc_d,
                     mask=cmask[:, None] & dm[None, :], other=0.0)
        G += _dot(Cc, tl.trans(Cc), IEEE)
    tl.store(gram_ptr + b * BC * BC + rc[:, None] * BC + rc[None, :], G)


@triton.jit
def _temperatures(lam_ptr, lam_scalar, b, p, rq, qmask, sl_b, sl_p, sl_l, HAS_LAM: tl.constexpr):
    """lam per query row (fp32): the pair's (B, P, Lq) tensor, or the scalar broadcast."""
    if HAS_LAM:
        lam = tl.load(lam_ptr + b * sl_b + p * sl_p + rq * sl_l, mask=qmask, other=0.0).to(tl.float32)
    else:
        lam = tl.zeros(rq.shape, dtype=tl.float32) + lam_scalar
    return lam


@triton.jit
def _scores(q_base, c_base, f_base, sq_d, sc_d, sf_d, qmask, cmask, D,
            HAS_F: tl.constexpr, IEEE: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    """Pass over d: S0 = (F * Q) C^T (BQ x BC), fp32."""
    rd = tl.arange(0, BD)
    S0 = tl.zeros((BQ, BC), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dm = (d0 + rd) < D
        Qc = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qmask[:, None] & dm[None, :], other=0.0)
        Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
        if HAS_F:
            Fc = tl.load(f_base + (d0 + rd)[None, :] * sf_d, mask=qmask[:, None] & dm[None, :], other=0.0)
            Qc = (Qc * Fc).to(Cc.dtype)
        S0 += _dot(Qc, tl.trans(Cc), IEEE)
    return S0


@triton.jit
def _gram_tile(gram_ptr, bc, rc, cmask, BC: tl.constexpr):
    """Context item bc's Gram matrix (BC x BC, fp32) as _gram_kernel stored it; only its valid
    rows and columns (cmask) are read, the rest is zero as stored (R = 36 regions in BC = 64:
    about a third of the tile's bytes)."""
    return tl.load(gram_ptr + bc * BC * BC + rc[:, None] * BC + rc[None, :], mask=cmask[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def _attention_probs(S0, G, lam, qmask, cmask, IEEE: tl.constexpr, WITH_UN: tl.constexpr = True,
                     GP: tl.constexpr = 1, seg=None, PACKED: tl.constexpr = False):
    """On chip: S = LeakyReLU(S0) on valid queries, its column norms N, Sn = S / (N + eps),
    P = softmax over valid context of lam[q] Sn, and |U| = sqrt(P G P^T) per query (WITH_UN
    False: not computed, G unused, |U| comes back as zeros). PACKED: the rows are packed pairs,
    row r of pair seg[r] (non-decreasing in r), and N is each pair's own (M x BC): a segmented sum
    of S * S down the rows, then a reverse segmented maximum of it that hands each row its pair's
    total (fp32 adds; one-hot tf32x3 products in their place spilled up to 900 B on sm_80). Else
    GP > 1: the rows are GP pairs of
    S0.shape[0] // GP rows each (one context item), N each pair's own (M x BC); GP = 1: N is
    (BC,)."""
    S = tl.where(S0 > 0, S0, 0.1 * S0)
    S = tl.where(qmask[:, None], S, 0.0)
    if PACKED:
        sg = tl.broadcast_to(seg[:, None], S.shape)
        run, _ = tl.associative_scan((S * S, sg), 0, _segment_sum)
        N = tl.sqrt(tl.associative_scan((run, sg), 0, _segment_max, reverse=True)[0])
        Sn = S / (N + EPS)
    elif GP == 1:
        N = tl.sqrt(tl.sum(S * S, axis=0))
        Sn = S / (N + EPS)[None, :]
    else:   # the norm across each pair's query rows: (GP, BQ, BC) summed over BQ, broadcast back
        BQ: tl.constexpr = S.shape[0] // GP
        BC: tl.constexpr = S.shape[1]
        n = tl.sqrt(tl.sum(tl.reshape(S * S, (GP, BQ, BC)), axis=1))
        N = tl.reshape(tl.broadcast_to(n[:, None, :], (GP, BQ, BC)), (GP * BQ, BC))
        Sn = S / (N + EPS)
    logits = tl.where(cmask[None, :], Sn * lam[:, None], float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    Pm = e / tl.sum(e, axis=1)[:, None]
    if WITH_UN:
        # P and G are fp32 (G always; P for every dtype but fp64): exact products (tl.dot's fp32 default is tf32)
        un = tl.sqrt(tl.maximum(tl.sum(_dot_ieee(Pm, G.to(Pm.dtype)) * Pm, axis=1), 0.0))
    else:
        un = tl.zeros_like(lam)
    return S, N, Sn, Pm, un


@triton.jit
def _projection_chunk(c_base, q_base, w_ptr, bias_ptr, sc_d, sq_d, sw_s, sw_d, D, S_DIM, s0,
                      Pm, inv_un, qmask, cmask, IEEE: tl.constexpr, BQ: tl.constexpr,
                      BD: tl.constexpr, BSB: tl.constexpr):
    """Columns s0 .. s0 + BSB of Y = (Q - A)^2 W^T + b, A = P C / (|P C| + eps): one pass over
    d, A rebuilt chunk by chunk. Columns past S_DIM are zero."""
    rd = tl.arange(0, BD)
    rsc = s0 + tl.arange(0, BSB)
    scm = rsc < S_DIM
    Yc = tl.zeros((BQ, BSB), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dm = (d0 + rd) < D
        Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
        Qc = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qmask[:, None] & dm[None, :], other=0.0)
        Dq = Qc.to(tl.float32) - _dot(Pm.to(Cc.dtype), Cc, IEEE) * inv_un[:, None]
        Wc = tl.load(w_ptr + rsc[:, None] * sw_s + (d0 + rd)[None, :] * sw_d,
                     mask=scm[:, None] & dm[None, :], other=0.0)
        Yc += _dot((Dq * Dq).to(Wc.dtype), tl.trans(Wc), IEEE)
    bias = tl.load(bias_ptr + rsc, mask=scm, other=0.0).to(tl.float32)
    return tl.where(scm[None, :], Yc + bias[None, :], 0.0)


@triton.jit
def _attention_fwd_kernel(
    q_ptr, qlen_ptr, c_ptr, clen_ptr, cidx_ptr, gram_ptr, f_ptr, lam_ptr, w_ptr, bias_ptr, out_ptr,
    P, NG, LQ, GP, D, S_DIM, lam_scalar,
    sq_p, sq_l, sq_d,
    sc_b, sc_l, sc_d,
    sx_b, sx_p,
    sf_b, sf_p, sf_l, sf_d,
    sl_b, sl_p, sl_l,
    sw_s, sw_d,
    so_b, so_p, so_l, so_x,
    HAS_F: tl.constexpr, HAS_LAM: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr,
    M: tl.constexpr, PACKED: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    BSB: tl.constexpr,
):
    """GP pairs (one context item) per program, their GP * LQ query rows packed into the M rows of
    every product (LQ rows per pair, no padding between pairs; PACKED: the pairs' column norms by
    segmented scans; else one pair, GP = 1); gram_ptr: the context items' Gram
    matrices (items, BC, BC) fp32 (_gram_kernel). The query, factors, lam and output rows of a
    program's pairs are evenly spaced (the launcher's _flat_rows: stride of a pair = LQ x stride of a
    row), so row r is at its first pair's address + r rows (an int32 offset from a scalar base)."""
    b, bc, p0, r, p, rq, seg, rc, qmask, live, cmask = _segments(qlen_ptr, clen_ptr, cidx_ptr, sx_b, sx_p, NG, P, LQ,
                                                                 GP, M, BC)
    rd = tl.arange(0, BD)
    q_base = q_ptr + p0 * sq_p + r[:, None] * sq_l
    c_base = c_ptr + bc * sc_b + rc[:, None] * sc_l
    f_base = f_ptr + b * sf_b + p0 * sf_p + r[:, None] * sf_l

    # pass 1 and on chip: scores, softmax, the norm of U = P C through the item's Gram matrix
    S0 = _scores(q_base, c_base, f_base, sq_d, sc_d, sf_d, qmask, cmask, D, HAS_F, IEEE, M, BC, BD)
    G = _gram_tile(gram_ptr, bc, rc, cmask, BC)
    lam = _temperatures(lam_ptr, lam_scalar, b, p0, r, qmask, sl_b, sl_p, sl_l, HAS_LAM)
    S, N, Sn, Pm, un = _attention_probs(S0, G, lam, qmask, cmask, IEEE, True, 1, seg, PACKED)
    inv_un = 1.0 / (un + EPS)
    # P is pass 2's product operand only: held in the inputs' dtype (in bf16/fp16 half the
    # registers of an fp32 copy through the 128-row projection)
    Pm = Pm.to(c_ptr.dtype.element_ty)

    # pass 2: the attended context, normalised chunk by chunk
    # the live rows, recomputed from scalars: held through pass 2 (with 64-bit row addresses) the
    # 128-row projection spilled 4 B on sm_80
    rows_out = r < tl.minimum(GP, P - p0) * LQ
    out_base = out_ptr + b * so_b + p0 * so_p + r[:, None] * so_l
    if MODE == MODE_ATTENDED:
        for d0 in range(0, D, BD):
            dm = (d0 + rd) < D
            Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
            A = tl.where(qmask[:, None], _dot(Pm.to(Cc.dtype), Cc, IEEE) * inv_un[:, None], 0.0)
            tl.store(out_base + (d0 + rd)[None, :] * so_x, A.to(out_ptr.dtype.element_ty),
                     mask=rows_out[:, None] & dm[None, :])
    elif BSB == BS:   # the projection in one pass over d, Y held s wide
        rs = tl.arange(0, BS)
        Y = _projection_chunk(c_base, q_base, w_ptr, bias_ptr, sc_d, sq_d, sw_s, sw_d, D, S_DIM, 0,
                              Pm, inv_un, qmask, cmask, IEEE, M, BD, BS)
        E = tl.where(qmask[:, None], Y / (tl.sqrt(tl.sum(Y * Y, axis=1)) + EPS)[:, None], 0.0)
        tl.store(out_base + rs[None, :] * so_x, E.to(out_ptr.dtype.element_ty),
                 mask=rows_out[:, None] & (rs < S_DIM)[None, :])
    else:   # BSB columns per pass over d; unnormalised Y parked in the (fp32) output, then scaled
        tl.static_assert(out_ptr.dtype.element_ty.primitive_bitwidth >= 32,
                         "the chunked projection parks unnormalised Y in the output: fp32/fp64 only")
        r2 = tl.zeros((M,), dtype=tl.float32)
        for s0 in range(0, S_DIM, BSB):
            rsc = s0 + tl.arange(0, BSB)
            Yc = _projection_chunk(c_base, q_base, w_ptr, bias_ptr, sc_d, sq_d, sw_s, sw_d, D, S_DIM, s0,
                                   Pm, inv_un, qmask, cmask, IEEE, M, BD, BSB)
            r2 += tl.sum(Yc * Yc, axis=1)
            tl.store(out_base + rsc[None, :] * so_x, Yc, mask=rows_out[:, None] & (rsc < S_DIM)[None, :])
        tl.debug_barrier()   # the stores' layout is not the loads': other threads read them
        inv_r = 1.0 / (tl.sqrt(r2) + EPS)
        for s0 in range(0, S_DIM, BSB):
            rsc = s0 + tl.arange(0, BSB)
            m = rows_out[:, None] & (rsc < S_DIM)[None, :]
            Yc = tl.load(out_base + rsc[None, :] * so_x, mask=m, other=0.0)
            tl.debug_barrier()   # every thread has read this chunk of Y before any overwrites it
            tl.store(out_base + rsc[None, :] * so_x, tl.where(qmask[:, None], Yc * inv_r[:, None], 0.0), mask=m)


#: every launch passes maxnreg: without it ptxas sometimes held a kernel to 128 registers a
#: thread (or fewer) and spilled, where 8 warps may have 255 (65536 per SM / 256 threads);
#: with it, ptxas still allocates only what the kernel needs (python -m bench.resources)
MAX_REGISTERS = 255


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


#: query rows one program holds on the grid. The forward (forward_config) packs GP pairs of one
#: context item into at most FWD_ROWS_HALF = 128 rows in bf16/fp16 (t2i: 11 captions of 11 words,
#: 5 of 24; i2t: 3 images of 36 regions), which compiles without spills in the variant the JIT
#: compiles at run time, and ROWS = 64 in fp32; the backward (attention_config) takes GP = ROWS //
#: BQ pairs of BQ rows each (BQ the power of two at or above the pair's rows)
ROWS = 64
FWD_ROWS_HALF = 128


def _tile_options(half: bool, rows: int, BC: int, D: int, width: int, mode: int) -> dict:
    """Block sizes and launch options of an attention program of rows x BC scores.

    Chosen from ptxas -v reports (python -m bench.resources; no GPU run yet): with 8 warps,
    block_d 32 compiles without spills for bf16/fp16 on sm_80 and sm_90 except the fused
    projection at 2048 rows x BC and more (64 x 64 spilled 40 B on sm_80; the packed forward,
    128 x 16 with its segmented scans, 52 B), which gets 16; fp32
    gets 16. fp32's projection goes BSB = 32 columns per pass over d (s wide it spilled 152-656 B;
    16 at 64 x 64 rows, where 32 spilled 4 B once G came from the Gram kernel) and is not
    software-pipelined (num_stages 1: the pipelined loads spilled); bf16/fp16 keep 3
    stages."""
    projection = mode == MODE_ALIGNMENT.value
    bd = 32 if half and not (projection and rows * BC >= 2048) else 16
    BS = _pow2(width if projection else 16)
    bsb = BS if half else min(16 if rows * BC >= 4096 else 32, BS)
    return dict(BC=BC, BD=min(bd, _pow2(D)), BS=BS, BSB=bsb, num_warps=8,
                num_stages=3 if half else 1, maxnreg=MAX_REGISTERS)


def forward_config(half: bool, Lq: int, Lc: int, D: int, width: int, mode: int, grouped: bool = False) -> dict:
    """The forward's pairs per program, tile and launch options (the compile report checks these);
    half: any dtype but fp32 (fp32 takes the exact-product path); grouped: on the grid, GP pairs of
    Lq rows each packed without padding into M rows (GP = FWD_ROWS_HALF // Lq for half, ROWS // Lq
    for fp32; M the power of two at or above GP * Lq), else one pair (the paired form). PACKED:
    GP > 1, the pairs' column norms by segmented scans (one pair: a plain sum). GP is a run-time
    argument, the rest compile-time."""
    rows = FWD_ROWS_HALF if half else ROWS
    GP = max(1, rows // max(1, Lq)) if grouped else 1
    M = _pow2(GP * Lq)
    return dict(GP=GP, M=M, PACKED=GP > 1, **_tile_options(half, M, _pow2(Lc), D, width, mode))


def attention_config(half: bool, Lq: int, Lc: int, D: int, width: int, mode: int, grouped: bool = False,
                     rows: int = ROWS) -> dict:
    """The backward's layout (attention_bwd_config starts from it): BQ = Lq's power of two rows per
    pair, GP = rows // BQ pairs per program on the grid (grouped), else one; block sizes and
    launch options as the forward's for a tile of GP * BQ rows (_tile_options)."""
    BQ = _pow2(Lq)
    GP = max(1, rows // BQ) if grouped else 1
    return dict(GP=GP, BQ=BQ, **_tile_options(half, GP * BQ, _pow2(Lc), D, width, mode))


#: the most query or context rows per pair the kernels take (captions of up to 64 words): the
#: compile tier checks block sizes up to this; 128-row blocks spilled (bench/results)
MAX_ROWS = 64


def check_rows(name: str, rows: int, what: str) -> None:
    """A clear error, before any launch, for more rows per pair than the kernels take."""
    if rows > MAX_ROWS:
        raise ValueError(f"{name}: the Triton kernels take at most {MAX_ROWS} {what} per pair, got {rows} "
                         "(captions of over 64 words: use backend='cuda' or 'torch')")


#: the widest alignment vector (s) the kernels take: the release's s = 256 is what the compile tier
#: checks; a wider s makes wider tiles (E held on chip in RAR, Y in the projection)
MAX_WIDTH = 256


def check_width(name: str, width: int) -> None:
    if width > MAX_WIDTH:
        raise ValueError(f"{name}: the Triton kernels take alignment vectors of at most {MAX_WIDTH} "
                         f"(s), got {width}; use backend='cuda' or 'torch'")


def launch_options(cfg: dict) -> dict:
    """Pops the launch options (num_warps, num_stages, maxnreg) out of a launcher's config dict."""
    return {k: cfg.pop(k) for k in ("num_warps", "num_stages", "maxnreg")}


_CALL = threading.local()


@contextlib.contextmanager
def call_workspace():
    """The triton kernel set's workspace (KernelSet.workspace), held open by the pipeline around
    the blocks of one call: the grid's context index arange(B) is made once in it, on first use,
    and sliced for every launch after (on its device and the stream current then), instead of
    one arange launch per attention launch. Outside it (the backward, a direct call) each launch
    makes its own."""
    previous = getattr(_CALL, "index", None)
    _CALL.index = {}
    try:
        yield
    finally:
        _CALL.index = previous


def _grid_index(n: int, device: torch.device) -> Tensor:
    """arange(n) int32 on device: from the open call_workspace (grown where n is larger than
    what it holds), else made now."""
    held = getattr(_CALL, "index", None)
    if held is None:
        return torch.arange(n, dtype=torch.int32, device=device)
    idx = held.get(device)
    if idx is None or idx.numel() < n:
        idx = held[device] = torch.arange(max(n, 0 if idx is None else 2 * idx.numel()), dtype=torch.int32,
                                          device=device)
    return idx[:n]


def context_rows(context: Tensor, context_index: Optional[Tensor]):
    """(B, index, its strides (b, p)) of a launch: on the grid B = the context items and the
    index arange(B) read along b (_grid_index); paired, B = 1 and the pair list's context_index
    read along p."""
    if context_index is None:
        B = context.shape[0]
        return B, _grid_index(max(B, 1), context.device), (1, 0)
    return 1, context_index, (0, 1)


def gram(context: Tensor, clens: Tensor, BC: int) -> Tensor:
    """G = C C^T of every context item, (items, BC, BC) fp32, rows and columns at or past its
    length zero (one _gram_kernel program per item)."""
    items, _, D = context.shape
    g = _alloc.empty((items, BC, BC), dtype=torch.float32, device=context.device)
    if items:
        half = context.dtype != torch.float32
        _gram_kernel[(items,)](context, clens, g, D, *context.stride(), IEEE=not half, **gram_config(half, BC, D))
    return g


def context_gram(context: Tensor, clens: Tensor) -> Tensor:
    """The Gram matrices the attention's ``gram`` argument takes: :func:`gram` at the BC its
    launches use (the power of two at or above Lc, at least 16). The pipeline makes them once per
    call (the t2i grid: every image) or once per block, not once per launch."""
    return gram(context, clens, _pow2(context.shape[1]))


def check_gram(g: Tensor, context: Tensor, BC: int) -> None:
    """A clear error, before any launch, for a ``gram`` that is not (items, BC, BC) float32,
    contiguous, on the context's device."""
    want = (context.shape[0], BC, BC)
    if (tuple(g.shape) != want or g.dtype != torch.float32 or g.device != context.device
            or not g.is_contiguous()):
        raise ValueError(f"gram: expected context_gram(context, clens), a contiguous float32 tensor of shape "
                         f"{want} on {context.device}, got {g.dtype} {tuple(g.shape)} on {g.device}"
                         f"{'' if g.is_contiguous() else ', not contiguous'}")


def gram_config(half: bool, BC: int, D: int) -> dict:
    """_gram_kernel's block sizes and launch options (the compile report checks these)."""
    return dict(BC=BC, BD=min(32 if half else 16, _pow2(D)), num_warps=4, num_stages=3 if half else 1,
                maxnreg=MAX_REGISTERS)


def _flat_rows(t: Tensor, dim: int) -> Tensor:
    """t with the rows of its dims (dim, dim + 1) evenly spaced (t.stride(dim) = t.shape[dim + 1] *
    t.stride(dim + 1)), as the forward addresses a program's packed rows from its first pair's:
    t itself where they are (every contiguous tensor), else a contiguous copy."""
    if t.shape[dim] <= 1 or t.stride(dim) == t.shape[dim + 1] * t.stride(dim + 1):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def attention_fwd(query, qlens, context, clens, factors=None, lam=10.0, weight=None, bias=None,
                  block_d=None, context_index=None, grams=None):
    """Launch the fused attention over every (b, p) pair.

    query (P, Lq, d), qlens (P,) int32 valid query rows; context (B, Lc, d), clens (B,) int32;
    factors None or (B, P, Lq, d) (any strides); lam a float or (B, P, Lq);
    weight (s, d) and bias (s,) given: returns E (B, P, Lq, s), else A (B, P, Lq, d).
    context_index (P,) int32: paired, pair p is query p with context item context_index[p] and
    the output (factors, lam) have B = 1; one program per pair reads its context through it.
    On the grid one program takes GP pairs of one context item (attention_config). The context
    items' Gram matrices are computed first, once per item (gram), unless given: grams is
    context_gram(context, clens), made once and passed to every launch on the same context
    (checked for shape, dtype, device and layout before any launch; its values are trusted).
    Rows at or past a pair's query length are zero. Accumulation is fp32; fp32 inputs use
    IEEE fp32 products (no tf32), bf16/fp16 inputs the tensor cores.
    """
    P, Lq, D = query.shape
    Lc = context.shape[1]
    mode = (MODE_ATTENDED if weight is None else MODE_ALIGNMENT).value
    width = D if mode == MODE_ATTENDED.value else weight.shape[0]
    check_rows("query", Lq, "query rows")
    check_rows("context", Lc, "context rows")
    if mode == MODE_ALIGNMENT.value:
        check_width("weight", width)
    if grams is not None:
        check_gram(grams, context, _pow2(Lc))
    B, cidx, sx = context_rows(context, context_index)
    out = _alloc.empty((B, P, Lq, width), dtype=query.dtype, device=query.device)
    if B * P == 0:
        return out
    has_f = factors is not None
    has_lam = isinstance(lam, torch.Tensor)
    query = _flat_rows(query, 0)
    factors = _flat_rows(factors, 1) if has_f else None
    lam = _flat_rows(lam, 1) if has_lam else lam
    f = factors if has_f else query
    lt = lam if has_lam else query
    w = weight if mode == MODE_ALIGNMENT.value else query
    bb = bias if mode == MODE_ALIGNMENT.value else query
    sf = factors.stride() if has_f else (0, 0, 0, 0)
    sl = lam.stride() if has_lam else (0, 0, 0)
    sw = weight.stride() if mode == MODE_ALIGNMENT.value else (0, 0)
    half = query.dtype != torch.float32
    cfg = forward_config(half, Lq, Lc, D, width, mode, grouped=context_index is None)
    if block_d is not None:
        cfg["BD"] = min(block_d, _pow2(D))
    g = gram(context, clens, cfg["BC"]) if grams is None else grams
    GP = cfg.pop("GP")
    NG = triton.cdiv(P, GP)
    _attention_fwd_kernel[(B * NG,)](
        query, qlens, context, clens, cidx, g, f, lt, w, bb, out,
        P, NG, Lq, GP, D, width, float(lam) if not has_lam else 0.0,
        *query.stride(), *context.stride(), *sx, *sf, *sl, *sw, *out.stride(),
        HAS_F=has_f, HAS_LAM=has_lam, MODE=mode, IEEE=not half, **cfg)
    return out


# ----------------------------------------------------------------------------- the custom op

@torch.library.custom_op("rcar_fast::triton_attention", mutates_args=())
def triton_attention(query: Tensor, qlens: Tensor, context: Tensor, clens: Tensor,
                     factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
                     weight: Optional[Tensor], bias: Optional[Tensor],
                     context_index: Optional[Tensor] = None, gram: Optional[Tensor] = None) -> Tensor:
    """The attention op of the backend contract (rcar_fast.backends.contract; csrc/README.md's
    ``attention``): query (P, Lq, d), qlens (P,) int32, context (B, Lc, d), clens (B,) int32,
    factors None or (B, P, Lq, d), lam None (lam_scalar everywhere) or (B, P, Lq); weight (s, d)
    and bias (s,) given: E (B, P, Lq, s), else l2n(A) (B, P, Lq, d); context_index (P,) int32:
    the paired form (B = 1, pair p against context item context_index[p]); gram: None or
    context_gram(context, clens), the context items' Gram matrices made once for several calls
    (the backward recomputes them). Rows past a query length are zero. Its fake is registered
    here, its autograd in attention_bwd.py (with the backward)."""
    return attention_fwd(query, qlens, context, clens, factors, lam_scalar if lam is None else lam, weight, bias,
                         context_index=context_index, grams=gram)


triton_attention.register_fake(contract.attention_fake)
