"""Two Triton functions in modules that name different language modules, for
tests/test_fused_ops.py's check of kernels/_interpreter.py use_one_patch_per_launch: this module
names triton.language as tl and holds the kernel; interp_core_device.py names only
triton.language.core and holds the device function it calls, so the interpreter must patch
tl.core at that call (the launch patched only tl)."""

import triton
import triton.language as tl

from interp_core_device import add_one_through_core


@triton.jit
def add_one_kernel(x_ptr, B: tl.constexpr):
    r = tl.arange(0, B)
    tl.store(x_ptr + r, add_one_through_core(tl.load(x_ptr + r)))
