"""The compiled backends "cpp" (CPU tensors) and "cuda" (CUDA tensors): the ops of the extension
rcar_fast._C (csrc/; schemas in csrc/ops.cpp, contract in csrc/README.md), made traceable and
differentiable here (register_fake, register_autograd), run by the block pipeline the fused
backends share (rcar_fast._fused). The C++ CPU kernels (csrc/cpu/) and the CUDA kernels
(csrc/cuda/) implement the same four ops; the dispatcher picks by the tensors' device. The CPU
kernels add ``rcr``, a fused RCR step the "cpp" backend uses on its inference path (no
autograd: with gradients RCR runs in torch).
"""

from __future__ import annotations


import torch

from . import _fused

DEFAULT_BUDGET_CPU = 96 * 2**20
DEFAULT_BUDGET_GPU = 2 * 2**30
OP_NAMES = ("attention", "attention_bwd", "rar", "rar_bwd")


def load():
    """Import the extension (registers torch.ops.rcar_fast.*); raises ImportError if absent."""
    from . import _C  # noqa: F401
    return torch.ops.rcar_fast


def has_kernels(dispatch_key: str) -> bool:
    """Whether every op of the extension has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"rcar_fast::{n}", dispatch_key)
               for n in OP_NAMES)


_ops = load()
torch.library.register_fake("rcar_fast::attention")(_fused.attention_fake)
torch.library.register_fake("rcar_fast::attention_bwd")(_fused.attention_bwd_fake)
torch.library.register_fake("rcar_fast::rar")(_fused.rar_fake)
torch.library.register_fake("rcar_fast::rar_bwd")(_fused.rar_bwd_fake)
torch.library.register_fake("rcar_fast::rcr")(_fused.rcr_fake)


class _Registered:
    """``op.register_autograd`` for an op defined in C++ (what custom_op objects offer)."""

    def __init__(self, name: str):
        self.name = name

    def register_autograd(self, backward, setup_context):
        torch.library.register_autograd(self.name, backward, setup_context=setup_context)


_fused.register_attention_autograd(_Registered("rcar_fast::attention"), _ops.attention_bwd)
_fused.register_rar_autograd(_Registered("rcar_fast::rar"), _ops.rar_bwd.default, _ops.rar.default)
_rcr = _ops.rcr.default if torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::rcr", "CPU") else None
OPS = _fused.FusedOps(_ops.attention.default, _ops.rar.default, DEFAULT_BUDGET_CPU, DEFAULT_BUDGET_GPU,
                      rcr=_rcr, rcr_device="cpu")


# the pieces rcar_fast.ops calls, bound to this backend's ops
adaptive_attention, alignment, rcr_update, rar_update, rcar_scores = _fused.pieces(OPS)
