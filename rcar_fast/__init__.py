"""rcar_fast: fast RCAR image-text matching (SPEC.md), plug-and-play pieces and a full head.

    import rcar_fast
    sim = rcar_fast.RCARSimilarity(regulator="coop_rcar", steps=2, attn_type="t2i")
    scores = sim(img, cap, cap_lens)          # (N_i, N_c)

Pieces over the pair grid: :mod:`rcar_fast.ops`. Backends: :func:`available_backends`,
:func:`backend_status`. Ground truth: :mod:`rcar_fast.reference`.
The release's full model and checkpoints: :mod:`rcar_fast.encoders`. Data (precomp layout,
synthetic structured data): :mod:`rcar_fast.data`. All-pairs scoring, recall metrics and
two-stage search: :mod:`rcar_fast.retrieval`.
"""

from . import ops
from .backends import available_backends, backend_status
from .modules import RCARSimilarity, sim_state_from_checkpoint
from ._selftest import selftest
from . import data, encoders, retrieval
from .data import load_precomp, structured_dataset
from .encoders import MatchingModel, Vocabulary, load_checkpoint
from .retrieval import Recall, recall_metrics, score_all, two_stage

__version__ = "0.1.0"

__all__ = ["MatchingModel", "RCARSimilarity", "Recall", "Vocabulary", "available_backends",
           "backend_status", "data", "encoders", "load_checkpoint", "load_precomp", "ops",
           "recall_metrics", "retrieval", "score_all", "selftest", "sim_state_from_checkpoint",
           "structured_dataset", "two_stage", "__version__"]
