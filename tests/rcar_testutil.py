"""Shared helpers of the CPU test tier: random inputs with NaN padding, random heads."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

import rcar_fast

NAN = float("nan")

#: every (regulator, steps) set-up the parity tests cover
CONFIGS = ([("only_rar", t) for t in (1, 2, 3)] + [("only_rcr", t) for t in (0, 1, 2, 3)]
           + [("coop_rcar", t) for t in (1, 2, 3)])
ATTN_TYPES = ("t2i", "i2t")


def make_lens(n_c: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """Random lengths in [1, L]; with two or more captions always one of length 1 and one of L."""
    lens = torch.randint(1, L + 1, (n_c,), generator=gen)
    if n_c >= 2:
        perm = torch.randperm(n_c, generator=gen)
        lens[perm[0]] = 1
        lens[perm[1]] = L
    elif n_c == 1:
        lens[0] = L
    return lens


def make_inputs(n_i: int, n_c: int, R: int, L: int, d: int, dtype=torch.float64, seed: int = 0,
                lens: Optional[Sequence[int]] = None, pad=NAN):
    """img (n_i, R, d), cap (n_c, L, d) with ``pad`` (NaN) at every padded word, lens (n_c,)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n_i, R, d, generator=gen, dtype=torch.float64)
    cap = torch.randn(n_c, L, d, generator=gen, dtype=torch.float64)
    if lens is None:
        lens = make_lens(n_c, L, gen)
    else:
        lens = torch.as_tensor(list(lens), dtype=torch.int64)
    if pad is not None:
        for j, lj in enumerate(lens.tolist()):
            cap[j, lj:] = pad
    return img.to(dtype), cap.to(dtype), lens


def pad_mask(lens: torch.Tensor, L: int) -> torch.Tensor:
    """(N_c, L) True at valid word positions."""
    return torch.arange(L)[None, :] < lens[:, None]


def query_mask(n_i: int, lens: torch.Tensor, Lq: int, attn_type: str) -> torch.Tensor:
    """(N_i, N_c, Lq) True at valid query positions of every pair."""
    if attn_type == "t2i":
        m = pad_mask(lens, Lq)
    else:
        m = torch.ones(lens.shape[0], Lq, dtype=torch.bool)
    return m.unsqueeze(0).expand(n_i, -1, -1)


def randomize_(module: torch.nn.Module, seed: int, bias_scale: float = 0.2) -> torch.nn.Module:
    """Random weights (about the release's init scale) and non-zero biases, so that a
    parameter used in the wrong place changes the numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                fan_out, fan_in = p.shape
                r = 1.5 * math.sqrt(6.0 / (fan_in + fan_out))
                p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * r)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * bias_scale)
    return module


def make_head(regulator: str, steps: int, attn_type: str, d: int = 40, s: int = 16,
              dtype=torch.float64, seed: int = 0, smooth=None) -> rcar_fast.RCARSimilarity:
    torch.manual_seed(seed)
    m = rcar_fast.RCARSimilarity(embed_dim=d, sim_dim=s, regulator=regulator, steps=steps,
                                 attn_type=attn_type, smooth=smooth)
    randomize_(m, seed + 1000)
    return m.to(dtype).eval()


def params_of(module: torch.nn.Module, detach: bool = False) -> Dict[str, torch.Tensor]:
    if detach:
        return {k: v.detach() for k, v in module.named_parameters()}
    return dict(module.named_parameters())


def seed_of(*parts) -> int:
    """A stable per-parametrization seed (Python's hash of str is salted per run)."""
    h = 0
    for ch in "|".join(map(str, parts)):
        h = (h * 131 + ord(ch)) % 1_000_003
    return h


def grads(outputs: torch.Tensor, inputs: List[torch.Tensor], weights: torch.Tensor):
    """Gradients of sum(weights * outputs) w.r.t. inputs (None where unused)."""
    return torch.autograd.grad((outputs * weights).sum(), inputs, allow_unused=True)


def index_keep_masks(step, images, captions, lq, width, device):
    """A deterministic RAR dropout source (rcar_fast.dropout.MaskSource): whether position q,
    feature k of pair (i, j) at RAR step ``step`` is kept is a fixed function of those indices
    (60% kept, as Dropout(0.4)), so every backend and block layout applies the same masks."""
    i = images.view(-1, 1, 1, 1)
    j = captions.view(1, -1, 1, 1)
    q = torch.arange(lq, device=device).view(1, 1, -1, 1)
    k = torch.arange(width, device=device).view(1, 1, 1, -1)
    keep_k = (i * 7919 + j * 104729 + q * 1299709 + k * 15485863 + step * 32452843) % 10 >= 4
    kg = torch.arange(width, device=device).view(1, 1, -1)
    keep_g = (i[..., 0] * 7919 + j[..., 0] * 104729 + kg * 49979687 + step * 86028121 + 3) % 10 >= 4
    return keep_k, keep_g


def peak_bytes(fn, device="cpu") -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it started (tensors it
    frees before returning included).

    CUDA: torch.cuda.max_memory_allocated after resetting the peak. CPU: the profiler's memory
    events, which the c10 CPU allocator reports for every allocation and free (those inside the
    compiled extension's C++ kernels and in backward too), summed in time order
    (bench.harness.measure_peak, what the benchmarks' peak column reports)."""
    from bench.harness import measure_peak
    return measure_peak(fn, torch.device(device))[1]


def cpu_backends(*names):
    """pytest params of the backends ``names`` (default torch, cpp, triton) on CPU tensors, each
    skipped with the reason where it cannot run here (cpp without the extension, triton without
    its interpreter)."""
    import pytest
    st = rcar_fast.backend_status()
    out = []
    for name in names or ("torch", "cpp", "triton"):
        here = name in rcar_fast.available_backends("cpu")
        out.append(pytest.param(name, marks=pytest.mark.skipif(not here, reason=f"{name}: {st.get(name, '?')}")))
    return out


RCR_KEYS = ("rcr_matrix_w.0.weight", "rcr_matrix_w.0.bias", "rcr_matrix_w.2.weight", "rcr_matrix_w.2.bias",
            "rcr_smooth_w.0.weight", "rcr_smooth_w.0.bias", "rcr_smooth_w.2.weight", "rcr_smooth_w.2.bias")


def rcr_op(backend: str):
    """The inference rcr op of a backend: the Triton custom op for "triton", else the extension's
    (the C++ CPU kernel on CPU tensors, the CUDA one on CUDA tensors)."""
    if backend == "triton":
        from rcar_fast.backends.triton_kernels import load_kernels
        return load_kernels().triton_rcr
    from rcar_fast.backends import extension_kernels  # noqa: F401  (registers fake and autograd)
    return torch.ops.rcar_fast.rcr.default


def rcr_op_case(B: int, d: int, s: int, with_state: bool, cast, seed: int = 21, nan_valid: bool = False):
    """Inputs of the rcr op (csrc/README.md) and torch's RCR step on them: P = 7 query items of
    lengths 5, 1, 3, 4, 5, 2, 1 (Lq = 5), E, factors and lam NaN at padded rows (factors and lam
    absent without ``with_state``), RCRModule(d, s) weights with nonzero biases. ``cast`` puts a
    tensor in the op's dtype and device; the reference (rcr_step, float64) runs on the cast values.
    ``nan_valid`` also puts a NaN in valid rows, which the reference carries: one entry of E (the
    last context item, query item 0, row 2: that row's F and lam are NaN) and, with the state, one
    entry of the factors (item 3, row 1, column 7: that entry of F) and of lam (item 4, row 0), so
    a kernel whose clamp or relu drops a NaN gives a number where torch gives NaN (compare with
    equal_nan).
    Returns (the op's arguments, want_F, want_lam, pad (P, Lq) on the inputs' device)."""
    from rcar_fast.modules import RCRModule
    from rcar_fast.torch_math import rcr_step
    P, Lq = 7, 5
    g = torch.Generator().manual_seed(seed)
    ql = torch.tensor([5, 1, 3, 4, 5, 2, 1], dtype=torch.int32)
    E = torch.randn(B, P, Lq, s, generator=g, dtype=torch.float64)
    F0 = torch.rand(B, P, Lq, d, generator=g, dtype=torch.float64) * 2 - 1 if with_state else None
    lam0 = torch.rand(B, P, Lq, generator=g, dtype=torch.float64) * 5 if with_state else 4.0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        init = RCRModule(d, s).state_dict()
    w = {k: v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)   # nonzero biases
         for k, v in init.items()}
    rounded = (lambda x: cast(x).double() if isinstance(x, torch.Tensor) else x)
    E, F0, lam0 = rounded(E), rounded(F0), rounded(lam0)
    w = {k: rounded(v) for k, v in w.items()}
    if nan_valid:
        E[B - 1, 0, 2, 3] = float("nan")
        if F0 is not None:
            F0[0, 3, 1, 7] = float("nan")
            lam0[0, 4, 0] = float("nan")
    want_F, want_lam = rcr_step(E.clone(), None if F0 is None else F0.clone(),
                                lam0.clone() if isinstance(lam0, torch.Tensor) else lam0, w, "", False)
    pad = (torch.arange(Lq)[None, :] >= ql[:, None]).to(E.device)
    En, Fn, lamn = E.clone(), None if F0 is None else F0.clone(), lam0
    En[:, pad] = float("nan")
    if Fn is not None:
        Fn[:, pad] = float("nan")
    if isinstance(lam0, torch.Tensor):
        lamn = lam0.clone()
        lamn[:, pad] = float("nan")
    c = (lambda x: cast(x) if isinstance(x, torch.Tensor) else x)
    args = (c(En), ql.to(E.device), c(Fn), c(lamn) if isinstance(lamn, torch.Tensor) else None,
            0.0 if isinstance(lamn, torch.Tensor) else float(lamn), *[c(w[k]) for k in RCR_KEYS])
    return args, want_F, want_lam, pad
