"""Iterative aggregation reweighting (RAR), fused: one Triton program per pair runs T steps
with the pair's alignment vectors E (Lq x s) held on chip the whole time.

Per step t (weights of module t, stacked on a leading axis):
  K = tanh(E Wk^T + bk)        (Lq x s, computed BN columns at a time, never stored)
  g = tanh(Wq h + bq)          (s)
  logit[q] = sum_n K[q, n] g[n] wv[n] + bv;   a = softmax over valid q
  h = l2n(sum_q a[q] E[q])
h starts from the given h0 or from the plain mean of E over the valid positions.
Dropout (training): optional keep-masks already scaled by 1/(1-p), mk (B, P, Lq, s) on K and
mg (B, P, s) on g, for a single step (T = 1); the caller draws them so backward can reuse them.
"""

import triton
import triton.language as tl

EPS = tl.constexpr(1e-8)   # a plain global is rejected by the GPU compiler


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: tl.sigmoid exists in the interpreter (no libdevice there)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _rar_fwd_kernel(
    e_ptr, qlen_ptr, h_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, mk_ptr, mg_ptr, out_ptr,
    P, S_DIM, T,
    se_b, se_p, se_l, se_s,
    sh_b, sh_p, sh_s,
    smk_b, smk_p, smk_l, smk_s,
    smg_b, smg_p, smg_s,
    so_b, so_p, so_s,
    HAS_H: tl.constexpr, HAS_DROP: tl.constexpr, IEEE: tl.constexpr,
    BQ: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // P).to(tl.int64)
    p = (pid % P).to(tl.int64)
    qlen = tl.load(qlen_ptr + p)
    rq = tl.arange(0, BQ)
    rs = tl.arange(0, BS)
    qmask = rq < qlen
    smask = rs < S_DIM
    E = tl.load(e_ptr + b * se_b + p * se_p + rq[:, None] * se_l + rs[None, :] * se_s,
                mask=qmask[:, None] & smask[None, :], other=0.0)
    Ef = E.to(tl.float32)
    if HAS_H:
        h = tl.load(h_ptr + b * sh_b + p * sh_p + rs * sh_s, mask=smask, other=0.0).to(tl.float32)
    else:
        h = tl.sum(Ef, axis=0) / qlen.to(tl.float32)
    for t in range(T):
        logit = tl.zeros((BQ,), dtype=tl.float32)
        for n0 in range(0, S_DIM, BN):
            rn = n0 + tl.arange(0, BN)
            nm = rn < S_DIM
            woff = t * S_DIM * S_DIM + rn[:, None] * S_DIM + rs[None, :]
            wmask = nm[:, None] & smask[None, :]
            Wk = tl.load(wk_ptr + woff, mask=wmask, other=0.0)
            if IEEE:
                K = tl.dot(E.to(Wk.dtype), tl.trans(Wk), input_precision="ieee")
            else:
                K = tl.dot(E.to(Wk.dtype), tl.trans(Wk))
            K = _tanh(K + tl.load(bk_ptr + t * S_DIM + rn, mask=nm, other=0.0).to(tl.float32)[None, :])
            Wq = tl.load(wq_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
            g = _tanh(tl.sum(Wq * h[None, :], axis=1) + tl.load(bq_ptr + t * S_DIM + rn, mask=nm, other=0.0).to(tl.float32))
            if HAS_DROP:
                K = K * tl.load(mk_ptr + b * smk_b + p * smk_p + rq[:, None] * smk_l + rn[None, :] * smk_s,
                                mask=qmask[:, None] & nm[None, :], other=0.0).to(tl.float32)
                g = g * tl.load(mg_ptr + b * smg_b + p * smg_p + rn * smg_s, mask=nm, other=0.0).to(tl.float32)
            wv = tl.load(wv_ptr + t * S_DIM + rn, mask=nm, other=0.0).to(tl.float32)
            logit += tl.sum(K * (g * wv)[None, :], axis=1)
        logit += tl.load(bv_ptr + t).to(tl.float32)
        logit = tl.where(qmask, logit, float("-inf"))
        a = tl.exp(logit - tl.max(logit, axis=0))
        a = a / tl.sum(a, axis=0)
        h = tl.sum(a[:, None] * Ef, axis=0)
        h = h / (tl.sqrt(tl.sum(h * h, axis=0)) + EPS)
    tl.store(out_ptr + b * so_b + p * so_p + rs * so_s, h.to(out_ptr.dtype.element_ty), mask=smask)


def rar_config(Lq: int, S: int, block_n: int = 32) -> dict:
    """The block sizes and warps the launcher picks (the compile report checks these).
    8 warps: with 4, BQ = 32 and s = 256 spilled on sm_80 and sm_90 (python -m bench.resources)."""
    BS = max(16, triton.next_power_of_2(S))
    return dict(BQ=max(16, triton.next_power_of_2(Lq)), BS=BS, BN=max(16, min(block_n, BS)), num_warps=8)


def launch_configs():
    """Every (dtype, constexprs, num_warps) the launcher picks for Lq in {32, 36, 64}, s = 256."""
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for Lq in (32, 36, 64):
            for has_h, has_drop in ((False, False), (True, False), (False, True), (True, True)):
                cfg = rar_config(Lq, 256)
                warps = cfg.pop("num_warps")
                cfg.update(HAS_H=has_h, HAS_DROP=has_drop, IEEE=dtype == "fp32")
                if (dtype, cfg, warps) not in out:
                    out.append((dtype, cfg, warps))
    return out


def signature(dtype: str) -> dict:
    """The kernel's argument types for triton.compile (pointers of ``dtype``)."""
    sig = {n: f"*{dtype}" for n in ("e_ptr", "h_ptr", "wq_ptr", "bq_ptr", "wk_ptr", "bk_ptr",
                                    "wv_ptr", "bv_ptr", "mk_ptr", "mg_ptr", "out_ptr")}
    sig.update(qlen_ptr="*i32", P="i32", S_DIM="i32", T="i32")
    for n in ("se_b", "se_p", "se_l", "se_s", "sh_b", "sh_p", "sh_s", "smk_b", "smk_p", "smk_l",
              "smk_s", "smg_b", "smg_p", "smg_s", "so_b", "so_p", "so_s"):
        sig[n] = "i64"
    return sig


def rar_fwd(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k=None, keep_g=None, block_n: int = 32):
    """Run T RAR steps (T = wq.shape[0]) on every pair of E (B, P, Lq, s).

    qlens (P,) int32 valid query rows; h0 None (start from the mean) or (B, P, s);
    wq, wk (T, s, s), bq, bk (T, s), wv (T, s), bv (T,), all contiguous;
    keep_k (B, P, Lq, s) and keep_g (B, P, s): dropout keep-masks scaled by 1/(1-p), T = 1 only.
    Returns h (B, P, s).
    """
    import torch

    B, P, Lq, S = E.shape
    T = wq.shape[0]
    out = E.new_empty(B, P, S)
    if B * P == 0:
        return out
    has_h = h0 is not None
    h = h0 if has_h else E
    sh = h0.stride() if has_h else (0, 0, 0)
    has_drop = keep_k is not None
    if has_drop and T != 1:
        raise ValueError("keep_k: dropout masks are per step; launch one step at a time")
    mk, mg = (keep_k, keep_g) if has_drop else (E, E)
    smk = keep_k.stride() if has_drop else (0, 0, 0, 0)
    smg = keep_g.stride() if has_drop else (0, 0, 0)
    cfg = rar_config(Lq, S, block_n)
    _rar_fwd_kernel[(B * P,)](
        E, qlens, h, wq, bq, wk, bk, wv, bv, mk, mg, out, P, S, T,
        *E.stride(), *sh, *smk, *smg, *out.stride(),
        HAS_H=has_h, HAS_DROP=has_drop, IEEE=E.dtype == torch.float32, **cfg)
    return out


@triton.jit
def _rar_bwd_kernel(
    g_ptr, e_ptr, qlen_ptr, h_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, mk_ptr, mg_ptr,
    de_ptr, dh_ptr, dkp_ptr, dgp_ptr, dwv_ptr,
    P, LQ, S_DIM,
    sg_b, sg_p, sg_s,
    se_b, se_p, se_l, se_s,
    sh_b, sh_p, sh_s,
    smk_b, smk_p, smk_l, smk_s,
    smg_b, smg_p, smg_s,
    HAS_DROP: tl.constexpr, IEEE: tl.constexpr,
    BQ: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
):
    """Backward of ONE RAR step for one pair; h is the step's input. Outputs (fp32, contiguous):
    dE (B, P, LQ, s), dh (B, P, s), dKp = dL/d(E Wk^T + bk) (B, P, LQ, s), dgp = dL/d(Wq h + bq)
    and dwv[n] = sum_q dlogit[q] K[q, n] g[n] (B, P, s); the shared-weight gradients are GEMMs
    over these, outside. Two passes over the s columns of K: the forward's logits, then the
    gradients, K and g recomputed chunk by chunk."""
    pid = tl.program_id(0)
    b = (pid // P).to(tl.int64)
    p = (pid % P).to(tl.int64)
    qlen = tl.load(qlen_ptr + p)
    rq = tl.arange(0, BQ)
    rs = tl.arange(0, BS)
    qmask = rq < qlen
    smask = rs < S_DIM
    E = tl.load(e_ptr + b * se_b + p * se_p + rq[:, None] * se_l + rs[None, :] * se_s,
                mask=qmask[:, None] & smask[None, :], other=0.0)
    Ef = E.to(tl.float32)
    h = tl.load(h_ptr + b * sh_b + p * sh_p + rs * sh_s, mask=smask, other=0.0).to(tl.float32)
    go = tl.load(g_ptr + b * sg_b + p * sg_p + rs * sg_s, mask=smask, other=0.0).to(tl.float32)
    # pass 1: the forward's logits, softmax and output norm
    logit = tl.zeros((BQ,), dtype=tl.float32)
    for n0 in range(0, S_DIM, BN):
        rn = n0 + tl.arange(0, BN)
        nm = rn < S_DIM
        woff = rn[:, None] * S_DIM + rs[None, :]
        wmask = nm[:, None] & smask[None, :]
        Wk = tl.load(wk_ptr + woff, mask=wmask, other=0.0)
        if IEEE:
            K = tl.dot(E.to(Wk.dtype), tl.trans(Wk), input_precision="ieee")
        else:
            K = tl.dot(E.to(Wk.dtype), tl.trans(Wk))
        K = _tanh(K + tl.load(bk_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :])
        Wq = tl.load(wq_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
        g = _tanh(tl.sum(Wq * h[None, :], axis=1) + tl.load(bq_ptr + rn, mask=nm, other=0.0).to(tl.float32))
        if HAS_DROP:
            K = K * tl.load(mk_ptr + b * smk_b + p * smk_p + rq[:, None] * smk_l + rn[None, :] * smk_s,
                            mask=qmask[:, None] & nm[None, :], other=0.0).to(tl.float32)
            g = g * tl.load(mg_ptr + b * smg_b + p * smg_p + rn * smg_s, mask=nm, other=0.0).to(tl.float32)
        wv = tl.load(wv_ptr + rn, mask=nm, other=0.0).to(tl.float32)
        logit += tl.sum(K * (g * wv)[None, :], axis=1)
    logit += tl.load(bv_ptr).to(tl.float32)
    logit = tl.where(qmask, logit, float("-inf"))
    a = tl.exp(logit - tl.max(logit, axis=0))
    a = a / tl.sum(a, axis=0)
    u = tl.sum(a[:, None] * Ef, axis=0)
    nu = tl.sqrt(tl.sum(u * u, axis=0))
    # d l2n(u): du = go / (|u| + eps) - u (u . go) / (|u| (|u| + eps)^2); u = 0 has no second term
    ug = tl.sum(u * go, axis=0)
    du = go / (nu + EPS) - u * tl.where(nu > 0, ug / (tl.maximum(nu, 1e-30) * (nu + EPS) * (nu + EPS)), 0.0)
    da = tl.sum(Ef * du[None, :], axis=1)
    dlogit = tl.where(qmask, a * (da - tl.sum(a * da, axis=0)), 0.0)
    dE = a[:, None] * du[None, :]
    dh = tl.zeros((BS,), dtype=tl.float32)
    out_row = (b * P + p) * LQ
    # pass 2: per column chunk, the gradients through K, g and wv
    for n0 in range(0, S_DIM, BN):
        rn = n0 + tl.arange(0, BN)
        nm = rn < S_DIM
        woff = rn[:, None] * S_DIM + rs[None, :]
        wmask = nm[:, None] & smask[None, :]
        Wk = tl.load(wk_ptr + woff, mask=wmask, other=0.0)
        if IEEE:
            tk = tl.dot(E.to(Wk.dtype), tl.trans(Wk), input_precision="ieee")
        else:
            tk = tl.dot(E.to(Wk.dtype), tl.trans(Wk))
        tk = _tanh(tk + tl.load(bk_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :])
        Wq = tl.load(wq_ptr + woff, mask=wmask, other=0.0).to(tl.float32)
        tg = _tanh(tl.sum(Wq * h[None, :], axis=1) + tl.load(bq_ptr + rn, mask=nm, other=0.0).to(tl.float32))
        K = tk
        g = tg
        if HAS_DROP:
            mk = tl.load(mk_ptr + b * smk_b + p * smk_p + rq[:, None] * smk_l + rn[None, :] * smk_s,
                         mask=qmask[:, None] & nm[None, :], other=0.0).to(tl.float32)
            mg = tl.load(mg_ptr + b * smg_b + p * smg_p + rn * smg_s, mask=nm, other=0.0).to(tl.float32)
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
        if IEEE:
            dE += tl.dot(dKp, Wk.to(tl.float32), input_precision="ieee")
        else:
            dE += tl.dot(dKp.to(Wk.dtype), Wk)
        dh += tl.sum(Wq * dgp[:, None], axis=0)
    tl.store(de_ptr + (out_row + rq[:, None]) * S_DIM + rs[None, :], tl.where(qmask[:, None], dE, 0.0),
             mask=(rq[:, None] < LQ) & smask[None, :])
    tl.store(dh_ptr + (b * P + p) * S_DIM + rs, dh, mask=smask)


#: the backward's column chunk: with 32, fp32 needed 168-225 KB of shared memory (over the
#: A100's 163 KB) and every variant spilled; 16 fits and spills only at BQ = 64 (bench/results)
BWD_BLOCK_N = 16


def rar_bwd(grad, E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k=None, keep_g=None,
            block_n: int = BWD_BLOCK_N):
    """Backward of one RAR step (wq ... bv with a leading axis of 1, contiguous) on every pair:
    grad (B, P, s) the gradient of the step's output, h (B, P, s) the step's input. Returns fp32
    (dE (B, P, Lq, s), dh (B, P, s), dKp (B, P, Lq, s), dgp (B, P, s), dwv (B, P, s)), see
    _rar_bwd_kernel; zero at rows past a pair's query length."""
    import torch

    B, P, Lq, S = E.shape
    if wq.shape[0] != 1:
        raise ValueError(f"wq: rar_bwd runs one step, got {wq.shape[0]} stacked modules")
    f32 = dict(dtype=torch.float32, device=E.device)
    dE, dKp = torch.empty(B, P, Lq, S, **f32), torch.empty(B, P, Lq, S, **f32)
    dh, dgp, dwv = (torch.empty(B, P, S, **f32) for _ in range(3))
    if B * P == 0:
        return dE, dh, dKp, dgp, dwv
    has_drop = keep_k is not None
    mk, mg = (keep_k, keep_g) if has_drop else (E, E)
    smk = keep_k.stride() if has_drop else (0, 0, 0, 0)
    smg = keep_g.stride() if has_drop else (0, 0, 0)
    cfg = rar_config(Lq, S, block_n)
    _rar_bwd_kernel[(B * P,)](
        grad, E, qlens, h, wq, bq, wk, bk, wv, bv, mk, mg, dE, dh, dKp, dgp, dwv,
        P, Lq, S, *grad.stride(), *E.stride(), *h.stride(), *smk, *smg,
        HAS_DROP=has_drop, IEEE=E.dtype == torch.float32, **cfg)
    return dE, dh, dKp, dgp, dwv


def bwd_launch_configs():
    """Every (dtype, constexprs, num_warps) rar_bwd launches for Lq in {32, 36, 64}, s = 256."""
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for Lq in (32, 36, 64):
            for has_drop in (False, True):
                cfg = rar_config(Lq, 256, BWD_BLOCK_N)
                warps = cfg.pop("num_warps")
                cfg.update(HAS_DROP=has_drop, IEEE=dtype == "fp32")
                if (dtype, cfg, warps) not in out:
                    out.append((dtype, cfg, warps))
    return out


def bwd_signature(dtype: str) -> dict:
    """_rar_bwd_kernel's argument types for triton.compile (inputs of ``dtype``, fp32 outputs)."""
    sig = {n: f"*{dtype}" for n in ("g_ptr", "e_ptr", "h_ptr", "wq_ptr", "bq_ptr", "wk_ptr", "bk_ptr",
                                    "wv_ptr", "bv_ptr", "mk_ptr", "mg_ptr")}
    sig.update({n: "*fp32" for n in ("de_ptr", "dh_ptr", "dkp_ptr", "dgp_ptr", "dwv_ptr")})
    sig.update(qlen_ptr="*i32", P="i32", LQ="i32", S_DIM="i32")
    for n in ("sg_b", "sg_p", "sg_s", "se_b", "se_p", "se_l", "se_s", "sh_b", "sh_p", "sh_s",
              "smk_b", "smk_p", "smk_l", "smk_s", "smg_b", "smg_p", "smg_s"):
        sig[n] = "i64"
    return sig
