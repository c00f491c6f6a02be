"""Planted bugs in the Triton kernels' grouped forward (GP pairs of one context item per program)
and the Gram matrix computed once per context item, each with the tests that must catch it.
Format: tests/mutants/run.py."""

ATT = "kernels/attention.py"
MANY = "tests/test_fused_ops.py::test_attention_many_query_items_per_context_item"

MUTANTS = [
    dict(name="triton: the query-norm of the scores taken across the whole program (every pair's rows)",
         file=ATT, old="    if GP == 1:\n        N = tl.sqrt(tl.sum(S * S, axis=0))",
         new="    if True:\n        N = tl.sqrt(tl.sum(S * S, axis=0))",
         tests=[f"{MANY}[triton-A,F=1-BQ16-fp32]"]),
    dict(name="triton: the Gram matrix built from padded context rows (NaN padding reaches |U|)",
         file=ATT, old="                     mask=cmask[:, None] & dm[None, :], other=0.0)\n        G += _dot(Cc, tl.trans(Cc), IEEE)",
         new="                     mask=(rc < BC)[:, None] & dm[None, :], other=0.0)\n        G += _dot(Cc, tl.trans(Cc), IEEE)",
         tests=[f"{MANY}[triton-A,F=1-BQ16-fp32]", "tests/test_fused_ops.py::test_attention_forward_and_gradients[triton-A,F,lam-fp64]"]),
    dict(name="triton: every pair of a program masked with the first pair's query length",
         file=ATT, old="    qlen = tl.load(qlen_ptr + pr, mask=pr < P, other=0)",
         new="    qlen = tl.load(qlen_ptr + p0 + 0 * pr, mask=pr < P, other=0)",
         tests=[f"{MANY}[triton-E,F,lam-BQ16-fp16]"]),
    dict(name="triton: the group's pairs indexed with BQ rows of the first pair (p0 for every row)",
         file=ATT, old="    pr = p0 + r // BQ\n", new="    pr = p0 + r // (GP * BQ)\n",
         tests=[f"{MANY}[triton-E,F=1-BQ32-fp32]"]),
    dict(name="triton: the launcher's groups count P / GP rounded down (the last partial group lost)",
         file=ATT, old='    NG = triton.cdiv(P, cfg["GP"])', new='    NG = P // cfg["GP"]',
         tests=[f"{MANY}[triton-E,F=1-BQ16-fp32]"]),
]
