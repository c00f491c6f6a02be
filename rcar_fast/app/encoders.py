"""The matching model of the public RCAR release around the similarity head, and loading its
full checkpoints.

The release (github.com/Paranioar/RCAR, ``lib/scanpp.py`` and ``lib/encoders.py``) is a
``SCANpp`` module with three parts; :class:`MatchingModel` holds them under the same names, so a
release checkpoint's ``model`` entry loads into it with ``strict=True``:

``img_enc`` (:class:`EncoderImage`), region features (N, R, img_dim) -> (N, R, embed_size):
    ``l2n(fc(x) + mlp(x))`` with ``fc`` = Linear(img_dim, embed_size) and ``mlp`` the two-layer
    MLP Linear(img_dim, embed_size // 2) -> BatchNorm1d -> ReLU -> Linear(embed_size // 2,
    embed_size), applied to every region (BatchNorm over all regions of the batch). Keys:
    ``fc.{weight,bias}``, ``mlp.layers.{0,1}.{weight,bias}``, ``mlp.bns.{0,1}.{weight,bias,
    running_mean,running_var,num_batches_tracked}``. The release imports its MLP from
    ``lib/modules/mlp.py`` with the signature ``MLP(img_dim, embed_size // 2, embed_size, 2)``
    of VSE-infinity's MLP, whose layout (``layers``, ``bns``, a second BatchNorm that the
    forward never uses) these names follow; that file of the release itself was not available
    to check. Loading is strict, so a checkpoint laid out otherwise fails with the key named.
``txt_enc`` (:class:`EncoderText`), word ids (N, L) and lengths -> (N, L, embed_size):
    ``embed`` = Embedding(vocab_size, word_dim), ``rnn`` = GRU(word_dim, embed_size,
    num_layers, batch_first=True, bidirectional=use_bi_gru) over each caption's valid words
    (packed, so the backward direction starts at each caption's own last word); with two
    directions the output is their average ``(out[..., :d] + out[..., d:]) / 2``; then l2n.
    Rows past a caption's length are zero. Keys: ``embed.weight``, ``rnn.weight_ih_l0``,
    ``rnn.weight_hh_l0``, ``rnn.bias_ih_l0``, ``rnn.bias_hh_l0`` and their ``_reverse`` twins.
``sim_enc`` (:class:`rcar_fast.RCARSimilarity`), the similarity head (SPEC.md).

``l2n(x) = x / (||x|| + 1e-8)`` as everywhere in the release. The release trains under
``nn.DataParallel`` and saves ``model.state_dict()`` of the wrapper, so its keys start with
``module.``; :func:`load_checkpoint` takes them with or without that prefix, and also the
SGRAF-style list ``[img_enc_state, txt_enc_state, sim_enc_state]``.

Configuration comes from the checkpoint's ``opt`` (an argparse.Namespace in the release, or a
dict): ``img_dim``, ``embed_size``, ``word_dim``, ``num_layers``, ``use_bi_gru``,
``no_imgnorm``, ``no_txtnorm``, ``sim_dim``, ``attn_type``, ``t2i_smooth``, ``i2t_smooth``,
``self_regulator`` and its step count ``rcar_step`` / ``rcr_step`` / ``rar_step``. What ``opt``
does not say is read off the weights' shapes and key names; ``attn_type`` cannot be, and
falls back to the caller's choice (default "t2i").
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .. import validate as V
from ..modules import RCARSimilarity

Tensor = torch.Tensor

EPS = 1e-8
#: the release's dropout on word embeddings (active only in training mode)
WORD_DROPOUT = 0.4


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """``x / (||x||_2 + 1e-8)`` over ``dim``, as the release's ``l2norm``."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


class CheckpointError(ValueError):
    """A checkpoint or vocabulary file that cannot be used; the message names the file."""


class MLP(nn.Module):
    """``num_layers`` Linears with BatchNorm1d and ReLU between them, applied per row of a
    (B, N, in) input. As the release's MLP it holds one BatchNorm per Linear, the last unused."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 2):
        super().__init__()
        self.output_dim, self.num_layers = output_dim, num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in h + [output_dim])

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        x = x.reshape(B * N, D)
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers)):
            x = torch.relu(bn(layer(x))) if i < self.num_layers - 1 else layer(x)
        return x.view(B, N, self.output_dim)


class EncoderImage(nn.Module):
    """Region features (N, R, img_dim) -> embeddings (N, R, embed_size):
    ``l2n(fc(x) + mlp(x))`` (no l2n if ``no_imgnorm``). See the module docstring for the keys."""

    def __init__(self, img_dim: int = 2048, embed_size: int = 1024, no_imgnorm: bool = False):
        super().__init__()
        self.img_dim, self.embed_size, self.no_imgnorm = img_dim, embed_size, bool(no_imgnorm)
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = MLP(img_dim, embed_size // 2, embed_size, 2)
        r = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)     # the release's fc init
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: Tensor) -> Tensor:
        V.check_float("images", images, 3)
        if images.shape[2] != self.img_dim:
            raise ValueError(f"images: expected feature size img_dim={self.img_dim}, "
                             f"got shape {tuple(images.shape)}")
        features = self.fc(images) + self.mlp(images)
        return features if self.no_imgnorm else l2norm(features)


class EncoderText(nn.Module):
    """Word ids (N, L) with lengths (N,) -> word embeddings (N, L, embed_size), zero past each
    caption's length. See the module docstring for the computation and the keys."""

    def __init__(self, vocab_size: int, word_dim: int = 300, embed_size: int = 1024,
                 num_layers: int = 1, use_bi_gru: bool = True, no_txtnorm: bool = False):
        super().__init__()
        self.vocab_size, self.word_dim, self.embed_size = vocab_size, word_dim, embed_size
        self.use_bi_gru, self.no_txtnorm = bool(use_bi_gru), bool(no_txtnorm)
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(WORD_DROPOUT)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                          bidirectional=self.use_bi_gru)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)          # the release's init

    def forward(self, ids: Tensor, lengths) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise TypeError("ids: expected a (N, L) integer tensor of word ids")
        lengths = V.check_lens(lengths, ids.shape[0], ids.shape[1], ids.device).tensor
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids: word ids must be in [0, {self.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        N, L = ids.shape
        if N == 0:
            return self.embed.weight.new_zeros(0, L, self.embed_size)
        x = self.dropout(self.embed(ids))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)
        if self.use_bi_gru:
            d = out.shape[2] // 2
            out = (out[:, :, :d] + out[:, :, d:]) / 2
        return out if self.no_txtnorm else l2norm(out)   # l2n(0) = 0 at padded rows


@dataclass
class ModelConfig:
    """Everything that fixes the shapes and the computation of a :class:`MatchingModel`."""
    vocab_size: int
    img_dim: int = 2048
    embed_size: int = 1024
    word_dim: int = 300
    num_layers: int = 1
    use_bi_gru: bool = True
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    sim_dim: int = 256
    regulator: str = "coop_rcar"
    steps: int = 2
    attn_type: str = "t2i"
    smooth: Optional[float] = None

    def describe(self) -> str:
        return (f"{self.regulator} T={self.steps} {self.attn_type}, embed {self.embed_size}, "
                f"sim {self.sim_dim}, img_dim {self.img_dim}, vocab {self.vocab_size}")


class MatchingModel(nn.Module):
    """The release's SCANpp: ``img_enc``, ``txt_enc``, ``sim_enc`` (see the module docstring).

    ``encode_images(images (N, R, img_dim))`` and ``encode_captions(ids (N, L), lengths)`` give
    the features the head scores; ``forward(images, ids, lengths, backend=...)`` scores every
    image against every caption, (N_i, N_c). Batch statistics of the image MLP's BatchNorm are
    used in training mode only: call ``.eval()`` to score.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.img_enc = EncoderImage(config.img_dim, config.embed_size, config.no_imgnorm)
        self.txt_enc = EncoderText(config.vocab_size, config.word_dim, config.embed_size,
                                   config.num_layers, config.use_bi_gru, config.no_txtnorm)
        self.sim_enc = RCARSimilarity(config.embed_size, config.sim_dim, config.regulator,
                                      config.steps, config.attn_type, config.smooth)

    def encode_images(self, images: Tensor) -> Tensor:
        return self.img_enc(images)

    def encode_captions(self, ids: Tensor, lengths) -> Tensor:
        return self.txt_enc(ids, lengths)

    def forward(self, images: Tensor, ids: Tensor, lengths, backend: str = "auto",
                memory_budget: Optional[int] = None) -> Tensor:
        return self.sim_enc(self.encode_images(images), self.encode_captions(ids, lengths),
                            lengths, backend=backend, memory_budget=memory_budget)


# ----------------------------------------------------------------------------- checkpoints

def _torch_load(path: str, trust: bool) -> Any:
    """torch.load on CPU. Without ``trust`` only tensors, plain containers and the few classes
    a release checkpoint holds besides them (argparse.Namespace for ``opt``, numpy scalars
    for ``best_rsum``) are unpickled."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    allowed: List[Any] = [argparse.Namespace]
    try:
        import numpy as np
        core = getattr(np, "_core", None) or np.core
        allowed += [(core.multiarray.scalar, "numpy.core.multiarray.scalar"), core.multiarray.scalar,
                    np.dtype]
        allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    except Exception:   # numpy missing or laid out otherwise: tensors and Namespace still load
        pass
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str, trust: bool = False) -> Mapping:
    """The checkpoint file as a mapping; CheckpointError naming the file otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = _torch_load(path, trust)
    except Exception as exc:   # torch raises many types for a bad file; the user needs one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            msg = ("it holds Python objects beyond tensors and options; load it only if you trust "
                   "its source (--trust-checkpoint, or trust=True)")
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint ({msg})") from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict with a 'model' entry, got {type(ckpt).__name__}")
    return ckpt


_PARTS = ("img_enc", "txt_enc", "sim_enc")


def model_state(checkpoint: Mapping, path: str = "checkpoint") -> Dict[str, Tensor]:
    """The full model's state dict out of a checkpoint, keys ``img_enc.*``, ``txt_enc.*``,
    ``sim_enc.*``: from a ``model`` dict (with or without DataParallel's ``module.`` prefix) or
    a ``model`` list of the three parts' state dicts."""
    model = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if isinstance(model, (list, tuple)):
        if len(model) != 3 or not all(isinstance(m, Mapping) for m in model):
            raise CheckpointError(f"{path}: 'model' is a list but not [img_enc, txt_enc, sim_enc] state dicts")
        return {f"{part}.{k}": v for part, m in zip(_PARTS, model) for k, v in m.items()}
    if not isinstance(model, Mapping):
        raise CheckpointError(f"{path}: no 'model' state dict in it (keys: "
                              f"{', '.join(map(str, list(checkpoint)[:6])) or 'none'})")
    state = dict(model)
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"{path}: model entry {k!r} is not a named tensor")
    missing = [p for p in _PARTS if not any(k.startswith(p + ".") for k in state)]
    if missing:
        raise CheckpointError(f"{path}: no '{missing[0]}.' entries in its model state dict")
    return state


def checkpoint_options(checkpoint: Mapping) -> Dict[str, Any]:
    """The checkpoint's ``opt`` as a dict ({} if it has none)."""
    opt = checkpoint.get("opt")
    if opt is None:
        return {}
    if isinstance(opt, argparse.Namespace):
        return dict(vars(opt))
    if isinstance(opt, Mapping):
        return dict(opt)
    return dict(getattr(opt, "__dict__", {}))


def _steps_from_keys(state: Mapping[str, Tensor]) -> Tuple[str, int]:
    """(regulator, steps) from how many alv/rcr/rar modules the head holds. only_rar with T = 1
    and coop_rcar with T = 1 hold the same modules and compute the same function."""
    def count(kind):
        idx = {int(m.group(1)) for k in state for m in [re.match(rf"sim_enc\.{kind}_modules\.(\d+)\.", k)] if m}
        return max(idx) + 1 if idx else 0
    n_alv, n_rcr, n_rar = count("alv"), count("rcr"), count("rar")
    if n_rar == 0:
        return "only_rcr", n_rcr
    if n_alv == 1 and n_rcr == 0:
        return ("only_rar", n_rar) if n_rar > 1 else ("coop_rcar", 1)
    return "coop_rcar", n_rar


def _shape(state, key, path, dims):
    if key not in state:
        raise CheckpointError(f"{path}: missing key {key!r}")
    t = state[key]
    if t.dim() != dims:
        raise CheckpointError(f"{path}: key {key!r} has shape {tuple(t.shape)}, expected {dims} dimensions")
    return tuple(t.shape)


def config_from_checkpoint(checkpoint: Mapping, path: str = "checkpoint",
                           **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint: ``overrides`` (those not None) first, then its
    ``opt``, then what the weights' shapes and key names say (see the module docstring)."""
    state = model_state(checkpoint, path)
    opt = checkpoint_options(checkpoint)
    fc = _shape(state, "img_enc.fc.weight", path, 2)
    emb = _shape(state, "txt_enc.embed.weight", path, 2)
    ev = _shape(state, "sim_enc.sim_eval_w.weight", path, 2)
    layers = {int(m.group(1)) for k in state for m in [re.match(r"txt_enc\.rnn\.weight_ih_l(\d+)$", k)] if m}
    regulator, steps = _steps_from_keys(state)
    if "self_regulator" in opt or "regulator" in opt:
        regulator = opt.get("self_regulator", opt.get("regulator"))
        step_key = {"only_rar": "rar_step", "only_rcr": "rcr_step", "coop_rcar": "rcar_step"}.get(regulator)
        if step_key in opt:
            steps = opt[step_key]
        elif "steps" in opt:
            steps = opt["steps"]
    attn_type = overrides.get("attn_type") or opt.get("attn_type", "t2i")
    smooth = overrides.get("smooth")
    if smooth is None and isinstance(attn_type, str):
        smooth = opt.get(f"{attn_type}_smooth")     # the release: t2i_smooth / i2t_smooth
    values = dict(
        vocab_size=opt.get("vocab_size", emb[0]), img_dim=opt.get("img_dim", fc[1]),
        embed_size=opt.get("embed_size", fc[0]), word_dim=opt.get("word_dim", emb[1]),
        num_layers=opt.get("num_layers", max(layers) + 1 if layers else 1),
        use_bi_gru=opt.get("use_bi_gru", "txt_enc.rnn.weight_ih_l0_reverse" in state),
        no_imgnorm=opt.get("no_imgnorm", False), no_txtnorm=opt.get("no_txtnorm", False),
        sim_dim=opt.get("sim_dim", ev[1]), regulator=regulator, steps=steps, attn_type=attn_type,
        smooth=smooth)
    for k, v in overrides.items():
        if k not in values:
            raise TypeError(f"config_from_checkpoint: unknown setting {k!r}")
        if v is not None:
            values[k] = v
    return ModelConfig(**values)


def build_model(config: ModelConfig, path: str = "checkpoint") -> MatchingModel:
    try:
        return MatchingModel(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: its configuration does not make a model ({exc})") from None


def check_state(model: nn.Module, state: Mapping[str, Tensor], path: str = "checkpoint") -> None:
    """Strict comparison of a state dict against ``model``: CheckpointError naming the first
    missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise CheckpointError(f"{path}: missing key {k!r} (expected shape {tuple(v.shape)}) for "
                                  f"a model {getattr(model, 'config', None) and model.config.describe()}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: key {k!r} has shape {tuple(state[k].shape)}, the model "
                                  f"expects {tuple(v.shape)}")
    for k in state:
        if k not in own:
            raise CheckpointError(f"{path}: unexpected key {k!r} for a model "
                                  f"{getattr(model, 'config', None) and model.config.describe()}")


def model_from_checkpoint(checkpoint: Mapping, path: str = "checkpoint", **overrides) -> MatchingModel:
    """:func:`load_checkpoint` for a checkpoint already read (``path`` names it in errors)."""
    config = config_from_checkpoint(checkpoint, path, **overrides)
    model = build_model(config, path)
    state = model_state(checkpoint, path)
    check_state(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_checkpoint(path: str, trust: bool = False, **overrides) -> MatchingModel:
    """A :class:`MatchingModel` in eval mode with a full checkpoint's weights, loaded strictly.

    ``overrides`` (regulator, steps, attn_type, smooth, ...; None = not given) take precedence
    over the checkpoint's ``opt``. Every problem with the file raises CheckpointError (a
    ValueError) whose one-line message names the file and, for a model of another shape, the
    first mismatching key. ``trust``: unpickle any object in the file (only for trusted files;
    by default only tensors, containers, argparse.Namespace and numpy scalars load).
    """
    return model_from_checkpoint(read_checkpoint(path, trust), path, **overrides)


def save_checkpoint(model: MatchingModel, path: str, opt: Optional[Mapping] = None,
                    module_prefix: bool = False, **extra) -> None:
    """Writes ``{'model': state dict, 'opt': ..., **extra}`` laid out as the release's files
    (``module_prefix``: keys under DataParallel's ``module.``). ``opt`` defaults to the
    release's option names for ``model.config``."""
    c = model.config
    if opt is None:
        opt = {"img_dim": c.img_dim, "embed_size": c.embed_size, "word_dim": c.word_dim,
               "num_layers": c.num_layers, "use_bi_gru": c.use_bi_gru, "no_imgnorm": c.no_imgnorm,
               "no_txtnorm": c.no_txtnorm, "sim_dim": c.sim_dim, "vocab_size": c.vocab_size,
               "attn_type": c.attn_type, "self_regulator": c.regulator,
               {"only_rar": "rar_step", "only_rcr": "rcr_step", "coop_rcar": "rcar_step"}[c.regulator]: c.steps}
        if c.smooth is not None:
            opt[f"{c.attn_type}_smooth"] = c.smooth
    prefix = "module." if module_prefix else ""
    torch.save({"model": {prefix + k: v for k, v in model.state_dict().items()}, "opt": dict(opt), **extra}, path)


# ----------------------------------------------------------------------------- vocabulary

SPECIAL_TOKENS = ("<start>", "<end>", "<unk>")

_TOKEN = re.compile(r"[a-z0-9]+(?=n't)|n't|[a-z0-9]+(?:-[a-z0-9]+)*|'[a-z]+|[^\sa-z0-9]")


def tokenize(caption: str) -> List[str]:
    """Lower-cased word tokens. The release uses ``nltk.word_tokenize``; it is used here when
    nltk is installed, else a regular expression that follows it on plain captions: words and
    hyphenated words whole, punctuation apart, "don't" -> "do", "n't", "dog's" -> "dog", "'s"
    (it differs on rarer forms, e.g. "3.5" -> "3", ".", "5")."""
    text = caption.lower()
    try:
        from nltk.tokenize import word_tokenize   # optional, as in the release
    except ImportError:
        return _TOKEN.findall(text)
    try:
        return word_tokenize(text)
    except LookupError:   # nltk without its punkt data
        return _TOKEN.findall(text)


class Vocabulary:
    """word -> index, with ``<start>``, ``<end>`` and ``<unk>`` (unknown words map to it).

    ``encode(caption)`` gives ``[<start>] + words + [<end>]`` as indices, the release's
    ``process_caption`` at test time.
    """

    def __init__(self, word2idx: Mapping[str, int], source: str = "vocabulary"):
        self.source = source
        for k, v in word2idx.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise CheckpointError(f"{source}: entry {k!r}: {v!r} is not word -> non-negative int")
        missing = [t for t in SPECIAL_TOKENS if t not in word2idx]
        if missing:
            raise CheckpointError(f"{source}: no {', '.join(missing)} token in the vocabulary")
        self.word2idx = dict(word2idx)
        self.unk = self.word2idx["<unk>"]

    def __len__(self) -> int:
        return len(self.word2idx)

    @property
    def max_index(self) -> int:
        return max(self.word2idx.values())

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.unk)

    def encode(self, caption: str) -> List[int]:
        return [self.word2idx["<start>"]] + [self(w) for w in tokenize(caption)] + [self.word2idx["<end>"]]

    @classmethod
    def from_json(cls, path: str) -> "Vocabulary":
        """The release's vocabulary json (``{"word2idx": ..., "idx2word": ..., "idx": ...}``) or a
        plain ``{word: index}`` mapping."""
        import json
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such vocabulary file")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a vocabulary json ({str(exc).splitlines()[0]})") from None
        if isinstance(d, Mapping) and "word2idx" in d:
            d = d["word2idx"]
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{path}: expected a json object word -> index (or with 'word2idx')")
        return cls(d, source=path)


def encode_captions(captions: Sequence[str], vocab: Vocabulary) -> Tuple[Tensor, Tensor]:
    """Word ids (N, L) padded with 0 and lengths (N,) of ``captions`` (each at least 2 long:
    the start and end tokens)."""
    seqs = [vocab.encode(c) for c in captions]
    L = max((len(s) for s in seqs), default=1)
    ids = torch.zeros(len(seqs), L, dtype=torch.int64)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s, dtype=torch.int64)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.int64)


def check_vocab(model: MatchingModel, vocab: Vocabulary, path: str) -> None:
    """The vocabulary must index inside the model's word embedding (the release adds one
    ``<mask>`` token after its json's words, so the embedding may be one row longer)."""
    rows = model.txt_enc.vocab_size
    if vocab.max_index >= rows:
        raise CheckpointError(f"{path}: vocabulary indices reach {vocab.max_index}, but the "
                              f"checkpoint's txt_enc.embed.weight has only {rows} rows")


__all__ = ["CheckpointError", "EncoderImage", "EncoderText", "MLP", "MatchingModel", "ModelConfig",
           "Vocabulary", "build_model", "check_state", "check_vocab", "checkpoint_options", "config_from_checkpoint",
           "encode_captions", "l2norm", "load_checkpoint", "model_from_checkpoint", "model_state", "read_checkpoint",
           "save_checkpoint", "tokenize"]
