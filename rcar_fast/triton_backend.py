"""The "triton" backend: fused Triton kernels (kernels/, installed as rcar_fast.kernels).

The kernels are wrapped as torch.library custom ops with register_fake (torch.compile traces
them) and register_autograd: ``rcar_fast::triton_attention`` (fused adaptive attention, with
the alignment projection when given a weight; kernels/attention.py) and its backward
``::triton_attention_bwd`` (recomputes each pair on chip, kernels/attention_bwd.py);
``::triton_rar`` (T RAR steps per launch) and ``::triton_rar_bwd`` (one step's backward,
kernels/rar.py). The block pipeline, the pieces and the autograd wiring are shared with the
compiled backends (rcar_fast._fused): RCR's MLP runs in plain torch, so F is materialised per
pair. On CPU tensors the kernels run only under TRITON_INTERPRET=1 (the test tier).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import _fused

Tensor = torch.Tensor
DEFAULT_BUDGET_CPU = 24 * 2**20
DEFAULT_BUDGET_GPU = 2 * 2**30


def _kernels():
    try:
        from . import kernels
    except ImportError:   # a source checkout run without `pip install -e .` (or a stale one)
        import rcar_fast
        rcar_fast.__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from . import kernels
    return kernels


# ----------------------------------------------------------------------------- custom ops

def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("rcar_fast::triton_attention", mutates_args=())
def triton_attention(query: Tensor, qlens: Tensor, context: Tensor, clens: Tensor,
                     factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
                     weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """Fused adaptive attention over every (b, p) pair, block layout (csrc/README.md's
    ``attention`` contract; kernels/attention.py): query (P, Lq, d), qlens (P,) int32, context
    (B, Lc, d), clens (B,) int32, factors None or (B, P, Lq, d), lam None (use lam_scalar) or
    (B, P, Lq); weight (s, d) and bias (s,) given: E (B, P, Lq, s), else l2n(A) (B, P, Lq, d).
    Rows past a query length are zero."""
    return _kernels().attention_fwd(query, qlens, context, clens, factors,
                                    lam_scalar if lam is None else lam, weight, bias)


@torch.library.custom_op("rcar_fast::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(grad: Tensor, query: Tensor, qlens: Tensor, context: Tensor, clens: Tensor,
                         factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
                         weight: Optional[Tensor], bias: Optional[Tensor],
                         need_dfactors: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel (kernels/attention_bwd.py), recomputing each pair on chip. Returns
    (dquery, dcontext, dfactors, dlam, dweight, dbias), computed in fp32 and returned in fp32
    (fp64 for fp64 inputs, as the op contract says); an absent one is an empty tensor."""
    outs = _kernels().attention_bwd(grad, query, qlens, context, clens, factors,
                                    lam_scalar if lam is None else lam, weight, bias, need_dfactors)
    acc = _acc(query)
    return tuple(query.new_empty(0, dtype=acc) if o is None else o.to(acc).contiguous() for o in outs)


@torch.library.custom_op("rcar_fast::triton_rar", mutates_args=())
def triton_rar(E: Tensor, qlens: Tensor, h0: Optional[Tensor], wq: Tensor, bq: Tensor, wk: Tensor,
               bk: Tensor, wv: Tensor, bv: Tensor, keep_k: Optional[Tensor],
               keep_g: Optional[Tensor]) -> Tensor:
    """T = wq.shape[0] RAR steps on every pair of E (B, P, Lq, s), see kernels/rar.py:
    h0 None (the mean of E) or (B, P, s); keep_k (B, P, Lq, s), keep_g (B, P, s): dropout
    keep-masks scaled by 1/(1-p), for T = 1. Returns h (B, P, s)."""
    return _kernels().rar_fwd(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g)


@torch.library.custom_op("rcar_fast::triton_rar_bwd", mutates_args=())
def triton_rar_bwd(grad: Tensor, E: Tensor, qlens: Tensor, h: Tensor, wq: Tensor, bq: Tensor,
                   wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, keep_k: Optional[Tensor],
                   keep_g: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One RAR step's backward kernel (kernels/rar.py): (dE, dh, dKp, dgp, dwv), see csrc/README.md's
    ``rar_bwd``; computed in fp32, returned in fp32 (fp64 for fp64 inputs)."""
    outs = _kernels().rar_bwd(grad, E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g)
    return tuple(o.to(_acc(E)) for o in outs)


triton_attention.register_fake(_fused.attention_fake)
triton_attention_bwd.register_fake(_fused.attention_bwd_fake)
triton_rar.register_fake(_fused.rar_fake)
triton_rar_bwd.register_fake(_fused.rar_bwd_fake)
_fused.register_attention_autograd(triton_attention, triton_attention_bwd)
_fused.register_rar_autograd(triton_rar, triton_rar_bwd)

OPS = _fused.FusedOps(triton_attention, triton_rar, DEFAULT_BUDGET_CPU, DEFAULT_BUDGET_GPU)


# the pieces rcar_fast.ops calls, bound to this backend's ops
adaptive_attention, alignment, rcr_update, rar_update, rcar_scores = _fused.pieces(OPS)
