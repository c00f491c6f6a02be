"""The compiled backends "cpp" (CPU tensors) and "cuda" (CUDA tensors): the ops of the extension
rcar_fast._C (csrc/: schemas in csrc/ops.cpp, the contract in csrc/README.md, kernels in
csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu), made traceable (register_fake) and differentiable
(register_autograd) here, as extension-cpp's ops.py does beside its csrc/. The dispatcher picks
the CPU or CUDA kernel by the tensors' device. Both add ``rcr``, a fused RCR step the "cpp" and
"cuda" backends use on their inference path (no autograd: with gradients RCR runs in torch)."""

from __future__ import annotations

import torch

from . import contract
from .contract import KernelSet

OP_NAMES = ("attention", "attention_bwd", "rar", "rar_bwd")


def load():
    """Import the extension (registers torch.ops.rcar_fast.*); raises ImportError if absent."""
    from .. import _C  # noqa: F401
    return torch.ops.rcar_fast


def has_kernels(dispatch_key: str) -> bool:
    """Whether every op of the extension has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"rcar_fast::{n}", dispatch_key)
               for n in OP_NAMES)


_ops = load()
torch.library.register_fake("rcar_fast::attention")(contract.attention_fake)
torch.library.register_fake("rcar_fast::attention_bwd")(contract.attention_bwd_fake)
torch.library.register_fake("rcar_fast::rar")(contract.rar_fake)
torch.library.register_fake("rcar_fast::rar_bwd")(contract.rar_bwd_fake)
torch.library.register_fake("rcar_fast::rcr")(contract.rcr_fake)


@torch.library.register_fake("rcar_fast::context_gram")
def _context_gram_fake(context, clens):
    return context.new_empty(context.shape[0], context.shape[1], context.shape[1], dtype=torch.float32)


@torch.library.register_fake("rcar_fast::rcr_factors_bwd")
def _rcr_factors_bwd_fake(hidden, w2, b2, factors, grad, dfactors):
    return hidden.new_empty(hidden.shape[0], w2.shape[0])


@torch.library.register_fake("rcar_fast::rar_scores")
def _rar_scores_fake(E, qlens, h0, wq, bq, wk, bk, wv, bv, score_w, score_b):
    return E.new_empty(E.shape[0], E.shape[1], dtype=torch.float32)
contract.register_attention_autograd(contract.RegisteredOp("rcar_fast::attention"), _ops.attention_bwd)
contract.register_rar_autograd(contract.RegisteredOp("rcar_fast::rar"), _ops.rar_bwd.default, _ops.rar.default)

_HAS_CPU_RCR = torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::rcr", "CPU")
_HAS_CUDA_RCR = torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::rcr", "CUDA")
_HAS_CUDA_GRAM = torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::context_gram", "CUDA")
_HAS_CUDA_SCORES = torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::rar_scores", "CUDA")
_HAS_CPU_RCR_BWD = torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::rcr_factors_bwd", "CPU")
_HAS_CUDA_RCR_BWD = torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::rcr_factors_bwd", "CUDA")

#: "cpp": default block budget 96 MiB; d-wide buffers per block 3 (F and the new F being built),
#: 6 under autograd (measured, tests/test_memory.py; with RCR recomputed in backward a step's
#: peak is about 3.1 of them at one block, bench/results/train_memory.md: kept at 6, a margin);
#: the recomputed RCR backward's d-wide chain one op (rcr_factors_bwd: one GEMM, one pass), as cuda's
CPP = KernelSet(name="cpp", devices=("cpu",), attention=_ops.attention.default, rar=_ops.rar.default,
                attention_bwd=_ops.attention_bwd.default, rar_bwd=_ops.rar_bwd.default,
                budgets={"cpu": 96 * 2**20}, live_buffers=3, live_buffers_train=6, rcr_recompute=True,
                rcr=_ops.rcr.default if _HAS_CPU_RCR else None, rcr_devices=("cpu",) if _HAS_CPU_RCR else (),
                rcr_factors_bwd=_ops.rcr_factors_bwd.default if _HAS_CPU_RCR and _HAS_CPU_RCR_BWD else None)
#: "cuda": default block budget 2 GiB or, where more, the GPU's share (KernelSet.budget); the
#: same buffer counts; the context items' Gram matrices made once for several calls at inference
#: (context_gram: once per call for the t2i grid's images, else once per block), and the scoring
#: layer in RAR's last launch (rar_scores: rar_fwd_wg_kernel's epilogue on an sm_90a build), as triton's;
#: the recomputed RCR backward's d-wide chain one launch (rcr_factors_bwd: the kRcrFactorsBwd epilogue
#: of the RCR GEMM kernel in fp16/bf16), as triton's
CUDA = KernelSet(name="cuda", devices=("cuda",), attention=_ops.attention.default, rar=_ops.rar.default,
                 attention_bwd=_ops.attention_bwd.default, rar_bwd=_ops.rar_bwd.default,
                 budgets={"cpu": 96 * 2**20, "cuda": 2 * 2**30}, live_buffers=3, live_buffers_train=6,
                 rcr_recompute=True,
                 rcr=_ops.rcr.default if _HAS_CUDA_RCR else None, rcr_devices=("cuda",) if _HAS_CUDA_RCR else (),
                 rcr_factors_bwd=_ops.rcr_factors_bwd.default if _HAS_CUDA_RCR and _HAS_CUDA_RCR_BWD else None,
                 context_gram=_ops.context_gram.default if _HAS_CUDA_GRAM else None,
                 rar_scores=_ops.rar_scores.default if _HAS_CUDA_SCORES else None)
