"""The mutant catalogues (tests/mutants/catalog_*.py) stay runnable: every planted bug's text
occurs exactly once in its file and every test it names exists, so a refactor that moves the
code fails here, in the default run, instead of stopping `python tests/mutants/run.py` later."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("mutant_runner", os.path.join(ROOT, "tests", "mutants", "run.py"))
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)
MUTANTS = runner.catalogue()


def test_there_are_catalogues():
    assert len(MUTANTS) >= 50 and len({m["catalog"] for m in MUTANTS}) >= 5


@pytest.mark.parametrize("m", MUTANTS, ids=[f"{m['catalog']}:{k}" for k, m in enumerate(MUTANTS)])
def test_each_mutant_applies_once_and_names_real_tests(m):
    with open(os.path.join(ROOT, m["file"]), encoding="utf-8") as f:
        text = f.read()
    assert text.count(m["old"]) == 1, f"{m['name']}: its text occurs {text.count(m['old'])} times in {m['file']}"
    assert m["new"] != m["old"] and m["tests"], m["name"]
    for node in m["tests"]:
        path, _, rest = node.partition("::")
        assert os.path.isfile(os.path.join(ROOT, path)), f"{m['name']}: no test file {path}"
        if rest:
            func = rest.split("[")[0].split("::")[-1]
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                assert f"def {func}(" in f.read(), f"{m['name']}: no test {func} in {path}"
