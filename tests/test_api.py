"""Argument checks (each error names its argument and comes before any computation), empty
inputs, and the backend registry."""

from __future__ import annotations

import pytest
import torch

import rcar_fast
from rcar_fast import ops, pipeline, reference, torch_math
from rcar_fast.modules import RARModule, RCRModule
from rcar_testutil import cpu_backends, make_head, make_inputs, params_of

D, S = 40, 16
N_I, N_C, R, L = 2, 3, 5, 6


@pytest.fixture
def setup():
    head = make_head("coop_rcar", 2, "t2i", D, S, torch.float32, 0)
    img, cap, lens = make_inputs(N_I, N_C, R, L, D, torch.float32, 1)
    return head, img, cap, lens


@pytest.fixture
def no_compute(monkeypatch):
    """Every backend entry point raises AssertionError: an argument error must come first."""
    def boom(*a, **k):
        raise AssertionError("computation started before the arguments were checked")
    for mod in (pipeline, reference):
        for name in ("rcar_scores", "pair_scores", "adaptive_attention", "alignment", "rcr_update", "rar_update"):
            monkeypatch.setattr(mod, name, boom)


def raises_naming(exc_types, arg, fn, *a, **k):
    with pytest.raises(exc_types) as info:
        fn(*a, **k)
    assert arg in str(info.value), f"message {str(info.value)!r} does not name {arg!r}"
    return info.value


VE, TE = ValueError, TypeError
VTE = (ValueError, TypeError)


def test_no_compute_fixture_is_effective(setup, no_compute):
    head, img, cap, lens = setup
    for backend in ("torch", "reference"):
        with pytest.raises(AssertionError):
            head(img, cap, lens, backend=backend)
    with pytest.raises(AssertionError):
        ops.adaptive_attention(img, cap, lens, backend="torch")


# ----------------------------------------------------------------------------- the module's forward

@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_forward_errors(setup, no_compute, backend):
    head, img, cap, lens = setup
    f = lambda *a, **k: head(*a, backend=backend, **k)
    raises_naming(VE, "img", f, img[0], cap, lens)                     # rank 2
    raises_naming(VE, "img", f, img[None], cap, lens)                  # rank 4
    raises_naming(VE, "cap", f, img, cap[0], lens)
    raises_naming(VE, "cap", f, img, cap[..., None], lens)
    raises_naming(VE, "cap", f, img, cap[..., :D - 1], lens)           # d differs from img's
    img2, cap2, _ = make_inputs(N_I, N_C, R, L, D + 2, torch.float32, 2)
    raises_naming(VE, "embed_dim", f, img2, cap2, lens)                # d != embed_dim
    raises_naming(VE, "cap_lens", f, img, cap, lens[:2])               # N_c mismatch
    raises_naming(VE, "cap_lens", f, img, cap, torch.cat([lens, lens[:1]]))
    raises_naming(VE, "cap_lens", f, img, cap, lens[None])             # 2-D lens
    for bad in ([0, 2, 3], [1, 2, L + 1], [-1, 2, 3]):
        raises_naming(VE, "cap_lens", f, img, cap, torch.tensor(bad))
        raises_naming(VE, "cap_lens", f, img, cap, bad)
    raises_naming(TE, "cap_lens", f, img, cap, lens.float())
    raises_naming(TE, "cap_lens", f, img, cap, torch.ones(N_C, dtype=torch.bool))
    raises_naming(TE, "cap_lens", f, img, cap, [1.0, 2.0, 3.0])
    raises_naming(TE, "cap_lens", f, img, cap, [True, True, True])
    raises_naming(TE, "cap_lens", f, img, cap, "123")
    raises_naming(TE, "img", f, img.to(torch.int64), cap, lens)
    raises_naming(TE, "cap", f, img, cap.to(torch.int32), lens)
    raises_naming(TE, "img", f, img.numpy(), cap, lens)
    raises_naming(TE, "cap", f, img, cap.double(), lens)               # dtype mismatch
    raises_naming(VE, "img", f, torch.empty(N_I, 0, D), cap, lens)     # no regions
    raises_naming(VE, "memory_budget", f, img, cap, lens, memory_budget=0)
    raises_naming(VE, "memory_budget", f, img, cap, lens, memory_budget=-5)
    raises_naming(VE, "memory_budget", f, img, cap, lens, memory_budget=1.5)
    raises_naming(VE, "memory_budget", f, img, cap, lens, memory_budget=True)
    raises_naming(VE, "memory_budget", f, img, cap, lens, memory_budget="big")


def test_forward_device_mismatch_before_compute(setup, no_compute):
    head, img, cap, lens = setup
    cap_meta = torch.empty(N_C, L, D, device="meta")
    raises_naming(VE, "cap", head, img, cap_meta, lens, backend="torch")
    raises_naming(VE, "cap", ops.rcar_scores, img, cap_meta, lens, params_of(head, True), backend="torch")
    raises_naming(VE, "cap", ops.adaptive_attention, img, cap_meta, lens, backend="torch")
    raises_naming(VE, "cap_lens", head, img, cap, torch.empty(N_C, dtype=torch.int64, device="meta"))
    p = params_of(head, True)
    p["sim_eval_w.bias"] = torch.empty(1, device="meta")
    raises_naming(VE, "params", ops.rcar_scores, img, cap, lens, p, backend="torch")
    Lq = L
    raises_naming(VE, "factors", ops.adaptive_attention, img, cap, lens,
                  factors=torch.empty(N_I, N_C, Lq, D, device="meta"), backend="torch")
    raises_naming(VE, "temperatures", ops.adaptive_attention, img, cap, lens,
                  temperatures=torch.empty(N_I, N_C, Lq, device="meta"), backend="torch")


def test_backend_errors(setup, no_compute):
    head, img, cap, lens = setup
    raises_naming(VE, "backend", head, img, cap, lens, backend="nope")
    raises_naming(VE, "backend", head, img, cap, lens, backend="cuda")     # CPU tensors
    raises_naming(VTE, "backend", head, img, cap, lens, backend=None)
    for fn, args in ((ops.adaptive_attention, (img, cap, lens)),
                     (ops.rcar_scores, (img, cap, lens, params_of(head, True)))):
        raises_naming(VE, "backend", fn, *args, backend="nope")
        raises_naming(VE, "backend", fn, *args, backend="cuda")


@pytest.fixture
def fresh_status(monkeypatch):
    """backend_status() is computed once per process: probe again around a test that changes
    the environment, and again after the environment is restored."""
    rcar_fast.backend_status(refresh=True)
    yield
    monkeypatch.undo()
    rcar_fast.backend_status(refresh=True)


def test_triton_needs_cuda_or_the_interpreter(setup, no_compute, monkeypatch, fresh_status):
    """triton on CPU tensors runs only under TRITON_INTERPRET=1."""
    head, img, cap, lens = setup
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rcar_fast.backend_status(refresh=True)
    raises_naming(VE, "backend", head, img, cap, lens, backend="triton")
    assert "triton" not in rcar_fast.available_backends("cpu")
    assert rcar_fast.backend_status()["triton"] != "available" or torch.cuda.is_available()


def test_backend_status_is_computed_once(monkeypatch, fresh_status):
    """The status is cached: a changed environment shows only after refresh=True."""
    before = rcar_fast.backend_status()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if before["triton"] == "available" else "1")
    assert rcar_fast.backend_status() == before
    if not torch.cuda.is_available():
        assert rcar_fast.backend_status(refresh=True)["triton"] != before["triton"]


def test_argument_error_precedes_compute_with_valid_rest(setup, no_compute):
    """A single bad argument among good ones: the check fires, the backend is never reached."""
    head, img, cap, lens = setup
    bad = lens.clone()
    bad[1] = L + 1
    raises_naming(VE, "cap_lens", head, img, cap, bad, backend="torch")
    raises_naming(VE, "memory_budget", head, img, cap, lens, backend="torch", memory_budget=-1)
    raises_naming(VE, "backend", head, img, cap, lens, backend="cuda")


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("kw,arg,exc", [
    (dict(regulator="rcar"), "regulator", VE),
    (dict(regulator=None), "regulator", VE),
    (dict(regulator="only_rar", steps=0), "steps", VE),
    (dict(regulator="coop_rcar", steps=0), "steps", VE),
    (dict(regulator="only_rcr", steps=-1), "steps", VE),
    (dict(regulator="coop_rcar", steps=2.0), "steps", TE),
    (dict(regulator="coop_rcar", steps=1.5), "steps", TE),
    (dict(regulator="coop_rcar", steps=True), "steps", TE),
    (dict(attn_type="t2t"), "attn_type", VE),
    (dict(attn_type="T2I"), "attn_type", VE),
    (dict(sim_dim=15), "sim_dim", VE),
    (dict(sim_dim=1), "sim_dim", VE),
    (dict(sim_dim=0), "sim_dim", VE),
    (dict(embed_dim=0), "embed_dim", VE),
    (dict(embed_dim=40.0), "embed_dim", VE),
])
def test_module_config_errors(kw, arg, exc):
    args = dict(embed_dim=D, sim_dim=S)
    args.update(kw)
    raises_naming(exc, arg, rcar_fast.RCARSimilarity, **args)


def test_only_rcr_zero_steps_is_valid():
    m = rcar_fast.RCARSimilarity(embed_dim=D, sim_dim=S, regulator="only_rcr", steps=0)
    assert set(params_of(m)) == {"sim_eval_w.weight", "sim_eval_w.bias"}


@pytest.mark.parametrize("kw,arg,exc", [
    (dict(regulator="rcar"), "regulator", VE),
    (dict(regulator="only_rar", steps=0), "steps", VE),
    (dict(regulator="coop_rcar", steps=0), "steps", VE),
    (dict(regulator="only_rcr", steps=-1), "steps", VE),
    (dict(steps=2.0), "steps", TE),
    (dict(attn_type="both"), "attn_type", VE),
    (dict(smooth="hot"), "smooth", TE),
    (dict(smooth=True), "smooth", TE),
    (dict(memory_budget=0), "memory_budget", VE),
])
def test_rcar_scores_config_errors(setup, no_compute, kw, arg, exc):
    head, img, cap, lens = setup
    args = dict(regulator="coop_rcar", steps=2, attn_type="t2i", backend="torch")
    args.update(kw)
    raises_naming(exc, arg, ops.rcar_scores, img, cap, lens, params_of(head, True), **args)


def test_rcar_scores_params_errors(setup, no_compute):
    head, img, cap, lens = setup
    p = params_of(head, True)
    f = lambda params, **k: ops.rcar_scores(img, cap, lens, params, "coop_rcar", 2, "t2i",
                                            backend="torch", **k)
    raises_naming(VTE, "params", f, [1, 2])
    raises_naming(VTE, "params", f, {})
    for key in ("sim_eval_w.weight", "alv_modules.1.sim_transform_w.bias",
                "rcr_modules.0.rcr_smooth_w.2.weight", "rar_modules.1.rar_v_w.0.bias"):
        q = dict(p)
        del q[key]
        raises_naming(VE, "params", f, q)
    q = dict(p)
    q["alv_modules.0.sim_transform_w.weight"] = torch.randn(S, D + 1)
    raises_naming(VE, "params", f, q)
    q = dict(p)
    q["rcr_modules.0.rcr_matrix_w.0.bias"] = torch.randn(2 * S + 1)
    raises_naming(VE, "params", f, q)
    q = dict(p)
    q["rar_modules.0.rar_q_w.0.weight"] = torch.randn(S, S, 1)
    raises_naming(VE, "params", f, q)
    q = dict(p)
    q["rar_modules.0.rar_k_w.0.weight"] = q["rar_modules.0.rar_k_w.0.weight"].double()
    raises_naming(TE, "params", f, q)
    # only_rcr T = 2 needs rcr_modules.1: params of a coop_rcar T = 2 head do not fit
    raises_naming(VE, "params", ops.rcar_scores, img, cap, lens, p, "only_rcr", 2, "t2i", backend="torch")


def test_rcar_scores_params_not_tensors(setup, no_compute):
    """A parameter that is not a tensor is an argument error (TypeError naming params), not a crash."""
    head, img, cap, lens = setup
    p = params_of(head, True)
    q = dict(p)
    q["rar_modules.0.rar_q_w.0.bias"] = [0.0] * S
    raises_naming(TE, "params", ops.rcar_scores, img, cap, lens, q, backend="torch")
    q = dict(p)
    q["sim_eval_w.weight"] = 3.0
    raises_naming(TE, "params", ops.rcar_scores, img, cap, lens, q, backend="torch")


# ----------------------------------------------------------------------------- the pieces

def test_piece_errors(setup, no_compute):
    head, img, cap, lens = setup
    Lq = L
    aa = lambda **k: ops.adaptive_attention(**{**dict(img=img, cap=cap, cap_lens=lens, backend="torch"), **k})
    raises_naming(VE, "attn_type", aa, attn_type="x")
    raises_naming(VE, "img", aa, img=img[0])
    raises_naming(VE, "cap_lens", aa, cap_lens=lens + L)
    raises_naming(VE, "factors", aa, factors=torch.rand(N_I, N_C, Lq, D + 1))
    raises_naming(VE, "factors", aa, factors=torch.rand(N_I, N_C, R, D))         # i2t shape in t2i
    raises_naming(VE, "factors", aa, factors=torch.rand(N_C, N_I, Lq, D))
    raises_naming(VE, "factors", aa, factors=torch.rand(N_I, N_C, L, D), attn_type="i2t")
    raises_naming(TE, "factors", aa, factors=torch.rand(N_I, N_C, Lq, D).double())
    raises_naming(TE, "factors", aa, factors=torch.ones(N_I, N_C, Lq, D, dtype=torch.int64))
    raises_naming(VE, "temperatures", aa, temperatures=torch.rand(N_I, N_C))
    raises_naming(VE, "temperatures", aa, temperatures=torch.rand(N_I, N_C, Lq + 1))
    raises_naming(TE, "temperatures", aa, temperatures="warm")

    w, b = torch.randn(S, D), torch.randn(S)
    al = lambda **k: ops.alignment(**{**dict(img=img, cap=cap, cap_lens=lens, weight=w, bias=b,
                                             backend="torch"), **k})
    raises_naming(VE, "weight", al, weight=torch.randn(S, D + 1))
    raises_naming(VE, "bias", al, bias=torch.randn(S + 1))
    raises_naming(TE, "weight", al, weight=w.double())
    raises_naming(VE, "factors", al, factors=torch.rand(N_I, N_C, Lq, D + 1))
    raises_naming(VE, "backend", al, backend="cuda")

    rcr_w = {k: v.float() for k, v in RCRModule(D, S).state_dict().items()}
    E = torch.nn.functional.normalize(torch.randn(N_I, N_C, Lq, S), dim=-1)
    ru = lambda **k: ops.rcr_update(**{**dict(E=E, factors=None, temperatures=10.0, cap_lens=lens,
                                             weights=rcr_w, backend="torch"), **k})
    raises_naming(VE, "E", ru, E=E[0])
    raises_naming(TE, "E", ru, E=E.to(torch.int64))
    raises_naming(VE, "cap_lens", ru, cap_lens=lens[:2])
    raises_naming(VE, "cap_lens", ru, cap_lens=torch.full((N_C,), Lq + 1))
    raises_naming(VE, "weights", ru, weights={k: v for k, v in rcr_w.items() if k != "rcr_matrix_w.0.bias"})
    raises_naming(VE, "weights", ru, weights={**rcr_w, "rcr_smooth_w.0.weight": torch.randn(S, S)})
    raises_naming(VE, "weights", ru, weights={})
    raises_naming(VE, "factors", ru, factors=torch.rand(N_I, N_C, Lq, D - 1))
    raises_naming(VE, "temperatures", ru, temperatures=torch.rand(N_I, N_C, Lq, 1))
    raises_naming(VE, "attn_type", ru, attn_type="x")
    raises_naming(VE, "backend", ru, backend="nope")

    rar_w = {k: v.float() for k, v in RARModule(S).state_dict().items()}
    rr = lambda **k: ops.rar_update(**{**dict(E=E, h=None, cap_lens=lens, weights=rar_w,
                                             backend="torch"), **k})
    raises_naming(VE, "h", rr, h=torch.randn(N_I, N_C, S + 1))
    raises_naming(VE, "h", rr, h=torch.randn(N_I, S))
    raises_naming(TE, "h", rr, h=torch.randn(N_I, N_C, S).double())
    raises_naming(VE, "weights", rr, weights={k: v for k, v in rar_w.items() if k != "rar_v_w.0.weight"})
    raises_naming(VE, "weights", rr, weights={**rar_w, "rar_k_w.0.weight": torch.randn(S, S + 1)})
    raises_naming(VE, "E", rr, E=E[..., None])
    raises_naming(VE, "cap_lens", rr, cap_lens=torch.zeros(N_C, dtype=torch.int64))
    raises_naming(VE, "attn_type", rr, attn_type="x")


def test_rcr_update_weights_not_tensors(no_compute):
    """A non-tensor weight is an argument error (TypeError naming weights), not a crash."""
    lens = torch.tensor([1, 2, 3])
    E = torch.nn.functional.normalize(torch.randn(N_I, N_C, 3, S), dim=-1)
    rcr_w = {k: v.float() for k, v in RCRModule(D, S).state_dict().items()}
    rcr_w["rcr_matrix_w.2.weight"] = rcr_w["rcr_matrix_w.2.weight"].tolist()
    raises_naming(TE, "weights", ops.rcr_update, E, None, 10.0, lens, rcr_w, backend="torch")


# ----------------------------------------------------------------------------- empty inputs

@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("n_i,n_c", [(0, 3), (2, 0), (0, 0)])
def test_empty_inputs(backend, attn_type, n_i, n_c):
    head = make_head("coop_rcar", 2, attn_type, D, S, torch.float32, 3)
    img, cap, lens = make_inputs(n_i, n_c, R, L, D, torch.float32, 4)
    out = head(img, cap, lens, backend=backend)
    assert out.shape == (n_i, n_c) and out.dtype == torch.float32
    out = ops.rcar_scores(img, cap, lens, params_of(head, True), "coop_rcar", 2, attn_type, backend=backend)
    assert out.shape == (n_i, n_c)
    Lq = L if attn_type == "t2i" else R
    A = ops.adaptive_attention(img, cap, lens, attn_type=attn_type, backend=backend)
    assert A.shape == (n_i, n_c, Lq, D)
    p = params_of(head, True)
    E = ops.alignment(img, cap, lens, p["alv_modules.0.sim_transform_w.weight"],
                      p["alv_modules.0.sim_transform_w.bias"], attn_type=attn_type, backend=backend)
    assert E.shape == (n_i, n_c, Lq, S)
    sub = lambda prefix: {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    Fm, lam = ops.rcr_update(E, None, None, lens, sub("rcr_modules.0."), attn_type, backend=backend)
    assert Fm.shape == (n_i, n_c, Lq, D) and lam.shape == (n_i, n_c, Lq)
    h = ops.rar_update(E, None, lens, sub("rar_modules.0."), attn_type, backend=backend)
    assert h.shape == (n_i, n_c, S)


def test_empty_inputs_still_checked(no_compute):
    head = make_head("coop_rcar", 2, "t2i", D, S, torch.float32, 3)
    img, cap, lens = make_inputs(0, 3, R, L, D, torch.float32, 4)
    raises_naming(VE, "cap_lens", head, img, cap, lens[:2])
    raises_naming(VE, "backend", head, img, cap, lens, backend="cuda")
    raises_naming(VE, "embed_dim", head, img[..., :D - 1], cap[..., :D - 1], lens)


# ----------------------------------------------------------------------------- backends and conveniences

def test_backend_registry():
    names = rcar_fast.available_backends()
    assert "reference" in names and "torch" in names
    assert "reference" in rcar_fast.available_backends("cpu")
    assert "torch" in rcar_fast.available_backends(torch.device("cpu"))
    st = rcar_fast.backend_status()
    assert st["reference"] == "available" and st["torch"] == "available"
    assert "triton" in st
    for name, why in st.items():
        assert isinstance(why, str) and why
        assert (why == "available") == (name in names), name
        if why != "available":
            assert len(why) > len("unavailable") and why != name
    ext_cpu = False
    try:
        from rcar_fast.backends import extension_kernels
        ext_cpu = extension_kernels.has_kernels("CPU")
    except ImportError:
        pass
    assert ("cpp" in names) == ext_cpu, st["cpp"]
    if not torch.cuda.is_available():
        assert "cuda" not in names and st["cuda"].startswith("unavailable")


def test_cuda_backend_refuses_cpu_tensors_and_cpp_cuda_tensors():
    from rcar_fast.backends import resolve
    if rcar_fast.backend_status()["cpp"] == "available":
        raises_naming(VE, "backend", resolve, "cpp", torch.device("cuda"))
    if rcar_fast.backend_status()["cuda"] == "available":
        raises_naming(VE, "backend", resolve, "cuda", torch.device("cpu"))


def test_auto_on_cpu_is_the_first_available_of_cpp_then_torch(setup):
    head, img, cap, lens = setup
    from rcar_fast.backends import resolve
    want = "cpp" if "cpp" in rcar_fast.available_backends("cpu") else "torch"
    assert resolve("auto", torch.device("cpu")) == want
    with torch.no_grad():
        a = head(img, cap, lens, backend="auto")
        b = head(img, cap, lens)
        t = head(img, cap, lens, backend=want)
    assert torch.equal(a, t) and torch.equal(b, t)


def test_cap_lens_as_list_and_int32(setup):
    head, img, cap, lens = setup
    with torch.no_grad():
        want = head(img, cap, lens, backend="torch")
        as_list = head(img, cap, lens.tolist(), backend="torch")
        as_tuple = head(img, cap, tuple(lens.tolist()), backend="torch")
        as_i32 = head(img, cap, lens.to(torch.int32), backend="torch")
        ref_list = head(img, cap, lens.tolist(), backend="reference")
    assert torch.equal(as_list, want) and torch.equal(as_tuple, want) and torch.equal(as_i32, want)
    torch.testing.assert_close(ref_list, want, atol=1e-5, rtol=0)
    assert torch.isfinite(want).all()


def test_version_and_exports():
    assert isinstance(rcar_fast.__version__, str)
    for name in ("RCARSimilarity", "available_backends", "backend_status", "ops", "sim_state_from_checkpoint"):
        assert hasattr(rcar_fast, name)
    for name in ("adaptive_attention", "alignment", "rcr_update", "rar_update", "rcar_scores",
                 "parameter_shapes", "rcr_shapes", "rar_shapes"):
        assert callable(getattr(ops, name))


# ----------------------------------------------------------------------------- empty grids and autograd

def _cpu_backends():
    return ["reference"] + cpu_backends()


@pytest.mark.parametrize("empty", ["images", "captions"])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_empty_grid_keeps_autograd(backend, empty):
    """N_i = 0 or N_c = 0: the (empty) scores still carry a gradient, loss.backward() works, and
    the inputs and every parameter get zero gradients (an optimizer step stays possible)."""
    n_i, n_c = (0, 3) if empty == "images" else (2, 0)
    img, cap, lens = make_inputs(n_i, n_c, 4, 5, 16, torch.float32, 3)
    head = make_head("coop_rcar", 2, "t2i", 16, 8, torch.float32, 3)
    x, y = img.requires_grad_(), cap.requires_grad_()
    out = head(x, y, lens, backend=backend)
    assert out.shape == (n_i, n_c) and out.requires_grad
    out.sum().backward()
    for t in [x, y, *head.parameters()]:
        assert t.grad is not None and not t.grad.any() and torch.isfinite(t.grad).all()
    with torch.no_grad():
        assert not head(img.detach(), cap.detach(), lens, backend=backend).requires_grad


@pytest.mark.parametrize("backend", _cpu_backends())
def test_empty_pieces_keep_autograd(backend):
    img, cap, lens = make_inputs(0, 3, 4, 5, 16, torch.float32, 4)
    W = torch.randn(8, 16, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    E = ops.alignment(img, cap, lens, W, b, backend=backend)
    assert E.shape == (0, 3, 5, 8) and E.requires_grad
    E.sum().backward()
    assert W.grad is not None and not W.grad.any()
    head = make_head("only_rar", 1, "t2i", 16, 8, torch.float32, 4)
    wts = {k[len("rar_modules.0."):]: v for k, v in head.named_parameters() if k.startswith("rar_modules.0.")}
    h = ops.rar_update(torch.zeros(0, 3, 5, 8, requires_grad=True), None, lens, wts, backend=backend)
    assert h.shape == (0, 3, 8) and h.requires_grad
    h.sum().backward()
    assert all(v.grad is not None for v in wts.values())


# ----------------------------------------------------------------------------- tanh off the CPU

def test_tanh_is_one_op_off_the_cpu():
    """RCR's tanh: on the CPU the 2 sigmoid(2x) - 1 trick (faster there), elsewhere one tanh op
    (one pass over memory on a GPU, not four). Checked on the meta device, which stands for any
    non-CPU device, by recording the aten ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for inplace in (False, True):
        meta, cpu = torch.empty(4, 8, device="meta"), torch.randn(4, 8)
        with Ops() as rec:
            torch_math.tanh(meta, inplace)
        assert rec.seen == (["tanh_"] if inplace else ["tanh"]), rec.seen
        with Ops() as rec:
            torch_math.tanh(cpu, inplace)
        assert "sigmoid" in rec.seen or "sigmoid_" in rec.seen, rec.seen
    x = torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(torch_math.tanh(x.clone(), True), torch.tanh(x), atol=1e-15, rtol=0)


@pytest.mark.parametrize("backend", _cpu_backends()[1:])
def test_half_precision_scores_are_float32(backend):
    """Half-precision features score in float32 (the last Linear and the sigmoid in float32):
    scores rounded to bf16 would tie (README); the float32 scores are finer than bf16 can hold,
    and close to the float32 head's."""
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    img, cap, lens = make_inputs(4, 12, 5, 6, 32, torch.float32, 7)
    head = make_head("coop_rcar", 2, "t2i", 32, 16, torch.float32, 7)
    with torch.no_grad():
        want = head(img, cap, lens, backend="torch")
        got = head.to(dtype)(img.to(dtype), cap.to(dtype), lens, backend=backend)
    assert got.dtype == torch.float32
    assert not torch.equal(got, got.to(dtype).float()), "the scores are only as fine as the half dtype"
    assert (got - want).abs().max() < 3e-2
    for regulator, steps in (("only_rcr", 1), ("only_rar", 1)):
        h = make_head(regulator, steps, "t2i", 32, 16, dtype, 7)
        with torch.no_grad():
            assert h(img.to(dtype), cap.to(dtype), lens, backend=backend).dtype == torch.float32


# ----------------------------------------------------------------------------- plug-and-play

def _readme_block(marker: str) -> str:
    import os
    import re
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README.md: one python block with {marker!r}"
    return found[0]


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_readme_plug_and_play_example(backend, attn_type):
    """The README's SCAN-style scorer with RCR and RAR plugged in (run as written there) equals
    the same computation through the reference's pieces; gradients reach every module."""
    ns = {"torch": torch}
    exec(_readme_block("class ScanWithRegulators"), ns)
    d, s = 24, 8
    torch.manual_seed(0)
    model = ns["ScanWithRegulators"](d, s, attn_type).double().eval()    # eval: no RAR dropout
    for m in (model.align1, model.rcr, model.align2, model.rar):
        m.backend = backend
    img, cap, lens = make_inputs(3, 4, 5, 6, d, torch.float64, 11)
    if backend == "triton":
        model, img, cap = model.float(), img.float(), cap.float()
    got = model(img, cap, lens)
    p = {k: v.detach().double() for k, v in model.named_parameters()}

    def own(prefix):
        return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    E = reference.alignment(img.double(), cap.double(), lens, p["align1.sim_transform_w.weight"],
                            p["align1.sim_transform_w.bias"], None, 10.0 if attn_type == "t2i" else 3.0, attn_type)
    F, lam = reference.rcr_update(E, None, 10.0 if attn_type == "t2i" else 3.0, lens, own("rcr."), attn_type)
    E = reference.alignment(img.double(), cap.double(), lens, p["align2.sim_transform_w.weight"],
                            p["align2.sim_transform_w.bias"], F, lam, attn_type)
    h = reference.rar_update(E, None, lens, own("rar."), attn_type)
    want = torch.sigmoid(torch.nn.functional.linear(h, p["head.weight"], p["head.bias"])).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-10 if img.dtype == torch.float64 else 2e-6)
    got.sum().backward()
    for name, param in model.named_parameters():
        if not name.endswith("rar_v_w.0.bias"):          # a softmax ignores a shift: zero in exact arithmetic
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_regulator_modules_forward_match_the_ops():
    """Each module's forward is its op with its own weights (and training mode for RAR)."""
    img, cap, lens = make_inputs(2, 3, 4, 5, 16, torch.float64, 3)
    head = make_head("coop_rcar", 2, "t2i", 16, 8, torch.float64, 3)
    alv, rcr, rar = head.alv_modules[0], head.rcr_modules[0], head.rar_modules[0]
    with torch.no_grad():
        E = alv(img, cap, lens)
        torch.testing.assert_close(E, ops.alignment(img, cap, lens, alv.sim_transform_w.weight,
                                                     alv.sim_transform_w.bias), rtol=0, atol=0)
        F, lam = rcr(E, None, None, lens)
        want = ops.rcr_update(E, None, None, lens, dict(rcr.named_parameters()))
        assert torch.equal(F, want[0]) and torch.equal(lam, want[1])
        h = rar(E, None, lens)
        assert torch.equal(h, ops.rar_update(E, None, lens, dict(rar.named_parameters())))
        A = rcar_fast.AdaptiveAttention("t2i")(img, cap, lens, F, lam)
        assert torch.equal(A, ops.adaptive_attention(img, cap, lens, F, lam))
    assert head.state_dict().keys() == rcar_fast.RCARSimilarity(16, 8, "coop_rcar", 2).state_dict().keys()
