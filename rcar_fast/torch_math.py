"""Plain-torch building blocks shared by the pipeline (RCR's shared-weight MLP, for every
backend without a fused RCR step) and the torch kernel set: l2n, tanh, Linear by name, one RCR
step (plain autograd, or :func:`rcr_step_recomputed`: saves nothing d-wide, recomputes in
backward). ``inplace`` variants overwrite their input (inference: nothing is saved for backward)."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .constants import EPS

Tensor = torch.Tensor


def l2n(x: Tensor, inplace: bool = False) -> Tensor:
    """x / (||x|| + EPS) over the last axis."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x.div_(n.add_(EPS)) if inplace else x / (n + EPS)


def tanh(x: Tensor, inplace: bool = False) -> Tensor:
    """tanh(x). On CPU as 2 sigmoid(2x) - 1: torch's float32 tanh there is ~6x slower than its
    sigmoid (measured 3.1 ms vs 0.5 ms per 1.2M floats, one core), and the absolute error stays
    ~1e-7. On other devices torch.tanh, one pass over memory where the trick takes four."""
    if x.device.type != "cpu":
        return torch.tanh_(x) if inplace else torch.tanh(x)
    if inplace:
        return torch.sigmoid_(x.mul_(2.0)).mul_(2.0).sub_(1.0)
    return torch.sigmoid(x * 2.0) * 2.0 - 1.0


def linear(x: Tensor, w: Mapping[str, Tensor], name: str) -> Tensor:
    """The Linear whose parameters are ``w[name + ".weight"]`` and ``w[name + ".bias"]``."""
    return F.linear(x, w[name + ".weight"], w[name + ".bias"])


def rcr_step(E: Tensor, factors: Optional[Tensor], lam, w: Mapping[str, Tensor], prefix: str,
             inplace: bool, out: Optional[Tensor] = None):
    """One RCR step on any (..., Lq, s) E; factors None means all ones, lam a float or a tensor:

        (F, lam) <- (clamp(tanh(rcr_matrix_w(E)) + F, -1, 1), relu(rcr_smooth_w(E) + lam)).

    ``w`` holds the module's parameters under ``prefix``. ``out``: a buffer of F's shape for the
    new factors (inference only; must not be ``factors``)."""
    hidden = tanh(linear(E, w, prefix + "rcr_matrix_w.0"), inplace)
    if out is not None:
        m = torch.addmm(w[prefix + "rcr_matrix_w.2.bias"], hidden.view(-1, hidden.shape[-1]),
                        w[prefix + "rcr_matrix_w.2.weight"].t(), out=out.view(-1, out.shape[-1])).view(out.shape)
    else:
        m = linear(hidden, w, prefix + "rcr_matrix_w.2")
    m = tanh(m, inplace)
    if factors is None:
        Fn = m.add_(1.0).clamp_(-1.0, 1.0) if inplace else torch.clamp(m + 1.0, -1.0, 1.0)
    else:
        Fn = m.add_(factors).clamp_(-1.0, 1.0) if inplace else torch.clamp(m + factors, -1.0, 1.0)
    sm = linear(tanh(linear(E, w, prefix + "rcr_smooth_w.0"), inplace), w, prefix + "rcr_smooth_w.2")
    return Fn, torch.relu(sm.squeeze(-1) + lam)


#: :func:`rcr_step_recomputed`'s backward runs its factors' branch in RCR_CHUNKS chunks of rows
#: (of at least RCR_MIN_CHUNK_ROWS rows): its d-wide temporaries (three at once) are a chunk's,
#: and a chunk's GEMMs stay large. 4: a cpp i2t training step's peak at 16 x 16 pairs is 3.1
#: d-wide buffers of the block (measured, bench.train_memory; torch's 17.0); a chunk is 22
#: launches, 11 with the kernel set's chain (KernelSet.rcr_factors_bwd)
RCR_CHUNKS = 4
RCR_MIN_CHUNK_ROWS = 256


def _chunks(rows: int):
    step = max(RCR_MIN_CHUNK_ROWS, -(-rows // RCR_CHUNKS))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


#: one RCR module's parameters by their own names, in the order the contract's ``rcr`` op takes
#: them (w1, b1, w2, b2, ws1, bs1, ws2, bs2)
RCR_NAMES = ("rcr_matrix_w.0.weight", "rcr_matrix_w.0.bias", "rcr_matrix_w.2.weight", "rcr_matrix_w.2.bias",
             "rcr_smooth_w.0.weight", "rcr_smooth_w.0.bias", "rcr_smooth_w.2.weight", "rcr_smooth_w.2.bias")


def _slope(y: Tensor) -> Tensor:
    """1 - y^2, tanh's derivative from its output y, in one pass."""
    return torch.addcmul(y.new_ones(()), y, y, value=-1.0)


class _RCRStepRecomputed(torch.autograd.Function):
    """:func:`rcr_step`'s math on (rows, s) E, saving only its inputs; the backward recomputes
    and differentiates it by hand, so a block under autograd keeps no d-wide RCR activation between
    its forward and its backward (plain autograd keeps three: tanh's output, the clamp's input,
    the hidden layer). The backward runs the temperatures' branch (s/2 wide) over every row at
    once and the factors' branch in RCR_CHUNKS chunks of rows (its d-wide temporaries a chunk's);
    the weights' gradients are accumulated over the chunks in E's dtype (addmm_: fp32 sums inside
    each product)."""

    @staticmethod
    def forward(ctx, E, factors, lam, lam_scalar, factors_bwd, *weights):
        # rcr_step in place over every row at once: F and lam are the outputs, the hidden layer
        # the only temporary; nothing here is saved but the inputs
        w = dict(zip(RCR_NAMES, weights))
        Fn, lam_out = rcr_step(E, factors, lam if lam is not None else lam_scalar, w, "", True)
        ctx.lam_scalar, ctx.factors_bwd = lam_scalar, factors_bwd
        ctx.save_for_backward(E, factors, lam, *weights)
        return Fn, lam_out

    @staticmethod
    def backward(ctx, gF, glam):
        E, factors, lam, *weights = ctx.saved_tensors
        w1, b1, w2, b2, ws1, bs1, ws2, bs2 = weights
        need = ctx.needs_input_grad
        with torch.no_grad():
            # the temperatures: lam' = relu(ws2 tanh(E ws1^T + bs1) + bs2 + lam), every row
            h2 = tanh(F.linear(E, ws1, bs1), True)
            o = F.linear(h2, ws2, bs2).squeeze(-1).add_(lam if lam is not None else ctx.lam_scalar)
            go = torch.where(o > 0, glam, glam.new_zeros(()))        # relu: where its output > 0
            del o
            gws2 = go[None, :] @ h2
            gbs2 = go.sum(0, keepdim=True)
            ga2 = (go[:, None] * ws2).mul_(_slope(h2))
            del h2
            gws1 = ga2.t() @ E
            gbs1 = ga2.sum(0)
            dE = ga2 @ ws1 if need[0] else None
            del ga2
            # the factors: F' = clamp(tanh(W2 tanh(E W1^T + b1) + b2) + F, -1, 1), by chunks
            dF = torch.empty_like(factors) if factors is not None and need[1] else None
            gw1, gb1, gw2, gb2 = (torch.zeros_like(x) for x in (w1, b1, w2, b2))
            for r0, r1 in _chunks(E.shape[0]):
                e = E[r0:r1]
                h1 = tanh(F.linear(e, w1, b1), True)
                fp = None if factors is None else factors[r0:r1]
                if ctx.factors_bwd is not None:     # the kernel set's one-pass chain
                    gm = ctx.factors_bwd(h1, w2, b2, fp, gF[r0:r1], None if dF is None else dF[r0:r1])
                else:
                    t = tanh(F.linear(h1, w2, b2), True)
                    z = t + (1.0 if fp is None else fp)
                    # clamp: the gradient passes where -1 <= z <= 1 (torch's convention), selected
                    gz = torch.where(z.abs_() <= 1.0, gF[r0:r1], gF.new_zeros(()))
                    del z
                    if dF is not None:
                        dF[r0:r1] = gz
                    gm = gz.mul_(_slope(t))
                    del t, gz
                gw2.addmm_(gm.t(), h1)
                gb2.add_(gm.sum(0))
                ga1 = (gm @ w2).mul_(_slope(h1))
                del gm, h1
                gw1.addmm_(ga1.t(), e)
                gb1.add_(ga1.sum(0))
                if dE is not None:
                    dE[r0:r1].addmm_(ga1, w1)
        dlam = go if lam is not None and need[2] else None
        grads = (gw1, gb1, gw2, gb2, gws1, gbs1, gws2, gbs2)
        return (dE, dF, dlam, None, None, *(g if need[5 + i] else None for i, g in enumerate(grads)))


def rcr_step_recomputed(E: Tensor, factors: Optional[Tensor], lam, w: Mapping[str, Tensor], prefix: str,
                        factors_bwd=None):
    """:func:`rcr_step` (not in place) for autograd without its d-wide activations: the same
    (F, lam) from the same ops, the factors' branch recomputed in RCR_CHUNKS chunks of rows in
    the backward (about one more RCR forward of work per training step). E (..., Lq, s), factors
    None | (..., Lq, d), lam a float or (..., Lq). factors_bwd: a kernel for the backward's d-wide
    chain (contract.KernelSet.rcr_factors_bwd), or None for torch ops."""
    lead, s = E.shape[:-1], E.shape[-1]
    d = w[prefix + "rcr_matrix_w.2.weight"].shape[0]
    lam_t = lam if isinstance(lam, Tensor) else None
    Fn, lam_out = _RCRStepRecomputed.apply(
        E.reshape(-1, s), None if factors is None else factors.reshape(-1, d),
        None if lam_t is None else lam_t.reshape(-1), 0.0 if lam_t is not None else float(lam), factors_bwd,
        *(w[prefix + name] for name in RCR_NAMES))
    return Fn.view(*lead, d), lam_out.view(lead)


def needs_grad(tensors) -> bool:
    """Whether autograd records an op on any of ``tensors`` (non-tensors ignored)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)
