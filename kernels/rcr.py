"""RCR's step for inference (the backend contract's optional ``rcr``), its d-wide element-wise
work fused into one Triton kernel:

  hidden = tanh(E W1^T + b1)                  (N x 2s, torch: cuBLAS GEMM, tanh in place)
  M      = hidden W2^T + b2                   (N x d, torch: cuBLAS GEMM into the new F's buffer)
  F      = clamp(tanh(M) + F_old, -1, 1)      (_rcr_factors_kernel, in place over M: one read of M
                                               and of F_old, one write, where torch's in-place
                                               chain tanh_, add_, clamp_ makes three passes)
  lam    = relu(ws2 tanh(E ws1^T + bs1) + bs2 + lam_old)   (torch, one column)

N = B * P * Lq rows; F_old all ones at the first step (None). Rows at or past a pair's query
length are zero in F and lam (the contract of csrc/README.md's ``rcr``), whatever the inputs
hold there (NaN included: the kernel never reads F_old there, and E's rows stay in their own
rows of the GEMMs). Inference only: under autograd the pipeline runs torch's RCR step.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from rcar_fast.backends import contract

from .attention import MAX_REGISTERS
from .rar import _tanh

Tensor = torch.Tensor


@triton.jit
def _rcr_factors_kernel(m_ptr, f_ptr, qlen_ptr, N_ROWS, P, LQ, D,
                        HAS_F: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """BR rows x BD columns of F = clamp(tanh(M) + F_old, -1, 1), written over M ((N_ROWS, D),
    contiguous; F_old likewise, or all ones without HAS_F); row r is position r % LQ of query
    item (r // LQ) % P, and is zero at or past that item's length."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    rin = r < N_ROWS
    qlen = tl.load(qlen_ptr + (r // LQ) % P, mask=rin, other=0)
    valid = (r % LQ) < qlen
    m2 = rin[:, None] & (c < D)[None, :]
    v2 = valid[:, None] & (c < D)[None, :]
    offs = r[:, None] * D + c[None, :]
    m = tl.load(m_ptr + offs, mask=v2, other=0.0).to(tl.float32)
    if HAS_F:
        f = tl.load(f_ptr + offs, mask=v2, other=0.0).to(tl.float32)
    else:
        f = 1.0
    out = tl.where(v2, tl.minimum(tl.maximum(_tanh(m) + f, -1.0), 1.0), 0.0)
    tl.store(m_ptr + offs, out.to(m_ptr.dtype.element_ty), mask=m2)


def rcr_factors_config() -> dict:
    """Block sizes and launch options of _rcr_factors_kernel (the compile report checks these):
    16 rows x 128 columns, 4 warps (16 elements a thread; bf16: two 16-byte loads)."""
    return dict(BR=16, BD=128, num_warps=4, num_stages=1, maxnreg=MAX_REGISTERS)


def rcr_step(E: Tensor, qlens: Tensor, factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
             w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ws1: Tensor, bs1: Tensor, ws2: Tensor,
             bs2: Tensor) -> Tuple[Tensor, Tensor]:
    """One RCR step on E (B, P, Lq, s), qlens (P,) int32: returns (F (B, P, Lq, d), lam
    (B, P, Lq)) in E's dtype; factors None (all ones) or (B, P, Lq, d); lam None (lam_scalar
    everywhere) or (B, P, Lq). Zero at rows past a query length."""
    B, P, Lq, S = E.shape
    D = w2.shape[0]
    rows = E.reshape(B * P * Lq, S)
    F = torch.addmm(b2, torch.addmm(b1, rows, w1.t()).tanh_(), w2.t())
    if F.numel():
        f_old = F if factors is None else factors.contiguous()
        cfg = rcr_factors_config()
        grid = (triton.cdiv(B * P * Lq, cfg["BR"]), triton.cdiv(D, cfg["BD"]))
        _rcr_factors_kernel[grid](F, f_old, qlens, B * P * Lq, P, Lq, D, HAS_F=factors is not None, **cfg)
    smooth = torch.addmm(bs2, torch.addmm(bs1, rows, ws1.t()).tanh_(), ws2.t()).view(B, P, Lq)
    valid = torch.arange(Lq, device=E.device)[None, :] < qlens[:, None].to(torch.int64)       # (P, Lq)
    lam_new = torch.where(valid, torch.relu(smooth + (lam_scalar if lam is None else lam)), 0.0)
    return F.view(B, P, Lq, D), lam_new.to(E.dtype)


@torch.library.custom_op("rcar_fast::triton_rcr", mutates_args=())
def triton_rcr(E: Tensor, qlens: Tensor, factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
               w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ws1: Tensor, bs1: Tensor, ws2: Tensor,
               bs2: Tensor) -> Tuple[Tensor, Tensor]:
    """The optional rcr op of the backend contract (csrc/README.md's ``rcr``), for inference:
    one RCR step, (F (B, P, Lq, d), lam (B, P, Lq)); see rcr_step."""
    return rcr_step(E, qlens, factors, lam, lam_scalar, w1, b1, w2, b2, ws1, bs1, ws2, bs2)


triton_rcr.register_fake(contract.rcr_fake)
