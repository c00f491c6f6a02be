"""Compile report: every Triton kernel configuration the launchers pick and every CUDA kernel
of the extension (csrc/cuda, see bench/cuda_resources.py), for sm_80 and sm_90, without a GPU.
Prints one row per (kernel, dtype, configuration, architecture):

  registers, spill bytes and stack frame   ptxas -v on Triton's PTX (the ptxas in the triton wheel)
  shared memory                            Triton's compile metadata, against the chip's limit
                                           per block (A100 163 KB, H100/H200 227 KB)
  tensor-core instructions                 HMMA (sm_80) / HGMMA (sm_90) in cuobjdump --dump-sass
  local-memory traffic                     LDL/STL in the SASS
  occupancy                                resident warps per SM by registers and shared memory

    python -m bench.resources [--arch 80 90] [--backend triton cuda] [--json] [--out FILE]

Run it with TRITON_INTERPRET unset (the interpreter replaces the GPU compiler; the tool unsets
it for itself before importing triton). tests/test_compile.py asserts on its --json output.
CUDA rows come from nvcc -Xptxas -v and cuobjdump of each csrc/cuda/*.cu compiled per
architecture (shared memory: static from ptxas plus the dynamic bytes of the launches the
standard shapes get, from csrc/cuda/plan.h); without nvcc the CUDA half is skipped with a note.
Every row carries ``backend`` ("triton" or "cuda").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from types import SimpleNamespace

os.environ.pop("TRITON_INTERPRET", None)   # must happen before triton is imported

CHIPS = {80: dict(name="A100", smem_block=163 * 1024, smem_sm=164 * 1024, ptxas_arch="sm_80"),
         90: dict(name="H100/H200", smem_block=227 * 1024, smem_sm=228 * 1024, ptxas_arch="sm_90a")}
REGS_PER_SM, MAX_WARPS_PER_SM = 65536, 64


def _kernels():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in sys.path:
        sys.path.insert(0, here)
    from rcar_fast.triton_backend import _kernels as load   # rcar_fast.kernels, never top-level
    kernels = load()
    import importlib
    attention_bwd = importlib.import_module(kernels.__name__ + ".attention_bwd")   # the module
    return {"attention_fwd": (kernels.attention, kernels.attention._attention_fwd_kernel),
            "attention_bwd": (attention_bwd, attention_bwd._attention_bwd_kernel),
            "attention_bwd_scores": (SimpleNamespace(launch_configs=attention_bwd.scores_launch_configs,
                                                     signature=attention_bwd.scores_signature),
                                     attention_bwd._attention_bwd_scores_kernel),
            "rar_fwd": (kernels.rar, kernels.rar._rar_fwd_kernel),
            "rar_bwd": (SimpleNamespace(launch_configs=kernels.rar.bwd_launch_configs,
                                        signature=kernels.rar.bwd_signature), kernels.rar._rar_bwd_kernel)}


def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def compile_one(job):
    """Compile one configuration for one architecture; returns a report row (a dict)."""
    kname, dtype, cfg, launch, cc = job
    warps = launch["num_warps"]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, fn = _kernels()[kname]
    sig = module.signature(dtype)
    sig.update({k: "constexpr" for k in cfg})
    row = dict(backend="triton", kernel=kname, dtype=dtype, arch=f"sm_{cc}", num_warps=warps,
               num_stages=launch["num_stages"], maxnreg=launch["maxnreg"],
               config=",".join(f"{k}={v}" for k, v in cfg.items()), has_dot=True)
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(cfg)),
                           target=GPUTarget("cuda", cc, 32), options=dict(launch))
    except Exception as exc:  # a compile failure is a finding, not a crash of the report
        row.update(compiled=False, error=f"{type(exc).__name__}: {str(exc)[-600:]}")
        return row
    chip = CHIPS[cc]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        cubin = os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        rep = subprocess.run([_tool("ptxas"), f"-arch={chip['ptxas_arch']}", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True).stdout

    def grab(pattern):
        m = re.search(pattern, rep)
        return int(m.group(1)) if m else 0

    regs, shared = grab(r"Used (\d+) registers"), int(k.metadata.shared)
    blocks = min(REGS_PER_SM // max(1, regs * 32 * warps), chip["smem_sm"] // max(1, shared),
                 MAX_WARPS_PER_SM // warps)
    row.update(compiled=True, registers=regs, spill_stores=grab(r"(\d+) bytes spill stores"),
               spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"),
               shared=shared, shared_limit=chip["smem_block"], shared_ok=shared <= chip["smem_block"],
               hmma=len(re.findall(r"\bHMMA\b", sass)), hgmma=len(re.findall(r"\bHGMMA\b", sass)),
               ldl=len(re.findall(r"\bLDL\b", sass)), stl=len(re.findall(r"\bSTL\b", sass)),
               warps_per_sm=blocks * warps)
    return row


def jobs(archs):
    out = []
    for kname, (module, _) in _kernels().items():
        for dtype, cfg, launch in module.launch_configs():
            for cc in archs:
                out.append((kname, dtype, cfg, launch, cc))
    return out


def table(rows) -> str:
    head = ("| kernel | dtype | arch | config | warps/stages/maxnreg | regs | spill st/ld | stack | shared KB (limit) "
            "| HMMA | HGMMA | LDL/STL | warps/SM |\n|" + " --- |" * 13)
    lines = [head]
    for r in rows:
        if not r["compiled"]:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['config']} | {r['num_warps']}/{r['num_stages']}/{r['maxnreg']} "
                         f"| COMPILE FAILED: {r['error'][:80]} |" + " |" * 8)
            continue
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['config']} | {r['num_warps']}/{r['num_stages']}/{r['maxnreg']} "
                     f"| {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} "
                     f"| {r['shared'] / 1024:.0f} ({r['shared_limit'] // 1024}) | {r['hmma']} | {r['hgmma']} "
                     f"| {r['ldl']}/{r['stl']} | {r['warps_per_sm']} |")
    return "\n".join(lines)


def cuda_table(rows) -> str:
    head = ("| kernel | dtype | arch | launched for (d = 1024, s = 256) | regs | spill st/ld | stack "
            "| shared KB static+dynamic (limit) | HMMA | HGMMA | LDL/STL | warps/SM |\n|" + " --- |" * 12)
    lines = [head]
    for r in rows:
        if not r["compiled"]:
            lines.append(f"| {r['kernel']} | - | {r['arch']} | COMPILE FAILED: {r['error'][:80]} |" + " |" * 8)
            continue
        shapes = r["config"].split("; launched for ", 1)[-1]
        lines.append(f"| `{r['instance']}` | {r['dtype']} | {r['arch']} | {shapes} | {r['registers']} "
                     f"| {r['spill_stores']}/{r['spill_loads']} | {r['stack']} "
                     f"| {r['shared_static'] / 1024:.0f}+{r['shared_dynamic'] / 1024:.1f} ({r['shared_limit'] // 1024}) "
                     f"| {r['hmma']} | {r['hgmma']} | {r['ldl']}/{r['stl']} | {r['warps_per_sm']} |")
    return "\n".join(lines)


def _cuda_rows(archs, jobs_):
    """(rows, meta) of the CUDA kernels, or ([], {"skipped": why}) without nvcc."""
    from bench import cuda_resources
    if cuda_resources.find_nvcc() is None:
        return [], {"skipped": "nvcc not found (set CUDA_HOME or put nvcc on PATH)"}
    return cuda_resources.rows(archs, CHIPS, REGS_PER_SM, MAX_WARPS_PER_SM, jobs=jobs_)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(CHIPS))
    ap.add_argument("--backend", nargs="+", default=["triton", "cuda"], choices=("triton", "cuda"),
                    help="kernels to compile: the Triton kernels, the extension's CUDA kernels (default both)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in sys.path:
        sys.path.insert(0, here)
    rows, cuda_rows, cuda_meta = [], [], {}
    with ThreadPoolExecutor(max_workers=1) as side:
        # the CUDA compiles (nvcc subprocesses) run beside Triton's compile processes
        cuda_future = side.submit(_cuda_rows, args.arch, max(1, args.jobs)) if "cuda" in args.backend else None
        if "triton" in args.backend:
            with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                rows = list(pool.map(compile_one, jobs(args.arch)))
        if cuda_future is not None:
            cuda_rows, cuda_meta = cuda_future.result()
    if cuda_meta.get("skipped"):
        print(f"CUDA kernels skipped: {cuda_meta['skipped']}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows + cuda_rows))
    else:
        if rows:
            print(table(rows))
        if cuda_rows:
            print(cuda_table(cuda_rows))
    if args.out:
        with open(args.out, "w") as f:
            if rows:
                import triton
                f.write(f"# Triton kernel resources (triton {triton.__version__}, compiled without a GPU)\n\n")
                f.write(table(rows) + "\n")
            if cuda_rows:
                f.write(f"\n# CUDA kernel resources (nvcc {cuda_meta['nvcc_version']}, csrc/cuda, compiled without "
                        "a GPU)\n\n")
                f.write(cuda_table(cuda_rows) + "\n")
    return 0 if all(r["compiled"] for r in rows + cuda_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
