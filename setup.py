"""Build and install rcar_fast.

    pip install --no-build-isolation -e .

Environment flags (all of them):
  RCAR_FAST_BUILD_EXT=0      build no compiled extension (the package works without it)
  RCAR_FAST_BUILD_EXT=cpu    build the C++ CPU extension only, even where CUDA is available
  CUDA_HOME                  the CUDA toolkit root; when unset it is read from
                             `nvcc --dryrun` (its TOP= folder), since the nvcc on PATH may be
                             a wrapper script whose own folder is not the toolkit
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0a": 9.0a, not plain 9.0, is
                             what lets an H100/H200 run the wgmma kernels, csrc/cuda/wgmma.cuh;
                             a list with plain 9.0 runs the wmma kernels there; "+PTX" on
                             9.0a embeds sm_90a-only PTX, which later GPUs cannot JIT)
  MAX_JOBS                   parallel compile jobs (torch's ninja builder)

The extension rcar_fast._C is built from csrc/ when it has sources: a CUDAExtension when torch
has CUDA and a toolkit is found, a CppExtension otherwise. With no sources, none is built.
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True,
                             timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"TOP=(\S+)", out)
    return os.path.realpath(m.group(1)) if m else None


def _extensions():
    mode = os.environ.get("RCAR_FAST_BUILD_EXT", "auto").lower()
    if mode in ("0", "no", "off", "false"):
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp and not cu:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # no -std: BuildExtension picks the one torch's headers need (C++20 for 2.14). -fopenmp:
    # at::parallel_for is an inline OpenMP region in torch's headers (AT_PARALLEL_OPENMP); its
    # GOMP symbols resolve to the libgomp libtorch_cpu already loads.
    cxx = ["-O3", "-fopenmp"]
    home = _cuda_home()
    if mode != "cpu" and cu and torch.version.cuda and home:
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        archs = '-DRCAR_FAST_CUDA_ARCHS=\"%s\"' % re.sub(r"[^0-9.+A-Za-z]+", ",", arch_list)
        # the launchers take the wgmma kernels on a 9.0 device only where its code is sm_90a's:
        # with plain 9.0 in the list too, the driver may load that one, where they trap
        # (a named architecture such as "Hopper" may stand for plain 9.0: then none)
        tokens = set(re.split(r"[\s;,]+", arch_list.replace("+PTX", "").strip()))
        numeric = all(re.fullmatch(r"\d+\.\d+a?", t) for t in tokens)
        nvcc_defs = ["-DRCAR_FAST_SM90A"] if numeric and "9.0a" in tokens and "9.0" not in tokens else []
        ext = cpp_extension.CUDAExtension(
            "rcar_fast._C", cpp + cu, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DRCAR_FAST_WITH_CUDA", archs, *nvcc_defs],
                                "nvcc": ["-O3", "-DRCAR_FAST_WITH_CUDA", *nvcc_defs]})
    else:
        ext = cpp_extension.CppExtension("rcar_fast._C", cpp, include_dirs=[os.path.join(ROOT, "csrc")],
                                         extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="rcar_fast",
    version="0.1.0",
    description="Fast RCAR image-text matching: fused region-word attention with regulators",
    packages=["rcar_fast", "rcar_fast.backends", "rcar_fast.app", "rcar_fast.kernels"],
    package_dir={"rcar_fast": "rcar_fast", "rcar_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest", "hypothesis"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["rcar-fast=rcar_fast.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
