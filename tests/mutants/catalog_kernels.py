"""Planted bugs in the Triton kernels' grouped forward (GP pairs of one context item per program)
and the Gram matrix computed once per context item, each with the tests that must catch it.
Format: tests/mutants/run.py."""

ATT = "kernels/attention.py"
RAR = "kernels/rar.py"
RCR = "kernels/rcr.py"
RCR_OP = "tests/test_fused_ops.py::test_fused_rcr_matches_torch_rcr_step"
BWD = "kernels/attention_bwd.py"
GRADS = "tests/test_fused_ops.py::test_attention_gradients_many_query_items_per_context_item"
MANY = "tests/test_fused_ops.py::test_attention_many_query_items_per_context_item"
RAR_MANY = "tests/test_fused_ops.py::test_rar_many_pairs"

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
    dict(name="triton rar: every pair of a program reads the first pair's gate",
         file=RAR, old="        g_base = gate_ptr + (b * P + p)[:, None] * S_DIM",
         new="        g_base = gate_ptr + (b * P + p0 + 0 * p)[:, None] * S_DIM",
         tests=[f"{RAR_MANY}[triton-T1,h-BQ16-fp32]"]),
    dict(name="triton rar: the mean of E divided by the program's valid rows, not the pair's",
         file=RAR, old="        n = tl.maximum(tl.sum(tl.reshape(qmask.to(tl.float32), (GP, BQ)), axis=1), 1.0)",
         new="        n = tl.maximum(tl.sum(qmask.to(tl.float32), axis=0), 1.0) + tl.zeros((GP,), dtype=tl.float32)",
         tests=[f"{RAR_MANY}[triton-T1,mean-BQ32-fp32]"]),
    dict(name="triton rar: the gate GEMM without its bias",
         file=RAR, old="        h = launch(t, torch.addmm(bq[t].float(), h.reshape(B * P, S), wq[t].float().t()).tanh_())",
         new="        h = launch(t, torch.mm(h.reshape(B * P, S), wq[t].float().t()).tanh_())",
         tests=["tests/test_fused_ops.py::test_rar_forward_and_gradients[triton-T1,h-fp32]"]),
    dict(name="triton rar: every step uses step 0's key weights",
         file=RAR, old="            K, rn, nm = _keys(E, e_base, se_s, qmask, wk_ptr, bk_ptr, t * S_DIM, n0,",
         new="            K, rn, nm = _keys(E, e_base, se_s, qmask, wk_ptr, bk_ptr, 0 * S_DIM, n0,",
         tests=["tests/test_fused_ops.py::test_rar_forward_and_gradients[triton-T3,mean-fp32]"]),
    dict(name="triton rcr: the previous factors ignored (every step adds tanh to ones)",
         file=RCR, old="HAS_F=factors is not None, **cfg)", new="HAS_F=False, **cfg)",
         tests=[f"{RCR_OP}[triton-F,lam-fp32]"]),
    dict(name="triton rcr: factors at padded rows not zeroed",
         file=RCR, old="    out = tl.where(v2, tl.minimum(tl.maximum(_tanh(m) + f, -1.0), 1.0), 0.0)",
         new="    out = tl.minimum(tl.maximum(_tanh(m) + f, -1.0), 1.0)",
         tests=[f"{RCR_OP}[triton-F=1,lam=float-fp32]"]),
    dict(name="triton rcr: a row's query item taken as its position modulo P",
         file=RCR, old="    qlen = tl.load(qlen_ptr + (r // LQ) % P, mask=rin, other=0)",
         new="    qlen = tl.load(qlen_ptr + r % P, mask=rin, other=0)",
         tests=[f"{RCR_OP}[triton-F=1,lam=float-fp32]"]),
    dict(name="triton rcr: temperatures at padded rows not zeroed",
         file=RCR, old="    lam_new = torch.where(valid, torch.relu(smooth + (lam_scalar if lam is None else lam)), 0.0)",
         new="    lam_new = torch.relu(smooth + (lam_scalar if lam is None else lam))",
         tests=[f"{RCR_OP}[triton-F,lam-fp32]"]),
    dict(name="triton backend: the kernel set without its fused RCR step",
         file="rcar_fast/backends/triton_kernels.py", old='rcr=_k.triton_rcr, rcr_devices=("cuda", "cpu"),',
         new='rcr=None, rcr_devices=(),',
         tests=["tests/test_fused_backends.py::test_fused_rcr_step_runs_at_inference_only[triton]"]),
    dict(name="triton backward: the query-norm of the scores across the program, not each pair's",
         file=BWD, old="    S, N, Sn, Pm, un = _attention_probs(S0, G, lam, qmask, cmask, IEEE, True, GP)",
         new="    S, N, Sn, Pm, un = _attention_probs(S0, G, lam, qmask, cmask, IEEE, True, 1)",
         tests=[f"{GRADS}[triton-E,F,lam-BQ16]"]),
    dict(name="triton backward: every pair's dP stored at the first pair of its context item",
         file=BWD, old="    tl.store(dp_ptr + ((b * P + p[:, None]) * BQ + rq[:, None]) * BC + rc[None, :], dP, mask=(p < P)[:, None])",
         new="    tl.store(dp_ptr + (b * P * BQ + rq[:, None]) * BC + rc[None, :], dP, mask=(p < P)[:, None])",
         tests=[f"{GRADS}[triton-A,F=1-BQ32]"]),
    dict(name="triton backward: the first kernel's programs cover P / GP rounded down",
         file=BWD, old='        NG = triton.cdiv(P, cfg["GP"])', new='        NG = P // cfg["GP"]',
         tests=[f"{GRADS}[triton-E,F=1-BQ16]"]),
]
