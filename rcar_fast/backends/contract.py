"""The backend contract: a :class:`KernelSet` is what every backend (torch, triton, cpp, cuda)
gives the pipeline, and the fakes and autograd its registered ops share.

The ops work on one block of the pair grid in block layout (ARCHITECTURE.md): B indexes the
context side, P the query side; t2i: B = images, P = captions, i2t the other way round.

  attention(query (P, Lq, d), qlens (P,) int32, context (B, Lc, d), clens (B,) int32,
            factors None | (B, P, Lq, d), lam None | (B, P, Lq), lam_scalar float,
            weight None | (s, d), bias None | (s,))
      weight None: l2n(A(Q, C, F, lam)) (B, P, Lq, d); else the alignment vectors
      E = l2n(W (Q - A)^2 + b) (B, P, Lq, s). factors None is F = 1; lam None is lam_scalar at
      every position. Rows at or past a pair's query length are zero.
      context_index (optional, the last argument, default None) None | (P,) int32: the PAIRED
      form for pair lists. Query item p is then one pair of its own and attends to context item
      context_index[p] only: the output (and factors, lam) are (1, P, Lq, width), and the
      backward accumulates each pair's dcontext into row context_index[p] (an index may repeat).
      The caller gathers the query side per pair and indexes the context side: in the paired
      form the query is per pair anyway (its factors and lam are), while a context item serves
      every pair that names it (pipeline.pair_scores).
      gram (after context_index; only where the kernel set has ``context_gram``) None |
      context_gram(context, clens): the context items' Gram matrices, made once for several
      calls on the same context (pipeline: once per call for the t2i grid's images, else once
      per block) instead of once per launch; inference only, the backward recomputes them.
  rar(E (B, P, Lq, s), qlens, h0 None | (B, P, s), wq (T, s, s), bq (T, s), wk (T, s, s),
      bk (T, s), wv (T, s), bv (T,), keep_k None | (B, P, Lq, s), keep_g None | (B, P, s))
      T RAR steps from h0 (None: the mean of E over the valid rows); keep_k/keep_g are dropout
      keep-masks scaled by 1/(1-p) for one step (T = 1). Returns h (B, P, s).
  rcr (optional; inference only)  (E, qlens, factors, lam, lam_scalar, w1, b1, w2, b2, ws1,
      bs1, ws2, bs2) -> (F (B, P, Lq, d), lam (B, P, Lq)): one fused RCR step.

Both attention and rar are differentiable: either plain torch (autograd differentiates it) or a
registered custom op whose backward calls ``attention_bwd`` / ``rar_bwd`` (csrc/README.md gives
their contract), wired by :func:`register_attention_autograd` / :func:`register_rar_autograd`.
Inputs reach the ops already checked (rcar_fast.validate): the ops trust them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Mapping, Optional, Tuple

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class KernelSet:
    """One backend's kernels (the module docstring gives the op signatures).

    name, devices: the backend's name and the device types its tensors may be on.
    budgets: default memory budget of one block of the pair grid, bytes, per device type.
    live_buffers, live_buffers_train: how many d-wide (B, P, Lq, d) buffers one block keeps
    alive at once without and with autograd; the block planner divides the budget by them.
    rcr, rcr_devices: an optional fused RCR step for inference, on those device types.
    rcr_recompute: under autograd, RCR's step saves only its inputs and is recomputed in the
    backward (rcar_fast.torch_math.rcr_step_recomputed) instead of torch autograd's saved
    activations (three d-wide buffers per block); the fused backends set it, the torch backend
    (plain PyTorch) keeps autograd's.
    rcr_factors_bwd: optional, on rcr_devices: that backward's d-wide chain as one kernel,
    (hidden (n, 2s), w2, b2, factors None | (n, d), grad (n, d), dfactors None | (n, d)) -> gm
    (kernels/rcr.py rcr_factors_bwd; the extension's rcr_factors_bwd op for cpp and cuda, csrc/README.md);
    without it the chain runs as torch ops.
    workspace: a context manager the pipeline enters around the blocks of one call (buffers
    reused from block to block live for its duration).
    context_gram: optional, on ``devices``: (context, clens) -> what the attention's ``gram``
    argument takes (module docstring); the pipeline passes it when nothing needs a gradient.
    rar_scores: optional, on ``devices``, inference only (no dropout, no autograd): (E, qlens, h0,
    wq, bq, wk, bk, wv, bv, score_w (s,), score_b (1,), both float32) -> (B, P) float32, the
    scores sigmoid(score_w . h + score_b) of rar's last h (rounded to E's dtype first), the
    scoring layer taken in RAR's last launch (h never stored).
    attention_bwd, rar_bwd: the backward ops, where the backend has its own (None where plain
    torch autograd differentiates attention and rar)."""
    name: str
    devices: Tuple[str, ...]
    attention: Callable
    rar: Callable
    budgets: Mapping[str, int]
    live_buffers: int
    live_buffers_train: int
    attention_bwd: Optional[Callable] = None
    rar_bwd: Optional[Callable] = None
    rcr: Optional[Callable] = None
    rcr_devices: Tuple[str, ...] = ()
    rcr_recompute: bool = False
    rcr_factors_bwd: Optional[Callable] = None
    workspace: Callable[[], ContextManager] = field(default=contextlib.nullcontext)
    context_gram: Optional[Callable] = None
    rar_scores: Optional[Callable] = None

    def budget(self, device: torch.device) -> int:
        """The default memory budget of one block on ``device``: budgets[device type] (CPU:
        budgets["cpu"]); on a CUDA device that or, where more, its memory's share
        (:func:`gpu_budget`)."""
        base = self.budgets.get(device.type, self.budgets["cpu"])
        if device.type != "cuda":
            return base
        return gpu_budget(base, torch.cuda.get_device_properties(device).total_memory)


#: a block's default budget on a GPU: 1/GPU_BUDGET_SHARE of the device's memory, at least the
#: kernel set's budgets["cuda"] (2 GiB) and at most GPU_BUDGET_MAX (an H200's 139 GiB: 8 GiB).
#: Larger blocks mean fewer launches (about a dozen per block at coop_rcar T = 2; the Flickr30K matrix
#: in 227 blocks at 2 GiB, 64 at 8 GiB: bench/roofline.py)
GPU_BUDGET_SHARE = 16
GPU_BUDGET_MAX = 8 * 2**30


def gpu_budget(base: int, total_memory: int) -> int:
    """The default block budget of a GPU with ``total_memory`` bytes, at least ``base``."""
    return max(base, min(GPU_BUDGET_MAX, total_memory // GPU_BUDGET_SHARE))


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: the dtype backward ops return gradients in."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def valid_rows(lens: Tensor, n: int) -> Tensor:
    """(len(lens), n) bool: True at row q < lens[p]."""
    return torch.arange(n, device=lens.device)[None, :] < lens[:, None]


# ----------------------------------------------------------------------------- fakes

def out_items(context: Tensor, context_index: Optional[Tensor]) -> int:
    """B of the attention's output: the context items, or 1 in the paired form."""
    return context.shape[0] if context_index is None else 1


def attention_fake(query, qlens, context, clens, factors, lam, lam_scalar, weight, bias, context_index=None,
                   gram=None):
    width = query.shape[2] if weight is None else weight.shape[0]
    return query.new_empty(out_items(context, context_index), query.shape[0], query.shape[1], width)


def attention_bwd_fake(grad, query, qlens, context, clens, factors, lam, lam_scalar, weight, bias,
                       need_dfactors, context_index=None):
    P, Lq, D = query.shape
    Lc = context.shape[1]
    B = out_items(context, context_index)
    acc = accumulation_dtype(query)

    def new(*shape):
        return query.new_empty(shape, dtype=acc)
    return (new(P, Lq, D), new(context.shape[0], Lc, D), new(B, P, Lq, D) if factors is not None and need_dfactors else new(0),
            new(B, P, Lq) if lam is not None else new(0),
            new(weight.shape[0], D) if weight is not None else new(0),
            new(weight.shape[0]) if weight is not None else new(0))


def rar_fake(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g):
    return E.new_empty(E.shape[0], E.shape[1], E.shape[3])


def rar_bwd_fake(grad, E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g):
    B, P, Lq, S = E.shape
    acc = accumulation_dtype(E)

    def new(*shape):
        return E.new_empty(shape, dtype=acc)
    return new(B, P, Lq, S), new(B, P, S), new(B, P, Lq, S), new(B, P, S), new(B, P, S)


def rcr_fake(E, qlens, factors, lam, lam_scalar, w1, b1, w2, b2, ws1, bs1, ws2, bs2):
    B, P, Lq, _ = E.shape
    return E.new_empty(B, P, Lq, w2.shape[0]), E.new_empty(B, P, Lq)


# ----------------------------------------------------------------------------- autograd

def register_attention_autograd(op, bwd_op) -> None:
    """Autograd for an ``attention`` op: save its inputs, call ``bwd_op`` in backward."""
    def setup_context(ctx, inputs, output):
        query, qlens, context, clens, factors, lam, lam_scalar, weight, bias = inputs[:9]
        context_index = inputs[9] if len(inputs) > 9 else None
        ctx.lam_scalar = lam_scalar
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(query, qlens, context, clens, factors, lam, weight, bias, context_index)

    def backward(ctx, grad):
        query, qlens, context, clens, factors, lam, weight, bias, context_index = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dc, df, dlam, dw, db = bwd_op(grad.contiguous(), query, qlens, context, clens, factors, lam,
                                          ctx.lam_scalar, weight, bias, bool(need[4]), context_index)

        def cast(g, like, i):
            return g.to(like.dtype) if like is not None and need[i] else None
        # one entry per input: query, qlens, context, clens, factors, lam, lam_scalar, weight, bias,
        # context_index, and the triton op's gram (a cache of a function of the context: none)
        return (cast(dq, query, 0), None, cast(dc, context, 2), None, cast(df, factors, 4),
                cast(dlam, lam, 5), None, cast(dw, weight, 7), cast(db, bias, 8)) + (None,) * (ctx.n_inputs - 9)

    op.register_autograd(backward, setup_context=setup_context)


def mean_start(E: Tensor, qlens: Tensor) -> Tensor:
    """RAR's first h: the mean of E over each pair's valid rows (sums in fp32, fp64 for fp64),
    in E's dtype."""
    acc = accumulation_dtype(E)
    Ev = torch.where(valid_rows(qlens, E.shape[2])[None, :, :, None], E, E.new_zeros(()))
    return (Ev.to(acc).sum(2) / qlens.to(acc)[None, :, None]).to(E.dtype)


def rar_backward(rar_op, rar_bwd_op, grad, E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g, need):
    """Gradients of ``rar_op``'s inputs (None where not needed): the steps' inputs h are
    recomputed with ``rar_op`` (s wide per pair), then ``rar_bwd_op`` runs from the last step to
    the first; dWk = sum dKp^T E, dWq = sum dgp^T h, dbk, dbq, dwv sums, dbv = 0 exactly (a
    softmax's input gradients sum to zero)."""
    T, S = wq.shape[0], E.shape[3]
    acc = accumulation_dtype(E)
    hs = [h0 if h0 is not None else mean_start(E, qlens)]
    for t in range(T - 1):
        hs.append(rar_op(E, qlens, hs[-1], wq[t:t + 1], bq[t:t + 1], wk[t:t + 1], bk[t:t + 1],
                         wv[t:t + 1], bv[t:t + 1], None, None))
    E2 = torch.where(valid_rows(qlens, E.shape[2])[None, :, :, None], E, E.new_zeros(())).to(acc).reshape(-1, S)
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
        valid = valid_rows(qlens, E.shape[2])[None, :, :, None]
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


class RegisteredOp:
    """``op.register_autograd`` for an op defined in C++ by name (what custom_op objects offer)."""

    def __init__(self, name: str):
        self.name = name

    def register_autograd(self, backward, setup_context):
        torch.library.register_autograd(self.name, backward, setup_context=setup_context)
