"""Training: the RCAR release's recipe (``train.py`` + ``train_{f30k,coco}_{t2i,i2t}.sh``) end to
end, memory-bounded, on one process or many (torchrun).

    rcar-fast train --preset f30k_t2i_rcar2 --data data/f30k --vocab data/vocab/f30k_precomp_vocab.json
    torchrun --nproc_per_node 2 -m rcar_fast train --preset f30k_i2t_rcar2 --data data/f30k ...
    rcar_fast.train.train(TrainConfig(data=..., preset="f30k_t2i_rcar2"))     # the same, in Python

The recipe, as the release runs it (every option overridable; a preset names the dataset,
direction, regulator and steps of one of the release's runs, :data:`PRESETS`):

- loss :func:`contrastive_loss`: the hinge (margin 0.2) summed over both directions, over every
  negative (VSE0) for the first ``warmup_epochs`` (Flickr30K 3, MSCOCO 5), then over the
  hardest negative (VSE++ max-violation);
- AdamW, lr 5e-4, x0.1 from epoch ``lr_update`` on (Flickr30K 30 of 40 epochs, MSCOCO 15 of
  25), batch 128 pairs (the last incomplete batch dropped), gradient norm clipped to 2.0;
- the train split's captions augmented (rcar_fast.app.train_data), ``<mask>`` appended to the
  vocabulary;
- after each epoch, recall on the dev split's first 5,000 captions (the release's metrics);
  ``checkpoint_{epoch}.pth`` each epoch and ``model_best.pth`` at the best rsum, in the
  release's format ({'epoch', 'model' with the ``module.`` prefix, 'best_rsum', 'opt' (an
  argparse.Namespace with the release's option names), 'Eiters'}, plus 'optimizer' to resume).

The pairs' scores go through :class:`rcar_fast.RCARSimilarity`'s block-checkpointed pipeline,
so a step's memory for them is bounded by ``memory_budget``, not by the batch. Across processes
(rcar_fast.app.train_dist) each process encodes its share of the global batch and the loss is
the release's global-batch loss. Randomness is a function of (seed, epoch, step, process): a
resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import inspect
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .. import ops
from ..backends import resolve
from ..validate import REGULATORS
from . import train_dist as D
from .data import available_splits, load_precomp, precomp_folder
from .encoders import (CheckpointError, MatchingModel, ModelConfig, Vocabulary, check_state,
                       checkpoint_options, model_state, read_checkpoint)
from .train_data import TrainSet, mask_vocabulary, torch_seed, val_set

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- the loss

def contrastive_loss(scores: Tensor, margin: float = 0.2, max_violation: bool = False) -> Tensor:
    """The release's ``ContrastiveLoss`` (lib/loss.py) of a square score matrix.

    scores: (N, N), image i against caption j, the matching pairs on the diagonal. For each
    image i and caption j != i: ``[margin + S[i, j] - S[i, i]]_+`` (image i's captions) and
    ``[margin + S[i, j] - S[j, j]]_+`` (caption j's images); summed over all negatives (VSE0),
    or only the largest of each row and of each column (VSE++ max-violation); both directions
    added. A 0-dim tensor in the scores' dtype.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise TypeError("scores: expected a 2-D floating-point tensor (N_i, N_c)")
    n = scores.shape[0]
    if scores.shape[1] != n:
        raise ValueError(f"scores: expected a square matrix with the matching pairs on its diagonal, "
                         f"got shape {tuple(scores.shape)}")
    diag = scores.diagonal()
    cost_s = (margin + scores - diag[:, None]).clamp(min=0)
    cost_im = (margin + scores - diag[None, :]).clamp(min=0)
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    if max_violation and n:
        cost_s = cost_s.max(1)[0]
        cost_im = cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


# ----------------------------------------------------------------------------- presets

#: dataset -> (epochs, lr_update, warmup_epochs) of its scripts
DATASETS = {"f30k": dict(epochs=40, lr_update=30, warmup_epochs=3),
            "coco": dict(epochs=25, lr_update=15, warmup_epochs=5)}


def _presets() -> Dict[str, Dict[str, Any]]:
    """The sixteen runs of the release's four scripts (train_{f30k,coco}_{t2i,i2t}.sh), named
    as their MODEL_NAME; ``gpus``: how many GPUs the release's script gave the run."""
    runs = {"t2i": [("base", "only_rcr", 0, 1), ("rar3", "only_rar", 3, 1), ("rcr2", "only_rcr", 2, 1),
                    ("rcar2", "coop_rcar", 2, 1)],
            "i2t": [("base", "only_rcr", 0, 1), ("rar2", "only_rar", 2, 1), ("rcr3", "only_rcr", 3, 4),
                    ("rcar2", "coop_rcar", 2, 2)]}
    return {f"{ds}_{d}_{tag}": dict(data_name=ds, attn_type=d, regulator=reg, steps=t, gpus=g)
            for ds in DATASETS for d in ("t2i", "i2t") for tag, reg, t, g in runs[d]}


PRESETS = _presets()

#: the model's options and the release's defaults (its arguments.py and scripts)
MODEL_DEFAULTS = dict(embed_size=1024, word_dim=300, num_layers=1, use_bi_gru=True, no_imgnorm=False,
                      no_txtnorm=False, sim_dim=256, regulator="coop_rcar", steps=2, attn_type="t2i",
                      t2i_smooth=10.0, i2t_smooth=3.0)
RECIPE_DEFAULTS = dict(lr=5e-4, batch_size=128, margin=0.2, grad_clip=2.0, augment=True, log_step=100,
                       val_captions=5000, seed=0)
RUNTIME_DEFAULTS = dict(backend="auto", precision="fp32", memory_budget_mib=None, val_at_start=False,
                        plot=False, progress=None, dist_timeout=1800.0, ddp_bucket_mb=25.0,
                        trust_checkpoint=False)
#: our option name -> the release's name in a checkpoint's 'opt'
RELEASE_NAMES = dict(embed_size="embed_size", word_dim="word_dim", num_layers="num_layers",
                     use_bi_gru="use_bi_gru", no_imgnorm="no_imgnorm", no_txtnorm="no_txtnorm",
                     sim_dim="sim_dim", img_dim="img_dim", regulator="self_regulator", attn_type="attn_type",
                     t2i_smooth="t2i_smooth", i2t_smooth="i2t_smooth", epochs="num_epochs",
                     lr="learning_rate", lr_update="lr_update", warmup_epochs="vse_mean_warmup_epochs",
                     batch_size="batch_size", margin="margin", grad_clip="grad_clip", log_step="log_step",
                     data_name="data_name", augment="augment", val_captions="val_captions", seed="seed")
STEP_KEY = {"only_rar": "rar_step", "only_rcr": "rcr_step", "coop_rcar": "rcar_step"}
#: options that change the function the checkpoint's weights compute: a resumed run keeps them
FIXED_ON_RESUME = ("embed_size", "word_dim", "num_layers", "use_bi_gru", "no_imgnorm", "no_txtnorm",
                   "sim_dim", "img_dim", "regulator", "steps", "attn_type", "t2i_smooth", "i2t_smooth")


@dataclass
class TrainConfig:
    """A training run. ``None`` means "not given": filled, in this order, from the checkpoint
    being resumed, the preset, the dataset's recipe (``data_name``: f30k or coco, else guessed
    from the data folder's name) and the release's defaults (:func:`resolve_config`)."""
    data: str
    vocab: Optional[str] = None
    out: Optional[str] = None
    preset: Optional[str] = None
    data_name: Optional[str] = None
    resume: Optional[str] = None
    device: Optional[str] = None
    # the model
    img_dim: Optional[int] = None
    embed_size: Optional[int] = None
    word_dim: Optional[int] = None
    num_layers: Optional[int] = None
    use_bi_gru: Optional[bool] = None
    no_imgnorm: Optional[bool] = None
    no_txtnorm: Optional[bool] = None
    sim_dim: Optional[int] = None
    regulator: Optional[str] = None
    steps: Optional[int] = None
    attn_type: Optional[str] = None
    t2i_smooth: Optional[float] = None
    i2t_smooth: Optional[float] = None
    # the recipe
    epochs: Optional[int] = None
    lr: Optional[float] = None
    lr_update: Optional[int] = None
    warmup_epochs: Optional[int] = None
    batch_size: Optional[int] = None
    margin: Optional[float] = None
    grad_clip: Optional[float] = None
    augment: Optional[bool] = None
    log_step: Optional[int] = None
    val_captions: Optional[int] = None
    seed: Optional[int] = None
    # how it runs
    backend: Optional[str] = None
    precision: Optional[str] = None
    memory_budget_mib: Optional[float] = None
    val_at_start: Optional[bool] = None
    plot: Optional[bool] = None
    progress: Optional[bool] = None
    dist_timeout: Optional[float] = None
    ddp_bucket_mb: Optional[float] = None
    trust_checkpoint: Optional[bool] = None

    def given(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def _opt_values(opt: Dict[str, Any]) -> Dict[str, Any]:
    """Our options out of a checkpoint's 'opt' (the release's names)."""
    out = {ours: opt[theirs] for ours, theirs in RELEASE_NAMES.items() if theirs in opt}
    reg = out.get("regulator")
    if reg in STEP_KEY and STEP_KEY[reg] in opt:
        out["steps"] = opt[STEP_KEY[reg]]
    return out


def guess_data_name(data: str) -> str:
    return "coco" if "coco" in os.path.basename(os.path.abspath(data)).lower() else "f30k"


def resolve_config(config: TrainConfig, checkpoint_opt: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Every option filled (see :class:`TrainConfig`). Raises ValueError naming the option for
    an unknown preset, an option that contradicts the resumed checkpoint's model, or a value
    out of range."""
    given = config.given()
    if config.preset is not None and config.preset not in PRESETS:
        raise ValueError(f"--preset {config.preset}: unknown (known: {', '.join(PRESETS)})")
    preset = {k: v for k, v in PRESETS.get(config.preset or "", {}).items() if k != "gpus"}
    ck = _opt_values(checkpoint_opt or {})
    for k in FIXED_ON_RESUME:
        if k in given and k in ck and ck[k] is not None and given[k] != ck[k]:
            raise ValueError(f"--{k.replace('_', '-')} {given[k]}: the checkpoint being resumed was trained "
                             f"with {ck[k]}")
    data_name = given.get("data_name") or preset.get("data_name") or ck.get("data_name") or guess_data_name(config.data)
    if data_name not in DATASETS:
        data_name = guess_data_name(data_name)
    values: Dict[str, Any] = {**MODEL_DEFAULTS, **RECIPE_DEFAULTS, **RUNTIME_DEFAULTS, **DATASETS[data_name]}
    values.update(preset)
    values.update({k: v for k, v in ck.items() if k in values or k == "img_dim"})
    values.update(given)
    values["data_name"] = data_name
    out = TrainConfig(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    _check_ranges(out)
    return out


def _check_ranges(c: TrainConfig) -> None:
    def need(name, ok, what):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(c, name)}: expected {what}")
    for name in ("epochs", "embed_size", "word_dim", "num_layers", "sim_dim", "log_step", "val_captions"):
        need(name, isinstance(getattr(c, name), int) and getattr(c, name) >= 1, "a positive integer")
    need("batch_size", isinstance(c.batch_size, int) and c.batch_size >= 2,
         "at least 2 pairs (the loss compares each pair with the batch's other pairs)")
    need("lr", c.lr > 0 and math.isfinite(c.lr), "a positive learning rate")
    need("lr_update", isinstance(c.lr_update, int) and c.lr_update >= 0, "an epoch index >= 0")
    need("warmup_epochs", isinstance(c.warmup_epochs, int) and c.warmup_epochs >= 0, "an integer >= 0")
    need("margin", c.margin >= 0 and math.isfinite(c.margin), "a margin >= 0")
    need("grad_clip", c.grad_clip >= 0, "a norm >= 0 (0: no clipping)")
    need("regulator", c.regulator in REGULATORS, f"one of {', '.join(REGULATORS)}")
    need("attn_type", c.attn_type in ("t2i", "i2t"), "t2i or i2t")
    need("precision", c.precision in ("fp32", "bf16"), "fp32 or bf16")
    if c.memory_budget_mib is not None:
        need("memory_budget_mib", c.memory_budget_mib > 0, "a positive number of MiB")


# ----------------------------------------------------------------------------- the run

@dataclass
class TrainResult:
    """What a run did: one row per validation (``history``, as the metrics CSV), the best rsum
    and its epoch, the run folder and the last checkpoint written."""
    out: str
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_rsum: float = 0.0
    best_epoch: Optional[int] = None
    last_checkpoint: Optional[str] = None


class TrainingDiverged(D.TrainingStopped):
    """The loss or the gradient norm is not finite: the run stops, its checkpoints kept."""


def unused_parameters(model: MatchingModel) -> List[str]:
    """Parameters the forward never uses (no gradient, so AdamW skips them, as in the release):
    the image MLP's last BatchNorm, and ``sim_eval_w`` where only_rcr scores by cosine."""
    mlp = model.img_enc.mlp
    names = [f"img_enc.mlp.bns.{k}.{p}" for k in range(mlp.num_layers - 1, len(mlp.bns))
             for p, _ in mlp.bns[k].named_parameters()]
    if model.sim_enc.regulator == "only_rcr":
        names += ["sim_enc.sim_eval_w.weight", "sim_enc.sim_eval_w.bias"]
    return names


class _Scorer(nn.Module):
    """Encodes a process's share of the batch and scores every image of the global batch
    against its captions: (B, n_r). What DistributedDataParallel wraps."""

    def __init__(self, model: MatchingModel, backend: str, memory_budget: Optional[int], precision: str):
        super().__init__()
        self.model, self.backend, self.memory_budget = model, backend, memory_budget
        self.bf16 = precision == "bf16"

    def forward(self, images: Tensor, ids: Tensor, lengths: Tensor, counts: List[int]) -> Tensor:
        m = self.model
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            img = m.encode_images(images)
            cap = m.encode_captions(ids, lengths)
        img = D.gather_rows(img, counts)
        head = m.sim_enc
        if self.bf16:
            params = {n: p.to(torch.bfloat16) for n, p in head.named_parameters()}
            return ops.rcar_scores(img.to(torch.bfloat16), cap.to(torch.bfloat16), lengths, params, head.regulator,
                                   head.steps, head.attn_type, head.smooth, head.training, self.backend,
                                   self.memory_budget)
        return head(img.float(), cap.float(), lengths, backend=self.backend, memory_budget=self.memory_budget)


def _peak_mib(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocated peak, or the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def find_vocab(config: TrainConfig, checkpoint_opt: Dict[str, Any]) -> str:
    """--vocab, else the resumed checkpoint's vocab_path, else a ``*vocab*.json`` in the data
    folder, its precomp/ or the release's ``../vocab/`` (``{data_name}_precomp_vocab.json`` first)."""
    if config.vocab:
        return config.vocab
    data = os.path.abspath(config.data)
    name = f"{config.data_name}_precomp_vocab.json"
    seen = []
    if isinstance(checkpoint_opt.get("vocab_path"), str):
        seen.append(os.path.join(checkpoint_opt["vocab_path"], name))
    for folder in (data, os.path.join(data, "precomp"), os.path.join(os.path.dirname(data), "vocab")):
        seen.append(os.path.join(folder, name))
        seen.extend(sorted(glob.glob(os.path.join(folder, "*vocab*.json"))))
    for p in seen:
        if os.path.isfile(p):
            return p
    raise ValueError(f"--vocab: no vocabulary json given, and none (*vocab*.json) in {config.data}, its "
                     "precomp/ or ../vocab/; pass --vocab PATH")


def latest_checkpoint(path: str) -> str:
    """``path`` itself, or the newest ``checkpoint_{epoch}.pth`` of a run folder."""
    if not os.path.isdir(path):
        return path
    found = [(int(m[len("checkpoint_"):-4]), p) for p in glob.glob(os.path.join(path, "checkpoint_*.pth"))
             for m in [os.path.basename(p)] if m[len("checkpoint_"):-4].isdigit()]
    if not found:
        raise ValueError(f"--resume {path}: no checkpoint_{{epoch}}.pth in that folder")
    return max(found)[1]


CSV_FIELDS = ["epoch", "iterations", "lr", "objective", "loss", "steps", "epoch_s", "pairs_per_s", "peak_mem_mib",
              "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "best_rsum", "is_best"]


class Trainer:
    """One training run (see the module docstring); :func:`train` is the usual way in."""

    def __init__(self, config: TrainConfig):
        self.world, self.rank = D.world(), D.rank()
        self.main = self.rank == 0
        error, exc = None, None
        try:
            self._setup(config)
        except Exception as e:   # every process hears of it (no process waits on a collective)
            error, exc = _one_line(e), e
        if self.world == 1 and exc is not None:
            raise exc
        D.agree(error)                # no collective before this one: a process may have failed
        self.scorer = self._scorer()

    # -- set-up ------------------------------------------------------------------------------
    def _setup(self, config: TrainConfig) -> None:
        ckpt, ck_opt = None, {}
        self.resume_path, self.restored_optimizer = None, False
        if config.resume:
            path = latest_checkpoint(config.resume)
            ckpt = read_checkpoint(path, bool(config.trust_checkpoint))
            ck_opt = checkpoint_options(ckpt)
            self.resume_path = path
        c = self.config = resolve_config(config, ck_opt)
        if c.out is None:
            c.out = os.path.dirname(os.path.abspath(self.resume_path)) if ckpt is not None else \
                os.path.join("runs", c.preset or "train")
        self.device = self._device(c.device)
        dtype = torch.bfloat16 if c.precision == "bf16" else torch.float32
        try:
            resolve(c.backend, self.device, dtype=dtype)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--backend {c.backend}: {_one_line(e).replace('backend: ', '', 1)}") from None
        self.memory_budget = None if c.memory_budget_mib is None else int(c.memory_budget_mib * 2**20)
        if c.batch_size < self.world:
            raise ValueError(f"--batch-size {c.batch_size}: fewer pairs than the {self.world} processes")
        for split in ("train", "dev"):
            if split not in available_splits(c.data):
                load_precomp(c.data, split)        # raises naming the folder and the splits there
        self.vocab_path = find_vocab(c, ck_opt)
        vocab, self.mask_id, vocab_size = mask_vocabulary(Vocabulary.from_json(self.vocab_path))
        train_split = load_precomp(c.data, "train")
        img_dim = int(train_split.images.shape[2])
        if c.img_dim is not None and c.img_dim != img_dim:
            raise ValueError(f"{precomp_folder(c.data)}: train features are {img_dim} wide, but the "
                             f"{'checkpoint' if ckpt is not None else '--img-dim'} says img_dim {c.img_dim}")
        c.img_dim = img_dim
        self.train_set = TrainSet(train_split, vocab, vocab_size, self.mask_id, c.augment)
        if len(self.train_set) < c.batch_size:
            raise ValueError(f"--batch-size {c.batch_size}: the train split has only {len(self.train_set)} captions")
        self.val = val_set(load_precomp(c.data, "dev"), vocab, c.val_captions)
        if self.val.images.shape[2] != img_dim:
            raise ValueError(f"{precomp_folder(c.data)}: dev features are {self.val.images.shape[2]} wide, "
                             f"train features {img_dim}")
        mc = ModelConfig(vocab_size=vocab_size, img_dim=img_dim, embed_size=c.embed_size, word_dim=c.word_dim,
                         num_layers=c.num_layers, use_bi_gru=c.use_bi_gru, no_imgnorm=c.no_imgnorm,
                         no_txtnorm=c.no_txtnorm, sim_dim=c.sim_dim, regulator=c.regulator, steps=c.steps,
                         attn_type=c.attn_type, smooth=c.t2i_smooth if c.attn_type == "t2i" else c.i2t_smooth)
        torch.manual_seed(torch_seed(c.seed, 0xB0))
        try:
            self.model = MatchingModel(mc)
        except (ValueError, TypeError) as e:
            raise ValueError(f"the model's options: {_one_line(e)}") from None
        self.start_epoch, self.best_rsum, self.iterations = 0, 0.0, 0
        self.best_epoch: Optional[int] = None
        self.last_checkpoint: Optional[str] = self.resume_path if ckpt is not None else None
        if ckpt is not None:
            self._restore_model(ckpt, vocab_size)
        self.model.to(self.device).train()
        for n, p in self.model.named_parameters():
            if n in set(unused_parameters(self.model)):
                p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr)
        if ckpt is not None and isinstance(ckpt.get("optimizer"), dict):
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
                self.restored_optimizer = True
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{self.resume_path}: its optimizer state does not fit the model "
                                      f"({_one_line(e)})") from None
        if self.world > 1:
            D.sync_batchnorm(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.main:
            os.makedirs(c.out, exist_ok=True)
            dst = os.path.join(c.out, os.path.basename(self.vocab_path))
            if not os.path.exists(dst):
                shutil.copyfile(self.vocab_path, dst)    # `rcar-fast eval` finds it next to the checkpoints
        self.csv_path = os.path.join(c.out, "metrics.csv")
        self.history = self._read_history() if ckpt is not None else []

    def _scorer(self) -> nn.Module:
        c = self.config
        scorer = _Scorer(self.model, c.backend, self.memory_budget, c.precision)
        if self.world == 1:
            return scorer
        ids = [self.device.index] if self.device.type == "cuda" else None
        DDP = nn.parallel.DistributedDataParallel
        # buffers (BatchNorm's statistics) stay in step without a broadcast: SyncBatchNorm1d
        # updates them from the global batch on every process
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else {"broadcast_buffers": False}
        return DDP(scorer, device_ids=ids, bucket_cap_mb=c.ddp_bucket_mb, **no_sync)

    def _device(self, text: Optional[str]) -> torch.device:
        if self.world > 1 and torch.cuda.is_available() and (text is None or text.startswith("cuda")):
            return torch.device("cuda", torch.cuda.current_device())
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {text}: no CUDA device is available here")
        return device

    def _restore_model(self, ckpt, vocab_size: int) -> None:
        state = model_state(ckpt, self.resume_path)
        rows = state.get("txt_enc.embed.weight")
        if rows is not None and rows.shape[0] != vocab_size:
            raise CheckpointError(f"{self.vocab_path}: {vocab_size - 1} words + <mask> = {vocab_size} word ids, "
                                  f"but {self.resume_path} was trained with {rows.shape[0]} (another vocabulary)")
        check_state(self.model, state, self.resume_path)
        self.model.load_state_dict(state, strict=True)
        self.start_epoch = int(ckpt.get("epoch", 0))
        self.best_rsum = float(ckpt.get("best_rsum", 0.0))
        self.iterations = int(ckpt.get("Eiters", 0))
        self.best_epoch = ckpt.get("best_epoch")

    # -- one step ------------------------------------------------------------------------------
    def max_violation(self, epoch: int) -> bool:
        return epoch >= self.config.warmup_epochs

    def lr(self, epoch: int) -> float:
        return self.config.lr * (0.1 if epoch >= self.config.lr_update else 1.0)

    def step(self, batch, epoch: int, step: int) -> float:
        """One optimisation step on a global batch; returns the batch's loss (all processes)."""
        c = self.config
        counts = D.shares(len(batch), self.world)
        o = D.offset(counts, self.rank)
        local = batch.rows(o, o + counts[self.rank]).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        scores = self.scorer(local.images, local.ids, local.lengths, counts)
        mv = self.max_violation(epoch)
        if self.world == 1:
            loss = contrastive_loss(scores, c.margin, mv)
        else:
            loss = D.local_contrastive_loss(scores, counts, c.margin, mv)
        total = float(D.sum_over_processes(loss.float()))
        if not math.isfinite(total):
            raise TrainingDiverged(self._stop_message(f"the loss is {total}", epoch, step))
        (loss * self.world).backward() if self.world > 1 else loss.backward()
        if c.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, c.grad_clip))
            if not math.isfinite(norm):
                raise TrainingDiverged(self._stop_message(f"the gradient norm is {norm}", epoch, step))
        self.optimizer.step()
        return total

    def _stop_message(self, what: str, epoch: int, step: int) -> str:
        last = self.last_checkpoint
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint had been written yet"
        return (f"{what} at epoch {epoch + 1}, step {step + 1} (iteration {self.iterations + 1}); training stopped; "
                f"{kept} (lower --lr, or look for NaN/inf in the features)")

    # -- validation ------------------------------------------------------------------------------
    def validate(self):
        """Recall on the validation captions (every process gets the same numbers)."""
        from .retrieval import recall_metrics, score_all
        m, v, c = self.model, self.val, self.config
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                img = torch.cat([m.encode_images(v.images[s:s + 128].to(self.device))
                                 for s in range(0, v.images.shape[0], 128)])
                cap = torch.cat([m.encode_captions(v.ids[s:s + 128].to(self.device), v.lengths[s:s + 128])
                                 for s in range(0, v.ids.shape[0], 128)])     # each (n, L, d)
            sims = score_all(m.sim_enc, img, cap, v.lengths, backend=c.backend,
                             dtype="bf16" if c.precision == "bf16" else None, memory_budget=self.memory_budget,
                             progress=False, group=True if self.world > 1 else None)
        finally:
            m.train(was)
        return recall_metrics(sims, v.captions_per_image)

    # -- files -----------------------------------------------------------------------------------
    def release_opt(self) -> argparse.Namespace:
        """The checkpoint's 'opt': the release's option names (so its eval.py can load the
        file), then rcar_fast's own."""
        c = self.config
        opt = dict(data_path=c.data, data_name=c.data_name, vocab_path=os.path.dirname(os.path.abspath(self.vocab_path)),
                   gpuid=",".join(str(k) for k in range(self.world)) if self.device.type == "cuda" else "0",
                   margin=c.margin, num_epochs=c.epochs, batch_size=c.batch_size, word_dim=c.word_dim,
                   sim_dim=c.sim_dim, img_dim=c.img_dim, embed_size=c.embed_size, num_layers=c.num_layers,
                   grad_clip=c.grad_clip, learning_rate=c.lr, lr_update=c.lr_update, workers=0,
                   log_step=c.log_step, logger_name=os.path.join(c.out, "log"), model_name=c.out,
                   resume=c.resume or "", no_imgnorm=c.no_imgnorm, no_txtnorm=c.no_txtnorm,
                   vse_mean_warmup_epochs=c.warmup_epochs, reset_start_epoch=False, use_bi_gru=c.use_bi_gru,
                   max_violation=False, attn_type=c.attn_type, t2i_smooth=c.t2i_smooth, i2t_smooth=c.i2t_smooth,
                   self_regulator=c.regulator, rcar_step=0, rcr_step=0, rar_step=0,
                   vocab_size=self.train_set.vocab_size)
        opt[STEP_KEY[c.regulator]] = c.steps
        opt.update(augment=c.augment, val_captions=c.val_captions, seed=c.seed, preset=c.preset,
                   precision=c.precision, world_size=self.world)
        return argparse.Namespace(**opt)

    def save(self, epoch: int, rsum: float, is_best: bool) -> str:
        """checkpoint_{epoch}.pth (and model_best.pth when best), each written whole or not at all."""
        state = {"epoch": epoch + 1,
                 "model": {"module." + k: v for k, v in self.model.state_dict().items()},
                 "best_rsum": self.best_rsum, "opt": self.release_opt(), "Eiters": self.iterations,
                 "optimizer": self.optimizer.state_dict(), "rsum": rsum, "best_epoch": self.best_epoch}
        path = os.path.join(self.config.out, f"checkpoint_{epoch}.pth")
        _atomic_save(state, path)
        if is_best:
            tmp = os.path.join(self.config.out, ".model_best.pth.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, os.path.join(self.config.out, "model_best.pth"))
        return path

    def _read_history(self) -> List[Dict[str, Any]]:
        if not os.path.isfile(self.csv_path):
            return []
        with open(self.csv_path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("epoch", "").isdigit()
                    and int(row["epoch"]) <= self.start_epoch]

    def write_history(self) -> None:
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.history)
        os.replace(tmp, self.csv_path)
        if self.config.plot:
            from .train_plot import plot_metrics
            plot_metrics(self.csv_path, os.path.join(self.config.out, "metrics.svg"))

    def log(self, line: str, bar=None) -> None:
        if not self.main:
            return
        (bar.write if bar is not None else print)(line)
        sys.stdout.flush()
        with open(os.path.join(self.config.out, "train.log"), "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # -- the loop --------------------------------------------------------------------------------
    def _record(self, epoch: int, recall, stats: Dict[str, Any]) -> Dict[str, Any]:
        row = dict(epoch=epoch, iterations=self.iterations, **stats,
                   i2t_r1=recall.i2t[0], i2t_r5=recall.i2t[1], i2t_r10=recall.i2t[2],
                   t2i_r1=recall.t2i[0], t2i_r5=recall.t2i[1], t2i_r10=recall.t2i[2],
                   rsum=recall.rsum, best_rsum=self.best_rsum)
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = round(v, 6)
        self.history.append(row)
        if self.main:
            self.write_history()
        return row

    def run(self) -> TrainResult:
        c = self.config
        n_steps = self.train_set.batches_per_epoch(c.batch_size)
        self.log(f"rcar-fast train: {self.model.config.describe()}; {len(self.train_set)} train captions, "
                 f"{n_steps} steps of {c.batch_size} pairs per epoch, epochs {self.start_epoch + 1}..{c.epochs}; "
                 f"{self.world} process(es) on {self.device}, backend {c.backend}, {c.precision}; -> {c.out}")
        if self.resume_path:
            self.log(f"resumed from {self.resume_path}: {self.start_epoch} epoch(s) done, iteration "
                     f"{self.iterations}, best rsum {self.best_rsum:.1f}"
                     + ("" if self.restored_optimizer else "; no optimizer state in it: AdamW starts afresh "
                        "(as the release's --resume)"))
        if c.val_at_start and self.start_epoch == 0 and not self.history:
            rec = self.validate()
            self._record(0, rec, dict(lr=self.lr(0), objective="", loss="", steps=0, is_best=""))
            self.log(f"epoch 0 (before training): rsum {rec.rsum:.1f}")
        if self.start_epoch >= c.epochs:
            self.log(f"nothing to do: the checkpoint has {self.start_epoch} of {c.epochs} epochs")
        for epoch in range(self.start_epoch, c.epochs):
            self._epoch(epoch, n_steps)
        return TrainResult(c.out, list(self.history), self.best_rsum, self.best_epoch, self.last_checkpoint)

    def _epoch(self, epoch: int, n_steps: int) -> None:
        c = self.config
        lr, mv = self.lr(epoch), self.max_violation(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        torch.manual_seed(torch_seed(c.seed, epoch, self.rank, 0xD0))   # dropout: a function of (seed, epoch, rank)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        order = self.train_set.order(c.seed, epoch)
        bar = _bar(n_steps, f"epoch {epoch + 1}/{c.epochs}", c.progress) if self.main else None
        t0, losses, pairs = time.perf_counter(), [], 0
        try:
            for step in range(n_steps):
                batch = self.train_set.batch(order[step * c.batch_size:(step + 1) * c.batch_size], c.seed, epoch, step)
                losses.append(self.step(batch, epoch, step))
                self.iterations += 1
                pairs += len(batch) ** 2
                dt = time.perf_counter() - t0
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", pairs_s=f"{pairs / dt:.0f}",
                                    mem=f"{_peak_mib(self.device):.0f}MiB", refresh=False)
                    bar.update(1)
                if self.iterations % c.log_step == 0:
                    self.log(f"epoch {epoch + 1} [{step + 1}/{n_steps}] iteration {self.iterations}: loss "
                             f"{losses[-1]:.4f} (epoch mean {sum(losses) / len(losses):.4f}), lr {lr:.2e}, "
                             f"{'max-violation' if mv else 'VSE0'}, {pairs / dt:.0f} pairs/s, peak memory "
                             f"{_peak_mib(self.device):.0f} MiB", bar)
        finally:
            if bar is not None:
                bar.close()
        secs = time.perf_counter() - t0
        rec = self.validate()
        is_best = rec.rsum > self.best_rsum
        if is_best:
            self.best_rsum, self.best_epoch = rec.rsum, epoch + 1
        stats = dict(lr=lr, objective="max_violation" if mv else "vse0",
                     loss=sum(losses) / max(1, len(losses)), steps=len(losses), epoch_s=secs,
                     pairs_per_s=pairs / secs if secs > 0 else 0.0, peak_mem_mib=_peak_mib(self.device),
                     is_best=int(is_best))
        if self.main:
            self.last_checkpoint = self.save(epoch, rec.rsum, is_best)
        self._record(epoch + 1, rec, stats)
        self.log(f"epoch {epoch + 1}/{c.epochs}: loss {stats['loss']:.4f}, {secs:.1f} s, "
                 f"{stats['pairs_per_s']:.0f} pairs/s; dev i2t {rec.i2t[0]:.1f} {rec.i2t[1]:.1f} {rec.i2t[2]:.1f}, "
                 f"t2i {rec.t2i[0]:.1f} {rec.t2i[1]:.1f} {rec.t2i[2]:.1f}, rsum {rec.rsum:.1f}"
                 f"{' (best)' if is_best else ''}; saved checkpoint_{epoch}.pth")


def _atomic_save(obj, path: str) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _bar(total: int, desc: str, progress: Optional[bool]):
    if progress is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=None if progress is None else False, leave=False,
                dynamic_ncols=True, file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring. Inside a torch.distributed
    process group every process calls it (the group's processes share each global batch)."""
    return Trainer(config).run()


from .train_cli import add_parser, run_command  # noqa: E402  (the command line, over the API above)


__all__ = ["DATASETS", "MODEL_DEFAULTS", "PRESETS", "RECIPE_DEFAULTS", "TrainConfig", "TrainResult", "Trainer",
           "TrainingDiverged", "add_parser", "contrastive_loss", "resolve_config", "run_command", "train",
           "unused_parameters"]
