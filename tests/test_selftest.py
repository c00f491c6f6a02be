"""The self-test (rcar_fast.selftest, `rcar-fast selftest`) and what backend="auto" does with it:
each (backend, device, dtype) is self-tested once per process before auto first trusts it, a
failing backend is skipped with one warning, RCAR_FAST_SELFTEST=0 turns it off, and auto never
picks a backend that cannot take the inputs' dtype."""

from __future__ import annotations

import warnings

import pytest
import torch

import rcar_fast
from rcar_fast import backends, ops
from rcar_fast.app.cli import main as cli
from rcar_testutil import make_head, make_inputs

HAS_CPP = rcar_fast.backend_status()["cpp"] == "available"
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=rcar_fast.backend_status()["cpp"])


@pytest.fixture
def fresh(monkeypatch):
    """A clean self-test cache (and status) before, and after the environment is restored."""
    backends.backend_status(refresh=True)
    backends._WARNED.clear()
    yield
    monkeypatch.undo()
    backends.backend_status(refresh=True)
    backends._WARNED.clear()


def test_selftest_table_every_dtype(capsys, fresh):
    rows = rcar_fast.selftest("cpu", backends=["torch"] + (["cpp"] if HAS_CPP else []))
    out = capsys.readouterr().out
    assert {(r.backend, r.dtype) for r in rows} == {
        (b, dt) for b in ["torch"] + (["cpp"] if HAS_CPP else [])
        for dt in ("float32", "float16", "bfloat16", "float64")}
    assert all(r.ok for r in rows), [(r.backend, r.dtype, r.failure) for r in rows if not r.ok]
    for r in rows:
        assert r.forward_err <= r.forward_tol and r.grad_err <= r.grad_tol and r.seconds > 0
    assert "fwd err" in out and out.count(" ok") == len(rows)


def test_selftest_lists_refused_dtypes_as_skipped(capsys, fresh):
    if "triton" not in rcar_fast.available_backends("cpu"):
        pytest.skip("triton's interpreter not available")
    rows = rcar_fast.selftest("cpu", backends=["triton"], dtypes=[torch.bfloat16])
    assert rows == []
    assert "skipped" in capsys.readouterr().out


def test_selftest_keeps_the_global_rng(fresh):
    state = torch.get_rng_state()
    rcar_fast.selftest("cpu", backends=["torch"], dtypes=[torch.float32], quiet=True)
    assert torch.equal(state, torch.get_rng_state())


def test_selftest_runs_under_no_grad_and_inference_mode(fresh):
    with torch.inference_mode():
        rows = rcar_fast.selftest("cpu", backends=["torch"], dtypes=[torch.float32], quiet=True)
    assert rows and rows[0].ok, rows[0].failure


def _broken(monkeypatch, delta):
    """The cpp backend's rar op returns h + delta (a plausible silent bug in a kernel)."""
    import dataclasses

    from rcar_fast.backends import extension_kernels
    real = extension_kernels.CPP.rar

    def wrong(*a, **k):
        return real(*a, **k) + delta
    monkeypatch.setattr(extension_kernels, "CPP", dataclasses.replace(extension_kernels.CPP, rar=wrong))


@needs_cpp
def test_failing_backend_is_caught_and_auto_falls_back_with_one_warning(monkeypatch, fresh):
    _broken(monkeypatch, 1e-2)
    rows = rcar_fast.selftest("cpu", backends=["cpp"], dtypes=[torch.float32], quiet=True)
    assert not rows[0].ok and "forward error" in rows[0].failure
    backends.backend_status(refresh=True)
    with pytest.warns(RuntimeWarning, match="'cpp' failed its self-test"):
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the second time: cached, no second warning
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    # the scores auto returns are the torch backend's, not the broken ones
    img, cap, lens = make_inputs(2, 3, 4, 5, 16, torch.float32, 1)
    head = make_head("coop_rcar", 2, "t2i", 16, 8, torch.float32, 1)
    with torch.no_grad():
        assert torch.equal(head(img, cap, lens), head(img, cap, lens, backend="torch"))


@needs_cpp
def test_selftest_runs_once_per_backend_device_dtype(monkeypatch, fresh):
    from rcar_fast import _selftest
    calls = []
    real = _selftest.check_backend

    def counted(*a):
        calls.append(a)
        return real(*a)
    monkeypatch.setattr(_selftest, "check_backend", counted)
    for _ in range(3):
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "cpp"
    assert backends.resolve("auto", torch.device("cpu"), torch.float64) == "cpp"
    assert [c[0] for c in calls] == ["cpp", "cpp"] and [c[2] for c in calls] == [torch.float32, torch.float64]


@needs_cpp
def test_selftest_can_be_turned_off(monkeypatch, fresh):
    _broken(monkeypatch, 1e-2)
    monkeypatch.setenv("RCAR_FAST_SELFTEST", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "cpp"


def test_auto_never_picks_a_backend_that_cannot_take_the_dtype(monkeypatch, fresh):
    """On a (simulated) GPU machine: float64 goes to torch (cuda takes no float64; triton would
    compute it at float32 accuracy), float32 to cuda, bfloat16 under the interpreter never to
    triton."""
    status = dict(backends.backend_status(), cuda="available", triton="available")
    monkeypatch.setattr(backends, "backend_status", lambda refresh=False: dict(status))
    monkeypatch.setattr(backends, "_passes_selftest", lambda *a: True)
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda, torch.float64) == "torch"
    assert backends.resolve("auto", cuda, torch.float32) == "cuda"
    status["cuda"] = "unavailable: test"
    assert backends.resolve("auto", cuda, torch.float32) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve("auto", cuda, torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="backend.*'cuda'.*float64"):
        status["cuda"] = "available"
        backends.resolve("cuda", cuda, torch.float64)


def test_triton_refuses_bf16_under_the_interpreter(fresh):
    if "triton" not in rcar_fast.available_backends("cpu"):
        pytest.skip("triton's interpreter not available")
    img, cap, lens = make_inputs(2, 3, 4, 5, 16, torch.bfloat16, 1)
    head = make_head("coop_rcar", 2, "t2i", 16, 8, torch.bfloat16, 1)
    with pytest.raises(ValueError, match=r"backend: 'triton' cannot compute bfloat16 under TRITON_INTERPRET=1"):
        head(img, cap, lens, backend="triton")
    with pytest.raises(ValueError, match="bfloat16"):
        ops.adaptive_attention(img, cap, lens, backend="triton")


def test_cli_selftest(capsys, fresh):
    assert cli(["selftest", "--device", "cpu", "--backends", "torch", "--dtypes", "fp32,fp64"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "float64" in out and "FAILED" not in out
    assert cli(["selftest", "--device", "cpu", "--dtypes", "fp8"]) == 2
    assert cli(["selftest", "--device", "cpu", "--backends", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "fp8" in err and "nope" in err


@needs_cpp
def test_cli_selftest_exit_1_on_a_failure(monkeypatch, capsys, fresh):
    _broken(monkeypatch, 1e-2)
    assert cli(["selftest", "--device", "cpu", "--backends", "cpp", "--dtypes", "fp32"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_shape_limits_refuse_at_the_boundary_and_steer_auto(monkeypatch, fresh):
    """triton takes at most 64 rows per pair and s <= 256: asked explicitly for more, a
    ValueError naming the backend before any work; auto passes over it."""
    if "triton" not in rcar_fast.available_backends("cpu"):
        pytest.skip("triton's interpreter not available")
    img, cap, lens = make_inputs(1, 2, 4, 65, 16, torch.float32, 1, lens=[65, 3])
    head = make_head("coop_rcar", 1, "t2i", 16, 8, torch.float32, 1)
    with pytest.raises(ValueError, match=r"backend: 'triton' takes at most 64 .*got 65"):
        head(img, cap, lens, backend="triton")
    with torch.no_grad():                       # cut to 64 words it runs
        head(img, cap[:, :64], torch.tensor([64, 3]), backend="triton")
    status = dict(backends.backend_status(), cuda="unavailable: test", triton="available")
    monkeypatch.setattr(backends, "backend_status", lambda refresh=False: dict(status))
    monkeypatch.setattr(backends, "_passes_selftest", lambda *a: True)
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda, torch.float32, rows=64, width=256) == "triton"
    assert backends.resolve("auto", cuda, torch.float32, rows=65, width=256) == "torch"
    assert backends.resolve("auto", cuda, torch.float32, rows=36, width=512) == "torch"
