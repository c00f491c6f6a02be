"""Checkpoint compatibility with the public release (SPEC.md, "Parameter names"), and the
release's initialisation. Key names are written out here from SPEC.md, never derived from
the module under test."""

from __future__ import annotations

import math

import pytest
import torch

import rcar_fast
from rcar_fast import ops, reference
from rcar_testutil import make_inputs

D, S = 40, 16

ALV = ["sim_transform_w.weight", "sim_transform_w.bias"]
RCR = ["rcr_matrix_w.0.weight", "rcr_matrix_w.0.bias", "rcr_matrix_w.2.weight", "rcr_matrix_w.2.bias",
       "rcr_smooth_w.0.weight", "rcr_smooth_w.0.bias", "rcr_smooth_w.2.weight", "rcr_smooth_w.2.bias"]
RAR = ["rar_q_w.0.weight", "rar_q_w.0.bias", "rar_k_w.0.weight", "rar_k_w.0.bias",
       "rar_v_w.0.weight", "rar_v_w.0.bias"]

#: the release's names for each set-up, written out in full
RELEASE_KEYS = {
    ("coop_rcar", 2): [
        "sim_eval_w.weight", "sim_eval_w.bias",
        "alv_modules.0.sim_transform_w.weight", "alv_modules.0.sim_transform_w.bias",
        "alv_modules.1.sim_transform_w.weight", "alv_modules.1.sim_transform_w.bias",
        "rcr_modules.0.rcr_matrix_w.0.weight", "rcr_modules.0.rcr_matrix_w.0.bias",
        "rcr_modules.0.rcr_matrix_w.2.weight", "rcr_modules.0.rcr_matrix_w.2.bias",
        "rcr_modules.0.rcr_smooth_w.0.weight", "rcr_modules.0.rcr_smooth_w.0.bias",
        "rcr_modules.0.rcr_smooth_w.2.weight", "rcr_modules.0.rcr_smooth_w.2.bias",
        "rar_modules.0.rar_q_w.0.weight", "rar_modules.0.rar_q_w.0.bias",
        "rar_modules.0.rar_k_w.0.weight", "rar_modules.0.rar_k_w.0.bias",
        "rar_modules.0.rar_v_w.0.weight", "rar_modules.0.rar_v_w.0.bias",
        "rar_modules.1.rar_q_w.0.weight", "rar_modules.1.rar_q_w.0.bias",
        "rar_modules.1.rar_k_w.0.weight", "rar_modules.1.rar_k_w.0.bias",
        "rar_modules.1.rar_v_w.0.weight", "rar_modules.1.rar_v_w.0.bias",
    ],
    ("only_rar", 2): [
        "sim_eval_w.weight", "sim_eval_w.bias",
        "alv_modules.0.sim_transform_w.weight", "alv_modules.0.sim_transform_w.bias",
        "rar_modules.0.rar_q_w.0.weight", "rar_modules.0.rar_q_w.0.bias",
        "rar_modules.0.rar_k_w.0.weight", "rar_modules.0.rar_k_w.0.bias",
        "rar_modules.0.rar_v_w.0.weight", "rar_modules.0.rar_v_w.0.bias",
        "rar_modules.1.rar_q_w.0.weight", "rar_modules.1.rar_q_w.0.bias",
        "rar_modules.1.rar_k_w.0.weight", "rar_modules.1.rar_k_w.0.bias",
        "rar_modules.1.rar_v_w.0.weight", "rar_modules.1.rar_v_w.0.bias",
    ],
    ("only_rcr", 1): [
        "sim_eval_w.weight", "sim_eval_w.bias",
        "alv_modules.0.sim_transform_w.weight", "alv_modules.0.sim_transform_w.bias",
        "rcr_modules.0.rcr_matrix_w.0.weight", "rcr_modules.0.rcr_matrix_w.0.bias",
        "rcr_modules.0.rcr_matrix_w.2.weight", "rcr_modules.0.rcr_matrix_w.2.bias",
        "rcr_modules.0.rcr_smooth_w.0.weight", "rcr_modules.0.rcr_smooth_w.0.bias",
        "rcr_modules.0.rcr_smooth_w.2.weight", "rcr_modules.0.rcr_smooth_w.2.bias",
    ],
}
CASES = list(RELEASE_KEYS)


def release_shape(key: str, d: int, s: int):
    """The shape of a release parameter from its name (SPEC.md's module definitions)."""
    leaf = key.split(".", 2)[-1] if key.startswith(("alv_", "rcr_", "rar_")) else key
    table = {
        "sim_eval_w.weight": (1, s), "sim_eval_w.bias": (1,),
        "sim_transform_w.weight": (s, d), "sim_transform_w.bias": (s,),
        "rcr_matrix_w.0.weight": (2 * s, s), "rcr_matrix_w.0.bias": (2 * s,),
        "rcr_matrix_w.2.weight": (d, 2 * s), "rcr_matrix_w.2.bias": (d,),
        "rcr_smooth_w.0.weight": (s // 2, s), "rcr_smooth_w.0.bias": (s // 2,),
        "rcr_smooth_w.2.weight": (1, s // 2), "rcr_smooth_w.2.bias": (1,),
        "rar_q_w.0.weight": (s, s), "rar_q_w.0.bias": (s,),
        "rar_k_w.0.weight": (s, s), "rar_k_w.0.bias": (s,),
        "rar_v_w.0.weight": (1, s), "rar_v_w.0.bias": (1,),
    }
    return table[leaf]


def release_state(regulator, steps, d=D, s=S, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k in RELEASE_KEYS[(regulator, steps)]:
        shape = release_shape(k, d, s)
        fan = shape[-1]
        state[k] = (torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(fan)).to(dtype)
    return state


def test_release_keys_are_well_formed():
    """Sanity of the literal tables above against SPEC.md's counts (T alv, T-1 rcr, T rar ...)."""
    assert len(RELEASE_KEYS[("coop_rcar", 2)]) == 2 + 2 * 2 + 1 * 8 + 2 * 6
    assert len(RELEASE_KEYS[("only_rar", 2)]) == 2 + 2 + 2 * 6
    assert len(RELEASE_KEYS[("only_rcr", 1)]) == 2 + 2 + 8
    for keys in RELEASE_KEYS.values():
        assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("regulator,steps", CASES)
def test_parameter_shapes_match_release(regulator, steps):
    shapes = ops.parameter_shapes(regulator, steps, embed_dim=D, sim_dim=S)
    assert set(shapes) == set(RELEASE_KEYS[(regulator, steps)])
    for k, v in shapes.items():
        assert tuple(v) == release_shape(k, D, S), k


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", CASES)
def test_release_state_dict_loads_strict_and_scores(regulator, steps, attn_type):
    state = release_state(regulator, steps, seed=steps * 10 + len(regulator))
    m = rcar_fast.RCARSimilarity(embed_dim=D, sim_dim=S, regulator=regulator, steps=steps,
                                 attn_type=attn_type)
    assert set(m.state_dict()) == set(RELEASE_KEYS[(regulator, steps)])
    result = m.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    m.eval()
    img, cap, lens = make_inputs(3, 4, 6, 7, D, torch.float32, 5)
    with torch.no_grad():
        got = m(img, cap, lens, backend="torch")
    want = reference.rcar_scores(img, cap, lens, state, regulator, steps, attn_type)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # float64 too, through the loaded tensors
    m64 = m.double()
    img64, cap64 = img.double(), cap.double()
    state64 = {k: v.double() for k, v in state.items()}
    with torch.no_grad():
        got64 = m64(img64, cap64, lens, backend="torch")
    want64 = reference.rcar_scores(img64, cap64, lens, state64, regulator, steps, attn_type)
    torch.testing.assert_close(got64, want64, atol=1e-10, rtol=0)


@pytest.mark.parametrize("regulator,steps", CASES)
def test_wrong_release_state_is_rejected(regulator, steps):
    m = rcar_fast.RCARSimilarity(embed_dim=D, sim_dim=S, regulator=regulator, steps=steps)
    state = release_state(regulator, steps)
    missing = dict(state)
    missing.pop(RELEASE_KEYS[(regulator, steps)][-1])
    with pytest.raises(RuntimeError):
        m.load_state_dict(missing, strict=True)
    extra = dict(state)
    extra["rar_modules.7.rar_q_w.0.weight"] = torch.zeros(S, S)
    with pytest.raises(RuntimeError):
        m.load_state_dict(extra, strict=True)


@pytest.mark.parametrize("regulator,steps", CASES)
def test_full_checkpoint_round_trip(regulator, steps, tmp_path):
    sim = release_state(regulator, steps, seed=77)
    gen = torch.Generator().manual_seed(78)
    model = {"img_enc.fc.weight": torch.randn(D, 12, generator=gen), "img_enc.fc.bias": torch.randn(D, generator=gen),
             "txt_enc.embed.weight": torch.randn(9, D, generator=gen)}
    model.update({"sim_enc." + k: v for k, v in sim.items()})
    ckpt = {"model": model, "epoch": 3, "opt": {"lr": 2e-4}}
    path = tmp_path / "model_best.pth"
    torch.save(ckpt, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = rcar_fast.sim_state_from_checkpoint(loaded)
    assert set(state) == set(RELEASE_KEYS[(regulator, steps)])
    for k in state:
        assert torch.equal(state[k], sim[k]), k
    m = rcar_fast.RCARSimilarity(embed_dim=D, sim_dim=S, regulator=regulator, steps=steps).eval()
    m.load_state_dict(state, strict=True)
    # and the module's own state dict survives a save/load round trip
    path2 = tmp_path / "head.pth"
    torch.save(m.state_dict(), path2)
    m2 = rcar_fast.RCARSimilarity(embed_dim=D, sim_dim=S, regulator=regulator, steps=steps).eval()
    m2.load_state_dict(torch.load(path2, weights_only=True), strict=True)
    img, cap, lens = make_inputs(2, 5, 5, 6, D, torch.float32, 9)
    with torch.no_grad():
        a = m(img, cap, lens, backend="torch")
        b = m2(img, cap, lens, backend="torch")
    assert torch.equal(a, b)
    want = reference.rcar_scores(img, cap, lens, sim, regulator, steps, "t2i")
    torch.testing.assert_close(a, want, atol=1e-5, rtol=0)


def test_sim_state_from_checkpoint_errors():
    with pytest.raises(ValueError, match="checkpoint"):
        rcar_fast.sim_state_from_checkpoint({"model": {"img_enc.w": torch.zeros(1)}})
    with pytest.raises(ValueError, match="checkpoint"):
        rcar_fast.sim_state_from_checkpoint({"model": 3})
    with pytest.raises(ValueError, match="checkpoint"):
        rcar_fast.sim_state_from_checkpoint([1, 2])


# ----------------------------------------------------------------------------- initialisation

@pytest.mark.parametrize("regulator,steps", [("coop_rcar", 2), ("only_rar", 2), ("only_rcr", 1)])
def test_release_initialisation(regulator, steps):
    torch.manual_seed(123)
    m = rcar_fast.RCARSimilarity(regulator=regulator, steps=steps)      # d = 1024, s = 256
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    expected = {("coop_rcar", 2): 1 + 2 + 4 * 1 + 3 * 2, ("only_rar", 2): 1 + 1 + 3 * 2,
                ("only_rcr", 1): 1 + 1 + 4}[(regulator, steps)]
    assert len(linears) == expected
    for lin in linears:
        fan_out, fan_in = lin.weight.shape
        r = math.sqrt(6.0 / (fan_in + fan_out))
        w = lin.weight.detach()
        assert float(w.abs().max()) <= r, (fan_in, fan_out)
        assert float(w.abs().max()) >= 0.5 * r, "weights far inside the release's range"
        assert torch.count_nonzero(lin.bias) == 0
        if w.numel() >= 1000:   # uniform in [-r, r]: std r / sqrt(3), mean 0
            assert abs(float(w.std()) - r / math.sqrt(3)) < 0.05 * r / math.sqrt(3)
            assert abs(float(w.mean())) < 0.05 * r


def test_dropout_modules_match_release():
    m = rcar_fast.RCARSimilarity(embed_dim=D, sim_dim=S, regulator="coop_rcar", steps=2)
    drops = [mod for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    assert len(drops) == 4 and all(dr.p == pytest.approx(0.4) for dr in drops)
    assert m.training   # a fresh module trains (RAR dropout on) until .eval()


def test_sim_state_from_a_data_parallel_checkpoint():
    """The release saves model.state_dict() of an nn.DataParallel wrapper: keys 'module.sim_enc.*'."""
    sim = release_state("coop_rcar", 2, seed=5)
    model = {"module.img_enc.fc.weight": torch.zeros(2, 2)}
    model.update({"module.sim_enc." + k: v for k, v in sim.items()})
    state = rcar_fast.sim_state_from_checkpoint({"model": model})
    assert set(state) == set(sim) and all(torch.equal(state[k], sim[k]) for k in sim)


# ----------------------------------------------------------------------------- encoder options

def image_features_by_hand(state, x):
    """fc(x) + mlp(x) of the release's image encoder, from its weights (eval-mode BatchNorm),
    before any l2n."""
    fc = x @ state["img_enc.fc.weight"].t() + state["img_enc.fc.bias"]
    h = x @ state["img_enc.mlp.layers.0.weight"].t() + state["img_enc.mlp.layers.0.bias"]
    h = (h - state["img_enc.mlp.bns.0.running_mean"]) / torch.sqrt(state["img_enc.mlp.bns.0.running_var"] + 1e-5)
    h = torch.relu(h * state["img_enc.mlp.bns.0.weight"] + state["img_enc.mlp.bns.0.bias"])
    return fc + h @ state["img_enc.mlp.layers.1.weight"].t() + state["img_enc.mlp.layers.1.bias"]


def text_features_by_hand(model, ids, lens):
    """The bidirectional GRU run on each caption alone, directions averaged, before any l2n;
    zero past the caption's length."""
    enc = model.txt_enc
    out = torch.zeros(ids.shape[0], ids.shape[1], enc.embed_size, dtype=enc.embed.weight.dtype)
    for j in range(ids.shape[0]):
        n = int(lens[j])
        y, _ = enc.rnn(enc.embed.weight[ids[j, :n]][None])
        out[j, :n] = (y[0, :, :enc.embed_size] + y[0, :, enc.embed_size:]) / 2
    return out


def l2n(x):
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


@pytest.mark.parametrize("flag", ["no_imgnorm", "no_txtnorm"])
def test_each_norm_option_alone_is_read_and_skips_only_its_l2n(tmp_path, flag):
    """The release's --no_imgnorm / --no_txtnorm: its encoders skip their final l2norm when the
    flag is set. Each flag alone, from a checkpoint's opt, changes only its own encoder."""
    from test_retrieval import IMG_DIM, VOCAB, make_model, release_opt
    from rcar_fast.app import encoders as E
    m = make_model(6, attn_type="t2i")
    path = tmp_path / f"{flag}.pth"
    torch.save({"model": m.state_dict(), "opt": release_opt(attn_type="t2i", **{flag: True})}, path)
    got = E.load_checkpoint(str(path))
    assert (got.config.no_imgnorm, got.config.no_txtnorm) == (flag == "no_imgnorm", flag == "no_txtnorm")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, IMG_DIM, generator=gen)
    ids, lens = torch.randint(0, VOCAB, (5, 6), generator=gen), torch.tensor([6, 2, 4, 1, 5])
    with torch.no_grad():
        raw_img = image_features_by_hand(m.state_dict(), x)
        raw_txt = text_features_by_hand(m, ids, lens)
        img, txt = got.encode_images(x), got.encode_captions(ids, lens)
        want_img = raw_img if flag == "no_imgnorm" else l2n(raw_img)
        want_txt = raw_txt if flag == "no_txtnorm" else l2n(raw_txt)
        torch.testing.assert_close(img, want_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(txt, want_txt, atol=1e-5, rtol=1e-5)
        # the un-normalised side really is off the unit sphere (the test can tell them apart)
        norms = (raw_img if flag == "no_imgnorm" else raw_txt[0, :6]).norm(dim=-1)
        assert ((norms - 1).abs() > 0.05).all()
        # and the scores follow the features
        want = got.sim_enc(want_img, want_txt, lens, backend="reference")
        torch.testing.assert_close(got(x, ids, lens, backend="torch"), want, atol=1e-5, rtol=0)
    # save_checkpoint writes each flag under its own name, and it loads back
    E.save_checkpoint(got, str(tmp_path / "again.pth"))
    raw = torch.load(tmp_path / "again.pth", weights_only=True)["opt"]
    assert (raw["no_imgnorm"], raw["no_txtnorm"]) == (flag == "no_imgnorm", flag == "no_txtnorm")
    assert E.load_checkpoint(str(tmp_path / "again.pth")).config == got.config
