"""The "torch" backend: SPEC.md over a whole block of the pair grid at once, in plain PyTorch.

Layout. Inside this module a block of pairs is laid out (B, P, Lq, width): B indexes the
*context* side and P the *query* side of a pair, so that every batched product runs over B.
  t2i: B = images (context = regions), P = captions (query = words), Lq = L (padded), Lc = R.
  i2t: B = captions (context = words), P = images (query = regions), Lq = R, Lc = L (padded).
Inputs are never repeated across pairs: the query source is (P, Lq, d), the context source
(B, Lc, d), and the first-step factors F = 1 and temperature lam = smooth are kept symbolic.

Padding. Padded words are replaced by zeros *by selection* (torch.where) once, on entry, so a
NaN there cannot reach any product; masked reductions also select. Rows at padded query
positions are finite but meaningless and are excluded from every reduction.

Speed. ``rcar_scores`` walks the grid in blocks sized by a memory budget, one caption length
per block (rcar_fast._plan), so a block carries no padding and skips its mask selections.
Without autograd the element-wise chain runs in place, and the d-wide temporaries of every
block live in a few buffers reused across blocks (:class:`Workspace`). Under autograd every
block is recomputed in backward (activation checkpointing, as the fused backends do), so a
training step keeps one block's intermediates alive, not the whole grid's.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ._plan import iter_blocks
from .dropout import rar_keep_masks

EPS = 1e-8
Tensor = torch.Tensor

#: default working-set budget of one block of the pair grid, in bytes (CPU tensors); measured
#: on the 100 x 100 shard, 2 cores: t2i 2980 / 3232 / 3088 pairs/s at 256 / 96 / 24 MiB
DEFAULT_BUDGET_CPU = 96 * 2**20
#: default working-set budget on GPUs
DEFAULT_BUDGET_GPU = 2 * 2**30
#: d-wide (B, P, Lq, d) buffers alive at once on the inference path (A/diff, F, new F, F*Q)
LIVE_WIDE_BUFFERS = 4
#: the same under autograd, where a block's recompute in backward keeps every d-wide tensor its
#: backward needs: measured with the CPU allocator's profile, coop_rcar T = 2, 8 x 48 pairs,
#: d 256 (tests/test_memory.py)
LIVE_WIDE_BUFFERS_TRAIN = 17


def _l2n(x: Tensor, inplace: bool) -> Tensor:
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x.div_(n.add_(EPS)) if inplace else x / (n + EPS)


def _tanh(x: Tensor, inplace: bool) -> Tensor:
    """tanh(x). On CPU as 2 sigmoid(2x) - 1: torch's float32 tanh there is ~6x slower than its
    sigmoid (measured 3.1 ms vs 0.5 ms per 1.2M floats, one core), and the absolute error stays
    ~1e-7. On other devices torch.tanh, one pass over memory where the trick takes four."""
    if x.device.type != "cpu":
        return torch.tanh_(x) if inplace else torch.tanh(x)
    if inplace:
        return torch.sigmoid_(x.mul_(2.0)).mul_(2.0).sub_(1.0)
    return torch.sigmoid(x * 2.0) * 2.0 - 1.0


def _linear(x: Tensor, w: Mapping[str, Tensor], name: str) -> Tensor:
    return F.linear(x, w[name + ".weight"], w[name + ".bias"])


def rcr_step(E: Tensor, Fq: Optional[Tensor], lam, w: Mapping[str, Tensor], prefix: str,
             inplace: bool, out: Optional[Tensor] = None):
    """One RCR step in plain torch on any (..., Lq, s) E: F None means all ones.

    (F, lam) <- (clamp(tanh(rcr_matrix_w(E)) + F, -1, 1), relu(rcr_smooth_w(E) + lam)).
    Shared-weight products only, so backends that do not fuse RCR call it too. ``out``: a
    buffer of F's shape for the new factors (inference only; must not be ``Fq``).
    """
    hidden = _tanh(_linear(E, w, prefix + "rcr_matrix_w.0"), inplace)
    if out is not None:
        m = torch.addmm(w[prefix + "rcr_matrix_w.2.bias"], hidden.view(-1, hidden.shape[-1]),
                        w[prefix + "rcr_matrix_w.2.weight"].t(), out=out.view(-1, out.shape[-1])).view(out.shape)
    else:
        m = _linear(hidden, w, prefix + "rcr_matrix_w.2")
    m = _tanh(m, inplace)
    if Fq is None:
        Fn = m.add_(1.0).clamp_(-1.0, 1.0) if inplace else torch.clamp(m + 1.0, -1.0, 1.0)
    else:
        Fn = m.add_(Fq).clamp_(-1.0, 1.0) if inplace else torch.clamp(m + Fq, -1.0, 1.0)
    sm = _linear(_tanh(_linear(E, w, prefix + "rcr_smooth_w.0"), inplace), w, prefix + "rcr_smooth_w.2")
    return Fn, torch.relu(sm.squeeze(-1) + lam)


class Workspace:
    """Reused buffers for the d-wide temporaries of the inference path.

    A fresh 25 MB CPU tensor costs page faults on first touch: measured 9.1 ms for F * Q into a
    new (15, 17, 24, 1024) tensor against 2.2 ms into a reused one (one core). Blocks of one
    call all reuse the same few buffers instead.
    """

    def __init__(self):
        self._bufs = {}

    def get(self, name: str, shape, like: Tensor) -> Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(n)
            self._bufs[name] = buf
        return buf[:n].view(shape)


class Block:
    """One block of the pair grid in (B, P, Lq, .) layout; see the module docstring."""

    def __init__(self, query: Tensor, qmask: Optional[Tensor], context: Tensor,
                 cmask: Optional[Tensor], inplace: bool, workspace: Optional[Workspace] = None,
                 pairs: Optional[Tuple[Tensor, Tensor, str]] = None):
        self.query, self.qmask = query, qmask          # (P, Lq, d), (P, Lq) or None = all valid
        self.context, self.cmask = context, cmask      # (B, Lc, d), (B, Lc) or None
        # (global image indices, global caption indices, attn_type): names the dropout masks
        if pairs is None:
            n_img, n_cap = (context.shape[0], query.shape[0])
            pairs = (torch.arange(n_img), torch.arange(n_cap), "t2i")
        self.pairs = pairs
        self.inplace = inplace
        self.ws = workspace if inplace else None        # buffers only where nothing is saved
        self.qcount = (query.new_full((query.shape[0],), query.shape[1]) if qmask is None
                       else qmask.sum(1).to(query.dtype))

    def _buf(self, name: str, shape) -> Tensor:
        return self.ws.get(name, shape, self.query)

    @property
    def neg_query(self) -> Tensor:
        if not hasattr(self, "_neg_query"):
            self._neg_query = -self.query
        return self._neg_query

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.context.shape[0], self.query.shape[0], self.query.shape[1]

    # -- adaptive attention ------------------------------------------------------------
    def attention(self, Fq: Optional[Tensor], lam) -> Tensor:
        """l2n(A(Q, C, F, lam)) for every pair of the block: (B, P, Lq, d)."""
        U, n = self.attend(Fq, lam)
        return U.div_(n) if self.inplace else U / n

    def attend(self, Fq: Optional[Tensor], lam):
        """(U, ||U|| + 1e-8) of A(Q, C, F, lam): the attended context before normalisation."""
        Q, C = self.query, self.context
        B, P, Lq = self.shape
        Lc, d = C.shape[1], C.shape[2]
        if Fq is None:   # F = 1: one product of all query words against all context positions
            S = torch.matmul(C.reshape(B * Lc, d), Q.reshape(P * Lq, d).t())
            S = S.view(B, Lc, P, Lq).permute(0, 2, 3, 1)                  # (B, P, Lq, Lc)
        else:
            # Fq is needed again by the next RCR step: F * Q goes to its own buffer
            FQ = torch.mul(Fq, Q, out=self._buf("fq", (B, P, Lq, d))) if self.ws else Fq * Q
            S = torch.matmul(FQ.reshape(B, P * Lq, d), C.transpose(1, 2)).view(B, P, Lq, Lc)
            del FQ
        S = F.leaky_relu(S, 0.1)
        if self.qmask is not None:
            S = torch.where(self.qmask[None, :, :, None], S, S.new_zeros(()))
        Sn = S / (torch.linalg.vector_norm(S, dim=2, keepdim=True) + EPS)    # across queries
        logits = Sn * (lam.unsqueeze(-1) if isinstance(lam, Tensor) else lam)
        if self.cmask is not None:
            logits = torch.where(self.cmask[:, None, None, :], logits, logits.new_full((), -math.inf))
        Pm = torch.softmax(logits, dim=-1)                               # over context positions
        if self.ws:
            U = torch.bmm(Pm.reshape(B, P * Lq, Lc), C, out=self._buf("u", (B, P * Lq, d)))
        else:
            U = torch.matmul(Pm.reshape(B, P * Lq, Lc), C)
        U = U.view(B, P, Lq, d)
        n = torch.linalg.vector_norm(U, dim=-1, keepdim=True)
        return U, (n.add_(EPS) if self.inplace else n + EPS)

    # -- alignment vectors ---------------------------------------------------------------
    def alignment(self, Fq: Optional[Tensor], lam, w: Mapping[str, Tensor], name: str) -> Tensor:
        """E = l2n(W (Q - A(Q, C, F, lam))^2 + b): (B, P, Lq, s)."""
        U, n = self.attend(Fq, lam)
        if self.inplace:     # A - Q in one pass over the d-wide U, into U itself
            D = torch.addcdiv(self.neg_query, U, n, out=U).square_()
        else:
            D = torch.addcdiv(-self.query, U, n).square()
        return _l2n(_linear(D, w, name), self.inplace)

    # -- RCR -----------------------------------------------------------------------------
    def rcr(self, E: Tensor, Fq: Optional[Tensor], lam, w: Mapping[str, Tensor], prefix: str,
            step: int = 0):
        """(F, lam) <- (clamp(tanh(MLP(E)) + F, -1, 1), relu(MLP'(E) + lam))."""
        out = None
        if self.ws:   # alternate two buffers: the new F must not overwrite the old one
            out = self._buf(f"f{step % 2}", tuple(E.shape[:-1]) + (self.query.shape[-1],))
        return rcr_step(E, Fq, lam, w, prefix, self.inplace, out)

    # -- RAR -----------------------------------------------------------------------------
    def mean_valid(self, E: Tensor) -> Tensor:
        """Plain mean of E over the valid query positions: (B, P, s)."""
        if self.qmask is not None:
            E = torch.where(self.qmask[None, :, :, None], E, E.new_zeros(()))
        return E.sum(dim=2) / self.qcount[None, :, None]

    def keep_masks(self, step: int, E: Tensor) -> Tuple[Tensor, Tensor]:
        """RAR step ``step``'s dropout keep-masks for this block's pairs, block layout."""
        images, captions, attn_type = self.pairs
        B, P, Lq, S = E.shape
        keep_k, keep_g = rar_keep_masks(step, images, captions, Lq, S, E.dtype, E.device)
        if attn_type == "i2t":      # pair grid (images, captions) -> block (captions, images)
            keep_k, keep_g = keep_k.transpose(0, 1), keep_g.transpose(0, 1)
        return keep_k, keep_g

    def rar(self, E: Tensor, h: Tensor, w: Mapping[str, Tensor], prefix: str, training: bool,
            step: int = 0) -> Tensor:
        """h <- l2n(sum_q a[q] E[q]), a = softmax over valid q of v(K[q] * g); in training K and
        g are multiplied by RAR step ``step``'s keep-masks (rcar_fast.dropout)."""
        ip = self.inplace
        K = _tanh(_linear(E, w, prefix + "rar_k_w.0"), ip)
        g = _tanh(_linear(h, w, prefix + "rar_q_w.0"), ip)
        if training:
            keep_k, keep_g = self.keep_masks(step, E)
            K, g = K * keep_k, g * keep_g
        logits = _linear(K * g.unsqueeze(2), w, prefix + "rar_v_w.0").squeeze(-1)   # (B, P, Lq)
        if self.qmask is not None:
            logits = torch.where(self.qmask[None], logits, logits.new_full((), -math.inf))
        a = torch.softmax(logits, dim=-1)
        return _l2n(torch.matmul(a.unsqueeze(2), E).squeeze(2), self.inplace)

    def cosine_mean(self, A: Tensor) -> Tensor:
        """mean over valid q of cos(Q[q], A[q]): (B, P)."""
        Q = self.query
        num = (A * Q).sum(-1)
        den = torch.linalg.vector_norm(A, dim=-1) * torch.linalg.vector_norm(Q, dim=-1)
        cos = num / torch.clamp(den, min=EPS)
        if self.qmask is not None:
            cos = torch.where(self.qmask[None], cos, cos.new_zeros(()))
        return cos.sum(-1) / self.qcount[None]

    # -- the whole similarity ------------------------------------------------------------
    def scores(self, params: Mapping[str, Tensor], regulator: str, steps: int, smooth: float,
               training: bool) -> Tensor:
        """SPEC.md's scores for every pair of the block: (B, P)."""
        Fq, lam = None, smooth
        if regulator == "only_rcr":
            for t in range(steps):
                E = self.alignment(Fq, lam, params, f"alv_modules.{t}.sim_transform_w")
                Fq, lam = self.rcr(E, Fq, lam, params, f"rcr_modules.{t}.", t)
            return self.cosine_mean(self.attention(Fq, lam))
        n_alv = 1 if regulator == "only_rar" else steps
        h = None
        for t in range(n_alv):
            E = self.alignment(Fq, lam, params, f"alv_modules.{t}.sim_transform_w")
            if h is None:
                h = self.mean_valid(E)
            if regulator == "coop_rcar":
                if t < steps - 1:
                    Fq, lam = self.rcr(E, Fq, lam, params, f"rcr_modules.{t}.", t)
                h = self.rar(E, h, params, f"rar_modules.{t}.", training, t)
            else:   # only_rar: T RAR steps over the one E
                for k in range(steps):
                    h = self.rar(E, h, params, f"rar_modules.{k}.", training, k)
        return torch.sigmoid(_linear(h, params, "sim_eval_w")).squeeze(-1)


# ----------------------------------------------------------------------------- grid helpers

def _valid_mask(cap_lens: Tensor, L: int) -> Tensor:
    return torch.arange(L, device=cap_lens.device)[None, :] < cap_lens[:, None]


def _clean(cap: Tensor, mask: Tensor) -> Tensor:
    """Padding replaced by zeros by selection (a NaN there never reaches a product)."""
    return torch.where(mask[..., None], cap, cap.new_zeros(()))


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def make_block(img: Tensor, cap: Tensor, cap_lens: Tensor, attn_type: str, inplace: bool,
               workspace: Optional[Workspace] = None, images: Optional[Tensor] = None,
               captions: Optional[Tensor] = None) -> Block:
    """A block over all of img x cap (cap already cut to the block's longest caption);
    ``images``/``captions``: their global indices (default 0..n-1), naming the dropout masks."""
    mask = _valid_mask(cap_lens.to(cap.device), cap.shape[1])
    full = bool(mask.all())
    words = cap if full else _clean(cap, mask)
    m = None if full else mask
    pairs = (torch.arange(img.shape[0]) if images is None else images,
             torch.arange(cap.shape[0]) if captions is None else captions, attn_type)
    if attn_type == "t2i":
        return Block(words, m, img, None, inplace, workspace, pairs)
    return Block(img, None, words, m, inplace, workspace, pairs)


def _to_block_layout(x, attn_type: str):
    """(N_i, N_c, ...) pair tensor -> (B, P, ...) layout."""
    if isinstance(x, Tensor) and x.dim() >= 3 and attn_type == "i2t":
        return x.transpose(0, 1)
    return x


def _from_block_layout(x: Tensor, attn_type: str) -> Tensor:
    return x.transpose(0, 1).contiguous() if attn_type == "i2t" else x


def _zero_padded_queries(x: Tensor, cap_lens: Tensor, attn_type: str) -> Tensor:
    if attn_type != "t2i":
        return x
    mask = _valid_mask(cap_lens.to(x.device), x.shape[2])
    shape = (1, mask.shape[0], mask.shape[1]) + (1,) * (x.dim() - 3)
    return torch.where(mask.view(shape), x, x.new_zeros(()))


def _state_in(factors, temperatures, cap_lens, attn_type):
    """Caller's factors/temperatures in block layout, padded query rows selected to zero (they
    may hold anything, and a NaN there would reach the backward products through F * Q)."""
    if factors is not None:
        factors = _to_block_layout(_zero_padded_queries(factors, cap_lens, attn_type), attn_type)
    if isinstance(temperatures, Tensor):
        temperatures = _to_block_layout(_zero_padded_queries(temperatures, cap_lens, attn_type), attn_type)
    return factors, temperatures


# ----------------------------------------------------------------------------- the pieces

def adaptive_attention(img, cap, cap_lens, factors, temperatures, attn_type):
    blk = make_block(img, cap, cap_lens, attn_type, inplace=not _needs_grad([img, cap, factors, temperatures]))
    A = blk.attention(*_state_in(factors, temperatures, cap_lens, attn_type))
    return _zero_padded_queries(_from_block_layout(A, attn_type), cap_lens, attn_type)


def alignment(img, cap, cap_lens, weight, bias, factors, temperatures, attn_type):
    tensors = [img, cap, factors, temperatures, weight, bias]
    blk = make_block(img, cap, cap_lens, attn_type, inplace=not _needs_grad(tensors))
    E = blk.alignment(*_state_in(factors, temperatures, cap_lens, attn_type), {"w.weight": weight, "w.bias": bias}, "w")
    return _zero_padded_queries(_from_block_layout(E, attn_type), cap_lens, attn_type)


def rcr_update(E, factors, temperatures, cap_lens, weights, attn_type):
    tensors = [E, factors, temperatures, *weights.values()]
    # padded rows may hold anything: select them away before any product
    E = _zero_padded_queries(E, cap_lens, attn_type)
    if factors is not None:
        factors = _zero_padded_queries(factors, cap_lens, attn_type)
    if isinstance(temperatures, Tensor):
        temperatures = _zero_padded_queries(temperatures, cap_lens, attn_type)
    blk = Block(E.new_zeros(1, 1, 1), None, E.new_zeros(1, 1, 1), None, not _needs_grad(tensors))
    Fn, lam = blk.rcr(E, factors, temperatures, weights, "")
    return (_zero_padded_queries(Fn, cap_lens, attn_type),
            _zero_padded_queries(lam, cap_lens, attn_type))


def rar_update(E, h, cap_lens, weights, attn_type, training):
    Eb = _to_block_layout(E, attn_type)
    B, P, Lq, _ = Eb.shape
    qmask = None
    if attn_type == "t2i":
        qmask = _valid_mask(cap_lens.to(E.device), Lq)
        if bool(qmask.all()):
            qmask = None
    n_i, n_c = E.shape[0], E.shape[1]
    blk = Block(E.new_zeros(P, Lq, 1), qmask, E.new_zeros(B, 1, 1), None,
                inplace=not _needs_grad([E, h, *weights.values()]),
                pairs=(torch.arange(n_i), torch.arange(n_c), attn_type))
    if qmask is not None:   # padded rows of E may hold anything
        Eb = torch.where(qmask[None, :, :, None], Eb, Eb.new_zeros(()))
    hb = blk.mean_valid(Eb) if h is None else _to_block_layout(h, attn_type)
    return _from_block_layout(blk.rar(Eb, hb, weights, "", training), attn_type)


# ----------------------------------------------------------------------------- the scores

def _block_scores(img, cap, lens, i0, i1, cidx, Lg, attn_type, params, regulator, steps, smooth, training,
                  inplace, workspace):
    """SPEC.md's scores of the block img[i0:i1] x cap[cidx, :Lg], (B, P) layout. The block is cut
    here, inside the checkpointed function, so that autograd saves the whole inputs once (by
    reference), not a copy of every block's captions."""
    blk = make_block(img[i0:i1], cap.index_select(0, cidx)[:, :Lg], lens.index_select(0, cidx), attn_type,
                     inplace, workspace, torch.arange(i0, i1), cidx)
    return blk.scores(params, regulator, steps, smooth, training)


def rcar_scores(img: Tensor, cap: Tensor, cap_lens: Tensor, params: Mapping[str, Tensor],
                regulator: str, steps: int, attn_type: str, smooth: float, training: bool,
                memory_budget: Optional[int] = None) -> Tensor:
    """scores (N_i, N_c) computed block by block (see the module docstring)."""
    n_i, R, d = img.shape
    n_c = cap.shape[0]
    if memory_budget is None:
        memory_budget = DEFAULT_BUDGET_GPU if img.is_cuda else DEFAULT_BUDGET_CPU
    inplace = not _needs_grad([img, cap, *params.values()])
    lens_list = [int(x) for x in cap_lens.tolist()]
    lens_dev = cap_lens.to(cap.device)
    out = img.new_empty(n_i, n_c)
    ws = Workspace() if inplace else None
    for cols, Lg, i0, i1 in iter_blocks(lens_list, n_i, R, d, attn_type, img.element_size(),
                                        memory_budget, LIVE_WIDE_BUFFERS if inplace else LIVE_WIDE_BUFFERS_TRAIN):
        cidx = torch.tensor(cols, device=cap.device)
        block_args = (img, cap, lens_dev, i0, i1, cidx, Lg, attn_type, params, regulator, steps, smooth, training)
        if inplace:
            s = _block_scores(*block_args, True, ws)
        else:
            # autograd: the block is recomputed in backward (activation checkpointing), so no
            # block keeps its d-wide intermediates alive until the backward pass; the peak is
            # one block's, set by memory_budget; the RNG is replayed (same dropout masks)
            s = torch.utils.checkpoint.checkpoint(_block_scores, *block_args, False, None,
                                                  use_reentrant=False, preserve_rng_state=True)
        out[i0:i1, cidx] = s if attn_type == "t2i" else s.t()
    return out
