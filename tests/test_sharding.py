"""Every (image, caption) pair is independent (SPEC.md): any block of the pair grid scores the
same as that block of the full matrix, whatever the block sizes the backend picks, on every
backend, in both directions: subsets, permutations, repeats, memory budgets, captions cut to
their length (blocks that mix caption lengths: tests/test_parity.py
test_padded_blocks_match_reference)."""

from __future__ import annotations

import pytest
import torch

from rcar_fast import ops
from rcar_testutil import cpu_backends, make_head, make_inputs, params_of, seed_of

D, S = 40, 16
N_I, N_C, R, L = 5, 7, 6, 9


def _backends():
    return cpu_backends()


BACKENDS = _backends()


def _dtype(backend):
    """float64 where the backend computes it (triton computes at float32 accuracy: float32)."""
    return torch.float32 if backend == "triton" else torch.float64


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-6


def _close(a, b, what="", tol=1e-12):
    torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 2),
                                             ("coop_rcar", 3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_equal_block_of_full_matrix(backend, regulator, steps, attn_type):
    seed = seed_of("shard", regulator, steps, attn_type)
    dt = _dtype(backend)
    TOL = _tol(dt)
    head = make_head(regulator, steps, attn_type, D, S, dt, seed)
    img, cap, lens = make_inputs(N_I, N_C, R, L, D, dt, seed)
    gen = torch.Generator().manual_seed(seed)

    def _close(a, b, what=""):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=lambda m: f"{what}: {m}")
    with torch.no_grad():
        full = head(img, cap, lens, backend=backend)
        assert torch.isfinite(full).all()
        for trial in range(6):
            i0 = int(torch.randint(0, N_I, (1,), generator=gen))
            i1 = int(torch.randint(i0 + 1, N_I + 1, (1,), generator=gen))
            k = int(torch.randint(1, N_C + 1, (1,), generator=gen))
            cols = torch.randperm(N_C, generator=gen)[:k]          # an arbitrary subset, permuted
            if trial == 0:
                cols = torch.tensor([int(torch.argmin(lens))])     # a one-word caption alone
            block = head(img[i0:i1], cap[cols], lens[cols], backend=backend)
            _close(block, full[i0:i1][:, cols], f"rows {i0}:{i1}, cols {cols.tolist()}")
        # captions repeated and images permuted
        rows = torch.randperm(N_I, generator=gen)
        cols = torch.tensor([2, 2, 0, 6, 2])
        block = head(img[rows], cap[cols], lens[cols], backend=backend)
        _close(block, full[rows][:, cols], "permuted rows, repeated cols")
        # a caption cut to its own length (less padding) scores the same
        j = int(torch.argmax((lens != L).to(torch.int64)))
        lj = int(lens[j])
        one = head(img, cap[j:j + 1, :lj], lens[j:j + 1], backend=backend)
        _close(one, full[:, j:j + 1], "caption cut to its length")
        # single pairs
        for i, j in ((0, 0), (N_I - 1, N_C - 1), (2, 3)):
            pair = head(img[i:i + 1], cap[j:j + 1], lens[j:j + 1], backend=backend)
            _close(pair, full[i:i + 1, j:j + 1], f"pair ({i}, {j})")


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 1), ("only_rcr", 1), ("coop_rcar", 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_budget_does_not_change_scores(backend, regulator, steps, attn_type):
    seed = seed_of("budgets", regulator, steps, attn_type)
    dt = _dtype(backend)
    head = make_head(regulator, steps, attn_type, D, S, dt, seed)
    img, cap, lens = make_inputs(N_I, N_C, R, L, D, dt, seed)
    p = params_of(head, True)
    per_pair = 4 * L * D * 8
    tol = _tol(dt)
    with torch.no_grad():
        full = head(img, cap, lens, backend=backend)
        budgets = (1, per_pair, 2 * per_pair + 1, 7 * per_pair, 10 ** 9)
        if backend == "triton":       # the interpreter is slow: two budgets, one cut inside a group
            budgets = (2 * per_pair + 1, 10 ** 9)
        for budget in budgets:
            out = ops.rcar_scores(img, cap, lens, p, regulator, steps, attn_type, backend=backend,
                                  memory_budget=budget)
            _close(out, full, f"memory_budget={budget}", tol)
            out = head(img, cap, lens, backend=backend, memory_budget=budget)
            _close(out, full, f"module, memory_budget={budget}", tol)


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_caption_order_and_length_groups(backend, attn_type):
    """Captions of many different lengths (several length groups) in a shuffled order."""
    dt = _dtype(backend)
    tol = _tol(dt)
    head = make_head("coop_rcar", 2, attn_type, D, S, dt, 91)
    n_c, Lm = 12, 20
    lens = [1, 20, 3, 19, 7, 2, 11, 20, 5, 13, 1, 17]
    img, cap, lens_t = make_inputs(3, n_c, R, Lm, D, dt, 92, lens=lens)
    with torch.no_grad():
        full = head(img, cap, lens_t, backend=backend)
        ref = ops.rcar_scores(img.double(), cap.double(), lens_t,
                              {k: v.double() for k, v in params_of(head, True).items()}, "coop_rcar", 2,
                              attn_type, backend="reference")
        torch.testing.assert_close(full.double(), ref, atol=1e-10 if dt == torch.float64 else 2e-6, rtol=0)
        for j in range(n_c):
            col = head(img, cap[j:j + 1], lens_t[j:j + 1], backend=backend)
            _close(col, full[:, j:j + 1], f"caption {j}", tol)


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend, attn_type, monkeypatch):
    """Fresh buffers filled with NaN (DESIGN.md): an element no block writes would show."""
    real_new_empty = torch.Tensor.new_empty

    def nan_new_empty(self, *size, **kw):
        out = real_new_empty(self, *size, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    dt = _dtype(backend)
    head = make_head("coop_rcar", 2, attn_type, D, S, dt, 93)
    img, cap, lens = make_inputs(N_I, N_C, R, L, D, dt, 94)
    ref = ops.rcar_scores(img.double(), cap.double(), lens,
                          {k: v.double() for k, v in params_of(head, True).items()}, "coop_rcar", 2, attn_type,
                          backend="reference")
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_new_empty)
    assert torch.isnan(img.new_empty(2)).all()
    with torch.no_grad():
        for budget in (None, 1, 3 * 4 * L * D * 8):
            out = head(img, cap, lens, backend=backend, memory_budget=budget)
            assert torch.isfinite(out).all(), budget
            torch.testing.assert_close(out.double(), ref, atol=1e-10 if dt == torch.float64 else 2e-6, rtol=0)

