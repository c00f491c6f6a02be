"""Triton kernels of rcar_fast, installed as ``rcar_fast.kernels`` (never a top-level package).
Per op, the kernels, the launcher, the torch.library custom op, its fake and its autograd:

  attention.py      fused adaptive region-word attention, optionally fused with the alignment
                    projection (E = l2n(W (Q - A)^2 + b)); launcher ``attention_fwd``; custom op
                    ``rcar_fast::triton_attention`` and its fake
  attention_bwd.py  the attention's backward, recomputing each pair on chip; launcher
                    ``attention_bwd``; ``rcar_fast::triton_attention_bwd``, and the attention's
                    autograd (which calls it)
  rar.py            T steps of RAR (one launch per step, several pairs per program, the gates
                    of every pair one GEMM) and one step's backward; launchers ``rar_fwd``,
                    ``rar_bwd``; ``rcar_fast::triton_rar`` / ``::triton_rar_bwd``, fakes, autograd;
                    ``::triton_rar_scores`` (inference: the last step's launch takes the
                    scoring layer, h never stored)
  rcr.py            one RCR step for inference as two GEMM kernels (tensor cores) with the
                    tanh, clamp and temperatures in their epilogues; ``rcr_step``;
                    ``rcar_fast::triton_rcr`` and its fake; ``rcr_factors_bwd``, the d-wide
                    chain of RCR's recomputing backward in training as one GEMM kernel

The launchers take their outputs and scratches from _alloc.empty (torch.empty; every bit set,
NaN, under RCAR_FAST_FILL_EMPTY=1, which the test suite sets, so a part a kernel leaves
unwritten shows). The "triton" backend (rcar_fast.backends.triton_kernels) binds the custom ops
into a kernel set.
On CPU tensors they run under TRITON_INTERPRET=1 (tests), where _interpreter.py makes the
interpreter's scans (the attention forward's segmented sums) log-step instead of element by element,
and patches the language once per launch (not again at every device-function call) from lists of
its builtins made once.
"""

from ._interpreter import use_listed_builtins, use_log_step_scan, use_one_patch_per_launch

# before any kernel runs: the interpreter's scans log-step, not element by element; the language
# patched once per launch, from lists of its builtins made once
use_log_step_scan()
use_one_patch_per_launch()
use_listed_builtins()

from .attention import attention_fwd, triton_attention  # noqa: E402
from .attention_bwd import attention_bwd, triton_attention_bwd
from .rar import rar_bwd, rar_fwd, triton_rar, triton_rar_bwd, triton_rar_scores
from .rcr import rcr_factors_bwd, rcr_step, triton_rcr

__all__ = ["attention_bwd", "attention_fwd", "rar_bwd", "rar_fwd", "rcr_factors_bwd", "rcr_step", "triton_attention",
           "triton_attention_bwd", "triton_rar", "triton_rar_bwd", "triton_rar_scores", "triton_rcr"]
