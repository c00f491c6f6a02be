"""The constants of RCAR's function (SPEC.md), each defined here once.

RAR's dropout rate lives with its masks in :mod:`rcar_fast.dropout` (``RAR_DROPOUT``); each
backend's default memory budgets live in its kernel set (``rcar_fast.backends``).
"""

#: added to a norm before dividing by it: l2n(x) = x / (||x|| + EPS), the attention's
#: normalisation across queries, and the cosine's floor max(||x|| ||y||, EPS)
EPS = 1e-8

#: the first-step softmax temperature lam (the release's ``t2i_smooth`` / ``i2t_smooth``
#: options, "smooth" in its code), by direction
DEFAULT_TEMPERATURE = {"t2i": 10.0, "i2t": 3.0}
