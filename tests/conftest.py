"""Test configuration: Triton's CPU interpreter where there is no GPU, the tests folder on
sys.path, one thread.

TRITON_INTERPRET must be set before any Triton kernel module is imported (DESIGN.md, "Testing
tiers"), so it is decided here, first: without a CUDA device it defaults to 1 (the interpreter
tier runs the Triton kernels on CPU tensors); with one it stays unset, so `pytest -m gpu` runs
the real GPU kernels (the interpreter-tier tests then skip, saying why). An explicit
TRITON_INTERPRET is always kept.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402  (torch.cuda does not import triton)

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The tests use tiny tensors: one thread avoids OpenMP oversubscription on the 2-core CI box.
torch.set_num_threads(1)


def pytest_report_header(config):
    return (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}, "
            f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")


import pytest  # noqa: E402


@pytest.fixture
def nan_scratch(monkeypatch):
    """The Triton backward's uninitialised scratch buffers (kernels/attention_bwd.py _scratch:
    dY, dP, (Q - A)^2, dF) filled with all bits set (NaN) instead, so a part a kernel leaves unwritten shows in
    the gradients rather than depending on what the allocator hands back. A no-op where the
    triton backend cannot load."""
    import importlib

    try:
        from rcar_fast.backends.triton_kernels import load_kernels
        bwd = importlib.import_module(load_kernels().__name__ + ".attention_bwd")
    except ImportError:
        return

    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}

    def nan_filled(shape, dtype, device):
        # every bit set: NaN in each float dtype, also where a buffer is viewed as a narrower
        # dtype (d2, fp16/bf16, in fp32 dF's storage: an fp32 NaN's low half reads as 0 there)
        size = torch.empty(0, dtype=dtype).element_size()
        return torch.full(shape, -1, dtype=ints[size], device=device).view(dtype)

    monkeypatch.setattr(bwd, "_scratch", nan_filled)
