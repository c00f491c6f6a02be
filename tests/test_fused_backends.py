"""The fused backends on CPU tensors vs the reference: "triton" through Triton's CPU
interpreter and "cpp", the compiled extension's C++ CPU kernels (skipped, with the reason, when
the extension is not built). Scores, pieces and gradients for every regulator x direction x T,
odd sizes, NaN in the padding, fp32 and fp16; dropout; torch.compile over the ops.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so the Triton kernels run on
CPU tensors here (numpy underneath: shapes stay small). GPU runs are in test_gpu.py; op-level
contracts in test_fused_ops.py.
"""

from __future__ import annotations

import pytest
import torch

import rcar_fast
from rcar_fast import ops, reference
from rcar_testutil import make_head, make_inputs, params_of, seed_of

def _backends():
    st = rcar_fast.backend_status()
    return [pytest.param("triton", marks=pytest.mark.skipif(
                "triton" not in rcar_fast.available_backends("cpu"), reason=st["triton"])),
            pytest.param("cpp", marks=pytest.mark.skipif(st["cpp"] != "available", reason=st["cpp"]))]


BACKENDS = _backends()
needs_triton = pytest.mark.skipif("triton" not in rcar_fast.available_backends("cpu"),
                                  reason="triton not importable")

CONFIGS = [("only_rar", 1), ("only_rar", 2), ("only_rar", 3), ("only_rcr", 0), ("only_rcr", 1),
           ("only_rcr", 2), ("only_rcr", 3), ("coop_rcar", 1), ("coop_rcar", 2), ("coop_rcar", 3)]
# (n_i, n_c, R, L, d, s): d not a power of two, R != 36, s not a power of two
SHAPES = [(3, 4, 5, 7, 40, 16), (2, 3, 9, 4, 33, 12)]


def _lens(n_c, L, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (n_c,), generator=g)
    lens[0], lens[-1] = 1, L          # a one-word caption and a full one
    return lens


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_fp32(backend, regulator, steps, attn_type, shape):
    n_i, n_c, R, L, d, s = shape
    seed = seed_of(regulator, steps, attn_type, *shape)
    img, cap, lens = make_inputs(n_i, n_c, R, L, d, torch.float32, seed, lens=_lens(n_c, L, seed))
    head = make_head(regulator, steps, attn_type, d, s, torch.float32, seed).eval()
    with torch.no_grad():
        want = reference.rcar_scores(img.double(), cap.double(), lens,
                                     {k: v.double() for k, v in params_of(head).items()},
                                     regulator, steps, attn_type)
        out = torch.full((n_i, n_c), float("nan"))
        out.copy_(head(img, cap, lens, backend=backend))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_fp16_error_within_twice_torch(backend, regulator, steps, attn_type):
    """fp16 kernels: error vs the fp64 reference at most 2x that of the fp16 torch backend."""
    n_i, n_c, R, L, d, s = 3, 4, 6, 7, 48, 16
    img, cap, lens = make_inputs(n_i, n_c, R, L, d, torch.float32, 11, lens=_lens(n_c, L, 11))
    head = make_head(regulator, steps, attn_type, d, s, torch.float32, 12).eval()
    with torch.no_grad():
        want = reference.rcar_scores(img.double(), cap.double(), lens,
                                     {k: v.double() for k, v in params_of(head).items()},
                                     regulator, steps, attn_type)
        h16 = head.half()
        got = h16(img.half(), cap.half(), lens, backend=backend).double()
        base = h16(img.half(), cap.half(), lens, backend="torch").double()
    err, err_torch = (got - want).abs().max().item(), (base - want).abs().max().item()
    assert err <= 2 * err_torch, (err, err_torch)


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("with_state", [False, True], ids=["F=1,lam=float", "F,lam=tensors"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pieces(backend, attn_type, with_state):
    n_i, n_c, R, L, d, s = 2, 3, 5, 6, 36, 12
    img, cap, lens = make_inputs(n_i, n_c, R, L, d, torch.float32, 5, lens=[1, 6, 3])
    Lq = L if attn_type == "t2i" else R
    g = torch.Generator().manual_seed(6)
    F = lam = None
    if with_state:
        F = torch.rand(n_i, n_c, Lq, d, generator=g) * 2 - 1
        lam = torch.rand(n_i, n_c, Lq, generator=g) * 8 + 1
        if attn_type == "t2i":      # padded query rows may hold anything
            for j, lj in enumerate(lens.tolist()):
                F[:, j, lj:] = float("nan")
                lam[:, j, lj:] = float("nan")
    W = torch.randn(s, d, generator=g) / d ** 0.5
    b = torch.randn(s, generator=g) * 0.1
    for fn, extra in ((ops.adaptive_attention, ()), (ops.alignment, (W, b))):
        want = fn(img, cap, lens, *extra, factors=F, temperatures=lam, attn_type=attn_type,
                  backend="reference")
        got = fn(img, cap, lens, *extra, factors=F, temperatures=lam, attn_type=attn_type,
                 backend=backend)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)   # padded rows: zero in both
    E = ops.alignment(img, cap, lens, W, b, attn_type=attn_type, backend="reference")
    head = make_head("only_rar", 1, attn_type, d, s, torch.float32, 7)
    wts = {k[len("rar_modules.0."):]: v.detach() for k, v in params_of(head).items()
           if k.startswith("rar_modules.0.")}
    h0 = None if not with_state else torch.nn.functional.normalize(torch.randn(n_i, n_c, s, generator=g), dim=-1)
    if attn_type == "t2i":
        for j, lj in enumerate(lens.tolist()):
            E[:, j, lj:] = float("nan")
    want = ops.rar_update(E, h0, lens, wts, attn_type, backend="reference")
    got = ops.rar_update(E, h0, lens, wts, attn_type, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_budget_blocks_agree(backend):
    img, cap, lens = make_inputs(3, 5, 4, 6, 24, torch.float32, 9)
    head = make_head("coop_rcar", 2, "t2i", 24, 8, torch.float32, 9).eval()
    with torch.no_grad():
        full = head(img, cap, lens, backend=backend)
        tiny = head(img, cap, lens, backend=backend, memory_budget=1)
    torch.testing.assert_close(tiny, full, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- autograd and ops

@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend, regulator, steps, attn_type):
    """Gradients of img, cap and every parameter through the backend's ops and their backward
    (fp64 inputs) vs the reference; NaN padding gets exactly zero gradient."""
    n_i, n_c, R, L, d, s = 2, 3, 5, 6, 24, 8
    seed = seed_of("grad", regulator, steps, attn_type)
    img, cap, lens = make_inputs(n_i, n_c, R, L, d, torch.float64, seed, lens=_lens(n_c, L, seed))
    head = make_head(regulator, steps, attn_type, d, s, torch.float64, seed).eval()
    params = list(head.parameters())
    grads = {}
    for name in ("reference", backend):
        x, y = img.clone().requires_grad_(), cap.clone().requires_grad_()
        out = head(x, y, lens, backend=name)
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
        grads[name] = torch.autograd.grad((out * w).sum(), [x, y] + params, allow_unused=True)
    for got, want in zip(grads[backend], grads["reference"]):
        if want is None:
            assert got is None or not got.any()
            continue
        assert torch.isfinite(got).all()
        # the Triton kernels accumulate in fp32 even for fp64 inputs: fp32-level agreement
        tol = dict(rtol=1e-5, atol=1e-7) if backend == "triton" else dict(rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got, want, **tol)
    dcap = grads[backend][1]
    for j, lj in enumerate(lens.tolist()):
        assert not dcap[j, lj:].any()


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("coop_rcar", 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_mode_dropout(backend, regulator, steps, attn_type):
    """RAR dropout is on in training (masks differ per call), off in eval; backward runs."""
    img, cap, lens = make_inputs(2, 3, 5, 6, 24, torch.float32, 21)
    head = make_head(regulator, steps, attn_type, 24, 8, torch.float32, 21)
    with torch.no_grad():
        ev = head.eval()(img, cap, lens, backend=backend)
    head.train()
    torch.manual_seed(1)
    a = head(img, cap, lens, backend=backend)
    torch.manual_seed(2)
    b = head(img, cap, lens, backend=backend)
    assert not torch.equal(a, b) and not torch.equal(a, ev)
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in head.named_parameters() if n.startswith("rar_modules"))


def _op_samples(dtype=torch.float64):
    from rcar_fast.backends.triton_kernels import load_kernels
    tb = load_kernels()
    g = torch.Generator().manual_seed(4)
    B, P, Lq, Lc, d, s = 2, 3, 5, 4, 12, 8
    q = torch.randn(P, Lq, d, generator=g, dtype=dtype)
    c = torch.randn(B, Lc, d, generator=g, dtype=dtype)
    ql = torch.tensor([5, 1, 3], dtype=torch.int32)
    cl = torch.tensor([4, 2], dtype=torch.int32)
    F = torch.rand(B, P, Lq, d, generator=g, dtype=dtype)
    lam = torch.rand(B, P, Lq, generator=g, dtype=dtype) * 5 + 1
    W = torch.randn(s, d, generator=g, dtype=dtype) * 0.3
    bias = torch.randn(s, generator=g, dtype=dtype) * 0.1
    att = [(q, ql, c, cl, None, None, 4.0, None, None), (q, ql, c, cl, F, lam, 0.0, W, bias)]
    E = torch.randn(B, P, Lq, s, generator=g, dtype=dtype)
    wq, wk = (torch.randn(2, s, s, generator=g, dtype=dtype) * 0.3 for _ in range(2))
    bq, bk, wv = (torch.randn(2, s, generator=g, dtype=dtype) * 0.3 for _ in range(3))
    bv = torch.randn(2, generator=g, dtype=dtype)
    h0 = torch.randn(B, P, s, generator=g, dtype=dtype)
    keep = (torch.rand(B, P, Lq, s, generator=g) > 0.4).to(dtype) / 0.6
    keep_g = (torch.rand(B, P, s, generator=g) > 0.4).to(dtype) / 0.6
    rar = [(E, ql, None, wq, bq, wk, bk, wv, bv, None, None),
           (E, ql, h0, wq[:1], bq[:1], wk[:1], bk[:1], wv[:1], bv[:1], keep, keep_g)]
    return tb, att, rar


@needs_triton
def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    tb, att, rar = _op_samples()
    for args in att:
        torch.library.opcheck(tb.triton_attention, args)
        grad_args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args]
        torch.library.opcheck(tb.triton_attention, grad_args)
    for args in rar:
        torch.library.opcheck(tb.triton_rar, args)
        grad_args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a is not args[-1] and a is not args[-2] else a for a in args]
        torch.library.opcheck(tb.triton_rar, grad_args)
        E, ql, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g = args
        one = [w[:1].contiguous() for w in (wq, bq, wk, bk, wv, bv)]
        h = h0 if h0 is not None else E.mean(2)
        torch.library.opcheck(tb.triton_rar_bwd, (torch.randn_like(h), E, ql, h, *one, keep_k, keep_g))
    for args in att:
        grad = torch.randn_like(tb.triton_attention(*args))
        torch.library.opcheck(tb.triton_attention_bwd, (grad, *args, True))


@needs_triton
def test_custom_op_gradcheck():
    """The registered backward against finite differences of the kernels themselves. The kernels
    compute in fp32 even for fp64 inputs, so the step is 1e-3 and the tolerance fp32-sized."""
    tb, att, rar = _op_samples()
    q, ql, c, cl, F, lam, _, W, bias = att[1]
    inputs = [t.clone().requires_grad_() for t in (q, c, F, lam, W, bias)]
    assert torch.autograd.gradcheck(
        lambda q, c, F, lam, W, b: tb.triton_attention(q, ql, c, cl, F, lam, 0.0, W, b),
        inputs, eps=1e-3, atol=2e-3, rtol=2e-2, fast_mode=True)
    E, ql, h0, wq, bq, wk, bk, wv, bv, keep, keep_g = rar[1]
    inputs = [t.clone().requires_grad_() for t in (E, h0, wq, bq, wk, bk, wv, bv)]
    assert torch.autograd.gradcheck(
        lambda E, h0, wq, bq, wk, bk, wv, bv: tb.triton_rar(E, ql, h0, wq, bq, wk, bk, wv, bv, keep, keep_g),
        inputs, eps=1e-3, atol=2e-3, rtol=2e-2, fast_mode=True)


@needs_triton
def test_torch_compile_traces_the_custom_ops():
    """register_fake lets torch.compile trace the kernels as single graph nodes (fullgraph:
    no graph break), forward and backward; the compiled result equals the eager one."""
    tb, att, rar = _op_samples(torch.float32)
    q, ql, c, cl, F, lam, _, W, bias = att[1]
    E0, _, _, wq, bq, wk, bk, wv, bv, _, _ = rar[0]

    def fn(q, c, F, lam, W, bias):
        E = tb.triton_attention(q, ql, c, cl, F, lam, 0.0, W, bias)
        return tb.triton_rar(E, ql, None, wq, bq, wk, bk, wv, bv, None, None)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    args = [t.clone().requires_grad_() for t in (q, c, F, lam, W, bias)]
    eager_args = [t.clone().requires_grad_() for t in (q, c, F, lam, W, bias)]
    out, want = compiled(*args), fn(*eager_args)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for a, b in zip(args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_rcr_step_runs_at_inference_only(backend, monkeypatch):
    """Both fused backends offer an inference RCR step (KernelSet.rcr): without autograd the
    pipeline calls it and never torch's step; under autograd it calls the recomputing torch step
    (rcr_step_recomputed, KernelSet.rcr_recompute; the fused one has no backward), never plain
    autograd's. The scores agree either way."""
    import rcar_fast.torch_math as tm
    calls = []
    torch_step, recomputed = tm.rcr_step, tm.rcr_step_recomputed
    # torch's step under autograd ("plain"), or without (inside the recomputing step's forward)
    monkeypatch.setattr(tm, "rcr_step", lambda *a, **k: calls.append(
        "plain" if torch.is_grad_enabled() else "no grad") or torch_step(*a, **k))
    monkeypatch.setattr(tm, "rcr_step_recomputed", lambda *a: calls.append("recomputed") or recomputed(*a))
    n_i, n_c, R, L, d, s = SHAPES[0]
    img, cap, lens = make_inputs(n_i, n_c, R, L, d, torch.float32, 5, lens=_lens(n_c, L, 5))
    head = make_head("only_rcr", 2, "t2i", d, s, torch.float32, 5).eval()
    with torch.no_grad():
        fused = head(img, cap, lens, backend=backend)
    assert calls == [], "the pipeline ran torch's RCR step where the backend has a fused one"
    img.requires_grad_()
    graded = head(img, cap, lens, backend=backend)
    assert "recomputed" in calls and "plain" not in calls, \
        "under autograd the pipeline must run the recomputing RCR step, not plain autograd's"
    torch.testing.assert_close(fused, graded.detach(), rtol=0, atol=2e-6)


@needs_triton
@pytest.mark.parametrize("listed", [False, True], ids=["grid", "pairs"])
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
def test_grams_and_grid_index_made_once(monkeypatch, attn_type, listed):
    """Without autograd the triton kernel set's context Gram matrices are made once per call
    where every block's context is the images (t2i: grid and pair lists), else once per block
    for all its steps, never once per attention launch; the grid's context index arange(B) once
    per call (its workspace). The scores equal, bit for bit, the kernel set's without either
    (each launch making its own)."""
    import contextlib
    import dataclasses

    import rcar_fast.backends.triton_kernels as tk
    from rcar_fast.kernels import attention as ka
    counts = dict(gram=0, attention=0, index=0)

    def counted(name, fn):
        def wrapper(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(ka, "gram", counted("gram", ka.gram))
    monkeypatch.setattr(ka, "attention_fwd", counted("attention", ka.attention_fwd))
    arange = torch.arange
    monkeypatch.setattr(torch, "arange", lambda *a, **k: (
        counts.__setitem__("index", counts["index"] + (k.get("dtype") == torch.int32)) or arange(*a, **k)))
    n_i, n_c, R, L, d, s = 3, 7, 5, 6, 24, 8
    img, cap, lens = make_inputs(n_i, n_c, R, L, d, torch.float32, 21, lens=torch.tensor([1, 6, 3, 6, 2, 3, 5]))
    head = make_head("coop_rcar", 2, attn_type, d, s, torch.float32, 21).eval()
    ii, cc = torch.tensor([0, 2, 1, 0, 2, 1, 1, 0]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 2])

    def run():
        if listed:
            return ops.pair_scores(img, cap, lens, ii, cc, params_of(head, True), "coop_rcar", 2, attn_type,
                                   backend="triton")
        return ops.rcar_scores(img, cap, lens, params_of(head, True), "coop_rcar", 2, attn_type, backend="triton")
    with torch.no_grad():
        out = run()
        blocks = counts["attention"] // 2            # coop_rcar T = 2: two attention calls a block
        assert blocks == 5 and counts["gram"] == (1 if attn_type == "t2i" else blocks), counts
        # the grid: made once, grown (doubled) when a later block has more context items (i2t)
        assert counts["index"] == (0 if listed else 1 if attn_type == "t2i" else 2), counts
        monkeypatch.setattr(tk, "KERNELS", dataclasses.replace(tk.KERNELS, context_gram=None,
                                                               workspace=contextlib.nullcontext))
        counts.update(gram=0, attention=0, index=0)
        want = run()
    assert counts["gram"] == counts["attention"] == 2 * blocks and counts["index"] == (0 if listed else 2 * blocks)
    assert torch.equal(out, want)


@needs_triton
def test_grams_per_block_where_the_calls_would_crowd_the_budget(monkeypatch):
    """The t2i grid's Gram matrices are made for the whole call only where they take at most a
    quarter of the block budget; past that each block makes its own images' once for its steps
    (memory_budget=1: one pair a block)."""
    from rcar_fast.kernels import attention as ka
    counts = dict(gram=0, attention=0)
    for name in counts:
        fn = getattr(ka, name if name == "gram" else "attention_fwd")
        monkeypatch.setattr(ka, name if name == "gram" else "attention_fwd",
                            lambda *a, _fn=fn, _n=name, **k: counts.__setitem__(_n, counts[_n] + 1) or _fn(*a, **k))
    img, cap, lens = make_inputs(3, 4, 5, 6, 24, torch.float32, 23)
    head = make_head("coop_rcar", 2, "t2i", 24, 8, torch.float32, 23).eval()
    with torch.no_grad():
        full = head(img, cap, lens, backend="triton")
        assert counts["gram"] == 1
        counts.update(gram=0, attention=0)
        tiny = head(img, cap, lens, backend="triton", memory_budget=1)
    assert counts["attention"] == 2 * 12 and counts["gram"] == 12, counts     # 12 one-pair blocks
    torch.testing.assert_close(tiny, full, rtol=0, atol=1e-7)
    # 16 KiB: the call's Gram matrices (3 x 16 x 16 x 4 B, at most a quarter) made once, each
    # block (images 0-1, then 2: one length, 4 captions) given its own images' rows of them
    img, cap, lens = make_inputs(3, 4, 5, 6, 24, torch.float32, 25, lens=torch.full((4,), 6))
    with torch.no_grad():
        full = head(img, cap, lens, backend="triton")
        counts.update(gram=0, attention=0)
        split = head(img, cap, lens, backend="triton", memory_budget=16384)
    assert counts["attention"] == 2 * 2 and counts["gram"] == 1, counts
    torch.testing.assert_close(split, full, rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scoring_layer_of_any_layout(backend):
    """A non-contiguous scoring layer (sim_eval_w's weight as a strided view) scores as the
    contiguous one (the pipeline casts it once per call, contiguous: triton's RAR takes it in its
    last launch)."""
    img, cap, lens = make_inputs(2, 3, 4, 5, 24, torch.float32, 24)
    head = make_head("coop_rcar", 2, "t2i", 24, 8, torch.float32, 24).eval()
    p = params_of(head, True)
    W = p["sim_eval_w.weight"]
    q = dict(p, **{"sim_eval_w.weight": torch.stack([W, W], -1)[..., 0]})
    assert not q["sim_eval_w.weight"].is_contiguous()
    with torch.no_grad():
        want = ops.rcar_scores(img, cap, lens, p, "coop_rcar", 2, "t2i", backend=backend)
        got = ops.rcar_scores(img, cap, lens, q, "coop_rcar", 2, "t2i", backend=backend)
    assert torch.equal(got, want)


@needs_triton
def test_attention_gram_argument():
    """The triton attention op takes the context items' Gram matrices made beforehand
    (context_gram): same output as without them, opcheck's schema, fake and autograd hold with
    the argument, and a wrong one is refused by name before any launch."""
    from rcar_fast.kernels import attention as ka
    tb, att, _ = _op_samples(torch.float32)
    for args in att:
        q, ql, c, cl = args[:4]
        g = ka.context_gram(c, cl)
        assert torch.equal(tb.triton_attention(*args, None, g), tb.triton_attention(*args))
        junk = g.clone()                       # only the valid rows and columns are read
        for i, n in enumerate(cl.tolist()):
            junk[i, n:], junk[i, :, n:] = float("nan"), float("nan")
        assert torch.equal(tb.triton_attention(*args, None, junk), tb.triton_attention(*args))
        torch.library.opcheck(tb.triton_attention, (*args, None, g))
        grad_args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args]
        torch.library.opcheck(tb.triton_attention, (*grad_args, None, g))
        for bad, why in ((g[:1], "shape"), (g.double(), "float32"), (g.transpose(1, 2), "contiguous"),
                         (ka.gram(c, cl, 32), "shape")):
            with pytest.raises(ValueError, match=r"^gram: .*" + ("not contiguous" if why == "contiguous" else "")):
                tb.triton_attention(*args, None, bad)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_context_gram_is_the_valid_rows_gram(dtype):
    """context_gram's own output, which the attention's ``gram`` argument takes as it is: per
    context item C C^T over its valid rows (fp32, against fp64 products of the rounded inputs)
    in rows and columns below its length, exact zeros past it and up to BC (the power of two at
    or above Lc), with NaN in every padded row of the context (none may reach a valid entry)."""
    from rcar_fast.kernels import attention as ka
    g = torch.Generator().manual_seed(11)
    items, Lc, d = 4, 11, 40
    c = torch.randn(items, Lc, d, generator=g).to(dtype)
    cl = torch.tensor([11, 1, 6, 9], dtype=torch.int32)
    for i, n in enumerate(cl.tolist()):
        c[i, n:] = float("nan")
    G = ka.context_gram(c, cl)
    assert G.dtype == torch.float32 and G.shape == (items, 16, 16)
    for i, n in enumerate(cl.tolist()):
        ci = c[i, :n].double()
        torch.testing.assert_close(G[i, :n, :n].double(), ci @ ci.T, rtol=1e-5, atol=1e-4)
        assert not G[i, n:].isnan().any() and not G[i, :, n:].isnan().any()
        assert not G[i, n:].any() and not G[i, :, n:].any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rar_scores_op_is_rar_then_the_scoring_layer(dtype):
    """triton_rar_scores (RAR whose last launch takes the scoring layer) against triton_rar's h
    rounded to E's dtype, then sigmoid(F.linear(h.float(), w, b)) in torch: T = 1 and 2, from the
    mean (fp16: step 0's on-chip FIRST launch scores) and from a given h, NaN in a padded row of
    E; opcheck; a wrong scoring layer refused by name."""
    import torch.nn.functional as F
    tb, _, rar = _op_samples(dtype)
    g = torch.Generator().manual_seed(5)
    E, ql, h0, wq, bq, wk, bk, wv, bv, _, _ = rar[1]
    E = rar[0][0].clone()
    E[:, 1, 1:] = float("nan")                              # pair 1 has one valid row: padding NaN
    sw, sb = torch.randn(E.shape[3], generator=g) * 0.5, torch.randn(1, generator=g)
    for T in (1, 2):
        ws = [w[:T].contiguous() for w in (rar[0][3], rar[0][4], rar[0][5], rar[0][6], rar[0][7], rar[0][8])]
        for h in (None, h0):
            got = tb.triton_rar_scores(E, ql, h, *ws, sw, sb)
            want = torch.sigmoid(F.linear(tb.triton_rar(E, ql, h, *ws, None, None).float(), sw[None], sb))[..., 0]
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            torch.library.opcheck(tb.triton_rar_scores, (E, ql, h, *ws, sw, sb))
    for bad, name in (((sw[:-1], sb), "score_w"), ((sw.double(), sb), "score_w"), ((sw, sb.half()), "score_b"),
                      ((torch.stack([sw, sw], -1)[:, 0], sb), "score_w: .*not contiguous")):
        with pytest.raises(ValueError, match=f"^{name}"):
            tb.triton_rar_scores(E, ql, None, *ws, *bad)
    with pytest.raises(ValueError, match="^wq: .*0 steps"):          # no step to take the layer
        tb.triton_rar_scores(E, ql, h0, *(w[:0] for w in ws), sw, sb)


def test_extension_rar_scores_is_cuda_only():
    """The extension's rar_scores (csrc/ops.cpp; CUDA only: RAR with the scoring layer in
    rar_fwd_wg_kernel's last launch): its fake is (B, P) float32; the "cuda" kernel set offers it
    where the extension has its CUDA kernel, "cpp" none; CPU tensors find no kernel (the
    dispatcher's error, naming the op). Its numbers are checked on a GPU (test_gpu.py's
    test_cuda_rar_scores) and, kernel-level, in the emulator (test_rar_scores_128_row_blocks)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rcar_fast.backends import extension_kernels as ek
    S = 8
    args = lambda: (torch.empty(2, 3, 5, S, dtype=torch.float16), torch.full((3,), 5, dtype=torch.int32), None,
                    torch.empty(1, S, S, dtype=torch.float16), torch.empty(1, S, dtype=torch.float16),
                    torch.empty(1, S, S, dtype=torch.float16), torch.empty(1, S, dtype=torch.float16),
                    torch.empty(1, S, dtype=torch.float16), torch.empty(1, dtype=torch.float16),
                    torch.empty(S), torch.empty(1))
    assert ek.CPP.rar_scores is None
    assert (ek.CUDA.rar_scores is torch.ops.rcar_fast.rar_scores.default) == \
        torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::rar_scores", "CUDA")
    with FakeTensorMode():
        out = torch.ops.rcar_fast.rar_scores(*args())
    assert out.shape == (2, 3) and out.dtype == torch.float32
    with pytest.raises(NotImplementedError, match="rar_scores"):
        torch.ops.rcar_fast.rar_scores(*args())


def test_extension_attention_takes_a_gram():
    """The extension's attention op (csrc/ops.cpp) takes the optional gram after context_index:
    the CPU kernel checks it by name and does not need it (the same output), opcheck's schema,
    fake and autograd hold with it. The "cuda" kernel set offers context_gram (its kernel runs on a
    GPU: test_gpu.py's test_context_gram_argument), "cpp" none; the op's fake is (B, Lc, Lc) fp32."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rcar_fast.backends import extension_kernels as ek
    _, att, _ = _op_samples(torch.float64)
    op = torch.ops.rcar_fast.attention.default
    for args in att:
        c, cl = args[2], args[3]
        cm = torch.where(torch.arange(c.shape[1])[None, :, None] < cl[:, None, None].long(), c, 0)
        g = (cm @ cm.transpose(1, 2)).float().contiguous()
        assert torch.equal(op(*args, None, g), op(*args))
        torch.library.opcheck(op, (*args, None, g))
        for bad, why in ((g[:1], "shape"), (g.double(), "float32"), (g.transpose(1, 2), "not contiguous")):
            with pytest.raises(RuntimeError, match=f"^gram: .*{why}"):
                op(*args, None, bad)
    assert ek.CPP.context_gram is None
    if ek.has_kernels("CUDA"):
        assert ek.CUDA.context_gram is torch.ops.rcar_fast.context_gram.default
    with FakeTensorMode():
        G = torch.ops.rcar_fast.context_gram(torch.empty(3, 7, 16), torch.empty(3, dtype=torch.int32))
    assert G.shape == (3, 7, 7) and G.dtype == torch.float32


def test_cuda_backend_offers_the_fused_rcr_step():
    """The extension's CUDA half registers the rcr op (csrc/cuda/rcr.cu) and the "cuda" backend's
    kernel set offers it on CUDA tensors only (its kernels run on a GPU: the GPU tier's inference
    cases go through it)."""
    from rcar_fast.backends import extension_kernels as ek
    if not ek.has_kernels("CUDA"):
        pytest.skip("the extension was built without its CUDA kernels (no nvcc)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rcar_fast::rcr", "CUDA")
    assert ek.CUDA.rcr is ek.CPP.rcr is torch.ops.rcar_fast.rcr.default
    assert ek.CUDA.rcr_devices == ("cuda",) and ek.CPP.rcr_devices == ("cpu",)
