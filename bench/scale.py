"""Scale-out rows: exact scoring on several processes, and top-k search over a gallery bigger
than its memory. Rows go to bench/results/history.csv like `python -m bench`'s.

    python -m bench.scale                      # 1 vs 2 processes on this machine, and search
    python -m bench.scale --ranks 1,2,4 --backend cpp --images 200 --captions 200

Processes (op "score_all ranks=N"): N gloo processes on this machine split the cores between
them (torch threads = cores // N) and score the shard with retrieval.score_all(group=True);
the row is the wall time of the whole scoring (first process's clock, between barriers), and
the note gives the parallel efficiency against one process using every core: t1 / (N tN) x N
cores used the same way, i.e. t1 / tN, so 1.0 means N processes were as fast as one process
with all the cores (a 2-core machine cannot give more than that).

Search (op "search k=10"): a gallery of images in an .npy file, bigger than the memory the
search may use (one chunk of --chunk images at a time), searched for the top 10 of every caption
query with rcar_fast.app.search.search (what `rcar-fast search` runs after encoding); one row
per gallery size of --gallery (default two sizes, to show the peak does not grow with the
gallery; a warm-up search of one chunk first, so that one-time allocations fall in no row);
the row's peak memory is the call's (harness.measure_peak), the note the gallery's size on disk.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import torch

from . import harness
from .report import Row, append_csv, markdown_table
from .shapes import SHARDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _score_worker(rank, world, port, backend, n_i, n_c, threads, out):
    import torch.distributed as dist
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    import rcar_fast
    from rcar_fast.app.retrieval import score_all
    shard = SHARDS["flickr30k"].resized(n_i, n_c)
    img, cap, lens = shard.inputs("cpu")
    torch.manual_seed(0)
    head = rcar_fast.RCARSimilarity().eval()
    score_all(head, img[:4], cap[:4], lens[:4], backend=backend, group=True)     # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    score_all(head, img, cap, lens, backend=backend, group=True)
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(time.perf_counter() - t0))
    dist.destroy_process_group()


def scoring_seconds(world: int, backend: str, n_i: int, n_c: int) -> float:
    import torch.multiprocessing as mp
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dist_workers import free_port
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t")
        mp.spawn(_score_worker, args=(world, free_port(), backend, n_i, n_c, max(1, cores // world), out),
                 nprocs=world, join=True)
        with open(out) as f:
            return float(f.read())


def search_row(env, n_gallery: int, n_queries: int, k: int, chunk: int) -> Row:
    import numpy as np
    import rcar_fast
    from rcar_fast.app.search import Gallery, search
    shard = SHARDS["flickr30k"].resized(n_queries, n_queries)
    _, cap, lens = shard.inputs("cpu")
    torch.manual_seed(0)
    head = rcar_fast.RCARSimilarity().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gallery.npy")
        g = torch.Generator().manual_seed(1)
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_gallery, 36, 1024))
        for s in range(0, n_gallery, 256):
            x = torch.randn(min(256, n_gallery - s), 36, 1024, generator=g)
            arr[s:s + x.shape[0]] = (x / x.norm(dim=-1, keepdim=True)).numpy()
        arr.flush()
        del arr
        gallery = Gallery([path], "images")
        t0 = time.perf_counter()
        _, peak_b, _ = harness.measure_peak(lambda: search(head, cap, gallery, k, lens, "t2i", chunk=chunk),
                                            torch.device("cpu"))
        secs = time.perf_counter() - t0
        size_mb = os.path.getsize(path) / 2**20
    pairs = n_gallery * n_queries
    return Row(timestamp=env["timestamp"], git_commit=env["commit"], device=env["device"],
               torch_version=env["torch"], triton_version=env["triton"], backend="auto", op=f"search k={k}",
               regulator="coop_rcar", steps=2, attn_type="t2i",
               shape=f"gallery {n_gallery}x{n_queries} R36 d1024 s256 len6-24", dtype="float32",
               median_ms=secs * 1e3, pairs_per_s=pairs / secs,
               peak_mem_mb=None if peak_b is None else peak_b / 2**20,
               note=f"one run; gallery {size_mb:.0f} MB on disk, chunk {chunk} images; "
                    f"peak = the call's allocator peak")


def cpu_env(detail: str = "") -> dict:
    """The rows' common columns on this CPU: time, commit, device (cores, and ``detail``), versions."""
    return dict(timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                commit=harness.git_commit(), device=f"{harness.device_name(torch.device('cpu'))} "
                f"({os.cpu_count()} cores{detail})", torch=torch.__version__, triton=harness.triton_version())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--gallery", default="1000,2000",
                    help="images in the search gallery, comma-separated sizes (1000: 141 MB on disk)")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--csv", default=os.path.join(ROOT, "bench", "results", "history.csv"))
    a = ap.parse_args(argv)
    env = cpu_env()
    rows, base = [], None
    shard = SHARDS["flickr30k"].resized(a.images, a.captions)
    for world in [int(x) for x in a.ranks.split(",")]:
        secs = scoring_seconds(world, a.backend, a.images, a.captions)
        base = base or (secs if world == 1 else None)
        eff = "" if base is None else f"; efficiency t1 / t{world} = {base / secs:.2f} (1.0: as fast as one process on every core)"
        rows.append(Row(timestamp=env["timestamp"], git_commit=env["commit"], device=env["device"],
                        torch_version=env["torch"], triton_version=env["triton"], backend=a.backend,
                        op=f"score_all ranks={world}", regulator="coop_rcar", steps=2, attn_type="t2i",
                        shape=shard.label, dtype="float32", median_ms=secs * 1e3, pairs_per_s=shard.pairs / secs,
                        note=f"one run; {world} gloo processes x {max(1, (os.cpu_count() or 1) // world)} threads{eff}"))
        print(f"ranks {world}: {secs:.2f} s, {shard.pairs / secs:.0f} pairs/s{eff}", flush=True)
    search_row(env, a.chunk, a.queries, 10, a.chunk)     # warm-up (one-time allocations), not a row
    for n_gallery in [int(x) for x in a.gallery.split(",")]:
        rows.append(search_row(env, n_gallery, a.queries, 10, a.chunk))
        peak = rows[-1].peak_mem_mb
        print(f"search {n_gallery} images x {a.queries} queries: {rows[-1].median_ms / 1e3:.1f} s, "
              f"{rows[-1].pairs_per_s:.0f} pairs/s, peak {'-' if peak is None else f'{peak:.0f}'} MB; "
              f"{rows[-1].note}", flush=True)
    append_csv(a.csv, rows)
    print("\n" + markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
