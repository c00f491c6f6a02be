"""Compile tier (no GPU needed): every Triton kernel configuration the launchers pick, compiled
for sm_80 and sm_90 by `python -m bench.resources --json` in a subprocess (the CPU tests run
under TRITON_INTERPRET=1, which replaces the GPU compiler, so the report runs without it).

Asserted for every configuration: it compiles, and its shared memory fits the chip (A100 163 KB,
H100/H200 227 KB per block). For bf16/fp16, the dtypes that run at speed: the products lower to
tensor-core instructions (HMMA / HGMMA), and the forward kernels have no spills or stack frame.
The backward kernels still spill: that is a strict xfail, not a pass. fp32 is the
exact parity path (IEEE products, no tensor cores); its spills are reported, not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.resources", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows, proc.stderr[-2000:]
    return rows


def _name(r):
    return f"{r['kernel']} {r['dtype']} {r['arch']} {r['config']} warps={r['num_warps']}"


def test_every_configuration_compiles(report):
    failed = [f"{_name(r)}: {r.get('error')}" for r in report if not r["compiled"]]
    assert not failed, "\n".join(failed)
    assert {r["arch"] for r in report} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in report} == {"attention_fwd", "attention_bwd", "rar_fwd", "rar_bwd"}


def test_shared_memory_fits_the_chip(report):
    over = [f"{_name(r)}: {r['shared']} > {r['shared_limit']}" for r in report if not r["shared_ok"]]
    assert not over, "\n".join(over)


def _spills(report, kernels):
    return [f"{_name(r)}: spill {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B"
            for r in report if r["kernel"] in kernels and r["dtype"] != "fp32"
            and (r["spill_stores"] or r["spill_loads"] or r["stack"])]


def test_half_precision_forward_has_no_spills(report):
    bad = _spills(report, ("attention_fwd", "rar_fwd"))
    assert not bad, "\n".join(bad)


@pytest.mark.xfail(strict=True, reason="known: the attention backward kernel spills in bf16/fp16 "
                   "(up to ~1.8 KB on sm_80), and the RAR backward at 64 query rows with dropout "
                   "(bench/results/resources.md); their live state must shrink. strict: this "
                   "fails once the spills are gone, to be turned into a check")
def test_half_precision_backward_has_no_spills(report):
    bad = _spills(report, ("attention_bwd", "rar_bwd"))
    assert not bad, "\n".join(bad)


def test_half_precision_uses_tensor_cores(report):
    bad = [_name(r) for r in report if r["dtype"] != "fp32" and r["hmma"] + r["hgmma"] == 0]
    assert not bad, "\n".join(bad)
