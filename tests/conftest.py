"""Test configuration: Triton's CPU interpreter where there is no GPU, the tests folder on
sys.path, the Triton launchers' buffers filled (RCAR_FAST_FILL_EMPTY=1), one thread.

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

# The Triton launchers' uninitialised buffers (kernels/_alloc.py) with every bit set, NaN in every
# float dtype: a part a kernel leaves unwritten shows in the results, whatever the allocator
# hands back (an explicit RCAR_FAST_FILL_EMPTY is kept).
os.environ.setdefault("RCAR_FAST_FILL_EMPTY", "1")

# The tests use tiny tensors: one thread avoids OpenMP oversubscription on the 2-core CI box.
torch.set_num_threads(1)


def pytest_report_header(config):
    return (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}, "
            f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")

