"""Backward of the fused adaptive attention (kernels/attention.py), one program per pair.

Nothing of the forward is stored: each program recomputes its pair on chip (scores, softmax,
the norm of the attended context through G = C C^T) and streams d in chunks:

  pass A  S = (F Q) C^T, G = C C^T                       (as the forward)
  pass B  MODE 1: Y = (Q - A)^2 W^T + b, so dY from dE = d l2n(Y)
  pass C  dA (MODE 1: 2 (dY W) (A - Q)), accumulates U . dA per row; MODE 1 also adds
          dW += dY^T (Q - A)^2, db += sum dY, dQ += -dA
  pass D  dU = dA / (|U| + eps) - U (U . dA) / (|U| (|U| + eps)^2); dP = dU C^T; dC += P^T dU
  on chip dZ = P (dP - rowsum(P dP)); dlam = rowsum(dZ Sn); dS through the normalisation
          across queries and the LeakyReLU
  pass E  dX = dS0 C; dF = dX Q; dQ += dX F; dC += dS0^T (F Q)

dF (B, P, Lq, d) and dlam (B, P, Lq) belong to one pair and are stored; dQ, dC, dW and db are
shared across pairs and accumulated with fp32 atomics. That is correct first: the atomics on
dW (s x d per pair) are the part to restructure for speed on a GPU (not measured yet).
"""

import triton
import triton.language as tl

from .attention import EPS, _attention_probs, _dot, _scores_and_gram


@triton.jit
def _grad_context_chunk(c_base, q_base, g_base, w_ptr, sc_d, sq_d, sg_x, sw_s, sw_d, d0, D,
                        Pm, inv_un, dY, rq_mask, cmask, smask, rs,
                        MODE: tl.constexpr, IEEE: tl.constexpr, BD: tl.constexpr):
    """One d-chunk of U = P C and of dA (MODE 1: 2 (dY W) (A - Q); MODE 0: the given gradient),
    plus Q - A and W's chunk, which pass C needs for dW. Rows past the query length: dA = 0."""
    rd = tl.arange(0, BD)
    dm = (d0 + rd) < D
    qd = rq_mask[:, None] & dm[None, :]
    Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
    U = _dot(Pm.to(Cc.dtype), Cc, IEEE)
    if MODE == 1:
        Qc = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qd, other=0.0).to(tl.float32)
        Wc = tl.load(w_ptr + rs[:, None] * sw_s + (d0 + rd)[None, :] * sw_d,
                     mask=smask[:, None] & dm[None, :], other=0.0)
        Dq = Qc - U * inv_un[:, None]
        dA = tl.where(qd, -2.0 * _dot(dY.to(Wc.dtype), Wc, IEEE) * Dq, 0.0)
    else:
        Dq = U
        Wc = Cc
        dA = tl.load(g_base + (d0 + rd)[None, :] * sg_x, mask=qd, other=0.0).to(tl.float32)
    return Cc, U, Dq, Wc, dA, qd, dm


@triton.jit
def _attention_bwd_kernel(
    q_ptr, qlen_ptr, c_ptr, clen_ptr, f_ptr, lam_ptr, w_ptr, bias_ptr, g_ptr,
    dq_ptr, dc_ptr, df_ptr, dlam_ptr, dw_ptr, db_ptr,
    P, LQ, D, S_DIM, lam_scalar,
    sq_p, sq_l, sq_d,
    sc_b, sc_l, sc_d,
    sf_b, sf_p, sf_l, sf_d,
    sl_b, sl_p, sl_l,
    sw_s, sw_d,
    sg_b, sg_p, sg_l, sg_x,
    HAS_F: tl.constexpr, HAS_LAM: tl.constexpr, NEED_DF: tl.constexpr, MODE: tl.constexpr,
    IEEE: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // P).to(tl.int64)
    p = (pid % P).to(tl.int64)
    qlen = tl.load(qlen_ptr + p)
    clen = tl.load(clen_ptr + b)
    rq = tl.arange(0, BQ)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, BD)
    rs = tl.arange(0, BS)
    qmask = rq < qlen
    cmask = rc < clen
    smask = rs < S_DIM
    q_base = q_ptr + p * sq_p + rq[:, None] * sq_l
    c_base = c_ptr + b * sc_b + rc[:, None] * sc_l
    f_base = f_ptr + b * sf_b + p * sf_p + rq[:, None] * sf_l
    g_base = g_ptr + b * sg_b + p * sg_p + rq[:, None] * sg_l
    # fp32 accumulators, contiguous: dq (P, LQ, D), dc (B, Lc_max = BC rows used), df (B, P, LQ, D)
    dq_base = dq_ptr + p * LQ * D + rq[:, None] * D
    dc_base = dc_ptr + b * BC * D + rc[:, None] * D
    df_base = df_ptr + (b * P + p) * LQ * D + rq[:, None] * D

    # pass A: as the forward
    S0, G = _scores_and_gram(q_base, c_base, f_base, sq_d, sc_d, sf_d, qmask, cmask, D,
                             HAS_F, IEEE, BQ, BC, BD)
    if HAS_LAM:
        lam = tl.load(lam_ptr + b * sl_b + p * sl_p + rq * sl_l, mask=qmask, other=0.0).to(tl.float32)
    else:
        lam = tl.zeros((BQ,), dtype=tl.float32) + lam_scalar
    S, N, Sn, Pm, un = _attention_probs(S0, G, lam, qmask, cmask, IEEE)
    inv_un = 1.0 / (un + EPS)

    # pass B (MODE 1): Y, then dY = d l2n(Y)
    dY = tl.zeros((BQ, BS), dtype=tl.float32)
    if MODE == 1:
        Y = tl.zeros((BQ, BS), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dm = (d0 + rd) < D
            Cc = tl.load(c_base + (d0 + rd)[None, :] * sc_d, mask=cmask[:, None] & dm[None, :], other=0.0)
            Qc = tl.load(q_base + (d0 + rd)[None, :] * sq_d, mask=qmask[:, None] & dm[None, :], other=0.0)
            A = _dot(Pm.to(Cc.dtype), Cc, IEEE) * inv_un[:, None]
            Dq = Qc.to(tl.float32) - A
            Wc = tl.load(w_ptr + rs[:, None] * sw_s + (d0 + rd)[None, :] * sw_d,
                         mask=smask[:, None] & dm[None, :], other=0.0)
            Y += _dot((Dq * Dq).to(Wc.dtype), tl.trans(Wc), IEEE)
        Y = tl.where(smask[None, :], Y + tl.load(bias_ptr + rs, mask=smask, other=0.0).to(tl.float32)[None, :], 0.0)
        r = tl.sqrt(tl.sum(Y * Y, axis=1))
        dE = tl.load(g_base + rs[None, :] * sg_x, mask=qmask[:, None] & smask[None, :], other=0.0).to(tl.float32)
        rs_ = tl.where(r > 0, r, 1.0)      # guarded divisions divide by a safe value
        coef = tl.where(r > 0, tl.sum(Y * dE, axis=1) / (rs_ * (r + EPS) * (r + EPS)), 0.0)
        dY = dE / (r + EPS)[:, None] - Y * coef[:, None]
        dY = tl.where(qmask[:, None] & smask[None, :], dY, 0.0)
        tl.atomic_add(db_ptr + rs, tl.sum(dY, axis=0), mask=smask)

    # pass C: U . dA per row; MODE 1 also dW, and dQ's direct term -dA
    udA = tl.zeros((BQ,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        Cc, U, Dq, Wc, dA, qd, dm = _grad_context_chunk(
            c_base, q_base, g_base, w_ptr, sc_d, sq_d, sg_x, sw_s, sw_d, d0, D, Pm, inv_un, dY,
            qmask, cmask, smask, rs, MODE, IEEE, BD)
        if MODE == 1:
            dWc = _dot(tl.trans(dY).to(Wc.dtype), tl.where(qd, Dq * Dq, 0.0).to(Wc.dtype), IEEE)
            tl.atomic_add(dw_ptr + rs[:, None] * D + (d0 + rd)[None, :], dWc, mask=smask[:, None] & dm[None, :])
            tl.atomic_add(dq_base + (d0 + rd)[None, :], -dA, mask=qd)
        udA += tl.sum(U * dA, axis=1)

    # pass D: dU, dP = dU C^T, dC += P^T dU
    coefU = tl.where(un > 0, udA * inv_un * inv_un / tl.where(un > 0, un, 1.0), 0.0)
    dP = tl.zeros((BQ, BC), dtype=tl.float32)
    for d0 in range(0, D, BD):
        Cc, U, Dq, Wc, dA, qd, dm = _grad_context_chunk(
            c_base, q_base, g_base, w_ptr, sc_d, sq_d, sg_x, sw_s, sw_d, d0, D, Pm, inv_un, dY,
            qmask, cmask, smask, rs, MODE, IEEE, BD)
        dU = tl.where(qd, dA * inv_un[:, None] - U * coefU[:, None], 0.0)
        dP += _dot(dU.to(Cc.dtype), tl.trans(Cc), IEEE)
        tl.atomic_add(dc_base + (d0 + rd)[None, :], _dot(tl.trans(Pm).to(Cc.dtype), dU.to(Cc.dtype), IEEE),
                      mask=cmask[:, None] & dm[None, :])

    # on chip: softmax, temperatures, normalisation across queries, LeakyReLU. S0, S, N and Sn
    # are recomputed here rather than kept alive through passes B to D (registers: spills)
    S0, G = _scores_and_gram(q_base, c_base, f_base, sq_d, sc_d, sf_d, qmask, cmask, D,
                             HAS_F, IEEE, BQ, BC, BD)
    S, N, Sn, Pm2, un2 = _attention_probs(S0, G, lam, qmask, cmask, IEEE)
    dZ = Pm * (dP - tl.sum(Pm * dP, axis=1)[:, None])
    dZ = tl.where(qmask[:, None] & cmask[None, :], dZ, 0.0)
    if HAS_LAM:
        dlam = tl.sum(dZ * Sn, axis=1)
        tl.store(dlam_ptr + (b * P + p) * LQ + rq, tl.where(qmask, dlam, 0.0), mask=rq < LQ)
    dSn = dZ * lam[:, None]
    coefN = tl.where(N > 0, tl.sum(S * dSn, axis=0) / (tl.where(N > 0, N, 1.0) * (N + EPS) * (N + EPS)), 0.0)
    dS = dSn / (N + EPS)[None, :] - S * coefN[None, :]
    dS0 = tl.where(S0 > 0, dS, 0.1 * dS)
    dS0 = tl.where(qmask[:, None] & cmask[None, :], dS0, 0.0)

    # pass E: dX = dS0 C; dF, dQ, dC
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
            tl.atomic_add(dq_base + (d0 + rd)[None, :], dX * Fc.to(tl.float32), mask=qd)
            X = (Qc * Fc).to(Cc.dtype)
        else:
            tl.atomic_add(dq_base + (d0 + rd)[None, :], dX, mask=qd)
            X = Qc.to(Cc.dtype)
        tl.atomic_add(dc_base + (d0 + rd)[None, :], _dot(tl.trans(dS0).to(Cc.dtype), X, IEEE),
                      mask=cmask[:, None] & dm[None, :])


def attention_bwd_config(half: bool, Lq: int, Lc: int, D: int, width: int, mode: int) -> dict:
    """Block sizes and warps of the backward. From ptxas sweeps (bf16, no GPU run yet): block_d
    16 with 8 warps spills least; 16 warps spill more (128 registers a thread: 512-1400 B).
    Recomputing S0, S and Sn after pass D instead of keeping them alive through passes B-D took
    sm_80's spills from 404-652 B to 112-252 B (alignment mode) and to none (attention mode).
    dY in an s-wide scratch reloaded per chunk did not help on sm_80 (176 B at BQ 32); the dW
    atomics (dY^T (Q - A)^2 per pair, dY needed in two layouts) are what is left to restructure."""
    from .attention import attention_config

    cfg = attention_config(half, Lq, Lc, D, width, mode)
    cfg.update(BD=min(16, cfg["BD"]), num_warps=8)
    return cfg


def attention_bwd(grad, query, qlens, context, clens, factors=None, lam=10.0, weight=None,
                  bias=None, need_dfactors=True):
    """Gradients of attention_fwd's output (grad: (B, P, Lq, s or d)) with respect to
    (query, context, factors, lam, weight, bias); None where an input is absent. fp32."""
    import torch

    P, Lq, D = query.shape
    B, Lc, _ = context.shape
    mode = 0 if weight is None else 1
    width = D if mode == 0 else weight.shape[0]
    cfg = attention_bwd_config(query.dtype != torch.float32, Lq, Lc, D, width, mode)
    f32 = dict(dtype=torch.float32, device=query.device)
    dq = torch.zeros(P, Lq, D, **f32)
    dc = torch.zeros(B, cfg["BC"], D, **f32)
    has_f, has_lam = factors is not None, isinstance(lam, torch.Tensor)
    df = torch.zeros(B, P, Lq, D, **f32) if has_f and need_dfactors else dq
    dlam = torch.zeros(B, P, Lq, **f32) if has_lam else dq
    dw = torch.zeros(width, D, **f32) if mode == 1 else dq
    db = torch.zeros(width, **f32) if mode == 1 else dq
    if B * P:
        _attention_bwd_kernel[(B * P,)](
            query, qlens, context, clens, factors if has_f else query, lam if has_lam else query,
            weight if mode == 1 else query, bias if mode == 1 else query, grad,
            dq, dc, df, dlam, dw, db,
            P, Lq, D, width, 0.0 if has_lam else float(lam),
            *query.stride(), *context.stride(),
            *(factors.stride() if has_f else (0, 0, 0, 0)), *(lam.stride() if has_lam else (0, 0, 0)),
            *(weight.stride() if mode == 1 else (0, 0)), *grad.stride(),
            HAS_F=has_f, HAS_LAM=has_lam, NEED_DF=has_f and need_dfactors, MODE=mode,
            IEEE=query.dtype == torch.float32, **cfg)
    return (dq, dc[:, :Lc], df if has_f and need_dfactors else None, dlam if has_lam else None,
            dw if mode == 1 else None, db if mode == 1 else None)


def launch_configs():
    """Every (dtype, constexprs, num_warps) attention_bwd launches for the standard shapes."""
    from .attention import launch_configs as forward_configs

    return forward_configs(attention_bwd_config, lambda has_state: {"NEED_DF": has_state})


def signature(dtype: str) -> dict:
    """The kernel's argument types for triton.compile (pointers of ``dtype``, fp32 gradients)."""
    sig = {n: f"*{dtype}" for n in ("q_ptr", "c_ptr", "f_ptr", "lam_ptr", "w_ptr", "bias_ptr", "g_ptr")}
    sig.update({n: "*fp32" for n in ("dq_ptr", "dc_ptr", "df_ptr", "dlam_ptr", "dw_ptr", "db_ptr")})
    sig.update(qlen_ptr="*i32", clen_ptr="*i32", P="i32", LQ="i32", D="i32", S_DIM="i32",
               lam_scalar="fp32")
    for n in ("sq_p", "sq_l", "sq_d", "sc_b", "sc_l", "sc_d", "sf_b", "sf_p", "sf_l", "sf_d",
              "sl_b", "sl_p", "sl_l", "sw_s", "sw_d", "sg_b", "sg_p", "sg_l", "sg_x"):
        sig[n] = "i64"
    return sig
