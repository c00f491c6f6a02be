"""RCR's step for inference (the backend contract's optional ``rcr``) as two Triton GEMM kernels
with their element-wise work in the epilogue, on the tensor cores for bf16/fp16:

  _rcr_hidden_kernel         H   = tanh(E W1^T + b1)                         (N x 2s, stored)
                             lam = relu(ws2 tanh(E ws1^T + bs1) + bs2 + lam_old)   (N; the same
                                   program runs on down ws1's rows after W1's: the s/2-wide
                                   hidden layer of the temperatures' MLP never leaves the chip)
  _rcr_factors_gemm_kernel   F   = clamp(tanh(H W2^T + b2) + F_old, -1, 1)   (N x d; M = H W2^T + b2
                                   never reaches memory)
  _rcr_factors_bwd_kernel    gm  = dL/dF [|z| <= 1] (1 - t^2), t = tanh(H W2^T + b2), z = t + F_old
                                   (N x d; training: the d-wide part of RCR's backward, see below)

N = B * P * Lq rows (row r is position r % Lq of query item (r // Lq) % P); F_old all ones at
the first step (None), lam_old the scalar or (B, P, Lq). Rows at or past a pair's query length
are zero in F and lam (the contract of csrc/README.md's ``rcr``), whatever the inputs hold there
(NaN included: E, H and F_old are read there by masked loads, never used). A factors program
takes a BM x BN tile and accumulates in fp32 over K in BK chunks; a hidden program takes BM rows
of E and every column, BN at a time (bf16/fp16: its E tile loaded once, full-K products). fp32
inputs take exact products (input_precision "ieee", split along K as kernels/attention.py's
_dot_ieee, K in BK chunks), half inputs the tensor cores. H is stored in E's dtype (as torch's step rounds it); M stays fp32 on chip.
The step is for inference only: under autograd the pipeline runs
rcar_fast.torch_math.rcr_step_recomputed (saves only its inputs, recomputes in backward), whose
backward takes _rcr_factors_bwd_kernel for its d-wide element-wise chain (rcr_factors_bwd; the
kernel set's ``rcr_factors_bwd``): one pass that reads H, F_old and dL/dF and writes gm (and dF).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from rcar_fast.backends import contract

from . import _alloc
from .attention import MAX_REGISTERS, _dot, _pow2, launch_options
from .rar import _tanh

Tensor = torch.Tensor


@triton.jit
def _valid_rows(qlen_ptr, r, N_ROWS, P, LQ):
    """Row r (int32: the launcher keeps N_ROWS below 2^31) is valid when it is one of the N_ROWS
    rows and its position r % LQ is below its query item's length (item (r // LQ) % P). int32:
    an int64 division is a called subroutine, and the call spilled the GEMM's live registers."""
    qlen = tl.load(qlen_ptr + (r // LQ) % P, mask=r < N_ROWS, other=0)
    return (r % LQ) < qlen


@triton.jit
def _mm_tile(a_base, rl, rmask, b_base, c, cmask, K: tl.constexpr,
             IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """A[rl, :K] B[c, :K]^T (BM x BN, fp32): A from a_base (this program's first row; rows rl
    where rmask), B from b_base (rows c where cmask), both row-major with rows K long; masked rows
    read as zero. K is a compile-time constant and the callers promise both bases 16-byte aligned
    (tl.multiple_of at the call: a hint set here, on the argument, did not reach the loads): the
    loads are then 16-byte vectors and pipelined (without, every element was a load with its own
    address, and the tile took 255 registers unpipelined; bench/results/gpu_notes.md). Offsets
    within the tile are int32 (one int64 row base per program)."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if K % BK == 0:     # no mask along K (a mask there kept the loads from being pipelined)
            km = rk < BK
        else:
            km = (k0 + rk) < K
        a = tl.load(a_base + rl[:, None] * K + (k0 + rk)[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        b = tl.load(b_base + c[:, None] * K + (k0 + rk)[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
        if IEEE:
            acc += _dot(a, tl.trans(b), IEEE).to(tl.float32)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _hidden_block(E, e_base, rl, valid, w_base, b_ptr, c, cm, rs, smask, S_DIM: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """tanh(E W[c]^T + b[c]) (BM x BN, fp32) for the rows c of W (S_DIM long) where cm (zero
    products elsewhere): from the kept E tile (bf16/fp16) or K in BK chunks (fp32, _mm_tile)."""
    if IEEE:
        acc = _mm_tile(e_base, rl, valid, w_base, c, cm, S_DIM, IEEE, BM, BN, BK)
    else:
        w = tl.load(w_base + c[:, None] * S_DIM + rs[None, :], mask=cm[:, None] & smask[None, :], other=0.0)
        acc = tl.dot(E, tl.trans(w))
    return _tanh(acc + tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :])


@triton.jit
def _rcr_hidden_kernel(e_ptr, qlen_ptr, w1_ptr, b1_ptr, ws1_ptr, bs1_ptr, ws2_ptr, bs2_ptr, lam_ptr, h_ptr,
                       lam_out_ptr, lam_scalar, N_ROWS, P, LQ,
                       S_DIM: tl.constexpr, H_DIM: tl.constexpr, HS_DIM: tl.constexpr,
                       HAS_LAM: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BS: tl.constexpr, BK: tl.constexpr):
    """Program m: rows m * BM .. of E (N_ROWS x S_DIM) against every row of W1 (H_DIM x S_DIM),
    then of ws1 (HS_DIM x S_DIM), BN rows at a time, each from its own pointer: H = tanh(E W1^T +
    b1), stored (N_ROWS x H_DIM); then the temperatures' hidden layer tanh(E ws1^T + bs1), never
    stored: its dot with ws2 is summed on chip into the new temperatures of the rows. bf16/fp16
    (not IEEE): the program's E tile (BM x BS, BS = S_DIM rounded up to a power of two) is loaded
    once and kept for every column block (full-K products); fp32 (IEEE, exact products): K in BK
    chunks per column block (_mm_tile). Every matrix contiguous."""
    row0 = tl.program_id(0).to(tl.int64) * BM
    rl = tl.arange(0, BM)
    r = tl.program_id(0) * BM + rl
    valid = _valid_rows(qlen_ptr, r, N_ROWS, P, LQ)
    e_base = tl.multiple_of(e_ptr + row0 * S_DIM, 16)     # the launcher checks the alignments
    w1_base = tl.multiple_of(w1_ptr, 16)
    ws1_base = tl.multiple_of(ws1_ptr, 16)
    rs = tl.arange(0, BS)
    if S_DIM == BS:
        smask = rs < BS
    else:
        smask = rs < S_DIM
    E = None
    if not IEEE:
        E = tl.load(e_base + rl[:, None] * S_DIM + rs[None, :], mask=valid[:, None] & smask[None, :], other=0.0)
    for n0 in range(0, H_DIM, BN):
        c = n0 + tl.arange(0, BN)
        cm = c < H_DIM
        t = _hidden_block(E, e_base, rl, valid, w1_base, b1_ptr, c, cm, rs, smask, S_DIM, IEEE, BM, BN, BK)
        tl.store(h_ptr + row0 * H_DIM + rl[:, None] * H_DIM + c[None, :], t.to(h_ptr.dtype.element_ty),
                 mask=(r < N_ROWS)[:, None] & cm[None, :])
    smooth = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, HS_DIM, BN):
        c = n0 + tl.arange(0, BN)
        cm = c < HS_DIM
        t = _hidden_block(E, e_base, rl, valid, ws1_base, bs1_ptr, c, cm, rs, smask, S_DIM, IEEE, BM, BN, BK)
        smooth += tl.sum(t * tl.load(ws2_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :], axis=1)
    smooth += tl.load(bs2_ptr).to(tl.float32)
    if HAS_LAM:
        lam_old = tl.load(lam_ptr + r, mask=valid, other=0.0).to(tl.float32)
    else:
        lam_old = lam_scalar
    # relu that keeps a NaN, as torch's (propagate_nan NONE would turn it into 0)
    lam = tl.where(valid, tl.maximum(smooth + lam_old, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
    tl.store(lam_out_ptr + r, lam.to(lam_out_ptr.dtype.element_ty), mask=r < N_ROWS)


@triton.jit
def _column_halves(x, BM: tl.constexpr, BN: tl.constexpr):
    """x (BM x BN) as its columns [0, BN/2) and [BN/2, BN), each BM x BN/2. No data moves for a
    tensor-core accumulator (every thread of the MMA layouts holds columns of both halves); the
    fp32 FMA tile goes once through shared memory."""
    return tl.split(tl.permute(tl.reshape(x, (BM, 2, BN // 2)), (0, 2, 1)))


@triton.jit
def _factors_store(acc, b2_ptr, f_ptr, out_ptr, row0, rl, valid, r, N_ROWS, n0, D: tl.constexpr,
                   HAS_F: tl.constexpr, BN: tl.constexpr):
    """Columns n0 .. n0 + BN of the factors' tile, stored: clamp(tanh(acc + b2) + F_old, -1, 1)
    (F_old all ones without HAS_F), zero at invalid rows; acc (BM x BN, fp32) the products of
    those columns, rl, valid and r the program's rows as _rcr_factors_gemm_kernel has them."""
    c = n0 + tl.arange(0, BN)
    cm = c < D
    m = acc + tl.load(b2_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    v2 = valid[:, None] & cm[None, :]
    offs = rl[:, None] * D + c[None, :]
    if HAS_F:
        f = tl.load(tl.multiple_of(f_ptr + row0 * D, 16) + offs, mask=v2, other=0.0).to(tl.float32)
    else:
        f = 1.0
    # the clamp keeps a NaN of a valid row, as torch's does (NONE would make it -1 or 1)
    z = tl.maximum(_tanh(m) + f, -1.0, propagate_nan=tl.PropagateNan.ALL)
    out = tl.where(v2, tl.minimum(z, 1.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
    tl.store(tl.multiple_of(out_ptr + row0 * D, 16) + offs, out.to(out_ptr.dtype.element_ty),
             mask=(r < N_ROWS)[:, None] & cm[None, :])


@triton.jit
def _rcr_factors_gemm_kernel(h_ptr, qlen_ptr, w2_ptr, b2_ptr, f_ptr, out_ptr, N_ROWS, P, LQ,
                             D: tl.constexpr, H_DIM: tl.constexpr,
                             HAS_F: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr):
    """Program (m, n): the BM x BN tile of F = clamp(tanh(H W2^T + b2) + F_old, -1, 1) (N_ROWS x D;
    F_old likewise, or all ones without HAS_F), zero at invalid rows. Every matrix contiguous.
    The epilogue takes the tile a quarter of its columns at a time (_factors_store), so that the
    F_old tile and the conversion to the stores' layout never sit beside the whole fp32
    accumulator: whole, bf16/fp16 128 x 256 took 255 registers and spilled 4-16 B with F_old
    under triton 3.6 on sm_80 (rewrites of that whole-tile epilogue spilled 8-112 B under one
    version or architecture or another, halves 16-36 B); quarters take 213-232 registers with
    F_old and 182-221 without, no spill under 3.6 or 3.8 (python -m bench.resources)."""
    row0 = tl.program_id(0).to(tl.int64) * BM
    rl = tl.arange(0, BM)
    r = tl.program_id(0) * BM + rl
    valid = _valid_rows(qlen_ptr, r, N_ROWS, P, LQ)
    c = tl.program_id(1) * BN + tl.arange(0, BN)
    cm = c < D
    acc = _mm_tile(tl.multiple_of(h_ptr + row0 * H_DIM, 16), rl, valid, tl.multiple_of(w2_ptr, 16), c, cm, H_DIM,
                   IEEE, BM, BN, BK)
    lo, hi = _column_halves(acc, BM, BN)
    q0, q1 = _column_halves(lo, BM, BN // 2)
    q2, q3 = _column_halves(hi, BM, BN // 2)
    n0 = tl.program_id(1) * BN
    Q: tl.constexpr = BN // 4
    _factors_store(q0, b2_ptr, f_ptr, out_ptr, row0, rl, valid, r, N_ROWS, n0, D, HAS_F, Q)
    _factors_store(q1, b2_ptr, f_ptr, out_ptr, row0, rl, valid, r, N_ROWS, n0 + Q, D, HAS_F, Q)
    _factors_store(q2, b2_ptr, f_ptr, out_ptr, row0, rl, valid, r, N_ROWS, n0 + 2 * Q, D, HAS_F, Q)
    _factors_store(q3, b2_ptr, f_ptr, out_ptr, row0, rl, valid, r, N_ROWS, n0 + 3 * Q, D, HAS_F, Q)


@triton.jit
def _rcr_factors_bwd_kernel(h_ptr, w2_ptr, b2_ptr, f_ptr, gf_ptr, gm_ptr, df_ptr, N_ROWS,
                            D: tl.constexpr, H_DIM: tl.constexpr, HAS_F: tl.constexpr,
                            WRITE_DF: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr):
    """Program (m, n): the BM x BN tile of the factors' backward (RCR under autograd,
    rcar_fast.torch_math.rcr_step_recomputed): M = H W2^T + b2 again, t = tanh(M), z = t + F_old
    (1 without HAS_F), each rounded to the inputs' dtype as torch's in-place step rounds it, then
    gz = gF where |z| <= 1 (the clamp's gradient) and gm = gz (1 - t^2), stored (N_ROWS x D; and
    gz as dF with WRITE_DF). Every row is computed (the step's rows past a query length too, as
    torch's); every matrix contiguous."""
    row0 = tl.program_id(0).to(tl.int64) * BM
    rl = tl.arange(0, BM)
    rmask = (tl.program_id(0) * BM + rl) < N_ROWS
    c = tl.program_id(1) * BN + tl.arange(0, BN)
    cm = c < D
    acc = _mm_tile(tl.multiple_of(h_ptr + row0 * H_DIM, 16), rl, rmask, tl.multiple_of(w2_ptr, 16), c, cm, H_DIM,
                   IEEE, BM, BN, BK)
    dt = gm_ptr.dtype.element_ty
    m = (acc + tl.load(b2_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
    t = _tanh(m).to(dt).to(tl.float32)
    m2 = rmask[:, None] & cm[None, :]
    offs = rl[:, None] * D + c[None, :]
    if HAS_F:
        f = tl.load(tl.multiple_of(f_ptr + row0 * D, 16) + offs, mask=m2, other=0.0).to(tl.float32)
    else:
        f = 1.0
    z = (t + f).to(dt).to(tl.float32)
    g = tl.load(tl.multiple_of(gf_ptr + row0 * D, 16) + offs, mask=m2, other=0.0).to(tl.float32)
    gz = tl.where(tl.abs(z) <= 1.0, g, 0.0)
    tl.store(tl.multiple_of(gm_ptr + row0 * D, 16) + offs, (gz * (1.0 - t * t)).to(dt), mask=m2)
    if WRITE_DF:
        tl.store(tl.multiple_of(df_ptr + row0 * D, 16) + offs, gz.to(dt), mask=m2)


def rcr_gemm_config(half: bool, s: int, which: str) -> dict:
    """Block sizes and launch options of the three kernels (the compile report checks these):
    which "hidden" (_rcr_hidden_kernel: one program per BM rows, over BN of W1's, then ws1's, rows at a
    time; BS = s rounded up to a power of two, E's tile kept on chip in bf16/fp16) or "factors"
    (_rcr_factors_gemm_kernel: BM x BN tiles) or "factors_bwd" (_rcr_factors_bwd_kernel: the same
    products; half: 128 x 128 tiles, as its epilogue holds four BM x BN fp32 tiles where the
    forward's holds two: on 128 x 256 it spilled 16-684 B). half: hidden 128 rows, BN 64, 3 stages (E read
    once per row block; was 128 x 256 tiles, E read by 2 + 1 programs); factors 128 x 256, BK 32,
    3 stages (fewer re-reads of H and W2 from L2; BK 64 spilled 24 B on sm_80); 8 warps
    (bench/roofline.py's TRITON_RCR_BM, TRITON_RCR_BN, TRITON_RCR_FACTORS_BN; python -m
    bench.resources); fp32 (exact FMA products): 64 x 64, BK 16, one stage."""
    if half and which == "hidden":
        cfg = dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=3)
    elif half and which == "factors_bwd":
        cfg = dict(BM=128, BN=128, BK=32, num_warps=8, num_stages=3)
    elif half:
        cfg = dict(BM=128, BN=256, BK=32, num_warps=8, num_stages=3)
    else:
        cfg = dict(BM=64, BN=64, BK=16, num_warps=8, num_stages=1)
    if which == "hidden":
        cfg["BS"] = _pow2(s)
    return dict(cfg, maxnreg=MAX_REGISTERS)


#: the most rows (B * P * Lq) one step takes: the kernels index rows in int32
MAX_N_ROWS = 2 ** 31 - 1


def _is_aligned(t: Tensor) -> bool:
    """Whether t is contiguous at a 16-byte aligned address (what the kernels promise the compiler)."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def _aligned(t: Tensor) -> Tensor:
    """t contiguous at a 16-byte aligned address (a fresh allocation is aligned, a view at an odd
    offset is copied)."""
    t = t.contiguous()
    return t if _is_aligned(t) else t.clone()


def rcr_step(E: Tensor, qlens: Tensor, factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
             w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ws1: Tensor, bs1: Tensor, ws2: Tensor,
             bs2: Tensor) -> Tuple[Tensor, Tensor]:
    """One RCR step on E (B, P, Lq, s), qlens (P,) int32: returns (F (B, P, Lq, d), lam
    (B, P, Lq)) in E's dtype; factors None (all ones) or (B, P, Lq, d); lam None (lam_scalar
    everywhere) or (B, P, Lq); w1 (2s, s), b1 (2s,), w2 (d, 2s), b2 (d,), ws1 (s/2, s),
    bs1 (s/2,), ws2 (1, s/2), bs2 (1,). Zero at rows past a query length. s, 2s, s/2 and d are
    compile-time constants of the kernels (one compilation per model width)."""
    B, P, Lq, S = E.shape
    D, H = w2.shape
    N = B * P * Lq
    if N > MAX_N_ROWS:
        raise ValueError(f"E: the Triton RCR step takes at most {MAX_N_ROWS} rows (B * P * Lq), got {N}; "
                         "score in smaller blocks")
    F = _alloc.empty((N, D), dtype=E.dtype, device=E.device)
    lam_new = _alloc.empty((N,), dtype=E.dtype, device=E.device)
    if N == 0:
        return F.view(B, P, Lq, D), lam_new.view(B, P, Lq)
    rows = _aligned(E.reshape(N, S))
    half = E.dtype in (torch.float16, torch.bfloat16)
    hidden = _alloc.empty((N, H), dtype=E.dtype, device=E.device)
    cfg = rcr_gemm_config(half, S, "hidden")
    opts = launch_options(cfg)
    lam_old = rows if lam is None else lam.reshape(N).contiguous()
    _rcr_hidden_kernel[(triton.cdiv(N, cfg["BM"]),)](
        rows, qlens, _aligned(w1), b1.contiguous(), _aligned(ws1), bs1.contiguous(), ws2.reshape(-1), bs2, lam_old,
        hidden, lam_new, float(lam_scalar), N, P, Lq,
        S_DIM=S, H_DIM=H, HS_DIM=ws1.shape[0], HAS_LAM=lam is not None, IEEE=not half, **cfg, **opts)
    cfg = rcr_gemm_config(half, S, "factors")
    opts = launch_options(cfg)
    f_old = F if factors is None else _aligned(factors.reshape(N, D))
    grid = (triton.cdiv(N, cfg["BM"]), triton.cdiv(D, cfg["BN"]))
    _rcr_factors_gemm_kernel[grid](hidden, qlens, _aligned(w2), b2, f_old, F, N, P, Lq, D=D, H_DIM=H,
                                   HAS_F=factors is not None, IEEE=not half, **cfg, **opts)
    return F.view(B, P, Lq, D), lam_new.view(B, P, Lq)


def rcr_factors_bwd(hidden: Tensor, w2: Tensor, b2: Tensor, factors: Optional[Tensor], grad: Tensor,
                    dfactors: Optional[Tensor] = None) -> Tensor:
    """The d-wide part of RCR's backward (rcar_fast.torch_math.rcr_step_recomputed) on rows of
    the hidden layer hidden = tanh(E W1^T + b1) (n, 2s): with M = hidden W2^T + b2, t = tanh(M),
    z = t + factors (ones for None; factors (n, d)) and grad (n, d) the gradient of the new
    factors clamp(z, -1, 1), returns gm = grad * [|z| <= 1] * (1 - t^2) (n, d) in hidden's dtype
    and, where ``dfactors`` (n, d) is given, writes grad * [|z| <= 1] (the factors' gradient)
    into it. One kernel (_rcr_factors_bwd_kernel), rcr_gemm_config's "factors_bwd" tiles."""
    N, H = hidden.shape
    D = w2.shape[0]
    if N > MAX_N_ROWS:
        raise ValueError(f"hidden: the Triton RCR backward takes at most {MAX_N_ROWS} rows, got {N}")
    gm = _alloc.empty((N, D), dtype=hidden.dtype, device=hidden.device)
    if N == 0:
        return gm
    half = hidden.dtype in (torch.float16, torch.bfloat16)
    cfg = rcr_gemm_config(half, hidden.shape[1] // 2, "factors_bwd")
    opts = launch_options(cfg)
    h = _aligned(hidden)
    f_old = gm if factors is None else _aligned(factors)
    # the kernel stores dF through 16-byte aligned contiguous rows: a view that is not gets a buffer
    direct = dfactors is not None and _is_aligned(dfactors)
    df = gm if dfactors is None else (dfactors if direct else _alloc.empty(gm.shape, dtype=gm.dtype, device=gm.device))
    tiles = (triton.cdiv(N, cfg["BM"]), triton.cdiv(D, cfg["BN"]))
    _rcr_factors_bwd_kernel[tiles](h, _aligned(w2), b2, f_old, _aligned(grad), gm, df, N, D=D, H_DIM=H,
                                  HAS_F=factors is not None, WRITE_DF=dfactors is not None, IEEE=not half,
                                  **cfg, **opts)
    if dfactors is not None and not direct:
        dfactors.copy_(df)
    return gm


@torch.library.custom_op("rcar_fast::triton_rcr", mutates_args=())
def triton_rcr(E: Tensor, qlens: Tensor, factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
               w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ws1: Tensor, bs1: Tensor, ws2: Tensor,
               bs2: Tensor) -> Tuple[Tensor, Tensor]:
    """The optional rcr op of the backend contract (csrc/README.md's ``rcr``), for inference:
    one RCR step, (F (B, P, Lq, d), lam (B, P, Lq)); see rcr_step."""
    return rcr_step(E, qlens, factors, lam, lam_scalar, w1, b1, w2, b2, ws1, bs1, ws2, bs2)


triton_rcr.register_fake(contract.rcr_fake)
