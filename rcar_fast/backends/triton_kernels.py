"""The "triton" backend's kernel set: the custom ops of rcar_fast.kernels (kernels/: each op's
Triton kernels, launcher, registration, fake and autograd together). The attention fuses the
alignment projection (the d-wide attended context never reaches memory), RAR runs one launch per
step with the gates of every pair as one GEMM; RCR's step runs as two Triton GEMM kernels with
its element-wise work in their epilogues (``rcr``, inference; under autograd the pipeline's
recomputing torch step, rcar_fast.torch_math.rcr_step_recomputed), and F is materialised per
pair. The context items' Gram matrices (the attention's column norms) are made once per call
for the t2i grid's images, else once per block (``context_gram``), not once per launch. On CPU
tensors the kernels run only under TRITON_INTERPRET=1 (the test tier). At inference the last
RAR step's launch takes the scoring layer too (``rar_scores``: h never stored, no torch ops for
the scores)."""

from __future__ import annotations

import os

from .contract import KernelSet


def load_kernels():
    """rcar_fast.kernels (installed from kernels/). In a source checkout run without
    ``pip install -e .`` the folder is added to the package's path first."""
    try:
        from .. import kernels
    except ImportError:
        import rcar_fast
        rcar_fast.__path__.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from .. import kernels
    return kernels


_k = load_kernels()

#: the Triton kernels take at most MAX_ROWS query and context rows per pair and alignment
#: vectors of at most MAX_WIDTH (every configuration up to there compiles without spills)
MAX_ROWS = _k.attention.MAX_ROWS
MAX_WIDTH = _k.attention.MAX_WIDTH

#: default budgets: 24 MiB on CPU tensors (the interpreter is slow), 2 GiB on a GPU or, where
#: more, its share (KernelSet.budget: 1/16 of its memory, at most 8 GiB); d-wide
#: buffers per block: F and the new F being built (3), 6 under autograd (measured like the
#: torch backend's, tests/test_memory.py)
KERNELS = KernelSet(name="triton", devices=("cuda", "cpu"), attention=_k.triton_attention, rar=_k.triton_rar,
                    attention_bwd=_k.triton_attention_bwd, rar_bwd=_k.triton_rar_bwd,
                    rcr=_k.triton_rcr, rcr_devices=("cuda", "cpu"), rcr_factors_bwd=_k.rcr_factors_bwd,
                    budgets={"cpu": 24 * 2**20, "cuda": 2 * 2**30}, live_buffers=3, live_buffers_train=6,
                    rcr_recompute=True, context_gram=_k.attention.context_gram,
                    workspace=_k.attention.call_workspace, rar_scores=_k.triton_rar_scores)


def shape_problem(rows: int, width: int):
    """Why the Triton kernels cannot take pairs of ``rows`` query/context rows and alignment
    vectors ``width`` wide, or None."""
    if rows > MAX_ROWS:
        return (f"'triton' takes at most {MAX_ROWS} words and regions per pair (got {rows}); "
                "use 'cuda' or 'torch'")
    if width > MAX_WIDTH:
        return f"'triton' takes alignment vectors of at most {MAX_WIDTH} (sim_dim), got {width}; use 'cuda' or 'torch'"
    return None
