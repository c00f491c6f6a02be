"""``rcar-fast train``: the command line over :mod:`rcar_fast.app.train`.

One process, or many under torchrun (``torchrun --nproc_per_node N -m rcar_fast train ...``:
gloo on CPU, NCCL with each process on its LOCAL_RANK's GPU). Only process 0 prints and writes.

Exit status: 0 done; 1 training stopped (a non-finite loss or gradient: the message names the
step and the last good checkpoint, which is kept) or a process of a distributed run failed;
2 a user error (argument, file, split, vocabulary, checkpoint, out of memory), one line on
stderr. In a distributed run a process that fails prints its own line ("rank r: ...") and
exits at once, so the others' collectives fail (and torchrun stops them) instead of waiting;
at the end every process leaves the group and exits with its logs flushed, skipping the
interpreter's teardown (see _end).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch


def _flag(parser, name: str, dest: str, value: bool, help: str) -> None:
    parser.add_argument(name, dest=dest, action="store_const", const=value, default=None, help=help)


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``train`` subcommand to ``sub`` (argparse sub-parsers)."""
    from .cli import _int_at_least, _non_negative_int, _positive_int, parse_device
    from .train import PRESETS, REGULATORS

    def preset_list() -> str:
        return ", ".join(PRESETS)
    t = sub.add_parser("train", help="train the release's model with its recipe (presets for its scripts); "
                                     "torchrun for many processes",
                       description="Train RCAR as the release's train.py does (README, 'Train'). Options not "
                                   "given come from --resume's checkpoint, then --preset, then the dataset's "
                                   "recipe (f30k/coco), then the release's defaults.")
    g = t.add_argument_group("data and run folder")
    g.add_argument("--data", required=True, help="precomp folder with train_ and dev_ {ims.npy,caps.txt} "
                                                 "(or a precomp/ subfolder holding them)")
    g.add_argument("--vocab", help="vocabulary json (default: *vocab*.json in --data, its precomp/ or ../vocab/)")
    g.add_argument("--out", help="run folder for checkpoints, metrics.csv, train.log (default runs/PRESET; "
                                 "with --resume the checkpoint's folder)")
    g.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                   help=f"one of the release's runs: {preset_list()}")
    g.add_argument("--data-name", choices=["f30k", "coco"], help="dataset recipe (default: from the preset or the "
                                                                 "--data folder's name)")
    g.add_argument("--resume", help="a checkpoint_{epoch}.pth (or a run folder: its latest) to continue from")
    _flag(g, "--trust-checkpoint", "trust_checkpoint", True, "unpickle any object the checkpoint holds")

    m = t.add_argument_group("model (the release's names)")
    for name in ("--embed-size", "--word-dim", "--num-layers", "--sim-dim"):
        m.add_argument(name, type=_positive_int)
    m.add_argument("--regulator", choices=REGULATORS)
    m.add_argument("--steps", type=_non_negative_int)
    m.add_argument("--attn-type", choices=["t2i", "i2t"])
    m.add_argument("--t2i-smooth", type=float)
    m.add_argument("--i2t-smooth", type=float)
    _flag(m, "--no-bi-gru", "use_bi_gru", False, "a one-directional GRU")
    _flag(m, "--no-imgnorm", "no_imgnorm", True, "no l2n of the image embeddings")
    _flag(m, "--no-txtnorm", "no_txtnorm", True, "no l2n of the word embeddings")

    r = t.add_argument_group("recipe (defaults: the dataset's script)")
    r.add_argument("--epochs", type=_positive_int, help="f30k 40, coco 25")
    r.add_argument("--lr", type=float, help="AdamW learning rate (5e-4)")
    r.add_argument("--lr-update", type=_non_negative_int, help="epoch from which lr is x0.1 (f30k 30, coco 15)")
    r.add_argument("--warmup-epochs", type=_non_negative_int,
                   help="epochs of the VSE0 loss before max-violation (f30k 3, coco 5)")
    r.add_argument("--batch-size", type=_int_at_least(2, "at least 2 pairs"), help="pairs per step (128)")
    r.add_argument("--margin", type=float, help="hinge margin (0.2)")
    r.add_argument("--grad-clip", type=float, help="gradient norm clip (2.0; 0 = none)")
    _flag(r, "--no-augment", "augment", False, "no caption augmentation")
    r.add_argument("--log-step", type=_positive_int, help="a log line every N steps (100)")
    r.add_argument("--val-captions", type=_positive_int, help="dev captions validated on (5000)")
    r.add_argument("--seed", type=int, help="data order, augmentation, initialisation, dropout (0)")

    x = t.add_argument_group("running")
    x.add_argument("--device", type=lambda s: str(parse_device(s)),
                   help="cpu, cuda or cuda:N (default: cuda if there is one; under torchrun each process "
                        "takes its LOCAL_RANK's GPU)")
    x.add_argument("--backend", help="scoring backend (auto)")
    x.add_argument("--memory-budget", dest="memory_budget_mib", type=float,
                   help="MiB one block of the pair grid may use (default: the backend's)")
    x.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast encoders, bf16 features "
                                                                 "and head (fp32 weights and optimizer)")
    _flag(x, "--val-at-start", "val_at_start", True, "validate the initial model too (metrics.csv epoch 0)")
    _flag(x, "--plot", "plot", True, "write metrics.svg (loss and rsum per epoch) after each epoch")
    _flag(x, "--no-progress", "progress", False, "no progress bar")
    x.add_argument("--dist-timeout", type=float, help="seconds any collective may wait (1800)")
    return t


def _say(line: str) -> None:
    print(f"rcar-fast train: {' '.join(str(line).split())}", file=sys.stderr, flush=True)


def run_command(args) -> int:
    """``rcar-fast train``: exit status as in the module docstring."""
    from . import distributed as DS
    from . import train_dist as D
    from .train import TrainConfig, TrainingDiverged, train
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    many = DS.under_torchrun()
    if many:
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            DS.launch(device, config.dist_timeout or 1800.0)
        except Exception as exc:    # a rendezvous that failed: nothing else runs
            _say(f"rank {os.environ.get('RANK', '?')}: cannot join the process group ({exc})")
            return 2
    rank = D.rank()
    try:
        result = train(config)
    except TrainingDiverged as exc:          # every process saw the same loss
        if rank == 0:
            _say(str(exc))
        return _end(many, 1)
    except D.TrainingStopped as exc:         # a set-up error every process agreed on
        if rank == 0:
            _say(str(exc))
        return _end(many, 2)
    except torch.OutOfMemoryError as exc:
        _say(f"{'rank %d: ' % rank if many else ''}out of memory ({str(exc).splitlines()[0]}); "
             "lower --memory-budget or --batch-size")
        return _abort(many, 2)
    except (ValueError, TypeError, OSError) as exc:
        if not many:
            _say(str(exc))
            return 2
        _say(f"rank {rank}: {type(exc).__name__}: {exc}")
        return _abort(many, 1)
    except Exception as exc:
        if not many:
            raise
        peer = isinstance(exc, getattr(torch.distributed, "DistBackendError", ())) or "gloo" in str(exc).lower() \
            or "connection" in str(exc).lower()
        what = "stopped: a collective failed (another process failed first; its line says why)" if peer else \
            "failed"
        _say(f"rank {rank}: {what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        return _abort(many, 1)
    if rank == 0:
        best = os.path.join(result.out, "model_best.pth")
        print(f"done: best rsum {result.best_rsum:.1f} (epoch {result.best_epoch}); {best}", flush=True)
    return _end(many, 0)


def _end(many: bool, code: int) -> int:
    """The end of a run every process reached: in a distributed run, leave the process group and
    exit at once with everything written (logs flushed and closed), without the interpreter's
    teardown: there, with torch 2.14 on CPU/gloo, a process exited "terminate called without an
    active exception" (SIGABRT) in about one distributed training run in four here, after its
    work was done (a C++ thread still joinable when a static was destroyed; a bare gloo script
    does not show it, a DDP training run does), which torchrun reports as a failed run."""
    if not many:
        return code
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _abort(many: bool, code: int) -> int:
    """A failure on this process alone: in a distributed run, exit now (the others' collectives
    then fail at once instead of waiting for this process)."""
    if many:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


__all__ = ["add_parser", "run_command"]
