"""A Triton device function whose module names only triton.language.core (see
interp_core_helper.py)."""

import triton
from triton.language import core


@triton.jit
def add_one_through_core(x):
    return core.add(x, 1.0)
