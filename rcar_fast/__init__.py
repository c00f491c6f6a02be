"""rcar_fast: fast RCAR image-text matching (SPEC.md), plug-and-play pieces and a full head.

    import rcar_fast
    sim = rcar_fast.RCARSimilarity(regulator="coop_rcar", steps=2, attn_type="t2i")
    scores = sim(img, cap, cap_lens)          # (N_i, N_c)

Pieces over the pair grid: :mod:`rcar_fast.ops`. Backends: :func:`available_backends`,
:func:`backend_status`. Ground truth: :mod:`rcar_fast.reference`.
"""

from . import ops
from .backends import available_backends, backend_status
from .modules import RCARSimilarity, sim_state_from_checkpoint

__version__ = "0.1.0"

__all__ = ["RCARSimilarity", "available_backends", "backend_status", "ops",
           "sim_state_from_checkpoint", "__version__"]
