"""The GPU tier's checks (tests/gpu_cases.py) run on the CPU, at small sizes, with the backends
the CPU has: "cpp" and "triton" (its interpreter). This is what makes a bug in a GPU test
itself fail in CI (the tier's gradient test once converted its one head in place, so the
"reference" ran in float32 and every case raised before any kernel ran)."""

from __future__ import annotations

import pytest
import torch

import rcar_fast

import test_gpu
from gpu_cases import (CONFIGS, Dims, flickr_shaped_block, fp32_matches_reference, rar_scores_are_rar_then_the_layer,
                       gradients_match_reference, half_error_within_twice_torch, half_pair_scores_within_twice_torch,
                       pair_scores_match_the_grid, rcr_op_matches_torch_step, repeated_lengths,
                       selftest_passes, training_step_with_dropout, context_gram_gives_the_same_attention)
from rcar_testutil import cpu_backends, seed_of


BACKENDS = cpu_backends("cpp", "triton")
SMALL = Dims(2, 3, 5, 6, 24, 12)


def test_gpu_tier_parametrization_is_complete():
    """The GPU tier's parameter lists name every backend it is for and every set-up; its test
    functions exist for each check (collected here even without a GPU)."""
    ids = [p.values[0] if hasattr(p, "values") else p for p in test_gpu.BACKENDS]
    assert ids == ["triton", "cuda"]
    assert {r for r, _ in CONFIGS} == {"only_rar", "only_rcr", "coop_rcar"}
    for name in ("test_fp32_matches_reference", "test_fp32_full_groups_match_reference",
                 "test_half_error_within_twice_torch", "test_flickr_shaped_block",
                 "test_gradients_match_reference", "test_training_step_with_dropout", "test_selftest_passes",
                 "test_pair_scores_match_the_grid", "test_half_long_captions", "test_half_wide_projection",
                 "test_half_pair_scores", "test_rcr_op"):
        assert callable(getattr(test_gpu, name))


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rcr", 2), ("coop_rcar", 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_case(backend, regulator, steps, attn_type):
    fp32_matches_reference(backend, "cpu", regulator, steps, attn_type, SMALL, seed_of("cpu fp32", regulator, attn_type))


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_full_groups_case(backend, attn_type):
    """The GPU tier's full-groups case at small sizes: 11 captions of 3 lengths (up to 6 words)."""
    fp32_matches_reference(backend, "cpu", "coop_rcar", 2, attn_type, SMALL._replace(n_c=11),
                           seed_of("cpu groups", attn_type), lens=repeated_lengths(11, (2, 5, 6)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_case(backend):
    """fp16 (the interpreter computes bf16 wrongly, so the triton backend refuses it here)."""
    half_error_within_twice_torch(backend, "cpu", torch.float16, "coop_rcar", 2, "t2i", SMALL, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flickr_shaped_case(backend):
    flickr_shaped_block(backend, "cpu", torch.float16 if backend == "triton" else torch.bfloat16, 2, 3)


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("coop_rcar", 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_case(backend, regulator, steps, attn_type):
    gradients_match_reference(backend, "cpu", regulator, steps, attn_type, SMALL, seed_of("cpu grad", regulator, attn_type))


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_pair_scores_case(backend, attn_type):
    """cpp only: triton's paired kernels run in tests/test_pair_scores.py (the interpreter is slow)."""
    pair_scores_match_the_grid(backend, "cpu", "coop_rcar", 2, attn_type, SMALL, seed_of("cpu pairs", attn_type), m=7)


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_pair_scores_case(backend, attn_type):
    """The GPU tier's half-precision pair list at small sizes (fp16: see test_half_case)."""
    half_pair_scores_within_twice_torch(backend, "cpu", torch.float16, "coop_rcar", 2, attn_type, SMALL,
                                        seed_of("cpu half pairs", attn_type), m=7)


@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_half_long_captions_case(backend):
    """The GPU tier's long-caption case at small sizes: rows past 64 words (d 24, s 12); cpp only
    (triton refuses rows past 64)."""
    half_error_within_twice_torch(backend, "cpu", torch.float16, "coop_rcar", 2, "t2i", Dims(2, 4, 5, 80, 24, 12), 5)


@pytest.mark.parametrize("backend", cpu_backends("triton"))
def test_context_gram_case(backend):
    """The GPU tier's context_gram check on CPU tensors: the Triton ops under the interpreter (the
    "cpp" kernel set has no context_gram; its op checks the argument, test_fused_backends)."""
    context_gram_gives_the_same_attention(backend, "cpu")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 5e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["F=1", "F,lam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rcr_op_case(backend, with_state, dtype, atol):
    """The GPU tier's rcr-op check on CPU tensors (the C++ CPU kernel; the Triton op under the
    interpreter), fp32 and fp16 with the GPU tier's tolerances (bf16: only on a GPU)."""
    rcr_op_matches_torch_step(backend, "cpu", dtype, with_state, atol)


@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cuda_rcr_gemm_kernels_case(backend):
    """The shapes and fp16 tolerance of the GPU tier's test_cuda_rcr_gemm_kernels (s = 256,
    d = 1024, 16 x 35 rows; s = 76, d = 300) on the C++ CPU kernel: a correct rcr op meets them."""
    for d, s, B in ((1024, 256, 16), (300, 76, 1)):
        for with_state in (False, True):
            rcr_op_matches_torch_step(backend, "cpu", torch.float16, with_state, 5e-3, d=d, s=s, B=B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", sorted(test_gpu.CASES_128))
@pytest.mark.parametrize("backend", cpu_backends("cpp"))
def test_cuda_128_row_blocks_case(backend, op, dtype):
    """The cases and tolerances of the GPU tier's test_cuda_128_row_blocks on the C++ CPU kernels:
    correct attention and rar ops meet them."""
    test_gpu.CASES_128[op][0](backend, "cpu", dtype)


@pytest.mark.parametrize("backend", cpu_backends("triton"))
def test_rar_scores_case(backend):
    """The GPU tier's test_cuda_rar_scores check on the Triton interpreter's rar_scores (two of the
    cases: the interpreter is slow)."""
    from test_cuda_emu import RAR_WG_CASES
    rar_scores_are_rar_then_the_layer(backend, "cpu", torch.float16, cases=RAR_WG_CASES[:2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_case(backend):
    training_step_with_dropout(backend, "cpu", SMALL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selftest_case(backend):
    """float32 only here (the interpreter is slow; tests/test_selftest.py covers the dtypes)."""
    selftest_passes(backend, "cpu", [torch.float32])
