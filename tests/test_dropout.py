"""RAR dropout (rcar_fast.dropout): the random keep-masks have the right rate and scale, and
every backend applies exactly the reference's masks when they are fixed (a function of the
pair, position and feature), in scores and gradients, whatever its blocks."""

from __future__ import annotations

import math

import pytest
import torch

import rcar_fast
from rcar_fast import dropout
from rcar_testutil import cpu_backends, index_keep_masks, make_head, make_inputs, params_of, seed_of

P = dropout.RAR_DROPOUT


def _backends():
    return cpu_backends()


def test_random_masks_rate_and_scale():
    """Values are 0 or 1/(1-p) exactly; the kept fraction is 1-p within 5 standard deviations;
    keys and query masks are independent draws; the masks follow torch's seed."""
    torch.manual_seed(0)
    n = (40, 50, 24, 64)
    keep_k, keep_g = dropout.rar_keep_masks(0, torch.arange(n[0]), torch.arange(n[1]), n[2], n[3],
                                            torch.float32, "cpu")
    assert keep_k.shape == n and keep_g.shape == (n[0], n[1], n[3])
    scale = 1.0 / (1.0 - P)
    for m in (keep_k, keep_g):
        vals = torch.unique(m)
        assert vals.numel() == 2 and vals[0] == 0 and vals[1] == torch.tensor(scale, dtype=m.dtype), vals
        rate = (m > 0).double().mean().item()
        sd = math.sqrt(P * (1 - P) / m.numel())
        assert abs(rate - (1 - P)) < 5 * sd, rate
        # the scale keeps the expectation: E[x * keep] = x
        assert abs(m.double().mean().item() - 1.0) < 5 * sd * scale
    torch.manual_seed(0)
    again = dropout.rar_keep_masks(0, torch.arange(n[0]), torch.arange(n[1]), n[2], n[3], torch.float32, "cpu")
    assert torch.equal(again[0], keep_k) and torch.equal(again[1], keep_g)


def test_fixed_source_is_used_and_restored():
    with dropout.fixed_keep_masks(index_keep_masks):
        a = dropout.rar_keep_masks(1, torch.arange(3), torch.tensor([4, 2]), 5, 6, torch.float64, "cpu")
    want_k, want_g = index_keep_masks(1, torch.arange(3), torch.tensor([4, 2]), 5, 6, torch.device("cpu"))
    assert torch.equal(a[0], want_k.double() / (1 - P)) and torch.equal(a[1], want_g.double() / (1 - P))
    torch.manual_seed(3)
    b = dropout.rar_keep_masks(1, torch.arange(3), torch.tensor([4, 2]), 5, 6, torch.float64, "cpu")
    assert not torch.equal(a[0], b[0])       # random again outside the block


CONFIGS = [("only_rar", 1), ("only_rar", 3), ("coop_rcar", 2), ("coop_rcar", 3)]


def _cases():
    """Every backend x set-up x direction x (one block, many blocks); the interpreter (triton)
    is slow, so it gets coop_rcar T = 2 cut into many blocks, both directions."""
    out = []
    for b in _backends():
        name = b if isinstance(b, str) else b.values[0]
        marks = () if isinstance(b, str) else b.marks
        for regulator, steps in CONFIGS:
            for attn_type in ("t2i", "i2t"):
                for budget, bid in ((None, "one block"), (3000, "many blocks")):
                    if name == "triton" and ((regulator, steps) != ("coop_rcar", 2) or budget is None):
                        continue
                    out.append(pytest.param(name, regulator, steps, attn_type, budget, marks=marks,
                                            id=f"{name}-{regulator}-{steps}-{attn_type}-{bid}"))
    return out


@pytest.mark.parametrize("backend,regulator,steps,attn_type,budget", _cases())
def test_training_matches_reference_with_fixed_masks(backend, regulator, steps, attn_type, budget):
    """Training-mode scores and every gradient equal the reference's under the same fixed
    masks; the masks matter (the eval scores differ)."""
    seed = seed_of("dropout", regulator, steps, attn_type)
    dt = torch.float32 if backend == "triton" else torch.float64
    img, cap, lens = make_inputs(3, 5, 6, 7, 40, dt, seed)
    head = make_head(regulator, steps, attn_type, 40, 16, dt, seed).train()
    ref_head = make_head(regulator, steps, attn_type, 40, 16, torch.float64, seed).train()
    grads = {}
    with dropout.fixed_keep_masks(index_keep_masks):
        for name, h, d in (("reference", ref_head, torch.float64), (backend, head, dt)):
            x, y = img.to(d).requires_grad_(), cap.to(d).requires_grad_()
            out = h(x, y, lens, backend=name, **({} if name == "reference" else {"memory_budget": budget}))
            w = torch.linspace(0.5, 1.5, out.numel(), dtype=d).view_as(out)
            grads[name] = (out.detach().double(),
                           [g.double() for g in torch.autograd.grad((out * w).sum(), [x, y, *h.parameters()])])
    tol = dict(atol=1e-10, rtol=1e-8) if dt == torch.float64 else dict(atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(grads[backend][0], grads["reference"][0], **tol)
    for g, r in zip(grads[backend][1], grads["reference"][1]):
        torch.testing.assert_close(g, r, **tol)
    with torch.no_grad():
        ev = ref_head.eval()(img.double(), cap.double(), lens, backend="reference")
    assert (ev - grads["reference"][0]).abs().max() > 1e-3, "the masks changed nothing"


@pytest.mark.parametrize("backend", _backends())
def test_rar_update_piece_applies_fixed_masks(backend):
    """ops.rar_update(training=True) with fixed masks equals the reference, both directions."""
    for attn_type in ("t2i", "i2t"):
        img, cap, lens = make_inputs(2, 4, 5, 6, 24, torch.float32, 5)
        head = make_head("only_rar", 1, attn_type, 24, 12, torch.float32, 6)
        wts = {k[len("rar_modules.0."):]: v.detach() for k, v in params_of(head).items()
               if k.startswith("rar_modules.0.")}
        E = rcar_fast.ops.alignment(img, cap, lens, head.alv_modules[0].sim_transform_w.weight.detach(),
                                    head.alv_modules[0].sim_transform_w.bias.detach(), attn_type=attn_type,
                                    backend="reference")
        with dropout.fixed_keep_masks(index_keep_masks):
            want = rcar_fast.ops.rar_update(E, None, lens, wts, attn_type, training=True, backend="reference")
            got = rcar_fast.ops.rar_update(E, None, lens, wts, attn_type, training=True, backend=backend)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
        plain = rcar_fast.ops.rar_update(E, None, lens, wts, attn_type, training=False, backend="reference")
        assert (plain - want).abs().max() > 1e-4
