"""What the fused backends ("triton", "cpp", "cuda") share: the block pipeline over the pair
grid, the pieces, and the autograd of their ops.

A fused backend supplies four ops with one contract (csrc/README.md): ``attention`` (the
adaptive attention, fused with the alignment projection when given a weight),
``attention_bwd``, ``rar`` (T steps) and ``rar_bwd`` (one step). Per block of the pair grid
(the torch backend's blocks, rcar_fast._plan): attention + projection in one op, E (s wide) out;
RCR's shared-weight MLP in plain torch (so F is materialised per pair); RAR in one op for all T
steps of only_rar, one per step in coop_rcar or in training (dropout keep-masks drawn here).

Autograd: rcar_scores recomputes each block of the pair grid in backward (block-level
activation checkpointing), so a training step's peak memory is one block's intermediates,
bounded by memory_budget, not the whole batch's. Inside a block the ops save only their inputs.
The attention backward is one op. RAR's backward runs the
one-step backward op from the last step to the first (the steps' inputs h are recomputed with
the forward op, s wide per pair) and builds the shared-weight gradients from its s-wide outputs
with one GEMM each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.utils.checkpoint

from ._plan import iter_blocks
from .dropout import rar_keep_masks
from .torch_backend import _needs_grad, rcr_step
from .torch_backend import _zero_padded_queries as _zero_padded

Tensor = torch.Tensor
EPS = 1e-8
#: d-wide (B, P, Lq, d) buffers alive at once: F and the new F being built
LIVE_WIDE_BUFFERS = 3
#: the same under autograd, where a block's recompute in backward keeps what its backward needs
#: (F, RCR's pre-activations, the factor gradients): measured with the CPU allocator's profile,
#: coop_rcar T = 2, 8 x 48 pairs, d 256 (tests/test_memory.py)
LIVE_WIDE_BUFFERS_TRAIN = 6


def _valid(lens: Tensor, n: int) -> Tensor:
    return torch.arange(n, device=lens.device)[None, :] < lens[:, None]


# ----------------------------------------------------------------------------- fakes and autograd

def attention_fake(query, qlens, context, clens, factors, lam, lam_scalar, weight, bias):
    width = query.shape[2] if weight is None else weight.shape[0]
    return query.new_empty(context.shape[0], query.shape[0], query.shape[1], width)


def attention_bwd_fake(grad, query, qlens, context, clens, factors, lam, lam_scalar, weight, bias,
                       need_dfactors):
    P, Lq, D = query.shape
    B, Lc = context.shape[0], context.shape[1]
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32

    def new(*shape):
        return query.new_empty(shape, dtype=acc)
    return (new(P, Lq, D), new(B, Lc, D), new(B, P, Lq, D) if factors is not None and need_dfactors else new(0),
            new(B, P, Lq) if lam is not None else new(0),
            new(weight.shape[0], D) if weight is not None else new(0),
            new(weight.shape[0]) if weight is not None else new(0))


def rar_fake(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g):
    return E.new_empty(E.shape[0], E.shape[1], E.shape[3])


def rar_bwd_fake(grad, E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g):
    B, P, Lq, S = E.shape
    acc = torch.float64 if E.dtype == torch.float64 else torch.float32

    def new(*shape):
        return E.new_empty(shape, dtype=acc)
    return new(B, P, Lq, S), new(B, P, S), new(B, P, Lq, S), new(B, P, S), new(B, P, S)


def rcr_fake(E, qlens, factors, lam, lam_scalar, w1, b1, w2, b2, ws1, bs1, ws2, bs2):
    B, P, Lq, _ = E.shape
    return E.new_empty(B, P, Lq, w2.shape[0]), E.new_empty(B, P, Lq)


def register_attention_autograd(op, bwd_op) -> None:
    """Autograd for an ``attention`` op: save its inputs, call ``bwd_op`` in backward."""
    def setup_context(ctx, inputs, output):
        query, qlens, context, clens, factors, lam, lam_scalar, weight, bias = inputs
        ctx.lam_scalar = lam_scalar
        ctx.save_for_backward(query, qlens, context, clens, factors, lam, weight, bias)

    def backward(ctx, grad):
        query, qlens, context, clens, factors, lam, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dc, df, dlam, dw, db = bwd_op(grad.contiguous(), query, qlens, context, clens, factors, lam,
                                          ctx.lam_scalar, weight, bias, bool(need[4]))

        def cast(g, like, i):
            return g.to(like.dtype) if like is not None and need[i] else None
        # one entry per input: query, qlens, context, clens, factors, lam, lam_scalar, weight, bias
        return (cast(dq, query, 0), None, cast(dc, context, 2), None, cast(df, factors, 4),
                cast(dlam, lam, 5), None, cast(dw, weight, 7), cast(db, bias, 8))

    op.register_autograd(backward, setup_context=setup_context)


def _mean_start(E: Tensor, qlens: Tensor) -> Tensor:
    """RAR's first h: the mean of E over each pair's valid rows (fp32 sums, fp64 for fp64), in
    E's dtype."""
    acc = torch.float64 if E.dtype == torch.float64 else torch.float32
    Ev = torch.where(_valid(qlens, E.shape[2])[None, :, :, None], E, E.new_zeros(()))
    return (Ev.to(acc).sum(2) / qlens.to(acc)[None, :, None]).to(E.dtype)


def rar_backward(rar_op, rar_bwd_op, grad, E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g, need):
    """Gradients of ``rar_op``'s inputs (None where not needed): the steps' inputs h are
    recomputed with ``rar_op`` (s wide per pair), then ``rar_bwd_op`` runs from the last step to
    the first; dWk = sum dKp^T E, dWq = sum dgp^T h, dbk, dbq, dwv sums, dbv = 0 exactly (a
    softmax's input gradients sum to zero)."""
    T, S = wq.shape[0], E.shape[3]
    acc = torch.float64 if E.dtype == torch.float64 else torch.float32
    hs = [h0 if h0 is not None else _mean_start(E, qlens)]
    for t in range(T - 1):
        hs.append(rar_op(E, qlens, hs[-1], wq[t:t + 1], bq[t:t + 1], wk[t:t + 1], bk[t:t + 1],
                         wv[t:t + 1], bv[t:t + 1], None, None))
    E2 = torch.where(_valid(qlens, E.shape[2])[None, :, :, None], E, E.new_zeros(())).to(acc).reshape(-1, S)
    grads = {k: torch.zeros(w.shape, dtype=acc, device=E.device)
             for k, w in (("wq", wq), ("bq", bq), ("wk", wk), ("bk", bk), ("wv", wv), ("bv", bv))}
    dE_sum = torch.zeros(E.shape, dtype=acc, device=E.device)
    g = grad.contiguous()
    for t in reversed(range(T)):
        dE, dh, dKp, dgp, dwv = rar_bwd_op(g, E, qlens, hs[t].contiguous(), wq[t:t + 1], bq[t:t + 1],
                                           wk[t:t + 1], bk[t:t + 1], wv[t:t + 1], bv[t:t + 1],
                                           keep_k, keep_g)
        dE, dh, dKp, dgp, dwv = (x.to(acc) for x in (dE, dh, dKp, dgp, dwv))
        dE_sum += dE
        dKp2 = dKp.reshape(-1, S)
        grads["wk"][t] = dKp2.t() @ E2
        grads["bk"][t] = dKp2.sum(0)
        dgp2 = dgp.reshape(-1, S)
        grads["wq"][t] = dgp2.t() @ hs[t].to(acc).reshape(-1, S)
        grads["bq"][t] = dgp2.sum(0)
        grads["wv"][t] = dwv.reshape(-1, S).sum(0)
        g = dh.to(E.dtype).contiguous() if t > 0 else dh
    dh0 = None
    if h0 is None:      # h0 = the mean of E over valid rows
        valid = _valid(qlens, E.shape[2])[None, :, :, None]
        dE_sum += torch.where(valid, (g / qlens.to(acc)[None, :, None])[:, :, None, :], dE_sum.new_zeros(()))
    else:
        dh0 = g
    out = [dE_sum, None, dh0, grads["wq"], grads["bq"], grads["wk"], grads["bk"], grads["wv"], grads["bv"],
           None, None]
    like = [E, None, h0, wq, bq, wk, bk, wv, bv, None, None]
    return tuple(o.to(l.dtype) if o is not None and need[i] else None
                 for i, (o, l) in enumerate(zip(out, like)))


def register_rar_autograd(op, bwd_op, fwd_op=None) -> None:
    """Autograd for a ``rar`` op through ``bwd_op`` (one step), see :func:`rar_backward`;
    ``fwd_op`` (default ``op``) recomputes the steps' inputs."""
    fwd_op = op if fwd_op is None else fwd_op
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        return rar_backward(fwd_op, bwd_op, grad, *ctx.saved_tensors, ctx.needs_input_grad)

    op.register_autograd(backward, setup_context=setup_context)


# ----------------------------------------------------------------------------- the pieces

@dataclass(frozen=True)
class FusedOps:
    """One backend's forward ops (autograd registered on them); ``rcr``: an optional fused RCR
    step for inference (no autograd) on ``rcr_device`` tensors, else RCR runs in torch."""
    attention: Callable
    rar: Callable
    default_budget_cpu: int
    default_budget_gpu: int
    rcr: Optional[Callable] = None
    rcr_device: str = "cpu"

    def rcr_step(self, E, ql, Fq, lam, params, prefix, inplace):
        """(F, lam) after one RCR step, block layout; the fused op where it applies."""
        if self.rcr is None or not inplace or E.device.type != self.rcr_device:
            return rcr_step(E, Fq, lam, params, prefix, inplace)
        lam_t = lam if isinstance(lam, Tensor) else None
        lam_s = 0.0 if isinstance(lam, Tensor) else float(lam)

        def w(name):
            return params[prefix + name].contiguous()
        return self.rcr(E, ql, Fq, lam_t, lam_s, w("rcr_matrix_w.0.weight"), w("rcr_matrix_w.0.bias"),
                        w("rcr_matrix_w.2.weight"), w("rcr_matrix_w.2.bias"), w("rcr_smooth_w.0.weight"),
                        w("rcr_smooth_w.0.bias"), w("rcr_smooth_w.2.weight"), w("rcr_smooth_w.2.bias"))

    def attention_call(self, q, ql, c, cl, factors, lam, weight=None, bias=None):
        lam_t = lam if isinstance(lam, Tensor) else None
        lam_s = 0.0 if isinstance(lam, Tensor) else float(lam)
        return self.attention(q, ql, c, cl, factors, lam_t, lam_s, weight, bias)


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


def _state(x, attn_type):
    """F or lam in block layout, contiguous (the compiled ops need it); a float stays a float."""
    x = _block(x, attn_type)
    return x.contiguous() if isinstance(x, Tensor) else x


def adaptive_attention(ops: FusedOps, img, cap, cap_lens, factors, temperatures, attn_type):
    q, ql, c, cl = _sources(img, cap, cap_lens, attn_type)
    A = ops.attention_call(q, ql, c, cl, _state(factors, attn_type), _state(temperatures, attn_type))
    return _unblock(A, attn_type)


def alignment(ops: FusedOps, img, cap, cap_lens, weight, bias, factors, temperatures, attn_type):
    q, ql, c, cl = _sources(img, cap, cap_lens, attn_type)
    E = ops.attention_call(q, ql, c, cl, _state(factors, attn_type), _state(temperatures, attn_type),
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


def _keep_masks(step: int, E: Tensor, pairs):
    """RAR step ``step``'s dropout keep-masks (scaled by 1/(1-p), rcar_fast.dropout) for the
    block's pairs = (global image indices, global caption indices, attn_type), block layout."""
    images, captions, attn_type = pairs
    keep_k, keep_g = rar_keep_masks(step, images, captions, E.shape[2], E.shape[3], E.dtype, E.device)
    if attn_type == "i2t":      # pair grid (images, captions) -> block (captions, images)
        keep_k, keep_g = keep_k.transpose(0, 1), keep_g.transpose(0, 1)
    return keep_k.contiguous(), keep_g.contiguous()


def _rar_steps(ops: FusedOps, E, ql, h, stacked, training, first_step=0, pairs=None):
    """RAR over the modules of ``stacked`` (from :func:`_rar_weights`; their step numbers start
    at ``first_step``): one launch for all of them in eval, one per step in training (each step
    applies its own dropout masks for ``pairs``, see :func:`_keep_masks`)."""
    if not training:
        return ops.rar(E, ql, h, *stacked, None, None)
    for t in range(stacked[0].shape[0]):
        h = ops.rar(E, ql, h, *(w[t:t + 1] for w in stacked), *_keep_masks(first_step + t, E, pairs))
    return h


def rar_update(ops: FusedOps, E, h, cap_lens, weights, attn_type, training):
    Eb = _block(E, attn_type)
    B, P, Lq, _ = Eb.shape
    ql = cap_lens.to(device=E.device, dtype=torch.int32) if attn_type == "t2i" else \
        torch.full((P,), Lq, dtype=torch.int32, device=E.device)
    pairs = (torch.arange(E.shape[0]), torch.arange(E.shape[1]), attn_type)
    out = _rar_steps(ops, Eb.contiguous(), ql, _state(h, attn_type), _rar_weights(weights, [""]), training,
                     0, pairs)
    return _unblock(out, attn_type)


# ----------------------------------------------------------------------------- the scores

def _block_scores(ops: FusedOps, q, ql, c, cl, params, rar_w, regulator, steps, smooth, training, inplace,
                  pairs=None):
    """SPEC.md's scores of one block, (B, P); rar_w: every RAR module's weights, stacked once;
    pairs: the block's (global image indices, global caption indices, attn_type), naming the
    dropout masks in training."""
    Fq, lam = None, smooth

    def align(t):
        return ops.attention_call(q, ql, c, cl, Fq, lam, params[f"alv_modules.{t}.sim_transform_w.weight"],
                                  params[f"alv_modules.{t}.sim_transform_w.bias"])

    if regulator == "only_rcr":
        for t in range(steps):
            Fq, lam = ops.rcr_step(align(t), ql, Fq, lam, params, f"rcr_modules.{t}.", inplace)
        A = ops.attention_call(q, ql, c, cl, Fq, lam)                    # rows past qlen are 0
        valid = _valid(ql, q.shape[1])                                    # (P, Lq)
        Qv = torch.where(valid[..., None], q, q.new_zeros(()))
        num = (A * Qv[None]).sum(-1)
        den = torch.linalg.vector_norm(A, dim=-1) * torch.linalg.vector_norm(Qv, dim=-1)[None]
        cos = torch.where(valid[None], num / torch.clamp(den, min=EPS), num.new_zeros(()))
        return cos.sum(-1) / ql.to(cos.dtype)[None]
    if regulator == "only_rar":
        h = _rar_steps(ops, align(0), ql, None, rar_w, training, 0, pairs)
    else:
        h = None
        for t in range(steps):
            E = align(t)
            if t < steps - 1:
                Fq, lam = ops.rcr_step(E, ql, Fq, lam, params, f"rcr_modules.{t}.", inplace)
            h = _rar_steps(ops, E, ql, h, tuple(w[t:t + 1] for w in rar_w), training, t, pairs)
    return torch.sigmoid(torch.nn.functional.linear(h, params["sim_eval_w.weight"],
                                                    params["sim_eval_w.bias"])).squeeze(-1)


def _cut_block_scores(ops, img, cap, lens, i0, i1, cidx, Lg, attn_type, params, rar_w, regulator, steps, smooth,
                      training, inplace):
    """:func:`_block_scores` of the block img[i0:i1] x cap[cidx, :Lg], cut here, inside the
    checkpointed function, so that autograd saves the whole inputs once (by reference), not a
    copy of every block's captions."""
    q, ql, c, cl = _sources(img[i0:i1].contiguous(), cap.index_select(0, cidx)[:, :Lg].contiguous(),
                            lens.index_select(0, cidx), attn_type)
    return _block_scores(ops, q, ql, c, cl, params, rar_w, regulator, steps, smooth, training, inplace,
                         (torch.arange(i0, i1), cidx, attn_type))


def rcar_scores(ops: FusedOps, img: Tensor, cap: Tensor, cap_lens: Tensor, params: Mapping[str, Tensor],
                regulator: str, steps: int, attn_type: str, smooth: float, training: bool,
                memory_budget: Optional[int] = None) -> Tensor:
    n_i, R, d = img.shape
    if memory_budget is None:
        memory_budget = ops.default_budget_gpu if img.is_cuda else ops.default_budget_cpu
    inplace = not _needs_grad([img, cap, *params.values()])
    lens_list = [int(x) for x in cap_lens.tolist()]
    lens_dev = cap_lens.to(cap.device)
    out = img.new_empty(n_i, cap.shape[0])
    # the RAR weights are stacked (T, ...) once per call, not once per block
    rar_w = None if regulator == "only_rcr" else _rar_weights(params, [f"rar_modules.{t}." for t in range(steps)])
    for cols, Lg, i0, i1 in iter_blocks(lens_list, n_i, R, d, attn_type, img.element_size(),
                                        memory_budget, LIVE_WIDE_BUFFERS if inplace else LIVE_WIDE_BUFFERS_TRAIN):
        cidx = torch.tensor(cols, device=cap.device)
        block_args = (ops, img, cap, lens_dev, i0, i1, cidx, Lg, attn_type, params, rar_w, regulator, steps,
                      smooth, training)
        if inplace:
            s = _cut_block_scores(*block_args, True)
        else:
            # autograd: the block is recomputed in backward, so no block keeps its intermediates
            # (d-wide F, RCR's activations) alive until the backward pass; the peak is one
            # block's, set by memory_budget, and the RNG state is replayed (same dropout masks)
            s = torch.utils.checkpoint.checkpoint(_cut_block_scores, *block_args, False,
                                                  use_reentrant=False, preserve_rng_state=True)
        out[i0:i1, cidx] = s if attn_type == "t2i" else s.t()
    return out


def pieces(ops: FusedOps):
    """The pieces a backend module exposes (adaptive_attention, alignment, rcr_update,
    rar_update, rcar_scores, in the signatures rcar_fast.ops calls), bound to its ``ops``."""
    return (functools.partial(adaptive_attention, ops), functools.partial(alignment, ops), rcr_update,
            functools.partial(rar_update, ops), functools.partial(rcar_scores, ops))
