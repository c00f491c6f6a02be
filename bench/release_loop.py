"""The baseline: RCAR scored the way the public release scores it, one caption at a time.

For each caption j the release cuts the caption to its valid words, ``.repeat(n_image, 1, 1)``s
it across the images of the shard (a real copy per caption), and runs the similarity head on
the (n_image, Lq, d) batch with plain torch ops: batched products for the attention, Linear
layers for the regulators, one column of scores per caption. This module re-implements that
computation from SPEC.md with the module's weights (a ``params`` mapping of checkpoint names, as
``RCARSimilarity.named_parameters()`` gives), under ``torch.no_grad``. It is what the benchmark
calls ``release_loop``: the speed the fast backends are measured against. It is also an
independent check of rcar_fast.reference (tests/test_bench.py).

Shapes inside the loop follow the release: query (n_image, Lq, d), context (n_image, Lc, d);
t2i: query = the caption's words, context = the regions; i2t the other way round.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

EPS = 1e-8
Tensor = torch.Tensor
DEFAULT_SMOOTH = {"t2i": 10.0, "i2t": 3.0}


def _l2norm(x: Tensor, dim: int = -1) -> Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def _dense(x: Tensor, params: Mapping[str, Tensor], name: str) -> Tensor:
    return F.linear(x, params[name + ".weight"], params[name + ".bias"])


def _cross_attention(query: Tensor, context: Tensor, factors: Tensor, smooth) -> Tensor:
    """l2n(A(Q, C, F, lam)): query (n, Lq, d), context (n, Lc, d), factors broadcastable to
    the query, smooth a float or (n, Lq, 1). Returns the attended context (n, Lq, d)."""
    scores = torch.bmm(context, (query * factors).transpose(1, 2))        # (n, Lc, Lq)
    scores = _l2norm(F.leaky_relu(scores, 0.1), dim=-1)                   # across query words
    attn = torch.softmax(scores.transpose(1, 2) * smooth, dim=2)          # (n, Lq, Lc)
    return _l2norm(torch.bmm(attn, context), dim=-1)


def _alignment(query, context, factors, smooth, params, t: int) -> Tensor:
    """E = l2n(W_t (Q - A)^2 + b_t): (n, Lq, s)."""
    diff = (query - _cross_attention(query, context, factors, smooth)).pow(2)
    return _l2norm(_dense(diff, params, f"alv_modules.{t}.sim_transform_w"))


def _correspondence(E: Tensor, factors, smooth, params, t: int):
    """One RCR step: factors (n, Lq, d) and per-word temperatures (n, Lq, 1)."""
    p = f"rcr_modules.{t}"
    m = _dense(torch.tanh(_dense(E, params, p + ".rcr_matrix_w.0")), params, p + ".rcr_matrix_w.2")
    sm = _dense(torch.tanh(_dense(E, params, p + ".rcr_smooth_w.0")), params, p + ".rcr_smooth_w.2")
    return (torch.tanh(m) + factors).clamp(min=-1.0, max=1.0), torch.relu(sm + smooth)


def _aggregation(E: Tensor, h: Tensor, params, t: int) -> Tensor:
    """One RAR step (inference: dropout off): the new global vector (n, s)."""
    p = f"rar_modules.{t}"
    keys = torch.tanh(_dense(E, params, p + ".rar_k_w.0"))
    q = torch.tanh(_dense(h, params, p + ".rar_q_w.0")).unsqueeze(1).repeat(1, E.size(1), 1)
    weights = torch.softmax(_dense(keys * q, params, p + ".rar_v_w.0").squeeze(2), dim=1)
    return _l2norm((weights.unsqueeze(2) * E).sum(dim=1))


def _caption_scores(query, context, params, regulator: str, steps: int, smooth: float) -> Tensor:
    """Scores of one caption against every image of the shard: (n_image, 1)."""
    factors = torch.ones(query.size(2), dtype=query.dtype, device=query.device)
    if regulator == "only_rar":
        E = _alignment(query, context, factors, smooth, params, 0)
        h = E.mean(dim=1)
        for t in range(steps):
            h = _aggregation(E, h, params, t)
        return torch.sigmoid(_dense(h, params, "sim_eval_w"))
    if regulator == "only_rcr":
        for t in range(steps):
            E = _alignment(query, context, factors, smooth, params, t)
            factors, smooth = _correspondence(E, factors, smooth, params, t)
        attended = _cross_attention(query, context, factors, smooth)
        cos = (query * attended).sum(-1) / (query.norm(dim=-1) * attended.norm(dim=-1)).clamp(min=EPS)
        return cos.mean(dim=1, keepdim=True)
    if regulator == "coop_rcar":
        h = None
        for t in range(steps):
            E = _alignment(query, context, factors, smooth, params, t)
            if t == 0:
                h = E.mean(dim=1)
            if t < steps - 1:
                factors, smooth = _correspondence(E, factors, smooth, params, t)
            h = _aggregation(E, h, params, t)
        return torch.sigmoid(_dense(h, params, "sim_eval_w"))
    raise ValueError(f"regulator: unknown {regulator!r}")


@torch.no_grad()
def rcar_scores(img: Tensor, cap: Tensor, cap_lens, params: Mapping[str, Tensor], regulator: str,
                steps: int, attn_type: str = "t2i", smooth: Optional[float] = None) -> Tensor:
    """scores (n_image, n_caption), one caption at a time as the release does.

    img (n_image, R, d), cap (n_caption, L, d), cap_lens (n_caption,) ints; padding is never
    read (each caption is cut to its length).
    """
    if smooth is None:
        smooth = DEFAULT_SMOOTH[attn_type]
    n_image = img.size(0)
    lens = [int(n) for n in torch.as_tensor(cap_lens).tolist()]
    columns = []
    for j, n_word in enumerate(lens):
        cap_j = cap[j, :n_word, :].unsqueeze(0).repeat(n_image, 1, 1)
        query, context = (cap_j, img) if attn_type == "t2i" else (img, cap_j)
        columns.append(_caption_scores(query, context, params, regulator, steps, smooth))
    return torch.cat(columns, dim=1) if columns else img.new_zeros(n_image, 0)
