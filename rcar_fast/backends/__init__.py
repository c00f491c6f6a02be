"""The backend registry: which backends exist, which work here and why the others do not, which
one runs a call, and each one's kernel set (:func:`kernel_set`; the contract is
:class:`rcar_fast.backends.contract.KernelSet`). Everything reaches a backend through here.

Known backends:
  reference  SPEC.md per caption (rcar_fast.reference); ground truth, any device; no kernel set
             (it keeps its own schedule).
  torch      the contract in plain PyTorch (torch_kernels.py); any device.
  triton     fused Triton kernels (rcar_fast.kernels, bound in triton_kernels.py); CUDA tensors,
             or CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
  cpp        the compiled extension's C++ CPU kernels (csrc/cpu/, bound in extension_kernels.py).
  cuda       the compiled extension's CUDA kernels (csrc/cuda/, bound in extension_kernels.py).
The extension (rcar_fast._C) is optional: without it, or built without CUDA, backend_status()
says why "cpp" / "cuda" is absent.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Dict, List, Optional

import torch

KNOWN = ("reference", "torch", "triton", "cpp", "cuda")
#: the order in which ``backend="auto"`` prefers available backends, per device type
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def _triton_status() -> str:
    err = _triton_import_error()
    if err is not None:
        return f"unavailable: triton does not import ({err})"
    if not torch.cuda.is_available() and not _interpreting():
        return "unavailable: no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors, slowly)"
    return "available"


@functools.lru_cache(maxsize=None)
def _extension_error() -> Optional[str]:
    try:
        from . import extension_kernels  # noqa: F401
    except ImportError as exc:
        return (f"unavailable: the compiled extension rcar_fast._C is not built ({exc}); "
                "build it with `pip install --no-build-isolation -e .`")
    return None


def _extension_status(key: str) -> str:
    err = _extension_error()
    if err is not None:
        return err
    from . import extension_kernels
    if not extension_kernels.has_kernels(key):
        return (f"unavailable: rcar_fast._C was built without {key} kernels"
                + (" (torch without CUDA, no CUDA toolkit, or RCAR_FAST_BUILD_EXT=cpu)" if key == "CUDA" else ""))
    if key == "CUDA" and not torch.cuda.is_available():
        return "unavailable: no CUDA device"
    return "available"


_STATUS: Optional[Dict[str, str]] = None


def backend_status(refresh: bool = False) -> Dict[str, str]:
    """``{name: "available" or the reason it is not}`` for every known backend.

    Computed once per process (imports, the extension, CUDA and TRITON_INTERPRET are probed the
    first time); ``refresh=True`` probes again (tests that change the environment)."""
    global _STATUS
    if _STATUS is None or refresh:
        if refresh:
            _triton_import_error.cache_clear()
            _extension_error.cache_clear()
            _SELFTEST.clear()
        _STATUS = {
            "reference": "available",
            "torch": "available",
            "triton": _triton_status(),
            "cpp": _extension_status("CPU"),
            "cuda": _extension_status("CUDA"),
        }
    return dict(_STATUS)


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """Backend names usable here (for tensors on ``device`` when given)."""
    st = backend_status()
    names = [n for n in KNOWN if st[n] == "available"]
    if device is not None:
        dev = torch.device(device).type
        names = [n for n in names if n in ("reference", "torch") or n in AUTO_ORDER.get(dev, ())
                 or (n == "triton" and _interpreting())]
    return names


def kernel_set(name: str):
    """The :class:`~rcar_fast.backends.contract.KernelSet` of backend ``name`` (not "reference"),
    importing its module on first use."""
    if name == "torch":
        from .torch_kernels import KERNELS
        return KERNELS
    if name == "triton":
        from .triton_kernels import KERNELS
        return KERNELS
    if name in ("cpp", "cuda"):
        from . import extension_kernels
        return extension_kernels.CPP if name == "cpp" else extension_kernels.CUDA
    raise ValueError(f"backend: {name!r} has no kernel set")


def shape_problem(backend: str, rows: int, width: int) -> Optional[str]:
    """Why ``backend`` cannot take pairs of up to ``rows`` query/context rows (regions or
    words) and alignment vectors ``width`` wide, or None."""
    if backend == "triton":
        from .triton_kernels import shape_problem as triton_shape_problem
        return triton_shape_problem(rows, width)
    return None


def dtype_problem(backend: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why ``backend`` cannot compute ``dtype`` correctly here, or None if it can.

    cuda: its kernels take float32, float16 and bfloat16 only. triton: under TRITON_INTERPRET=1
    Triton's CPU interpreter computes bfloat16 wrongly without an error (DESIGN.md), so bf16 is
    refused there."""
    if dtype is None:
        return None
    if backend == "cuda" and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"'cuda' takes float32, float16 and bfloat16 inputs, not {dtype}"
    if backend == "triton" and dtype == torch.bfloat16 and _interpreting():
        return ("'triton' cannot compute bfloat16 under TRITON_INTERPRET=1 (Triton's CPU interpreter "
                "computes bf16 wrongly, silently); use float32/float16 or another backend")
    return None


#: backends "auto" may pick for a dtype: exact ones only (triton computes float64 at fp32
#: accuracy, so float64 goes to a backend that keeps it)
def _auto_takes(backend: str, dtype: Optional[torch.dtype]) -> bool:
    if dtype_problem(backend, dtype) is not None:
        return False
    return not (backend == "triton" and dtype == torch.float64)


#: (backend, device, dtype) -> None when the self-test passed, else the failure in words
_SELFTEST: Dict[tuple, Optional[str]] = {}
_WARNED: set = set()


def selftest_enabled() -> bool:
    """Whether "auto" self-tests a backend before first use (RCAR_FAST_SELFTEST=0 turns it off)."""
    return os.environ.get("RCAR_FAST_SELFTEST", "1") != "0"


def _passes_selftest(backend: str, device: torch.device, dtype: Optional[torch.dtype]) -> bool:
    if backend in ("reference", "torch") or not selftest_enabled():
        return True
    if torch.compiler.is_compiling():    # tracing: the self-test ran (or runs) eagerly
        return True
    key = (backend, str(device), dtype)
    if key not in _SELFTEST:
        from .._selftest import check_backend
        _SELFTEST[key] = check_backend(backend, device, dtype)
    failure = _SELFTEST[key]
    if failure is not None and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"rcar_fast: backend {backend!r} failed its self-test on {device} {dtype} "
                      f"({failure}); backend='auto' uses the next one. RCAR_FAST_SELFTEST=0 skips "
                      "the self-test; rcar_fast.selftest() prints the whole table.",
                      RuntimeWarning, stacklevel=4)
    return failure is None


def resolve(backend, device: torch.device, dtype: Optional[torch.dtype] = None, rows: int = 0,
            width: int = 0) -> str:
    """The backend to run for tensors of ``dtype`` on ``device``, pairs of up to ``rows``
    query/context rows and alignment vectors ``width`` wide; raises ValueError naming the
    problem.

    "auto": the first of AUTO_ORDER[device] that is available, takes ``dtype`` exactly and the
    shapes, and passes its self-test (run once per process per backend, device and dtype: a small
    problem forward and backward against the reference, rcar_fast._selftest), else "torch"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    device = torch.device(device)
    st = backend_status()
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ()):
            if (st[name] == "available" and _auto_takes(name, dtype) and shape_problem(name, rows, width) is None
                    and _passes_selftest(name, device, dtype)):
                return name
        return "torch"
    if backend not in st:
        raise ValueError(f"backend: unknown {backend!r}; known: auto, {', '.join(KNOWN)}")
    if st[backend] != "available":
        raise ValueError(f"backend: {backend!r} is {st[backend]}")
    if backend in ("cpp",) and device.type != "cpu":
        raise ValueError(f"backend: 'cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend: 'cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    problem = dtype_problem(backend, dtype) or shape_problem(backend, rows, width)
    if problem is not None:
        raise ValueError(f"backend: {problem}")
    return backend
