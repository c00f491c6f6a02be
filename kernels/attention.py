"""Fused region-word attention with adaptive factors, optionally fused with the alignment
projection: one Triton program per (context item b, query item p) pair.

Layout (as rcar_fast.torch_backend): B indexes the context side, P the query side.
  t2i: B = images (context = R regions), P = captions (query = words).
  i2t: B = captions (context = words), P = images (query = R regions).
Per program, with Q (Lq x d) and C (Lc x d) read in place, never repeated:

  pass 1 over d:  S = (F * Q) C^T        (BQ x BC)    G = C C^T   (BC x BC)
  on chip:        S = LeakyReLU_0.1(S); Sn = S / (||S[:, c]||_valid q + 1e-8)
                  P = softmax over valid c of lam[q] Sn[q, c]
                  ||U[q]||^2 = P[q] G P[q]^T  (the norm of U = P C known before U exists)
  pass 2 over d:  A = (P C) / (||U|| + 1e-8), chunk by chunk;
                  MODE 0 stores A (B, P, Lq, d);
                  MODE 1 accumulates (Q - A)^2 W^T and stores E = l2n(. + b) (B, P, Lq, s),
                  so the d-wide attended context never reaches memory.

Padding is masked by selection: masked loads (other=0) never read a padded word, softmax
columns past the context length are -inf, rows past the query length are stored as zeros.
"""

import triton
import triton.language as tl

EPS = tl.constexpr(1e-8)   # a plain global is rejected by the GPU compiler


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32 accumulation; IEEE: exact fp32 products (no tf32) for fp32 inputs."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores_and_gram(q_base, c_base, f_base, sq_d, sc_d, sf_d, qmask, cmask, D,
                     HAS_F: tl.constexpr, IEEE: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr,
                     BD: tl.constexpr):
    """Pass over d: S0 = (F * Q) C^T (BQ x BC) and G = C C^T (BC x BC), fp32."""
    rd = tl.arange(0, BD)
    S0 = tl.zeros((BQ, BC), dtype=tl.float32)
    G = tl.zeros((BC, BC), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dm = (d0 + rd) < D
        Qc = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qmask[:, None] & dm[None, :], other=0.0)
        Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
        if HAS_F:
            Fc = tl.load(f_base + (d0 + rd)[None, :] * sf_d, mask=qmask[:, None] & dm[None, :], other=0.0)
            Qc = (Qc * Fc).to(Cc.dtype)
        S0 += _dot(Qc, tl.trans(Cc), IEEE)
        G += _dot(Cc, tl.trans(Cc), IEEE)
    return S0, G


@triton.jit
def _attention_probs(S0, G, lam, qmask, cmask, IEEE: tl.constexpr):
    """On chip: S = LeakyReLU(S0) on valid queries, its column norms N, Sn = S / (N + eps),
    P = softmax over valid context of lam[q] Sn, and |U| = sqrt(P G P^T) per query."""
    S = tl.where(S0 > 0, S0, 0.1 * S0)
    S = tl.where(qmask[:, None], S, 0.0)
    N = tl.sqrt(tl.sum(S * S, axis=0))
    Sn = S / (N + EPS)[None, :]
    logits = tl.where(cmask[None, :], Sn * lam[:, None], float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    Pm = e / tl.sum(e, axis=1)[:, None]
    un = tl.sqrt(tl.maximum(tl.sum(_dot(Pm, G, IEEE) * Pm, axis=1), 0.0))
    return S, N, Sn, Pm, un


@triton.jit
def _attention_fwd_kernel(
    q_ptr, qlen_ptr, c_ptr, clen_ptr, f_ptr, lam_ptr, w_ptr, bias_ptr, out_ptr,
    P, LQ_OUT, D, S_DIM, lam_scalar,
    sq_p, sq_l, sq_d,
    sc_b, sc_l, sc_d,
    sf_b, sf_p, sf_l, sf_d,
    sl_b, sl_p, sl_l,
    sw_s, sw_d,
    so_b, so_p, so_l, so_x,
    HAS_F: tl.constexpr, HAS_LAM: tl.constexpr, MODE: tl.constexpr, IEEE: tl.constexpr,
    BQ: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // P).to(tl.int64)
    p = (pid % P).to(tl.int64)
    qlen = tl.load(qlen_ptr + p)
    clen = tl.load(clen_ptr + b)
    rq = tl.arange(0, BQ)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, BD)
    qmask = rq < qlen
    cmask = rc < clen
    q_base = q_ptr + p * sq_p + rq[:, None] * sq_l
    c_base = c_ptr + b * sc_b + rc[:, None] * sc_l
    f_base = f_ptr + b * sf_b + p * sf_p + rq[:, None] * sf_l

    # pass 1 and on chip: scores, Gram matrix, softmax, the norm of U = P C
    S0, G = _scores_and_gram(q_base, c_base, f_base, sq_d, sc_d, sf_d, qmask, cmask, D,
                             HAS_F, IEEE, BQ, BC, BD)
    if HAS_LAM:
        lam = tl.load(lam_ptr + b * sl_b + p * sl_p + rq * sl_l, mask=qmask, other=0.0).to(tl.float32)
    else:
        lam = tl.zeros((BQ,), dtype=tl.float32) + lam_scalar
    S, N, Sn, Pm, un = _attention_probs(S0, G, lam, qmask, cmask, IEEE)
    inv_un = 1.0 / (un + EPS)

    # pass 2: the attended context, normalised chunk by chunk
    rs = tl.arange(0, BS)
    smask = rs < S_DIM
    rows_out = rq < LQ_OUT
    out_base = out_ptr + b * so_b + p * so_p + rq[:, None] * so_l
    acc = tl.zeros((BQ, BS), dtype=tl.float32)
    for d0 in range(0, D, BD):
        dm = (d0 + rd) < D
        Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
        U = _dot(Pm.to(Cc.dtype), Cc, IEEE)
        A = U * inv_un[:, None]
        if MODE == 0:
            A = tl.where(qmask[:, None], A, 0.0)
            tl.store(out_base + (d0 + rd)[None, :] * so_x, A.to(out_ptr.dtype.element_ty),
                     mask=rows_out[:, None] & dm[None, :])
        else:
            Qc = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qmask[:, None] & dm[None, :], other=0.0)
            Dq = Qc.to(tl.float32) - A
            Dq = (Dq * Dq).to(Cc.dtype)
            Wc = tl.load(w_ptr + rs[:, None] * sw_s + (d0 + rd)[None, :] * sw_d,
                         mask=smask[:, None] & dm[None, :], other=0.0)
            acc += _dot(Dq, tl.trans(Wc), IEEE)
    if MODE == 1:
        bias = tl.load(bias_ptr + rs, mask=smask, other=0.0).to(tl.float32)
        E = tl.where(smask[None, :], acc + bias[None, :], 0.0)
        E = E / (tl.sqrt(tl.sum(E * E, axis=1)) + EPS)[:, None]
        E = tl.where(qmask[:, None], E, 0.0)
        tl.store(out_base + rs[None, :] * so_x, E.to(out_ptr.dtype.element_ty),
                 mask=rows_out[:, None] & smask[None, :])


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def attention_config(half: bool, Lq: int, Lc: int, D: int, width: int, mode: int) -> dict:
    """The block sizes and warps the launcher picks (the compile report checks these).

    Chosen from ptxas -v reports (python -m bench.resources; no GPU run yet): with 8 warps,
    block_d 32 compiles without spills for bf16/fp16 on sm_80 and sm_90 except the fused
    projection at BQ = BC = 64, which spills 40 B on sm_80 and gets 16; fp32 gets 16.
    """
    BQ, BC = _pow2(Lq), _pow2(Lc)
    bd = 32 if half and not (mode == 1 and BQ * BC >= 4096) else 16
    return dict(BQ=BQ, BC=BC, BD=min(bd, _pow2(D)), BS=_pow2(width if mode == 1 else 16), num_warps=8)


#: (Lq, Lc) of the standard launches: t2i with captions up to 32 or 64 words against R = 36
#: regions, i2t with the regions as queries; d = 1024, s = 256 (SPEC.md's shapes)
STANDARD_SHAPES = ((32, 36), (64, 36), (36, 32), (36, 64))


def launch_configs(config=None, extra=None):
    """Every (dtype, constexprs, num_warps) a launcher picks for the standard shapes, all dtypes.

    config: the launcher's block-size chooser (default :func:`attention_config`); extra(has_state)
    adds kernel-specific constexprs (the backward's NEED_DF)."""
    config = config or attention_config
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for Lq, Lc in STANDARD_SHAPES:
            for mode in (0, 1):
                for has_state in (False, True):
                    cfg = config(dtype != "fp32", Lq, Lc, 1024, 256 if mode else 1024, mode)
                    warps = cfg.pop("num_warps")
                    cfg.update(HAS_F=has_state, HAS_LAM=has_state, MODE=mode, IEEE=dtype == "fp32")
                    cfg.update(extra(has_state) if extra else {})
                    if (dtype, cfg, warps) not in out:
                        out.append((dtype, cfg, warps))
    return out


def signature(dtype: str) -> dict:
    """The kernel's argument types for triton.compile (pointers of ``dtype``)."""
    sig = {n: f"*{dtype}" for n in ("q_ptr", "c_ptr", "f_ptr", "lam_ptr", "w_ptr", "bias_ptr", "out_ptr")}
    sig.update(qlen_ptr="*i32", clen_ptr="*i32", P="i32", LQ_OUT="i32", D="i32", S_DIM="i32",
               lam_scalar="fp32")
    for n in ("sq_p", "sq_l", "sq_d", "sc_b", "sc_l", "sc_d", "sf_b", "sf_p", "sf_l", "sf_d",
              "sl_b", "sl_p", "sl_l", "sw_s", "sw_d", "so_b", "so_p", "so_l", "so_x"):
        sig[n] = "i64"
    return sig


def attention_fwd(query, qlens, context, clens, factors=None, lam=10.0, weight=None, bias=None,
                  block_d=None):
    """Launch the fused attention over every (b, p) pair.

    query (P, Lq, d), qlens (P,) int32 valid query rows; context (B, Lc, d), clens (B,) int32;
    factors None or (B, P, Lq, d) (any strides); lam a float or (B, P, Lq);
    weight (s, d) and bias (s,) given: returns E (B, P, Lq, s), else A (B, P, Lq, d).
    Rows at or past a pair's query length are zero. Accumulation is fp32; fp32 inputs use
    IEEE fp32 products (no tf32), bf16/fp16 inputs the tensor cores.
    """
    import torch

    P, Lq, D = query.shape
    B, Lc, _ = context.shape
    lq_out = Lq
    mode = 0 if weight is None else 1
    width = D if mode == 0 else weight.shape[0]
    out = query.new_empty(B, P, lq_out, width)
    if B * P == 0:
        return out
    has_f = factors is not None
    has_lam = isinstance(lam, torch.Tensor)
    f = factors if has_f else query
    lt = lam if has_lam else query
    w = weight if mode == 1 else query
    bb = bias if mode == 1 else query
    sf = factors.stride() if has_f else (0, 0, 0, 0)
    sl = lam.stride() if has_lam else (0, 0, 0)
    sw = weight.stride() if mode == 1 else (0, 0)
    cfg = attention_config(query.dtype != torch.float32, Lq, Lc, D, width, mode)
    if block_d is not None:
        cfg["BD"] = min(block_d, _pow2(D))
    _attention_fwd_kernel[(B * P,)](
        query, qlens, context, clens, f, lt, w, bb, out,
        P, lq_out, D, width, float(lam) if not has_lam else 0.0,
        *query.stride(), *context.stride(), *sf, *sl, *sw, *out.stride(),
        HAS_F=has_f, HAS_LAM=has_lam, MODE=mode, IEEE=query.dtype == torch.float32, **cfg)
    return out
