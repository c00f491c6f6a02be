"""Ground truth: SPEC.md written plainly, one caption at a time.

Every test and benchmark of rcar_fast is measured against this module. It loops over captions
the way the public RCAR release does (each caption, cut to its valid words, against all images
at once), so padding never enters the arithmetic: padded words are simply not read. It works
in whatever dtype it is given (float64 for tight parity tests). No fast path imports it.

Shapes follow SPEC.md: ``img`` (N_i, R, d), ``cap`` (N_c, L, d), ``cap_lens`` (N_c,).
Per-pair, per-position tensors are laid out (N_i, N_c, Lq, width) with Lq = L for t2i and
Lq = R for i2t; rows at padded query positions (t2i only) are zero in every output here.

``params`` maps the checkpoint names of SPEC.md (e.g. ``"alv_modules.0.sim_transform_w.weight"``)
to tensors, as ``RCARSimilarity.state_dict()`` or a release checkpoint's ``sim_enc`` entries do.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F

from .constants import DEFAULT_TEMPERATURE, EPS
from .dropout import rar_keep_masks

Tensor = torch.Tensor


def l2n(x: Tensor) -> Tensor:
    """x / (||x||_2 + 1e-8) over the last axis."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + EPS)


def linear(x: Tensor, params: Mapping[str, Tensor], name: str) -> Tensor:
    return F.linear(x, params[name + ".weight"], params[name + ".bias"])


# ----------------------------------------------------------------------------- one caption

def attention_one(Q: Tensor, C: Tensor, Fq, lam) -> Tensor:
    """A(Q, C, F, lam) for a batch of pairs sharing nothing but shapes.

    Q (b, Lq, d), C (b, Lc, d), Fq broadcastable to Q (1.0 at the first step),
    lam a float or (b, Lq). Every position given here is valid. Returns l2n(U), (b, Lq, d).
    """
    S = F.leaky_relu(torch.matmul(C, (Fq * Q).transpose(1, 2)), 0.1)        # (b, Lc, Lq)
    Sn = S / (torch.linalg.vector_norm(S, dim=2, keepdim=True) + EPS)      # across query positions
    if isinstance(lam, Tensor):
        logits = lam.unsqueeze(1) * Sn
    else:
        logits = lam * Sn
    P = torch.softmax(logits, dim=1)                                         # over context positions
    U = torch.matmul(P.transpose(1, 2), C)                                   # (b, Lq, d)
    return l2n(U)


def alignment_one(Q: Tensor, A: Tensor, params, t: int) -> Tensor:
    """E = l2n(W_t (Q - A)^2 + b_t), (b, Lq, s)."""
    return l2n(linear((Q - A) ** 2, params, f"alv_modules.{t}.sim_transform_w"))


def rcr_one(E: Tensor, Fq, lam, params, t: int):
    """One RCR step: new factors (b, Lq, d) and temperatures (b, Lq)."""
    p = f"rcr_modules.{t}"
    m = linear(torch.tanh(linear(E, params, p + ".rcr_matrix_w.0")), params, p + ".rcr_matrix_w.2")
    Fn = torch.clamp(torch.tanh(m) + Fq, -1.0, 1.0)
    sm = linear(torch.tanh(linear(E, params, p + ".rcr_smooth_w.0")), params, p + ".rcr_smooth_w.2")
    lamn = torch.relu(sm.squeeze(-1) + lam)
    return Fn, lamn


def _keep_masks(t: int, j: int, E: Tensor):
    """Caption j's RAR dropout keep-masks of step t against every image: ((b, Lq, s), (b, s))."""
    n_i, lq, s = E.shape
    keep_k, keep_g = rar_keep_masks(t, torch.arange(n_i), torch.tensor([j]), lq, s, E.dtype, E.device)
    return keep_k[:, 0], keep_g[:, 0]


def rar_one(E: Tensor, h: Tensor, params, t: int, training: bool = False, j: int = 0,
            step: Optional[int] = None) -> Tensor:
    """One RAR step over all (valid) positions of E (b, Lq, s) with global h (b, s): caption j
    against every image; in training the dropout keep-masks of RAR step ``step`` (default t)."""
    p = f"rar_modules.{t}"
    K = torch.tanh(linear(E, params, p + ".rar_k_w.0"))
    g = torch.tanh(linear(h, params, p + ".rar_q_w.0"))
    if training:
        keep_k, keep_g = _keep_masks(t if step is None else step, j, E)
        K, g = K * keep_k, g * keep_g
    a = torch.softmax(linear(K * g.unsqueeze(1), params, p + ".rar_v_w.0").squeeze(-1), dim=1)
    return l2n(torch.sum(a.unsqueeze(-1) * E, dim=1))


def _pair_tensors(img: Tensor, cap_j: Tensor, attn_type: str):
    """Query and context of caption j against every image (expanded views, no copies)."""
    n_i = img.shape[0]
    words = cap_j.unsqueeze(0).expand(n_i, -1, -1)
    return (words, img) if attn_type == "t2i" else (img, words)


def scores_one_caption(img: Tensor, cap_j: Tensor, params: Mapping[str, Tensor], regulator: str,
                       steps: int, attn_type: str, smooth: float, training: bool = False,
                       j: int = 0) -> Tensor:
    """SPEC.md's score of caption j (its valid words only, (len_j, d)) against every image
    (``j``: the caption's index, which names its dropout masks in training)."""
    Q, C = _pair_tensors(img, cap_j, attn_type)
    Fq, lam = 1.0, smooth
    if regulator == "only_rar":
        E = alignment_one(Q, attention_one(Q, C, Fq, lam), params, 0)
        h = E.mean(dim=1)
        for t in range(steps):
            h = rar_one(E, h, params, t, training, j)
        return torch.sigmoid(linear(h, params, "sim_eval_w")).squeeze(-1)
    if regulator == "only_rcr":
        for t in range(steps):
            E = alignment_one(Q, attention_one(Q, C, Fq, lam), params, t)
            Fq, lam = rcr_one(E, Fq, lam, params, t)
        A = attention_one(Q, C, Fq, lam)
        cos = (Q * A).sum(-1) / torch.clamp(
            torch.linalg.vector_norm(Q, dim=-1) * torch.linalg.vector_norm(A, dim=-1), min=EPS)
        return cos.mean(dim=1)
    if regulator == "coop_rcar":
        h = None
        for t in range(steps):
            E = alignment_one(Q, attention_one(Q, C, Fq, lam), params, t)
            if t == 0:
                h = E.mean(dim=1)
            if t < steps - 1:
                Fq, lam = rcr_one(E, Fq, lam, params, t)
            h = rar_one(E, h, params, t, training, j)
        return torch.sigmoid(linear(h, params, "sim_eval_w")).squeeze(-1)
    raise ValueError(f"regulator: unknown {regulator!r}")


def rcar_scores(img: Tensor, cap: Tensor, cap_lens, params: Mapping[str, Tensor], regulator: str,
                steps: int, attn_type: str = "t2i", smooth: Optional[float] = None,
                training: bool = False) -> Tensor:
    """scores (N_i, N_c): the similarity of every image with every caption (SPEC.md)."""
    if smooth is None:
        smooth = DEFAULT_TEMPERATURE[attn_type]
    lens = [int(x) for x in torch.as_tensor(cap_lens).tolist()]
    cols = [scores_one_caption(img, cap[j, :lens[j]], params, regulator, steps, attn_type,
                               smooth, training, j) for j in range(cap.shape[0])]
    if not cols:
        return img.new_zeros(img.shape[0], 0)
    return torch.stack(cols, dim=1)


def pair_scores(img: Tensor, cap: Tensor, cap_lens, img_index: Tensor, cap_index: Tensor,
                params: Mapping[str, Tensor], regulator: str, steps: int, attn_type: str = "t2i",
                smooth: Optional[float] = None, training: bool = False) -> Tensor:
    """scores (M,) of the pairs (img_index[m], cap_index[m]): by definition the grid's entries,
    each listed caption scored against every image (its column of :func:`rcar_scores`, dropout
    masks included), then the listed images picked."""
    if smooth is None:
        smooth = DEFAULT_TEMPERATURE[attn_type]
    lens = [int(x) for x in torch.as_tensor(cap_lens).tolist()]
    img_index, cap_index = torch.as_tensor(img_index).long().cpu(), torch.as_tensor(cap_index).long().cpu()
    out = img.new_zeros(img_index.shape[0])
    for j in torch.unique(cap_index).tolist():
        sel = (cap_index == j).nonzero().flatten()
        col = scores_one_caption(img, cap[j, :lens[j]], params, regulator, steps, attn_type, smooth, training, j)
        out = out.index_put((sel.to(img.device),), col[img_index[sel].to(img.device)])
    return out


# ----------------------------------------------------------------------------- the pieces

def _query_len(attn_type: str, R: int, len_j: int) -> int:
    return len_j if attn_type == "t2i" else R


def _slice_pos(x, j: int, lq: int):
    """Caption j's column of a per-pair tensor (N_i, N_c, Lq, ...) cut to lq positions."""
    if isinstance(x, Tensor) and x.dim() >= 3:
        return x[:, j, :lq]
    return x


def _grid_map(img, cap, cap_lens, attn_type, fn, width, out_like):
    """Run fn(j, Q, C, lq) -> (N_i, lq, width) per caption and lay the results out padded."""
    n_i, R = img.shape[0], img.shape[1]
    lens = [int(x) for x in torch.as_tensor(cap_lens).tolist()]
    Lq = cap.shape[1] if attn_type == "t2i" else R
    out = out_like.new_zeros(n_i, cap.shape[0], Lq, width)
    for j, lj in enumerate(lens):
        Q, C = _pair_tensors(img, cap[j, :lj], attn_type)
        lq = _query_len(attn_type, R, lj)
        out[:, j, :lq] = fn(j, Q, C, lq)
    return out


def adaptive_attention(img, cap, cap_lens, factors=None, temperatures: Union[float, Tensor] = 10.0,
                       attn_type: str = "t2i") -> Tensor:
    """l2n(A(Q, C, F, lam)) for every pair: (N_i, N_c, Lq, d), zero rows at padded queries."""
    def fn(j, Q, C, lq):
        Fq = 1.0 if factors is None else _slice_pos(factors, j, lq)
        return attention_one(Q, C, Fq, _slice_pos(temperatures, j, lq))
    return _grid_map(img, cap, cap_lens, attn_type, fn, img.shape[2], img)


def alignment(img, cap, cap_lens, weight, bias, factors=None, temperatures=10.0,
              attn_type: str = "t2i") -> Tensor:
    """E = l2n(W (Q - A)^2 + b) for every pair: (N_i, N_c, Lq, s), zero rows at padded queries."""
    params = {"alv_modules.0.sim_transform_w.weight": weight, "alv_modules.0.sim_transform_w.bias": bias}

    def fn(j, Q, C, lq):
        Fq = 1.0 if factors is None else _slice_pos(factors, j, lq)
        return alignment_one(Q, attention_one(Q, C, Fq, _slice_pos(temperatures, j, lq)), params, 0)
    return _grid_map(img, cap, cap_lens, attn_type, fn, weight.shape[0], img)


def _prefixed(weights: Mapping[str, Tensor], prefix: str) -> dict:
    return {f"{prefix}.{k}": v for k, v in weights.items()}


def rcr_update(E: Tensor, factors, temperatures, cap_lens, weights: Mapping[str, Tensor],
               attn_type: str = "t2i"):
    """One RCR step on every pair: (F (N_i, N_c, Lq, d), lam (N_i, N_c, Lq)), zero at padded queries.

    ``weights`` holds one RCR module's own names (``rcr_matrix_w.0.weight`` ...).
    """
    params = _prefixed(weights, "rcr_modules.0")
    n_i, n_c, Lq, _ = E.shape
    d = weights["rcr_matrix_w.2.weight"].shape[0]
    lens = [int(x) for x in torch.as_tensor(cap_lens).tolist()]
    Fo, lo = E.new_zeros(n_i, n_c, Lq, d), E.new_zeros(n_i, n_c, Lq)
    for j, lj in enumerate(lens):
        lq = lj if attn_type == "t2i" else Lq
        Fq = 1.0 if factors is None else _slice_pos(factors, j, lq)
        Fo[:, j, :lq], lo[:, j, :lq] = rcr_one(E[:, j, :lq], Fq, _slice_pos(temperatures, j, lq),
                                               params, 0)
    return Fo, lo


def rar_update(E: Tensor, h, cap_lens, weights: Mapping[str, Tensor], attn_type: str = "t2i",
               training: bool = False) -> Tensor:
    """One RAR step on every pair: new h (N_i, N_c, s). ``h=None`` starts from the mean of E.

    ``weights`` holds one RAR module's own names (``rar_k_w.0.weight`` ...).
    """
    params = _prefixed(weights, "rar_modules.0")
    lens = [int(x) for x in torch.as_tensor(cap_lens).tolist()]
    cols = []
    for j, lj in enumerate(lens):
        lq = lj if attn_type == "t2i" else E.shape[2]
        Ej = E[:, j, :lq]
        hj = Ej.mean(dim=1) if h is None else h[:, j]
        cols.append(rar_one(Ej, hj, params, 0, training, j))
    if not cols:
        return E.new_zeros(E.shape[0], 0, E.shape[3])
    return torch.stack(cols, dim=1)
