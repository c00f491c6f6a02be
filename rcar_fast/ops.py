"""The plug-and-play pieces of RCAR over the whole (image, caption) pair grid, with backends.

Shapes (SPEC.md): ``img`` (N_i, R, d) region features, ``cap`` (N_c, L, d) word features padded
to L, ``cap_lens`` (N_c,) integers in [1, L]. Per-pair, per-position tensors are laid out
(N_i, N_c, Lq, width): Lq = L in t2i (query = the caption's words; rows past a caption's length
are padding) and Lq = R in i2t (query = the image's regions). Padding may hold anything, NaN
included; it never changes a result, and every output here is zero at padded query rows.

Every function takes ``backend=``: "auto" (the fastest available for the inputs' device and
dtype that passes its self-test), "reference" (SPEC.md per caption), "torch" (plain PyTorch),
"triton" (fused kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpp" and
"cuda" (the compiled extension's C++ CPU and CUDA kernels, when built); see
:func:`rcar_fast.available_backends` and :func:`rcar_fast.backend_status`.

This is the public boundary: every argument is checked here, once, before anything is computed
(a bad one raises ValueError or TypeError naming it), the caption lengths go to the host once,
and the backend is resolved; then the call runs the one pipeline (rcar_fast.pipeline) with the
backend's kernel set, or the reference.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from . import pipeline
from . import validate as V
from .backends import kernel_set, resolve
from .constants import DEFAULT_TEMPERATURE

Tensor = torch.Tensor
Temperatures = Union[float, Tensor, None]


def default_smooth(attn_type: str) -> float:
    """The release's first-step temperature ("smooth"): 10.0 for t2i, 3.0 for i2t."""
    return DEFAULT_TEMPERATURE[attn_type]


def parameter_shapes(regulator: str = "coop_rcar", steps: int = 2, embed_dim: int = 1024,
                     sim_dim: int = 256) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of an RCAR similarity head, by its checkpoint name, with its shape."""
    V.check_config(regulator, steps, "t2i")
    d, s = embed_dim, sim_dim
    n_alv = 1 if regulator == "only_rar" else steps
    n_rcr = {"only_rar": 0, "only_rcr": steps, "coop_rcar": steps - 1}[regulator]
    n_rar = 0 if regulator == "only_rcr" else steps
    shapes: Dict[str, Tuple[int, ...]] = {"sim_eval_w.weight": (1, s), "sim_eval_w.bias": (1,)}
    for t in range(n_alv):
        shapes.update({f"alv_modules.{t}.sim_transform_w.weight": (s, d),
                       f"alv_modules.{t}.sim_transform_w.bias": (s,)})
    for t in range(n_rcr):
        shapes.update({f"rcr_modules.{t}.{k}": v for k, v in rcr_shapes(d, s).items()})
    for t in range(n_rar):
        shapes.update({f"rar_modules.{t}.{k}": v for k, v in rar_shapes(s).items()})
    return shapes


def rcr_shapes(embed_dim: int, sim_dim: int) -> Dict[str, Tuple[int, ...]]:
    """One RCR module's parameters (its own names) and shapes."""
    d, s = embed_dim, sim_dim
    return {"rcr_matrix_w.0.weight": (2 * s, s), "rcr_matrix_w.0.bias": (2 * s,),
            "rcr_matrix_w.2.weight": (d, 2 * s), "rcr_matrix_w.2.bias": (d,),
            "rcr_smooth_w.0.weight": (s // 2, s), "rcr_smooth_w.0.bias": (s // 2,),
            "rcr_smooth_w.2.weight": (1, s // 2), "rcr_smooth_w.2.bias": (1,)}


def rar_shapes(sim_dim: int) -> Dict[str, Tuple[int, ...]]:
    """One RAR module's parameters (its own names) and shapes."""
    s = sim_dim
    return {"rar_q_w.0.weight": (s, s), "rar_q_w.0.bias": (s,),
            "rar_k_w.0.weight": (s, s), "rar_k_w.0.bias": (s,),
            "rar_v_w.0.weight": (1, s), "rar_v_w.0.bias": (1,)}


def _check_shapes(what: str, params: Mapping[str, Tensor], shapes, ref: Tensor) -> None:
    V.check_params(params, list(shapes), ref, what)
    for name, shape in shapes.items():
        if tuple(params[name].shape) != tuple(shape):
            raise ValueError(f"{what}[{name!r}]: expected shape {tuple(shape)}, "
                             f"got {tuple(params[name].shape)}")


def _width_rows(img: Tensor, cap: Tensor, width: int = 0, lens: Optional[V.Lengths] = None):
    """What a backend's shape limits are asked about: the most rows per pair (regions, or words:
    the padded L, or with ``lens`` the longest caption, as the blocks of rcar_scores are cut to
    it) and the alignment vectors' ``width``."""
    words = cap.shape[1] if lens is None else max(lens.host, default=0)
    return dict(rows=max(img.shape[1], words), width=width)


def _empty(shape, like: Tensor, *inputs, dtype=None) -> Tensor:
    """Zeros of ``shape`` for an empty pair grid, still connected to every input that requires a
    gradient (through an empty slice of it: exactly 0, no NaN from the padding), so that
    ``loss.backward()`` works and the inputs get zero gradients."""
    out = like.new_zeros(shape, dtype=dtype)
    for x in inputs:
        if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled():
            out = out + x.reshape(-1)[:0].sum().to(out.dtype)
    return out


def _query_len(img: Tensor, cap: Tensor, attn_type: str) -> int:
    return cap.shape[1] if attn_type == "t2i" else img.shape[1]


def _check_state(img, cap, factors, temperatures, attn_type):
    shape = (img.shape[0], cap.shape[0], _query_len(img, cap, attn_type))
    V.check_pair_tensor("factors", factors, shape + (img.shape[2],), img)
    if temperatures is None:
        temperatures = default_smooth(attn_type)
    return V.check_temperatures("temperatures", temperatures, shape, img)


def adaptive_attention(img: Tensor, cap: Tensor, cap_lens, factors: Optional[Tensor] = None,
                       temperatures: Temperatures = None, attn_type: str = "t2i",
                       backend: str = "auto") -> Tensor:
    """Region-word attention with adaptive factors, l2n(A(Q, C, F, lam)), for every pair.

    For each pair (query Q, context C; SPEC.md):
      S[c, q] = LeakyReLU_0.1(sum_k C[c, k] F[q, k] Q[q, k]);
      Sn[c, q] = S[c, q] / (sqrt(sum over valid q' of S[c, q']^2) + 1e-8);
      P[q, c] = softmax over valid c of lam[q] Sn[c, q];   output l2n(sum_c P[q, c] C[c]).

    factors: None (all ones, the first step) or (N_i, N_c, Lq, d).
    temperatures: a float for every position (None: 10.0 for t2i, 3.0 for i2t) or (N_i, N_c, Lq).
    Returns (N_i, N_c, Lq, d).
    """
    V.check_attn_type(attn_type)
    lens = V.check_features(img, cap, cap_lens)
    temperatures = _check_state(img, cap, factors, temperatures, attn_type)
    name = resolve(backend, img.device, img.dtype, **_width_rows(img, cap))
    shape = (img.shape[0], cap.shape[0], _query_len(img, cap, attn_type), img.shape[2])
    if img.shape[0] == 0 or cap.shape[0] == 0:
        return _empty(shape, img, img, cap, factors, temperatures)
    if name == "reference":
        from . import reference
        return reference.adaptive_attention(img, cap, lens.tensor, factors, temperatures, attn_type)
    return pipeline.adaptive_attention(kernel_set(name), img, cap, lens, factors, temperatures, attn_type)


def alignment(img: Tensor, cap: Tensor, cap_lens, weight: Tensor, bias: Tensor,
              factors: Optional[Tensor] = None, temperatures: Temperatures = None,
              attn_type: str = "t2i", backend: str = "auto") -> Tensor:
    """Alignment vectors E = l2n(W (Q - A(Q, C, F, lam))^2 + b) for every pair.

    weight (s, d), bias (s,): the module's ``sim_transform_w``. Q is the plain query (not F Q);
    the square is element-wise. factors and temperatures as in :func:`adaptive_attention`.
    Returns (N_i, N_c, Lq, s).
    """
    V.check_attn_type(attn_type)
    lens = V.check_features(img, cap, cap_lens)
    d = img.shape[2]
    s = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else -1
    _check_shapes("weights", {"weight": weight, "bias": bias}, {"weight": (s, d), "bias": (s,)}, img)
    temperatures = _check_state(img, cap, factors, temperatures, attn_type)
    name = resolve(backend, img.device, img.dtype, **_width_rows(img, cap, s))
    shape = (img.shape[0], cap.shape[0], _query_len(img, cap, attn_type), s)
    if img.shape[0] == 0 or cap.shape[0] == 0:
        return _empty(shape, img, img, cap, weight, bias, factors, temperatures)
    if name == "reference":
        from . import reference
        return reference.alignment(img, cap, lens.tensor, weight, bias, factors, temperatures, attn_type)
    return pipeline.alignment(kernel_set(name), img, cap, lens, weight, bias, factors, temperatures, attn_type)


def _check_E(E, cap_lens, attn_type):
    """E (N_i, N_c, Lq, s); in t2i the lengths index E's query positions, so len <= Lq."""
    V.check_float("E", E, 4)
    return V.check_lens(cap_lens, E.shape[1], E.shape[2] if attn_type == "t2i" else None, E.device)


def rcr_update(E: Tensor, factors: Optional[Tensor], temperatures: Temperatures, cap_lens,
               weights: Mapping[str, Tensor], attn_type: str = "t2i",
               backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """One step of the recurrent correspondence regulator on every pair and query position.

    E (N_i, N_c, Lq, s) alignment vectors; factors None (ones) or (N_i, N_c, Lq, d);
    temperatures a float or (N_i, N_c, Lq); weights: one RCR module's parameters by its own
    names (``rcr_matrix_w.0.weight`` ..., as ``RCARSimilarity.rcr_modules[t].state_dict()``).
      F <- clamp(tanh(rcr_matrix_w(E)) + F, -1, 1);  lam <- relu(rcr_smooth_w(E) + lam).
    Returns (F (N_i, N_c, Lq, d), lam (N_i, N_c, Lq)).
    """
    V.check_attn_type(attn_type)
    lens = _check_E(E, cap_lens, attn_type)
    if not isinstance(weights, Mapping) or "rcr_matrix_w.2.weight" not in weights:
        raise ValueError("weights: expected one RCR module's parameters (rcr_matrix_w.0.weight ...)")
    V.check_params(weights, ["rcr_matrix_w.2.weight"], E, "weights")
    d = weights["rcr_matrix_w.2.weight"].shape[0]
    _check_shapes("weights", weights, rcr_shapes(d, E.shape[3]), E)
    shape = tuple(E.shape[:3])
    V.check_pair_tensor("factors", factors, shape + (d,), E)
    if temperatures is None:
        temperatures = default_smooth(attn_type)
    temperatures = V.check_temperatures("temperatures", temperatures, shape, E)
    name = resolve(backend, E.device, E.dtype, rows=E.shape[2], width=E.shape[3])
    if E.numel() == 0:
        inputs = (E, factors, temperatures, *weights.values())
        return _empty(shape + (d,), E, *inputs), _empty(shape, E, *inputs)
    if name == "reference":
        from . import reference
        return reference.rcr_update(E, factors, temperatures, lens.tensor, weights, attn_type)
    return pipeline.rcr_update(kernel_set(name), E, factors, temperatures, lens, weights, attn_type)


def rar_update(E: Tensor, h: Optional[Tensor], cap_lens, weights: Mapping[str, Tensor],
               attn_type: str = "t2i", training: bool = False, backend: str = "auto") -> Tensor:
    """One step of the recurrent aggregation regulator on every pair.

    E (N_i, N_c, Lq, s); h None (start from the plain mean of E over valid positions) or
    (N_i, N_c, s); weights: one RAR module's parameters by its own names (``rar_k_w.0.weight``
    ...). K = rar_k_w(E), g = rar_q_w(h), a = softmax over valid q of rar_v_w(K[q] * g),
    h <- l2n(sum_q a[q] E[q]); rar_k_w and rar_q_w end in Dropout(0.4), active if ``training``.
    Returns h (N_i, N_c, s).
    """
    V.check_attn_type(attn_type)
    lens = _check_E(E, cap_lens, attn_type)
    _check_shapes("weights", weights, rar_shapes(E.shape[3]), E)
    if h is not None:
        V.check_float("h", h, 3)
        if tuple(h.shape) != (E.shape[0], E.shape[1], E.shape[3]):
            raise ValueError(f"h: expected shape {(E.shape[0], E.shape[1], E.shape[3])}, got {tuple(h.shape)}")
        V.check_pair_tensor("h", h, h.shape, E)
    name = resolve(backend, E.device, E.dtype, rows=E.shape[2], width=E.shape[3])
    if E.numel() == 0:
        return _empty((E.shape[0], E.shape[1], E.shape[3]), E, E, h, *weights.values())
    if name == "reference":
        from . import reference
        return reference.rar_update(E, h, lens.tensor, weights, attn_type, bool(training))
    return pipeline.rar_update(kernel_set(name), E, h, lens, weights, attn_type, bool(training))


def _check_head(img, cap, cap_lens, params, regulator, steps, attn_type, smooth, memory_budget):
    """rcar_scores' and pair_scores' common checks; returns (lengths, s, smooth)."""
    V.check_config(regulator, steps, attn_type)
    lens = V.check_features(img, cap, cap_lens)
    if not isinstance(params, Mapping) or "sim_eval_w.weight" not in params:
        raise ValueError("params: expected a mapping with every parameter of the head "
                         "(sim_eval_w.weight missing)")
    V.check_params(params, ["sim_eval_w.weight"], img, "params")
    s = params["sim_eval_w.weight"].shape[-1]
    _check_shapes("params", params, parameter_shapes(regulator, steps, img.shape[2], s), img)
    if smooth is None:
        smooth = default_smooth(attn_type)
    smooth = V.check_temperatures("smooth", smooth, (), img)
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget: expected a positive int of bytes, got {memory_budget!r}")
    return lens, s, smooth


def rcar_scores(img: Tensor, cap: Tensor, cap_lens, params: Mapping[str, Tensor],
                regulator: str = "coop_rcar", steps: int = 2, attn_type: str = "t2i",
                smooth: Optional[float] = None, training: bool = False, backend: str = "auto",
                memory_budget: Optional[int] = None) -> Tensor:
    """RCAR similarity of every image with every caption: (N_i, N_c), in the features' dtype,
    except float32 for float16/bfloat16 features (the last Linear and the sigmoid run in float32:
    bf16 scores would tie, see the README's evaluation section); the reference keeps the dtype.

    params: every parameter of the head by its checkpoint name (see :func:`parameter_shapes`;
    ``RCARSimilarity.state_dict()`` or a release checkpoint's ``sim_enc.`` entries).
    regulator/steps: only_rar (T >= 1), only_rcr (T >= 0), coop_rcar (T >= 1), as SPEC.md.
    smooth: the first-step temperature (None: 10.0 for t2i, 3.0 for i2t).
    training: RAR dropout on. memory_budget: bytes one block of the pair grid may use (default:
    the backend's, rcar_fast.backends.kernel_set(name).budget(device): 96 MiB on CPU, triton on
    CPU 24 MiB; on a GPU 1/16 of its memory, at least 2 GiB and at most 8 GiB); the reference
    ignores it.
    """
    lens, s, smooth = _check_head(img, cap, cap_lens, params, regulator, steps, attn_type, smooth, memory_budget)
    name = resolve(backend, img.device, img.dtype, **_width_rows(img, cap, s, lens))
    if img.shape[0] == 0 or cap.shape[0] == 0:
        return _empty((img.shape[0], cap.shape[0]), img, img, cap, *params.values(),
                      dtype=pipeline.score_dtype(img.dtype))
    if name == "reference":
        from . import reference
        return reference.rcar_scores(img, cap, lens.tensor, params, regulator, steps, attn_type, smooth,
                                     bool(training))
    return pipeline.rcar_scores(kernel_set(name), img, cap, lens, params, regulator, steps, attn_type,
                                smooth, bool(training), memory_budget)


def pair_scores(img: Tensor, cap: Tensor, cap_lens, img_index, cap_index, params: Mapping[str, Tensor],
                regulator: str = "coop_rcar", steps: int = 2, attn_type: str = "t2i",
                smooth: Optional[float] = None, training: bool = False, backend: str = "auto",
                memory_budget: Optional[int] = None) -> Tensor:
    """RCAR similarity of exactly the listed pairs: (M,), entry m the score of image
    img[img_index[m]] with caption cap[cap_index[m]], equal to
    ``rcar_scores(img, cap, ...)[img_index[m], cap_index[m]]`` (same dtype rules), without
    scoring any other pair: the fused kernels take the list (the attention's paired form).

    img_index, cap_index: (M,) integer tensors (on the CPU or the features' device) or lists, of
    one length, in [0, N_i) and [0, N_c); pairs may repeat and come in any order. The rest as
    :func:`rcar_scores`; in training mode a pair's dropout masks are the ones it gets in the grid
    (rcar_fast.dropout), and gradients flow to img, cap and params (hard-negative training).
    """
    lens, s, smooth = _check_head(img, cap, cap_lens, params, regulator, steps, attn_type, smooth, memory_budget)
    img_index = V.check_index("img_index", img_index, img.shape[0], img.device)
    cap_index = V.check_index("cap_index", cap_index, cap.shape[0], img.device)
    if img_index.shape != cap_index.shape:
        raise ValueError(f"cap_index: expected the shape of img_index {tuple(img_index.shape)} (one entry "
                         f"per pair), got {tuple(cap_index.shape)}")
    listed = lens if img_index.numel() == 0 else \
        V.Lengths([lens.host[j] for j in set(cap_index.tolist())], lens.tensor)
    name = resolve(backend, img.device, img.dtype, **_width_rows(img, cap, s, listed))
    if img_index.numel() == 0:
        return _empty((0,), img, img, cap, *params.values(), dtype=pipeline.score_dtype(img.dtype))
    if name == "reference":
        from . import reference
        return reference.pair_scores(img, cap, lens.tensor, img_index, cap_index, params, regulator, steps,
                                     attn_type, smooth, bool(training))
    return pipeline.pair_scores(kernel_set(name), img, cap, lens, img_index, cap_index, params, regulator, steps,
                                attn_type, smooth, bool(training), memory_budget)
