"""Compile tier (no GPU needed): every Triton kernel configuration the launchers pick, and every
CUDA kernel of the extension (csrc/cuda), compiled for sm_80 and sm_90 by
`python -m bench.resources --backend triton|cuda --json` in a subprocess (the CPU tests run
under TRITON_INTERPRET=1, which replaces the GPU compiler, so the report runs without it).

Triton, asserted for every configuration (every kernel, dtype and launch option the launchers
pick for the standard shapes): it compiles; its shared memory fits the chip (A100 163 KB,
H100/H200 227 KB per block); ptxas reports no spills and no stack frame and the SASS has no
local-memory instructions (fp32 included); for bf16/fp16 the products lower to tensor-core
instructions (HMMA / HGMMA). fp32 is the exact parity path (IEEE FMA products, no tensor cores),
so it has none to check. Skipped without triton.

CUDA (nvcc -Xptxas -v and cuobjdump on each csrc/cuda/*.cu, compiled once per architecture):
every kernel compiles for both architectures, none spills or has a stack frame (any dtype),
static + dynamic shared memory of the launches the standard shapes get fits the chip, and the
fp16/bf16 instances of the block GEMM (fused projection, RAR keys) contain HMMA/HGMMA. Skipped
only without nvcc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_report(backend):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.resources", "--backend", backend, "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    rows = json.loads(lines[-1])
    assert rows, proc.stderr[-3000:]
    return rows


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    return _run_report("triton")


@pytest.fixture(scope="module")
def cuda_report():
    from bench.cuda_resources import find_nvcc
    if find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): compiling the CUDA kernels "
                    "needs the CUDA toolkit")
    return _run_report("cuda")


def _name(r):
    return f"{r['kernel']} {r['dtype']} {r['arch']} {r['config']} warps={r['num_warps']} stages={r['num_stages']}"


def test_every_configuration_compiles(report):
    assert {r["backend"] for r in report} == {"triton"}
    failed = [f"{_name(r)}: {r.get('error')}" for r in report if not r["compiled"]]
    assert not failed, "\n".join(failed)
    assert {r["arch"] for r in report} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in report} == {"attention_fwd", "attention_bwd", "attention_bwd_scores",
                                             "rar_fwd", "rar_bwd"}


def test_shared_memory_fits_the_chip(report):
    over = [f"{_name(r)}: {r['shared']} > {r['shared_limit']}" for r in report if not r["shared_ok"]]
    assert not over, "\n".join(over)


def test_no_spills_or_stack(report):
    """Every kernel, every dtype (fp32 included), both architectures: no spill stores or loads,
    no stack frame, no local-memory instructions in the SASS."""
    bad = [f"{_name(r)}: spill {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B, "
           f"LDL/STL {r['ldl']}/{r['stl']}" for r in report
           if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["ldl"] or r["stl"]]
    assert not bad, "\n".join(bad)


def test_half_precision_uses_tensor_cores(report):
    bad = [_name(r) for r in report if r["dtype"] != "fp32" and r["hmma"] + r["hgmma"] == 0]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- CUDA kernels

CUDA_KERNELS = {"gram_kernel", "attention_fwd_kernel", "attention_bwd_kernel", "l2n_bwd_rows_kernel",
                "rar_fwd_kernel", "rar_bwd_kernel"}


def _cuda_name(r):
    return f"{r['instance']} {r['arch']}"


def test_cuda_every_kernel_compiles_for_both_archs(cuda_report):
    assert {r["backend"] for r in cuda_report} == {"cuda"}
    failed = [f"{_cuda_name(r)}: {r.get('error')}" for r in cuda_report if not r["compiled"]]
    assert not failed, "\n".join(failed)
    per_arch = {a: {r["instance"] for r in cuda_report if r["arch"] == a} for a in ("sm_80", "sm_90")}
    assert per_arch["sm_80"] == per_arch["sm_90"], per_arch["sm_80"] ^ per_arch["sm_90"]
    assert {r["kernel"] for r in cuda_report} == CUDA_KERNELS
    for kernel in CUDA_KERNELS:   # every kernel in every dtype
        assert {r["dtype"] for r in cuda_report if r["kernel"] == kernel} == {"fp32", "fp16", "bf16"}, kernel
    # each arch launches something for the standard shapes from every kernel
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in cuda_report if r["arch"] == arch and r["launched"]} == CUDA_KERNELS


def test_cuda_no_spills(cuda_report):
    bad = [f"{_cuda_name(r)}: spill {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B, "
           f"LDL/STL {r['ldl']}/{r['stl']}" for r in cuda_report
           if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["ldl"] or r["stl"]]
    assert not bad, "\n".join(bad)


def test_cuda_shared_memory_fits_the_chip(cuda_report):
    over = [f"{_cuda_name(r)}: {r['shared']} > {r['shared_limit']} ({r['config']})" for r in cuda_report
            if not r["shared_ok"]]
    assert not over, "\n".join(over)


def test_cuda_half_precision_projection_uses_tensor_cores(cuda_report):
    gemm = [r for r in cuda_report if r["tensor_core_gemm"]]
    # the fused projection and RAR's keys, fp16 and bf16, on both archs
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in gemm} == {
        (k, dt, a) for k in ("attention_fwd_kernel", "rar_fwd_kernel", "rar_bwd_kernel")
        for dt in ("fp16", "bf16") for a in ("sm_80", "sm_90")}
    bad = [_cuda_name(r) for r in gemm if r["hmma"] + r["hgmma"] == 0]
    assert not bad, "\n".join(bad)
