"""RCAR's regulators as plug-and-play modules, and RCARSimilarity built from them.

The paper's point is that the regulators plug into any cross-attention matcher. Each module
holds the release's parameters under the release's names and has a ``forward`` over the whole
(image, caption) pair grid, on any backend (``backend=``, as rcar_fast.ops):

  AdaptiveAttention   l2n(A(Q, C, F, lam)) (N_i, N_c, Lq, d); no parameters
  AlignmentVector     E = l2n(W (Q - A)^2 + b) (N_i, N_c, Lq, s); ``sim_transform_w``
  RCRModule           one RCR step: (E, F, lam) -> (F, lam); ``rcr_matrix_w``, ``rcr_smooth_w``
  RARModule           one RAR step: (E, h) -> h (N_i, N_c, s); ``rar_q_w``, ``rar_k_w``, ``rar_v_w``
                      (dropout in training mode)

RCARSimilarity holds them as the release does and scores with the fused pipeline (the whole
schedule per block of the pair grid, rcar_fast.pipeline), not by calling them one by one. A
state dict of the public release's similarity encoder loads with ``strict=True``:
``sim_eval_w``, ``alv_modules.{t}.sim_transform_w``, ``rcr_modules.{t}.rcr_matrix_w.{0,2}``,
``rcr_modules.{t}.rcr_smooth_w.{0,2}``, ``rar_modules.{t}.rar_{q,k,v}_w.0`` (SPEC.md).
A full release checkpoint keeps them under ``sim_enc.`` of its ``model`` entry; see
:func:`sim_state_from_checkpoint`.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

from . import ops
from . import validate as V
from .dropout import RAR_DROPOUT


def _init_linear(layer: nn.Linear) -> nn.Linear:
    """The release's initialisation: uniform in +-sqrt(6 / (fan_in + fan_out)), bias 0."""
    r = math.sqrt(6.0) / math.sqrt(layer.in_features + layer.out_features)
    nn.init.uniform_(layer.weight, -r, r)
    nn.init.zeros_(layer.bias)
    return layer


def _own(module: nn.Module) -> dict:
    """The module's parameters by their own names (as the ops take a module's weights)."""
    return dict(module.named_parameters())


class AdaptiveAttention(nn.Module):
    """Region-word attention with adaptive factors (no parameters).

    ``forward(img (N_i, R, d), cap (N_c, L, d), cap_lens (N_c,), factors=None, temperatures=None)``
    returns l2n(A(Q, C, F, lam)) (N_i, N_c, Lq, d); factors None means F = 1, temperatures None
    the first-step temperature of ``attn_type`` (10.0 t2i, 3.0 i2t). See
    :func:`rcar_fast.ops.adaptive_attention`."""

    def __init__(self, attn_type: str = "t2i", backend: str = "auto"):
        super().__init__()
        V.check_attn_type(attn_type)
        self.attn_type, self.backend = attn_type, backend

    def forward(self, img, cap, cap_lens, factors=None, temperatures=None):
        return ops.adaptive_attention(img, cap, cap_lens, factors, temperatures, self.attn_type, self.backend)


class AlignmentVector(nn.Module):
    """Holds ``sim_transform_w`` (d -> s).

    ``forward(img, cap, cap_lens, factors=None, temperatures=None)`` returns the alignment
    vectors E = l2n(W (Q - A(Q, C, F, lam))^2 + b) (N_i, N_c, Lq, s); see
    :func:`rcar_fast.ops.alignment`."""

    def __init__(self, embed_dim: int, sim_dim: int, attn_type: str = "t2i", backend: str = "auto"):
        super().__init__()
        V.check_attn_type(attn_type)
        self.attn_type, self.backend = attn_type, backend
        self.sim_transform_w = _init_linear(nn.Linear(embed_dim, sim_dim))

    def forward(self, img, cap, cap_lens, factors=None, temperatures=None):
        return ops.alignment(img, cap, cap_lens, self.sim_transform_w.weight, self.sim_transform_w.bias,
                             factors, temperatures, self.attn_type, self.backend)


class RCRModule(nn.Module):
    """The recurrent correspondence regulator: factors MLP s -> 2s -> d and temperature MLP
    s -> s/2 -> 1.

    ``forward(E (N_i, N_c, Lq, s), factors, temperatures, cap_lens)`` returns one step's
    (F (N_i, N_c, Lq, d), lam (N_i, N_c, Lq)): F <- clamp(tanh(rcr_matrix_w(E)) + F, -1, 1),
    lam <- relu(rcr_smooth_w(E) + lam); factors None means F = 1, temperatures None the
    first-step temperature. See :func:`rcar_fast.ops.rcr_update`."""

    def __init__(self, embed_dim: int, sim_dim: int, attn_type: str = "t2i", backend: str = "auto"):
        super().__init__()
        V.check_attn_type(attn_type)
        self.attn_type, self.backend = attn_type, backend
        self.rcr_matrix_w = nn.Sequential(_init_linear(nn.Linear(sim_dim, sim_dim * 2)), nn.Tanh(),
                                          _init_linear(nn.Linear(sim_dim * 2, embed_dim)))
        self.rcr_smooth_w = nn.Sequential(_init_linear(nn.Linear(sim_dim, sim_dim // 2)), nn.Tanh(),
                                          _init_linear(nn.Linear(sim_dim // 2, 1)))

    def forward(self, E, factors, temperatures, cap_lens):
        return ops.rcr_update(E, factors, temperatures, cap_lens, _own(self), self.attn_type, self.backend)


class RARModule(nn.Module):
    """The recurrent aggregation regulator: key and query s -> s with Tanh and Dropout(0.4),
    value s -> 1.

    ``forward(E (N_i, N_c, Lq, s), h, cap_lens)`` returns one step's h (N_i, N_c, s):
    h <- l2n(sum_q a[q] E[q]), a = softmax over valid q of rar_v_w(rar_k_w(E)[q] * rar_q_w(h));
    h None starts from the plain mean of E. Dropout acts in training mode. See
    :func:`rcar_fast.ops.rar_update`."""

    def __init__(self, sim_dim: int, attn_type: str = "t2i", backend: str = "auto"):
        super().__init__()
        V.check_attn_type(attn_type)
        self.attn_type, self.backend = attn_type, backend
        self.rar_q_w = nn.Sequential(_init_linear(nn.Linear(sim_dim, sim_dim)), nn.Tanh(), nn.Dropout(RAR_DROPOUT))
        self.rar_k_w = nn.Sequential(_init_linear(nn.Linear(sim_dim, sim_dim)), nn.Tanh(), nn.Dropout(RAR_DROPOUT))
        self.rar_v_w = nn.Sequential(_init_linear(nn.Linear(sim_dim, 1)))

    def forward(self, E, h, cap_lens):
        return ops.rar_update(E, h, cap_lens, _own(self), self.attn_type, self.training, self.backend)


class RCARSimilarity(nn.Module):
    """RCAR similarity head: scores every image against every caption.

    Args:
        embed_dim: d, the feature size of regions and words (1024 in the release).
        sim_dim: s, the width of the alignment vectors (256); even.
        regulator: "only_rar" (steps >= 1), "only_rcr" (steps >= 0; 0 is plain SCAN) or
            "coop_rcar" (steps >= 1; the paper's models use 2).
        steps: T, the number of regulator steps.
        attn_type: "t2i" (words attend to regions) or "i2t" (regions attend to words).
        smooth: the first-step softmax temperature; None means 10.0 for t2i and 3.0 for i2t.

    Built from the regulator modules above (``alv_modules``, ``rcr_modules``, ``rar_modules``,
    as the release names them) and ``sim_eval_w``; scores with the fused pipeline.

    ``forward(img (N_i, R, d), cap (N_c, L, d), cap_lens (N_c,), backend="auto",
    memory_budget=None)`` returns the (N_i, N_c) scores (float32 for float16/bfloat16 features;
    see :func:`rcar_fast.ops.rcar_scores`). In training mode RAR's dropout is active.
    """

    def __init__(self, embed_dim: int = 1024, sim_dim: int = 256, regulator: str = "coop_rcar",
                 steps: int = 2, attn_type: str = "t2i", smooth: Optional[float] = None):
        super().__init__()
        V.check_config(regulator, steps, attn_type)
        for name, v in (("embed_dim", embed_dim), ("sim_dim", sim_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if sim_dim < 2 or sim_dim % 2:
            raise ValueError(f"sim_dim: must be even (rcr_smooth_w halves it), got {sim_dim}")
        self.embed_dim, self.sim_dim = embed_dim, sim_dim
        self.regulator, self.steps, self.attn_type = regulator, int(steps), attn_type
        self.smooth = ops.default_smooth(attn_type) if smooth is None else \
            V.check_temperatures("smooth", smooth, (), torch.empty(0))
        n_alv = 1 if regulator == "only_rar" else steps
        n_rcr = {"only_rar": 0, "only_rcr": steps, "coop_rcar": steps - 1}[regulator]
        n_rar = 0 if regulator == "only_rcr" else steps
        self.sim_eval_w = _init_linear(nn.Linear(sim_dim, 1))
        self.alv_modules = nn.ModuleList(AlignmentVector(embed_dim, sim_dim, attn_type) for _ in range(n_alv))
        self.rcr_modules = nn.ModuleList(RCRModule(embed_dim, sim_dim, attn_type) for _ in range(n_rcr))
        self.rar_modules = nn.ModuleList(RARModule(sim_dim, attn_type) for _ in range(n_rar))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, sim_dim={self.sim_dim}, regulator={self.regulator!r}, "
                f"steps={self.steps}, attn_type={self.attn_type!r}, smooth={self.smooth}")

    def forward(self, img: torch.Tensor, cap: torch.Tensor, cap_lens, backend: str = "auto",
                memory_budget: Optional[int] = None) -> torch.Tensor:
        if isinstance(img, torch.Tensor) and img.dim() == 3 and img.shape[2] != self.embed_dim:
            raise ValueError(f"img: feature size d={img.shape[2]} does not match embed_dim={self.embed_dim}")
        params = dict(self.named_parameters())
        return ops.rcar_scores(img, cap, cap_lens, params, self.regulator, self.steps,
                               self.attn_type, self.smooth, self.training, backend, memory_budget)

    def pair_scores(self, img: torch.Tensor, cap: torch.Tensor, cap_lens, img_index, cap_index,
                    backend: str = "auto", memory_budget: Optional[int] = None) -> torch.Tensor:
        """Scores (M,) of the listed pairs (img[img_index[m]], cap[cap_index[m]]), equal to
        ``self(img, cap, cap_lens)[img_index, cap_index]`` (:func:`rcar_fast.ops.pair_scores`)."""
        if isinstance(img, torch.Tensor) and img.dim() == 3 and img.shape[2] != self.embed_dim:
            raise ValueError(f"img: feature size d={img.shape[2]} does not match embed_dim={self.embed_dim}")
        params = dict(self.named_parameters())
        return ops.pair_scores(img, cap, cap_lens, img_index, cap_index, params, self.regulator, self.steps,
                               self.attn_type, self.smooth, self.training, backend, memory_budget)


def sim_state_from_checkpoint(checkpoint: Mapping) -> dict:
    """The similarity head's state dict out of a full release checkpoint (its ``model`` entry,
    keys ``sim_enc.*``, or ``module.sim_enc.*`` as the release saves it from nn.DataParallel),
    ready for ``RCARSimilarity.load_state_dict(..., strict=True)``."""
    model = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(model, Mapping):
        raise ValueError("checkpoint: expected a mapping with a 'model' state dict")
    state = {}
    for k, v in model.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("sim_enc."):
            state[k[len("sim_enc."):]] = v
    if not state:
        raise ValueError("checkpoint: no 'sim_enc.' entries in its model state dict")
    return state
