"""Argument checks at the public boundary (rcar_fast.ops, the modules): each failure names the
argument and the fault, and all of them run before any computation. What lies behind the
boundary (the pipeline, the kernel sets, the kernels) trusts its inputs and only asserts.

The caption lengths go to the host once per call (:class:`Lengths`): one transfer, checked
there, and handed on as a list for planning and a tensor for the kernels."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Lengths:
    """Checked caption lengths: ``host`` a list of ints (planning), ``tensor`` int64 (N_c,) on
    the CPU or on the features' device, as given."""
    host: List[int]
    tensor: Tensor

    def __len__(self) -> int:
        return len(self.host)

REGULATORS = ("only_rar", "only_rcr", "coop_rcar")
ATTN_TYPES = ("t2i", "i2t")
#: the smallest step count each regulator set-up allows (SPEC.md)
MIN_STEPS = {"only_rar": 1, "only_rcr": 0, "coop_rcar": 1}


def check_config(regulator, steps, attn_type) -> None:
    if not isinstance(regulator, str) or regulator not in REGULATORS:
        raise ValueError(f"regulator: expected one of {', '.join(REGULATORS)}, got {regulator!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
    if steps < MIN_STEPS[regulator]:
        raise ValueError(f"steps: {regulator} needs steps >= {MIN_STEPS[regulator]}, got {steps}")
    check_attn_type(attn_type)


def check_attn_type(attn_type) -> None:
    if not isinstance(attn_type, str) or attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type: expected 't2i' or 'i2t', got {attn_type!r}")


def check_float(name: str, x, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_features(img, cap, cap_lens, embed_dim: Optional[int] = None) -> Lengths:
    """Checks img (N_i, R, d), cap (N_c, L, d), cap_lens (N_c,); returns the lengths."""
    check_float("img", img, 3)
    check_float("cap", cap, 3)
    if img.shape[2] != cap.shape[2]:
        raise ValueError(f"cap: feature size d={cap.shape[2]} does not match img's d={img.shape[2]}")
    if embed_dim is not None and img.shape[2] != embed_dim:
        raise ValueError(f"img: feature size d={img.shape[2]} does not match embed_dim={embed_dim}")
    if img.dtype != cap.dtype:
        raise TypeError(f"cap: dtype {cap.dtype} differs from img's {img.dtype}")
    if img.device != cap.device:
        raise ValueError(f"cap: on {cap.device} but img is on {img.device}")
    if img.shape[0] > 0 and img.shape[1] < 1:
        raise ValueError(f"img: needs at least one region, got shape {tuple(img.shape)}")
    return check_lens(cap_lens, cap.shape[0], cap.shape[1], cap.device)


def integer_tensor(name: str, x, device) -> Tensor:
    """x as an integer tensor: a list of ints, or an integer tensor on the CPU or ``device``."""
    if isinstance(x, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x):
            raise TypeError(f"{name}: expected integers")
        x = torch.tensor(list(x), dtype=torch.int64)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected an integer tensor or list, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")
    if x.device.type != "cpu" and x.device != device:
        raise ValueError(f"{name}: on {x.device} but the features are on {device}")
    return x


def check_lens(cap_lens, n_c: int, max_len: Optional[int], device) -> Lengths:
    """cap_lens: (n_c,) integers in [1, max_len] (max_len None: no upper bound). A checked
    :class:`Lengths` passes through unchanged; anything else is read to the host once."""
    if isinstance(cap_lens, Lengths):
        return cap_lens
    cap_lens = integer_tensor("cap_lens", cap_lens, device)
    if cap_lens.dim() != 1 or cap_lens.shape[0] != n_c:
        raise ValueError(f"cap_lens: expected shape ({n_c},) to match the captions' N_c, "
                         f"got {tuple(cap_lens.shape)}")
    host = [int(v) for v in cap_lens.tolist()]          # the one transfer to the host
    if host:
        lo, hi = min(host), max(host)
        if lo < 1 or (max_len is not None and hi > max_len):
            bound = f"[1, L={max_len}]" if max_len is not None else ">= 1"
            raise ValueError(f"cap_lens: every length must be in {bound}, got values in [{lo}, {hi}]")
    return Lengths(host, cap_lens.to(torch.int64))


def check_index(name: str, index, n: int, device) -> Tensor:
    """A pair list's index: (M,) integers in [0, n) (a tensor on the CPU or on ``device``, or a
    list); returns it as int64 on the CPU (the one transfer to the host: the pipeline plans the
    list's blocks there)."""
    index = integer_tensor(name, index, device)
    if index.dim() != 1:
        raise ValueError(f"{name}: expected one dimension (M,), got shape {tuple(index.shape)}")
    index = index.to(device="cpu", dtype=torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"{name}: every index must be in [0, {n}), got values in "
                         f"[{int(index.min())}, {int(index.max())}]")
    return index


def check_params(params: Mapping[str, Tensor], names, ref: Tensor, what: str = "params") -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"{what}: expected a mapping of parameter names to tensors")
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"{what}: missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    for n in names:
        p = params[n]
        if not isinstance(p, Tensor):
            raise TypeError(f"{what}[{n!r}]: expected a tensor, got {type(p).__name__}")
        if p.dtype != ref.dtype:
            raise TypeError(f"{what}[{n!r}]: dtype {p.dtype} differs from the features' {ref.dtype}")
        if p.device != ref.device:
            raise ValueError(f"{what}[{n!r}]: on {p.device} but the features are on {ref.device}")


def check_pair_tensor(name: str, x, shape, ref: Tensor) -> None:
    """A per-pair per-position tensor (or None) of exactly ``shape``."""
    if x is None:
        return
    check_float(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} differs from the features' {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: on {x.device} but the features are on {ref.device}")


def check_temperatures(name: str, lam, shape, ref: Tensor):
    if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        return float(lam)
    if shape == () and isinstance(lam, Tensor) and lam.dim() == 0 and lam.is_floating_point():
        return float(lam)   # a scalar temperature is a constant, not a learnable tensor
    check_pair_tensor(name, lam, shape, ref)
    return lam
