"""Command line: ``python -m rcar_fast demo`` (also the console script ``rcar-fast``).

demo  scores a synthetic Flickr30K-shaped shard (R = 36 regions, d = 1024, captions of 6..24
      words, NaN in the padding) with a randomly initialised RCAR head, on every available
      backend, and prints each backend's largest difference from the reference and pairs/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from . import available_backends, backend_status
from ._validate import REGULATORS
from .modules import RCARSimilarity


def synthetic_shard(n_images: int, n_captions: int, regions: int = 36, dim: int = 1024,
                    min_len: int = 6, max_len: int = 24, seed: int = 0,
                    device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A Flickr30K-shaped shard: l2-normalised features, lengths in [min_len, max_len], NaN padding."""
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


def demo(args) -> int:
    device = torch.device(args.device)
    print(f"rcar_fast demo: {args.images} images x {args.captions} captions, R=36, d=1024, "
          f"lengths 6..24 (NaN padding), {args.regulator} T={args.steps}, device {device}")
    for name, why in backend_status().items():
        if why != "available":
            print(f"  (backend {name}: {why})")
    img, cap, lens = synthetic_shard(args.images, args.captions, seed=args.seed, device=args.device)
    pairs = args.images * args.captions
    directions = ["t2i", "i2t"] if args.attn_type == "both" else [args.attn_type]
    print(f"{'direction':<9} {'backend':<10} {'pairs/s':>10} {'max |diff| vs reference':>24}")
    for attn_type in directions:
        torch.manual_seed(args.seed)
        model = RCARSimilarity(regulator=args.regulator, steps=args.steps, attn_type=attn_type)
        model = model.to(device).eval()
        with torch.no_grad():
            ref, t_ref = _timed(lambda: model(img, cap, lens, backend="reference"), 1 if args.quick else 2)
            print(f"{attn_type:<9} {'reference':<10} {pairs / t_ref:>10.0f} {'-':>24}")
            for name in available_backends(device):
                if name == "reference":
                    continue
                out, t = _timed(lambda: model(img, cap, lens, backend=name), 2)
                diff = (out - ref).abs().max().item()
                print(f"{attn_type:<9} {name:<10} {pairs / t:>10.0f} {diff:>24.2e}")
                if not diff <= args.tolerance:
                    print(f"error: backend {name} differs from the reference by {diff:.2e} "
                          f"(> {args.tolerance:.0e})", file=sys.stderr)
                    return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rcar-fast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="score a synthetic Flickr30K-shaped shard with every backend")
    d.add_argument("--images", type=int, default=64)
    d.add_argument("--captions", type=int, default=64)
    d.add_argument("--regulator", choices=REGULATORS, default="coop_rcar")
    d.add_argument("--steps", type=int, default=2)
    d.add_argument("--attn-type", choices=["t2i", "i2t", "both"], default="both")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |difference| from the reference (fp32); exit 1 above it")
    d.add_argument("--quick", action="store_true", help="time the reference once, not twice (best of two)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if args.images < 1 or args.captions < 1:
            print("rcar-fast demo: --images and --captions must be >= 1", file=sys.stderr)
            return 2
        try:
            RCARSimilarity(16, 8, args.regulator, args.steps)
        except (ValueError, TypeError) as exc:
            print(f"rcar-fast demo: {exc}", file=sys.stderr)
            return 2
        return demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
