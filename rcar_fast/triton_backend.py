"""The "triton" backend: fused Triton kernels (kernels/, installed as rcar_fast.kernels).

Per block of the pair grid (same blocks as the torch backend, see rcar_fast._plan):
  attention + alignment projection: one fused launch (kernels/attention.py), E (s wide) out,
      the d-wide attended context never stored;
  RAR: one launch for all T steps of only_rar, one per step in coop_rcar (kernels/rar.py);
  RCR: its shared-weight MLP in plain torch (not fused yet): F is materialised per pair.
Inference only in this release: no backward kernels, no dropout. rcar_fast.ops refuses
gradients and training mode for this backend before anything runs.
On CPU tensors the kernels run only under TRITON_INTERPRET=1 (the test tier).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

from ._plan import iter_blocks
from .torch_backend import rcr_step

Tensor = torch.Tensor
EPS = 1e-8
DEFAULT_BUDGET_CPU = 24 * 2**20
DEFAULT_BUDGET_GPU = 2 * 2**30
#: d-wide (B, P, Lq, d) buffers alive at once: F and the new F being built
LIVE_WIDE_BUFFERS = 3


def _kernels():
    try:
        from . import kernels
    except ModuleNotFoundError:   # a source checkout run without `pip install -e .`
        import rcar_fast
        rcar_fast.__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from . import kernels
    return kernels


def _sources(img: Tensor, cap: Tensor, cap_lens: Tensor, attn_type: str):
    """(query, qlens, context, clens) in block layout; lengths as int32 on the features' device."""
    dev = img.device
    lens = cap_lens.to(device=dev, dtype=torch.int32)
    if attn_type == "t2i":
        regions = torch.full((img.shape[0],), img.shape[1], dtype=torch.int32, device=dev)
        return cap, lens, img, regions
    regions = torch.full((img.shape[0],), img.shape[1], dtype=torch.int32, device=dev)
    return img, regions, cap, lens


def _block(x, attn_type):
    return x.transpose(0, 1) if isinstance(x, Tensor) and attn_type == "i2t" else x


def _unblock(x: Tensor, attn_type: str) -> Tensor:
    return x.transpose(0, 1).contiguous() if attn_type == "i2t" else x


def adaptive_attention(img, cap, cap_lens, factors, temperatures, attn_type):
    q, ql, c, cl = _sources(img, cap, cap_lens, attn_type)
    A = _kernels().attention_fwd(q, ql, c, cl, _block(factors, attn_type), _block(temperatures, attn_type))
    return _unblock(A, attn_type)


def alignment(img, cap, cap_lens, weight, bias, factors, temperatures, attn_type):
    q, ql, c, cl = _sources(img, cap, cap_lens, attn_type)
    E = _kernels().attention_fwd(q, ql, c, cl, _block(factors, attn_type), _block(temperatures, attn_type),
                                 weight.contiguous(), bias.contiguous())
    return _unblock(E, attn_type)


def _zero_padded(x: Tensor, cap_lens: Tensor, attn_type: str) -> Tensor:
    if attn_type != "t2i":
        return x
    mask = torch.arange(x.shape[2], device=x.device)[None, :] < cap_lens.to(x.device)[:, None]
    return torch.where(mask.view((1,) + tuple(mask.shape) + (1,) * (x.dim() - 3)), x, x.new_zeros(()))


def rcr_update(E, factors, temperatures, cap_lens, weights, attn_type):
    E = _zero_padded(E, cap_lens, attn_type)
    if factors is not None:
        factors = _zero_padded(factors, cap_lens, attn_type)
    if isinstance(temperatures, Tensor):
        temperatures = _zero_padded(temperatures, cap_lens, attn_type)
    Fn, lam = rcr_step(E, factors, temperatures, weights, "", inplace=True)
    return _zero_padded(Fn, cap_lens, attn_type), _zero_padded(lam, cap_lens, attn_type)


def _rar_weights(params: Mapping[str, Tensor], prefixes):
    def stack(name):
        return torch.stack([params[p + name] for p in prefixes]).contiguous()
    return (stack("rar_q_w.0.weight"), stack("rar_q_w.0.bias"), stack("rar_k_w.0.weight"),
            stack("rar_k_w.0.bias"), stack("rar_v_w.0.weight").flatten(1), stack("rar_v_w.0.bias").flatten())


def rar_update(E, h, cap_lens, weights, attn_type, training):
    Eb = _block(E, attn_type)
    B, P, Lq, _ = Eb.shape
    ql = cap_lens.to(device=E.device, dtype=torch.int32) if attn_type == "t2i" else \
        torch.full((P,), Lq, dtype=torch.int32, device=E.device)
    out = _kernels().rar_fwd(Eb, ql, _block(h, attn_type), *_rar_weights(weights, [""]))
    return _unblock(out, attn_type)


def _block_scores(q, ql, c, cl, params, regulator, steps, smooth, lq):
    """SPEC.md's scores of one block, (B, P)."""
    K = _kernels()
    Fq, lam = None, smooth

    def align(t):
        return K.attention_fwd(q, ql, c, cl, Fq, lam, params[f"alv_modules.{t}.sim_transform_w.weight"],
                               params[f"alv_modules.{t}.sim_transform_w.bias"], lq_out=lq)

    if regulator == "only_rcr":
        for t in range(steps):
            Fq, lam = rcr_step(align(t), Fq, lam, params, f"rcr_modules.{t}.", inplace=True)
        A = K.attention_fwd(q, ql, c, cl, Fq, lam, lq_out=lq)            # rows past qlen are 0
        Qv = q[:, :lq]
        valid = torch.arange(lq, device=q.device)[None, :] < ql[:, None]  # (P, lq)
        Qv = torch.where(valid[..., None], Qv, Qv.new_zeros(()))
        num = (A * Qv[None]).sum(-1)
        den = torch.linalg.vector_norm(A, dim=-1) * torch.linalg.vector_norm(Qv, dim=-1)[None]
        cos = torch.where(valid[None], num / torch.clamp(den, min=EPS), num.new_zeros(()))
        return cos.sum(-1) / ql.to(cos.dtype)[None]
    if regulator == "only_rar":
        h = K.rar_fwd(align(0), ql, None, *_rar_weights(params, [f"rar_modules.{t}." for t in range(steps)]))
    else:
        h = None
        for t in range(steps):
            E = align(t)
            if t < steps - 1:
                Fq, lam = rcr_step(E, Fq, lam, params, f"rcr_modules.{t}.", inplace=True)
            h = K.rar_fwd(E, ql, h, *_rar_weights(params, [f"rar_modules.{t}."]))
    return torch.sigmoid(torch.nn.functional.linear(h, params["sim_eval_w.weight"],
                                                    params["sim_eval_w.bias"])).squeeze(-1)


def rcar_scores(img: Tensor, cap: Tensor, cap_lens: Tensor, params: Mapping[str, Tensor],
                regulator: str, steps: int, attn_type: str, smooth: float, training: bool,
                memory_budget: Optional[int] = None) -> Tensor:
    n_i, R, d = img.shape
    if memory_budget is None:
        memory_budget = DEFAULT_BUDGET_GPU if img.is_cuda else DEFAULT_BUDGET_CPU
    lens_list = [int(x) for x in cap_lens.tolist()]
    out = img.new_empty(n_i, cap.shape[0])
    for cols, Lg, i0, i1 in iter_blocks(lens_list, n_i, R, d, attn_type, img.element_size(),
                                        memory_budget, LIVE_WIDE_BUFFERS):
        cidx = torch.tensor(cols, device=cap.device)
        q, ql, c, cl = _sources(img[i0:i1], cap.index_select(0, cidx)[:, :Lg], cap_lens[cols], attn_type)
        lq = Lg if attn_type == "t2i" else R
        s = _block_scores(q, ql, c, cl, params, regulator, steps, smooth, lq)
        out[i0:i1, cidx] = s if attn_type == "t2i" else s.t()
    return out
