"""Every (image, caption) pair is independent (SPEC.md): any block of the pair grid scores the
same as that block of the full matrix, whatever the block sizes the backend picks."""

from __future__ import annotations

import pytest
import torch

from rcar_fast import ops
from rcar_testutil import make_head, make_inputs, params_of, seed_of

D, S = 40, 16
N_I, N_C, R, L = 5, 7, 6, 9
TOL = 1e-12


def _close(a, b, what=""):
    torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 2),
                                             ("coop_rcar", 3)])
def test_blocks_equal_block_of_full_matrix(regulator, steps, attn_type):
    seed = seed_of("shard", regulator, steps, attn_type)
    head = make_head(regulator, steps, attn_type, D, S, torch.float64, seed)
    img, cap, lens = make_inputs(N_I, N_C, R, L, D, torch.float64, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        full = head(img, cap, lens, backend="torch")
        assert torch.isfinite(full).all()
        for trial in range(6):
            i0 = int(torch.randint(0, N_I, (1,), generator=gen))
            i1 = int(torch.randint(i0 + 1, N_I + 1, (1,), generator=gen))
            k = int(torch.randint(1, N_C + 1, (1,), generator=gen))
            cols = torch.randperm(N_C, generator=gen)[:k]          # an arbitrary subset, permuted
            if trial == 0:
                cols = torch.tensor([int(torch.argmin(lens))])     # a one-word caption alone
            block = head(img[i0:i1], cap[cols], lens[cols], backend="torch")
            _close(block, full[i0:i1][:, cols], f"rows {i0}:{i1}, cols {cols.tolist()}")
        # captions repeated and images permuted
        rows = torch.randperm(N_I, generator=gen)
        cols = torch.tensor([2, 2, 0, 6, 2])
        block = head(img[rows], cap[cols], lens[cols], backend="torch")
        _close(block, full[rows][:, cols], "permuted rows, repeated cols")
        # a caption cut to its own length (less padding) scores the same
        j = int(torch.argmax((lens != L).to(torch.int64)))
        lj = int(lens[j])
        one = head(img, cap[j:j + 1, :lj], lens[j:j + 1], backend="torch")
        _close(one, full[:, j:j + 1], "caption cut to its length")
        # single pairs
        for i, j in ((0, 0), (N_I - 1, N_C - 1), (2, 3)):
            pair = head(img[i:i + 1], cap[j:j + 1], lens[j:j + 1], backend="torch")
            _close(pair, full[i:i + 1, j:j + 1], f"pair ({i}, {j})")


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 1), ("only_rcr", 1), ("coop_rcar", 2)])
def test_memory_budget_does_not_change_scores(regulator, steps, attn_type):
    seed = seed_of("budgets", regulator, steps, attn_type)
    head = make_head(regulator, steps, attn_type, D, S, torch.float64, seed)
    img, cap, lens = make_inputs(N_I, N_C, R, L, D, torch.float64, seed)
    p = params_of(head, True)
    per_pair = 4 * L * D * 8
    with torch.no_grad():
        full = head(img, cap, lens, backend="torch")
        for budget in (1, per_pair, 2 * per_pair + 1, 7 * per_pair, 10 ** 9):
            out = ops.rcar_scores(img, cap, lens, p, regulator, steps, attn_type, backend="torch",
                                  memory_budget=budget)
            _close(out, full, f"memory_budget={budget}")
            out = head(img, cap, lens, backend="torch", memory_budget=budget)
            _close(out, full, f"module, memory_budget={budget}")


def test_caption_order_and_length_groups():
    """Captions of many different lengths (several length groups) in a shuffled order."""
    head = make_head("coop_rcar", 2, "t2i", D, S, torch.float64, 91)
    n_c, Lm = 12, 20
    lens = [1, 20, 3, 19, 7, 2, 11, 20, 5, 13, 1, 17]
    img, cap, lens_t = make_inputs(3, n_c, R, Lm, D, torch.float64, 92, lens=lens)
    with torch.no_grad():
        full = head(img, cap, lens_t, backend="torch")
        ref = ops.rcar_scores(img, cap, lens_t, params_of(head, True), "coop_rcar", 2, "t2i",
                              backend="reference")
        torch.testing.assert_close(full, ref, atol=1e-10, rtol=0)
        for j in range(n_c):
            col = head(img, cap[j:j + 1], lens_t[j:j + 1], backend="torch")
            _close(col, full[:, j:j + 1], f"caption {j}")


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
def test_every_output_element_is_written(attn_type, monkeypatch):
    """Fresh buffers filled with NaN (DESIGN.md): an element no block writes would show."""
    real_new_empty = torch.Tensor.new_empty

    def nan_new_empty(self, *size, **kw):
        out = real_new_empty(self, *size, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    head = make_head("coop_rcar", 2, attn_type, D, S, torch.float64, 93)
    img, cap, lens = make_inputs(N_I, N_C, R, L, D, torch.float64, 94)
    ref = ops.rcar_scores(img, cap, lens, params_of(head, True), "coop_rcar", 2, attn_type,
                          backend="reference")
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_new_empty)
    assert torch.isnan(img.new_empty(2)).all()
    with torch.no_grad():
        for budget in (None, 1, 3 * 4 * L * D * 8):
            out = head(img, cap, lens, backend="torch", memory_budget=budget)
            assert torch.isfinite(out).all(), budget
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
