"""Test configuration: Triton's CPU interpreter and the repository root on sys.path.

TRITON_INTERPRET must be set before any Triton kernel module is imported (DESIGN.md,
"Testing tiers"), so it is set here, first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

# The tests use tiny tensors: one thread avoids OpenMP oversubscription on the 2-core CI box.
torch.set_num_threads(1)
