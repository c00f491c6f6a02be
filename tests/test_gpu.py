"""GPU tier: the fast backends on real CUDA tensors. Skipped without a CUDA device, and the
triton tests also under TRITON_INTERPRET=1 (that would run the interpreter, not the GPU).

The checks themselves live in tests/gpu_cases.py, where tests/test_gpu_cases_cpu.py runs the
same code on the CPU in CI. Run alone:  pytest tests -m gpu -v -rfE  (add -k cuda / -k triton
for one backend; bench/device_suite.sh does that).
"""

from __future__ import annotations

import os

import pytest
import torch

import rcar_fast
from gpu_cases import (CONFIGS, GPU_BACKENDS, Dims, attention_128_row_cases, flickr_shaped_block, rar_128_row_cases,
                       rar_scores_are_rar_then_the_layer,
                       fp32_matches_reference, gradients_match_reference, half_error_within_twice_torch,
                       half_pair_scores_within_twice_torch, memory_within_budget, pair_scores_match_the_grid,
                       rcr_op_matches_torch_step, repeated_lengths, selftest_passes,
                       context_gram_gives_the_same_attention,
                       training_step_with_dropout)
from rcar_testutil import seed_of

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _backend_param(name):
    """The backend, skipped with the reason when it cannot run real kernels on this GPU."""
    if not torch.cuda.is_available():
        return pytest.param(name, marks=pytest.mark.skip(reason="needs a CUDA device"))
    why = rcar_fast.backend_status()[name]
    if why != "available":
        return pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {why}"))
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return pytest.param(name, marks=pytest.mark.skip(
            reason="TRITON_INTERPRET=1 would run the CPU interpreter, not the GPU kernels"))
    return name


BACKENDS = [_backend_param(b) for b in GPU_BACKENDS]
DIMS = Dims(6, 9, 36, 24, 1024, 256)          # Flickr-shaped pairs, random lengths 1..24
GRAD_DIMS = Dims(3, 5, 7, 9, 40, 24)          # fp32 gradients against the fp64 reference


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_reference(backend, regulator, steps, attn_type):
    fp32_matches_reference(backend, "cuda", regulator, steps, attn_type, DIMS,
                           seed_of("gpu fp32", regulator, steps, attn_type))


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("coop_rcar", 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_full_groups_match_reference(backend, regulator, steps, attn_type):
    """33 captions of 3 lengths (11 each): the Triton forward's programs of several pairs fill,
    with a partial last one per group; fp32 against the reference."""
    fp32_matches_reference(backend, "cuda", regulator, steps, attn_type, Dims(6, 33, 36, 24, 1024, 256),
                           seed_of("gpu groups", regulator, steps, attn_type), lens=repeated_lengths(33))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_error_within_twice_torch(backend, regulator, steps, attn_type, dtype):
    half_error_within_twice_torch(backend, "cuda", dtype, regulator, steps, attn_type,
                                  Dims(16, 40, 36, 24, 1024, 256), seed_of("gpu half", regulator, steps, attn_type))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rcr", 2), ("coop_rcar", 2)])
@pytest.mark.parametrize("backend", [_backend_param("cuda")])
def test_half_long_captions(backend, regulator, steps, attn_type, dtype):
    """Captions of 1..80 words: blocks of up to 64 words run CUDA's tensor-core forward (GP pairs
    per block), longer ones its per-pair kernel (rows past 64), in one run. (The triton backend
    refuses rows past 64 with a ValueError.)"""
    half_error_within_twice_torch(backend, "cuda", dtype, regulator, steps, attn_type,
                                  Dims(8, 24, 36, 80, 256, 64), seed_of("gpu long", regulator, steps, attn_type))


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", [_backend_param("cuda")])
def test_half_wide_projection(backend, attn_type):
    """s = 384: CUDA's projection's 256-column passes run twice (partly empty the second time).
    (The triton backend refuses s past 256 with a ValueError.)"""
    half_error_within_twice_torch(backend, "cuda", torch.bfloat16, "coop_rcar", 2, attn_type,
                                  Dims(6, 20, 36, 24, 512, 384), seed_of("gpu wide", attn_type))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", [("only_rcr", 2), ("coop_rcar", 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_pair_scores(backend, regulator, steps, attn_type, dtype):
    """The paired form in half precision (one pair per block) against the reference."""
    half_pair_scores_within_twice_torch(backend, "cuda", dtype, regulator, steps, attn_type,
                                        Dims(6, 9, 36, 24, 1024, 256), seed_of("gpu half pairs", regulator, attn_type),
                                        m=96)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flickr_shaped_block(backend):
    """128 images x 512 captions, bf16: runs, finite, close to the fp32 torch backend."""
    flickr_shaped_block(backend, "cuda", torch.bfloat16, 128, 512)


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend, regulator, steps, attn_type):
    gradients_match_reference(backend, "cuda", regulator, steps, attn_type, GRAD_DIMS,
                              seed_of("gpu grad", regulator, steps, attn_type))


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_scores_match_the_grid(backend, regulator, steps, attn_type):
    """The paired kernels (pair lists): scores against the reference and the grid, gradients."""
    pair_scores_match_the_grid(backend, "cuda", regulator, steps, attn_type, GRAD_DIMS,
                               seed_of("gpu pairs", regulator, steps, attn_type), m=96)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_context_gram_argument(backend, dtype):
    """The attention given context_gram's output (csrc/cuda/attention.cu; kernels/attention.py)
    equals the attention alone, bit for bit; a wrong gram is refused by name."""
    context_gram_gives_the_same_attention(backend, "cuda", dtype)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["F=1", "F,lam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rcr_op(backend, with_state, dtype, atol):
    """The inference rcr op of each backend (csrc/cuda/rcr.cu; kernels/rcr.py) against torch's step
    in float64 on the GPU, a valid row's NaN kept (the hardware's min/max, not the interpreter's)."""
    rcr_op_matches_torch_step(backend, "cuda", dtype, with_state, atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel", ["wgmma", "wmma"])
@pytest.mark.parametrize("backend", [_backend_param("cuda")])
def test_cuda_rcr_gemm_kernels(backend, kernel, dtype, atol, monkeypatch):
    """The CUDA rcr op on each of its GEMM kernels (launch.h use_wgmma; RCAR_FAST_CUDA_WGMMA=0 asks
    for wmma) against torch's step in float64: rcr_wgmma_kernel (Hopper's wgmma: descriptors,
    accumulator layout and fences never run anywhere else; the emulator's model of them is written
    from the PTX ISA) and rcr_gemm_kernel; with wgmma the temperatures too (one more block a row
    block of the hidden layer's rcr_wgmma_kernel launch, its kRcrSmooth epilogue, m64n128k16: s / 2
    <= 128 here), else cuBLAS and rcr_smooth_kernel.
    Shapes: s = 256, d = 1024 (K 256 and 512: 4 and 8 chunks of 64, both buffers reused), 16 x 35
    rows (5 row blocks of 128); s = 76, d = 300 (K not a multiple of 8: element loads, a partial
    chunk, partial column blocks)."""
    _wgmma_or_wmma(kernel, monkeypatch)
    ran = _kernels_run(lambda: [rcr_op_matches_torch_step("cuda", "cuda", dtype, with_state, atol, d=d, s=s, B=B)
                                for d, s, B in ((1024, 256, 16), (300, 76, 1)) for with_state in (False, True)])
    want, other = ("rcr_wgmma_kernel", "rcr_gemm_kernel")[::1 if kernel == "wgmma" else -1]
    assert any(want in n for n in ran) and not any(other in n for n in ran), ran   # the kernel asked for ran
    # the temperatures: in the hidden layer's rcr_wgmma_kernel launch with wgmma, rcr_smooth_kernel without
    assert any("rcr_smooth_kernel" in n for n in ran) == (kernel == "wmma"), ran


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kernel", ["wgmma", "wmma"])
@pytest.mark.parametrize("backend", [_backend_param("cuda")])
def test_cuda_rcr_factors_bwd(backend, kernel, dtype, monkeypatch):
    """The CUDA rcr_factors_bwd op (RCR's recomputed backward's d-wide chain) against the chain in
    fp64 (test_rcr_recompute.factors_bwd_matches_the_chain; its CPU twin runs the extension's CPU
    op): 300 rows x d = 1024 from a hidden layer 512 wide (K = 2 s, s = 256), with and without F;
    fp16/bf16 the kRcrFactorsBwd epilogue of rcr_wgmma_kernel or rcr_gemm_kernel (the profile says
    which ran), fp32 cuBLAS and rcr_factors_bwd_kernel."""
    from test_rcr_recompute import factors_bwd_matches_the_chain
    if dtype == torch.float32 and kernel == "wgmma":
        pytest.skip("fp32 takes cuBLAS and rcr_factors_bwd_kernel either way")
    _wgmma_or_wmma(kernel, monkeypatch)
    tol = {torch.float16: dict(rtol=4e-3, atol=4e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
           torch.float32: dict(rtol=1e-4, atol=1e-5)}[dtype]
    fn = torch.ops.rcar_fast.rcr_factors_bwd.default
    ran = _kernels_run(lambda: [factors_bwd_matches_the_chain(fn, 300, 1024, dtype, with_f, tol, "cuda", h=512)
                                for with_f in (False, True)])
    if dtype == torch.float32:
        assert any("rcr_factors_bwd_kernel" in n for n in ran), ran
    else:
        want, other = ("rcr_wgmma_kernel", "rcr_gemm_kernel")[::1 if kernel == "wgmma" else -1]
        assert any(want in n for n in ran) and not any(other in n for n in ran), ran


@pytest.mark.parametrize("backend", [_backend_param("cuda")])
def test_cuda_backward_on_tensor_cores(backend):
    """The CUDA attention backward in bf16 (test_fused_ops.half_backward_matches_fp32: within 5% of
    its fp32 backward; dW and db the same with and without dF; Lq 6, Lc 9) takes the chunk's
    (Q - A)^2 from attention_fwd_tc_kernel in kModeSquaredDiff (mode 2) and its gradients from
    attention_bwd_tc_kernel (kModeAlignment), neither per-pair kernel; the chunks' rectangles and
    the tensor-core backward's gradients are checked in the emulator (test_backward_sqdiff_chunks,
    test_tensor_core_backward)."""
    from test_fused_ops import half_backward_matches_fp32
    ran = _kernels_run(lambda: half_backward_matches_fp32("cuda", "cuda", torch.bfloat16))
    assert any("attention_fwd_tc_kernel" in n and ", 2, false>" in n for n in ran), ran
    assert any("attention_bwd_tc_kernel" in n and ", 1>" in n for n in ran), ran
    assert not any("attention_fwd_kernel" in n and ", 2>" in n for n in ran), ran
    assert not any("attention_bwd_kernel" in n for n in ran), ran


@pytest.mark.parametrize("kernel", ["wgmma", "wmma"])
@pytest.mark.parametrize("backend", [_backend_param("cuda")])
def test_cuda_wgmma_kernels_in_a_flickr_block(backend, kernel, monkeypatch):
    """A Flickr-shaped block (t2i, coop_rcar T = 2, bf16; 400 captions of 6..24 words, about 21 of
    each length) within 2e-2 of the fp32 torch backend, with the wgmma kernels (RCR's GEMMs, the
    attention's and RAR's 128-row blocks, attention_fwd_wg_kernel and rar_fwd_wg_kernel) and with
    the wmma ones (attention_fwd_tc_kernel's 64- and 48-row blocks); the profile shows which ran."""
    _wgmma_or_wmma(kernel, monkeypatch)
    ran = _kernels_run(lambda: flickr_shaped_block("cuda", "cuda", torch.bfloat16, 6, 400))
    wg = {n for n in ran if "rcr_wgmma_kernel" in n or "attention_fwd_wg_kernel" in n or "rar_fwd_wg_kernel" in n
          or ("attention_fwd_tc_kernel" in n and ", true>" in n)}
    tc = {n for n in ran if "attention_fwd_tc_kernel" in n}
    if kernel == "wgmma":
        assert all(any(k in n for n in wg) for k in ("rcr_wgmma_kernel", "attention_fwd_wg_kernel",
                                                     "rar_fwd_wg_kernel")), ran
    else:
        assert not wg and tc, ran


#: the 128-row wgmma kernels' GPU checks: (the op, its cases in gpu_cases, the kernel taken with wgmma)
CASES_128 = {"attention": (attention_128_row_cases, "attention_fwd_wg_kernel"),
             "rar": (rar_128_row_cases, "rar_fwd_wg_kernel")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel", ["wgmma", "wmma"])
@pytest.mark.parametrize("op", sorted(CASES_128))
@pytest.mark.parametrize("backend", [_backend_param("cuda")])
def test_cuda_128_row_blocks(backend, op, kernel, dtype, monkeypatch):
    """The CUDA attention op with the projection and the rar op on the emulator's 128-row cases
    (tests/test_cuda_emu.py WG_CASES: BC 16 to 64, d 45 to 104, s 24 to 256, 128 pairs of one
    row; RAR_WG_CASES; NaN in the padding, F and lam or dropout or not) against the fp64
    reference with the emulator's tolerances: attention_fwd_wg_kernel / rar_fwd_wg_kernel (every
    product on wgmma, an H200 with an sm_90a build) or attention_fwd_tc_kernel / rar_fwd_kernel
    (RCAR_FAST_CUDA_WGMMA=0); the profile shows which ran."""
    cases, wg_kernel = CASES_128[op]
    _wgmma_or_wmma(kernel, monkeypatch)
    ran = _kernels_run(lambda: cases("cuda", "cuda", dtype))
    assert any(wg_kernel in n for n in ran) == (kernel == "wgmma"), ran


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel", ["wgmma", "wmma"])
@pytest.mark.parametrize("backend", [_backend_param("cuda")])
def test_cuda_rar_scores(backend, kernel, dtype, monkeypatch):
    """The CUDA rar_scores op (the scoring layer in rar_fwd_wg_kernel's last launch with wgmma; after
    rar_fwd_kernel in ATen without) against its rar op then the layer in torch (gpu_cases)."""
    _wgmma_or_wmma(kernel, monkeypatch)
    rar_scores_are_rar_then_the_layer("cuda", "cuda", dtype)


def _wgmma_or_wmma(kernel, monkeypatch):
    """RCAR_FAST_CUDA_WGMMA for the case; a wgmma case skips off a 9.0 device or a build without
    sm_90a code (and fails where the build is setup.py's default, 9.0a alone, without it)."""
    from rcar_fast import _C
    if kernel == "wgmma":
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("wgmma: a compute capability 9.0 device (H100/H200) only")
        info = _C.build_info()
        archs = {a.replace("+PTX", "") for a in info.get("cuda_archs", "").split(",")}
        assert info.get("wgmma") or not ("9.0a" in archs and "9.0" not in archs), info
        if not info.get("wgmma"):
            pytest.skip(f"wgmma: this build has no sm_90a code (archs {sorted(archs)})")
    monkeypatch.setenv("RCAR_FAST_CUDA_WGMMA", "1" if kernel == "wgmma" else "0")


def _kernels_run(fn):
    """The names of the rcar_fast CUDA kernels fn() launched (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "rcar_fast" in e.name or "_kernel<" in e.name}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", [_backend_param("triton")])
def test_triton_dw_gemm_sums_in_fp32(backend, dtype):
    """The Triton backward's dW GEMM on the GPU: torch.mm with an fp32 output from fp16/bf16
    operands (cuBLAS), the sum not rounded to the operands' dtype."""
    from test_fused_ops import triton_dw_gemm_sums_in_fp32
    triton_dw_gemm_sums_in_fp32("cuda", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_backward_matches_fp32(backend):
    """The attention backward op in bf16 on the GPU (the Triton backward's d2 scratch in dF's
    storage or its own, its dW GEMM with an fp32 output) against its fp32 backward."""
    from test_fused_ops import half_backward_matches_fp32
    half_backward_matches_fp32(backend, "cuda", torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_with_dropout(backend):
    training_step_with_dropout(backend, "cuda", Dims(8, 12, 36, 24, 256, 64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_selftest_passes(backend):
    selftest_passes(backend, "cuda")


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_within_budget(backend, attn_type):
    """max_memory_allocated of scoring and a training step under 4 and 16 MiB budgets, on a
    grid whose d-wide tensors are 64 MiB or more (slack 8 MiB: cuBLAS workspaces)."""
    memory_within_budget(backend, "cuda", attn_type, Dims(16, 64, 36, 16, 1024, 256), [4 << 20, 16 << 20],
                         slack=8 << 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_profile_finds_our_kernels(backend):
    """bench.profile on the 100 x 100 headline (bf16): the profiler's kernels of the attention
    and RAR are found by their names (not summed into "other"), each with time, and the call is
    timed (bench/profile.py's table; the device suite runs it on the Flickr30K matrix)."""
    from bench import profile
    lines = profile.profile_backend("headline", backend)
    rows = {ln.split("|")[3].strip(): [c.strip() for c in ln.split("|")[4:-1]] for ln in lines}
    for row in ("attention_fwd", "rar_fwd"):
        assert int(rows[row][0]) > 0 and float(rows[row][2]) > 0, rows
    assert float(rows["**the call (timed; model with launch costs)**"][2]) > 0, rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_rar_steps_in_one_call_equal_one_step_calls(backend):
    """bf16 on the GPU: T = 3 RAR steps in one call equal three calls of one step each, bit for
    bit (both backends keep h in the inputs' dtype between steps and compute each step's gate
    pre-activations h Wq^T + bq as one GEMM in it, as training's per-step calls and the
    backward's recompute run them); and close to the fp64 reference."""
    from test_fused_ops import (RAR_STEPS_TOL, _mixed_lengths, _ops, _rar_sample, rar_in_one_call_and_in_step_calls,
                                ref_rar)
    args = _rar_sample(torch.bfloat16, seed=21, T=3, dropout=False, h_given=False, P=11, Lq=5, s=32,
                       qlens=_mixed_lengths(11, 5, 5))
    gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    whole, h = rar_in_one_call_and_in_step_calls(_ops(backend)[2], gpu)
    assert whole.dtype == torch.bfloat16
    torch.testing.assert_close(whole, h, rtol=0, atol=0)
    up = [a.double().cpu() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    torch.testing.assert_close(whole.double().cpu(), ref_rar(*up), **RAR_STEPS_TOL[torch.bfloat16])
