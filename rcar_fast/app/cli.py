"""Command line: ``rcar-fast`` (console script) or ``python -m rcar_fast``.

demo   scores synthetic structured data (captions made from their images' regions plus noise,
       rcar_fast.data.structured_dataset) with an RCAR head built to match it, on every
       available backend; prints each backend's pairs/s, its largest difference from the
       reference, and the retrieval recall it reaches, then a two-stage search against
       exhaustive scoring. Exits 1 if a backend differs from the reference beyond --tolerance.
eval   evaluates release checkpoints on a split in the SCAN precomp layout: recall, optionally
       MSCOCO's five folds, several checkpoints averaged (the "ALL" rows), two-stage search.
search top-k search of a release model over a gallery streamed from disk (rcar_fast.app.search).
selftest  runs every available backend (or --backends) against the reference on a small problem
       on --device, forward and backward, in each dtype (or --dtypes), and prints a table;
       exit 1 if one fails (rcar_fast.selftest).

Every user error prints one line on stderr, naming the argument or the file and the problem,
and exits 2, with no traceback: a malformed argument (argparse's own errors too), a device
that is not here (``--device cuda`` without a GPU), a backend that cannot run the inputs, a
missing or malformed file, a checkpoint of another shape, a wrong split, running out of
memory. (The benchmarks are ``python -m bench`` in a checkout of the repository.)

Under torchrun (``torchrun --nproc_per_node N -m rcar_fast eval|search ...``) eval and search
join the process group (gloo on CPU, NCCL on CUDA; --timeout bounds every wait), share the work
and give one process's result exactly; rank 0 alone prints, writes and shows the progress bar,
and an error on any process ends every process with exit 2 and one line (_scoring_command).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import List, Optional

import torch

from ..backends import available_backends, backend_status
from ..backends import resolve
from ..validate import REGULATORS
from ..modules import RCARSimilarity
from .retrieval import TIES


def synthetic_shard(n_images: int, n_captions: int, regions: int = 36, dim: int = 1024,
                    min_len: int = 6, max_len: int = 24, seed: int = 0,
                    device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A Flickr30K-shaped shard of random features (no structure): l2-normalised, lengths in
    [min_len, max_len], NaN padding. For retrieval that means something see
    :func:`rcar_fast.data.structured_dataset`."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_images, regions, dim, generator=g)
    cap = torch.randn(n_captions, max_len, dim, generator=g)
    lens = torch.randint(min_len, max_len + 1, (n_captions,), generator=g)
    img = img / img.norm(dim=-1, keepdim=True)
    cap = cap / cap.norm(dim=-1, keepdim=True)
    cap[torch.arange(max_len)[None, :] >= lens[:, None]] = float("nan")
    return img.to(device, dtype), cap.to(device, dtype), lens


def _timed(fn, runs: int):
    """(output, best wall time of ``runs`` >= 1 calls; the first call is timed too)."""
    best, out = float("inf"), None
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _fail(command: str, message: str) -> int:
    """One line on stderr, exit status 2."""
    print(f"rcar-fast {command}: {_one_line(message)}", file=sys.stderr)
    return 2


def _one_line(message) -> str:
    text = " ".join(str(message).split())
    return text or "error"


def _exc_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UsageError(Exception):
    """A command-line error: main() prints its one-line message and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and does not exit the process."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {_one_line(message)} (see {self.prog} --help)")


def parse_device(text: str) -> torch.device:
    """``--device``: cpu, cuda or cuda:N, and only a CUDA device that is here."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: rcar-fast runs on cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here "
                                         "(torch.cuda.is_available() is False); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), "
                                         f"cuda:0 to cuda:{count - 1}")
    return device


# ----------------------------------------------------------------------------- demo

RECALL_HEADER = f"{'i2t R@1':>7}{'R@5':>6}{'R@10':>6}  {'t2i R@1':>7}{'R@5':>6}{'R@10':>6}  {'rsum':>6}"


def _recall_cells(recall) -> str:
    """i2t R@1 R@5 R@10, t2i R@1 R@5 R@10 and rsum, under :data:`RECALL_HEADER`."""
    i, t = recall.i2t, recall.t2i
    return (f"{i[0]:>7.1f}{i[1]:>6.1f}{i[2]:>6.1f}  {t[0]:>7.1f}{t[1]:>6.1f}{t[2]:>6.1f}  "
            f"{recall.rsum:>6.1f}")


def demo(args) -> int:
    from .data import structured_dataset, structured_head
    from .retrieval import Scorer, average_scores, compare_two_stage, recall_metrics, two_stage

    device = args.device
    backends = [b for b in available_backends(device) if b != "reference"]
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in wanted if b not in backends and b != "reference"]
        if unknown:
            return _fail("demo", f"--backends: {', '.join(unknown)} not available here "
                                 f"(available: {', '.join(backends) or 'none'})")
        backends = [b for b in wanted if b != "reference"]
    n_c = args.images * args.captions_per_image
    print(f"rcar_fast demo: structured synthetic data, {args.images} images x {n_c} captions "
          f"({args.captions_per_image} per image; R=36, d=1024, lengths 6..24, NaN padding), "
          f"{args.regulator} T={args.steps} head built to match it, device {device}")
    for name, why in backend_status().items():
        if why != "available":
            print(f"  (backend {name}: {why})")
    data = structured_dataset(args.images, args.captions_per_image, seed=args.seed)
    img, cap, lens = data.img.to(device), data.cap.to(device), data.lens
    pairs = args.images * n_c
    directions = ["t2i", "i2t"] if args.attn_type == "both" else [args.attn_type]
    print(f"{'direction':<9} {'backend':<10} {'pairs/s':>8} {'max|diff| vs ref':>16} {RECALL_HEADER}")
    scores = {}          # (direction, backend) -> (N_i, N_c) scores
    seconds = {}
    heads = {}
    for attn_type in directions:
        head = structured_head(args.regulator, args.steps, attn_type, seed=args.seed).to(device)
        heads[attn_type] = head
        with torch.no_grad():
            ref, t_ref = _timed(lambda: head(img, cap, lens, backend="reference"), 1 if args.quick else 2)
        scores[attn_type, "reference"] = ref.float().cpu()
        print(f"{attn_type:<9} {'reference':<10} {pairs / t_ref:>8.0f} {'-':>16} "
              f"{_recall_cells(recall_metrics(scores[attn_type, 'reference'], args.captions_per_image))}")
        for name in backends:
            with torch.no_grad():
                out, t = _timed(lambda: head(img, cap, lens, backend=name), 2)
            diff = (out - ref).abs().max().item()
            scores[attn_type, name] = out.float().cpu()
            seconds[attn_type, name] = t
            print(f"{attn_type:<9} {name:<10} {pairs / t:>8.0f} {diff:>16.2e} "
                  f"{_recall_cells(recall_metrics(scores[attn_type, name], args.captions_per_image))}")
            if not diff <= args.tolerance:
                print(f"error: backend {name} differs from the reference by {diff:.2e} "
                      f"(> {args.tolerance:.0e})", file=sys.stderr)
                return 1
    if len(directions) == 2:
        for name in ["reference"] + backends:
            avg = average_scores([scores["t2i", name], scores["i2t", name]])
            print(f"{'ALL':<9} {name:<10} {'-':>8} {'-':>16} "
                  f"{_recall_cells(recall_metrics(avg, args.captions_per_image))}")
        print("  (ALL: the t2i and i2t heads' scores averaged, as the paper's ALL rows)")
    if args.rerank_k and backends:
        auto = resolve("auto", device)
        name, attn_type = (auto if auto in backends else backends[0]), directions[0]
        exhaustive = recall_metrics(scores[attn_type, name], args.captions_per_image)
        scorer = Scorer(heads[attn_type], img, cap, lens)
        result = min((two_stage(scorer, args.rerank_k, args.captions_per_image, backend=name)
                      for _ in range(2)), key=lambda r: r.seconds)    # best of two, as the rows
        report = compare_two_stage(exhaustive, seconds[attn_type, name], result)
        print(f"two-stage search ({attn_type} head, {name} backend, prefilter = cosine of mean-pooled "
              f"features, top {args.rerank_k} re-ranked per query):")
        print(f"  {'':<10} {RECALL_HEADER}")
        print(f"  {'exhaustive':<10} {_recall_cells(exhaustive)}")
        print(f"  {'two-stage':<10} {_recall_cells(result.recall)}")
        for line in report.lines():
            print("  " + line.replace("two-stage: ", ""))
    return 0


# ----------------------------------------------------------------------------- eval

def _find_vocab(args, checkpoint_opts) -> str:
    if args.vocab:
        return args.vocab
    seen: List[str] = []
    for opt in checkpoint_opts:
        vp, name = opt.get("vocab_path"), opt.get("data_name", "")
        if isinstance(vp, str):
            seen.append(os.path.join(vp, ("coco" if "coco" in str(name) else "f30k") + "_precomp_vocab.json"))
    folders = [os.path.dirname(os.path.abspath(p)) for p in args.checkpoint]
    data = os.path.abspath(args.data)
    folders += [data, os.path.join(data, "precomp"), os.path.dirname(data), os.path.join(os.path.dirname(data), "vocab")]
    for f in folders:
        seen.extend(sorted(glob.glob(os.path.join(f, "*vocab*.json"))))
    for p in seen:
        if os.path.isfile(p):
            return p
    raise ValueError("--vocab: no vocabulary json given, and none (*vocab*.json) next to the "
                     "checkpoint or the data; pass --vocab PATH")


def _encode(model, split, ids, lens, device, batch_size):
    """Region and word features of a split through one model's encoders, on the CPU."""
    import numpy as np
    imgs, caps = [], []
    with torch.no_grad():
        for s in range(0, split.n_images, batch_size):
            x = torch.from_numpy(np.array(split.images[s:s + batch_size], dtype=np.float32))  # a copy
            imgs.append(model.encode_images(x.to(device)).cpu())
        for s in range(0, ids.shape[0], batch_size):
            caps.append(model.encode_captions(ids[s:s + batch_size].to(device), lens[s:s + batch_size]).cpu())
    L = ids.shape[1]
    caps = [torch.nn.functional.pad(c, (0, 0, 0, L - c.shape[1])) for c in caps]
    return torch.cat(imgs), torch.cat(caps)


def _tied_share(sims, cpi: int) -> float:
    """Share of the i2t and t2i queries whose match scores exactly as much as a non-match."""
    from .retrieval import i2t_tie_counts, t2i_tie_counts
    tied_i, tied_t = i2t_tie_counts(sims, cpi)[1], t2i_tie_counts(sims, cpi)[1]
    return (int((tied_i > 0).sum()) + int((tied_t > 0).sum())) / (tied_i.numel() + tied_t.numel())


def evaluate(args) -> int:
    """rcar-fast eval. Under torchrun (the process group joined by main()) every process loads
    and encodes the split, the score matrix's tiles are shared out among the processes
    (score_all(group=...): bit-identical to one process's), and only rank 0 prints, writes and
    shows the progress bar; an error on any process in loading or scoring raises
    DistributedScoringError on every one."""
    from . import distributed
    from .retrieval import (Scorer, average_recall, average_scores, compare_two_stage, fold_slices,
                            recall_metrics, resolve_dtype, score_all, two_stage)

    group = True if distributed.in_group() else None
    main_rank = distributed.is_main()
    say = print if main_rank else _quiet
    with distributed.together(group, "eval"):     # every process agrees it is ready, or all stop
        try:    # unknown, unusable here, or unable to compute the dtype: before any work
            resolve(args.backend, args.device, dtype=resolve_dtype(args.dtype) or torch.float32)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--backend {args.backend}: {_exc_line(exc).replace('backend: ', '', 1)}") from None
        if args.save_scores and main_rank:     # (only rank 0 writes)
            folder = os.path.dirname(os.path.abspath(args.save_scores))
            if not os.path.isdir(folder):
                raise ValueError(f"--save-scores {args.save_scores}: no such folder {folder}")
        scorers, split = _load_and_encode(args, say)
    budget = args.memory_budget * 2**20 if args.memory_budget else None
    cpi = split.captions_per_image
    folds = fold_slices(split.n_images, 5, cpi) if args.fold5 else [(slice(None), slice(None))]
    exhaustive, staged, reports = [], [], []
    for f, (si, sc) in enumerate(folds):
        sub = [Scorer(s.head, s.img[si], s.cap[sc], s.lens[sc]) for s in scorers]
        tag = f"fold {f + 1}/5: " if args.fold5 else ""
        if not args.rerank_only:
            t0 = time.perf_counter()
            mats = [score_all(s.head, s.img, s.cap, s.lens, backend=args.backend, dtype=args.dtype,
                              memory_budget=budget, progress=None if args.progress else False,
                              desc=f"{tag}scoring", group=group) for s in sub]
            sims = average_scores(mats)
            t_ex = time.perf_counter() - t0
            rec = recall_metrics(sims, cpi, ties=args.ties)
            exhaustive.append(rec)
            n_pairs = sims.numel() * len(mats)
            say(f"{tag}exhaustive: {sims.shape[0]} x {sims.shape[1]} pairs x {len(mats)} model(s) in "
                f"{t_ex:.1f} s ({n_pairs / t_ex:.0f} pairs/s)" + (
                    f" on {distributed.world_size()} processes" if group else ""))
            tied = _tied_share(sims, cpi)
            if tied > 0 and args.ties == "pessimistic":     # say what the tie rule cost
                alt = recall_metrics(sims, cpi, ties="expected")
                say(f"{tag}ties: {100.0 * tied:.1f}% of queries have their match tied with a non-match, "
                    f"counted against the match (rsum {rec.rsum:.1f}; --ties expected: {alt.rsum:.1f})")
            if args.save_scores and main_rank:
                import numpy as np
                path = args.save_scores if not args.fold5 else f"{args.save_scores}.fold{f + 1}"
                np.save(path if path.endswith(".npy") else path + ".npy", sims.numpy())
            if args.fold5:
                for line in rec.lines():
                    say(f"  {line}")
        if args.rerank_k:       # (under torchrun every process runs it whole: not shared out)
            res = two_stage(sub, args.rerank_k, cpi, backend=args.backend, dtype=args.dtype,
                            memory_budget=budget, progress=None if args.progress and main_rank else False)
            staged.append(res.recall)
            if not args.rerank_only:
                reports.append(compare_two_stage(exhaustive[-1], t_ex, res))
            say(f"{tag}two-stage (k={args.rerank_k}): {res.pairs_scored} of {res.pairs_total} pairs "
                f"scored in {res.seconds:.1f} s (prefilter {res.prefilter_s:.1f} s)")
    title = "mean of 5 folds" if args.fold5 else "result"
    if exhaustive:
        say(f"exhaustive ({title}):")
        for line in average_recall(exhaustive).lines():
            say(f"  {line}")
    if staged:
        say(f"two-stage k={args.rerank_k} ({title}):")
        for line in average_recall(staged).lines():
            say(f"  {line}")
    if reports:
        ex_s = sum(r.exhaustive_s for r in reports)
        ts_s = sum(r.two_stage_s for r in reports)
        lost = average_recall(exhaustive).rsum - average_recall(staged).rsum
        say(f"two-stage vs exhaustive: recall lost {lost:.1f} rsum; {ts_s:.1f} s vs {ex_s:.1f} s "
            f"({100.0 * (1.0 - ts_s / ex_s) if ex_s > 0 else float('nan'):.0f}% of the time saved)")
    return 0


def _quiet(*args, **kwargs) -> None:
    """print's stand-in on the processes other than rank 0."""


def _load_and_encode(args, say):
    """eval's split, checkpoints and vocabulary, read and checked, and the features encoded:
    ([Scorer per checkpoint], split)."""
    from .data import load_precomp
    from .encoders import (Vocabulary, check_vocab, checkpoint_options, encode_captions,
                           model_from_checkpoint, read_checkpoint)
    from .retrieval import Scorer
    device = args.device
    split = load_precomp(args.data, args.split)
    say(f"rcar-fast eval: {split.folder} split {split.split!r}: {split.n_images} images, "
        f"{len(split.captions)} captions")
    ims_file = os.path.join(split.folder, f"{split.split}_ims.npy")
    if args.fold5 and split.n_images % 5:
        raise ValueError(f"--fold5: {ims_file} holds {split.n_images} images, which do not split "
                         "into five folds of equal size")
    overrides = dict(regulator=args.regulator, steps=args.steps, attn_type=args.attn_type)
    models, opts = [], []
    for p in args.checkpoint:
        ckpt = read_checkpoint(p, args.trust_checkpoint)
        opts.append(checkpoint_options(ckpt))
        model = model_from_checkpoint(ckpt, p, **overrides)
        del ckpt
        if model.config.img_dim != split.images.shape[2]:
            raise ValueError(f"{ims_file}: region features of size {split.images.shape[2]}, but "
                             f"{p} expects img_dim {model.config.img_dim}")
        models.append(model.to(device))
    vocab_path = _find_vocab(args, opts)
    vocab = Vocabulary.from_json(vocab_path)
    for m, p, opt in zip(models, args.checkpoint, opts):
        check_vocab(m, vocab, vocab_path)
        note = "" if "attn_type" in opt or args.attn_type else \
            " (attn_type not in the checkpoint: t2i assumed; --attn-type sets it)"
        say(f"  model {p}: {m.config.describe()}{note}")
    say(f"  vocabulary {vocab_path}: {len(vocab)} words")
    ids, lens = encode_captions(split.captions, vocab)
    t0 = time.perf_counter()
    scorers = []
    for m in models:
        img, cap = _encode(m, split, ids, lens, device, args.batch_size)
        scorers.append(Scorer(m.sim_enc, img, cap, lens))
    say(f"  encoded with {len(models)} model(s) in {time.perf_counter() - t0:.1f} s")
    return scorers, split


# ----------------------------------------------------------------------------- parser

def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low`` (``what`` names the bound in the error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rcar-fast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="score synthetic structured data with every backend: speed, "
                                    "agreement with the reference, recall")
    d.add_argument("--images", type=_positive_int, default=16)
    d.add_argument("--captions-per-image", type=_positive_int, default=5)
    d.add_argument("--regulator", choices=REGULATORS, default="coop_rcar")
    d.add_argument("--steps", type=int, default=2)
    d.add_argument("--attn-type", choices=["t2i", "i2t", "both"], default="both")
    d.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if there is one)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |difference| from the reference (fp32); exit 1 above it")
    d.add_argument("--rerank-k", type=_non_negative_int, default=5,
                   help="two-stage search keeping the top K per query (0: skip it)")
    d.add_argument("--backends", default=None,
                   help="comma-separated backends to compare with the reference (default: every "
                        "available one)")
    d.add_argument("--quick", action="store_true", help="time the reference once, not twice (best of two)")

    e = sub.add_parser("eval", help="recall of release checkpoints on a precomp split")
    e.add_argument("--data", required=True, help="folder with {split}_ims.npy and {split}_caps.txt "
                                                 "(or a precomp/ subfolder holding them)")
    e.add_argument("--split", default="test", help="test (Flickr30K 1K), testall (MSCOCO), dev ...")
    e.add_argument("--checkpoint", required=True, action="append",
                   help="a release checkpoint (.pth); give it twice (t2i and i2t models) to "
                        "average their scores, as the paper's ALL rows")
    e.add_argument("--vocab", help="vocabulary json (default: *vocab*.json next to the checkpoint or data)")
    e.add_argument("--backend", default="auto")
    e.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if there is one)")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="score in half precision (features and head cast; default: fp32)")
    e.add_argument("--ties", choices=list(TIES), default="pessimistic",
                   help="a non-match scoring exactly as much as the match: ranked ahead of it "
                        "(pessimistic, the release's rule) or in random order (expected recall)")
    e.add_argument("--fold5", action="store_true", help="MSCOCO 1K: mean over five folds of 1000 images")
    e.add_argument("--rerank-k", type=_positive_int, default=None,
                   help="also run two-stage search keeping the top K per query, and compare")
    e.add_argument("--rerank-only", action="store_true", help="with --rerank-k: skip exhaustive scoring")
    e.add_argument("--regulator", choices=REGULATORS, default=None, help="override the checkpoint's")
    e.add_argument("--steps", type=int, default=None, help="override the checkpoint's")
    e.add_argument("--attn-type", choices=["t2i", "i2t"], default=None, help="override the checkpoint's")
    e.add_argument("--batch-size", type=_positive_int, default=128, help="encoder batch size")
    e.add_argument("--memory-budget", type=_positive_int, default=None, help="MiB per scoring tile")
    e.add_argument("--save-scores", default=None, help="write the (N_i, N_c) score matrix (.npy)")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    e.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle any Python object the checkpoint holds (only for trusted files)")
    e.add_argument("--timeout", type=_positive_float, default=1800.0,
                   help="under torchrun: seconds any process may wait for the others (default 1800)")

    from . import search as search_command
    search_command.add_parser(sub)

    t = sub.add_parser("selftest", help="every available backend against the reference on a small "
                                        "problem, forward and backward, each dtype; a table")
    t.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if there is one)")
    t.add_argument("--backends", default=None, help="comma-separated (default: every available one)")
    t.add_argument("--dtypes", default=None, help="comma-separated of fp32, fp16, bf16, fp64 (default: all)")

    from . import train as train_command
    train_command.add_parser(sub)
    return p


SELFTEST_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def selftest_command(args) -> int:
    """rcar-fast selftest: exit 0 when every row passes, 1 when one fails, 2 on bad arguments."""
    from .._selftest import selftest
    device = torch.device(args.device)
    names = [b for b in available_backends(device) if b != "reference"]
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in wanted if b not in names]
        if unknown:
            return _fail("selftest", f"--backends: {', '.join(unknown)} not available on {device} "
                                     f"(available: {', '.join(names)})")
        names = wanted
    dtypes = None
    if args.dtypes:
        words = [w.strip() for w in args.dtypes.split(",") if w.strip()]
        bad = [w for w in words if w not in SELFTEST_DTYPES]
        if bad:
            return _fail("selftest", f"--dtypes: unknown {', '.join(bad)} (known: {', '.join(SELFTEST_DTYPES)})")
        dtypes = [SELFTEST_DTYPES[w] for w in words]
    rows = selftest(device, names, dtypes)
    return 0 if all(r.ok for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        if _launcher_rank() == 0:      # under torchrun every process parses the same line: one says it
            print(exc, file=sys.stderr)
        return 2
    if args.command == "demo":
        try:
            RCARSimilarity(16, 8, args.regulator, args.steps)
        except (ValueError, TypeError) as exc:
            return _fail("demo", f"--regulator {args.regulator} --steps {args.steps}: {_exc_line(exc)}")
        try:
            return demo(args)
        except torch.OutOfMemoryError as exc:
            return _fail("demo", f"out of memory on {args.device} ({_exc_line(exc)}); try fewer --images")
    if args.command == "selftest":
        return selftest_command(args)
    if args.command == "train":
        from . import train as train_command
        return train_command.run_command(args)
    if args.command == "eval":
        if args.rerank_only and not args.rerank_k:
            return _fail("eval", "--rerank-only needs --rerank-k K")
        if args.ties != "pessimistic" and args.rerank_k:
            return _fail("eval", f"--ties {args.ties}: two-stage search (--rerank-k) ranks ties "
                                 "pessimistically only; drop one of them")
        return _scoring_command("eval", evaluate, args)
    if args.command == "search":
        from . import search as search_command
        return _scoring_command("search", search_command.command, args)
    return 2


def _launcher_rank() -> int:
    """RANK as torchrun set it (0 without a launcher): known before any process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _scoring_command(name: str, run, args) -> int:
    """Run eval or search, on one process or, under torchrun, on each of them (joining the
    process group first: gloo on CPU, NCCL on CUDA, every wait bounded by --timeout).

    A user error is one line on stderr and exit 2. Under torchrun every exception is: an error
    the processes agreed on (DistributedScoringError: raised on every process, naming the
    ranks) is printed by rank 0 alone, after which the processes meet once more so that no
    process exits (and torchrun stops the rest) before that line is out; any other error is
    printed by the process that hit it, naming its rank, and the others stop on their next
    collective (the peer is gone) or at the timeout."""
    from . import distributed
    torchrun = distributed.under_torchrun()
    rank = _launcher_rank()
    try:
        if torchrun:
            args.device = distributed.process_device(args.device)
            distributed.launch(args.device, args.timeout)
        return run(args)
    except distributed.DistributedScoringError as exc:
        if distributed.is_main():
            _fail(name, _exc_line(exc))
            sys.stderr.flush()
        try:
            distributed.barrier()
        except Exception:        # a process gone already: nothing left to wait for
            pass
        return 2
    except torch.OutOfMemoryError as exc:
        where = f"rank {rank}: " if torchrun else ""
        return _fail(name, f"{where}out of memory on {args.device} ({_exc_line(exc)}); lower "
                           "--memory-budget or --batch-size")
    except (ValueError, TypeError, OSError) as exc:   # files, shapes, splits: one line
        return _fail(name, (f"rank {rank}: " if torchrun else "") + _exc_line(exc))
    except Exception as exc:
        if not torchrun:
            raise             # one process: a bug, with its traceback
        return _fail(name, f"rank {rank}: {type(exc).__name__}: {_exc_line(exc)}")
    finally:
        if torchrun:
            distributed.finish()


if __name__ == "__main__":
    sys.exit(main())
