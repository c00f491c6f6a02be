"""Pair-list scoring (rcar_fast.ops.pair_scores, issue #17 item 2): the score of exactly the listed
pairs, equal to the grid's entries, on every backend the CPU has (torch, cpp, triton through its
interpreter); the attention op's paired form (context_index) op by op, forward and backward, with
repeated context items; gradients and train-mode dropout against the grid and the reference; the
boundary's errors; two-stage search unchanged."""

from __future__ import annotations

import pytest
import torch

import rcar_fast
from rcar_fast import dropout, ops, reference
from rcar_fast.backends import kernel_set
from rcar_testutil import cpu_backends, index_keep_masks, make_head, make_inputs, params_of, seed_of
from test_api import no_compute  # noqa: F401  (a fixture: every backend entry point raises)
from test_fused_ops import BACKENDS as OP_BACKENDS
from test_fused_ops import _grad_inputs, _ops, _sample, _tol, ref_attention

Tensor = torch.Tensor
BACKENDS = cpu_backends("torch", "cpp", "triton")
#: every regulator, both directions, several T
CONFIGS = [("only_rar", 1), ("only_rar", 3), ("only_rcr", 0), ("only_rcr", 2), ("coop_rcar", 1),
           ("coop_rcar", 2), ("coop_rcar", 3)]
DIMS = dict(n_i=3, n_c=5, R=5, L=6, d=24, s=8)
#: the interpreter is slow: triton runs these (regulator, steps, attn_type) only; the pair-list
#: code around the kernels is the same for every backend, the paired kernels are covered op by op
#: below (forward and backward), and tests/test_gpu_cases_cpu.py runs triton's pair-list gradients
TRITON_CASES = [("only_rar", 1, "i2t"), ("only_rcr", 2, "i2t"), ("coop_rcar", 2, "t2i")]


def _cases(configs, triton_cases=(), attn_types=("t2i", "i2t")):
    """pytest params (backend, regulator, steps, attn_type): every backend but triton with
    ``configs`` x ``attn_types``, triton with ``triton_cases``; each keeps its backend's skip mark."""
    out = []
    for b in BACKENDS:
        name = b.values[0]
        cases = triton_cases if name == "triton" else [(r, t, a) for r, t in configs for a in attn_types]
        out += [pytest.param(name, r, t, a, marks=b.marks, id=f"{name}-{r}-{t}-{a}") for r, t, a in cases]
    return out


def _pair_list(n_i, n_c, m, seed):
    """An unsorted list of m pairs with repeats (the first pair listed twice more)."""
    g = torch.Generator().manual_seed(seed)
    ii, cc = torch.randint(0, n_i, (m,), generator=g), torch.randint(0, n_c, (m,), generator=g)
    ii[[3, m - 1]], cc[[3, m - 1]] = int(ii[0]), int(cc[0])
    return ii, cc


def _problem(regulator, steps, attn_type, seed, dtype=torch.float32, m=11):
    D = DIMS
    img, cap, lens = make_inputs(D["n_i"], D["n_c"], D["R"], D["L"], D["d"], dtype, seed)
    head = make_head(regulator, steps, attn_type, D["d"], D["s"], dtype, seed)
    ii, cc = _pair_list(D["n_i"], D["n_c"], m, seed)
    return img, cap, lens, head, ii, cc


# ----------------------------------------------------------------------------- the op's paired form

def _paired_args(args, idx):
    """The grid sample ``args`` (test_fused_ops._sample: B context items x P query items) in the
    paired form: pair p is query p with context item idx[p]; its factors and lam are the grid's
    at (idx[p], p)."""
    q, ql, c, cl, factors, lam, lam_scalar, weight, bias = args
    p = torch.arange(q.shape[0])
    pick = (lambda x: None if x is None else x[idx.long(), p][None].contiguous())
    return [q, ql, c, cl, pick(factors), pick(lam), lam_scalar, weight, bias, idx]


def _double(params):
    return {k: v.double() for k, v in params.items()}


OP_CASES = [(False, False, [1, 0, 1]), (True, True, [1, 0, 1]), (False, True, [1, 0, 1]), (False, False, [1, 1, 1]),
            (True, True, [1, 1, 1])]


@pytest.mark.parametrize("with_state,with_weight,index", OP_CASES,
                         ids=["A,F=1-1,0,1", "E,F,lam-1,0,1", "E,F=1-1,0,1", "A,F=1-1,1,1", "E,F,lam-1,1,1"])
@pytest.mark.parametrize("backend", ["torch"] + OP_BACKENDS)
def test_paired_attention_op_is_the_grid_at_the_listed_pairs(backend, with_state, with_weight, index):
    """Paired output p = the per-pair reference at (idx[p], p); every gradient equals the
    reference's with the output gradient placed at those grid entries: dcontext adds the pairs
    of a repeated context item, and an item no pair names gets zeros. fp64 (torch and the C++
    kernels in fp64, Triton in fp32 inside); the context items have different lengths."""
    dtype = torch.float64
    att = kernel_set(backend).attention
    args = _sample(dtype, seed=5 + with_state, with_state=with_state, with_weight=with_weight)
    if backend == "torch":
        # NaN in padded rows of F and lam reaches the torch backend's gradients (0 * NaN in the
        # backward of F * Q, grid and paired alike; the pipeline always passes zeros there)
        args[4:6] = [None if x is None else torch.nan_to_num(x) for x in args[4:6]]
    idx = torch.tensor(index, dtype=torch.int32)
    pargs = _paired_args(args, idx)
    out = att(*pargs)
    with torch.no_grad():
        want = ref_attention(*args)
    p = torch.arange(3)
    assert out.shape == (1,) + want.shape[1:]
    torch.testing.assert_close(out[0], want[idx.long(), p], **_tol(dtype, backend))

    gout = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    leaves = _grad_inputs(pargs[:9]) + [idx]
    ref_leaves = _grad_inputs(args)
    i_grad = [i for i, a in enumerate(ref_leaves) if isinstance(a, Tensor) and a.requires_grad]
    got = torch.autograd.grad((att(*leaves) * gout).sum(), [leaves[i] for i in i_grad])
    gfull = torch.zeros(want.shape, dtype=dtype)
    gfull[idx.long(), p] = gout[0]
    exp = torch.autograd.grad((ref_attention(*ref_leaves) * gfull).sum(), [ref_leaves[i] for i in i_grad],
                              allow_unused=True)
    tol = _tol(torch.float32, backend)
    for i, g, e in zip(i_grad, got, exp):
        e = torch.zeros_like(g) if e is None else torch.nan_to_num(e, nan=0.0)
        if i in (4, 5):                    # factors, lam: the paired rows are the grid's (idx[p], p)
            e = e[idx.long(), p][None]
        torch.testing.assert_close(g.double(), e, **tol, msg=f"input {i}")
    if 0 not in index:
        assert not got[1][0].any(), "a context item no pair names got a gradient"


@pytest.mark.skipif(rcar_fast.backend_status()["cpp"] != "available", reason=rcar_fast.backend_status()["cpp"])
def test_paired_attention_opcheck():
    """torch.library.opcheck of the extension's paired form: schema, fake (B = 1), autograd (the
    fake and the autograd are contract.py's, shared with the Triton ops; test_fused_ops opchecks
    those, whose schema has context_index too)."""
    att, att_bwd = _ops("cpp")[:2]
    args = _sample(torch.float64, 1, True, True)
    args = [torch.nan_to_num(a) if isinstance(a, Tensor) else a for a in args]
    pargs = _paired_args(args, torch.tensor([1, 1, 0], dtype=torch.int32))
    torch.library.opcheck(att, _grad_inputs(pargs[:9]) + pargs[9:])
    grad = torch.randn_like(att(*pargs))
    torch.library.opcheck(att_bwd, [grad] + pargs[:9] + [True, pargs[9]])


# ----------------------------------------------------------------------------- scores

@pytest.mark.parametrize("backend,regulator,steps,attn_type", _cases(CONFIGS, TRITON_CASES))
def test_pair_scores_equal_the_grid(backend, regulator, steps, attn_type):
    """Unsorted pairs with repeats, random caption lengths (1 and L among them), NaN padding;
    the default budget (a length group in one block: several context items per block) and, but
    for triton (the interpreter's launches are slow), one that cuts a group into blocks of a few
    pairs: each entry is the grid's at its pair (same backend), and the reference's."""
    seed = seed_of("pairs", regulator, steps, attn_type)
    img, cap, lens, head, ii, cc = _problem(regulator, steps, attn_type, seed)
    p = params_of(head, detach=True)
    budgets = [None] if backend == "triton" else [None, 3 * DIMS["R"] * DIMS["d"] * 4 * 8]
    with torch.no_grad():
        grid = ops.rcar_scores(img, cap, lens, p, regulator, steps, attn_type, backend=backend)
        want = reference.pair_scores(img.double(), cap.double(), lens, ii, cc, _double(params_of(head, True)),
                                     regulator, steps, attn_type)
        for budget in budgets:
            out = torch.full(ii.shape, float("nan"))
            out.copy_(ops.pair_scores(img, cap, lens, ii, cc, p, regulator, steps, attn_type, backend=backend,
                                      memory_budget=budget))
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, grid[ii, cc], rtol=0, atol=1e-6)
            torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6)
            # a repeated pair: one score, up to the last bits where the two copies sit at different
            # rows of one program's products (triton's grouped RAR; the interpreter's numpy GEMM
            # rounds identical rows differently by position)
            tie = dict(rtol=0, atol=0) if backend != "triton" else dict(rtol=0, atol=2e-7)
            torch.testing.assert_close(out[3], out[0], **tie)
            torch.testing.assert_close(out[-1], out[0], **tie)


@pytest.mark.parametrize("backend", cpu_backends("torch", "cpp"))
def test_pair_scores_from_the_module_and_index_forms(backend):
    """RCARSimilarity.pair_scores; index lists, int32 tensors; the default budget (one block per
    length)."""
    img, cap, lens, head, ii, cc = _problem("coop_rcar", 2, "i2t", 17)
    with torch.no_grad():
        grid = head(img, cap, lens, backend=backend)
        a = head.pair_scores(img, cap, lens, ii.tolist(), cc.tolist(), backend=backend)
        b = head.pair_scores(img, cap, lens, ii.int(), cc.int(), backend=backend)
    torch.testing.assert_close(a, grid[ii, cc], rtol=0, atol=1e-6)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_list(backend):
    img, cap, lens, head, _, _ = _problem("coop_rcar", 2, "t2i", 3)
    x = img.clone().requires_grad_()
    out = head.pair_scores(x, cap, lens, torch.empty(0, dtype=torch.int64), [], backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and not x.grad.any()


# ----------------------------------------------------------------------------- gradients, training

def _grads(fn, head, img, cap):
    x, y = img.clone().requires_grad_(), cap.clone().requires_grad_()
    params = list(head.parameters())
    out = fn(x, y)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype)
    return out.detach(), torch.autograd.grad((out * w).sum(), [x, y] + params, allow_unused=True)


@pytest.mark.parametrize("backend,regulator,steps,attn_type", _cases([("coop_rcar", 2), ("only_rcr", 1)]))
def test_gradients_match_the_reference(backend, regulator, steps, attn_type):
    """Gradients of img, cap and every parameter through the pair list (repeated pairs: their
    context items' gradients add up) against the reference's pair_scores in fp64; fp64 where the
    backend takes it (torch, cpp; triton's: tests/test_gpu_cases_cpu.py); padding gets exactly zero."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    img, cap, lens, head, ii, cc = _problem(regulator, steps, attn_type, seed_of("grad", regulator, attn_type),
                                            dtype)
    ref_head = make_head(regulator, steps, attn_type, DIMS["d"], DIMS["s"], torch.float64,
                         seed_of("grad", regulator, attn_type))

    def run(h, name, budget=None):
        return lambda x, y: h.pair_scores(x, y, lens, ii, cc, backend=name, memory_budget=budget)
    _, want = _grads(run(ref_head, "reference"), ref_head, img.double(), cap.double())
    _, got = _grads(run(head, backend, 2 * DIMS["R"] * DIMS["d"] * 8 * 20), head, img, cap)
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for g, r in zip(got, want):
        if r is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g.double(), r, **tol)
    for j, lj in enumerate(lens.tolist()):
        assert not got[1][j, lj:].any()


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", cpu_backends("torch", "cpp"))
def test_train_mode_dropout_equals_the_grid(backend, attn_type):
    """Training mode, fixed dropout masks (named by global image and caption indices): a pair's
    score and the gradients equal the grid's at that pair (the masks are not named by the
    position in a block or the list), and the reference's. The masks are the pipeline's, the
    same for every backend (triton's RAR kernel takes them in test_fused_ops and test_dropout)."""
    img, cap, lens, head, ii, cc = _problem("coop_rcar", 2, attn_type, 29)
    head.train()
    with dropout.fixed_keep_masks(index_keep_masks):
        pairs, gp = _grads(lambda x, y: head.pair_scores(x, y, lens, ii, cc, backend=backend,
                                                         memory_budget=4 * DIMS["R"] * DIMS["d"] * 4 * 8),
                           head, img, cap)
        grid, gg = _grads(lambda x, y: head(x, y, lens, backend=backend)[ii, cc], head, img, cap)
        want = reference.pair_scores(img.double(), cap.double(), lens, ii, cc, _double(params_of(head, True)),
                                     "coop_rcar", 2, attn_type, training=True)
        evals = head.eval().pair_scores(img, cap, lens, ii, cc, backend=backend).detach()
    torch.testing.assert_close(pairs, grid, rtol=0, atol=1e-6)
    torch.testing.assert_close(pairs.double(), want, rtol=0, atol=2e-6)
    assert (pairs - evals).abs().max() > 1e-4, "dropout inactive in training mode"
    for a, b in zip(gp, gg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the boundary

def test_bad_inputs_name_the_argument(no_compute):
    """Each bad argument raises naming it, before anything is computed (test_api's no_compute)."""
    img, cap, lens, head, ii, cc = _problem("coop_rcar", 1, "t2i", 1)
    p = params_of(head, True)

    def call(i, c, **kw):
        return ops.pair_scores(img, cap, lens, i, c, p, "coop_rcar", 1, "t2i", backend="torch", **kw)
    with pytest.raises(TypeError, match="img_index: expected an integer dtype"):
        call(ii.float(), cc)
    with pytest.raises(TypeError, match="cap_index: expected an integer dtype"):
        call(ii, cc.bool())
    with pytest.raises(ValueError, match=r"img_index: every index must be in \[0, 3\)"):
        call(ii + 3, cc)
    with pytest.raises(ValueError, match=r"cap_index: every index must be in \[0, 5\)"):
        call(ii, cc - 6)
    with pytest.raises(ValueError, match="cap_index: expected the shape of img_index"):
        call(ii, cc[:-1])
    with pytest.raises(ValueError, match="img_index: expected one dimension"):
        call(ii[None], cc[None])
    with pytest.raises(TypeError, match="cap_index: expected an integer tensor or list"):
        call(ii, "0,1")
    with pytest.raises(ValueError, match="memory_budget"):
        call(ii, cc, memory_budget=0)
    with pytest.raises(ValueError, match="regulator"):
        ops.pair_scores(img, cap, lens, ii, cc, p, "rcar", 1, "t2i")


@pytest.mark.skipif(rcar_fast.backend_status()["cpp"] != "available", reason=rcar_fast.backend_status()["cpp"])
def test_the_extension_op_checks_the_index():
    """The op itself (behind the boundary) still refuses a bad index with a message naming it."""
    att = _ops("cpp")[0]
    args = _sample(torch.float64, 1, False, False)
    with pytest.raises(RuntimeError, match="context_index: expected int32"):
        att(*args, torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="context_index: expected indices in"):
        att(*args, torch.tensor([0, 2, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="context_index: expected shape"):
        att(*args, torch.tensor([0, 1], dtype=torch.int32))


# ----------------------------------------------------------------------------- two-stage search

@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
def test_two_stage_pair_lists_give_the_per_caption_results(attn_type):
    """two_stage re-ranks through pair_scores (one call per tile; tiles of 7 pairs here): the
    same scores as the per-caption path it replaced (a head without pair_scores takes it), so
    the same ranks and recall."""
    from rcar_fast.app import retrieval as RT
    n = 4
    img, cap, lens = make_inputs(n, 5 * n, 4, 5, 16, torch.float64, seed=41)
    head = make_head("coop_rcar", 2, attn_type, 16, 8, torch.float64, seed=42)

    class GridOnly(torch.nn.Module):        # the same head, seen without pair_scores
        def __init__(self, h):
            super().__init__()
            self.h = h

        def forward(self, *a, **kw):
            return self.h(*a, **kw)
    calls = []
    real = head.pair_scores
    head.pair_scores = lambda *a, **kw: calls.append(len(a[3])) or real(*a, **kw)
    pi, pc = _pair_list(n, 5 * n, 30, 43)
    a = RT.score_pairs(head, img, cap, lens, pi, pc, backend="torch", tile_pairs=7)
    b = RT.score_pairs(GridOnly(head), img, cap, lens, pi, pc, backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert calls == [7, 7, 7, 7, 2]
    res = RT.two_stage(RT.Scorer(head, img, cap, lens), k=3, backend="torch")
    base = RT.two_stage(RT.Scorer(GridOnly(head), img, cap, lens), k=3, backend="torch")
    assert torch.equal(res.i2t_ranks, base.i2t_ranks) and torch.equal(res.t2i_ranks, base.t2i_ranks)
    assert res.recall == base.recall and res.pairs_scored == base.pairs_scored
