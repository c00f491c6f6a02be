"""GPU tier: the fast backends on real CUDA tensors. Skipped without a CUDA device.

bf16/fp16 kernels against the fp32 reference: the kernel's error must stay within 2x the error
of the same-dtype torch backend (STYLE.md), and Flickr-shaped blocks must run.
"""

from __future__ import annotations

import pytest
import torch

import rcar_fast
from rcar_fast import reference
from rcar_testutil import make_head, make_inputs, params_of

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FAST = [b for b in ("triton", "cuda") if torch.cuda.is_available() and b in rcar_fast.available_backends("cuda")]
CONFIGS = [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 1), ("coop_rcar", 2), ("coop_rcar", 3)]


def _case(regulator, steps, attn_type, n_i, n_c, R, L, d, s, seed):
    img, cap, lens = make_inputs(n_i, n_c, R, L, d, torch.float32, seed)
    head = make_head(regulator, steps, attn_type, d, s, torch.float32, seed).eval().cuda()
    img, cap = img.cuda(), cap.cuda()
    with torch.no_grad():
        want = reference.rcar_scores(img, cap, lens, params_of(head), regulator, steps, attn_type)
    return head, img, cap, lens, want


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CONFIGS)
def test_fp32_matches_reference(backend, regulator, steps, attn_type):
    head, img, cap, lens, want = _case(regulator, steps, attn_type, 6, 9, 36, 24, 1024, 256, 1)
    with torch.no_grad():
        got = head(img, cap, lens, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CONFIGS)
def test_half_error_within_twice_torch(backend, dtype, regulator, steps, attn_type):
    head, img, cap, lens, want = _case(regulator, steps, attn_type, 16, 40, 36, 24, 1024, 256, 2)
    h = head.to(dtype)
    with torch.no_grad():
        got = h(img.to(dtype), cap.to(dtype), lens, backend=backend).float()
        base = h(img.to(dtype), cap.to(dtype), lens, backend="torch").float()
    err, err_torch = (got - want).abs().max().item(), (base - want).abs().max().item()
    assert torch.isfinite(got).all()
    assert err <= 2 * err_torch + 1e-4, (err, err_torch)


@pytest.mark.parametrize("backend", FAST)
def test_flickr_shaped_block(backend):
    """128 images x 512 captions, lengths 6..24, bf16: runs, finite, and close to the fp32 torch
    backend on the same inputs."""
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(128, 36, 1024, generator=g), dim=-1).cuda()
    cap = torch.nn.functional.normalize(torch.randn(512, 24, 1024, generator=g), dim=-1).cuda()
    lens = torch.randint(6, 25, (512,), generator=g)
    head = rcar_fast.RCARSimilarity().eval().cuda()
    with torch.no_grad():
        want = head(img, cap, lens, backend="torch")
        got = head.to(torch.bfloat16)(img.bfloat16(), cap.bfloat16(), lens, backend=backend).float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 2e-2


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 1),
                                             ("coop_rcar", 2), ("coop_rcar", 3)])
def test_gradients_match_reference(backend, regulator, steps, attn_type):
    """fp32 gradients of img, cap and every parameter through the backend's backward kernels vs
    the fp64 reference; NaN padding gets exactly zero gradient."""
    img, cap, lens = make_inputs(3, 5, 7, 9, 40, torch.float32, 7)
    head = make_head(regulator, steps, attn_type, 40, 24, torch.float32, 7).eval().cuda()
    img, cap = img.cuda(), cap.cuda()
    params = list(head.parameters())
    grads = {}
    for name, h, dt in (("reference", head.double(), torch.float64), (backend, head.float(), torch.float32)):
        x, y = img.to(dt).requires_grad_(), cap.to(dt).requires_grad_()
        out = h(x, y, lens, backend=name)
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
        grads[name] = [g.double() if g is not None else None for g in
                       torch.autograd.grad((out * w).sum(), [x, y] + params, allow_unused=True)]
    for got, want in zip(grads[backend], grads["reference"]):
        if want is None:
            assert got is None or not got.any()
            continue
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for j, lj in enumerate(lens.tolist()):
        assert not grads[backend][1][j, lj:].any()


@pytest.mark.parametrize("backend", FAST)
def test_training_step_with_dropout(backend):
    """Training mode (RAR dropout) forward + backward on a 32 x 32 Flickr-shaped batch: finite
    gradients for every parameter."""
    img, cap, lens = make_inputs(32, 32, 36, 24, 1024, torch.float32, 9)
    head = rcar_fast.RCARSimilarity().train().cuda()
    head(img.cuda(), cap.cuda(), lens, backend=backend).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
