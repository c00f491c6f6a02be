"""The command line at scale: ``rcar-fast search`` over a gallery in several .npy shards, and
``eval`` and ``search`` under torchrun (gloo, 2 processes on this CPU).

Each torchrun run is a subprocess (``python -m torch.distributed.run --tee 3``: every output line
carries its rank, so "only rank 0 prints" is checked line by line) bounded by a timeout; the
planted failures come from tests/dist_workers.py's command-line wrapper."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dist_workers import free_port
from rcar_fast.app import encoders as E
from rcar_fast.app.retrieval import score_all
from test_cli import ROOT, one_line_error, printed_rsum, run_main, write_eval_files

HERE = os.path.dirname(os.path.abspath(__file__))
SHARDS = (4, 1, 4)          # the gallery's 9 images in three files
N_QUERIES, TOP_K = 7, 4


def torchrun(args, nproc=2, hook=None, timeout=150, start="fork"):
    """(return code, stdout + stderr lines, seconds) of ``torchrun --nproc_per_node nproc -m
    rcar_fast args`` (or tests/dist_workers.py with ``hook``); a hang fails the test. Workers
    forked from the launcher by default (they skip importing torch again: 3 s less a run on 2
    cores); ``start="spawn"`` is torchrun's own default."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    target = ["-m", "rcar_fast"] if hook is None else [os.path.join(HERE, "dist_workers.py"), hook]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "--tee", "3", "--start-method", start, *target, *args]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    # torchrun's tee reads each rank's log as it grows and prefixes what it read; a line read
    # before its newline was written gets the next read's prefix glued to its end (seen once:
    # "...planted failure on rank 1[default0]:"): that stray prefix is the launcher's, not ours
    lines = [re.sub(r"(\[default\d+\]:)+$", "", ln) for ln in (p.stdout + p.stderr).splitlines()]
    return p.returncode, lines, time.monotonic() - t0


def by_rank(lines, rank):
    """The lines rank printed, without torchrun's prefix."""
    tag = f"[default{rank}]:"
    return [line[len(tag):] for line in lines if line.startswith(tag)]


# ----------------------------------------------------------------------------- search

@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A checkpoint, its vocabulary, 9 gallery images in 3 .npy files, 7 caption queries, and the
    exhaustive (queries x gallery) matrix of the library's score_all (torch backend)."""
    tmp = tmp_path_factory.mktemp("search")
    data, ckpt, model, ims, caps, _ = write_eval_files(tmp, n=sum(SHARDS))
    files, pos = [], 0
    for k, n in enumerate(SHARDS):
        files.append(str(tmp / f"gallery{k}.npy"))
        np.save(files[-1], ims[pos:pos + n])
        pos += n
    queries = tmp / "queries.txt"
    queries.write_text("\n".join(caps[:N_QUERIES]) + "\n")
    vocab = data / "f30k_precomp_vocab.json"
    ids, lens = E.encode_captions(caps[:N_QUERIES], E.Vocabulary.from_json(str(vocab)))
    with torch.no_grad():
        img, cap = model.encode_images(torch.from_numpy(ims)), model.encode_captions(ids, lens)
    full = score_all(model.sim_enc, img, cap, lens, backend="torch").t().double()   # (queries, gallery)
    argv = ["search", "--checkpoint", str(ckpt), "--vocab", str(vocab), "--queries", str(queries),
            "--top-k", str(TOP_K), "--chunk", "2", "--backend", "torch", "--no-progress"]
    for f in files:
        argv += ["--gallery", f]
    return dict(tmp=tmp, argv=argv, full=full)


def expected_rows(full, k):
    """(query, rank, gallery id, score) of the exhaustive matrix: by score, ties by the lower id
    (float32 scores written with 9 digits: exact)."""
    rows = []
    for q, row in enumerate(full.tolist()):
        for r, g in enumerate(sorted(range(len(row)), key=lambda g: (-row[g], g))[:k]):
            rows.append((q, r + 1, g, float(f"{row[g]:.9g}")))     # as written
    return rows


def read_rows(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "query\trank\tgallery_id\tscore"
    return [(int(q), int(r), int(g), float(s)) for q, r, g, s in (ln.split("\t") for ln in lines[1:])]


def test_search_one_process_equals_the_exhaustive_topk(gallery, capsys):
    out_file = gallery["tmp"] / "one.tsv"
    rc, out, err = run_main(gallery["argv"] + ["--out", str(out_file)], capsys)
    assert rc == 0, err
    assert read_rows(out_file) == expected_rows(gallery["full"], TOP_K)
    assert f"a gallery of {sum(SHARDS)} images in 3 files" in out
    assert f"{N_QUERIES * sum(SHARDS)} pairs scored" in out


def test_search_two_processes_merge_exactly_and_rank_0_alone_writes(gallery):
    out_file = gallery["tmp"] / "two.tsv"
    rc, lines, _ = torchrun(gallery["argv"] + ["--out", str(out_file)], start="spawn")
    assert rc == 0, "\n".join(lines[-30:])
    assert read_rows(out_file) == expected_rows(gallery["full"], TOP_K)
    assert by_rank(lines, 1) == [], lines
    said = by_rank(lines, 0)
    assert any("2 processes" in s for s in said) and any(f"wrote {N_QUERIES * TOP_K} rows" in s for s in said)
    assert any(f"{N_QUERIES * sum(SHARDS)} pairs scored" in s for s in said)   # both ranks' pairs


def test_search_argument_errors_are_one_line(gallery, capsys):
    argv = gallery["argv"]
    one_line_error(*run_main(argv + ["--top-k", "0"], capsys), "--top-k")
    one_line_error(*run_main(argv + ["--rerank-k", "2"], capsys), "--rerank-k 2", "--top-k 4")
    one_line_error(*run_main(argv + ["--timeout", "0"], capsys), "--timeout")
    one_line_error(*run_main(argv + ["--gallery", str(gallery["tmp"] / "gone.npy")], capsys), "gone.npy")
    one_line_error(*run_main(argv + ["--out", str(gallery["tmp"] / "no" / "hits.tsv")], capsys),
                   "--out", "no such folder")
    np.save(gallery["tmp"] / "wide.npy", np.zeros((2, 3, 21), np.float32))
    one_line_error(*run_main(argv + ["--gallery", str(gallery["tmp"] / "wide.npy")], capsys),
                   "wide.npy", "img_dim 20")


def test_search_failure_on_one_rank_stops_both(gallery):
    rc, lines, secs = torchrun(gallery["argv"] + ["--timeout", "60"], hook="fail-search:1")
    assert rc != 0 and secs < 120
    errors = [ln for ln in lines if "rcar-fast search:" in ln and "failed" in ln]
    assert errors == ["[default0]:rcar-fast search: search failed on rank 1: RuntimeError: planted failure "
                      "on rank 1"], lines
    assert not any("\t" in ln for ln in by_rank(lines, 0)), lines        # no result printed


# ----------------------------------------------------------------------------- eval

N_EVAL = 24          # 24 images x 120 captions: two score tiles, one per process


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data, ckpt, *_ = write_eval_files(tmp, n=N_EVAL)
    return tmp, ["eval", "--data", str(data), "--checkpoint", str(ckpt), "--backend", "torch", "--no-progress",
                 "--timeout", "60"]


def test_eval_two_processes_print_the_one_process_recall(eval_files, capsys):
    tmp, argv = eval_files
    rc, out, err = run_main(argv + ["--save-scores", str(tmp / "one.npy")], capsys)
    assert rc == 0, err
    counts = tmp / "counts"
    counts.mkdir()
    rc, lines, _ = torchrun(argv + ["--save-scores", str(tmp / "two.npy")], hook=f"count:{counts}")
    assert rc == 0, "\n".join(lines[-30:])
    assert by_rank(lines, 1) == [], lines                     # rank 1 prints nothing
    said = "\n".join(by_rank(lines, 0))
    assert printed_rsum(said, "exhaustive (result)") == printed_rsum(out, "exhaustive (result)")
    assert [ln for ln in said.splitlines() if "to text" in ln or "to image" in ln] == \
        [ln for ln in out.splitlines() if "to text" in ln or "to image" in ln]
    assert "on 2 processes" in said
    # the tiles were shared out (each process scored some, none twice), the matrix bit-identical
    tiles = [int((counts / f"{r}.txt").read_text()) for r in (0, 1)]
    assert min(tiles) >= 1 and sum(tiles) == 2, tiles
    assert np.array_equal(np.load(tmp / "one.npy"), np.load(tmp / "two.npy"))


@pytest.mark.parametrize("hook, needle", [
    ("fail-score:1", "scoring failed on rank 1: RuntimeError: planted failure on rank 1"),
    ("fail-load:0", "eval failed on rank 0: RuntimeError: planted failure on rank 0")], ids=["scoring", "loading"])
def test_eval_failure_on_one_rank_stops_every_rank_with_one_line(eval_files, hook, needle):
    _, argv = eval_files
    rc, lines, secs = torchrun(argv, hook=hook)
    assert rc != 0 and secs < 120
    ours = [ln for ln in lines if "rcar-fast eval:" in ln and "failed" in ln]
    assert ours == [f"[default0]:rcar-fast eval: {needle}"], lines       # one line, from rank 0
    assert not any("rsum" in ln for ln in lines), lines
    assert not any(ln.startswith("[default") and "Traceback" in ln for ln in lines), lines


def test_eval_rank_that_dies_ends_the_run(eval_files):
    """A process gone outright (no message of its own): the others do not wait for it."""
    _, argv = eval_files
    rc, lines, secs = torchrun(argv, hook="die:1")
    assert rc != 0 and secs < 120, lines
    assert not any("rsum" in ln for ln in lines), lines


def test_eval_bad_argument_under_torchrun_is_one_line(eval_files):
    _, argv = eval_files
    rc, lines, _ = torchrun(argv + ["--batch-size", "0"])
    assert rc != 0
    ours = [ln for ln in lines if "rcar-fast eval:" in ln]
    assert len(ours) == 1 and ours[0].startswith("[default0]:") and "--batch-size" in ours[0], lines
