"""Training across processes with gloo on this CPU (rcar_fast.app.train_dist): 2 and 3 processes
give the loss, the parameter gradients, the updated parameters and the BatchNorm statistics of
one process on the same global batch (to fp32 round-off), on a batch of 7 pairs that divides
evenly into neither, both loss modes and both directions, with DistributedDataParallel cut into
many small buckets; a non-finite loss on one process's share stops every process; a set-up error
on one process is reported once and ends every process; a process that fails mid-run ends every
process with a clear line, never a hang; `torchrun -m rcar_fast train` runs end to end with only
process 0 writing and printing.

Every multi-process test runs under its own deadline: the processes are killed and the test
fails if they have not ended by then."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import rcar_fast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CPP = "cpp" if rcar_fast.backend_status().get("cpp") == "available" else "torch"
TINY = ["--embed-size", "16", "--word-dim", "8", "--sim-dim", "8", "--no-progress", "--log-step", "1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(target, world: int, args, deadline_s: float):
    """Start ``target(rank, world, port, *args)`` in ``world`` spawned processes; their exit
    codes. Any process still running at the deadline: every process is killed and the test fails."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if alive:
        pytest.fail(f"ranks {alive} of {world} still running after {deadline_s:.0f} s (a hang)")
    return [p.exitcode for p in procs]


def _torchrun_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)


def _stderr_to(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rcar_fast.app.train_data import write_synthetic_precomp
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_precomp(str(folder), n_train=20, n_dev=6, n_test=6, seed=5)
    return str(folder)


# ----------------------------------------------------------------------------- one step, W processes

def _keep_all(step, images, captions, lq, width, device):
    return (torch.ones(len(images), len(captions), lq, width, dtype=torch.bool, device=device),
            torch.ones(len(images), len(captions), width, dtype=torch.bool, device=device))


def _close(got, want, what, rel=2e-4):
    """Equal to fp32 round-off: the largest difference within ``rel`` of the tensor's largest
    magnitude (sums over a batch's hinge terms round differently when cut across processes;
    a gradient that is zero in exact arithmetic comes out at 1e-9 either way)."""
    got, want = got.double(), want.double()
    err = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    assert err <= rel * scale + 1e-7, f"{what}: differs by {err:.3g} (largest magnitude {scale:.3g})"


def steps(data: str, out: str):
    """An optimisation step with each loss (VSE0, max-violation) per direction on the same global
    batch of 7 pairs, each from the same start, then a step whose process-0 share has NaN features. Word dropout off and RAR's
    keep-masks all ones, so that every process count computes the same function."""
    from rcar_fast.app import train as T
    from rcar_fast.dropout import fixed_keep_masks
    result = {}
    for attn_type in ("t2i", "i2t"):
        tr = T.Trainer(T.TrainConfig(data=data, out=out, epochs=2, embed_size=16, word_dim=8, sim_dim=8,
                                     batch_size=7, warmup_epochs=1, lr=1e-2, backend="torch", progress=False,
                                     attn_type=attn_type, ddp_bucket_mb=0.0005))
        tr.model.txt_enc.dropout.p = 0.0
        index = np.array([3, 17, 42, 8, 99, 55, 61])
        rows = []
        start = ({k: v.clone() for k, v in tr.model.state_dict().items()}, tr.optimizer.state_dict())
        with fixed_keep_masks(_keep_all):
            for epoch in (0, 1):        # each from the same start: a parameter whose gradient is zero in
                # exact arithmetic gets round-off that AdamW scales up to ~lr/10, which a second step
                # would carry into BatchNorm's statistics
                tr.model.load_state_dict(start[0])
                tr.optimizer.load_state_dict(start[1])
                loss = tr.step(tr.train_set.batch(index, 0, epoch, epoch), epoch, epoch)
                rows.append(dict(loss=loss,
                                 grads={n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None},
                                 params={n: p.detach().clone() for n, p in tr.model.named_parameters()},
                                 buffers={n: b.clone() for n, b in tr.model.named_buffers()}))
            batch = tr.train_set.batch(index, 0, 1, 2)
            batch.images[:3] = float("nan")          # only in process 0's share (the first 3 or 4 pairs)
            try:
                tr.step(batch, 1, 2)
                rows.append("no error")
            except T.TrainingDiverged as exc:
                rows.append(str(exc))
        result[attn_type] = rows
    return result


def step_worker(rank, world, port, data, out_dir):
    _torchrun_env(rank, world, port)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = steps(data, os.path.join(out_dir, "run"))
    except Exception as exc:     # reported by the parent
        import traceback
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_processes_give_one_process_s_loss_gradients_and_step(world, data, tmp_path):
    codes = _run_processes(step_worker, world, (data, str(tmp_path)), deadline_s=120)
    torch.set_num_threads(1)
    want = steps(data, str(tmp_path / "one"))
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert "error" not in got, got["error"]
        for attn_type in ("t2i", "i2t"):
            for k, (g, w) in enumerate(zip(got[attn_type][:2], want[attn_type][:2])):
                where = f"rank {rank} of {world}, {attn_type}, step {k}"
                assert g["loss"] == pytest.approx(w["loss"], rel=1e-5, abs=1e-6), where
                assert g["grads"].keys() == w["grads"].keys(), where
                for kind in ("grads", "params", "buffers"):
                    for n in w[kind]:
                        if kind == "params" and n in w["grads"] and float(w["grads"][n].abs().max()) < 1e-6:
                            continue    # zero gradient in exact arithmetic (a bias before BatchNorm or a
                            # softmax): AdamW scales its round-off noise up to a step of ~lr/10
                        _close(g[kind][n], w[kind][n], f"{where}: {kind} {n}")
            assert "the loss is nan at epoch 2, step 3" in got[attn_type][2], (rank, got[attn_type][2])
    assert codes == [0] * world


def test_the_loss_is_not_a_per_process_loss(data, tmp_path):
    """Guards the test above: a batch scored per process (each share's own square block) gives
    another loss, so the equivalence is not vacuous."""
    from rcar_fast.app import train as T
    tr = T.Trainer(T.TrainConfig(data=data, out=str(tmp_path), epochs=1, embed_size=16, word_dim=8, sim_dim=8,
                                 batch_size=7, backend="torch", progress=False))
    tr.model.eval()
    b = tr.train_set.batch(np.arange(7), 0, 0, 0)
    with torch.no_grad():
        S = tr.model(b.images, b.ids, b.lengths, backend="torch")
    whole = float(T.contrastive_loss(S, 0.2, True))
    split = float(T.contrastive_loss(S[:4, :4], 0.2, True) + T.contrastive_loss(S[4:, 4:], 0.2, True))
    assert abs(whole - split) > 1e-3


# ----------------------------------------------------------------------------- failures

def cli_worker(rank, world, port, argv_by_rank, fail_rank, err_dir):
    """`rcar-fast train` as torchrun would start it; ``fail_rank`` raises in its second step."""
    _torchrun_env(rank, world, port)
    _stderr_to(os.path.join(err_dir, f"{rank}.err"))
    from rcar_fast.app import cli
    from rcar_fast.app import train as T
    if rank == fail_rank:
        real, calls = T.Trainer.step, []

        def step(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError(f"planted failure on rank {rank}")
            return real(self, *a, **k)
        T.Trainer.step = step
    code = cli.main(["train", *argv_by_rank[rank]])
    sys.stderr.flush()
    os._exit(code)


def test_a_failing_process_ends_every_process_with_a_clear_error(data, tmp_path):
    argv = ["--data", data, "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "6",
            "--backend", "torch", "--dist-timeout", "60", *TINY]
    t0 = time.monotonic()
    codes = _run_processes(cli_worker, 2, ([argv, argv], 1, str(tmp_path)), deadline_s=90)
    errs = [(tmp_path / f"{r}.err").read_text() for r in range(2)]
    assert codes == [1, 1], (codes, errs)
    assert "rcar-fast train: rank 1: failed: RuntimeError: planted failure on rank 1" in errs[1], errs
    assert "rcar-fast train: rank 0: stopped: a collective failed" in errs[0], errs
    assert time.monotonic() - t0 < 60                    # ended by the failure, not by a timeout
    assert not (tmp_path / "run" / "checkpoint_0.pth").exists()


def test_a_set_up_error_on_one_process_is_reported_once_and_ends_every_process(data, tmp_path):
    good = ["--data", data, "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "6",
            "--backend", "torch", *TINY]
    bad = good + ["--vocab", str(tmp_path / "missing.json")]
    codes = _run_processes(cli_worker, 2, ([good, bad], -1, str(tmp_path)), deadline_s=90)
    errs = [(tmp_path / f"{r}.err").read_text() for r in range(2)]
    assert codes == [2, 2], (codes, errs)
    assert errs[0].strip().splitlines() == [f"rcar-fast train: rank 1: {tmp_path / 'missing.json'}: no such "
                                            "vocabulary file"], errs
    assert errs[1].strip() == ""


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_trains_with_only_process_0_writing(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rcar_fast",
           "train", "--data", data, "--out", str(out), "--epochs", "2", "--batch-size", "9", "--val-captions", "30",
           "--backend", CPP, "--log-step", "1", *TINY[:-2]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    try:
        r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun still running after 150 s: {exc.stdout} {exc.stderr}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("done: best rsum") for line in lines) == 1, r.stdout
    assert sum("iteration 3:" in line for line in lines) == 1, r.stdout      # a log line per step, once
    assert sum(line.startswith("rcar-fast train:") for line in lines) == 1, r.stdout
    files = set(os.listdir(out))
    assert {"checkpoint_0.pth", "checkpoint_1.pth", "model_best.pth", "metrics.csv", "train.log"} <= files
    from rcar_fast.app.encoders import read_checkpoint
    ck = read_checkpoint(str(out / "checkpoint_1.pth"))
    assert ck["opt"].world_size == 2 and ck["Eiters"] == 2 * (100 // 9)
    with open(out / "train.log") as f:
        assert sum("iteration 3:" in line for line in f) == 1
