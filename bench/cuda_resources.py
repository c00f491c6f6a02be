"""CUDA half of the compile report (python -m bench.resources): the extension's CUDA kernels
(csrc/cuda/*.cu) compiled with nvcc for each architecture, no GPU needed.

Each .cu is compiled once per architecture to a cubin (`nvcc -cubin -Xptxas -v`, the flags of
the extension build: torch's include paths and COMMON_NVCC_FLAGS, -O3, C++20), in parallel.
One row per kernel instance (template instantiation) and architecture:

  registers, spill bytes, stack frame, static shared memory    ptxas -v
  dynamic shared memory                                        csrc/cuda/plan.h, evaluated by a
      small host program (bench/cuda_plan.cpp) for the launch each standard shape gets on the
      chip (the launchers pick the row-group size with the same code), the largest of them
  HMMA / HGMMA, LDL / STL                                      cuobjdump --dump-sass of the cubin

Compile cache (see bench/resources.py): one key per .cu file and architecture (unit_key): the
SHA-256 of the .cu and of every header it includes from csrc/ (csrc_sources: #include "..." and
<...> resolved as nvcc does, the including file's folder then -I csrc, transitively), the arch,
the nvcc flags (paths written relative to the repository and torch), the nvcc, cuobjdump and torch
versions, and the SHA-256 of the code that compiles and measures (_compile, _measure_unit,
parse_ptxas, sass_counts, _nvcc_flags). A unit whose key matches reuses its cached per-kernel
ptxas and SASS numbers; names (c++filt), the launch plan's dynamic shared memory, limits and
occupancy are recomputed every run.

Importing this module has no side effects (tests/test_compile.py imports it).
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
THREADS = 256   # every kernel (csrc/cuda/plan.h kThreads)
TYPES = {"float": ("fp32", 4), "__half": ("fp16", 2), "__nv_bfloat16": ("bf16", 2)}
#: (Lq, Lc) of the standard launches: t2i with captions of up to 16, 32 or 64 words against
#: R = 36 regions, i2t with the regions as queries; d = 1024, s = 256 (SPEC.md's shapes); and
#: captions of 80 words (past the tensor-core forward's 64 rows: the per-pair kernel in fp16/bf16)
ATTN_SHAPES = ((16, 36), (32, 36), (64, 36), (36, 32), (36, 64), (80, 36))
RAR_LQ = (16, 32, 36, 64, 80)
#: query items of the block the grouped forwards' plans (attention, RAR) are evaluated for (more than
#: GP: full groups)
TC_PAIRS = 1000
S_DIM = 256
#: kernels whose fp16/bf16 instances run the block GEMM on tensor cores
TENSOR_CORE_GEMM = ("rar_fwd_kernel", "rar_fwd_wg_kernel", "rar_bwd_kernel", "attention_fwd_tc_kernel",
                    "attention_fwd_wg_kernel", "attention_bwd_tc_kernel", "rcr_gemm_kernel", "rcr_wgmma_kernel")
#: kernels with code for sm_90a only (wgmma: csrc/cuda/wgmma.cuh); compiled for sm_80 they are a
#: trap the launchers never run
SM90A_ONLY = ("rcr_wgmma_kernel", "attention_fwd_wg_kernel", "rar_fwd_wg_kernel")


def find_nvcc():
    """nvcc of $CUDA_HOME, else the one on PATH, else None."""
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc):
    """The toolkit root: $CUDA_HOME, else the TOP= folder of `nvcc --dryrun` (PATH's nvcc may be
    a wrapper script outside the toolkit), else nvcc's parent folder."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60).stderr
        m = re.search(r"TOP=(\S+)", out)
        if m:
            return os.path.realpath(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuobjdump(nvcc):
    cand = [os.path.join(_cuda_home(nvcc), "bin", "cuobjdump")]
    try:
        import triton   # its wheel carries cuobjdump when the toolkit does not
        cand.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in cand:
        if os.path.exists(c):
            return c
    return shutil.which("cuobjdump")


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+),", out)
    return m.group(1) if m else "?"


def _nvcc_flags(cc):
    from torch.utils import cpp_extension
    flags = ["-O3", "-std=c++20", "-DRCAR_FAST_WITH_CUDA", f"-I{CSRC}"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)
    # sm_90 as the extension builds it by default (setup.py: 9.0a, with RCAR_FAST_SM90A): the
    # wgmma kernels have their code there and trap elsewhere
    arch = "90a" if cc == 90 else str(cc)
    flags += ["-DRCAR_FAST_SM90A"] if cc == 90 else []
    flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-Xptxas", "-v"]
    return flags


#: what ptxas -v and the SASS give per kernel, the part of a row the cache keeps
MEASURED = ("registers", "spill_stores", "spill_loads", "stack", "shared_static", "hmma", "hgmma", "ldl", "stl",
            "fence_async", "wg_arrive", "wg_depbar", "wg_order_bad")
#: SASS counts of the wgmma kernels' ordering instructions: fence.proxy.async (FENCE.VIEW.ASYNC.S),
#: wgmma.fence (WARPGROUP.ARRIVE), wgmma.wait_group (WARPGROUP.DEPBAR)
_SASS = dict(hmma=r"\bHMMA\b", hgmma=r"\bHGMMA\b", ldl=r"\bLDL\b", stl=r"\bSTL\b", fence_async=r"\bFENCE\.VIEW\.ASYNC\.S\b",
             wg_arrive=r"\bWARPGROUP\.ARRIVE\b", wg_depbar=r"\bWARPGROUP\.DEPBAR\b")


def _compile(job):
    nvcc, src, cc, tmp = job
    cubin = os.path.join(tmp, f"{os.path.basename(src)}.sm_{cc}.cubin")
    t0 = time.time()
    proc = subprocess.run([nvcc, *_nvcc_flags(cc), src, "-o", cubin], capture_output=True, text=True)
    return dict(src=os.path.relpath(src, ROOT), cc=cc, ok=proc.returncode == 0, log=proc.stderr + proc.stdout,
                cubin=cubin, seconds=time.time() - t0)


def parse_ptxas(log):
    """{mangled kernel name: registers, spills, stack, static shared} from `ptxas -v` output."""
    out = {}
    for block in re.split(r"Compiling entry function ", log)[1:]:
        name = re.match(r"'([^']+)'", block).group(1)

        def grab(pattern):
            m = re.search(pattern, block)
            return int(m.group(1)) if m else 0
        out[name] = dict(registers=grab(r"Used (\d+) registers"), stack=grab(r"(\d+) bytes stack frame"),
                         spill_stores=grab(r"(\d+) bytes spill stores"),
                         spill_loads=grab(r"(\d+) bytes spill loads"), shared_static=grab(r"(\d+) bytes smem"))
    return out


def sass_counts(cuobjdump, cubin):
    """{mangled kernel name: HMMA, HGMMA, LDL, STL and the wgmma ordering instructions' counts
    (_SASS)} from the cubin's SASS."""
    sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True).stdout
    out = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        out[name] = {k: len(re.findall(pattern, block)) for k, pattern in _SASS.items()}
        out[name]["wg_order_bad"] = wgmma_order_violations(block)
    return out


def wgmma_order_violations(sass_block):
    """HGMMA instructions of one kernel's SASS (in program order) without the order wgmma needs
    (wgmma.cuh): walking back, a WARPGROUP.ARRIVE (wgmma.fence) before the nearest BAR.SYNC, and
    before that barrier a FENCE.VIEW.ASYNC.S (fence.proxy.async) after the last shared-memory store
    (STS) since the barrier before it; walking on, a WARPGROUP.DEPBAR (wgmma.wait_group) before the
    next BAR.SYNC. Program order only: a loop's back edge is checked where its body repeats the
    code before the loop (the kernels stage the first chunk with the same code)."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass_block)
    bad = 0
    for i, op in enumerate(ops):
        if not op.startswith("HGMMA"):
            continue
        j = i - 1
        while j >= 0 and not ops[j].startswith("BAR.SYNC") and not ops[j].startswith("WARPGROUP.ARRIVE"):
            j -= 1
        ok = j >= 0 and ops[j].startswith("WARPGROUP.ARRIVE")
        while j >= 0 and not ops[j].startswith("BAR.SYNC"):
            j -= 1
        k = j - 1
        while ok and k >= 0 and not ops[k].startswith("BAR.SYNC"):
            if ops[k].startswith("FENCE.VIEW.ASYNC.S"):
                break
            if ops[k].startswith("STS"):
                ok = False
            k -= 1
        n = i + 1
        while ok and n < len(ops) and not ops[n].startswith("BAR.SYNC"):
            if ops[n].startswith("WARPGROUP.DEPBAR"):
                break
            n += 1
        ok = ok and n < len(ops) and ops[n].startswith("WARPGROUP.DEPBAR")
        bad += not ok
    return bad


def demangle(names):
    """Mangled -> short instance name such as ``attention_fwd_kernel<__half, 4, 1>`` (c++filt)."""
    names = list(names)
    filt = shutil.which("c++filt")
    if not filt:
        raise RuntimeError("c++filt (binutils) not found: needed to name the CUDA kernels")
    full = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    out = {}
    for mangled, pretty in zip(names, full):
        m = re.search(r"rcar_fast::cuda::(\w+<[^()]*>|\w+)\(", pretty)
        out[mangled] = m.group(1) if m else pretty
    return out


def plan_shared(chips):
    """{(instance, cc): [(shapes, dynamic shared bytes), ...]} for the launches the standard
    shapes get on each chip, from csrc/cuda/plan.h through bench/cuda_plan.cpp."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no host C++ compiler (c++/g++) for bench/cuda_plan.cpp")
    queries, keys = [], []
    for cc, chip in chips.items():
        limit = chip["smem_block"]
        for tname, (_, elem) in TYPES.items():
            for Lq, Lc in ATTN_SHAPES:
                shape = f"Lq={Lq},Lc={Lc}"
                queries.append(f"gram {Lc}")
                keys.append((cc, "gram_kernel<{T}>", tname, shape, None))
                for mode in (0, 1, 2):
                    width = S_DIM if mode else 0
                    if elem == 2 and mode == 1 and cc == 90:   # launch.h use_wgmma: first the 128-row kernel
                        queries.append(f"wg {elem} {Lq} {Lc} {width} {mode} {TC_PAIRS} 0 {limit}")
                        keys.append((cc, "attention_fwd_wg_kernel<{T}, {BC}>", tname, shape + f",P={TC_PAIRS}", "wg"))
                    if elem == 2:   # the launchers try the tensor-core kernel first (mode 2: the backward's D2)
                        for paired in (0, 1):
                            queries.append(f"tc {elem} {Lq} {Lc} {width} {mode} {TC_PAIRS} {paired} {limit}")
                            keys.append((cc, "attention_fwd_tc_kernel<{T}, {MT}, %d, {WG}>" % mode, tname,
                                         shape + (",paired" if paired else f",P={TC_PAIRS}"), "tc"))
                    queries.append(f"fwd {elem} {Lq} {Lc} {width} {mode} {limit}")
                    keys.append((cc, "attention_fwd_kernel<{T}, {MT}, %d>" % mode, tname, shape,
                                 "fallback" if elem == 2 else None))
                for mode in (0, 1):
                    if elem == 2:   # attention.cu launch_bwd: the tensor-core backward first
                        for paired in (0, 1):
                            queries.append(f"bwdtc {elem} {Lq} {Lc} {TC_PAIRS} {paired} {limit}")
                            keys.append((cc, "attention_bwd_tc_kernel<{T}, {MT}, %d>" % mode, tname,
                                         shape + (",paired" if paired else f",P={TC_PAIRS}"), "tc"))
                    queries.append(f"bwd {Lq} {Lc}")
                    keys.append((cc, "attention_bwd_kernel<{T}, %d>" % mode, tname, shape,
                                 "fallback" if elem == 2 else None))
                keys.append((cc, "l2n_bwd_rows_kernel<{T}>", tname, shape, 0))
            if elem == 4:   # fp16/bf16 run the chains in rcr_gemm_kernel's epilogues
                keys.append((cc, "rcr_factors_kernel<{T}>", tname, f"rows x d={1024}", 0))
                keys.append((cc, "rcr_factors_bwd_kernel<{T}>", tname, f"rows x d={1024}", 0))
            else:   # kRcrHidden (E W1^T: K = s; on sm_90 its launch takes the temperatures too),
                # kRcrFactors (H W2^T: K = 2 s), kRcrFactorsBwd (the rcr_factors_bwd op: H W2^T again)
                for epi, shape in ((0, f"rows x 2s={2 * S_DIM}, K={S_DIM}"), (1, f"rows x d=1024, K={2 * S_DIM}"),
                                   (3, f"rows x d=1024, K={2 * S_DIM}, backward")):
                    queries.append(f"rcrgemm {elem}")
                    keys.append((cc, "rcr_gemm_kernel<{T}, %d>" % epi, tname, shape, None))
                    if cc == 90:   # launch.h use_wgmma: an H100/H200 runs this one (rcr_gemm_kernel
                        # where RCAR_FAST_CUDA_WGMMA=0)
                        queries.append(f"rcrwgmma {elem}")
                        keys.append((cc, "rcr_wgmma_kernel<{T}, %d>" % epi, tname, shape, None))
            keys.append((cc, "rcr_smooth_kernel<{T}>", tname, f"rows x s/2={S_DIM // 2}", 0))
            keys.append((cc, "rar_mean_kernel<{T}>", tname, f"s={S_DIM}", 0))
            for Lq in RAR_LQ:
                if elem == 2 and cc == 90:   # launch.h use_wgmma: the 128-row kernel first
                    queries.append(f"rarwg {elem} {Lq} {S_DIM} {TC_PAIRS} {limit}")
                    keys.append((cc, "rar_fwd_wg_kernel<{T}>", tname, f"Lq={Lq},s={S_DIM}", "wg"))
                queries.append(f"rarfwd {elem} {Lq} {S_DIM} {TC_PAIRS} {limit}")
                keys.append((cc, "rar_fwd_kernel<{T}, {MT}>", tname, f"Lq={Lq},s={S_DIM}", None))
                queries.append(f"rar {elem} {Lq} {S_DIM} {limit}")
                keys.append((cc, "rar_bwd_kernel<{T}, {MT}>", tname, f"Lq={Lq},s={S_DIM}", None))
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "cuda_plan")
        subprocess.run([cxx, "-std=c++17", "-O1", f"-I{CSRC}", os.path.join(ROOT, "bench", "cuda_plan.cpp"),
                        "-o", exe], check=True, capture_output=True, text=True)
        answers = subprocess.run([exe], input="\n".join(queries) + "\n", capture_output=True, text=True,
                                 check=True).stdout.split("\n")
    out, it = {}, iter(answers)
    tc_served = set()   # (cc, dtype, shape, mode) the tensor-core kernel takes (grouped form)
    for cc, pattern, tname, shape, fixed in keys:
        if isinstance(fixed, int):
            mt, nbytes = 1, fixed
        else:
            answer = next(it).split()
            mt, nbytes = (int(x) for x in answer[:2])   # tc, wg and rarfwd add GP; tc then WG, wg BC
        m = re.search(r", (\d+)(?:, \{WG\})?>$", pattern)   # the attention kernels' mode argument
        mode = m.group(1) if m else ""
        if fixed == "wg" and mt == 0:   # not applicable: attention_fwd_tc_kernel (or the per-pair kernel)
            continue
        if fixed == "tc":
            if mt == 0:        # not applicable: attention_fwd_kernel runs
                continue
            if shape.endswith(f",P={TC_PAIRS}"):
                tc_served.add((cc, tname, shape.split(",P=")[0], mode))
        elif fixed == "fallback" and (cc, tname, shape, mode) in tc_served:
            continue           # the tensor-core kernel takes this launch
        # attention.cu launch_fwd_tc: the projection on wgmma on sm_90 where plan.h
        # tc_wgmma_projection says (launch.h use_wgmma)
        wg = "true" if cc == 90 and fixed == "tc" and answer[3:4] == ["1"] else "false"
        bc = answer[3] if fixed == "wg" and len(answer) > 3 else ""
        out.setdefault((pattern.format(T=tname, MT=mt, WG=wg, BC=bc), cc), []).append((shape, nbytes))
    return out


_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def csrc_sources(src, csrc=CSRC) -> dict:
    """{path relative to csrc's parent: SHA-256} of a .cu file and of every file under csrc it
    includes, transitively. Both #include "x" and <x> are followed the way nvcc searches
    (-I csrc is among the flags): the including file's folder (quoted names), then csrc; a name
    found in neither (CUDA, torch and standard headers) is left to the version keys. Every
    #include line counts, even one inside #if: that can only make the key stricter."""
    csrc = os.path.abspath(csrc)
    seen, todo = {}, [os.path.abspath(src)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        with open(path, "rb") as f:
            text = f.read()
        seen[path] = hashlib.sha256(text).hexdigest()
        for m in _INCLUDE.finditer(text.decode("utf-8", "replace")):
            quoted = m.group(0).rstrip().endswith('"')
            for folder in ([os.path.dirname(path)] if quoted else []) + [csrc]:
                cand = os.path.normpath(os.path.join(folder, m.group(1)))
                if os.path.isfile(cand):
                    if cand.startswith(csrc + os.sep):
                        todo.append(cand)
                    break
    base = os.path.dirname(csrc)
    return {os.path.relpath(p, base): h for p, h in sorted(seen.items())}


def toolchain(nvcc, cuobjdump) -> dict:
    """The versions a CUDA row depends on: nvcc, cuobjdump and torch (whose headers are included)."""
    import torch

    from bench.resources import tool_version
    return {"nvcc": tool_version(nvcc), "cuobjdump": tool_version(cuobjdump), "torch": torch.__version__}


def portable_flags(cc) -> list:
    """_nvcc_flags(cc) with the repository's and torch's folders written as $ROOT and $TORCH (a
    checkout elsewhere has the same key)."""
    import torch
    tdir = os.path.dirname(os.path.abspath(torch.__file__))
    return [f.replace(tdir, "$TORCH").replace(ROOT, "$ROOT") for f in _nvcc_flags(cc)]


def measure_hash() -> str:
    h = hashlib.sha256()
    for fn in (_compile, _measure_unit, parse_ptxas, sass_counts, _nvcc_flags):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()


def unit_key(src, cc, tools, csrc=CSRC, measure_code=None) -> dict:
    """The cache key of one .cu file compiled for one architecture, from the tree as it is now."""
    return {"backend": "cuda", "source": os.path.relpath(os.path.abspath(src), os.path.dirname(os.path.abspath(csrc))),
            "arch": f"sm_{cc}", "sources": csrc_sources(src, csrc), "flags": portable_flags(cc),
            "compiler": tools, "measure": measure_code or measure_hash()}


def unit_usable(rows) -> bool:
    """Cached rows of one unit are reused only when all of its kernels are there, each measured."""
    return (len(rows) == rows[0].get("unit_rows") and len({r.get("mangled") for r in rows}) == len(rows)
            and all(isinstance(r.get("mangled"), str) and all(isinstance(r.get(f), int) for f in MEASURED)
                    for r in rows))


def _measure_unit(job):
    """Compile one .cu for one arch: {src, cc, ok, log, seconds, kernels: {mangled: MEASURED}}."""
    nvcc, cuobjdump, src, cc, tmp = job
    res = _compile((nvcc, src, cc, tmp))
    if res["ok"]:
        sass = sass_counts(cuobjdump, res["cubin"])
        res["kernels"] = {name: {**info, **sass.get(name, dict.fromkeys([*_SASS, "wg_order_bad"], 0))}
                          for name, info in parse_ptxas(res["log"]).items()}
    return res


def rows(archs, chips, regs_per_sm, max_warps_per_sm, jobs=2, cached=()):
    """One report row per CUDA kernel instance and architecture (see the module docstring);
    cached: rows of the compile cache, reused for a .cu x arch whose key matches the tree now."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    cuobjdump = find_cuobjdump(nvcc)
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit bin/ or the triton wheel)")
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    plan = plan_shared({cc: chips[cc] for cc in archs})
    tools, measure_code = toolchain(nvcc, cuobjdump), measure_hash()
    if not all(tools.values()):   # a version that could not be read matches nothing
        cached = ()
    from bench.resources import reuse_or_compile
    units = [(src, cc) for src in sources for cc in archs]
    out = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        def compile_many(missed):
            return list(pool.map(_measure_unit, [(nvcc, cuobjdump, src, cc, tmp) for src, cc in missed]))

        found = reuse_or_compile(units, lambda u: unit_key(u[0], u[1], tools, measure_code=measure_code),
                                 cached, compile_many, unit_usable)
    results = []
    for (src, cc), (key, hit, res) in zip(units, found):
        if hit:
            res = dict(src=os.path.relpath(src, ROOT), cc=cc, ok=True, seconds=hit[0].get("compile_seconds", 0),
                       kernels={r["mangled"]: {f: r[f] for f in MEASURED} for r in hit})
        results.append((hit[0]["key"] if hit else key, "reused" if hit else "compiled", res))   # stored key
    names = demangle([m for _, _, res in results if res["ok"] for m in res["kernels"]])
    for key, how, res in results:
        cc, chip = res["cc"], chips[res["cc"]]
        if not res["ok"]:
            errors = [ln for ln in res["log"].splitlines() if "error" in ln] or res["log"].splitlines()[-3:]
            out.append(dict(backend="cuda", kernel=res["src"], instance=res["src"], dtype="-", arch=f"sm_{cc}",
                            num_warps=THREADS // 32, config="", compiled=False,
                            error=" | ".join(errors)[:300], source=res["src"], key=key, cache=how))
            continue
        for mangled, info in res["kernels"].items():
            inst = names[mangled]
            base = inst.split("<", 1)[0]
            targs = [a.strip() for a in inst[len(base) + 1:-1].split(",")] if "<" in inst else []
            tname = targs[0] if targs else "float"
            dtype = TYPES.get(tname, (tname, 0))[0]
            served = plan.get((inst, cc), [])
            dyn = max((b for _, b in served), default=0)
            shared = info["shared_static"] + dyn
            warps = THREADS // 32
            regs = info["registers"]
            blocks = min(regs_per_sm // max(1, regs * 32 * warps), chip["smem_sm"] // max(1, shared),
                         max_warps_per_sm // warps)
            gemm = dtype != "fp32" and not (base in SM90A_ONLY and cc != 90) and (base in TENSOR_CORE_GEMM or
                                        (base == "attention_fwd_kernel" and targs[-1:] == ["1"]))
            shapes = ", ".join(sorted({s for s, _ in served})) if served else "none of the standard shapes"
            out.append(dict(
                backend="cuda", kernel=base, instance=inst, dtype=dtype, arch=f"sm_{cc}", num_warps=warps,
                config=f"{inst}; launched for {shapes}", compiled=True, source=res["src"],
                **{f: info[f] for f in MEASURED}, shared=shared, shared_dynamic=dyn,
                shared_limit=chip["smem_block"], shared_ok=shared <= chip["smem_block"],
                launched=bool(served), tensor_core_gemm=gemm, has_dot=gemm, warps_per_sm=blocks * warps,
                compile_seconds=round(res["seconds"], 1), mangled=mangled, unit_rows=len(res["kernels"]),
                key=key, cache=how))
    # a launch the plan gives a standard shape must name a compiled kernel (catches drift between
    # plan.h's choices, the launchers' instantiations and the names here)
    have = {(r["instance"], r["arch"]) for r in out if r["compiled"]}
    failed_archs = {r["arch"] for r in out if not r["compiled"]}   # already reported
    for (inst, cc), served in plan.items():
        if (inst, f"sm_{cc}") not in have and f"sm_{cc}" not in failed_archs:
            out.append(dict(backend="cuda", kernel=inst.split("<", 1)[0], instance=inst, dtype="-",
                            arch=f"sm_{cc}", num_warps=THREADS // 32, config="", compiled=False,
                            source="csrc/cuda/plan.h",
                            error=f"the launch plan uses {inst} for {served[0][0]}, but no .cu compiles it"))
    out.sort(key=lambda r: (r["kernel"], r["dtype"], r["instance"], r["arch"]))
    reused_units = sum(how == "reused" for _, how, _ in results)
    return out, dict(nvcc=nvcc, nvcc_version=nvcc_version(nvcc), cuobjdump=cuobjdump, units=len(units),
                     units_reused=reused_units, reused=sum(r.get("cache") == "reused" for r in out))
