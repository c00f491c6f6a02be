"""Counted FLOPs of the RCAR similarity (SPEC.md's cost table), summed over a shard exactly.

Only the matrix products count, as multiply-adds (MACs); FLOPs = 2 x MACs. Element-wise work
(norms, softmax, tanh, the square, clamps) and the RAR value product's reductions are left
out, as in SPEC.md. Per pair, with query length Lq, context length Lc, features d, width s:

    attention call   2 * Lq * Lc * d            (scores S, then the attended context P C)
    alignment step   Lq * d * s                 (projection d -> s)
    RCR step         Lq * (2 s^2 + 2 s d)       (factor MLP s -> 2s -> d)
                   + Lq * (s^2 / 2 + s / 2)     (temperature MLP s -> s/2 -> 1)
    RAR step         Lq * s^2 + s^2 + Lq * s    (keys s -> s per position, query s -> s, value s -> 1)
    final sim_eval   s                          (only_rar and coop_rcar)

    only_rar,  T:  1 attention + 1 alignment, T RAR, sim_eval
    only_rcr,  T:  T (attention + alignment + RCR), then one final attention
    coop_rcar, T:  T (attention + alignment), T - 1 RCR, T RAR, sim_eval

t2i: Lq = len_j (caption j's valid words), Lc = R.  i2t: Lq = R, Lc = len_j.
A training step (forward + backward) is counted as 3 x the forward FLOPs.
"""

from __future__ import annotations

from typing import Iterable

TRAIN_STEP_FACTOR = 3   # backward ~ 2 x forward for products: d(input) and d(weight)


def attention_macs(lq: int, lc: int, d: int) -> int:
    return 2 * lq * lc * d


def alignment_macs(lq: int, d: int, s: int) -> int:
    return lq * d * s


def rcr_macs(lq: int, d: int, s: int) -> int:
    # s*s/2 + s/2 = s*(s+1)/2, kept in integers (s is even by construction; exact either way)
    return lq * (2 * s * s + 2 * s * d) + lq * (s * (s + 1) // 2)


def rar_macs(lq: int, s: int) -> int:
    return lq * s * s + s * s + lq * s


def pair_macs(lq: int, lc: int, d: int, s: int, regulator: str, steps: int) -> int:
    """Multiply-adds of one (image, caption) pair; see the module docstring."""
    att, alv = attention_macs(lq, lc, d), alignment_macs(lq, d, s)
    rcr, rar = rcr_macs(lq, d, s), rar_macs(lq, s)
    if regulator == "only_rar":
        return att + alv + steps * rar + s
    if regulator == "only_rcr":
        return steps * (att + alv + rcr) + att
    if regulator == "coop_rcar":
        return steps * (att + alv) + (steps - 1) * rcr + steps * rar + s
    raise ValueError(f"regulator: unknown {regulator!r}")


def pair_lengths(attn_type: str, regions: int, cap_len: int):
    """(Lq, Lc) of a pair: t2i queries the caption's words, i2t the image's regions."""
    if attn_type == "t2i":
        return cap_len, regions
    if attn_type == "i2t":
        return regions, cap_len
    raise ValueError(f"attn_type: expected 't2i' or 'i2t', got {attn_type!r}")


def shard_flops(n_images: int, cap_lens: Iterable[int], regions: int, d: int, s: int,
                regulator: str, steps: int, attn_type: str) -> int:
    """Counted FLOPs of scoring every image of a shard against every caption (forward)."""
    macs = sum(pair_macs(*pair_lengths(attn_type, regions, int(n)), d, s, regulator, steps)
               for n in cap_lens)
    return 2 * n_images * macs
