"""bench/profile.py (measured kernel time against the cost model, per row) on recorded events:
the rules that sum kernels into rows name real kernels of kernels/ and csrc/cuda, every launch of
the model lands in a row the profiled kernels can reach, the sums and the table, and the CLI
without a GPU. The profiled run itself needs a CUDA device (tests/test_gpu.py)."""

from __future__ import annotations

import glob
import os
import re
from types import SimpleNamespace

import pytest
import torch

from bench import profile
from bench.roofline import MODELS, SHAPES, model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: names as a profiler reports them (Triton: the jit function; the extension: demangled C++;
#: cuBLAS and ATen: their own), with the row each belongs to
RECORDED = [
    ("_attention_fwd_kernel", "attention_fwd"),
    ("_rcr_hidden_kernel", "rcr_hidden"),
    ("_rcr_factors_gemm_kernel", "rcr_factors_gemm"),
    ("_rar_fwd_kernel", "rar_fwd"),
    ("_gram_kernel", "gram"),
    ("void rcar_fast::cuda::(anonymous namespace)::attention_fwd_tc_kernel<__nv_bfloat16, 4>(...)", "attention_fwd"),
    ("void rcar_fast::cuda::(anonymous namespace)::rcr_factors_kernel<__nv_bfloat16>(...)", "rcr_factors_kernel"),
    ("void rcar_fast::cuda::(anonymous namespace)::rcr_gemm_kernel<__nv_bfloat16, 1>(...)", "rcr_gemm_kernel"),
    ("void rcar_fast::cuda::(anonymous namespace)::rar_fwd_kernel<__nv_bfloat16, 2>(...)", "rar_fwd"),
    ("void rcar_fast::cuda::(anonymous namespace)::rar_fwd_wg_kernel<__nv_bfloat16>(...)", "rar_fwd"),
    ("void rcar_fast::cuda::(anonymous namespace)::attention_fwd_wg_kernel<__nv_bfloat16, 48>(...)", "attention_fwd"),
    ("void rcar_fast::cuda::(anonymous namespace)::rar_mean_kernel<__nv_bfloat16>(...)", "rar_mean_kernel"),
    ("void rcar_fast::cuda::(anonymous namespace)::gram_kernel<__nv_bfloat16>(...)", "gram"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", "library GEMMs"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_coopA_NTN", "library GEMMs"),
    ("void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false>(...)", "library GEMMs"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::sigmoid_kernel_cuda(...)>(...)", "other"),
    ("void at::native::index_put_kernel_impl<...>(...)", "other"),
    ("void at::native::reduce_kernel<512, 1, ...>(...)", "other"),
]


@pytest.mark.parametrize("name,row", RECORDED, ids=[r for _, r in RECORDED])
def test_kernel_names_land_in_their_rows(name, row):
    assert profile.kernel_row(name) == row


def test_the_rules_name_real_kernels():
    """Each kernel ROW_RULES names by its own name exists: a @triton.jit function of kernels/ (the
    profiler reports it by that name) or a __global__ function of csrc/cuda. A renamed kernel
    would otherwise land in "other" without a word."""
    from rcar_fast.backends.triton_kernels import load_kernels
    k = load_kernels()
    for name in ("_attention_fwd_kernel", "_rcr_hidden_kernel", "_rcr_factors_gemm_kernel", "_rar_fwd_kernel",
                 "_gram_kernel"):
        module = next(m for m in (k.attention, k.rcr, k.rar) if hasattr(m, name))
        assert profile.kernel_row(name) != profile.OTHER and callable(getattr(module, name))
    cuda = "".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu*")))
    globals_ = set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(", cuda))
    for name in ("attention_fwd_tc_kernel", "attention_fwd_wg_kernel", "attention_fwd_kernel", "rcr_factors_kernel",
                 "rcr_gemm_kernel", "rcr_wgmma_kernel", "rar_fwd_kernel", "rar_fwd_wg_kernel", "rar_mean_kernel",
                 "gram_kernel"):
        assert name in globals_, (name, sorted(globals_))
        assert profile.kernel_row(f"void rcar_fast::cuda::{name}<float>(...)") != profile.OTHER


@pytest.mark.parametrize("backend", sorted(MODELS))
@pytest.mark.parametrize("shape", ["flickr30k", "headline"])
def test_every_model_launch_lands_in_a_reachable_row(shape, backend):
    """The model's launch names go to rows a profiled kernel can also reach (ROW_RULES' rows or
    "other"), our kernels to their own, and the rows' sums keep every launch and the model's
    time less its launch costs."""
    from bench.roofline import LAUNCH_S
    book = model(backend, SHAPES[shape])
    reachable = {row for _, row in profile.ROW_RULES} | {profile.OTHER}
    for name in book.launches:
        assert profile.model_row(name) in reachable, name
    own = {n for n in book.launches if n.startswith(("attention_fwd", "rcr_factors_gemm", "rcr_hidden", "rar_fwd",
                                                      "gram", "rcr_factors_kernel", "rcr_gemm_kernel",
                                                      "rar_mean_kernel"))}
    assert all(profile.model_row(n) not in ("library GEMMs", profile.OTHER) for n in own)
    assert all(profile.model_row(n) == "library GEMMs" for n in book.launches if "(cuBLAS)" in n and n not in own)
    assert any("(cuBLAS)" in n for n in book.launches)
    if backend != "torch":
        assert own, "the fused backends' own kernels are modelled by name"
    rows = profile.predicted_rows(book)
    assert sum(n for n, _ in rows.values()) == sum(ln.count for ln in book.launches.values())
    want = book.seconds() - LAUNCH_S * sum(ln.count for ln in book.launches.values())
    assert sum(s for _, s in rows.values()) == pytest.approx(want, rel=1e-12)


def test_measured_rows_sum_the_events_and_the_table_totals():
    events = [("_attention_fwd_kernel", 1000.0), ("_attention_fwd_kernel", 500.0), ("_rar_fwd_kernel", 250.0),
              ("nvjet_tst_128x64", 40.0), ("void at::native::vectorized_elementwise_kernel<4>(...)", 10.0)]
    got = profile.measured_rows(events)
    assert got == {"attention_fwd": (2, pytest.approx(1.5e-3)), "rar_fwd": (1, pytest.approx(2.5e-4)),
                   "library GEMMs": (1, pytest.approx(4e-5)), "other": (1, pytest.approx(1e-5))}
    predicted = {"attention_fwd": (2, 1e-3), "gram": (1, 1e-4)}
    lines = profile.table("headline", "triton", got, predicted, 2e-3, 1.25e-3)
    rows = {ln.split("|")[3].strip(): [c.strip() for c in ln.split("|")[4:-1]] for ln in lines}
    assert rows["attention_fwd"] == ["2", "2", "1.50", "1.00", "x1.50"]
    assert rows["gram"] == ["0", "1", "0.00", "0.10", "-"]         # predicted, not measured
    assert rows["rar_fwd"] == ["1", "0", "0.25", "0.00", "-"]      # measured, not predicted
    assert rows["**kernels, summed**"] == ["5", "3", "1.80", "1.10", "x1.64"]
    assert rows["**the call (timed; model with launch costs)**"][2:] == ["2.00", "1.25", "x1.60"]
    assert lines[0].split("|")[3].strip() == "attention_fwd"        # the model's largest first


def test_kernel_events_keep_device_kernels_only():
    from torch.autograd import DeviceType

    def ev(name, dev, us):
        return SimpleNamespace(name=name, device_type=dev, time_range=SimpleNamespace(elapsed_us=lambda: us))
    annotation = ev("rcar_fast::triton_rar", DeviceType.CUDA, 40)
    annotation.is_user_annotation = True
    prof = SimpleNamespace(events=lambda: [ev("_rar_fwd_kernel", DeviceType.CUDA, 12), ev("aten::mm", DeviceType.CPU, 99),
                                           ev("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA, 5),
                                           ev("Memset (Device)", DeviceType.CUDA, 1), annotation])
    assert profile.kernel_events(prof) == [("_rar_fwd_kernel", 12.0)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cli_without_a_gpu_says_so(capsys):
    assert profile.main(["--backends", "triton"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_cli_rejects_unknown_backends_and_training_shapes(capsys):
    assert profile.main(["--backends", "triton,nope"]) == 2
    assert "--backends: unknown nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile.main(["--shape", "train"])
