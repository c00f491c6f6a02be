"""The benchmark suite (bench/): counted FLOPs, the release-style baseline loop against the
reference, and the harness end to end on tiny shapes (CSV rows, table, error rows)."""

import csv

import pytest
import torch

import rcar_fast
from rcar_fast import reference

from bench import flops, release_loop, suite
from bench.report import FIELDS, read_csv
from bench.shapes import Shard

CSV_COLUMNS = ["timestamp", "git_commit", "device", "torch_version", "triton_version", "backend",
               "op", "regulator", "steps", "attn_type", "shape", "dtype", "median_ms", "p20_ms",
               "p80_ms", "pairs_per_s", "gflops", "frac_of_matmul_peak", "peak_mem_mb",
               "max_abs_err", "note"]

SETUPS = [("only_rar", 1), ("only_rar", 2), ("only_rcr", 0), ("only_rcr", 2),
          ("coop_rcar", 1), ("coop_rcar", 2), ("coop_rcar", 3)]


# ----------------------------------------------------------------------------- FLOPs

def test_flops_match_spec_cost_table():
    # SPEC.md: t2i coop_rcar T=2, Lq=12, R=36, d=1024, s=256: about 18 M MACs = 36 MFLOP a pair
    macs = flops.pair_macs(12, 36, 1024, 256, "coop_rcar", 2)
    assert macs == pytest.approx(18e6, rel=0.01)
    assert flops.shard_flops(1, [12], 36, 1024, 256, "coop_rcar", 2, "t2i") == 2 * macs
    assert 2 * macs == pytest.approx(36e6, rel=0.01)


def test_flops_sum_exactly_over_lengths_and_directions():
    lens = [5, 12, 30]
    for reg, T in SETUPS:
        for at in ("t2i", "i2t"):
            want = 2 * 7 * sum(flops.pair_macs(*flops.pair_lengths(at, 36, n), 64, 16, reg, T)
                               for n in lens)
            assert flops.shard_flops(7, lens, 36, 64, 16, reg, T, at) == want
    # i2t queries the regions: Lq = R, Lc = len
    assert flops.pair_lengths("i2t", 36, 9) == (36, 9)
    # only_rcr T=0 is one attention
    assert flops.pair_macs(4, 3, 8, 2, "only_rcr", 0) == 2 * 4 * 3 * 8


# ----------------------------------------------------------------------------- release loop

@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
@pytest.mark.parametrize("regulator,steps", SETUPS)
def test_release_loop_matches_reference(regulator, steps, attn_type):
    torch.manual_seed(7)
    model = rcar_fast.RCARSimilarity(24, 8, regulator, steps, attn_type)
    params = dict(model.named_parameters())
    img = torch.randn(3, 5, 24)
    cap = torch.randn(4, 6, 24)
    lens = torch.tensor([1, 6, 3, 4])
    cap[torch.arange(6)[None, :] >= lens[:, None]] = float("nan")   # padding must not be read
    with torch.no_grad():
        want = reference.rcar_scores(img, cap, lens, params, regulator, steps, attn_type)
    got = release_loop.rcar_scores(img, cap, lens, params, regulator, steps, attn_type)
    assert got.shape == (3, 4)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- harness

TINY = Shard("tiny", 3, 4, 2, 5, regions=4, embed_dim=32, sim_dim=8)


def _settings(**kw):
    base = dict(device=torch.device("cpu"), repeats=2, budget_s=0.05, ref_captions=2, compile="none")
    base.update(kw)
    return suite.Settings(**base)


def test_harness_end_to_end_writes_history(tmp_path):
    path = tmp_path / "history.csv"
    cases = [suite.Case(TINY, "coop_rcar", 2, "t2i"), suite.Case(TINY, "only_rcr", 1, "i2t"),
             suite.Case(TINY, "coop_rcar", 2, "t2i", op="train_step")]
    rows = suite.Suite(_settings(backends=["reference", "release_loop", "torch"]), str(path),
                       log=lambda s: None).run(cases)
    with open(path, newline="") as f:
        records = list(csv.reader(f))
    assert records[0] == CSV_COLUMNS == FIELDS
    assert len(records) == 1 + len(rows) == 1 + 3 + 3 + 2
    parsed = read_csv(str(path))
    infer = [r for r in parsed if r.op == "rcar_scores"]
    assert {r.backend for r in infer} == {"reference", "release_loop", "torch"}
    for r in parsed:
        assert not r.note.startswith("error"), r.note
        assert r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.pairs_per_s == pytest.approx(TINY.pairs / (r.median_ms / 1e3), rel=1e-4)
        assert r.gflops > 0 and r.frac_of_matmul_peak > 0
        assert r.shape == TINY.label and r.dtype == "float32" and r.git_commit
    for r in infer:
        assert r.max_abs_err < 1e-5
    assert all(r.max_abs_err is None for r in parsed if r.op == "train_step")
    table = suite.markdown_table(rows)
    assert "x release_loop" in table and table.count("\n") == 1 + len(rows)


def test_reference_subset_and_failing_row_is_recorded(tmp_path, monkeypatch):
    # without a reference row the truth is a caption subset; a failing backend leaves an error row
    real = rcar_fast.available_backends
    monkeypatch.setattr(suite.rcar_fast, "available_backends", lambda d=None: real(d) + ["bogus"])
    path = tmp_path / "h.csv"
    rows = suite.Suite(_settings(backends=["release_loop", "torch", "bogus"]), str(path),
                       log=lambda s: None).run([suite.Case(TINY, "only_rar", 2, "i2t")])
    by = {r.backend: r for r in rows}
    assert "err on 2/4 captions" in by["torch"].note and by["torch"].max_abs_err < 1e-5
    assert by["bogus"].note.startswith("error: ValueError") and by["bogus"].median_ms is None
    assert len(read_csv(str(path))) == 3


def test_training_batch_shrinks_to_fit_memory(tmp_path, monkeypatch):
    case = suite.Case(Shard("train", 128, 128, 6, 24), "coop_rcar", 2, "t2i", op="train_step")
    s = suite.Suite(_settings(), str(tmp_path / "h.csv"), log=lambda s: None)
    monkeypatch.setattr(suite.harness, "free_memory_bytes", lambda device: 40 * 2**30)
    assert s._fit_train(case, [(16, 256 * 2**20)]) == (case, "")       # 16 GiB, half of 40 free: fits
    small, note = s._fit_train(case, [(16, 256 * 2 * 2**20)])          # 32 GiB: the biggest square
    assert small.shard.n_images == small.shard.n_captions == 96 and "ran 96x96" in note
    assert s._fit_train(case, [(16, 256 * 2**30)])[0] is None          # not even the probe fits
    # two probes: peak = a + b * pairs. A 4 GiB base that does not grow with the pairs (one
    # block of the checkpointed pipeline) and 0.5 MiB per pair: 12 GiB needed, it fits
    gib, mib = 2**30, 2**20
    assert s._fit_train(case, [(16, 4 * gib + 256 * mib // 2), (32, 4 * gib + 1024 * mib // 2)]) == (case, "")
    # a 10 GiB base and 1 MiB per pair: 26 GiB > 20; sqrt((20 - 10) GiB / 1 MiB) = 101 -> 96
    small, note = s._fit_train(case, [(16, 10 * gib + 256 * mib), (32, 10 * gib + 1024 * mib)])
    assert small.shard.n_images == 96 and "needs ~26.0 GiB" in note


def test_cli_quick_shape_options(tmp_path, capsys):
    path, out = tmp_path / "h.csv", tmp_path / "t.md"
    rc = suite.main(["--shards", "flickr30k", "--images", "2", "--captions", "2",
                     "--configs", "coop_rcar:2", "--directions", "t2i", "--backends", "release_loop,torch", "--repeats", "1",
                     "--budget", "0", "--csv", str(path), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Headline" in printed and "torch" in printed
    assert "| torch | rcar_scores | coop_rcar | 2 | t2i | flickr30k 2x2" in out.read_text()
    assert len(read_csv(str(path))) == 2
    assert suite.main(["--summarize", str(path)]) == 0
    assert "release_loop" in capsys.readouterr().out
