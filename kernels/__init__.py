"""Triton kernels of rcar_fast, installed as ``rcar_fast.kernels`` (never a top-level package).

  attention.py  fused adaptive region-word attention, optionally fused with the alignment
                projection (E = l2n(W (Q - A)^2 + b)); launcher ``attention_fwd``
  rar.py        T steps of iterative aggregation reweighting per launch; launcher ``rar_fwd``
  attention_bwd.py  the attention's backward, recomputing each pair on chip; ``attention_bwd``
  rar.py        also the backward of one RAR step; launcher ``rar_bwd``

On CPU tensors they run under TRITON_INTERPRET=1 (tests).
"""

from .attention import attention_fwd
from .attention_bwd import attention_bwd
from .rar import rar_bwd, rar_fwd

__all__ = ["attention_fwd", "attention_bwd", "rar_fwd", "rar_bwd"]
