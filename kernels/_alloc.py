"""The launchers' uninitialised buffers (outputs and scratches the kernels write in full before
anything reads them).

``empty`` is ``torch.empty``, except under ``RCAR_FAST_FILL_EMPTY=1`` (tests/conftest.py sets it
for the test suite): then every byte is 0xff, which reads as NaN in every float dtype, also where
a buffer is viewed as a narrower dtype (an fp32 NaN's low half is an fp16/bf16 zero). A part a
kernel leaves unwritten then shows in the results, rather than depending on what the allocator
hands back (fresh CPU memory is often zeros, a GPU's reused memory is not)."""

from __future__ import annotations

import os
from typing import Sequence

import torch

#: the integer dtype of each float's element size, for the all-bits-set fill
_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def filling() -> bool:
    """Whether :func:`empty` fills its buffers (``RCAR_FAST_FILL_EMPTY=1``)."""
    return os.environ.get("RCAR_FAST_FILL_EMPTY") == "1"


def empty(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape, dtype, device); for a float dtype every bit set under
    ``RCAR_FAST_FILL_EMPTY=1`` (other dtypes: not filled)."""
    if not filling() or not dtype.is_floating_point:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(tuple(shape), -1, dtype=_INTS[dtype.itemsize], device=device).view(dtype)
