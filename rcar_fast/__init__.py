"""rcar_fast: fast RCAR image-text matching (SPEC.md): the kernel library.

    import rcar_fast
    sim = rcar_fast.RCARSimilarity(regulator="coop_rcar", steps=2, attn_type="t2i")
    scores = sim(img, cap, cap_lens)          # (N_i, N_c)

The regulators as plug-and-play modules: :class:`AdaptiveAttention`, :class:`AlignmentVector`,
:class:`RCRModule`, :class:`RARModule`; the same pieces as functions over the pair grid:
:mod:`rcar_fast.ops`. Backends: :func:`available_backends`, :func:`backend_status`,
:func:`selftest`. Ground truth: :mod:`rcar_fast.reference`. ARCHITECTURE.md maps the code.

The application (the release's full model and checkpoints, data, retrieval and evaluation,
search, training, the command line) is the subpackage :mod:`rcar_fast.app`, imported on first
use: ``rcar_fast.data``, ``rcar_fast.encoders``, ``rcar_fast.retrieval``,
``rcar_fast.distributed``, ``rcar_fast.search``, ``rcar_fast.train`` and the names below from
them load it then.
"""

import importlib

from . import dropout, ops
from ._selftest import selftest
from .backends import available_backends, backend_status
from .modules import (AdaptiveAttention, AlignmentVector, RARModule, RCARSimilarity, RCRModule,
                      sim_state_from_checkpoint)

__version__ = "0.1.0"

#: application names, loaded from rcar_fast.app on first use (PEP 562)
_APP = {"data": "data", "encoders": "encoders", "retrieval": "retrieval", "distributed": "distributed",
        "search": "search", "train": "train",
        "load_precomp": "data", "structured_dataset": "data",
        "MatchingModel": "encoders", "Vocabulary": "encoders", "load_checkpoint": "encoders",
        "Recall": "retrieval", "recall_metrics": "retrieval", "score_all": "retrieval", "two_stage": "retrieval"}


def __getattr__(name):
    if name in _APP:
        module = importlib.import_module(f"{__name__}.app.{_APP[name]}")
        value = module if name == _APP[name] else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdaptiveAttention", "AlignmentVector", "RARModule", "RCARSimilarity", "RCRModule", "available_backends",
           "backend_status", "dropout", "ops", "selftest", "sim_state_from_checkpoint", "__version__", *_APP]
