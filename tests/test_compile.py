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

Compile cache (bench/results/resources.json; bench/resources.py explains the keys): the report
runs with --json, which reuses a committed row only when its key (the kernel's jit source hashes,
configuration, compiler versions; for CUDA the .cu and its csrc headers, arch, flags, nvcc) equals
the key computed from the tree now, and compiles every other row. Every assertion above still
runs on every row, reused or compiled, and every row's key is checked against the current tree
here (the configurations from the launchers, the jit sources re-read from disk), so a stale
row cannot pass. The key and lookup tests at the end need no compiler and take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_report(backend):
    """The --json rows of one backend: cached rows whose key matches the tree now, the rest compiled
    (--json only reads the cache file)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # its own session, so that a timeout ends the report's compile workers too (not only the report)
    proc = subprocess.Popen([sys.executable, "-m", "bench.resources", "--backend", backend, "--json"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    lines = stdout.strip().splitlines()
    assert lines, stderr[-3000:]
    rows = json.loads(lines[-1])
    assert rows, stderr[-3000:]
    print("\n".join(ln for ln in stderr.splitlines() if ln.startswith("compile cache")))
    return rows


def _jit_entry_from_disk(qualname):
    """What a Triton key should hold for ``qualname`` (rcar_fast.kernels.<module>.<name>), read
    from the file on disk: the SHA-256 of a function's text (decorators to its last line,
    dedented), or the repr of a constant's value (tl.constexpr(v) or a literal)."""
    import ast
    import textwrap
    parts = qualname.split(".")
    assert parts[:2] == ["rcar_fast", "kernels"] and len(parts) == 4, qualname
    path = os.path.join(ROOT, "kernels", parts[2] + ".py")
    with open(path) as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == parts[3]:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            src = textwrap.dedent("".join(lines[start - 1:node.end_lineno]))
            return hashlib.sha256(src.encode()).hexdigest()
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == parts[3] for t in node.targets):
            v = node.value
            if isinstance(v, ast.Call):       # tl.constexpr(value)
                v = v.args[0]
            try:
                return repr(ast.literal_eval(v))
            except ValueError:                # a name imported from elsewhere: its value
                import importlib
                value = getattr(importlib.import_module(".".join(parts[:3])), parts[3])
                return repr(getattr(value, "value", value))
        if isinstance(node, ast.ImportFrom) and node.level == 1 and any(a.name == parts[3] for a in node.names):
            return _jit_entry_from_disk(f"rcar_fast.kernels.{node.module}.{parts[3]}")
    raise AssertionError(f"{qualname}: not found in {path}")


def _sha256(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


#: the compile report of the triton the GPU machine runs (the device tool's H200: torch 2.11,
#: triton 3.6), committed: bench/README.md says how to regenerate it with triton 3.6's wheel
TRITON36_CACHE = os.path.join(ROOT, "bench", "results", "resources_triton36.json")


def _triton36_report():
    """The rows of every configuration the launchers pick now, read from TRITON36_CACHE under the
    key each would have with triton 3.6 (its compiler as the file records it): nothing is compiled
    here (the installed triton is another version), so a configuration whose kernel source,
    constants, launch or measuring code changed since the file was written comes back as a row
    that did not compile, and test_every_configuration_compiles names it."""
    from bench import resources
    cached = resources.load_cache(TRITON36_CACHE)
    assert cached, f"{TRITON36_CACHE}: no rows (bench/README.md: the triton 3.6 compile report)"
    compilers = {resources.canonical(r["key"]["compiler"]) for r in cached}
    assert len(compilers) == 1, f"{TRITON36_CACHE}: rows of several compilers: {sorted(compilers)}"
    compiler = cached[0]["key"]["compiler"]
    assert compiler["triton"].startswith("3.6."), compiler
    rows, _ = resources.triton_rows([80, 90], cached, 1, compiler=compiler, compile_missing=False)
    return rows


@pytest.fixture(scope="module", params=["installed", "triton36"])
def report(request):
    """The Triton compile report: compiled now by the installed triton (cached rows reused), and
    triton 3.6's (the GPU machine's), read from its committed cache; every test below asserts on
    both."""
    pytest.importorskip("triton")
    if request.param == "triton36":
        return _triton36_report()
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
    assert {r["kernel"] for r in report} == {"gram", "attention_fwd", "attention_bwd", "attention_bwd_scores",
                                             "rar_fwd", "rar_bwd", "rcr_hidden", "rcr_factors_gemm",
                                             "rcr_factors_bwd"}


def test_shared_memory_fits_the_chip(report):
    over = [f"{_name(r)}: {r['shared']} > {r['shared_limit']}" for r in report if not r["shared_ok"]]
    assert not over, "\n".join(over)


def test_every_block_fits_an_sm(report):
    """At least one block of every configuration fits one SM: its registers times its threads
    within the 64K registers, its shared memory within the SM's (a kernel that compiles without
    spills can still be unlaunchable: 16 warps at 255 registers a thread need 130K registers)."""
    bad = [f"{_name(r)}: {r['registers']} registers x {32 * r['num_warps']} threads, {r['shared']} B shared"
           for r in report if r["warps_per_sm"] < r["num_warps"]]
    assert not bad, "\n".join(bad)


def _spills(r):
    return r["spill_stores"] or r["spill_loads"] or r["stack"] or r["ldl"] or r["stl"]


def test_no_spills_or_stack(report):
    """Every kernel, every dtype (fp32 included), both architectures, triton 3.6's report too: no
    spill stores or loads, no stack frame, no local-memory instructions in the SASS."""
    bad = [f"{_name(r)}: spill {r['spill_stores']}/{r['spill_loads']} B, stack {r['stack']} B, "
           f"LDL/STL {r['ldl']}/{r['stl']}" for r in report if _spills(r)]
    assert not bad, "\n".join(bad)


def test_half_precision_uses_tensor_cores(report):
    """Every bf16/fp16 launch has tensor-core instructions (RAR's mean of E, once a launch of
    sums only, is now a product on chip in step 0's program: FIRST)."""
    bad = [_name(r) for r in report if r["dtype"] != "fp32" and r["hmma"] + r["hgmma"] == 0]
    assert not bad, "\n".join(bad)


def test_fp32_products_are_exact_and_atomics_relaxed(report):
    """No tf32 matrix product anywhere (every product of fp32 operands is meant to be exact:
    input_precision "ieee", e.g. the norm's P G in the bf16 kernels), and no atomic with an
    ordering stronger than relaxed (the adds into shared gradients commute)."""
    bad = [f"{_name(r)}: tf32 {r['tf32']}, ordered atomics {r['ordered_atomics']}" for r in report
           if r["tf32"] or r["ordered_atomics"]]
    assert not bad, "\n".join(bad)


def test_launches_recorded_with_the_jits_specialisation():
    """The report's Triton jobs are the launches the launchers make (recorded, not run), each
    specialised as triton's JIT does at run time: every kernel is launched; unit strides are
    constants, d and the tensors' addresses divisible by 16, a pair count of 11 is not, a float
    stays fp32; the grouped forward's tiles are the chooser's, with several programs per context
    item (their count and pairs per program not constants), at row counts that are multiples of
    16 and one (36) that is not."""
    pytest.importorskip("triton")
    from bench.kernel_configs import D, DTYPES, P_ITEMS, S, STANDARD_SHAPES, _module, recorded_launches
    launches = recorded_launches()
    assert all(launches.values()), [k for k, v in launches.items() if not v]
    assert P_ITEMS % 16
    att = _module("attention")
    grouped = [(c, ln["specialization"]) for d, c, ln in launches["attention_fwd"] if d == "bf16" and c["PACKED"]]
    assert grouped and {c["M"] for c, _ in grouped} == \
        {att.forward_config(True, Lq, Lc, D, S, att.MODE_ALIGNMENT.value, grouped=True)["M"] for Lq, Lc in STANDARD_SHAPES}
    assert all(sp["NG"] == "i32" and sp["GP"] == "i32" for _, sp in grouped)
    assert {sp["LQ"] for _, sp in grouped} == {"i32", "i32:16"}     # 36 regions (i2t) and 16, 32, 64 words
    spec = grouped[0][1]
    assert (spec["sq_d"], spec["sc_d"], spec["so_x"]) == ("=1", "=1", "=1")
    assert (spec["D"], spec["q_ptr"], spec["P"], spec["lam_scalar"]) == ("i32:16", "*bf16:16", "i32", "fp32")
    for dtype in DTYPES:        # each dtype's launches take tensors of that dtype; fp32 the exact products
        rows = [(c, ln["specialization"]) for d, c, ln in launches["attention_fwd"] if d == dtype]
        assert rows and all(sp["q_ptr"] == f"*{dtype}:16" and c["IEEE"] == (dtype == "fp32") for c, sp in rows)


def test_every_row_is_keyed_by_the_current_tree(report, request):
    """One row per configuration the launchers pick now, each under the key computed now: a row
    reused from the cache under an older kernel source, configuration, measuring code or compiler
    version would carry another key (triton 3.6's report: that compiler, as its file records it).
    The jit sources and constants are read again from the files on disk here (with ast, not
    through the imported functions)."""
    from bench import resources
    kernels = resources._kernels()
    compiler = None
    if request.node.callspec.params["report"] == "triton36":
        compiler = report[0]["key"]["compiler"]
        assert compiler["triton"].startswith("3.6.") and all(compiler.values()), compiler
    key_of = resources.triton_key_maker(kernels, compiler)
    expected = sorted(resources.canonical(key_of(job)) for job in resources.jobs([80, 90], kernels))
    assert sorted(resources.canonical(r["key"]) for r in report) == expected
    disk = {}       # each jit function or constant read from its file once (882 rows name the same few)
    for r in report:
        k = r["key"]
        assert r["cache"] in ("reused", "compiled"), _name(r)
        assert (k["backend"], k["kernel"], k["dtype"], k["arch"]) == (r["backend"], r["kernel"], r["dtype"], r["arch"])
        assert (k["launch"]["num_warps"], k["launch"]["num_stages"], k["launch"]["maxnreg"]) == \
            (r["num_warps"], r["num_stages"], r["maxnreg"]), _name(r)
        assert dict(kv.split("=") for kv in r["config"].split(",")) == \
            {a: str(b) for a, b in k["constexprs"].items()}, _name(r)
        for qualname, digest in k["sources"].items():
            if qualname not in disk:
                disk[qualname] = _jit_entry_from_disk(qualname)
            assert disk[qualname] == digest, f"{_name(r)}: {qualname} changed"


# ----------------------------------------------------------------------------- CUDA kernels

CUDA_KERNELS = {"gram_kernel", "attention_fwd_kernel", "attention_fwd_tc_kernel", "attention_fwd_wg_kernel",
                "rar_fwd_wg_kernel", "attention_bwd_kernel", "attention_bwd_tc_kernel",
                "l2n_bwd_rows_kernel", "rar_mean_kernel", "rar_fwd_kernel", "rar_bwd_kernel",
                "rcr_factors_kernel", "rcr_factors_bwd_kernel", "rcr_smooth_kernel", "rcr_gemm_kernel",
                "rcr_wgmma_kernel"}
#: kernels with fp16/bf16 instances only (fp32 runs attention_fwd_kernel's exact SIMT products,
#: and cuBLAS with rcr_factors_kernel for RCR)
HALF_ONLY = {"attention_fwd_tc_kernel", "attention_fwd_wg_kernel", "attention_bwd_tc_kernel", "rar_fwd_wg_kernel",
             "rcr_gemm_kernel", "rcr_wgmma_kernel"}
#: kernels with code for sm_90a only (wgmma), a trap in the sm_80 build, launched on sm_90 alone
SM90A_ONLY = {"rcr_wgmma_kernel", "attention_fwd_wg_kernel", "rar_fwd_wg_kernel"}
#: kernels with an fp32 instance only (fp16/bf16 take RCR's chains, forward and backward, in
#: rcr_gemm_kernel's epilogues)
FP32_ONLY = {"rcr_factors_kernel", "rcr_factors_bwd_kernel"}


def _cuda_name(r):
    return f"{r['instance']} {r['arch']}"


def test_cuda_every_kernel_compiles_for_both_archs(cuda_report):
    assert {r["backend"] for r in cuda_report} == {"cuda"}
    failed = [f"{_cuda_name(r)}: {r.get('error')}" for r in cuda_report if not r["compiled"]]
    assert not failed, "\n".join(failed)
    per_arch = {a: {r["instance"] for r in cuda_report if r["arch"] == a} for a in ("sm_80", "sm_90")}
    assert per_arch["sm_80"] == per_arch["sm_90"], per_arch["sm_80"] ^ per_arch["sm_90"]
    assert {r["kernel"] for r in cuda_report} == CUDA_KERNELS
    for kernel in CUDA_KERNELS:   # every kernel in every dtype it is for
        want = {"fp16", "bf16"} if kernel in HALF_ONLY else ({"fp32"} if kernel in FP32_ONLY else {"fp32", "fp16", "bf16"})
        assert {r["dtype"] for r in cuda_report if r["kernel"] == kernel} == want, kernel
    # each arch launches something for the standard shapes from every kernel it has code for
    assert {r["kernel"] for r in cuda_report if r["arch"] == "sm_90" and r["launched"]} == CUDA_KERNELS
    assert {r["kernel"] for r in cuda_report if r["arch"] == "sm_80" and r["launched"]} == CUDA_KERNELS - SM90A_ONLY


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
    # the fused projection, RAR's keys and RCR's GEMMs, fp16 and bf16, on both archs
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in gemm} == {
        (k, dt, a) for k in ("attention_fwd_kernel", "attention_fwd_tc_kernel", "attention_bwd_tc_kernel",
                             "rar_fwd_kernel", "rar_bwd_kernel", "rcr_gemm_kernel")
        for dt in ("fp16", "bf16") for a in ("sm_80", "sm_90")} | {
        (k, dt, "sm_90") for k in ("rcr_wgmma_kernel", "attention_fwd_wg_kernel", "rar_fwd_wg_kernel")
        for dt in ("fp16", "bf16")}
    bad = [_cuda_name(r) for r in gemm if r["hmma"] + r["hgmma"] == 0]
    assert not bad, "\n".join(bad)


def test_cuda_wgmma_kernels_fence_and_wait(cuda_report):
    """Every instance with HGMMA (sm_90) has the ordering wgmma needs in its SASS (wgmma.cuh), which
    the emulator cannot check: FENCE.VIEW.ASYNC.S (fence.proxy.async after the operands' ordinary
    stores), WARPGROUP.ARRIVE (wgmma.fence) and WARPGROUP.DEPBAR (wgmma.wait_group)."""
    wg = [r for r in cuda_report if r["compiled"] and r["hgmma"] > 0]
    assert {r["kernel"] for r in wg} == {"rcr_wgmma_kernel", "attention_fwd_tc_kernel", "attention_fwd_wg_kernel",
                                         "rar_fwd_wg_kernel"}
    bad = [f"{_cuda_name(r)}: {r['fence_async']}/{r['wg_arrive']}/{r['wg_depbar']}, {r['wg_order_bad']} HGMMA out of order"
           for r in wg if not (r["fence_async"] and r["wg_arrive"] and r["wg_depbar"]) or r["wg_order_bad"]]
    assert not bad, "\n".join(bad)


def test_cuda_wgmma_order_check_reads_sass():
    """cuda_resources.wgmma_order_violations on hand-written SASS: the staged, fenced, waited order
    passes; a fence after the barrier, no wgmma.fence, or no wait before the next barrier fail."""
    from bench.cuda_resources import wgmma_order_violations as check

    def sass(*ops):
        return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(ops))
    good = ["STS.128 [R1], R4", "MEMBAR.ALL.CTA", "FENCE.VIEW.ASYNC.S", "BAR.SYNC.DEFER_BLOCKING 0x0",
            "WARPGROUP.ARRIVE", "HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24, gsb0",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", "BAR.SYNC.DEFER_BLOCKING 0x0"]
    assert check(sass(*good)) == 0
    assert check(sass(*good[:2], good[3], good[2], *good[4:])) == 1            # fence after the barrier
    assert check(sass(*good[:4], *good[5:])) == 1                              # no wgmma.fence
    assert check(sass(*good[:6], good[7], good[6])) == 1                       # wait after the barrier
    assert check(sass("@!P0 " + good[0], *good[1:])) == 0                      # predicated stores parse


def test_cuda_wgmma_kernels_are_hgmma_on_sm90_and_a_trap_elsewhere(cuda_report):
    """The wgmma kernels' sm_90 (sm_90a) code runs Hopper's HGMMA and no HMMA; compiled for sm_80
    they hold no tensor-core instruction and are never launched there (launch.h use_wgmma). The
    attention forward's wgmma instances likewise launch on sm_90 alone."""
    for kernel in SM90A_ONLY:
        rows = [r for r in cuda_report if r["kernel"] == kernel]
        on90 = [r for r in rows if r["arch"] == "sm_90"]
        assert on90 and all(r["hgmma"] > 0 and r["hmma"] == 0 for r in on90), [(_cuda_name(r), r["hgmma"]) for r in on90]
        on80 = [r for r in rows if r["arch"] == "sm_80"]
        assert on80 and all(r["hgmma"] + r["hmma"] == 0 and not r["launched"] for r in on80)
    # the attention forward's wgmma projection instances (WG true: kModeAlignment, MT 4): HGMMA for
    # the projection and HMMA for the scores and P C on sm_90, launched there alone
    wg = [r for r in cuda_report if r["kernel"] == "attention_fwd_tc_kernel" and r["instance"].endswith(", true>")]
    assert {(r["dtype"], r["arch"]) for r in wg} == {(dt, a) for dt in ("fp16", "bf16") for a in ("sm_80", "sm_90")}
    for r in wg:
        assert r["instance"].endswith(", 4, 1, true>"), r["instance"]
        if r["arch"] == "sm_90":
            assert r["hgmma"] > 0 and r["hmma"] > 0 and r["launched"], _cuda_name(r)
        else:
            assert not r["launched"], _cuda_name(r)


def test_cuda_every_row_is_keyed_by_the_current_tree(cuda_report):
    """Every compiled row carries the key of its .cu x arch computed now (sources re-read from
    disk), and every .cu x arch has rows."""
    from bench import cuda_resources as cr
    nvcc = cr.find_nvcc()
    tools = cr.toolchain(nvcc, cr.find_cuobjdump(nvcc))
    import glob
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(cr.CSRC, "cuda", "*.cu")))
    expected = {(src, f"sm_{cc}"): cr.unit_key(os.path.join(ROOT, src), cc, tools)
                for src in sources for cc in (80, 90)}
    compiled = [r for r in cuda_report if r["compiled"]]
    assert {(r["source"], r["arch"]) for r in compiled} == set(expected)
    for r in compiled:
        assert r["cache"] in ("reused", "compiled"), _cuda_name(r)
        assert r["key"] == expected[(r["source"], r["arch"])], _cuda_name(r)
        for rel, digest in r["key"]["sources"].items():
            assert _sha256(rel) == digest, f"{_cuda_name(r)}: {rel} changed"


# ----------------------------------------------------------------------------- the cache's keys (fast)

def _fake_compiler(calls):
    def compile_many(items):
        calls.extend(items)
        return [f"compiled {it}" for it in items]
    return compile_many


def test_cache_lookup_reuses_only_matching_keys():
    """A row whose stored key differs from the one computed now (stale), a row absent from the
    cache and a failed row are compiled; only the exact key is reused."""
    from bench.resources import reuse_or_compile
    key_of = lambda it: {"item": it, "source": f"hash-{it}"}   # noqa: E731
    cached = [dict(key=key_of("a"), compiled=True, registers=1),
              dict(key={"item": "b", "source": "hash-of-an-older-b"}, compiled=True, registers=2),
              dict(key=key_of("d"), compiled=False, error="failed")]
    calls = []
    out = reuse_or_compile(["a", "b", "c", "d"], key_of, cached, _fake_compiler(calls))
    assert calls == ["b", "c", "d"]
    assert [k for k, _, _ in out] == [key_of(it) for it in "abcd"]
    assert out[0][1] == [cached[0]] and out[0][2] is None
    assert [res for _, hit, res in out[1:]] == ["compiled b", "compiled c", "compiled d"]
    assert all(hit is None for _, hit, _ in out[1:])
    calls.clear()
    reuse_or_compile(["a"], key_of, cached, _fake_compiler(calls), usable=lambda rows: False)
    assert calls == ["a"]


def test_kernel_keys_cover_their_jit_code():
    """Each kernel's key holds its own @triton.jit function and every @triton.jit function of
    kernels/ whose name is called in the source of a function in the key (read here with a
    regex over the files, apart from the key's own walk of the names)."""
    pytest.importorskip("triton")
    from bench import resources
    defs = {}
    for fname in sorted(os.listdir(os.path.join(ROOT, "kernels"))):
        if fname.endswith(".py"):
            with open(os.path.join(ROOT, "kernels", fname)) as f:
                text = f.read()
            for m in re.finditer(r"@triton\.jit\s*\ndef (\w+)\((.*?)\n(?=\S)", text, re.S):
                defs[m.group(1)] = m.group(0)
    assert len(defs) >= 10, defs.keys()
    for kname, srcs in resources.kernel_sources(resources._kernels()).items():
        names = {n.rsplit(".", 1)[-1] for n in srcs}
        assert any(n.endswith("_kernel") for n in names), kname
        for n in names & set(defs):
            for callee in re.findall(r"\b(_\w+)\(", defs[n]):
                if callee in defs and callee != n:
                    assert callee in names, (kname, n, callee)


_SYNTHETIC = """
import triton
import triton.language as tl

SCALE = tl.constexpr({scale})


@triton.jit
def _helper(x):
    return x * {factor}


@triton.jit
def _unused(x):
    return x + {unused}


@triton.jit
def _kernel(ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(ptr + offs, _helper(tl.load(ptr + offs)) * SCALE)


def launcher(x):
    return {launcher}
{tail}"""


def _synthetic_key(tmp_path, tag, **edit):
    """jit_sources of a small kernel module written with ``edit`` and loaded fresh."""
    import importlib.util
    from bench import resources
    fields = dict(scale=2.0, factor=3.0, unused=1.0, launcher="x", tail="")
    fields.update(edit)
    path = tmp_path / f"synth_{tag}.py"
    path.write_text(_SYNTHETIC.format(**fields))
    spec = importlib.util.spec_from_file_location(f"synth_{tag}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {k.split(".", 1)[1]: v for k, v in resources.jit_sources(mod._kernel).items()}


def test_jit_key_changes_with_jit_code_only(tmp_path):
    """The key follows what the compiler sees: a called jit helper's body and a constexpr
    global change it; a launcher, an uncalled jit function and text outside the functions do
    not (moving registrations or docstrings around recompiles nothing)."""
    pytest.importorskip("triton")
    base = _synthetic_key(tmp_path, "base")
    assert set(base) == {"_kernel", "_helper", "SCALE"}
    assert _synthetic_key(tmp_path, "launcher", launcher="x + 1") == base
    assert _synthetic_key(tmp_path, "unused", unused=5.0) == base
    assert _synthetic_key(tmp_path, "tail", tail="# a comment\nOTHER = 1\n") == base
    assert _synthetic_key(tmp_path, "helper", factor=4.0) != base
    assert _synthetic_key(tmp_path, "scale", scale=2.5) != base


def test_triton_key_misses_on_a_changed_source_or_compiler():
    """A real configuration from the launchers: the cached row is reused under its own key and
    compiled instead under a key with another jit source, triton, ptxas or cuobjdump version,
    configuration or measuring code."""
    pytest.importorskip("triton")
    from bench import resources
    kernels = resources._kernels()
    compiler = {"triton": "3.8.0", "ptxas": "release 12.9, V12.9.86", "cuobjdump": "release 13.1, V13.1.80"}
    measure = resources.measure_hash()
    job = next(j for j in resources.jobs([90], kernels) if j[0] == "attention_fwd")
    tree = resources.kernel_sources(kernels)
    key = resources.triton_key(job, tree, compiler, measure)
    cached = [dict(key=key, compiled=True, **{f: 0 for f in resources.MEASURED})]

    def lookup(key_now):
        calls = []
        resources.reuse_or_compile([job], lambda j: key_now, cached, _fake_compiler(calls))
        return calls

    assert lookup(resources.triton_key(job, resources.kernel_sources(kernels), compiler, measure)) == []
    name = next(n for n in tree["attention_fwd"] if n.endswith("_dot_ieee"))
    edited = {**tree, "attention_fwd": {**tree["attention_fwd"], name: "0" * 64}}
    assert lookup(resources.triton_key(job, edited, compiler, measure)) == [job]
    for tool, version in (("triton", "3.8.1"), ("ptxas", "release 12.9, V12.9.87"), ("cuobjdump", "release 13.2")):
        assert lookup(resources.triton_key(job, tree, {**compiler, tool: version}, measure)) == [job], tool
    other = (job[0], job[1], {**job[2], "BC": job[2]["BC"] * 2}, job[3], job[4])   # a new configuration
    assert lookup(resources.triton_key(other, tree, compiler, measure)) == [job]
    assert lookup(resources.triton_key(job, tree, compiler, "another measuring code")) == [job]


def test_cuda_key_misses_on_a_changed_header_or_toolchain(tmp_path):
    """A .cu's key covers the headers it includes from csrc/, transitively (plan.h is reached
    only through common.cuh) and csrc/checks.h through -I csrc; a file it does not include, the
    nvcc version and the arch change it or not as they should."""
    from bench import cuda_resources as cr
    tools = {"nvcc": "release 13.0, V13.0.88", "cuobjdump": "release 13.1", "torch": "2.14.1"}
    csrc = tmp_path / "csrc"
    shutil.copytree(cr.CSRC, csrc, ignore=shutil.ignore_patterns("__pycache__"))
    src = csrc / "cuda" / "attention.cu"
    tree_key = cr.unit_key(os.path.join(cr.CSRC, "cuda", "attention.cu"), 90, tools)
    key = cr.unit_key(src, 90, tools, csrc=csrc, measure_code=tree_key["measure"])
    assert key == tree_key
    assert {"csrc/cuda/attention.cu", "csrc/cuda/common.cuh", "csrc/cuda/plan.h",
            "csrc/checks.h"} <= set(key["sources"])
    (csrc / "cuda" / "unrelated.cuh").write_text("// not included\n")
    assert cr.unit_key(src, 90, tools, csrc=csrc, measure_code=key["measure"]) == key
    for header in ("cuda/plan.h", "checks.h"):
        p = csrc / header
        text = p.read_text()
        p.write_text(text + "\n// edited\n")
        assert cr.unit_key(src, 90, tools, csrc=csrc, measure_code=key["measure"]) != key, header
        p.write_text(text)
    assert cr.unit_key(src, 90, tools, csrc=csrc, measure_code=key["measure"]) == key
    assert cr.unit_key(src, 80, tools, csrc=csrc, measure_code=key["measure"]) != key
    assert cr.unit_key(src, 90, {**tools, "nvcc": "release 13.1, V13.1.80"}, csrc=csrc,
                       measure_code=key["measure"]) != key
    # a unit's cached rows are reused only whole
    rows = [dict(key=key, compiled=True, mangled=f"_Z{i}", unit_rows=2, **{f: 0 for f in cr.MEASURED})
            for i in range(2)]
    assert cr.unit_usable(rows) and not cr.unit_usable(rows[:1])
