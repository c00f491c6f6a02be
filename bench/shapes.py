"""The shards the benchmark scores, and their seeded inputs.

A shard is a block of the (image, caption) grid as one evaluation step of the release sees it:
``n_images`` images of R regions against ``n_captions`` captions whose lengths are drawn
uniformly from [len_lo, len_hi] with a fixed seed. Features are random unit vectors (the
release's encoders l2-normalise theirs); caption padding holds NaN, which no result may see.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Tuple

import torch


@dataclass(frozen=True)
class Shard:
    name: str
    n_images: int
    n_captions: int
    len_lo: int
    len_hi: int
    regions: int = 36
    embed_dim: int = 1024
    sim_dim: int = 256
    seed: int = 0

    @property
    def pairs(self) -> int:
        return self.n_images * self.n_captions

    @property
    def label(self) -> str:
        """The ``shape`` column: what the shard is, compactly."""
        return (f"{self.name} {self.n_images}x{self.n_captions} R{self.regions} d{self.embed_dim} "
                f"s{self.sim_dim} len{self.len_lo}-{self.len_hi}")

    def resized(self, n_images: int = None, n_captions: int = None) -> "Shard":
        return dataclasses.replace(self, n_images=n_images or self.n_images,
                                   n_captions=n_captions or self.n_captions)

    def cap_lens(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(self.len_lo, self.len_hi + 1, (self.n_captions,), generator=g)

    def inputs(self, device, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(img (N_i, R, d), cap (N_c, len_hi, d) NaN-padded, cap_lens (N_c,) int64 on CPU)."""
        g = torch.Generator().manual_seed(self.seed + 1)
        d = self.embed_dim
        img = torch.randn(self.n_images, self.regions, d, generator=g)
        cap = torch.randn(self.n_captions, self.len_hi, d, generator=g)
        img = img / img.norm(dim=-1, keepdim=True)
        cap = cap / cap.norm(dim=-1, keepdim=True)
        lens = self.cap_lens()
        pad = torch.arange(self.len_hi)[None, :] >= lens[:, None]
        cap[pad] = float("nan")
        return img.to(device, dtype), cap.to(device, dtype), lens


#: Flickr30K- and MSCOCO-shaped evaluation shards (100 x 100 pairs), and the training batch
SHARDS: Dict[str, Shard] = {
    "flickr30k": Shard("flickr30k", 100, 100, 6, 24),
    "mscoco": Shard("mscoco", 100, 100, 6, 30),
}
TRAIN_SHARD = Shard("train", 128, 128, 6, 24)
