"""The "torch" backend's kernel set: the op contract (rcar_fast.backends.contract) in plain
PyTorch, on any device. Autograd differentiates it as written (no backward ops).

One call works on one block of the pair grid, (B, P, Lq, width) layout: B indexes the context
side, P the query side, and every batched product runs over B; the query source (P, Lq, d) and
the context source (B, Lc, d) are never repeated across pairs, F = 1 and a scalar temperature
stay symbolic. Padded words are replaced by zeros by selection on entry (a NaN there never
reaches a product), masked reductions select too, rows past a pair's query length come back zero.

Speed. Without autograd the element-wise chain runs in place, and the d-wide temporaries live in
a few buffers reused from block to block while the pipeline holds :func:`workspace` open (a
fresh 25 MB CPU tensor costs page faults on first touch: measured 9.1 ms for F * Q into a new
(15, 17, 24, 1024) tensor against 2.2 ms into a reused one, one core). On the CPU a block whose
rows are all valid skips its mask selections (checking costs no device sync there).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import torch_math as tm
from ..constants import EPS
from .contract import KernelSet, mean_start, valid_rows

Tensor = torch.Tensor


class Workspace:
    """Named buffers reused across the blocks of one call (inference only)."""

    def __init__(self):
        self._bufs = {}

    def get(self, name: str, shape, like: Tensor) -> Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(n)
            self._bufs[name] = buf
        return buf[:n].view(shape)


_ACTIVE = threading.local()


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """Buffers for the inference path of every op called inside the block (one per thread)."""
    previous = getattr(_ACTIVE, "ws", None)
    _ACTIVE.ws = Workspace()
    try:
        yield _ACTIVE.ws
    finally:
        _ACTIVE.ws = previous


def _mask(lens: Tensor, n: int) -> Optional[Tensor]:
    """Valid-row mask, or None when every row is valid and that is free to know (CPU)."""
    m = valid_rows(lens, n)
    if lens.device.type == "cpu" and bool(m.all()):
        return None
    return m


class _Block:
    """One call's block: query (P, Lq, d) and context (B, Lc, d) with their masks. Paired
    (``context_index`` (P,) given): pair p is query p with context item context_index[p], B = 1;
    the context rows are gathered per pair ((P, Lc, d): plain torch has no indexed products,
    and autograd scatters their gradient back into the indexed rows)."""

    def __init__(self, query, qlens, context, clens, inplace: bool, context_index=None):
        self.paired = context_index is not None
        if self.paired:
            idx = context_index.long()
            context, clens = context.index_select(0, idx), clens.index_select(0, idx)
        self.qmask, self.cmask = _mask(qlens, query.shape[1]), _mask(clens, context.shape[1])
        self.query = query if self.qmask is None else torch.where(self.qmask[..., None], query, query.new_zeros(()))
        self.context = context if self.cmask is None else torch.where(self.cmask[..., None], context,
                                                                      context.new_zeros(()))
        self.inplace = inplace
        self.ws = getattr(_ACTIVE, "ws", None) if inplace else None   # buffers only where nothing is saved

    def _buf(self, name: str, shape) -> Tensor:
        return self.ws.get(name, shape, self.query)

    def attend(self, factors: Optional[Tensor], lam) -> Tuple[Tensor, Tensor]:
        """(U, ||U|| + 1e-8) of A(Q, C, F, lam): the attended context before normalisation."""
        Q, C = self.query, self.context
        B, P, Lq = (1 if self.paired else C.shape[0]), Q.shape[0], Q.shape[1]
        Lc, d = C.shape[1], C.shape[2]
        if factors is None and not self.paired:   # F = 1: all query words against all context positions
            S = torch.matmul(C.reshape(B * Lc, d), Q.reshape(P * Lq, d).t())
            S = S.view(B, Lc, P, Lq).permute(0, 2, 3, 1)                  # (B, P, Lq, Lc)
        elif factors is None:                      # paired: query p against its own context item
            S = torch.bmm(Q, C.transpose(1, 2)).view(B, P, Lq, Lc)
        else:
            # the factors are needed again by the next RCR step: F * Q goes to its own buffer
            FQ = torch.mul(factors, Q, out=self._buf("fq", (B, P, Lq, d))) if self.ws else factors * Q
            if self.paired:
                S = torch.bmm(FQ.view(P, Lq, d), C.transpose(1, 2)).view(B, P, Lq, Lc)
            else:
                S = torch.matmul(FQ.reshape(B, P * Lq, d), C.transpose(1, 2)).view(B, P, Lq, Lc)
            del FQ
        S = F.leaky_relu(S, 0.1)
        if self.qmask is not None:
            S = torch.where(self.qmask[None, :, :, None], S, S.new_zeros(()))
        Sn = S / (torch.linalg.vector_norm(S, dim=2, keepdim=True) + EPS)    # across queries
        logits = Sn * (lam.unsqueeze(-1) if isinstance(lam, Tensor) else lam)
        if self.cmask is not None:
            cm = self.cmask[None, :, None, :] if self.paired else self.cmask[:, None, None, :]
            logits = torch.where(cm, logits, logits.new_full((), -math.inf))
        Pm = torch.softmax(logits, dim=-1)                               # over context positions
        # paired: one context item per pair, (P, Lq, Lc) x (P, Lc, d); else B x (P Lq, Lc) x (Lc, d)
        Pb, Ub = (Pm.view(P, Lq, Lc), (P, Lq, d)) if self.paired else (Pm.reshape(B, P * Lq, Lc), (B, P * Lq, d))
        if self.ws:
            U = torch.bmm(Pb, C, out=self._buf("u", Ub))
        else:
            U = torch.matmul(Pb, C)
        U = U.view(B, P, Lq, d)
        n = torch.linalg.vector_norm(U, dim=-1, keepdim=True)
        return U, (n.add_(EPS) if self.inplace else n + EPS)

    def zero_padded_rows(self, x: Tensor) -> Tensor:
        if self.qmask is None:
            return x
        return torch.where(self.qmask[None, :, :, None], x, x.new_zeros(()))


def attention(query, qlens, context, clens, factors, lam, lam_scalar, weight, bias, context_index=None):
    """The contract's attention (l2n(A), or E when given the projection), in plain torch; paired
    with ``context_index`` (the contract's docstring)."""
    inplace = not tm.needs_grad([query, context, factors, lam, weight, bias])
    blk = _Block(query, qlens, context, clens, inplace, context_index)
    U, n = blk.attend(factors, lam_scalar if lam is None else lam)
    if weight is None:
        return blk.zero_padded_rows(U.div_(n) if inplace else U / n)
    if inplace:     # A - Q in one pass over the d-wide U, into U itself
        D = torch.addcdiv(-blk.query, U, n, out=U).square_()
    else:
        D = torch.addcdiv(-blk.query, U, n).square()
    return blk.zero_padded_rows(tm.l2n(F.linear(D, weight, bias), inplace))


def rar(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g):
    """The contract's T RAR steps: h <- l2n(sum_q a[q] E[q]), a = softmax over valid q of
    wv . (K[q] * g) + bv, K = tanh(E Wk^T + bk), g = tanh(Wq h + bq), K and g times the keep-masks
    when given."""
    inplace = not tm.needs_grad([E, h0, wq, bq, wk, bk, wv, bv])
    qmask = _mask(qlens, E.shape[2])
    if qmask is not None:       # padded rows may hold anything
        E = torch.where(qmask[None, :, :, None], E, E.new_zeros(()))
    if h0 is not None:
        h = h0
    elif qmask is None:         # every row valid: the plain mean, no selection pass over E
        h = E.mean(dim=2)
    else:
        h = mean_start(E, qlens)
    for t in range(wq.shape[0]):
        K = tm.tanh(F.linear(E, wk[t], bk[t]), inplace)
        g = tm.tanh(F.linear(h, wq[t], bq[t]), inplace)
        if keep_k is not None:
            K, g = K * keep_k, g * keep_g
        logits = F.linear(K * g.unsqueeze(2), wv[t:t + 1], bv[t:t + 1]).squeeze(-1)     # (B, P, Lq)
        if qmask is not None:
            logits = torch.where(qmask[None], logits, logits.new_full((), -math.inf))
        a = torch.softmax(logits, dim=-1)
        h = tm.l2n(torch.matmul(a.unsqueeze(2), E).squeeze(2), inplace)
    return h


def rcr(E, qlens, factors, lam, lam_scalar, w1, b1, w2, b2, ws1, bs1, ws2, bs2):
    """The contract's fused RCR step, inference only: in place, the new factors in a workspace
    buffer other than the one ``factors`` is in (two buffers, alternating)."""
    w = dict(zip(tm.RCR_NAMES, (w1, b1, w2, b2, ws1, bs1, ws2, bs2)))
    ws = getattr(_ACTIVE, "ws", None)
    out = None
    if ws is not None:
        shape = tuple(E.shape[:-1]) + (w2.shape[0],)
        out = ws.get("f0", shape, E)
        if factors is not None and out.data_ptr() == factors.data_ptr():
            out = ws.get("f1", shape, E)
    return tm.rcr_step(E, factors, lam_scalar if lam is None else lam, w, "", True, out)


#: the torch backend: default budget of one block, measured on the 100 x 100 shard, 2 cores:
#: t2i 2980 / 3232 / 3088 pairs/s at 256 / 96 / 24 MiB; d-wide buffers per block: A / (Q - A)^2,
#: F, the new F, F * Q without autograd; 17 with it (what a block's backward needs, measured
#: with the CPU allocator's profile, coop_rcar T = 2, 8 x 48 pairs, d 256: tests/test_memory.py)
KERNELS = KernelSet(name="torch", devices=("cpu", "cuda"), attention=attention, rar=rar,
                    budgets={"cpu": 96 * 2**20, "cuda": 2 * 2**30}, live_buffers=4, live_buffers_train=17,
                    rcr=rcr, rcr_devices=("cpu", "cuda"), workspace=workspace)
