"""The import rules of ARCHITECTURE.md, checked on the source (ast) and on a fresh interpreter:

- the package never imports bench/ or tests/;
- `import rcar_fast` stays light: no application module (rcar_fast.app), no kernel set and no
  kernels until a call needs them; the library never imports numpy itself (only the app does);
- nothing in the library imports the application (rcar_fast/__main__.py is the app's entry);
- kernels/ imports from the package only the backend contract and the constants (never the
  ops, modules, pipeline or another layer above);
- backends are reached only through the registry (rcar_fast/backends/__init__.py): no other
  module imports a kernel-set module, and no kernel-set module imports another's;
- no fast path (pipeline, kernel sets, kernels) imports the reference.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SETS = {"torch_kernels", "triton_kernels", "extension_kernels"}


def _sources():
    """{path relative to ROOT: ast} of every Python file of rcar_fast/ and kernels/."""
    out = {}
    for top in ("rcar_fast", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    with open(path) as fh:
                        out[os.path.relpath(path, ROOT)] = ast.parse(fh.read(), path)
    return out


def _module_name(rel: str) -> str:
    parts = rel[:-3].split(os.sep)
    if parts[0] == "kernels":
        parts = ["rcar_fast", "kernels"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(rel: str, tree) -> list:
    """Absolute names of every module imported anywhere in the file (function bodies too);
    ``from X import y`` counts as X and X.y."""
    me = _module_name(rel)
    pkg = me if rel.endswith("__init__.py") else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


SOURCES = _sources()
IMPORTS = {rel: _imports(rel, tree) for rel, tree in SOURCES.items()}


def _offenders(files, predicate):
    return sorted(f"{rel}: {name}" for rel in files for name in IMPORTS[rel] if predicate(name))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_walk_sees_the_tree():
    assert "rcar_fast/pipeline.py" in SOURCES and "kernels/attention.py" in SOURCES
    assert "rcar_fast.backends.contract" in IMPORTS["rcar_fast/pipeline.py"]
    assert "rcar_fast.kernels.attention" in IMPORTS["kernels/rar.py"]     # relative import resolved


def test_package_never_imports_bench_or_tests():
    assert not _offenders(SOURCES, lambda n: _under(n, "bench") or _under(n, "tests") or _under(n, "conftest"))


def test_library_never_imports_numpy_or_the_app():
    app = (os.path.join("rcar_fast", "app"), os.path.join("rcar_fast", "__main__.py"))   # `python -m rcar_fast`
    library = [rel for rel in SOURCES if not rel.startswith(app)]
    assert not _offenders(library, lambda n: _under(n, "numpy"))
    assert not _offenders(library, lambda n: _under(n, "rcar_fast.app"))


def test_kernels_import_only_the_contract_and_constants():
    allowed = ("rcar_fast.backends.contract", "rcar_fast.constants")
    files = [rel for rel in SOURCES if rel.startswith("kernels")]
    bad = _offenders(files, lambda n: _under(n, "rcar_fast") and not _under(n, "rcar_fast.kernels")
                     and not any(_under(n, a) for a in allowed) and n not in ("rcar_fast.backends", "rcar_fast"))
    assert not bad, bad


def test_backends_reached_only_through_the_registry():
    registry = os.path.join("rcar_fast", "backends", "__init__.py")

    def names_a_kernel_set(n):
        return any(_under(n, f"rcar_fast.backends.{k}") for k in KERNEL_SETS)
    bad = _offenders([rel for rel in SOURCES if rel != registry], names_a_kernel_set)
    assert not bad, bad


def test_no_fast_path_imports_the_reference():
    fast = [rel for rel in SOURCES if rel.startswith("kernels") or rel.startswith(os.path.join("rcar_fast", "backends"))
            or rel == os.path.join("rcar_fast", "pipeline.py")]
    assert not _offenders(fast, lambda n: _under(n, "rcar_fast.reference"))


@pytest.mark.parametrize("rule", ["kernels->modules", "backend->backend", "library->app"])
def test_the_rules_catch_a_planted_import(rule):
    """Each rule fails on a file that breaks it (so the checks above can fail)."""
    planted = {"kernels->modules": ("kernels/x.py", "from rcar_fast.modules import RCARSimilarity\n",
                                    test_kernels_import_only_the_contract_and_constants),
               "backend->backend": ("rcar_fast/backends/triton_kernels.py", "from .torch_kernels import _Block\n",
                                    test_backends_reached_only_through_the_registry),
               "library->app": ("rcar_fast/ops.py", "from .app import retrieval\n",
                                test_library_never_imports_numpy_or_the_app)}[rule]
    rel, code, check = planted
    rel = rel.replace("/", os.sep)
    saved = IMPORTS.get(rel)
    SOURCES.setdefault(rel, ast.parse(code))
    IMPORTS[rel] = (saved or []) + _imports(rel, ast.parse(code))
    try:
        with pytest.raises(AssertionError):
            check()
    finally:
        if saved is None:
            del IMPORTS[rel], SOURCES[rel]
        else:
            IMPORTS[rel] = saved


def test_import_rcar_fast_is_light():
    """A fresh interpreter: `import rcar_fast` loads no application module, no kernel set, no
    Triton kernel, nothing of bench/ or tests/; the app loads on first use of its names."""
    code = ("import sys, rcar_fast\n"
            "mods = sorted(m for m in sys.modules if m.startswith(('rcar_fast', 'bench', 'tests', 'triton')))\n"
            "print(' '.join(mods))\n"
            "rcar_fast.score_all\n"
            "print('app' if 'rcar_fast.app.retrieval' in sys.modules else 'no app')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, after = out.stdout.strip().splitlines()
    mods = loaded.split()
    assert not [m for m in mods if m.startswith(("rcar_fast.app", "rcar_fast.kernels", "bench", "tests", "triton"))], mods
    assert not [m for m in mods if m.split(".")[-1] in KERNEL_SETS], mods
    assert after == "app"
