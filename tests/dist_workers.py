"""Worker functions for the multi-process tests (importable by spawned processes): each joins a
gloo group on 127.0.0.1 and writes what it returned, or the error it raised, to a file."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(fn, world: int, args, timeout_s: float = 180.0):
    """Run fn(rank, world, port, *args) in ``world`` spawned processes; kill them all and fail
    if they are not done within ``timeout_s`` (a hang is a failure, never a stuck CI)."""
    import torch.multiprocessing as mp
    ctx = mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} processes still running after {timeout_s:.0f} s")


def _join(rank, world, port, timeout_s=60.0):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def score_worker(rank, world, port, out_dir, cases, fail_rank):
    """For every case (regulator, steps, attn_type, n_i, n_c, seed, tile), score_all with
    group=True; rank r writes out_dir/r.pt: the matrices, or {"error": message}."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from rcar_testutil import make_head, make_inputs
    from rcar_fast.app import retrieval as RT
    _join(rank, world, port)
    result = {}
    try:
        for key, (regulator, steps, attn_type, n_i, n_c, seed, tile) in cases.items():
            img, cap, lens = make_inputs(n_i, n_c, 5, 7, 24, torch.float32, seed)
            head = make_head(regulator, steps, attn_type, 24, 8, torch.float32, seed)
            if rank == fail_rank:
                real = head.forward

                def broken(*a, **k):
                    raise RuntimeError(f"planted failure on rank {rank}")
                head.forward = broken
            result[key] = RT.score_all(head, img, cap, lens, backend="torch", tile=tile, group=True)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def search_worker(rank, world, port, out_dir, gallery_files, length_files, direction, k, rerank_k, chunk):
    """rcar_fast.app.search.search with group=True over the stand-in head of test_search; rank
    r writes out_dir/r.pt: (scores, ids) or {"error": ...}."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_search import GridHead, queries_for
    from rcar_fast.app.search import Gallery, search
    _join(rank, world, port)
    try:
        gallery = Gallery(gallery_files, "images" if direction == "t2i" else "captions", length_files)
        q, ql = queries_for(direction)
        top = search(GridHead(), q, gallery, k, ql, direction, rerank_k=rerank_k, chunk=chunk, group=True)
        result = (top.scores, top.ids)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _cli_with_hook(hook: str, argv) -> int:
    """``rcar-fast argv`` in this process (started by torchrun), with a planted behaviour on one
    rank: ``fail-score:R`` (rank R's score tiles raise), ``fail-load:R`` (rank R cannot read the
    split), ``fail-search:R`` (rank R's search scoring raises), ``die:R`` (rank R's process ends
    outright in its first tile), ``count:DIR`` (every rank writes DIR/<rank>.txt: the tiles it
    scored), ``none``."""
    from rcar_fast.app import cli, data, retrieval, search
    rank = int(os.environ.get("RANK", "0"))
    mode, _, arg = hook.partition(":")
    real_tile, counted = retrieval.score_tile, []

    def planted(*a, **k):
        raise RuntimeError(f"planted failure on rank {rank}")

    def count_tile(*a, **k):
        counted.append(1)
        return real_tile(*a, **k)

    def die(*a, **k):
        os._exit(3)
    if mode in ("fail-score", "fail-load", "fail-search", "die") and rank == int(arg):
        target = {"fail-score": (retrieval, "score_tile"), "fail-load": (data, "load_precomp"),
                  "fail-search": (search, "_scores"), "die": (retrieval, "score_tile")}[mode]
        setattr(*target, die if mode == "die" else planted)
    if mode == "count":
        retrieval.score_tile = count_tile
    rc = cli.main(argv)
    if mode == "count":
        with open(os.path.join(arg, f"{rank}.txt"), "w") as f:
            f.write(str(len(counted)))
    return rc


if __name__ == "__main__":      # torchrun tests/dist_workers.py HOOK rcar-fast-arguments...
    import sys
    sys.exit(_cli_with_hook(sys.argv[1], sys.argv[2:]))
