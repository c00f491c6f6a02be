"""Re-run the planted bugs ("mutants") that the test suite must catch.

Each catalogue file beside this one (``catalog_*.py``) holds ``MUTANTS``: a list of dicts

    name   what the bug is, in words
    file   the file it is planted in (repository-relative)
    old    text that occurs exactly once in that file
    new    what replaces it
    tests  the pytest node ids (or files) that must fail with the bug in place

For every mutant the runner copies the repository (tracked files and the built extension) to a
temporary folder, plants the bug there, runs its tests in that copy and reports KILLED (the
tests failed, or their process died of a signal the bug caused) or SURVIVED. It first runs every
named test on the unmutated copy: a test that fails without the bug proves nothing, and the run
stops.

    python tests/mutants/run.py            # every mutant
    python tests/mutants/run.py -k prefilter   # those whose name contains the word
    python tests/mutants/run.py --list

Exit status 0 when every selected mutant was killed. Python files only (the compiled
extension is copied as built). Not part of the default test run: it costs one pytest run per
mutant.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def catalogue():
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "catalog_*.py"))):
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for m in mod.MUTANTS:
            out.append(dict(m, catalog=os.path.basename(path)))
    return out


def _copy_tree(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    files += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "rcar_fast", "_C*.so"))]
    for rel in files:
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))
    # rcar_fast.kernels must resolve to the copy's kernels/, not the editable install's
    link = os.path.join(dst, "rcar_fast", "kernels")
    if os.path.isdir(os.path.join(dst, "kernels")) and not os.path.exists(link):
        os.symlink(os.path.join("..", "kernels"), link)   # relative: survives copytree


def _pytest(copy: str, tests, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)


def plant(copy: str, m) -> None:
    path = os.path.join(copy, m["file"])
    with open(path) as f:
        text = f.read()
    n = text.count(m["old"])
    if n != 1:
        raise SystemExit(f"mutant {m['name']!r}: its text occurs {n} times in {m['file']} (needs exactly 1); "
                         "update the catalogue")
    with open(path, "w") as f:
        f.write(text.replace(m["old"], m["new"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    muts = [m for m in catalogue() if args.k.lower() in m["name"].lower()]
    if args.list:
        for m in muts:
            print(f"{m['catalog']}: {m['name']}\n    {m['file']}  ->  {' '.join(m['tests'])}")
        return 0
    tests = sorted({t for m in muts for t in m["tests"]})
    with tempfile.TemporaryDirectory(prefix="rcar_mutants_") as tmp:
        base = os.path.join(tmp, "base")
        _copy_tree(base)
        for m in muts:          # every old text present exactly once before anything runs
            with open(os.path.join(base, m["file"])) as f:
                if f.read().count(m["old"]) != 1:
                    raise SystemExit(f"mutant {m['name']!r}: text not found exactly once in {m['file']}")
        clean = _pytest(base, tests, args.timeout)
        if clean.returncode != 0:
            print(clean.stdout[-3000:], clean.stderr[-2000:])
            print("the named tests fail WITHOUT any mutant: fix them first")
            return 2
        survived = []
        for i, m in enumerate(muts):
            copy = os.path.join(tmp, f"m{i}")
            shutil.copytree(base, copy, symlinks=True)
            plant(copy, m)
            r = _pytest(copy, m["tests"], args.timeout)
            # rc < 0: the test process died of a signal the bug caused (an out-of-bounds access in
            # compiled code, e.g. a CUDA kernel under tests/cuda_emu): the tests noticed it too
            verdict = ("KILLED" if r.returncode == 1 else "SURVIVED" if r.returncode == 0
                       else f"KILLED (crashed, signal {-r.returncode})" if r.returncode < 0
                       else f"ERROR rc={r.returncode}")
            if r.returncode != 1 and r.returncode >= 0:
                survived.append(m["name"])
                if r.returncode != 0:
                    print(r.stdout[-1500:], r.stderr[-1500:])
            print(f"{verdict:9s} {m['name']}  ({' '.join(m['tests'])})", flush=True)
            shutil.rmtree(copy, ignore_errors=True)
    print(f"{len(muts) - len(survived)} of {len(muts)} mutants killed")
    return 0 if not survived else 1


if __name__ == "__main__":
    sys.exit(main())
