"""The command line: ``eval`` end to end on files written here, its one-line errors (exit 2),
``demo`` and the ``bench`` pass-through."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from rcar_fast.app import cli
from test_retrieval import (IMG_DIM, VOCAB, make_model, release_i2t, release_metrics, release_opt,
                            release_t2i)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs", "sits", "red", "blue",
         "on", "the", "mat"]          # 14 words: the embedding (VOCAB = 15) has one more row, as
                                      # the release's added <mask>


def write_eval_files(tmp_path, n=5, attn_type="t2i", seed=0, name="model_best.pth"):
    """A precomp split of n images (R = 3) and 5n captions, its vocabulary json, a checkpoint."""
    rng = np.random.default_rng(seed)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    ims = rng.standard_normal((n, 3, IMG_DIM)).astype(np.float32)
    np.save(data / "test_ims.npy", ims)
    content = WORDS[4:]
    caps = [" ".join(rng.choice(content, size=int(rng.integers(1, 7)))) + (" zebra" if j % 7 == 0 else "")
            for j in range(5 * n)]
    (data / "test_caps.txt").write_text("\n".join(caps) + "\n")
    w2i = {w: i for i, w in enumerate(WORDS)}
    (data / "f30k_precomp_vocab.json").write_text(json.dumps(
        {"word2idx": w2i, "idx2word": {str(i): w for w, i in w2i.items()}, "idx": len(w2i)}))
    model = make_model(seed, attn_type=attn_type)
    ckdir = tmp_path / "runs"
    ckdir.mkdir(exist_ok=True)
    ckpt = ckdir / name
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()},
                "opt": release_opt(attn_type=attn_type), "epoch": 1}, ckpt)
    return data, ckpt, model, ims, caps, w2i


def expected_scores(model, ims, caps, w2i):
    """Scores the test computes itself: its own tokenising (plain words here), the reference
    backend, one call."""
    seqs = [[w2i["<start>"]] + [w2i.get(w, w2i["<unk>"]) for w in c.split()] + [w2i["<end>"]] for c in caps]
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.int64)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s)
    lens = torch.tensor([len(s) for s in seqs])
    with torch.no_grad():
        return model.sim_enc(model.img_enc(torch.from_numpy(ims)), model.txt_enc(ids, lens), lens,
                             backend="reference").double().numpy()


def run_main(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def printed_rsum(out, after):
    block = out[out.index(after):]
    return float(re.search(r"rsum: ([0-9.]+)", block).group(1))


def test_eval_end_to_end_matches_the_release_metrics(tmp_path, capsys):
    data, ckpt, model, ims, caps, w2i = write_eval_files(tmp_path, n=6)
    rc, out, err = run_main(["eval", "--data", str(data), "--checkpoint", str(ckpt), "--backend",
                             "torch", "--no-progress"], capsys)
    assert rc == 0, err
    sims = expected_scores(model, ims, caps, w2i)
    i2t, t2i = release_metrics(release_i2t(6, sims)), release_metrics(release_t2i(6, sims))
    rsum = sum(i2t[:3]) + sum(t2i[:3])
    assert printed_rsum(out, "exhaustive (result)") == pytest.approx(rsum, abs=0.051)
    line = next(l for l in out.splitlines() if "Image to text:" in l)
    assert [float(v) for v in line.split(":")[1].split()] == pytest.approx([round(v, 1) for v in i2t], abs=0.051)
    assert "coop_rcar T=2 t2i" in out and "f30k_precomp_vocab.json: 14 words" in out


def test_eval_fold5_two_stage_and_averaged_checkpoints(tmp_path, capsys):
    data, ckpt, *_ = write_eval_files(tmp_path, n=10, attn_type="t2i")
    _, ckpt2, *_ = write_eval_files(tmp_path, n=10, attn_type="i2t", seed=0, name="i2t.pth")
    rc, out, err = run_main(["eval", "--data", str(data), "--checkpoint", str(ckpt), "--checkpoint",
                             str(ckpt2), "--fold5", "--rerank-k", "50", "--no-progress"], capsys)
    assert rc == 0, err
    assert out.count("fold ") >= 10 and "mean of 5 folds" in out and "2 model(s)" in out
    # k = 50 keeps every candidate of a 2-image fold: two-stage must equal exhaustive
    assert printed_rsum(out, "two-stage k=50") == printed_rsum(out, "exhaustive (mean")
    assert "recall lost 0.0 rsum" in out


def one_line_error(rc, out, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_eval_errors_are_one_line(tmp_path, capsys):
    data, ckpt, model, *_ = write_eval_files(tmp_path)
    base = ["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress"]
    one_line_error(*run_main(["eval", "--data", str(tmp_path / "nodata"), "--checkpoint", str(ckpt)], capsys),
                   "nodata", "no such data folder")
    one_line_error(*run_main(base + ["--split", "tset"], capsys), "no split 'tset'", "splits here: test")
    one_line_error(*run_main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "gone.pth")], capsys),
                   "gone.pth", "no such checkpoint")
    # a checkpoint whose text encoder has another embedding size
    state = {k: v for k, v in model.state_dict().items()}
    state["txt_enc.embed.weight"] = torch.zeros(VOCAB, 9)
    bad = tmp_path / "other_shape.pth"
    torch.save({"model": state, "opt": release_opt()}, bad)
    one_line_error(*run_main(["eval", "--data", str(data), "--checkpoint", str(bad)], capsys),
                   "other_shape.pth", "txt_enc.embed.weight")
    one_line_error(*run_main(base + ["--steps", "3"], capsys), "model_best.pth", "missing key",
                   "sim_enc.alv_modules.2")
    (data / "test_ims.npy").write_bytes(b"not numpy")
    one_line_error(*run_main(base, capsys), "test_ims.npy", "not a readable .npy")
    np.save(data / "test_ims.npy", np.zeros((5, 3, IMG_DIM), np.float32))
    os.remove(data / "f30k_precomp_vocab.json")
    one_line_error(*run_main(base, capsys), "--vocab")
    (data / "v.json").write_text("[1, 2]")
    one_line_error(*run_main(base + ["--vocab", str(data / "v.json")], capsys), "v.json")


def test_eval_error_from_a_subprocess_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "rcar_fast", "eval", "--data", str(tmp_path / "missing"),
                        "--checkpoint", str(tmp_path / "x.pth")], capture_output=True, text=True, env=env,
                       timeout=120)
    one_line_error(p.returncode, p.stdout, p.stderr, "missing", "no such data folder")


def test_eval_device_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    data, ckpt, *_ = write_eval_files(tmp_path)
    base = ["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        one_line_error(*run_main(base + ["--device", device], capsys), "--device", repr(device),
                       "no CUDA device")
    one_line_error(*run_main(base + ["--device", "gpu"], capsys), "--device", "'gpu' is not a device")
    one_line_error(*run_main(base + ["--device", "mps"], capsys), "--device", "cpu or cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    one_line_error(*run_main(base + ["--device", "cuda:2"], capsys), "--device", "2 CUDA device(s)")


def test_eval_device_cuda_without_a_gpu_from_a_subprocess(tmp_path):
    data, ckpt, *_ = write_eval_files(tmp_path)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "rcar_fast", "eval", "--data", str(data), "--checkpoint",
                        str(ckpt), "--device", "cuda"], capture_output=True, text=True, env=env, timeout=120)
    one_line_error(p.returncode, p.stdout, p.stderr, "--device", "no CUDA device")


def test_eval_argument_errors_are_one_line(tmp_path, capsys):
    data, ckpt, *_ = write_eval_files(tmp_path, n=6)
    base = ["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress"]
    # argparse's own errors: one line, no usage block
    one_line_error(*run_main([], capsys), "rcar-fast", "command")
    one_line_error(*run_main(["eval"], capsys), "--data", "--checkpoint")
    one_line_error(*run_main(base + ["--dtype", "fp8"], capsys), "--dtype", "fp8")
    one_line_error(*run_main(base + ["--batch-size", "0"], capsys), "--batch-size")
    one_line_error(*run_main(base + ["--ties", "random"], capsys), "--ties")
    one_line_error(*run_main(["frobnicate"], capsys), "frobnicate")
    # checked before any file is read or any work done
    one_line_error(*run_main(base + ["--backend", "nope"], capsys), "--backend nope", "unknown")
    one_line_error(*run_main(base + ["--save-scores", str(tmp_path / "no" / "s.npy")], capsys),
                   "--save-scores", "no such folder")
    one_line_error(*run_main(base + ["--ties", "expected", "--rerank-k", "3"], capsys), "--ties", "--rerank-k")
    one_line_error(*run_main(base + ["--rerank-only"], capsys), "--rerank-only")
    # 6 images do not make five folds
    one_line_error(*run_main(base + ["--fold5"], capsys), "--fold5", "test_ims.npy", "6 images")
    # features of another size than the checkpoint's img_dim
    np.save(data / "test_ims.npy", np.zeros((6, 3, IMG_DIM + 1), np.float32))
    one_line_error(*run_main(base, capsys), "test_ims.npy", str(IMG_DIM + 1), "model_best.pth",
                   f"img_dim {IMG_DIM}")


def test_eval_bf16_triton_under_the_interpreter_is_refused(tmp_path, capsys, monkeypatch):
    """The interpreter computes bfloat16 wrongly without an error (DESIGN.md): resolving backend
    'triton' for bf16 there raises ValueError, which eval prints as one line (exit 2) instead of
    printing wrong recall."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    data, ckpt, *_ = write_eval_files(tmp_path, n=2)
    rc, out, err = run_main(["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress",
                             "--device", "cpu", "--dtype", "bf16", "--backend", "triton"], capsys)
    one_line_error(rc, out, err, "triton", "bfloat16", "TRITON_INTERPRET")
    assert "rsum" not in out


def test_eval_ties_expected_reports_the_expected_recall(tmp_path, capsys, monkeypatch):
    data, ckpt, *_ = write_eval_files(tmp_path, n=6)
    from rcar_fast.app import retrieval as RT
    # scores with ties (half precision makes them): rounded to quarters
    gen = torch.Generator().manual_seed(0)
    tied = torch.round(4 * torch.rand(6, 30, generator=gen)) / 4
    monkeypatch.setattr(RT, "score_all", lambda *a, **k: tied.clone())
    rsum = {}
    for ties in ("pessimistic", "expected"):
        rc, out, err = run_main(["eval", "--data", str(data), "--checkpoint", str(ckpt), "--backend",
                                 "torch", "--no-progress", "--ties", ties], capsys)
        assert rc == 0, err
        rsum[ties] = printed_rsum(out, "exhaustive (result)")
        assert rsum[ties] == pytest.approx(RT.recall_metrics(tied, ties=ties).rsum, abs=0.051)
        notes = [l for l in out.splitlines() if l.startswith("ties:")]
        if ties == "pessimistic":       # the cost of the rule is said, with the other rule's rsum
            share = _share_tied(tied)
            assert len(notes) == 1 and f"{100 * share:.1f}% of queries" in notes[0], out
            assert f"--ties expected: {RT.recall_metrics(tied, ties='expected').rsum:.1f}" in notes[0]
        else:
            assert notes == []
    assert rsum["expected"] > rsum["pessimistic"] + 10


def _share_tied(sims):
    """Queries whose match scores exactly as much as some non-match, counted here directly."""
    n_i, n_c = sims.shape
    own = torch.arange(n_c)[None, :] // 5 == torch.arange(n_i)[:, None]
    i2t = [bool((sims[i][~own[i]] == sims[i][own[i]].max()).any()) for i in range(n_i)]
    t2i = [bool((sims[:, j][~own[:, j]] == sims[j // 5, j]).any()) for j in range(n_c)]
    return (sum(i2t) + sum(t2i)) / (n_i + n_c)


def test_demo_prints_recall_and_two_stage(capsys):
    # (the triton interpreter, on in the tests, would take minutes at d = 1024)
    rc, out, err = run_main(["demo", "--images", "3", "--captions-per-image", "2", "--quick",
                             "--rerank-k", "2", "--backends", "torch"], capsys)
    assert rc == 0, err
    rows = [l.split() for l in out.splitlines() if l.split()[:2] in (["t2i", "torch"], ["i2t", "torch"],
                                                                      ["ALL", "torch"])]
    assert len(rows) == 3
    for r in rows:
        recalls = [float(v) for v in r[-7:]]           # i2t R@1 R@5 R@10, t2i R@1 R@5 R@10, rsum
        assert all(0.0 <= v <= 100.0 for v in recalls[:6])
        assert recalls[6] == pytest.approx(sum(recalls[:6]), abs=0.35)
    assert "two-stage search" in out and "of 18 pairs" in out


def test_demo_exits_1_when_a_backend_differs(capsys):
    rc, out, err = run_main(["demo", "--images", "2", "--captions-per-image", "1", "--quick",
                             "--attn-type", "t2i", "--rerank-k", "0", "--tolerance", "-1",
                             "--backends", "torch"], capsys)
    assert rc == 1 and "differs from the reference" in err


def test_demo_rejects_an_unavailable_backend(capsys):
    one_line_error(*run_main(["demo", "--images", "2", "--backends", "cuda"], capsys), "--backends", "cuda")


def test_demo_argument_errors_are_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(*run_main(["demo", "--device", "cuda"], capsys), "--device", "no CUDA device")
    one_line_error(*run_main(["demo", "--images", "0"], capsys), "--images", "positive")
    one_line_error(*run_main(["demo", "--images", "two"], capsys), "--images", "'two'")
    one_line_error(*run_main(["demo", "--captions-per-image", "-1"], capsys), "--captions-per-image")
    one_line_error(*run_main(["demo", "--rerank-k", "-1"], capsys), "--rerank-k", ">= 0")
    one_line_error(*run_main(["demo", "--steps", "0"], capsys), "--steps 0", "coop_rcar")
    one_line_error(*run_main(["demo", "--regulator", "rcar"], capsys), "--regulator", "rcar")
    one_line_error(*run_main(["demo", "--tolerance", "small"], capsys), "--tolerance")


def test_cli_has_no_bench_pass_through(capsys):
    """The benchmarks are `python -m bench` (the package never imports bench/)."""
    one_line_error(*run_main(["bench", "--quick"], capsys), "bench")


def test_bench_argument_errors_are_one_line(monkeypatch, capsys):
    """`python -m bench` checks its arguments before anything runs: one line, exit 2."""
    sys.path.insert(0, ROOT) if ROOT not in sys.path else None
    import bench.suite as suite
    ran = []
    monkeypatch.setattr(suite, "run_settings", lambda *a, **k: ran.append(a) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def bench_main(argv):
        rc = suite.main(argv)
        out, err = capsys.readouterr()
        return rc, out, err
    one_line_error(*bench_main(["--no-such-flag"]), "unrecognized", "--no-such-flag")
    one_line_error(*bench_main(["--dtype", "fp8"]), "--dtype", "fp8")
    one_line_error(*bench_main(["--device", "cuda"]), "--device", "no CUDA device")
    one_line_error(*bench_main(["--device", "gpu"]), "--device", "'gpu'")
    one_line_error(*bench_main(["--shards", "flickr30k,imagenet"]), "--shards", "imagenet")
    one_line_error(*bench_main(["--configs", "coop_rcar:two"]), "--configs", "coop_rcar:two")
    one_line_error(*bench_main(["--configs", "rcar:2"]), "--configs", "rcar")
    one_line_error(*bench_main(["--directions", "t2i,up"]), "--directions")
    one_line_error(*bench_main(["--images", "0"]), "--images")
    assert ran == []                   # nothing started
    assert bench_main(["--quick", "--shards", "mscoco", "--configs", "only_rar:2"])[0] == 0
    assert len(ran) == 1
