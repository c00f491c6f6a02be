"""Cost model: every launch of a backend for a named shape, with the work it executes and the
bytes it moves, and the time an H200 would take by its ceilings. A prediction, not a
measurement: it says where the time should go before a GPU is lent, and the device suite's
measured rows are judged against it.

    python -m bench.roofline                         # every shape, every GPU backend, bf16
    python -m bench.roofline --shape flickr30k --backends triton --launches
    python -m bench.roofline --json
    python -m bench.roofline --write            # bench/results/roofline.md and roofline.json
    python -m bench.roofline --compare history.csv   # measured rows (bf16 on a GPU) vs predicted
    python -m bench.roofline --what-if-rcr-on-chip 128   # a design not built, against the code

Shapes (lengths drawn as bench/shapes.py draws them, seeded):
  flickr30k   the Flickr30K test matrix: 1,000 images x 5,000 captions, lengths 6..24,
              coop_rcar T = 2, t2i (the goal: <= 0.35 s predicted, <= 0.5 s measured)
  mscoco5k    MSCOCO 5K: 5,000 x 25,000, lengths 6..30, coop_rcar T = 2, t2i (goal <= 12 s)
  headline    the 100 x 100 Flickr-shaped shard of `python -m bench`, coop_rcar T = 2, t2i
  train       one training step, 128 x 128 pairs, lengths 6..24, coop_rcar T = 2, i2t: the
              forward, its recompute under block checkpointing, and the backward
  train_t2i   the same step for the t2i model

Per launch: TC = tensor-core FLOPs executed (padding included: a Triton program's tile is
the power of two above its rows, the attention forward's above its packed pairs' rows; a CUDA
block's row group 16 x MT, the wgmma attention and RAR forwards' 128 rows), SIMT = other FLOPs (fp32
FMAs, counted 2 per FMA; element-wise work at a few FLOPs per element), HBM = bytes from and to
device memory, L2 = bytes through the L2 (every load and store of a program: a shared weight read
by every pair counts once per pair here and once in HBM), SMEM = bytes of shared-memory traffic
where a kernel's inner loop reads its operands from there (the CUDA kernels' SIMT products: two
4-byte loads per FMA). The launch's time is the largest of its work over the matching ceiling,
plus a fixed launch cost; a backend's time is the sum over its launches (no overlap assumed).

Ceilings (H200, bf16): MEASURED here on an H200 (the device tool's KINDS.md, 2026-10-28/11-04):
790 TFLOP/s for a dense bf16 matrix product, 4.3 TB/s device-to-device copy. LEADS (datasheet or
estimates, not measured): 67 TFLOP/s fp32 SIMT, 10 TB/s L2, 33 TB/s shared memory (132 SMs x
128 B/clock x 1.98 GHz), 5 us per launch, and 2/3 of the measured 790 for the tensor-core work
of the CUDA kernels' wmma work (wmma compiles to the warp-level HMMA, not Hopper's warpgroup
HGMMA that cuBLAS, the Triton kernels' sm_90 code and our wgmma kernels use: those take the 790).
Each figure a run measures replaces its lead.

What it models is the code as it is (kernels/, csrc/cuda/, the pipeline): block planning through
rcar_fast.block_plan with each backend's GPU budget and buffer counts, one launch per op per
block and step, the pipeline's own torch ops per block and per call (PIPELINE_BLOCK_OPS,
PIPELINE_CALL_OPS: counted on CPU by tests/test_roofline.py), the torch backend's
element-wise passes, RCR at inference as two GEMM kernels with fused epilogues (triton and, in
fp16/bf16, cuda; torch's step under autograd).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from rcar_fast.backends.contract import gpu_budget

#: ceilings, per second; (value, "measured" or "lead")
CEILINGS = {
    "tc": (790e12, "measured: 8192^3 bf16 matmul, H200, KINDS.md"),
    "hmma": (527e12, "lead: warp-level mma.sync (HMMA: our CUDA wmma kernels) at about 2/3 of the "
                             "warpgroup wgmma (HGMMA) rate the tc figure was measured with"),
    "simt": (67e12, "lead: fp32 non-tensor datasheet rate"),
    "hbm": (4.3e12, "measured: device-to-device copy, H200, KINDS.md"),
    "l2": (10e12, "lead: Hopper L2 bandwidth estimate"),
    "smem": (33e12, "lead: 132 SMs x 128 B/clock x 1.98 GHz"),
}
LAUNCH_S = 5e-6      # lead: launch and tail cost per kernel launch
L2_BYTES = 60e6      # the H200's L2 (PyTorch reported 60 MB, KINDS.md)
GPU_MEMORY = 143771 * 2**20   # the H200's memory (nvidia-smi: 143771 MiB, KINDS.md)

D, S_DIM, R = 1024, 256, 36
ELEM = 2             # bf16


@dataclass
class Shape:
    name: str
    n_images: int
    n_captions: int
    len_lo: int
    len_hi: int
    regulator: str = "coop_rcar"
    steps: int = 2
    attn_type: str = "t2i"
    training: bool = False
    seed: int = 0
    #: a design not built, modelled for the decision (--what-if-rcr-on-chip, triton only): RCR's
    #: factors F made on chip, BDF columns of d at a time, in the next step's attention (0: as built)
    rcr_on_chip: int = 0

    def lengths(self) -> List[int]:
        """The caption lengths ``python -m bench`` draws for a shard of this size and seed."""
        from .shapes import Shard
        return Shard(self.name, self.n_images, self.n_captions, self.len_lo, self.len_hi, R, D, S_DIM,
                     self.seed).cap_lens().tolist()


SHAPES = {
    "flickr30k": Shape("flickr30k", 1000, 5000, 6, 24),
    "mscoco5k": Shape("mscoco5k", 5000, 25000, 6, 30),
    "headline": Shape("headline", 100, 100, 6, 24),
    "train": Shape("train", 128, 128, 6, 24, attn_type="i2t", training=True),
    "train_t2i": Shape("train_t2i", 128, 128, 6, 24, attn_type="t2i", training=True),
}
GOALS_S = {"flickr30k": 0.35, "mscoco5k": 12.0}


@dataclass
class Launch:
    """One kind of launch and how often it runs; work summed over all its launches."""
    backend: str
    name: str
    count: int = 0
    tc: float = 0.0
    simt: float = 0.0
    hbm: float = 0.0
    l2: float = 0.0
    smem: float = 0.0
    note: str = ""
    #: the tensor-core work is wmma / mma.sync (HMMA), with its own ceiling, not wgmma
    hmma: bool = False
    #: of an hmma launch's tc, the part on wgmma (HGMMA, the tc ceiling): one kernel with both
    hgmma_tc: float = 0.0

    def _terms(self) -> Dict[str, float]:
        assert self.hmma or not self.hgmma_tc, f"{self.name}: hgmma_tc is the HGMMA part of an hmma launch"
        if self.hmma:   # the two kinds share the tensor cores: their times add (the "hmma" term)
            terms = {"hmma": (self.tc - self.hgmma_tc) / CEILINGS["hmma"][0] + self.hgmma_tc / CEILINGS["tc"][0]}
        else:
            terms = {"tc": self.tc / CEILINGS["tc"][0]}
        terms.update({k: getattr(self, k) / CEILINGS[k][0] for k in ("simt", "hbm", "l2", "smem")})
        return terms

    def seconds(self) -> float:
        return max(self._terms().values()) + self.count * LAUNCH_S

    def bound(self) -> str:
        terms = self._terms()
        terms["launch"] = self.count * LAUNCH_S
        return max(terms, key=terms.get)


@dataclass
class Book:
    """The launches of one backend, by name (added to as the model walks the blocks)."""
    backend: str
    launches: Dict[str, Launch] = field(default_factory=dict)

    def add(self, name: str, count: int = 1, note: str = "", hmma: bool = False, **work) -> None:
        ln = self.launches.setdefault(name, Launch(self.backend, name, note=note, hmma=hmma))
        ln.count += count
        for k, v in work.items():
            setattr(ln, k, getattr(ln, k) + v)

    def seconds(self) -> float:
        return sum(ln.seconds() for ln in self.launches.values())


def pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _blocks(shape: Shape, live_buffers: int, budget: int):
    """(caption length, images in the block, captions in the block) of every block the pipeline
    cuts (rcar_fast.block_plan with the backend's GPU budget and buffer count)."""
    from rcar_fast.block_plan import iter_blocks
    lens = shape.lengths()
    for cols, Lg, i0, i1 in iter_blocks(lens, shape.n_images, R, D, shape.attn_type, ELEM, budget, live_buffers):
        yield Lg, i1 - i0, len(cols)


def _rows(shape: Shape, Lg: int):
    """(Lq, Lc): query and context rows of a pair whose caption has Lg words."""
    return (Lg, R) if shape.attn_type == "t2i" else (R, Lg)


# ----------------------------------------------------------------------------- the pipeline's own ops

#: the pipeline's own torch ops at inference (rcar_fast/pipeline.py), each a launch on a GPU;
#: tests/test_roofline.py counts them on CPU tensors. Per block: the captions' index_select, the
#: scores' cast to float32, addmm and sigmoid, and their write into the output (index_put); with a
#: kernel set whose RAR takes the scoring layer (KernelSet.rar_scores: triton) the index_select and
#: the write. Per call: the RAR modules' weights stacked (6), the scoring layer's weight and bias
#: cast (2), the images' region counts (1). For bf16/fp16 inputs, as modelled (with fp32 ones the
#: casts are no-ops: one op fewer a block, two a call).
PIPELINE_BLOCK_OPS = 5
PIPELINE_BLOCK_OPS_FUSED_SCORE = 2
PIPELINE_CALL_OPS = 9
#: per call, besides (not seen by that count on CPU tensors): the host-to-device copies of every
#: block's caption indices and of their lengths
PIPELINE_CALL_COPIES = 2


def pipeline_block(book: Book, B: int, P: int, Lq: int, tag: str = "", fused_score: bool = False) -> None:
    """A block's own torch ops (PIPELINE_BLOCK_OPS, or PIPELINE_BLOCK_OPS_FUSED_SCORE where RAR's
    last launch took the scoring layer): the query side's rows gathered (t2i: the captions, Lq
    words each), the scores from h (pairs x s), written to the output. The training shapes book
    the same per forward and recompute (their dropout masks and checkpointing add ops the count
    does not check)."""
    pairs, s, e = B * P, S_DIM, ELEM
    gather = P * Lq * D * e * 2      # the rows gathered: read, written
    if fused_score:                  # the scores read and written by index_put
        book.add(f"block sources and the scores' write (torch){tag}", count=PIPELINE_BLOCK_OPS_FUSED_SCORE,
                 hbm=gather + pairs * 2 * 4)
        return
    # h read in its dtype, written in float32 and read again by addmm; the scores written, read
    # and written by the sigmoid, read and written by index_put
    book.add(f"block sources, scores and their write (torch){tag}", count=PIPELINE_BLOCK_OPS,
             simt=pairs * (2 * s + 8), hbm=gather + pairs * (s * (e + 8) + 5 * 4))


def book_gram(book: Book, name: str, B: int, Lc: int, note: str = "") -> None:
    """One _gram_kernel launch over B context items of Lc rows: C read, its BC x BC fp32 tiles
    written."""
    BC = pow2(Lc)
    book.add(name, count=1, note=f"BC {BC}" + note, tc=B * 2 * BC * BC * D, l2=B * (Lc * D * ELEM + BC * BC * 4),
             hbm=B * (Lc * D * ELEM + BC * BC * 4))


def gram_tile_bytes(Lc: int) -> int:
    """The bytes of a context item's fp32 Gram tile a Triton attention program reads: its Lc
    valid rows of Lc valid columns (the rest masked), in 32-byte sectors."""
    return Lc * -(-Lc * 4 // 32) * 32


def pipeline_call(book: Book, backend: str, shape: Shape) -> None:
    """One call's own launches (PIPELINE_CALL_OPS and PIPELINE_CALL_COPIES); the triton kernel
    set's besides: the grid's context index (one arange, its workspace) and, for the t2i grid,
    every image's Gram matrix (_gram_kernel, once per call; i2t: once per block, triton_forward).
    Under autograd the block's recompute and backward make their own (triton_forward, per step)."""
    count = PIPELINE_CALL_OPS + PIPELINE_CALL_COPIES
    if backend == "triton" and not shape.training:
        count += 1
    if backend in ("triton", "cuda") and not shape.training and shape.attn_type == "t2i":
        from rcar_fast.pipeline import call_grams_fit
        if not call_grams_fit(shape.n_images, R, gpu_budget(MODELS[backend][4], GPU_MEMORY)):
            raise ValueError(f"{shape.name}: the pipeline would make the Gram matrices per block "
                             "(they would crowd the budget); the model books them per call")
        if backend == "triton":
            book_gram(book, "gram (C C^T per context item)", shape.n_images, R, ", once per call")
        else:
            cuda_gram(book, "gram_kernel (context_gram, once per call)", shape.n_images, R)
    book.add("per call: weights stacked and cast, lengths, indices (torch)", count=count, hbm=0.0)


# ----------------------------------------------------------------------------- RCR in torch

def rcr_torch(book: Book, B: int, P: int, Lq: int, prefix: str = "rcr (torch)") -> None:
    """One RCR step over a block in plain torch (the torch backend always; triton and cuda under
    autograd): three GEMMs on the tensor cores and the element-wise chain over the d-wide F (bf16:
    in place)."""
    N = B * P * Lq
    s, d, e = S_DIM, D, ELEM
    book.add(f"{prefix}: E W1^T, W2 tanh(.), smooth MLP (cuBLAS)", count=4,
             tc=2 * N * s * 2 * s + 2 * N * 2 * s * d + 2 * N * s * s // 2 + 2 * N * s // 2,
             hbm=N * s * e * 2 + N * 2 * s * e * 2 + N * d * e + N * s // 2 * e * 2, l2=N * d * e * 2)
    # tanh of the hidden layers, tanh_(m), add_(F), clamp_, relu: each a pass over memory
    book.add(f"{prefix}: element-wise (tanh, + F, clamp, relu)", count=6, simt=N * (2 * s + s // 2) * 8 + N * d * 10,
             hbm=N * 2 * s * e * 2 + N * d * e * (2 + 3 + 2) + N * 4 * 4)


def rcr_recomputed_backward(book: Book, B: int, P: int, Lq: int, has_f: bool, kernel: bool = False,
                            bn: int = 128) -> None:
    """The backward of RCR under autograd for the fused backends (rcar_fast.torch_math.
    rcr_step_recomputed; its forward is rcr_torch's in-place step, nothing saved). Once over the
    block: the temperatures' branch (s/2 wide: recomputed, relu's mask, its gradients, E's
    gradient through it) and the accumulators. Then RCR_CHUNKS = 4 chunks of rows: h1 again
    (GEMM, tanh_); the d-wide chain, either torch ops (cuda: t again (GEMM, tanh_), z = t + F,
    abs_ and <= (the clamp's mask), where (gF), dF's copy where F was given, 1 - t^2 (addcmul),
    mul_: gm) or, with ``kernel``, the kernel set's rcr_factors_bwd (triton: kernels/rcr.py's
    _rcr_factors_bwd_kernel, 128 x ``bn`` = 128 tiles; cuda: the kRcrFactorsBwd epilogue of
    rcr_wgmma_kernel, 128 x 256 blocks: M = h1 W2^T recomputed on the tensor cores, gF and F read,
    gm and dF written, one pass; h1 re-read from L2 once per column block); then gm^T h1
    into dW2 (addmm_), gm W2, 1 - h1^2 and mul_, ga1^T e into dW1, ga1 W1 into dE (addmm_), the
    bias sums: twice the forward's products besides the recompute."""
    N = B * P * Lq
    s, d, e = S_DIM, D, ELEM
    chunks = 4
    hs = s // 2
    book.add("rcr recomputed backward: the temperatures' branch and accumulators", count=18,
             tc=2 * N * s * hs * 3 + 2 * N * hs * 2 + 2 * N * hs * s,
             simt=N * hs * 10, hbm=N * s * e * 3 + N * hs * e * 10 + N * 4 * 6)
    if kernel:
        book.add("rcr recomputed backward: h1 again (GEMM)", count=chunks, tc=2 * N * s * 2 * s,
                 hbm=N * s * e + N * 2 * s * e)
        book.add("rcr_factors_bwd (M again, the clamp's mask, tanh')", count=chunks, tc=2 * N * 2 * s * d,
                 simt=N * d * 12, l2=N * 2 * s * e * -(-d // bn) + chunks * d * 2 * s * e * -(-N // (128 * chunks)),
                 hbm=N * 2 * s * e + N * d * e * (2 + (2 if has_f else 0)) + d * 2 * s * e)
        # tanh_ of h1, 1 - h1^2 and mul_, the bias sums
        book.add("rcr recomputed backward: element-wise", count=7 * chunks, simt=N * 2 * s * 8,
                 hbm=N * d * e + N * 2 * s * e * 8)
    else:
        book.add("rcr recomputed backward: h1 and t again (GEMMs)", count=2 * chunks,
                 tc=2 * N * s * 2 * s + 2 * N * 2 * s * d, hbm=N * s * e + N * 2 * s * e * 2 + N * d * e,
                 l2=N * d * e)
        # tanh_ x 2, z, abs_, <=, where, (dF copy), addcmul, mul_, 1 - h1^2, mul_, the bias sums
        book.add("rcr recomputed backward: element-wise", count=(14 if has_f else 13) * chunks,
                 simt=N * d * 12 + N * 2 * s * 8,
                 hbm=N * d * (e * (16 + (3 if has_f else 0)) + 2) + N * 2 * s * e * 8)
    # gm^T h1 (addmm_ into dW2), gm W2, ga1^T e (addmm_ into dW1), ga1 W1 (addmm_ into dE)
    book.add("rcr recomputed backward: gradient GEMMs", count=4 * chunks,
             tc=2 * (2 * N * 2 * s * d) + 2 * (2 * N * s * 2 * s),
             hbm=N * d * e * 2 + N * 2 * s * e * 4 + N * s * e * 3 + (d * 2 * s + 2 * s * s) * e * 2 * chunks,
             l2=N * d * e * 2)


#: the CUDA RCR GEMMs' block tile (csrc/cuda/rcr_kernels.cuh: rcr_gemm_kernel, 8 warps of 64 x 64;
#: rcr_wgmma_kernel, 2 warpgroups of 64 x 256) and rcr_wgmma_kernel's K chunk (double-buffered)
CUDA_RCR_BM, CUDA_RCR_BN, CUDA_RCR_WGMMA_BK = 128, 256, 64


def cuda_rcr_gemm(book: Book, name: str, M: int, N: int, K: int, epilogue_simt: int, extra_hbm: int,
                  wgmma: bool = True, bn: int = CUDA_RCR_BN, out_n: Optional[int] = None, count: int = 1,
                  a_from_hbm: bool = True) -> None:
    """One launch of an RCR GEMM kernel: out (M x N) = epilogue(A (M x K) B^T (B: N x K)) in
    128 x 256 blocks. Blocks of one row block run back to back (A from HBM once), B stays in L2.

    wgmma (rcr_wgmma_kernel, what an H200 runs: sm_90a): 2 warpgroups, each 64 rows x 256 columns
    by wgmma m64n256k16 (HGMMA, so the measured tensor-core ceiling) with both operands read from
    shared memory by the instruction (per 16 of K and warpgroup: its 64 x 16 of A and the 256 x 16
    of B), K staged 64 columns at a time into two buffers (stored once), the epilogue from the
    accumulator registers straight to memory (no shared memory).
    else (rcr_gemm_kernel, sm_80 and builds without sm_90a): 8 warps of 64 x 64 (4 x 4 wmma tiles:
    4 A and 4 B fragments per 16 products, HMMA), K streamed 32 columns at a time; the epilogue
    stages each warp's fp32 tile in shared memory (stored, read).
    bn: the block's columns (wgmma's N; 128 for the temperatures' epilogue); out_n: the output's
    columns written to memory (default N; 1 for the temperatures: one value a row); count 0 and
    a_from_hbm False: more blocks of the launch booked under the same name (their A read from L2,
    beside the first part's blocks of the same row block)."""
    e = ELEM
    assert wgmma or bn == CUDA_RCR_BN
    blocks = -(-M // CUDA_RCR_BM) * -(-N // bn)
    if wgmma:
        ksteps = -(-K // CUDA_RCR_WGMMA_BK) * (CUDA_RCR_WGMMA_BK // 16)
        smem = blocks * ksteps * (2 * (64 + bn) * 16 * e + (CUDA_RCR_BM + bn) * 16 * e)
        note = f"BM {CUDA_RCR_BM} BN {bn} BK {CUDA_RCR_WGMMA_BK}, wgmma"
    else:
        ksteps = -(-K // 32) * 2
        smem = blocks * (ksteps * 8 * 8 * 512 + (CUDA_RCR_BM + CUDA_RCR_BN) * ksteps * 16 * e
                         + CUDA_RCR_BM * CUDA_RCR_BN * 4 * 2)
        note = f"BM {CUDA_RCR_BM} BN {CUDA_RCR_BN}"
    book.add(name, count=count, note=note, hmma=not wgmma,
             tc=blocks * CUDA_RCR_BM * bn * 2 * ksteps * 16, simt=epilogue_simt, smem=smem,
             l2=blocks * (CUDA_RCR_BM + bn) * ksteps * 16 * e,
             hbm=(M * K * e if a_from_hbm else 0) + N * K * e + M * (N if out_n is None else out_n) * e + extra_hbm)


def rcr_fused(book: Book, B: int, P: int, Lq: int, has_f: bool, backend: str = "cuda") -> None:
    """The fused RCR step for inference of the cuda backend (csrc/cuda/rcr.cu) on the H200 (an
    sm_90a build): fp16/bf16 run two rcr_wgmma_kernel launches: H = tanh(E W1^T + b1) with, in
    one more block per row block of the same launch, the temperatures relu(ws2 tanh(E ws1^T + bs1)
    + bs2 + lam) (its kRcrSmooth epilogue: a 128-column block by m64n128k16 (s / 2 <= 128), a row's
    sum over its 4 lanes by shuffles, lam read and written, E from L2 beside the row block's other
    blocks; the s/2-wide layer never stored); then F = clamp(tanh(H W2^T + b2) + F_old, -1, 1)
    (zero at padded rows; F_old read where there is one, M never stored). (Builds without
    sm_90a, and s / 2 of 0 or above 128: cuBLAS E ws1^T and rcr_smooth_kernel, not modelled; fp32 keeps
    cuBLAS for all three GEMMs: not modelled, the shapes are bf16.)"""
    N = B * P * Lq
    s, d, e = S_DIM, D, ELEM
    hidden = "rcr_wgmma_kernel (H = tanh(E W1^T + b1); lam = relu(ws2 tanh(E ws1^T + bs1) + bs2 + lam))"
    cuda_rcr_gemm(book, hidden, N, 2 * s, s, N * 2 * s * 8, 0)
    cuda_rcr_gemm(book, hidden, N, s // 2, s, N * (s // 2) * 10, N * e + P * 4, bn=128, out_n=1, count=0,
                  a_from_hbm=False)
    cuda_rcr_gemm(book, "rcr_wgmma_kernel (F = clamp(tanh(H W2^T + b2) + F))", N, d, 2 * s, N * d * 10,
                  (N * d * e if has_f else 0) + P * 4)


#: the Triton RCR GEMMs' tiles for bf16/fp16 (kernels/rcr.py: rcr_gemm_config; tests/test_roofline.py
#: checks they agree): BM rows x BN columns per program (the factors' kernel BN 256)
TRITON_RCR_BM, TRITON_RCR_BN, TRITON_RCR_FACTORS_BN = 128, 64, 256


def rcr_triton(book: Book, B: int, P: int, Lq: int, has_f: bool, factors: bool = True) -> None:
    """The Triton RCR step for inference (kernels/rcr.py): two GEMM kernels with their
    element-wise work in the epilogue. rcr_hidden: one program per BM rows holds its E tile and
    runs down W1's, then ws1's, rows BN at a time (each from its own pointer): H = tanh(E W1^T +
    b1) (N x 2s, stored) and the temperatures relu(ws2 tanh(E ws1^T + bs1) + bs2 + lam) (the
    s/2-wide hidden layer never stored). rcr_factors_gemm: BM x BN tiles of F = clamp(tanh(H W2^T + b2) + F_old, -1, 1), zero
    at padded rows (M never stored). L2 counts every tile a program reads (hidden: E once, W1 and
    ws1 once per row block; factors: H once per column block of F, W2 once per row block).
    factors False: no factors launch (rcr_on_chip's what-if: the next attention makes F)."""
    N = B * P * Lq
    s, d, e = S_DIM, D, ELEM
    BM, BN = TRITON_RCR_BM, TRITON_RCR_BN
    rb = -(-N // BM)
    cols = -(-(2 * s) // BN) * BN + -(-(s // 2) // BN) * BN     # W1's column blocks, then ws1's
    book.add("rcr_hidden (tanh(E W1^T + b1), temperatures)", count=1, note=f"BM {BM} BN {BN}",
             tc=rb * BM * 2 * s * cols, simt=N * (2 * s + s // 2) * 8,
             hbm=N * s * e + N * 2 * s * e + N * 4 * 2 + (2 * s + s // 2) * s * e,
             l2=rb * BM * s * e + rb * (2 * s + s // 2) * s * e + N * 2 * s * e + N * 4 * 2)
    if not factors:       # the what-if of rcr_on_chip: F made in the next attention instead
        return
    BN = TRITON_RCR_FACTORS_BN
    nf = -(-d // BN)
    book.add("rcr_factors_gemm (clamp(tanh(H W2^T + b2) + F))", count=1, note=f"BM {BM} BN {BN}",
             tc=rb * BM * nf * BN * 2 * 2 * s, simt=N * d * 10,
             hbm=N * 2 * s * e + N * d * e * (2 if has_f else 1) + 2 * s * d * e + P * 4,
             l2=rb * nf * (BM + BN) * 2 * s * e + N * d * e * (2 if has_f else 1))


def rcr_on_chip(shape: Shape, t: int) -> bool:
    """Whether the what-if of shape.rcr_on_chip applies at step t's attention: inference, and the
    factors it takes are the first RCR step's, F = clamp(tanh(H W2^T + b2) + 1, -1, 1) (F_old all
    ones, so nothing but H is read), read by no later RCR step (T = 2: step 1's attention only)."""
    return bool(shape.rcr_on_chip) and not shape.training and shape.steps == 2 and t == 1


def triton_factors_on_chip(book: Book, BDF: int, B: int, P: int, Lq: int, programs: int, M: int, tag: str) -> None:
    """A design not built (the what-if --what-if-rcr-on-chip BDF; bench/results/gpu_notes.md,
    2026-12-05 3rd session): step 1's attention makes F itself in pass 1, BDF columns of d at a
    time, F[:, chunk] = min(tanh(H W2[chunk]^T + b2[chunk]) + 1, 1) from its M rows of H (N x 2s,
    stored by rcr_hidden) and W2, then S += (F * Q)[:, chunk] C[:, chunk]^T, so F is never stored.
    Booked on top of the attention_fwd line as written (the same launch): the F product at the
    program's M rows (tensor cores), its tanh and clamp, H read once per column chunk and W2 once
    per program (L2; H at its valid rows), H once and W2 once from HBM; and F's read taken back
    (the line counts it for has_f)."""
    d, s, e, pairs = D, S_DIM, ELEM, B * P
    chunks = -(-d // BDF)
    name = f"attention_fwd{tag}"
    book.add(name, count=0, tc=programs * 2 * M * chunks * BDF * 2 * s, simt=programs * M * d * 10,
             l2=pairs * Lq * 2 * s * e * chunks + programs * d * 2 * s * e - pairs * Lq * d * e,
             hbm=pairs * Lq * 2 * s * e + 2 * s * d * e - pairs * Lq * d * e)
    if "F on chip" not in book.launches[name].note:
        book.launches[name].note += f", step 1 makes F on chip (BDF {BDF})"


# ----------------------------------------------------------------------------- backends

#: query rows one Triton attention program holds on the grid (kernels/attention.py): the forward in
#: bf16/fp16 packs GP = 128 // Lq pairs of Lq rows each into M = the power of two at or above
#: GP * Lq rows (FWD_ROWS_HALF: forward_config; the s-wide Y of 128 rows compiles
#: without spills in the variant the JIT compiles at run time); the backward takes GP = 64 // BQ
#: pairs of BQ rows each (ROWS, attention_config); the RAR forward GP = 128 // BQ (kernels/rar.py)
TRITON_ROWS = 64
TRITON_FWD_ROWS = 128


def triton_forward_tile(Lq: int):
    """(GP, M) of the bf16/fp16 Triton attention forward on the grid: pairs per program and rows."""
    GP = max(1, TRITON_FWD_ROWS // Lq)
    return GP, pow2(GP * Lq)


#: the most pairs one Triton RAR forward program takes (kernels/rar.py MAX_PAIRS)
TRITON_RAR_MAX_PAIRS = 32


def triton_rar_tile(Lq: int):
    """(GP, M, GPP) of the bf16/fp16 Triton RAR forward: pairs per program (at most
    TRITON_RAR_MAX_PAIRS), their rows packed into M, and GPP = GP rounded up to a power of two
    (the rows of its per-pair sums, a GPP x M x s product)."""
    GP = max(1, min(TRITON_RAR_MAX_PAIRS, TRITON_FWD_ROWS // Lq))
    return GP, pow2(GP * Lq), pow2(GP)


def triton_forward(book: Book, shape: Shape, B: int, P: int, Lg: int, recompute: bool = False) -> None:
    """The Triton kernels (kernels/): the context items' Gram matrices C C^T (fp32, _gram_kernel:
    at inference once per block for its steps, the t2i grid's once per call in pipeline_call;
    under autograd at every launch), the fused attention and projection (attention_fwd, MODE_ALIGNMENT)
    with GP pairs of one context item per program, their rows packed into M (triton_forward_tile:
    the context, its Gram matrix and the weight read once per program, every product M rows tall,
    each pair's column norms by segmented scans down the rows), RCR (its
    two GEMM kernels with fused epilogues, rcr_triton; torch's step under autograd),
    one RAR step: the gates' pre-activations h Wq^T + bq of every pair as one cuBLAS GEMM in the
    inputs' dtype (tensor cores; h kept in that dtype between steps), then rar_fwd with GP pairs
    per program packed (their tanh on chip, Wk read once per program; step 0 makes the mean of E
    and its gates on chip, FIRST)."""
    tag = " (recompute)" if recompute else ""
    Lq, Lc = _rows(shape, Lg)
    BC, BS = pow2(Lc), pow2(S_DIM)
    GP, M = triton_forward_tile(Lq)
    programs = B * -(-P // GP)
    # the pairs' column norms: two segmented scans down the M rows (log2 M combines of a few
    # FLOPs per element each)
    seg_simt = 2 * 4 * M * BC * (M.bit_length() - 1) if GP > 1 else 0
    RGP, RM, GPP = triton_rar_tile(Lq)    # RAR's forward: 128 rows too, packed (kernels/rar.py)
    rprograms = B * -(-P // RGP)
    # its softmax per pair: four segmented scans down the RM rows; its sums a E per pair: the
    # GPP x RM x s products (two for a step: the weights in two halves; one for the mean)
    rseg = 4 * 4 * RM * (RM.bit_length() - 1)
    psum = 2 * GPP * RM * BS
    pairs, d, s, e = B * P, D, S_DIM, ELEM
    for t in range(shape.steps):
        has_f = t > 0
        # the context items' Gram matrices: under autograd at every launch; at inference once per
        # block for all its steps (i2t; the t2i grid's once per call, pipeline_call)
        if shape.training or (t == 0 and shape.attn_type != "t2i"):
            book_gram(book, f"gram (C C^T per context item){tag}", B, Lc)
        # executed rows: M per program (GP pairs packed, the last program of a row of P partly empty)
        book.add(f"attention_fwd{tag}", count=1, note=f"M {M} BC {BC} GP {GP}",
                 tc=programs * (2 * M * BC * d * 2 + 2 * M * d * BS),
                 simt=programs * (2 * M * BC * BC + 30 * M * BC + 6 * M * d + seg_simt),
                 l2=pairs * ((2 * Lq * d + Lq * s + (Lq * d if has_f else 0)) * e)
                 + programs * (2 * Lc * d * e + s * d * e + gram_tile_bytes(Lc)),
                 hbm=pairs * (Lq * s * e + (Lq * d * e if has_f else 0)) + (P * Lq + B * Lc) * d * e + s * d * e
                 + B * Lc * Lc * 4)
        if rcr_on_chip(shape, t):
            triton_factors_on_chip(book, shape.rcr_on_chip, B, P, Lq, programs, M, tag)
        if t < shape.steps - 1:
            if shape.training:     # under autograd: torch's step in place (rcr_step_recomputed)
                rcr_torch(book, B, P, Lq, "rcr (torch)" + tag)
            else:
                rcr_triton(book, B, P, Lq, has_f, factors=not rcr_on_chip(shape, t + 1))
        first = t == 0    # step 0 (no h given) makes the mean of E and its gate on chip (FIRST)
        if not first:
            # cuBLAS: h (pairs x s) times Wq^T, the bias in its epilogue; h read, the gate written
            book.add(f"rar gate h Wq^T + bq (cuBLAS){tag}", count=1, tc=pairs * 2 * s * s,
                     hbm=pairs * s * e * 2 + s * s * e)
        # the gate read once per pair (its rows' repeated loads of it counted as L1 hits), its tanh
        # taken per row on chip; FIRST: the mean (one more GPP x M x s product) times Wq (GPP x s x
        # s, Wq read once per program) instead of the gate's read; h written, or at inference the
        # last step's scores (SCORE: sw read once per program, 4 bytes a pair written)
        score = t == shape.steps - 1 and not shape.training
        out = pairs * (4 if score else s * e) + (rprograms * s * 4 if score else 0)
        book.add(f"rar_fwd{tag}", count=1, note=f"M {RM} GP {RGP}" + (", FIRST" if first else ""),
                 tc=rprograms * (2 * RM * BS * BS + 2 * psum + (psum + 2 * GPP * BS * BS if first else 0)),
                 simt=rprograms * ((16 + 8) * RM * BS + rseg) + (pairs * 2 * s if score else 0),
                 l2=pairs * (Lq * s * e + (0 if first else s * e)) + out + rprograms * s * s * e * (2 if first else 1),
                 hbm=pairs * (Lq * s * e + (0 if first else s * e)) + out)
    pipeline_block(book, B, P, Lq, tag, fused_score=not shape.training)


def triton_backward(book: Book, shape: Shape, B: int, P: int, Lg: int) -> None:
    """The Triton backward per step (kernels/attention_bwd.py, kernels/rar.py): the context
    items' Gram matrices once per item, then the attention's two kernels recompute each pair on
    chip (the first with GP pairs of one context item per program, as the forward) (bf16: A rebuilt once per 32-column chunk of Y, 8
    passes over d at s = 256) and add dQ and dC with fp32 atomics; dW and db from the
    scratches after the first kernel (one GEMM over every row, one sum); RAR's backward per step
    (E held for the keys' products and read twice more in column chunks for u, du and da); RCR's
    recomputing backward (rcr_recomputed_backward, its d-wide chain one kernel)."""
    Lq, Lc = _rows(shape, Lg)
    BQ, BC, BS = pow2(Lq), pow2(Lc), pow2(S_DIM)
    GP = max(1, TRITON_ROWS // BQ)
    programs = B * -(-P // GP)
    pairs, d, s, e = B * P, D, S_DIM, ELEM
    passes = BS // 32
    for t in range(shape.steps):
        book_gram(book, "gram (backward)", B, Lc)
        # GP pairs of one context item per program: the context, W and dC's atomics once per
        # program; Q, dQ's atomics, the dY scratch and (Q - A)^2 (stored in the inputs' dtype for
        # dW's GEMM: no s x d atomics) per pair
        book.add("attention_bwd (passes A-D)", count=1, note=f"BQ {BQ} BC {BC} GP {GP}",
                 tc=programs * GP * (2 * BQ * BC * d + passes * 2 * BQ * BC * d + 2 * BQ * d * BS * 2
                                     + 2 * BQ * BC * d),
                 simt=programs * GP * (4 * BQ * d * passes + 2 * BQ * BC * BC),
                 l2=pairs * (Lq * d * e * 2 + Lq * d * 4 * 2 + Lq * s * 4 * 3)
                 + programs * ((3 * Lc * d + 2 * s * d) * e + BC * d * 4 * 2),
                 hbm=pairs * (Lq * s * 4 * 3 + BQ * BC * 4 + Lq * d * e) + (P * Lq + B * BC) * d * 4)
        # dY cast to the inputs' dtype, dW = dY^T (Q - A)^2 (cuBLAS, fp32 out), db = dY's column sums
        book.add("dW = dY^T (Q - A)^2 (cuBLAS), db (torch)", count=3, tc=2 * pairs * Lq * s * d,
                 hbm=pairs * Lq * (s * 4 * 2 + s * e * 2 + d * e) + s * d * 4)
        book.add("attention_bwd_scores", count=1,
                 tc=pairs * (2 * BQ * BC * d * 3), simt=pairs * 40 * BQ * BC,
                 l2=pairs * ((Lq * d * 2 + Lc * d) * e + (Lq * d + BC * d) * 4 * 2 + (Lq * d * 4 if t > 0 else 0)),
                 hbm=pairs * (BQ * BC * 4 + (Lq * d * 4 if t > 0 else 0)))
        book.add("rar_bwd + its GEMMs (dE, dh, dW)", count=4,
                 tc=pairs * (2 * BQ * BS * BS * 3) + 4 * pairs * Lq * s * s,
                 simt=pairs * (2 * BS * BS * 2 + 20 * BQ * BS),
                 l2=pairs * (3 * Lq * s * e + 2 * s * s * e + Lq * s * 4 * 2), hbm=pairs * (Lq * s * 4 * 3 + s * 4 * 3))
        if t < shape.steps - 1:
            rcr_recomputed_backward(book, B, P, Lq, t > 0, kernel=True)


#: query rows one CUDA tensor-core forward block holds (csrc/cuda/plan.h kTcRows)
CUDA_TC_ROWS = 64


def cuda_tc_plan(Lq: int, Lc: int, P: int):
    """(BQ, BC, GP, rows) of attention_fwd_tc_kernel for fp16/bf16 (csrc/cuda/plan.h choose_tc_plan,
    where no shared-memory limit is reached at s = 256): packed pairs, BQ = Lq rows each back to
    back, BC = Lc rounded up to 16, GP = 64 // Lq pairs of one context item per block (at most P),
    rows = GP * Lq rounded up to 16; None where the kernel does not apply (Lq or Lc > 64: the
    per-pair kernel runs). In kModeAlignment on the H200 the launcher takes attention_fwd_wg_kernel
    first where it applies (cuda_wg_plan): this plan is then the blocks of 64 rows or fewer."""
    if Lq > CUDA_TC_ROWS or Lc > CUDA_TC_ROWS:
        return None
    BQ, BC = Lq, -(-Lc // 16) * 16
    GP = min(max(1, CUDA_TC_ROWS // BQ), P)
    return BQ, BC, GP, -(-GP * BQ // 16) * 16


def cuda_tc_wgmma_projection(rows: int) -> bool:
    """Whether attention_fwd_tc_kernel's projection runs on wgmma on the H200 (csrc/cuda/attention.cu:
    launch.h use_wgmma, a block of 64 rows: MT 4)."""
    return rows == 64


def cuda_tc_fragment_bytes(rows: int, BC: int, d: int, s: int, project: bool = True) -> int:
    """Shared-memory bytes attention_fwd_tc_kernel's wmma fragments read in one block (512 B per
    16 x 16 fp16/bf16 fragment), with the split-K reductions' fp32 tiles (csrc/cuda/attention_kernels.cuh):
    the scores X C^T: warps 0-3 take the first 16 of every 32-column chunk of d, warps 4-7 the
    second; in each half, row tile i goes to 4 // MT warps (1 for MT 3) that split its BC / 16
    column tiles, so a warp loads one A fragment and its B fragments per step; the halves' sums
    meet in S (stored, loaded, stored). P C: each warp holds its row tile of P in registers (loaded
    once), so a chunk reads only C's fragments. The projection (Q - A)^2 W^T: the same halves of
    every chunk, warp w % 4 takes 64 of the 256 columns for all MT row tiles (MT A and 4 B fragments
    a step); the halves meet in y. On the H200 a 64-row block's projection runs on wgmma instead
    (cuda_tc_wgmma_projection): warpgroup 0 takes the first 16 of every chunk, warpgroup 1 the
    second, each wgmma reading its 64 x 16 of A and 256 x 16 of W from shared memory once.
    project False (kModeAttended, kModeSquaredDiff): the scores and one pass of P C, no projection."""
    mt, nct, frag = rows // 16, BC // 16, 512
    wpr = max(1, 4 // mt)
    passes = -(-s // 256) if project else 1   # the projection's 256-column passes, each with its own P C
    scores = (d // 16) * (mt * min(wpr, nct) + mt * nct) * frag + 3 * rows * BC * 4
    pc = (d // 32) * 2 * mt * nct * frag * passes + 2 * mt * nct * frag
    proj = (d // 16) * 4 * (mt + 4) * frag * passes + 3 * rows * 256 * passes * 4
    if cuda_tc_wgmma_projection(rows):   # per 16 of d one warpgroup's wgmma reads A's 64 and W's 256 rows
        proj = (d // 16) * (64 + 256) * 16 * ELEM * passes + 3 * rows * 256 * passes * 4
    return scores + pc + (proj if project else 0)


#: query rows of attention_fwd_wg_kernel's block (csrc/cuda/plan.h kWgRows): 2 warpgroups of 64
CUDA_WG_ROWS = 128
#: output columns of one projection pass (plan.h kNG: wgmma's N of the projection), the longest
#: context and query rows the tensor-core forwards take (kTcMaxLen)
CUDA_NG = 256
CUDA_TC_MAX_LEN = 64


def cuda_wg_plan(Lq: int, Lc: int, P: int, s: int = S_DIM):
    """(BQ, BC, GP, rows) of attention_fwd_wg_kernel (csrc/cuda/plan.h choose_wg_plan for fp16/bf16
    in kModeAlignment on the grid, where no shared-memory limit is reached): GP = 128 // Lq packed
    pairs of one context item per block (at most P), BQ = Lq rows each back to back, BC = Lc rounded
    up to 16, rows = 128 (the rows past GP * Lq zero); None where it does not apply: Lq or Lc above
    64, s above 256, or a block of 64 rows or fewer (GP * Lq <= 64: attention_fwd_tc_kernel holds
    it). The launcher takes it only on an sm_90a build on a Hopper (launch.h use_wgmma), as the
    model's H200 always is."""
    if Lq < 1 or Lc < 1 or P < 1 or Lq > CUDA_TC_MAX_LEN or Lc > CUDA_TC_MAX_LEN or s > CUDA_NG:
        return None
    BQ, BC = Lq, -(-Lc // 16) * 16
    GP = min(CUDA_WG_ROWS // BQ, P)
    if GP * BQ <= CUDA_TC_ROWS:
        return None
    return BQ, BC, GP, CUDA_WG_ROWS


def cuda_wg_smem_bytes(BC: int, d: int) -> int:
    """Shared-memory bytes one attention_fwd_wg_kernel block moves (csrc/cuda/attention_kernels.cuh):
    warpgroup w owns rows 64 w .. 64 w + 63 of every product (no split-K meets), every product a
    wgmma reading both operands from shared memory (core matrices), per k16 step its A's 64 x 16
    and its B's N x 16: the scores (F * Q) C^T m64nBCk16 over K = d; P C m64n32k16 over K = BC per
    32-column chunk of d; the projection m64n256k16 over K = d (N = 256 executed for s <= 256). The
    stores: the (F * Q) chunk (128 x d), the context twice (BC x d, pass 1; transposed, pass 2),
    W's chunk (256 x d), (Q - A)^2 (128 x d: from P C's accumulators and Q read from L2, no fp32 U
    chunk); on chip the scores fp32 (128 x BC stored from the accumulators, read, the probabilities
    stored in place: three passes, as attention_fwd_tc_kernel's S) and P stored in the compute type
    for P C. E's l2n from the accumulator registers (no y region)."""
    rows, e, wg = CUDA_WG_ROWS, ELEM, CUDA_WG_ROWS // 64
    scores = (d // 16) * wg * (64 + BC) * 16 * e
    pc = (d // 32) * (BC // 16) * wg * (64 + 32) * 16 * e
    proj = (d // 16) * wg * (64 + CUDA_NG) * 16 * e
    stores = (rows + 2 * BC + CUDA_NG + rows) * d * e
    on_chip = 3 * rows * BC * 4 + rows * BC * e
    return scores + pc + proj + stores + on_chip


def cuda_rar_plan(Lq: int, P: int):
    """(BQ, GP, rows) of rar_fwd_kernel (csrc/cuda/plan.h choose_rar_plan, no shared-memory limit
    reached at s = 256): packed pairs, BQ = Lq rows each back to back, GP = 64 // Lq pairs per
    block (1 past 64; at most P), rows = GP * Lq rounded up to 16 MT. On the H200 the launcher
    takes rar_fwd_wg_kernel first where it applies (cuda_rar_wg_plan): this plan is then the
    blocks of 64 rows or fewer."""
    BQ = Lq
    GP = min(CUDA_TC_ROWS // BQ if BQ <= CUDA_TC_ROWS else 1, P)
    rows = GP * BQ
    mt = 1 if rows <= 16 else (2 if rows <= 32 else (3 if rows <= 48 else 4))
    return BQ, GP, -(-rows // (16 * mt)) * 16 * mt


def cuda_rar_wg_plan(Lq: int, P: int, s: int = S_DIM):
    """(BQ, GP, rows) of rar_fwd_wg_kernel (csrc/cuda/plan.h choose_rar_wg_plan for fp16/bf16, where
    no shared-memory limit is reached): GP = 128 // Lq packed pairs of one context item per block
    (at most P; Lq 65..128: 1), BQ = Lq rows each back to back, rows = 128 (the rows past GP * Lq
    zero); None where it does not apply: Lq above 128, s above 256, or a block of 64 rows or fewer
    (GP * Lq <= 64: rar_fwd_kernel holds it, cuda_rar_plan). The launcher takes it only on an
    sm_90a build on a Hopper (launch.h use_wgmma), as the model's H200 always is."""
    if Lq < 1 or P < 1 or s < 1 or Lq > CUDA_WG_ROWS or s > CUDA_NG:
        return None
    BQ = Lq
    GP = min(CUDA_WG_ROWS // BQ, P)
    if GP * BQ <= CUDA_TC_ROWS:
        return None
    return BQ, GP, CUDA_WG_ROWS


def cuda_rar_wg_smem_bytes(GP: int, BQ: int, s: int = S_DIM) -> int:
    """Shared-memory bytes one rar_fwd_wg_kernel block moves (csrc/cuda/rar_kernels.cuh), sk = s
    rounded up to 32 (kBD): E of its GP pairs stored once as core matrices (128 x sk), Wk stored
    32 columns of K at a time (256 x 32 a chunk: all of its 256 x sk once), the wgmma operand
    reads (K = E Wk^T, warpgroup w rows 64 w .. 64 w + 63: per 16 of K each warpgroup's
    m64n256k16 reads its 64 x 16 of E and Wk's 256 x 16), the gates gw = tanh(pre) keep_g wv
    stored in fp32 (GP x sk) and read by the epilogue for each of the pairs' GP * BQ rows (the
    logits from the accumulator registers, lane shuffles: no y region), and E read again for
    h = l2n(sum_q a[q] E[q]) (the pairs' rows)."""
    rows, e, wg = CUDA_WG_ROWS, ELEM, CUDA_WG_ROWS // 64
    sk = -(-s // 32) * 32
    prows = GP * BQ
    stores = (rows + CUDA_NG) * sk * e + GP * sk * 4
    mma = (sk // 16) * wg * (64 + CUDA_NG) * 16 * e
    epilogue = prows * sk * 4 + prows * sk * e
    return stores + mma + epilogue


def cuda_gram(book: Book, name: str, B: int, Lc: int) -> None:
    """One gram_kernel launch over B context items of Lc rows (fp32 SIMT from shared memory)."""
    d, e = D, ELEM
    book.add(name, count=1, simt=B * 2 * Lc * Lc * d, smem=B * 2 * Lc * Lc * d * 4, l2=B * Lc * d * e,
             hbm=B * Lc * d * e)


def cuda_forward(book: Book, shape: Shape, B: int, P: int, Lg: int, recompute: bool = False) -> None:
    """The CUDA kernels (csrc/cuda/): gram_kernel (C C^T per context item, fp32 SIMT), then the
    attention forward with the fused projection (kModeAlignment: at inference, and under autograd
    for the forward and its recompute alike), for fp16/bf16 on the H200 (an sm_90a build, launch.h
    use_wgmma) attention_fwd_wg_kernel where cuda_wg_plan applies (every block of more than 64
    rows): GP = 128 // Lq packed pairs of one context item in a 128-row block, 2 warpgroups of 64
    rows, the scores, P C and the projection (N = 256) each a wgmma (HGMMA: the tc ceiling) with
    both operands in shared memory (cuda_wg_smem_bytes), the context, its Gram matrix and the
    512 KB weight read once per block, Q twice per pair; else attention_fwd_tc_kernel: GP =
    64 // Lq packed pairs per block (the context, its Gram matrix and W once per block), the
    scores (F * Q) C^T, U = P C and the projection by wmma (HMMA, fp32 accumulators) from shared
    memory, every product at most 64 rows tall, a 64-row block's projection on wgmma
    (cuda_tc_wgmma_projection); its shared-memory traffic counts the wmma fragment loads
    (cuda_tc_fragment_bytes), the chunk stores (F * Q, the context twice, W, (Q - A)^2) and the fp32
    P C chunk (stored, read). RCR (csrc/cuda/rcr.cu for inference: rcr_fused, two GEMM kernels
    with the chain in their epilogues; torch's step under autograd); RAR per step: the mean of E
    at the first (a kernel), the gate of every pair as one GEMM (cuBLAS), then (the forward and
    its recompute alike) on the H200 rar_fwd_wg_kernel where cuda_rar_wg_plan applies (every
    block of more than 64 rows): GP = 128 // Lq packed pairs in a 128-row block, E staged once,
    K = E Wk^T by 2 warpgroups' wgmma m64n256k16 (HGMMA: the tc ceiling; N = 256 executed),
    the logits from the accumulator registers (cuda_rar_wg_smem_bytes), Wk read once per block;
    else rar_fwd_kernel with GP = 64 // Lq pairs per block (Wk read once per block, the keys by
    wmma over the block's rows).
    fp32 and rows past 64 run the per-pair attention_fwd_kernel (modelled for Lq or Lc > 64 only:
    the model's shapes are bf16)."""
    tag = " (recompute)" if recompute else ""
    Lq, Lc = _rows(shape, Lg)
    pairs, d, s, e = B * P, D, S_DIM, ELEM
    wg = cuda_wg_plan(Lq, Lc, P)
    plan = cuda_tc_plan(Lq, Lc, P)
    rwg = cuda_rar_wg_plan(Lq, P, s)
    sk = -(-s // 32) * 32      # RAR's K = s in 32-column chunks (kBD)
    for t in range(shape.steps):
        has_f = t > 0
        # the Gram matrices: under autograd at every launch; at inference once per block for all
        # its steps (i2t; the t2i grid's once per call, pipeline_call), as triton's
        if shape.training or (t == 0 and shape.attn_type != "t2i"):
            cuda_gram(book, f"gram_kernel{tag}", B, Lc)
        if wg is not None:
            BQ, BC, GP, rows = wg
            blocks = B * -(-P // GP)
            # every product on wgmma (HGMMA, the tc ceiling), 128 rows executed: the scores and P C
            # over BC columns, the projection over 256 (kNG) whatever s <= 256
            book.add(f"attention_fwd_wg_kernel{tag}", count=1, note=f"BQ {BQ} BC {BC} GP {GP}, wgmma",
                     tc=blocks * (2 * rows * BC * d * 2 + 2 * rows * d * CUDA_NG),
                     simt=blocks * GP * (8 * BQ * d + 2 * BQ * BC * BC + 30 * BQ * BC),
                     smem=blocks * cuda_wg_smem_bytes(BC, d),
                     # per pair: Q twice (F * Q, then Q - A), F once, E written; per block: the
                     # context twice, W once, the Gram matrix once
                     l2=pairs * ((2 * Lq * d + Lq * s + (Lq * d if has_f else 0)) * e)
                     + blocks * ((2 * Lc * d + s * d) * e + Lc * Lc * 4),
                     hbm=pairs * (Lq * s * e + (Lq * d * e if has_f else 0)) + (P * Lq + B * Lc) * d * e + s * d * e)
        elif plan is not None:
            BQ, BC, GP, rows = plan
            blocks = B * -(-P // GP)
            tc_sp = 2 * rows * BC * d * 2                  # scores and P C, one block
            proj_tc = blocks * 2 * rows * d * s
            book.add(f"attention_fwd_tc_kernel{tag}", count=1, note=f"BQ {BQ} BC {BC} GP {GP}", hmma=True,
                     tc=blocks * tc_sp + proj_tc, hgmma_tc=proj_tc if cuda_tc_wgmma_projection(rows) else 0,
                     simt=blocks * GP * (8 * BQ * d + 2 * BQ * BC * BC + 30 * BQ * BC),
                     smem=blocks * (cuda_tc_fragment_bytes(rows, BC, d, s)
                                    + (2 * rows + 2 * BC + s) * d * e + rows * d * 4 * 2),
                     l2=pairs * ((2 * Lq * d + Lq * s + (Lq * d if has_f else 0)) * e)
                     + blocks * ((2 * Lc * d + s * d) * e + Lc * Lc * 4),
                     hbm=pairs * (Lq * s * e + (Lq * d * e if has_f else 0)) + (P * Lq + B * Lc) * d * e + s * d * e)
        else:
            mt = 1 if Lq <= 16 else (2 if Lq <= 32 else 4)
            rows = 16 * mt * ((Lq + 16 * mt - 1) // (16 * mt))
            simt = 2 * Lq * Lc * d * 2                         # scores and P C, fp32 FMAs
            book.add(f"attention_fwd_kernel{tag}", count=1, note=f"MT {mt}", hmma=True,
                     tc=pairs * 2 * rows * d * s, simt=pairs * (simt + 8 * Lq * d),
                     smem=pairs * (simt * 4 + 2 * rows * d * e * 2),
                     l2=pairs * ((Lq * d + 2 * Lc * d + s * d + Lq * s + (Lq * d if has_f else 0)) * e),
                     hbm=pairs * (Lq * s * e + (Lq * d * e if has_f else 0)) + (P * Lq + B * Lc) * d * e + s * d * e)
        if t < shape.steps - 1:
            if shape.training:     # under autograd: torch's step in place (rcr_step_recomputed)
                rcr_torch(book, B, P, Lq, "rcr (torch)" + tag)
            else:
                rcr_fused(book, B, P, Lq, has_f, "cuda")
        if t == 0:   # the mean of E, written in the inputs' dtype
            book.add(f"rar_mean_kernel{tag}", count=1, simt=pairs * Lq * s, hbm=pairs * (Lq * s * e + s * e))
        # cuBLAS: h (pairs x s, the inputs' dtype) times Wq^T, the bias in its epilogue
        book.add(f"rar gate h Wq^T + bq (cuBLAS){tag}", count=1, tc=pairs * 2 * s * s, hbm=pairs * s * e * 2 + s * s * e)
        # the gates' pre-activations read (their tanh, keep_g and wv on chip), h written in the inputs' dtype
        if rwg is not None:
            RBQ, RGP, rrows = rwg
            rblocks = B * -(-P // RGP)
            # K = E Wk^T on wgmma (HGMMA, the tc ceiling): 128 rows x 256 columns (kNG) x sk executed
            # per block; E read once per pair, Wk once per block
            # at inference the last step's launch takes the scoring layer (rar_scores): a score
            # (4 bytes) written a pair instead of h
            out = 4 if t == shape.steps - 1 and not shape.training else s * e
            book.add(f"rar_fwd_wg_kernel{tag}", count=1, note=f"BQ {RBQ} GP {RGP}, wgmma",
                     tc=rblocks * 2 * rrows * CUDA_NG * sk, simt=pairs * (16 * Lq * s + 8 * s),
                     smem=rblocks * cuda_rar_wg_smem_bytes(RGP, RBQ, s),
                     l2=pairs * (Lq * s * e + s * e + out) + rblocks * s * s * e, hbm=pairs * (Lq * s * e + s * e + out))
        else:
            RBQ, RGP, rrows = cuda_rar_plan(Lq, P)
            rblocks = B * -(-P // RGP)
            book.add(f"rar_fwd_kernel{tag}", count=1, note=f"BQ {RBQ} GP {RGP}", hmma=True,
                     tc=rblocks * 2 * rrows * s * s, simt=pairs * (16 * Lq * s + 8 * s),
                     smem=rblocks * (s * e * (8 * rrows + s) + s * s * e + rrows * s * e * 2),
                     l2=pairs * (Lq * s * e + s * e * 2) + rblocks * s * s * e, hbm=pairs * (Lq * s * e + s * e * 2))
    if shape.training:
        pipeline_block(book, B, P, Lq, tag)
        return
    # at inference the kernel set's rar_scores (csrc/cuda/rar.cu): the scoring layer in the last
    # rar_fwd_wg_kernel launch; after rar_fwd_kernel, h cast to float32, addmv and sigmoid in ATen
    if rwg is None:
        book.add("rar_scores: sigmoid(h w + b) after rar_fwd_kernel (ATen)", count=3, simt=pairs * 2 * s,
                 hbm=pairs * (s * e + s * 4 * 2 + 4 * 2))
    pipeline_block(book, B, P, Lq, tag, fused_score=True)


def cuda_backward(book: Book, shape: Shape, B: int, P: int, Lg: int) -> None:
    """The CUDA backward per step: the forward again in kModeSquaredDiff, D2 = (Q - A)^2 to memory:
    for fp16/bf16 with Lq, Lc <= 64 attention_fwd_tc_kernel (GP packed pairs of one context item a
    64-row block, the scores and one pass of P C on wmma, D2 written in the inputs' dtype: no cast),
    else attention_fwd_kernel (per pair, SIMT, D2 in fp32, cast for cuBLAS); the products with the
    shared weight (Y, dW, G2) in cuBLAS on tensor cores (the model's bf16: D2 and dY as bf16
    operands, dY's cast, fp32 outputs; fp32 inputs take exact fp32 products, not modelled),
    l2n_bwd_rows_kernel, the backward kernel (recompute: fp16/bf16 with Lq, Lc <= 64
    attention_bwd_tc_kernel, the forward's 64-row blocks of packed pairs with every d-wide product
    on wmma (HMMA) and dC's atomics once per block; else attention_bwd_kernel per pair, SIMT; both
    with dQ's atomics), RAR's backward, RCR's recomputed backward with its d-wide chain one launch
    (the rcr_factors_bwd op: rcr_wgmma_kernel's kRcrFactorsBwd epilogue)."""
    Lq, Lc = _rows(shape, Lg)
    pairs, d, s, e = B * P, D, S_DIM, ELEM
    N = pairs * Lq
    plan = cuda_tc_plan(Lq, Lc, P)
    for t in range(shape.steps):
        simt = 2 * Lq * Lc * d * 2
        has_f = t > 0
        if plan is not None:
            BQ, BC, GP, rows = plan
            blocks = B * -(-P // GP)
            # per pair Q twice (F * Q, then Q - A) and F once; per block the context twice and its
            # Gram matrix; D2 written in the inputs' dtype
            book.add("attention_fwd_tc_kernel (kModeSquaredDiff)", count=1, note=f"BQ {BQ} BC {BC} GP {GP}",
                     hmma=True, tc=blocks * 2 * rows * BC * d * 2,
                     simt=blocks * GP * (8 * BQ * d + 2 * BQ * BC * BC + 30 * BQ * BC),
                     smem=blocks * (cuda_tc_fragment_bytes(rows, BC, d, s, project=False)
                                    + (rows + 2 * BC) * d * e + rows * d * 4 * 2),
                     l2=pairs * (2 * Lq * d + (Lq * d if has_f else 0)) * e + blocks * (2 * Lc * d * e + Lc * Lc * 4)
                     + N * d * e,
                     hbm=N * d * e)
            casts, cast_simt, d2_bytes = 5, N * s * 2, N * d * (2 * e + 4)
        else:
            book.add("attention_fwd_kernel (kModeSquaredDiff)", count=1, simt=pairs * simt, smem=pairs * simt * 4,
                     l2=pairs * (Lq * d + 2 * Lc * d) * e + N * d * 4, hbm=N * d * 4)
            casts, cast_simt, d2_bytes = 6, N * (d + s) * 2, N * d * (4 + 3 * e + 4)
        book.add("cuBLAS, bf16 operands, fp32 out: Y, dW, G2 (+ casts of D2 where fp32, dY; Y's bias)", count=casts,
                 tc=3 * 2 * N * d * s, simt=cast_simt,
                 hbm=d2_bytes + N * s * (4 + 4 + 3 * e) + s * d * e)
        if plan is not None:
            BQ, BC, GP, rows = plan
            blocks = B * -(-P // GP)
            chunks, mt, nct, frag = -(-d // 32), rows // 16, BC // 16, 512
            # wmma per block: the scores, P C (pass C), dA C^T, P C and dS0 C (pass E), dC's
            # P^T dU and dS0^T X (K = rows)
            tc = blocks * 14 * rows * BC * d
            # fragments read from shared memory: the scores and one P C as the forward's, dA C^T as
            # the scores, two more P C, dC's tiles (2 rows / 16 A and B pairs each)
            frags = (cuda_tc_fragment_bytes(rows, BC, d, s, project=False) * 2
                     + chunks * (2 * 2 * mt * nct + nct * 2 * 4 * mt) * frag)
            stores = 2 * (2 * rows + BC) * d * e + 3 * rows * d * 4 * 2 + BC * d * 4 * 2
            book.add("attention_bwd_tc_kernel", count=1, note=f"BQ {BQ} BC {BC} GP {GP}", hmma=True, tc=tc,
                     simt=blocks * (GP * 26 * BQ * d + 2 * rows * BC * BC + 60 * rows * BC),
                     smem=blocks * (frags + stores),
                     # per pair: Q three times, F twice (with F), G2 twice, dQ's atomics, dF; per block
                     # the context three times, its Gram matrix, dC's atomics
                     l2=pairs * (Lq * d * e * 3 + (Lq * d * e * 2 + Lq * d * 4 if has_f else 0) + Lq * d * 4 * 2
                                 + Lq * d * 8) + blocks * (3 * Lc * d * e + Lc * Lc * 4 + Lc * d * 8),
                     hbm=N * d * 4 + N * d * e + (N * d * (4 + e) if has_f else 0) + (P * Lq + B * Lc) * d * 4)
        else:
            book.add("attention_bwd_kernel", count=1, simt=pairs * simt * 2, smem=pairs * simt * 2 * 4,
                     l2=pairs * ((Lq + Lc) * d * 4 * 2 + Lq * d * 4), hbm=N * d * 4)
        book.add("rar_bwd_kernel + its GEMMs", count=3, tc=pairs * 2 * 16 * ((Lq + 15) // 16) * s * s * 3,
                 simt=pairs * 2 * s * s * 2, l2=pairs * (2 * s * s * e), hbm=pairs * Lq * s * 4 * 3)
        if t < shape.steps - 1:
            rcr_recomputed_backward(book, B, P, Lq, t > 0, kernel=True, bn=CUDA_RCR_BN)


def torch_forward(book: Book, shape: Shape, B: int, P: int, Lg: int, recompute: bool = False) -> None:
    """The torch backend (rcar_fast/backends/torch_kernels.py): cuBLAS products over the whole
    block and element-wise passes over its d-wide tensors (bf16, in place without autograd)."""
    tag = " (recompute)" if recompute else ""
    Lq, Lc = _rows(shape, Lg)
    pairs, d, s, e = B * P, D, S_DIM, ELEM
    N = pairs * Lq
    for t in range(shape.steps):
        has_f = t > 0
        if has_f:
            book.add(f"F * Q{tag}", count=1, simt=N * d, hbm=N * d * e * 2)
        book.add(f"scores and P C (cuBLAS){tag}", count=2, tc=2 * N * Lc * d * 2,
                 hbm=(N * d * e if has_f else (P * Lq * d * e)) + B * Lc * d * e * 2 + N * d * e + N * Lc * e * 2)
        book.add(f"scores' element-wise (leaky, norm, softmax){tag}", count=8, simt=N * Lc * 20,
                 hbm=N * Lc * e * 10)
        book.add(f"|U|, (Q - A)^2 (element-wise){tag}", count=3, simt=N * d * 5, hbm=N * d * e * 5)
        book.add(f"projection (cuBLAS) + l2n{tag}", count=3, tc=2 * N * d * s, hbm=N * d * e + N * s * e * 3)
        if t < shape.steps - 1:
            rcr_torch(book, B, P, Lq, "rcr (torch)" + tag)
        book.add(f"rar (cuBLAS + element-wise){tag}", count=12, tc=2 * N * s * s + 2 * pairs * s * s, simt=N * s * 12,
                 hbm=N * s * e * 8 + pairs * s * e * 4)
    pipeline_block(book, B, P, Lq, tag)


def torch_backward(book: Book, shape: Shape, B: int, P: int, Lg: int) -> None:
    """The torch backend's backward: autograd over the same ops (about twice the forward's
    products, and the saved d-wide tensors read back)."""
    Lq, Lc = _rows(shape, Lg)
    pairs, d, s, e = B * P, D, S_DIM, ELEM
    N = pairs * Lq
    for t in range(shape.steps):
        book.add("autograd: attention, projection", count=25, tc=2 * (2 * N * Lc * d * 2 + 2 * N * d * s),
                 simt=N * d * 20, hbm=N * d * e * 14)
        book.add("autograd: rar", count=15, tc=2 * 2 * N * s * s, hbm=N * s * e * 12)
        if t < shape.steps - 1:
            book.add("autograd: rcr", count=12, tc=2 * (2 * N * s * 2 * s + 2 * N * 2 * s * d + 2 * N * s * s // 2),
                     hbm=N * d * e * 10 + N * 2 * s * e * 6)


#: backend -> (forward model, backward model, buffers per block without / with autograd, the
#: kernel set's GPU budget: KernelSet.live_buffers, live_buffers_train and budgets["cuda"],
#: tests/test_roofline.py checks they agree). The block budget on an H200 is that or its share
#: of the device's memory, as KernelSet.budget takes it (contract.gpu_budget: 8 GiB)
MODELS = {
    "torch": (torch_forward, torch_backward, 4, 17, 2 * 2**30),
    "triton": (triton_forward, triton_backward, 3, 6, 2 * 2**30),
    "cuda": (cuda_forward, cuda_backward, 3, 6, 2 * 2**30),
}


def model(backend: str, shape: Shape) -> Book:
    forward, backward, live, live_train, base = MODELS[backend]
    book = Book(backend)
    budget = gpu_budget(base, GPU_MEMORY)
    for Lg, B, P in _blocks(shape, live_train if shape.training else live, budget):
        if shape.attn_type == "i2t":
            B, P = P, B            # block layout: B the context side (captions), P the queries (images)
        forward(book, shape, B, P, Lg)
        if shape.training:
            forward(book, shape, B, P, Lg, recompute=True)
            backward(book, shape, B, P, Lg)
    pipeline_call(book, backend, shape)
    return book


def useful_tflop(shape: Shape) -> float:
    """SPEC.md's counted FLOPs of the shape's forward (bench/flops.py), in TFLOP."""
    from .flops import shard_flops
    return shard_flops(shape.n_images, shape.lengths(), R, D, S_DIM, shape.regulator, shape.steps,
                       shape.attn_type) / 1e12


# ----------------------------------------------------------------------------- report

def rows(shapes, backends):
    out = []
    for sname in shapes:
        shape = SHAPES[sname]
        for b in backends:
            book = model(b, shape)
            for ln in sorted(book.launches.values(), key=lambda x: -x.seconds()):
                out.append(dict(shape=sname, backend=b, launch=ln.name, count=ln.count, tc_tflop=ln.tc / 1e12,
                                simt_tflop=ln.simt / 1e12, hbm_gb=ln.hbm / 1e9, l2_gb=ln.l2 / 1e9,
                                smem_gb=ln.smem / 1e9, bound=ln.bound(), seconds=ln.seconds(), note=ln.note))
    return out


def totals(shapes, backends):
    out = []
    for sname in shapes:
        shape = SHAPES[sname]
        useful = useful_tflop(shape) * (3 if shape.training else 1)
        for b in backends:
            book = model(b, shape)
            ls = book.launches.values()
            out.append(dict(shape=sname, backend=b, n_images=shape.n_images, n_captions=shape.n_captions,
                            len_lo=shape.len_lo, len_hi=shape.len_hi, regulator=shape.regulator,
                            steps=shape.steps, attn_type=shape.attn_type, training=shape.training,
                            launches=sum(ln.count for ln in ls),
                            tc_tflop=sum(ln.tc for ln in ls) / 1e12, useful_tflop=useful,
                            simt_tflop=sum(ln.simt for ln in ls) / 1e12, hbm_gb=sum(ln.hbm for ln in ls) / 1e9,
                            l2_gb=sum(ln.l2 for ln in ls) / 1e9, smem_gb=sum(ln.smem for ln in ls) / 1e9,
                            predicted_s=book.seconds(), goal_s=GOALS_S.get(sname)))
    return out


def markdown(shapes, backends, launches: bool) -> str:
    lines = ["Predicted on one H200 (bench/roofline.py; ceilings: "
             + "; ".join(f"{k} {v / 1e12:g} T/s ({why.split(':')[0]})" for k, (v, why) in CEILINGS.items())
             + f"; {LAUNCH_S * 1e6:g} us per launch, lead). Not measured.", "",
             "| shape | backend | launches | TC TFLOP executed (useful) | SIMT TFLOP | HBM GB | L2 GB | SMEM GB "
             "| predicted s | goal s |", "|" + " --- |" * 10]
    for t in totals(shapes, backends):
        lines.append(f"| {t['shape']} | {t['backend']} | {t['launches']} | {t['tc_tflop']:.1f} ({t['useful_tflop']:.1f}) "
                     f"| {t['simt_tflop']:.1f} | {t['hbm_gb']:.0f} | {t['l2_gb']:.0f} | {t['smem_gb']:.0f} "
                     f"| {t['predicted_s']:.3g} | {t['goal_s'] if t['goal_s'] is not None else ''} |")
    if launches:
        lines += ["", "| shape | backend | launch | count | TC TFLOP | SIMT TFLOP | HBM GB | L2 GB | SMEM GB | bound "
                  "| predicted s | note |", "|" + " --- |" * 12]
        for r in rows(shapes, backends):
            lines.append(f"| {r['shape']} | {r['backend']} | {r['launch']} | {r['count']} | {r['tc_tflop']:.2f} "
                         f"| {r['simt_tflop']:.2f} | {r['hbm_gb']:.1f} | {r['l2_gb']:.1f} | {r['smem_gb']:.1f} "
                         f"| {r['bound']} | {r['seconds']:.4f} | {r['note']} |")
    return "\n".join(lines)


def what_if_rcr_on_chip(shapes, BDF: int) -> str:
    """Markdown: per inference shape, the triton backend as built against the same with RCR's
    factors made on chip in step 1's attention (triton_factors_on_chip), totals and the two lines
    that change."""
    from dataclasses import replace
    lines = [f"What-if (not built), triton, bf16, one H200, predicted: F made on chip in step 1's attention, "
             f"BDF {BDF}", "", "| shape | design | predicted s | attention_fwd s | rcr_factors_gemm s | HBM GB "
             "| L2 GB | TC TFLOP |", "|" + " --- |" * 8]
    for sname in shapes:
        shape = SHAPES[sname]
        if shape.training:
            continue
        for label, sh in (("as built", shape), (f"F on chip, BDF {BDF}", replace(shape, rcr_on_chip=BDF))):
            book = model("triton", sh)
            ls = book.launches
            fac = ls.get("rcr_factors_gemm (clamp(tanh(H W2^T + b2) + F))")
            lines.append(f"| {sname} | {label} | {book.seconds():.4f} | {ls['attention_fwd'].seconds():.4f} "
                         f"| {fac.seconds() if fac else 0:.4f} | {sum(x.hbm for x in ls.values()) / 1e9:.0f} "
                         f"| {sum(x.l2 for x in ls.values()) / 1e9:.0f} | {sum(x.tc for x in ls.values()) / 1e12:.1f} |")
    return "\n".join(lines)


RESULTS_MD = "bench/results/roofline.md"
RESULTS_JSON = "bench/results/roofline.json"


def _shape_of_row(row):
    """(n_images, n_captions, len_lo, len_hi) of a history row's shape label, or None."""
    import re
    m = re.match(r"\S+ (\d+)x(\d+) .*len(\d+)-(\d+)", row.shape)
    return tuple(int(g) for g in m.groups()) if m else None


def compare(rows, predictions) -> List[str]:
    """Lines "backend, shape: measured s vs predicted s" for the bf16 rows measured on a GPU whose
    shape, set-up and direction the model has (``predictions``: the totals of roofline.json).
    Needs no torch (the summary of the device suite runs it)."""
    out = []
    for r in rows:
        if r.dtype != "bfloat16" or r.median_ms is None or "EPYC" in r.device or "cpu" in r.device.lower():
            continue
        key = _shape_of_row(r)
        for p in predictions:
            if (p["backend"] == r.backend and key == (p["n_images"], p["n_captions"], p["len_lo"], p["len_hi"])
                    and p["regulator"] == r.regulator and p["steps"] == r.steps and p["attn_type"] == r.attn_type
                    and p["training"] == (r.op == "train_step")):
                meas = r.median_ms / 1e3
                out.append(f"{r.backend:<7} {p['shape']:<10} {r.attn_type}: measured {meas:.3g} s, predicted "
                           f"{p['predicted_s']:.3g} s (x{meas / p['predicted_s']:.2f})")
    return out


def write(shapes, backends) -> None:
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, RESULTS_MD), "w") as f:
        f.write("# Cost model: predicted H200 times of today's kernels (python -m bench.roofline --write)\n\n"
                + markdown(shapes, backends, True) + "\n")
    with open(os.path.join(root, RESULTS_JSON), "w") as f:
        json.dump({"totals": totals(shapes, backends),
                   "ceilings": {k: {"per_s": v, "source": w} for k, (v, w) in CEILINGS.items()},
                   "launch_s": LAUNCH_S}, f, indent=1)
        f.write("\n")


def backends_arg(text: str, prog: str):
    """The backends a --backends value names, or None after saying on stderr which are not
    modelled (the caller exits 2)."""
    backends = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in backends if b not in MODELS]
    if bad:
        print(f"{prog}: --backends: unknown {', '.join(bad)} (known: {', '.join(MODELS)})", file=sys.stderr)
        return None
    return backends


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: every shape")
    ap.add_argument("--backends", default="torch,triton,cuda")
    ap.add_argument("--launches", action="store_true", help="also one row per launch kind")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS_MD} and {RESULTS_JSON}")
    ap.add_argument("--compare", metavar="CSV", help="measured bf16 GPU rows of CSV vs the committed predictions")
    ap.add_argument("--what-if-rcr-on-chip", type=int, metavar="BDF", dest="what_if",
                    help="a design not built: the triton backend with RCR's factors made in the next "
                         "attention, BDF columns of d at a time (F never stored), against the code as built; "
                         "a markdown table of the inference shapes (--backends and --json do not apply)")
    a = ap.parse_args(argv)
    if a.what_if is not None:
        if a.what_if < 16 or a.what_if > D or a.what_if & (a.what_if - 1):
            print(f"python -m bench.roofline: --what-if-rcr-on-chip: BDF must be a power of two from 16 to "
                  f"d = {D}, got {a.what_if}", file=sys.stderr)
            return 2
        print(what_if_rcr_on_chip(a.shape or ["flickr30k", "mscoco5k", "headline"], a.what_if))
        return 0
    if a.compare:
        import os
        from .report import read_csv
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, RESULTS_JSON)) as f:
            lines = compare(read_csv(a.compare), json.load(f)["totals"])
        print("\n".join(lines) if lines else "(no bf16 GPU row of a modelled shape)")
        return 0
    shapes = a.shape or list(SHAPES)
    backends = backends_arg(a.backends, "python -m bench.roofline")
    if backends is None:
        return 2
    if a.write:
        write(shapes, backends)
        print(f"wrote {RESULTS_MD}, {RESULTS_JSON}")
        return 0
    if a.json:
        print(json.dumps({"totals": totals(shapes, backends), "launches": rows(shapes, backends),
                          "ceilings": {k: {"per_s": v, "source": w} for k, (v, w) in CEILINGS.items()},
                          "launch_s": LAUNCH_S}))
    else:
        print(markdown(shapes, backends, a.launches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
