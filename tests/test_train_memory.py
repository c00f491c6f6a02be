"""bench/train_memory.py, the training-step memory measurement, on a tiny head (d = 32, s = 16,
captions of 5 words, n x n steps with n <= 3): one positive peak per backend and size, the
affine fit through them, the peak growing with the pairs while the backward reaches the
features, and every measured step one block of the pipeline (the algorithm's footprint, not the
memory budget's)."""

from __future__ import annotations

import pytest
import torch

import rcar_fast
from bench import train_memory as TM
from rcar_fast import pipeline
from rcar_fast.backends.contract import KernelSet
from rcar_fast.block_plan import iter_blocks

D, S, L = 32, 16, 5
HERE = [b for b in TM.BACKENDS if b in rcar_fast.available_backends("cpu")]


def test_affine_fit_is_exact_on_affine_points():
    a, b = TM.affine_fit([1, 4, 9, 16], [1000 + 250 * p for p in (1, 4, 9, 16)])
    assert a == pytest.approx(1000, abs=1e-6) and b == pytest.approx(250, abs=1e-9)
    a, b = TM.affine_fit([4, 16], [7.0, 31.0])                   # two points: through both
    assert (a, b) == pytest.approx((-1.0, 2.0))


def test_one_positive_peak_per_backend_and_size_and_the_fit_reproduces_them():
    """Every CPU backend here (triton under the interpreter, as conftest sets it), at 1 x 1 and
    2 x 2: one positive peak each, one block each, and the two-point fit passes through both
    (to 1e-9 relative); torch at three sizes: the least-squares fit within 5% of the largest
    peak at every point (measured: 0.1%)."""
    assert "torch" in HERE
    fits, skipped = TM.measure_all(HERE, [1, 2], [1, 2], D, S, L, max_gib=1.0)
    assert sorted(fits) == sorted(HERE) and not skipped
    for name, fit in fits.items():
        assert [p.n for p in fit.points] == [1, 2], name
        for p in fit.points:
            assert p.backend == name and p.peak > 0 and p.blocks == 1, p
            assert fit.at(p.pairs) == pytest.approx(p.peak, rel=1e-9), (name, p)
    three = TM.fit_backend(TM.measure_backend("torch", [1, 2, 3], D, S, L))
    assert len(three.points) == 3 and all(p.peak > 0 for p in three.points)
    assert three.b > 0
    assert three.max_residual() <= 0.05 * max(p.peak for p in three.points)
    text = TM.report(fits, skipped, D, S, L)
    assert "EXTRAPOLATED" in text and f"{TM.TARGET_N}x{TM.TARGET_N}" in text


def test_peak_grows_with_pairs_and_the_backward_reaches_features_and_weights():
    """torch: 3 x 3 peaks above 1 x 1 by more than the extra pairs' feature gradients, and after
    the measured call both feature tensors and every weight hold a finite, nonzero gradient
    (a step without backward leaves them None)."""
    model = TM.make_head(D, S)
    peaks, grads = {}, {}
    for n in (1, 3):
        img, cap, lens = TM.step_shard(n, D, S, L).inputs("cpu")
        peaks[n] = TM.measure_step(model, "torch", n, inputs=(img, cap, lens)).peak
        for name, x in (("img", img), ("cap", cap)):
            assert x.grad is not None and x.grad.shape == x.shape, (n, name)
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, (n, name)
        grads[n] = (img.numel() + cap.numel()) * 4
        for name, w in model.named_parameters():
            assert w.grad is not None and torch.isfinite(w.grad).all(), (n, name)
    assert peaks[3] - peaks[1] > grads[3] - grads[1] > 0


def test_gradients_are_cleared_before_each_measured_step():
    """Two measured steps on the same inputs under the same dropout masks (seeded) leave the same
    gradients, not their sum, and the same peak: each call measures a step from cleared
    gradients, not an accumulation into the previous step's."""
    model = TM.make_head(D, S)
    img, cap, lens = TM.step_shard(2, D, S, L).inputs("cpu")
    seen = []
    for _ in range(2):
        torch.manual_seed(7)                     # RAR's dropout masks come from torch.rand
        peak = TM.measure_step(model, "torch", 2, inputs=(img, cap, lens)).peak
        seen.append((peak, img.grad.clone(), model.sim_eval_w.weight.grad.clone()))
    (p1, g1, w1), (p2, g2, w2) = seen
    assert g1.abs().sum() > 0 and w1.abs().sum() > 0
    assert torch.allclose(g2, g1, rtol=1e-5, atol=1e-7) and torch.allclose(w2, w1, rtol=1e-5, atol=1e-7)
    assert p2 == p1


def test_every_measured_step_is_one_block_whatever_the_backend_budget(monkeypatch):
    """Counted independently of the module's own counter: with every backend's default budget
    made 4 KiB (a step on it would be many blocks), the measured step is still one block, as it
    runs on TM.ONE_BLOCK_BUDGET. A real budget or two caption lengths make several blocks, and
    the measurement refuses them. The 128 x 128 grid of d = 1024 is one block for every
    backend's training plan under ONE_BLOCK_BUDGET."""
    counted = []
    original = pipeline.iter_blocks

    def counting(*args, **kwargs):
        for block in original(*args, **kwargs):
            counted.append(block)
            yield block

    monkeypatch.setattr(pipeline, "iter_blocks", counting)
    monkeypatch.setattr(KernelSet, "budget", lambda self, device: 4096)
    model = TM.make_head(D, S)
    p = TM.measure_step(model, "torch", 3, caption_len=L)
    assert len(counted) == 1 and p.blocks == 1
    assert counted[0][2:] == (0, 3) and len(counted[0][0]) == 3      # all images, all captions

    with pytest.raises(RuntimeError, match="blocks, not one"):
        TM.measure_step(model, "torch", 3, caption_len=L, budget=4096)
    img, cap, lens = TM.step_shard(3, D, S, L).inputs("cpu")
    lens = torch.tensor([L, L - 1, L])                                 # two lengths: two blocks
    with pytest.raises(RuntimeError, match="2 blocks, not one"):
        TM.measure_step(model, "torch", 3, inputs=(img, cap, lens))

    for name in HERE:
        ks = rcar_fast.backends.kernel_set(name)
        blocks = list(iter_blocks([15] * TM.TARGET_N, TM.TARGET_N, 36, 1024, "i2t", 4, TM.ONE_BLOCK_BUDGET,
                                  ks.live_buffers_train))
        assert len(blocks) == 1, name


def test_report_marks_a_fit_over_fewer_sizes_as_a_lower_bound():
    """Synthetic peaks shaped like the d = 1024 ones (a constant phase that dominates at few pairs,
    max(c, a + b pairs)): the backend fitted on 1 and 4 pairs only is called a lower bound, with the
    like-for-like fits; affine peaks on every size get no caution."""
    def points(name, sizes, fn):
        return TM.fit_backend([TM.StepPeak(name, n, int(fn(n * n)), 0.0, 1) for n in sizes])
    mib = TM.MIB
    convex = {"torch": points("torch", [1, 2, 4, 8], lambda p: max(8 * mib, 4 * mib + 2.4 * mib * p)),
              "triton": points("triton", [1, 2], lambda p: max(7 * mib, 4 * mib + 0.9 * mib * p))}
    text = TM.report(convex, {}, 1024, 256, 15)
    assert "Like for like" in text and "lower bounds" in text and "triton, fitted on 1, 4 pairs" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if "| 1, 4" in line}
    assert "(lower bound" in rows["triton"] and "(lower bound" not in rows.get("torch", "")
    # a backend whose slope over few pairs overshoots its full fit's (a phase that grows fast at
    # few pairs, then a slower one): the narrow backend's figure is then no bound at all
    overshoot = {"torch": points("torch", [1, 2, 4, 8], lambda p: max(8 * mib, 4 * mib + 2.4 * mib * p)),
                 "cpp": points("cpp", [1, 2, 4, 8], lambda p: 6 * mib + 0.7 * mib * min(p, 4) + 0.3 * mib * max(p - 4, 0)),
                 "triton": points("triton", [1, 2], lambda p: 6 * mib + 0.7 * mib * p)}
    text = TM.report(overshoot, {}, 1024, 256, 15)
    assert "neither estimates nor bounds" in text and "lower bounds" not in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if "| 1, 4" in line}
    assert "(not an estimate" in rows["triton"] and "(lower bound" not in rows["triton"]
    affine = {"torch": points("torch", [1, 2, 4], lambda p: 4 * mib + 2.4 * mib * p),
              "triton": points("triton", [1, 2], lambda p: 4 * mib + 0.9 * mib * p)}
    text = TM.report(affine, {}, 1024, 256, 15)
    assert "Like for like" in text and "lower bounds" not in text and "within 0%" in text
