"""The "triton" backend: fused Triton kernels (kernels/, installed as rcar_fast.kernels).

Per block of the pair grid (same blocks as the torch backend, see rcar_fast._plan):
  attention + alignment projection: one fused launch (kernels/attention.py), E (s wide) out,
      the d-wide attended context never stored;
  RAR: one launch for all T steps of only_rar, one per step in coop_rcar or in training
      (kernels/rar.py); dropout keep-masks are drawn here and passed in;
  RCR: its shared-weight MLP in plain torch (not fused yet): F is materialised per pair.

The kernels are wrapped as torch.library custom ops (``rcar_fast::triton_attention``,
``rcar_fast::triton_rar``) with register_fake (torch.compile traces them) and register_autograd.
Backward: the attention's is a kernel (kernels/attention_bwd.py) that recomputes each pair on
chip from the saved inputs; RAR's is not a kernel yet: it recomputes its block in
differentiable torch from the saved inputs and differentiates that. Only the ops' inputs are
saved, so the forward's intermediates never pile up in the autograd graph.
On CPU tensors the kernels run only under TRITON_INTERPRET=1 (the test tier).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

import torch

from ._plan import iter_blocks
from .torch_backend import RAR_DROPOUT, _needs_grad, rcr_step
from .torch_backend import _zero_padded_queries as _zero_padded

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


# ----------------------------------------------------------------------------- custom ops

def _valid(lens: Tensor, n: int) -> Tensor:
    return torch.arange(n, device=lens.device)[None, :] < lens[:, None]


@torch.library.custom_op("rcar_fast::triton_attention", mutates_args=())
def triton_attention(query: Tensor, qlens: Tensor, context: Tensor, clens: Tensor,
                     factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
                     weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """Fused adaptive attention over every (b, p) pair, block layout (see kernels/attention.py):
    query (P, Lq, d), qlens (P,) int32, context (B, Lc, d), clens (B,) int32, factors None or
    (B, P, Lq, d), lam None (use lam_scalar) or (B, P, Lq); weight (s, d) and bias (s,) given:
    E (B, P, Lq, s), else l2n(A) (B, P, Lq, d). Rows past a query length are zero."""
    return _kernels().attention_fwd(query, qlens, context, clens, factors,
                                    lam_scalar if lam is None else lam, weight, bias)


@triton_attention.register_fake
def _(query, qlens, context, clens, factors, lam, lam_scalar, weight, bias):
    width = query.shape[2] if weight is None else weight.shape[0]
    return query.new_empty(context.shape[0], query.shape[0], query.shape[1], width)


def _attention_setup(ctx, inputs, output):
    query, qlens, context, clens, factors, lam, lam_scalar, weight, bias = inputs
    ctx.lam_scalar = lam_scalar
    ctx.save_for_backward(query, qlens, context, clens, factors, lam, weight, bias)


@torch.library.custom_op("rcar_fast::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(grad: Tensor, query: Tensor, qlens: Tensor, context: Tensor, clens: Tensor,
                         factors: Optional[Tensor], lam: Optional[Tensor], lam_scalar: float,
                         weight: Optional[Tensor], bias: Optional[Tensor],
                         need_dfactors: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel (kernels/attention_bwd.py), recomputing each pair on chip. Returns
    fp32 (dquery, dcontext, dfactors, dlam, dweight, dbias); an absent one is an empty tensor."""
    outs = _kernels().attention_bwd(grad, query, qlens, context, clens, factors,
                                    lam_scalar if lam is None else lam, weight, bias, need_dfactors)
    return tuple(query.new_empty(0, dtype=torch.float32) if o is None else o.contiguous() for o in outs)


@triton_attention_bwd.register_fake
def _(grad, query, qlens, context, clens, factors, lam, lam_scalar, weight, bias, need_dfactors):
    P, Lq, D = query.shape
    B, Lc = context.shape[0], context.shape[1]

    def f32(*shape):
        return query.new_empty(shape, dtype=torch.float32)
    return (f32(P, Lq, D), f32(B, Lc, D), f32(B, P, Lq, D) if factors is not None and need_dfactors else f32(0),
            f32(B, P, Lq) if lam is not None else f32(0),
            f32(weight.shape[0], D) if weight is not None else f32(0),
            f32(weight.shape[0]) if weight is not None else f32(0))


def _attention_backward(ctx, grad):
    query, qlens, context, clens, factors, lam, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dc, df, dlam, dw, db = triton_attention_bwd(grad, query, qlens, context, clens, factors, lam,
                                                    ctx.lam_scalar, weight, bias, bool(need[4]))

    def cast(g, like, i):
        return g.to(like.dtype) if like is not None and need[i] else None
    # one entry per input: query, qlens, context, clens, factors, lam, lam_scalar, weight, bias
    return (cast(dq, query, 0), None, cast(dc, context, 2), None, cast(df, factors, 4),
            cast(dlam, lam, 5), None, cast(dw, weight, 7), cast(db, bias, 8))


triton_attention.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("rcar_fast::triton_rar", mutates_args=())
def triton_rar(E: Tensor, qlens: Tensor, h0: Optional[Tensor], wq: Tensor, bq: Tensor, wk: Tensor,
               bk: Tensor, wv: Tensor, bv: Tensor, keep_k: Optional[Tensor],
               keep_g: Optional[Tensor]) -> Tensor:
    """T = wq.shape[0] RAR steps on every pair of E (B, P, Lq, s), see kernels/rar.py:
    h0 None (the mean of E) or (B, P, s); keep_k (B, P, Lq, s), keep_g (B, P, s): dropout
    keep-masks scaled by 1/(1-p), for T = 1. Returns h (B, P, s)."""
    return _kernels().rar_fwd(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g)


@triton_rar.register_fake
def _(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g):
    return E.new_empty(E.shape[0], E.shape[1], E.shape[3])


def _rar_torch(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g):
    """triton_rar in differentiable torch (the backward recomputes through this)."""
    qmask = _valid(qlens, E.shape[2])[None]                               # (1, P, Lq)
    E = torch.where(qmask[..., None], E, E.new_zeros(()))
    h = E.sum(2) / qlens.to(E.dtype)[None, :, None] if h0 is None else h0
    for t in range(wq.shape[0]):
        K = torch.tanh(torch.nn.functional.linear(E, wk[t], bk[t]))
        g = torch.tanh(torch.nn.functional.linear(h, wq[t], bq[t]))
        if keep_k is not None:
            K, g = K * keep_k, g * keep_g
        logit = (K * g.unsqueeze(2)) @ wv[t] + bv[t]
        a = torch.softmax(torch.where(qmask, logit, logit.new_full((), float("-inf"))), dim=-1)
        h = torch.matmul(a.unsqueeze(2), E).squeeze(2)
        h = h / (torch.linalg.vector_norm(h, dim=-1, keepdim=True) + EPS)
    return h


def _register_recompute_backward(op, torch_fn, n_inputs: int):
    """Autograd for ``op``: save its inputs, recompute ``torch_fn`` on them in backward."""
    def setup_context(ctx, inputs, output):
        ctx.scalars = {i: v for i, v in enumerate(inputs) if not isinstance(v, Tensor)}
        ctx.save_for_backward(*[v if isinstance(v, Tensor) else None for v in inputs])

    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        for i, v in ctx.scalars.items():
            saved[i] = v
        wants = [i for i, v in enumerate(saved) if isinstance(v, Tensor) and ctx.needs_input_grad[i]]
        with torch.enable_grad():
            leaves = list(saved)
            for i in wants:
                leaves[i] = saved[i].detach().requires_grad_(True)
            out = torch_fn(*leaves)
            got = torch.autograd.grad(out, [leaves[i] for i in wants], grad, allow_unused=True)
        grads = [None] * n_inputs
        for i, g in zip(wants, got):
            grads[i] = g
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)


_register_recompute_backward(triton_rar, _rar_torch, 11)


# ----------------------------------------------------------------------------- the pieces

def _sources(img: Tensor, cap: Tensor, cap_lens: Tensor, attn_type: str):
    """(query, qlens, context, clens) in block layout; lengths as int32 on the features' device."""
    dev = img.device
    lens = cap_lens.to(device=dev, dtype=torch.int32)
    regions = torch.full((img.shape[0],), img.shape[1], dtype=torch.int32, device=dev)
    return (cap, lens, img, regions) if attn_type == "t2i" else (img, regions, cap, lens)


def _block(x, attn_type):
    return x.transpose(0, 1) if isinstance(x, Tensor) and attn_type == "i2t" else x


def _unblock(x: Tensor, attn_type: str) -> Tensor:
    return x.transpose(0, 1).contiguous() if attn_type == "i2t" else x


def _attention_call(q, ql, c, cl, factors, lam, weight=None, bias=None):
    lam_t = lam if isinstance(lam, Tensor) else None
    lam_s = 0.0 if isinstance(lam, Tensor) else float(lam)
    return triton_attention(q, ql, c, cl, factors, lam_t, lam_s, weight, bias)


def adaptive_attention(img, cap, cap_lens, factors, temperatures, attn_type):
    q, ql, c, cl = _sources(img, cap, cap_lens, attn_type)
    A = _attention_call(q, ql, c, cl, _block(factors, attn_type), _block(temperatures, attn_type))
    return _unblock(A, attn_type)


def alignment(img, cap, cap_lens, weight, bias, factors, temperatures, attn_type):
    q, ql, c, cl = _sources(img, cap, cap_lens, attn_type)
    E = _attention_call(q, ql, c, cl, _block(factors, attn_type), _block(temperatures, attn_type),
                        weight.contiguous(), bias.contiguous())
    return _unblock(E, attn_type)


def rcr_update(E, factors, temperatures, cap_lens, weights, attn_type):
    inplace = not _needs_grad([E, factors, temperatures, *weights.values()])
    E = _zero_padded(E, cap_lens, attn_type)
    if factors is not None:
        factors = _zero_padded(factors, cap_lens, attn_type)
    if isinstance(temperatures, Tensor):
        temperatures = _zero_padded(temperatures, cap_lens, attn_type)
    Fn, lam = rcr_step(E, factors, temperatures, weights, "", inplace)
    return _zero_padded(Fn, cap_lens, attn_type), _zero_padded(lam, cap_lens, attn_type)


def _rar_weights(params: Mapping[str, Tensor], prefixes):
    def stack(name):
        return torch.stack([params[p + name] for p in prefixes]).contiguous()
    return (stack("rar_q_w.0.weight"), stack("rar_q_w.0.bias"), stack("rar_k_w.0.weight"),
            stack("rar_k_w.0.bias"), stack("rar_v_w.0.weight").flatten(1), stack("rar_v_w.0.bias").flatten())


def _keep_masks(E: Tensor, training: bool):
    """Dropout keep-masks for one RAR step (scaled by 1/(1-p)), or (None, None) in eval."""
    if not training:
        return None, None
    scale = 1.0 / (1.0 - RAR_DROPOUT)
    B, P, Lq, S = E.shape
    keep_k = (torch.rand(B, P, Lq, S, device=E.device) >= RAR_DROPOUT).to(E.dtype) * scale
    keep_g = (torch.rand(B, P, S, device=E.device) >= RAR_DROPOUT).to(E.dtype) * scale
    return keep_k, keep_g


def _rar_steps(E, ql, h, stacked, training):
    """RAR over the modules of ``stacked`` (from :func:`_rar_weights`): one launch for all of
    them in eval, one per step in training (each step draws its own dropout masks)."""
    if not training:
        return triton_rar(E, ql, h, *stacked, None, None)
    for t in range(stacked[0].shape[0]):
        h = triton_rar(E, ql, h, *(w[t:t + 1] for w in stacked), *_keep_masks(E, True))
    return h


def rar_update(E, h, cap_lens, weights, attn_type, training):
    Eb = _block(E, attn_type)
    B, P, Lq, _ = Eb.shape
    ql = cap_lens.to(device=E.device, dtype=torch.int32) if attn_type == "t2i" else \
        torch.full((P,), Lq, dtype=torch.int32, device=E.device)
    out = _rar_steps(Eb.contiguous(), ql, _block(h, attn_type), _rar_weights(weights, [""]), training)
    return _unblock(out, attn_type)


# ----------------------------------------------------------------------------- the scores

def _block_scores(q, ql, c, cl, params, rar_w, regulator, steps, smooth, training, inplace):
    """SPEC.md's scores of one block, (B, P); rar_w: every RAR module's weights, stacked once."""
    Fq, lam = None, smooth

    def align(t):
        return _attention_call(q, ql, c, cl, Fq, lam, params[f"alv_modules.{t}.sim_transform_w.weight"],
                               params[f"alv_modules.{t}.sim_transform_w.bias"])

    if regulator == "only_rcr":
        for t in range(steps):
            Fq, lam = rcr_step(align(t), Fq, lam, params, f"rcr_modules.{t}.", inplace)
        A = _attention_call(q, ql, c, cl, Fq, lam)                       # rows past qlen are 0
        valid = _valid(ql, q.shape[1])                                    # (P, Lq)
        Qv = torch.where(valid[..., None], q, q.new_zeros(()))
        num = (A * Qv[None]).sum(-1)
        den = torch.linalg.vector_norm(A, dim=-1) * torch.linalg.vector_norm(Qv, dim=-1)[None]
        cos = torch.where(valid[None], num / torch.clamp(den, min=EPS), num.new_zeros(()))
        return cos.sum(-1) / ql.to(cos.dtype)[None]
    if regulator == "only_rar":
        h = _rar_steps(align(0), ql, None, rar_w, training)
    else:
        h = None
        for t in range(steps):
            E = align(t)
            if t < steps - 1:
                Fq, lam = rcr_step(E, Fq, lam, params, f"rcr_modules.{t}.", inplace)
            h = _rar_steps(E, ql, h, tuple(w[t:t + 1] for w in rar_w), training)
    return torch.sigmoid(torch.nn.functional.linear(h, params["sim_eval_w.weight"],
                                                    params["sim_eval_w.bias"])).squeeze(-1)


def rcar_scores(img: Tensor, cap: Tensor, cap_lens: Tensor, params: Mapping[str, Tensor],
                regulator: str, steps: int, attn_type: str, smooth: float, training: bool,
                memory_budget: Optional[int] = None) -> Tensor:
    n_i, R, d = img.shape
    if memory_budget is None:
        memory_budget = DEFAULT_BUDGET_GPU if img.is_cuda else DEFAULT_BUDGET_CPU
    inplace = not _needs_grad([img, cap, *params.values()])
    lens_list = [int(x) for x in cap_lens.tolist()]
    out = img.new_empty(n_i, cap.shape[0])
    # the RAR weights are stacked (T, ...) once per call, not once per block
    rar_w = None if regulator == "only_rcr" else _rar_weights(params, [f"rar_modules.{t}." for t in range(steps)])
    for cols, Lg, i0, i1 in iter_blocks(lens_list, n_i, R, d, attn_type, img.element_size(),
                                        memory_budget, LIVE_WIDE_BUFFERS):
        cidx = torch.tensor(cols, device=cap.device)
        q, ql, c, cl = _sources(img[i0:i1], cap.index_select(0, cidx)[:, :Lg], cap_lens[cols], attn_type)
        s = _block_scores(q, ql, c, cl, params, rar_w, regulator, steps, smooth, training, inplace)
        out[i0:i1, cidx] = s if attn_type == "t2i" else s.t()
    return out
