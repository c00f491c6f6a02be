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
