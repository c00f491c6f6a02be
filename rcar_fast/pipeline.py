"""The one regulator schedule of RCAR (SPEC.md), run over blocks of the pair grid with any
backend's kernel set (rcar_fast.backends.contract.KernelSet). Only rcar_fast.reference keeps a
schedule of its own (it is the ground truth).

Per block of the pair grid (rcar_fast.block_plan: captions of one length, as many pairs as the
memory budget allows), in block layout (B = context side, P = query side):
  coop_rcar  E_t = attention(.., F, lam, W_t, b_t); h = mean(E_0) at t = 0;
             (F, lam) = RCR_t(E_t, F, lam) for t < T - 1; h = RAR_t(E_t, h)
  only_rar   E = attention(.., W_0, b_0); h = RAR_0..T-1(E, mean(E)), one rar call
  only_rcr   (F, lam) = RCR_t(attention(.., F, lam, W_t, b_t), F, lam) for t < T; then the mean
             over valid q of cos(Q, l2n(A(Q, C, F, lam)))
  score      sigmoid(sim_eval_w(h)), or the cosine mean; float32 for float16/bfloat16 inputs
             (the last Linear and the sigmoid run in float32: bf16 scores tie, README); at
             inference in the kernel set's last RAR launch where it has one (KernelSet.rar_scores:
             h never stored), else in torch
RCR is the kernel set's fused step where it has one and nothing needs a gradient, else the
shared-weight MLP in plain torch (rcar_fast.torch_math.rcr_step); under autograd the fused
backends' RCR saves only its inputs and recomputes in backward (rcr_step_recomputed). RAR's
dropout masks come from rcar_fast.dropout, named by the block's global image and caption
indices.

Autograd: every block is recomputed in backward (torch.utils.checkpoint; the RNG state is
replayed, so the dropout masks match), and planned with the kernel set's larger training
working set, so a training step's peak memory is one block's, set by memory_budget, for every
backend. Inside a block the ops' own autograd applies.

Pair lists (:func:`pair_scores`): the same schedule over blocks of a list of (image, caption)
pairs, in the attention's PAIRED form (contract.py): the block is (1, M, Lq, width), pair m's
query gathered, its context item read through ``context_index`` inside the kernels. Blocks hold
pairs of one caption length (rcar_fast.block_plan.iter_pair_blocks); checkpointing and dropout
masks as for the grid (the masks named by each pair's global image and caption indices, so a
pair's train-mode score equals its score in the grid under the same masks).

The pieces (adaptive_attention, alignment, rcr_update, rar_update) run one op over the whole
grid at once in pair-grid layout (N_i, N_c, Lq, width), rows past a caption's length zero.
Inputs arrive checked (rcar_fast.validate); nothing here validates.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import torch_math as tm
from .backends.contract import KernelSet, valid_rows
from .block_plan import iter_blocks, iter_caption_chunks, iter_pair_blocks
from .constants import EPS
from .dropout import pair_keep_masks, rar_keep_masks
from .validate import Lengths

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- layouts

def block_sources(img: Tensor, cap: Tensor, lens: Tensor, attn_type: str, regions: Optional[Tensor] = None):
    """(query, qlens, context, clens) of the block img x cap; lengths int32 on the features'
    device. t2i: the captions are the queries; i2t: the regions are (all R valid); regions: the
    images' region counts where the caller made them once for every block (:func:`region_counts`)."""
    if regions is None:
        regions = region_counts(img)
    lens = lens.to(device=img.device, dtype=torch.int32)
    return (cap, lens, img, regions) if attn_type == "t2i" else (img, regions, cap, lens)


def region_counts(img: Tensor) -> Tensor:
    """(N_i,) int32 on the features' device: every image's R regions are valid."""
    return torch.full((img.shape[0],), img.shape[1], dtype=torch.int32, device=img.device)


def pair_block_sources(img: Tensor, cap: Tensor, lens: Tensor, images: Tensor, captions: Tensor, Lg: int,
                       attn_type: str, regions: Optional[Tensor] = None):
    """(query, qlens, context, clens, context_index) of the pair block (images[m], captions[m])
    in the paired layout: the query side gathered per pair (every per-pair tensor, F and lam,
    is per query item anyway), the context side indexed by the kernels, so a context item that
    many pairs name is read in place, never copied per pair. t2i: the pairs' captions cut to
    ``Lg``, against every image; i2t: the pairs' images, against the block's distinct captions
    cut to ``Lg`` (a context item's rows are a prefix of Lg); regions: t2i, every image's
    (:func:`region_counts`), made once per call."""
    if attn_type == "t2i":
        q, ql, c, cl = block_sources(img.contiguous(), cap[:, :Lg].index_select(0, captions),
                                     lens.index_select(0, captions), attn_type, regions)
        return q, ql, c, cl, images.to(torch.int32)
    uniq, inv = torch.unique(captions, return_inverse=True)
    q, ql, c, cl = block_sources(img.index_select(0, images), cap[:, :Lg].index_select(0, uniq),
                                 lens.index_select(0, uniq), attn_type)
    return q, ql, c, cl, inv.to(torch.int32)


def to_block_layout(x, attn_type: str):
    """A pair-grid tensor (N_i, N_c, ...) in block layout (B, P, ...), contiguous; a float or
    None passes through."""
    if not isinstance(x, Tensor):
        return x
    return (x.transpose(0, 1) if attn_type == "i2t" else x).contiguous()


def from_block_layout(x: Tensor, attn_type: str) -> Tensor:
    return x.transpose(0, 1).contiguous() if attn_type == "i2t" else x


def zero_padded_queries(x, lens: Tensor, attn_type: str):
    """x (N_i, N_c, Lq, ...) with the rows past each caption's length (t2i) selected to zero."""
    if not isinstance(x, Tensor) or attn_type != "t2i":
        return x
    mask = valid_rows(lens.to(x.device), x.shape[2])
    return torch.where(mask.view((1,) + mask.shape + (1,) * (x.dim() - 3)), x, x.new_zeros(()))


# ----------------------------------------------------------------------------- one block

def _attention(ks: KernelSet, q, ql, c, cl, factors, lam, weight=None, bias=None, context_index=None, gram=None):
    lam_tensor = lam if isinstance(lam, Tensor) else None
    lam_scalar = 0.0 if isinstance(lam, Tensor) else float(lam)
    # the optional trailing arguments only where given (kernel sets without a gram take none)
    extra = (context_index, gram) if gram is not None else () if context_index is None else (context_index,)
    return ks.attention(q, ql, c, cl, factors, lam_tensor, lam_scalar, weight, bias, *extra)


def _rcr(ks: KernelSet, E, ql, factors, lam, params, prefix: str, inplace: bool):
    """(F, lam) after one RCR step: the kernel set's fused step where it applies, else plain
    torch; under autograd plain torch, or its recomputing form where the kernel set asks for it
    (KernelSet.rcr_recompute)."""
    if not inplace and ks.rcr_recompute:
        fused_bwd = ks.rcr_factors_bwd if E.device.type in ks.rcr_devices else None
        return tm.rcr_step_recomputed(E, factors, lam, params, prefix, fused_bwd)
    if ks.rcr is None or not inplace or E.device.type not in ks.rcr_devices:
        return tm.rcr_step(E, factors, lam, params, prefix, inplace)
    lam_tensor = lam if isinstance(lam, Tensor) else None
    lam_scalar = 0.0 if isinstance(lam, Tensor) else float(lam)

    weights = (params[prefix + name].contiguous() for name in tm.RCR_NAMES)
    return ks.rcr(E, ql, factors, lam_tensor, lam_scalar, *weights)


def rar_weights(params: Mapping[str, Tensor], prefixes):
    """The RAR modules' weights stacked (T, ...) in the contract's order (wq, bq, wk, bk, wv, bv)."""
    def stack(name):
        return torch.stack([params[p + name] for p in prefixes]).contiguous()
    return (stack("rar_q_w.0.weight"), stack("rar_q_w.0.bias"), stack("rar_k_w.0.weight"),
            stack("rar_k_w.0.bias"), stack("rar_v_w.0.weight").flatten(1), stack("rar_v_w.0.bias").flatten())


def _keep_masks(step: int, E: Tensor, pairs):
    """RAR step ``step``'s dropout keep-masks (scaled by 1/(1-p), rcar_fast.dropout) for the
    block's pairs = (global image indices, global caption indices, attn_type, paired), block
    layout; paired: pair m is (images[m], captions[m]) (a pair-list block, B = 1)."""
    images, captions, attn_type, paired = pairs
    if paired:
        keep_k, keep_g = pair_keep_masks(step, images, captions, E.shape[2], E.shape[3], E.dtype, E.device)
        return keep_k[None], keep_g[None]
    keep_k, keep_g = rar_keep_masks(step, images, captions, E.shape[2], E.shape[3], E.dtype, E.device)
    return to_block_layout(keep_k, attn_type), to_block_layout(keep_g, attn_type)


def _rar_steps(ks: KernelSet, E, ql, h, stacked, training: bool, first_step: int, pairs):
    """RAR over the modules of ``stacked`` (their step numbers start at ``first_step``): one
    call for all of them in eval, one per step in training (each step its own dropout masks)."""
    if not training:
        return ks.rar(E, ql, h, *stacked, None, None)
    for t in range(stacked[0].shape[0]):
        h = ks.rar(E, ql, h, *(w[t:t + 1] for w in stacked), *_keep_masks(first_step + t, E, pairs))
    return h


def context_grams(ks: KernelSet, c: Tensor, cl: Tensor, inplace: bool) -> Optional[Tensor]:
    """The kernel set's Gram matrices of the context items c, made once for several attention
    calls (KernelSet.context_gram), or None: the kernel set has none, c is on a device it does
    not take, or something needs a gradient (the attention then makes its own)."""
    if ks.context_gram is None or not inplace or c.device.type not in ks.devices:
        return None
    return ks.context_gram(c, cl)


def _call_grams(ks: KernelSet, img: Tensor, regions: Tensor, inplace: bool, budget: int) -> Optional[Tensor]:
    """Every image's Gram matrices for the whole call (:func:`context_grams`) where they take at
    most a quarter of the block budget (they live beside every block; bounded here by N_i fp32
    tiles of side max(16, 2R), above the kernels' power of two), else None: each block then makes
    its own images' once for its steps."""
    if not call_grams_fit(img.shape[0], img.shape[1], budget):
        return None
    return context_grams(ks, img, regions, inplace)


def call_grams_fit(n_images: int, regions: int, budget: int) -> bool:
    """Whether every image's Gram matrices fit a quarter of the block budget (:func:`_call_grams`;
    bench/roofline.py books them by the same rule)."""
    side = max(16, 2 * regions)
    return 4 * n_images * side * side * 4 <= budget


def score_weights(params, dtype: torch.dtype):
    """sim_eval_w's weight and bias in the scores' accumulation dtype (float64 for float64
    features, else float32), contiguous, cast once per call."""
    acc = score_dtype(dtype)
    return params["sim_eval_w.weight"].to(acc).contiguous(), params["sim_eval_w.bias"].to(acc).contiguous()


def _score(h: Tensor, score_w) -> Tensor:
    """sigmoid(sim_eval_w(h)), in float32 for half-precision h (finer than a bf16 sigmoid);
    score_w: :func:`score_weights`."""
    W, b = score_w
    return torch.sigmoid(F.linear(h.to(W.dtype), W, b)).squeeze(-1)


def block_scores(ks: KernelSet, q, ql, c, cl, params, rar_w, regulator: str, steps: int, smooth: float,
                 training: bool, inplace: bool, pairs, context_index=None, score_w=None, gram=None) -> Tensor:
    """SPEC.md's scores of one block, (B, P); rar_w: every RAR module's weights, stacked once
    (:func:`rar_weights`); pairs: the block's (global image indices, global caption indices,
    attn_type, paired), naming the dropout masks in training; context_index: the paired form
    (B = 1, :func:`pair_block_sources`); score_w: :func:`score_weights` where the caller cast
    them once; gram: the context items' Gram matrices where the caller made them once for every
    block (:func:`context_grams`), else they are made here once for the block's steps."""
    factors, lam = None, smooth
    if gram is None:
        gram = context_grams(ks, c, cl, inplace)
    if score_w is None and regulator != "only_rcr":
        score_w = score_weights(params, q.dtype)
    # at inference the kernel set's RAR may take the scoring layer in its last launch
    fused_score = (ks.rar_scores is not None and inplace and not training and q.device.type in ks.devices
                   and score_w is not None and score_w[0].dtype == torch.float32)

    def last_rar(E, h, stacked):
        if fused_score:
            return ks.rar_scores(E, ql, h, *stacked, score_w[0].reshape(-1), score_w[1])
        return _score(_rar_steps(ks, E, ql, h, stacked, training, steps - stacked[0].shape[0], pairs), score_w)

    def align(t):
        return _attention(ks, q, ql, c, cl, factors, lam, params[f"alv_modules.{t}.sim_transform_w.weight"],
                          params[f"alv_modules.{t}.sim_transform_w.bias"], context_index, gram)

    if regulator == "only_rcr":
        for t in range(steps):
            factors, lam = _rcr(ks, align(t), ql, factors, lam, params, f"rcr_modules.{t}.", inplace)
        A = _attention(ks, q, ql, c, cl, factors, lam, context_index=context_index, gram=gram)   # rows past qlen are 0
        acc = torch.float64 if A.dtype == torch.float64 else torch.float32
        A = A.to(acc)
        valid = valid_rows(ql, q.shape[1])                                # (P, Lq)
        Qv = torch.where(valid[..., None], q, q.new_zeros(())).to(acc)
        num = (A * Qv[None]).sum(-1)
        den = torch.linalg.vector_norm(A, dim=-1) * torch.linalg.vector_norm(Qv, dim=-1)[None]
        cos = torch.where(valid[None], num / torch.clamp(den, min=EPS), num.new_zeros(()))
        return cos.sum(-1) / ql.to(acc)[None]
    if regulator == "only_rar":
        return last_rar(align(0), None, rar_w)
    h = None
    for t in range(steps - 1):
        E = align(t)
        factors, lam = _rcr(ks, E, ql, factors, lam, params, f"rcr_modules.{t}.", inplace)
        h = _rar_steps(ks, E, ql, h, tuple(w[t:t + 1] for w in rar_w), training, t, pairs)
    return last_rar(align(steps - 1), h, tuple(w[steps - 1:steps] for w in rar_w))


def _cut_block_scores(ks, img, cap, cap_lens, i0, i1, cidx, Lg, attn_type, params, rar_w, regulator, steps, smooth,
                      regions, score_w, gram, training, inplace):
    """:func:`block_scores` of the block img[i0:i1] x cap[cidx, :Lg], cut here, inside the
    checkpointed function, so that autograd saves the whole inputs once (by reference), not a
    copy of every block's captions; cap_lens: the block's captions' lengths (int32, on the
    device); regions: img[i0:i1]'s, score_w and gram (or None) as block_scores takes them."""
    q, ql, c, cl = block_sources(img[i0:i1].contiguous(), cap[:, :Lg].index_select(0, cidx), cap_lens, attn_type,
                                 regions)
    return block_scores(ks, q, ql, c, cl, params, rar_w, regulator, steps, smooth, training, inplace,
                        (torch.arange(i0, i1) if training else None, cidx, attn_type, False), score_w=score_w,
                        gram=gram)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scores' dtype for features of ``dtype``: float32 for float16/bfloat16, else the same."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _schedule(ks: KernelSet, img: Tensor, cap: Tensor, lens: Lengths, params, regulator: str, steps: int,
              memory_budget: Optional[int]):
    """What every block of one call shares: (budget, inplace (nothing needs a gradient), the
    stacked RAR weights, the live buffers the planner counts, the scoring layer's weights
    (:func:`score_weights`), the images' region counts)."""
    if memory_budget is None:
        memory_budget = ks.budget(img.device)
    inplace = not tm.needs_grad([img, cap, *params.values()])
    rar_w = None if regulator == "only_rcr" else rar_weights(params, [f"rar_modules.{t}." for t in range(steps)])
    score_w = None if regulator == "only_rcr" else score_weights(params, img.dtype)
    return (memory_budget, inplace, rar_w, ks.live_buffers if inplace else ks.live_buffers_train, score_w,
            region_counts(img))


def _run_block(cut, block_args, inplace: bool) -> Tensor:
    """``cut(*block_args, inplace)``; under autograd checkpointed: the block is recomputed in
    backward, so no block keeps its intermediates (d-wide F, RCR's activations) alive until the
    backward pass; the peak is one block's, set by memory_budget, and the RNG state is replayed
    (same dropout masks)."""
    if inplace:
        return cut(*block_args, True)
    return torch.utils.checkpoint.checkpoint(cut, *block_args, False, use_reentrant=False, preserve_rng_state=True)


def rcar_scores(ks: KernelSet, img: Tensor, cap: Tensor, lens: Lengths, params: Mapping[str, Tensor],
                regulator: str, steps: int, attn_type: str, smooth: float, training: bool,
                memory_budget: Optional[int] = None) -> Tensor:
    """scores (N_i, N_c) of every pair, block by block (module docstring)."""
    n_i, R, d = img.shape
    budget, inplace, rar_w, live, score_w, regions = _schedule(ks, img, cap, lens, params, regulator, steps,
                                                               memory_budget)
    out = img.new_empty(n_i, cap.shape[0], dtype=score_dtype(img.dtype))
    plan = (lens.host, n_i, R, d, attn_type, img.element_size(), budget, live)
    # every caption chunk's indices and lengths (each caption in one chunk), in one copy each to
    # the device: a chunk's image blocks follow each other, the first at image 0 (iter_blocks)
    chunks = [c for cols, _, _ in iter_caption_chunks(*plan) for c in cols]
    cols_dev = torch.tensor(chunks, dtype=torch.long, device=img.device)
    lens_cols = torch.tensor([lens.host[c] for c in chunks], dtype=torch.int32, device=img.device)
    # t2i: every image's Gram matrices once (each block's images are a row range of them)
    grams = _call_grams(ks, img, regions, inplace, budget) if attn_type == "t2i" else None
    with ks.workspace():
        start, at = 0, slice(0, 0)
        for cols, Lg, i0, i1 in iter_blocks(*plan):
            if i0 == 0:
                at = slice(start, start + len(cols))
                start = at.stop
            s = _run_block(_cut_block_scores, (ks, img, cap, lens_cols[at], i0, i1, cols_dev[at], Lg, attn_type, params,
                                               rar_w, regulator, steps, smooth, regions[i0:i1], score_w,
                                               None if grams is None else grams[i0:i1], training), inplace)
            out[i0:i1, cols_dev[at]] = s if attn_type == "t2i" else s.t()
    return out


def _cut_pair_block_scores(ks, img, cap, lens, images, captions, Lg, attn_type, params, rar_w, regulator, steps,
                           smooth, regions, score_w, gram, training, inplace):
    """:func:`block_scores` of the pair block (images[m], captions[m]), (M,); cut inside the
    checkpointed function as :func:`_cut_block_scores` is; regions, score_w and gram (t2i: every
    image's, or None) made once per call."""
    q, ql, c, cl, cidx = pair_block_sources(img, cap, lens, images, captions, Lg, attn_type, regions)
    return block_scores(ks, q, ql, c, cl, params, rar_w, regulator, steps, smooth, training, inplace,
                        (images, captions, attn_type, True), cidx, score_w, gram)[0]


def pair_scores(ks: KernelSet, img: Tensor, cap: Tensor, lens: Lengths, img_index: Tensor, cap_index: Tensor,
                params: Mapping[str, Tensor], regulator: str, steps: int, attn_type: str, smooth: float,
                training: bool, memory_budget: Optional[int] = None) -> Tensor:
    """scores (M,) of the pairs (img[img_index[m]], cap[cap_index[m]]), block by block (the module
    docstring); img_index, cap_index: checked (M,) int64 tensors on the CPU (the host's copy plans
    the blocks)."""
    R, d = img.shape[1], img.shape[2]
    budget, inplace, rar_w, live, score_w, regions = _schedule(ks, img, cap, lens, params, regulator, steps,
                                                               memory_budget)
    lens_dev = torch.tensor(lens.host, dtype=torch.int32, device=img.device)
    out = img.new_empty(img_index.shape[0], dtype=score_dtype(img.dtype))
    # t2i: every block's context is every image (indexed per pair): their Gram matrices once
    grams = _call_grams(ks, img, regions, inplace, budget) if attn_type == "t2i" else None
    with ks.workspace():
        for pos, Lg in iter_pair_blocks(lens.host, cap_index.tolist(), img_index.tolist(), R, d, attn_type,
                                        img.element_size(), budget, live):
            pos = torch.tensor(pos)
            images, captions = img_index[pos].to(img.device), cap_index[pos].to(img.device)
            out[pos.to(img.device)] = _run_block(_cut_pair_block_scores, (
                ks, img, cap, lens_dev, images, captions, Lg, attn_type, params, rar_w, regulator, steps, smooth,
                regions, score_w, grams, training), inplace)
    return out


# ----------------------------------------------------------------------------- the pieces

def adaptive_attention(ks: KernelSet, img, cap, lens: Lengths, factors, temperatures, attn_type):
    q, ql, c, cl = block_sources(img, cap, lens.tensor, attn_type)
    factors = to_block_layout(zero_padded_queries(factors, lens.tensor, attn_type), attn_type)
    lam = to_block_layout(zero_padded_queries(temperatures, lens.tensor, attn_type), attn_type)
    with ks.workspace():
        A = _attention(ks, q, ql, c, cl, factors, lam)
    return from_block_layout(A, attn_type)


def alignment(ks: KernelSet, img, cap, lens: Lengths, weight, bias, factors, temperatures, attn_type):
    q, ql, c, cl = block_sources(img, cap, lens.tensor, attn_type)
    factors = to_block_layout(zero_padded_queries(factors, lens.tensor, attn_type), attn_type)
    lam = to_block_layout(zero_padded_queries(temperatures, lens.tensor, attn_type), attn_type)
    with ks.workspace():
        E = _attention(ks, q, ql, c, cl, factors, lam, weight.contiguous(), bias.contiguous())
    return from_block_layout(E, attn_type)


def rcr_update(ks: KernelSet, E, factors, temperatures, lens: Lengths, weights, attn_type):
    """One RCR step over the grid: the shared-weight MLP in plain torch for every backend."""
    inplace = not tm.needs_grad([E, factors, temperatures, *weights.values()])
    E, factors, lam = (zero_padded_queries(x, lens.tensor, attn_type) for x in (E, factors, temperatures))
    Fn, lam = tm.rcr_step(E, factors, lam, weights, "", inplace)
    return zero_padded_queries(Fn, lens.tensor, attn_type), zero_padded_queries(lam, lens.tensor, attn_type)


def rar_update(ks: KernelSet, E, h, lens: Lengths, weights, attn_type, training):
    Eb = to_block_layout(zero_padded_queries(E, lens.tensor, attn_type), attn_type)
    B, P, Lq, _ = Eb.shape
    ql = lens.tensor.to(device=E.device, dtype=torch.int32) if attn_type == "t2i" else \
        torch.full((P,), Lq, dtype=torch.int32, device=E.device)
    pairs = (torch.arange(E.shape[0]), torch.arange(E.shape[1]), attn_type, False)
    with ks.workspace():
        out = _rar_steps(ks, Eb, ql, to_block_layout(h, attn_type), rar_weights(weights, [""]), training, 0, pairs)
    return from_block_layout(out, attn_type)
