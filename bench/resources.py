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
                              [--no-cache] [--cache-read-only | --write-cache] [--cache-file FILE]

Run it with TRITON_INTERPRET unset (the interpreter replaces the GPU compiler; the tool unsets
it for itself before importing triton). tests/test_compile.py asserts on its --json output.
CUDA rows come from nvcc -Xptxas -v and cuobjdump of each csrc/cuda/*.cu compiled per
architecture (shared memory: static from ptxas plus the dynamic bytes of the launches the
standard shapes get, from csrc/cuda/plan.h); without nvcc the CUDA half is skipped with a note.
Every row carries ``backend`` ("triton" or "cuda").

Triton rows are the launches the launchers make at the standard shapes, recorded, each compiled
as triton's JIT would compile it at run time (argument types, unit strides as constants,
divisibility by 16; bench/kernel_configs.py).

Compile cache (bench/results/resources.json, committed): rows of earlier runs, each with the key
it was measured under. The configurations always come from the launchers (bench/kernel_configs.py) and the
.cu files on disk; for each one the key is computed now, from the current tree, and a cached row
is reused only when its stored key equals it whole, else that configuration is compiled:

  Triton   backend, kernel, dtype, arch (and ptxas's -arch), constexprs, launch options
           (num_warps, num_stages, maxnreg, and the arguments' JIT specialisation), what the
           compiler sees of the kernel (jit_sources: the SHA-256 of its @triton.jit source and
           of every @triton.jit function it calls, transitively, and the values of the
           constants they name; launchers, custom-op
           registrations and comments outside jit functions do not count), the SHA-256 of the
           code here that compiles a configuration and measures it (_kernels, _tool, measure),
           and the compiler: triton.__version__, ptxas --version, cuobjdump --version
  CUDA     one key per .cu file and arch (bench/cuda_resources.py unit_key): the SHA-256 of the
           .cu and of every header it includes from csrc/ (transitively), the nvcc flags, the
           nvcc, cuobjdump and torch (headers) versions, and the SHA-256 of the measuring code

Only the raw measurements are reused (registers, spills, stack, shared memory, instruction
counts); what follows from them (limits, occupancy, the CUDA launch plan's dynamic shared
memory) is recomputed every run. A table run refreshes the cache file (rows of the backends and
architectures it covered are replaced, compile failures are never stored); --json (the test's
path) only reads it; --no-cache reuses nothing. Every row reports ``key`` and ``cache``
("reused" or "compiled"); the counts go to stderr.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)   # must happen before triton is imported (main() too)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "bench", "results", "resources.json")
CACHE_FORMAT = 1
CHIPS = {80: dict(name="A100", smem_block=163 * 1024, smem_sm=164 * 1024, ptxas_arch="sm_80"),
         90: dict(name="H100/H200", smem_block=227 * 1024, smem_sm=228 * 1024, ptxas_arch="sm_90a")}
REGS_PER_SM, MAX_WARPS_PER_SM = 65536, 64
#: what measure() reads off a compile; the rest of a row follows from the job and CHIPS
MEASURED = ("registers", "spill_stores", "spill_loads", "stack", "shared", "hmma", "hgmma", "ldl", "stl",
            "tf32", "ordered_atomics")


def _kernels():
    """{report name: SimpleNamespace(fn=jit function)} of every Triton kernel
    (bench/kernel_configs.py); the jit function's source and what it calls key its cache rows."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.kernel_configs import kernels
    return kernels()


def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def measure(job):
    """Compile one configuration for one architecture: {"compiled": True, MEASURED...} or
    {"compiled": False, "error": ...}. The launch's arguments are typed and specialised as the
    JIT specialises them at run time (launch["specialization"], bench/kernel_configs.py)."""
    kname, dtype, cfg, launch, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[kname].fn
    names = list(inspect.signature(fn.fn).parameters)
    sig, consts, attrs = {}, dict(cfg), {}
    for name, spec in launch["specialization"].items():
        if spec == "=1":
            consts[name] = 1
            continue
        ty, _, div = spec.partition(":")
        sig[name] = ty
        if div:
            attrs[(names.index(name),)] = [["tt.divisibility", int(div)]]
    sig.update({k: "constexpr" for k in consts})
    options = {k: launch[k] for k in ("num_warps", "num_stages", "maxnreg")}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as exc:  # a compile failure is a finding, not a crash of the report
        return dict(compiled=False, error=f"{type(exc).__name__}: {str(exc)[-600:]}")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        cubin = os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        rep = subprocess.run([_tool("ptxas"), f"-arch={CHIPS[cc]['ptxas_arch']}", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True).stdout

    def grab(pattern):
        m = re.search(pattern, rep)
        return int(m.group(1)) if m else 0

    # tf32 matrix products in the PTX (mma/wgmma with .tf32 operands): every fp32 product here
    # is meant to be exact ("ieee"); atomics with an ordering stronger than relaxed (the adds
    # into shared gradients commute and order nothing, so acq_rel only adds fences)
    ptx_text = k.asm["ptx"]
    tf32 = len(re.findall(r"\.tf32\b", ptx_text))
    ordered = sum(1 for m in re.finditer(r"\b(?:atom|red)((?:\.[a-z0-9_]+)+)", ptx_text)
                  if {"acq_rel", "acquire", "release", "sc"} & set(m.group(1).split(".")))

    return dict(compiled=True, registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"),
                shared=int(k.metadata.shared), hmma=len(re.findall(r"\bHMMA\b", sass)),
                hgmma=len(re.findall(r"\bHGMMA\b", sass)), ldl=len(re.findall(r"\bLDL\b", sass)),
                stl=len(re.findall(r"\bSTL\b", sass)), tf32=tf32, ordered_atomics=ordered)


def make_row(job, m):
    """The report row of a job from its measurements (fresh or cached): limits and occupancy are
    derived here, every run."""
    kname, dtype, cfg, launch, cc = job
    warps = launch["num_warps"]
    row = dict(backend="triton", kernel=kname, dtype=dtype, arch=f"sm_{cc}", num_warps=warps,
               num_stages=launch["num_stages"], maxnreg=launch["maxnreg"],
               config=",".join(f"{k}={v}" for k, v in cfg.items()), has_dot=True)
    if not m["compiled"]:
        row.update(compiled=False, error=m["error"])
        return row
    chip = CHIPS[cc]
    regs, shared = m["registers"], m["shared"]
    blocks = min(REGS_PER_SM // max(1, regs * 32 * warps), chip["smem_sm"] // max(1, shared),
                 MAX_WARPS_PER_SM // warps)
    row.update(compiled=True, **{f: m[f] for f in MEASURED}, shared_limit=chip["smem_block"],
               shared_ok=shared <= chip["smem_block"], warps_per_sm=blocks * warps)
    return row


def compile_one(job):
    """Compile one configuration for one architecture; returns a report row (a dict)."""
    return make_row(job, measure(job))


def jobs(archs, kernels=None):
    """(kernel, dtype, constexprs, launch options with the JIT's specialisation, cc) of every launch
    the launchers make at the standard shapes (bench/kernel_configs.py: recorded_launches)."""
    from bench.kernel_configs import recorded_launches
    launches = recorded_launches()
    out = []
    for kname in (kernels or _kernels()):
        for dtype, cfg, launch in launches[kname]:
            for cc in archs:
                out.append((kname, dtype, cfg, launch, cc))
    return out


# ----------------------------------------------------------------------------- compile cache

def canonical(key) -> str:
    """A key as one string (sorted JSON): two keys are the same key when these are equal."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def code_hash(*objs) -> str:
    """SHA-256 of the source text of functions (the code that turns a job into measurements)."""
    h = hashlib.sha256()
    for o in objs:
        h.update(inspect.getsource(o).encode())
    return h.hexdigest()


def tool_version(path) -> str:
    """The build lines of `TOOL --version` (release, build id, date); "" when it gives none."""
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()
             if ln.strip().startswith(("Built on", "Cuda compilation tools", "Build "))]
    return "; ".join(lines)


def triton_compiler() -> dict:
    import triton
    return {"triton": triton.__version__, "ptxas": tool_version(_tool("ptxas")),
            "cuobjdump": tool_version(_tool("cuobjdump"))}


def measure_hash() -> str:
    """The part of this file that turns a job into measurements (and names the kernels)."""
    return code_hash(_kernels, _tool, measure)


def _is_jit(obj) -> bool:
    """A @triton.jit function (compiled, or wrapped by the interpreter under TRITON_INTERPRET=1)."""
    from triton.runtime.jit import KernelInterface
    return isinstance(obj, KernelInterface) and callable(getattr(obj, "fn", None))


def jit_sources(kernel) -> dict:
    """{module.name: SHA-256 or value} of everything a @triton.jit kernel compiles from: its own
    source and, transitively, the source of every @triton.jit function it names (directly or as
    ``module.function``) and the value of every constant it names (``tl.constexpr`` globals,
    numbers, strings). Only jit code and its constants reach the compiler (a jit function cannot
    call plain Python), so this is the whole input besides the configuration and the compiler;
    launchers, custom-op registrations and docstrings elsewhere in the file do not count, and
    moving them recompiles nothing. A name it cannot resolve raises, rather than leave code out."""
    import triton.language as tl
    out, todo = {}, [kernel]
    while todo:
        obj = todo.pop()
        py = obj.fn
        name = f"{py.__module__}.{py.__qualname__}"
        if name in out:
            continue
        src = textwrap.dedent(inspect.getsource(py))
        out[name] = hashlib.sha256(src.encode()).hexdigest()
        glb = py.__globals__
        for node in ast.walk(ast.parse(src)):
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            if not isinstance(node, ast.Name) or node.id not in glb:
                continue
            value, label = glb[node.id], f"{py.__module__}.{node.id}"
            for attr in reversed(chain):       # module.function: follow into the module
                if not inspect.ismodule(value):
                    break
                value, label = getattr(value, attr, None), f"{value.__name__}.{attr}"
            if _is_jit(value):
                if value.fn.__module__.split(".")[0] != "triton":   # triton's own: its version keys it
                    todo.append(value)
            elif isinstance(value, tl.constexpr):
                out[label] = repr(value.value)
            elif isinstance(value, (bool, int, float, str)):
                out[label] = repr(value)
    return dict(sorted(out.items()))


def kernel_sources(kernels) -> dict:
    """{kernel: :func:`jit_sources` of its @triton.jit function}."""
    return {kname: jit_sources(kern.fn) for kname, kern in kernels.items()}


def triton_key(job, sources, compiler, measure_code) -> dict:
    kname, dtype, cfg, launch, cc = job
    return {"backend": "triton", "kernel": kname, "dtype": dtype, "arch": f"sm_{cc}",
            "ptxas_arch": CHIPS[cc]["ptxas_arch"], "constexprs": dict(cfg), "launch": dict(launch),
            "sources": sources[kname], "measure": measure_code, "compiler": compiler}


def triton_key_maker(kernels=None, compiler=None):
    """job -> its key, from the current tree (sources hashed once per call of this)."""
    kernels = kernels or _kernels()
    sources, compiler, measure_code = kernel_sources(kernels), compiler or triton_compiler(), measure_hash()
    return lambda job: triton_key(job, sources, compiler, measure_code)


def reuse_or_compile(items, key_of, cached_rows, compile_many, usable=lambda rows: True):
    """For each item, (key, cached rows, None) when rows of the cache carry exactly the key
    computed now by key_of(item) and usable(rows), else (key, None, result), the results coming
    from one call compile_many(the items that missed). Stored keys are only compared against,
    never believed: a row under an older source, configuration, flag or compiler version simply
    has another key, and a configuration the cache lacks is compiled."""
    index = {}
    for r in cached_rows:
        if isinstance(r, dict) and r.get("compiled") and isinstance(r.get("key"), dict):
            index.setdefault(canonical(r["key"]), []).append(r)
    keys = [key_of(it) for it in items]
    hits = [index.get(canonical(k)) for k in keys]
    hits = [h if h and usable(h) else None for h in hits]
    missed = [i for i, h in enumerate(hits) if h is None]
    results = dict(zip(missed, compile_many([items[i] for i in missed]) if missed else []))
    return [(k, h, results.get(i)) for i, (k, h) in enumerate(zip(keys, hits))]


def _triton_usable(rows):
    return all(isinstance(rows[0].get(f), int) and not isinstance(rows[0].get(f), bool) for f in MEASURED)


def load_cache(path) -> list:
    """The rows of a cache file ([] when there is none, or of another format)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    except ValueError as exc:   # e.g. a merge conflict: compile everything rather than stop
        print(f"compile cache {path} unreadable ({exc}): not used", file=sys.stderr)
        return []
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return []
    return [r for r in data.get("rows", []) if isinstance(r, dict)]


def write_cache(path, rows, covered):
    """Refresh the cache file: the compiled rows of this run replace every stored row of the
    (backend, arch) pairs it covered; rows of other backends or architectures stay."""
    keep = [r for r in load_cache(path) if (r.get("backend"), r.get("arch")) not in covered]
    seen, out = set(), []
    fresh = [r for r in rows if r.get("compiled") and "key" in r and all(r["key"].get("compiler", {}).values())]
    for r in keep + fresh:
        r = {k: v for k, v in r.items() if k != "cache"}
        ident = (canonical(r["key"]), r.get("mangled"))
        if ident not in seen:
            seen.add(ident)
            out.append(r)
    out.sort(key=lambda r: (r["backend"], r["kernel"], r.get("dtype", ""), r["arch"], canonical(r["key"]),
                            r.get("mangled", "")))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write('{"format": %d,\n "about": %s,\n "rows": [\n' % (CACHE_FORMAT, json.dumps(
            "compile cache of python -m bench.resources (see its docstring): a row is reused only when "
            "its key equals the key computed from the current tree; bench/README.md says how to "
            "regenerate it")))
        f.write(",\n".join("  " + json.dumps(r, sort_keys=True) for r in out))
        f.write("\n ]}\n")
    os.replace(tmp, path)
    return len(out)


def triton_rows(archs, cached, n_jobs, compiler=None, compile_missing=True):
    """(rows, stats) of every Triton configuration for archs, reusing what `cached` holds under the
    current key and compiling the rest in n_jobs processes. compile_missing False (a report of
    another compiler than the installed one, e.g. triton 3.6's, read back from its cache file):
    a configuration the cache lacks under ``compiler`` becomes a row that did not compile, with
    the reason, instead of being compiled by the installed triton."""
    kernels = _kernels()
    job_list = jobs(archs, kernels)
    compiler = compiler or triton_compiler()
    if not all(compiler.values()):   # a version that could not be read matches nothing
        print(f"compile cache unused: no version from {[k for k, v in compiler.items() if not v]}", file=sys.stderr)
        cached = []
    key_of = triton_key_maker(kernels, compiler)

    def compile_many(missed):
        if not compile_missing:
            return [dict(compiled=False, error=f"no row in the cache for this configuration under {compiler} "
                                               "(the kernel, its configuration or the measuring code changed "
                                               "since the cache was written: regenerate it)") for _ in missed]
        with ProcessPoolExecutor(max_workers=max(1, min(n_jobs, len(missed)))) as pool:
            return list(pool.map(measure, missed))

    rows = []
    for job, (key, hit, m) in zip(job_list, reuse_or_compile(job_list, key_of, cached, compile_many, _triton_usable)):
        row = make_row(job, dict(compiled=True, **{f: hit[0][f] for f in MEASURED}) if hit else m)
        # a reused row reports the key it was stored under (equal to `key`, or the lookup is wrong:
        # tests/test_compile.py compares every row's key with one it computes itself)
        row.update(key=hit[0]["key"] if hit else key, cache="reused" if hit else "compiled")
        rows.append(row)
    reused = sum(r["cache"] == "reused" for r in rows)
    return rows, dict(rows=len(rows), reused=reused, compiled=len(rows) - reused)


def _cuda_rows(archs, jobs_, cached):
    """(rows, meta) of the CUDA kernels, or ([], {"skipped": why}) without nvcc."""
    from bench import cuda_resources
    if cuda_resources.find_nvcc() is None:
        return [], {"skipped": "nvcc not found (set CUDA_HOME or put nvcc on PATH)"}
    return cuda_resources.rows(archs, CHIPS, REGS_PER_SM, MAX_WARPS_PER_SM, jobs=jobs_, cached=cached)


def table(rows) -> str:
    head = ("| kernel | dtype | arch | config | warps/stages/maxnreg | regs | spill st/ld | stack | shared KB (limit) "
            "| HMMA | HGMMA | tf32 | ordered atomics | LDL/STL | warps/SM |\n|" + " --- |" * 15)
    lines = [head]
    for r in rows:
        if not r["compiled"]:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['config']} | {r['num_warps']}/{r['num_stages']}/{r['maxnreg']} "
                         f"| COMPILE FAILED: {r['error'][:80]} |" + " |" * 10)
            continue
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['config']} | {r['num_warps']}/{r['num_stages']}/{r['maxnreg']} "
                     f"| {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} "
                     f"| {r['shared'] / 1024:.0f} ({r['shared_limit'] // 1024}) | {r['hmma']} | {r['hgmma']} "
                     f"| {r['tf32']} | {r['ordered_atomics']} | {r['ldl']}/{r['stl']} | {r['warps_per_sm']} |")
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


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)   # before triton is imported (the interpreter has no GPU compiler)
    ap = argparse.ArgumentParser(prog="python -m bench.resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(CHIPS))
    ap.add_argument("--backend", nargs="+", default=["triton", "cuda"], choices=("triton", "cuda"),
                    help="kernels to compile: the Triton kernels, the extension's CUDA kernels (default both)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-file", default=CACHE, help="the compile cache (default bench/results/resources.json)")
    ap.add_argument("--no-cache", action="store_true",
                    help="reuse no cached row: compile every configuration (a table run still rewrites the cache)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cache-read-only", action="store_true",
                      help="reuse cached rows whose key matches but leave the cache file as it is "
                           "(default with --json)")
    mode.add_argument("--write-cache", action="store_true",
                      help="refresh the cache file also with --json (a table run always does unless --cache-read-only)")
    args = ap.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    write = args.write_cache or not (args.json or args.cache_read_only)
    cached = [] if args.no_cache else load_cache(args.cache_file)
    rows, stats, cuda_rows, cuda_meta = [], {}, [], {}
    with ThreadPoolExecutor(max_workers=1) as side:
        # the CUDA compiles (nvcc subprocesses) run beside Triton's compile processes
        cuda_future = (side.submit(_cuda_rows, args.arch, max(1, args.jobs), cached)
                       if "cuda" in args.backend else None)
        if "triton" in args.backend:
            rows, stats = triton_rows(args.arch, cached, max(1, args.jobs))
        if cuda_future is not None:
            cuda_rows, cuda_meta = cuda_future.result()
    if cuda_meta.get("skipped"):
        print(f"CUDA kernels skipped: {cuda_meta['skipped']}", file=sys.stderr)
    where = "no cache" if args.no_cache else os.path.relpath(args.cache_file, ROOT)
    if rows:
        print(f"compile cache ({where}): triton {stats['rows']} rows: {stats['reused']} reused, "
              f"{stats['compiled']} compiled", file=sys.stderr)
    if cuda_rows:
        print(f"compile cache ({where}): cuda {len(cuda_rows)} rows: {cuda_meta['reused']} reused, "
              f"{len(cuda_rows) - cuda_meta['reused']} compiled ({cuda_meta['units_reused']} of "
              f"{cuda_meta['units']} nvcc compiles reused)", file=sys.stderr)
    if args.json:
        print(json.dumps(rows + cuda_rows))
    else:
        if rows:
            print(table(rows))
        if cuda_rows:
            print(cuda_table(cuda_rows))
    if write and (rows or cuda_rows):
        covered = {(r["backend"], r["arch"]) for r in rows + cuda_rows}
        n = write_cache(args.cache_file, rows + cuda_rows, covered)
        print(f"compile cache written: {os.path.relpath(args.cache_file, ROOT)} ({n} rows)", file=sys.stderr)
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
