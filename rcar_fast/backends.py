"""Which backends exist, which work here, and why the others do not.

Known backends, fastest last within a device:
  reference  SPEC.md per caption (rcar_fast.reference); ground truth, any device.
  torch      the pair grid in blocks, plain PyTorch (rcar_fast.torch_backend); any device.
  triton     fused Triton kernels (rcar_fast.kernels); CUDA tensors, or CPU tensors under
             TRITON_INTERPRET=1 (Triton's interpreter, for tests). The attention's backward is
             a kernel; RAR's backward recomputes in torch.
  cpp        the compiled extension's C++ CPU kernels (csrc/cpu/), CPU tensors.
  cuda       the compiled extension's CUDA kernels (csrc/cuda/), CUDA tensors.
The extension (rcar_fast._C) is optional: without it, or built without CUDA, backend_status()
says why "cpp" / "cuda" is absent.
"""

from __future__ import annotations

import functools
import os
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
        from . import ext_backend  # noqa: F401
    except ImportError as exc:
        return (f"unavailable: the compiled extension rcar_fast._C is not built ({exc}); "
                "build it with `pip install --no-build-isolation -e .`")
    return None


def _extension_status(key: str) -> str:
    err = _extension_error()
    if err is not None:
        return err
    from . import ext_backend
    if not ext_backend.has_kernels(key):
        return (f"unavailable: rcar_fast._C was built without {key} kernels"
                + (" (torch without CUDA, no CUDA toolkit, or RCAR_FAST_BUILD_EXT=cpu)" if key == "CUDA" else ""))
    if key == "CUDA" and not torch.cuda.is_available():
        return "unavailable: no CUDA device"
    return "available"


def backend_status() -> Dict[str, str]:
    """``{name: "available" or the reason it is not}`` for every known backend."""
    return {
        "reference": "available",
        "torch": "available",
        "triton": _triton_status(),
        "cpp": _extension_status("CPU"),
        "cuda": _extension_status("CUDA"),
    }


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """Backend names usable here (for tensors on ``device`` when given)."""
    st = backend_status()
    names = [n for n in KNOWN if st[n] == "available"]
    if device is not None:
        dev = torch.device(device).type
        names = [n for n in names if n in ("reference", "torch") or n in AUTO_ORDER.get(dev, ())
                 or (n == "triton" and _interpreting())]
    return names


def resolve(backend, device: torch.device) -> str:
    """The backend to run for tensors on ``device``; raises ValueError naming the problem."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    st = backend_status()
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ()) + ("torch",):
            if st[name] == "available":
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
    return backend
