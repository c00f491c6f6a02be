// Launch plan of the CUDA kernels: block size, tile sizes and the dynamic shared-memory layout
// of each kernel as a function of the runtime shapes. Plain C++ (no CUDA, no torch), so the
// kernels (which carve their shared memory with it), the launchers (which size the launch and
// check it against the device) and the compile report (bench/resources.py compiles a small host
// driver against this header) all use the same numbers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RCAR_HD __host__ __device__ __forceinline__
#else
#define RCAR_HD inline
#endif

namespace rcar_fast {
namespace cuda_plan {

constexpr int kThreads = 256;      // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBD = 32;            // width of the d (or s) chunk streamed through shared memory
constexpr int kNG = 256;           // output columns per GEMM pass: 8 warps x 2 tiles of 16
constexpr int kLDF = kBD + 1;      // row stride of fp32 chunk tiles (odd: conflict-free columns)
constexpr int kLDY = kNG + 4;      // row stride of one fp32 GEMM result group

RCAR_HD int64_t a128(int64_t bytes) { return (bytes + 127) / 128 * 128; }
RCAR_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
RCAR_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Row stride (elements) of a GEMM operand tile in the compute type (elem = its size in bytes):
// fp32 33 (SIMT reads), 16-bit 40 (wmma needs a multiple of 8 elements; 80-byte rows).
RCAR_HD int ld_op(int elem) { return elem == 4 ? kBD + 1 : kBD + 8; }

// Rows of one GEMM row group: 16 * mt, mt in {1, 2, 4}; the smallest that covers `rows`.
RCAR_HD int pick_mt(int64_t rows) { return rows <= 16 ? 1 : (rows <= 32 ? 2 : 4); }
RCAR_HD int smaller_mt(int mt) { return mt == 4 ? 2 : 1; }

// ---------------------------------------------------------------- attention forward
// What the attention kernels write (their MODE template argument): kModeAttended A (d wide);
// kModeAlignment the fused projection, E (s wide); kModeSquaredDiff (Q - A)^2 (the backward's
// scratch: fp32 from attention_fwd_kernel, the inputs' dtype from attention_fwd_tc_kernel). The backward kernel takes kModeAttended (the gradient of A given) or
// kModeAlignment (the gradient of (Q - A)^2 given, from the projection's backward).
enum AttnMode : int { kModeAttended = 0, kModeAlignment = 1, kModeSquaredDiff = 2 };
// The forward kernel's regions (bytes from the start of dynamic shared memory):
//   S     Lq x Lc fp32 scores, then the probabilities in place
//   nrm   Lc column norms; inv Lq 1 / (|U| + eps); lam Lq temperatures
//   cs    Lc x kLDF fp32 context chunk                       (every pass)
//   xs    Lq x kLDF fp32 (F * Q) chunk                       (pass 1, after cs)
//   as    16 mt x ld_op (Q - A)^2 chunk, compute type         (kModeAlignment pass 2, after cs)
//   ws    kNG x ld_op weight chunk, compute type              (kModeAlignment pass 2, after as)
//   y     16 mt x ldy fp32 projection of one row group, ldy = round_up(s, kNG) + 4 (kModeAlignment)
struct AttnFwdLayout {
  int64_t S, nrm, inv, lam, cs, xs, as, ws, y, total;
  int ldy;
};

RCAR_HD AttnFwdLayout attn_fwd_layout(int elem, int64_t Lq, int64_t Lc, int64_t s, int mt, int mode) {
  AttnFwdLayout L{};
  L.S = 0;
  L.nrm = a128(L.S + Lq * Lc * 4);
  L.inv = a128(L.nrm + Lc * 4);
  L.lam = a128(L.inv + Lq * 4);
  L.cs = a128(L.lam + Lq * 4);
  L.xs = a128(L.cs + Lc * kLDF * 4);
  int64_t end = a128(L.xs + Lq * kLDF * 4);
  L.as = L.xs;
  L.ws = L.xs;
  L.y = end;
  L.ldy = 0;
  if (mode == kModeAlignment) {
    const int rg = 16 * mt;
    L.as = L.xs;
    L.ws = a128(L.as + (int64_t)rg * ld_op(elem) * elem);
    end = max64(end, a128(L.ws + (int64_t)kNG * ld_op(elem) * elem));
    L.ldy = (int)round_up(s, kNG) + 4;
    L.y = end;
    end = a128(L.y + (int64_t)rg * L.ldy * 4);
  }
  L.total = end;
  return L;
}

// ---------------------------------------------------------------- attention forward on tensor cores (fp16/bf16)
// attention_fwd_tc_kernel: one block holds GP pairs of one context item (paired: one pair), packed:
// pair g in rows g * BQ .. g * BQ + qlen - 1 of 16 MT rows with BQ = Lq (no padding between pairs);
// the scores, P C and the projection run on wmma. Lq and Lc up to kTcMaxLen (longer:
// attention_fwd_kernel).
constexpr int kTcRows = 64;                 // query rows a block aims for (GP = kTcRows / Lq)
constexpr int kTcMaxLen = 64;               // longest Lq and Lc the kernel takes
constexpr int kTcMaxMT = kTcRows / 16;      // most row tiles per block
constexpr int kTcMaxGP = kTcRows;           // most pairs per block (Lq = 1)
constexpr int kLDU = kBD + 4;               // row stride of the fp32 P C chunk
// Regions (bytes from the start of dynamic shared memory):
//   S     rows x ldS fp32 scores, then the probabilities in place (ldS = BC + 4)
//   Pb    rows x ldP probabilities in the compute type, the A operand of P C (ldP = BC + 8)
//   nrm   GP x BC column norms (per pair); inv, lam  rows fp32 each
//   xs    rows x ld_op (F * Q) chunk, compute type (pass 1); as: (Q - A)^2 chunk (pass 2, same place)
//   cs    BC x ld_op context chunk, compute type (every pass)
//   us    rows x kLDU fp32 P C chunk (pass 2)
//   ws    kNG x ld_op weight chunk, compute type; y  rows x ldy fp32 projection (kModeAlignment)
//   qls   kTcMaxGP int32, the query length of each pair of the block
struct AttnTcLayout {
  int64_t S, Pb, nrm, inv, lam, xs, cs, us, ws, y, qls, total;
  int ldS, ldP, ldy;
};

// Row strides of the tensor-core blocks' fp32 scores (ldS) and of their probabilities in the compute
// type (ldP: a multiple of 16 bytes, as wmma's loads need)
RCAR_HD int tc_ld_scores(int bc) { return bc + 4; }
RCAR_HD int tc_ld_probs(int bc) { return bc + 8; }

RCAR_HD AttnTcLayout attn_tc_layout(int elem, int rows, int bc, int gp, int64_t s, int mode) {
  AttnTcLayout L{};
  L.ldS = tc_ld_scores(bc);
  L.ldP = tc_ld_probs(bc);
  L.S = 0;
  L.Pb = a128(L.S + (int64_t)rows * L.ldS * 4);
  L.nrm = a128(L.Pb + (int64_t)rows * L.ldP * elem);
  L.inv = a128(L.nrm + (int64_t)gp * bc * 4);
  L.lam = a128(L.inv + (int64_t)rows * 4);
  L.xs = a128(L.lam + (int64_t)rows * 4);
  L.cs = a128(L.xs + (int64_t)rows * ld_op(elem) * elem);
  L.us = a128(L.cs + (int64_t)bc * ld_op(elem) * elem);
  int64_t end = a128(L.us + (int64_t)rows * kLDU * 4);
  L.ws = end;
  L.y = end;
  L.ldy = 0;
  if (mode == kModeAlignment) {
    L.ws = end;
    L.y = a128(L.ws + (int64_t)kNG * ld_op(elem) * elem);
    L.ldy = (int)round_up(s, kNG) + 4;
    end = a128(L.y + (int64_t)rows * L.ldy * 4);
  }
  L.qls = end;
  L.total = a128(L.qls + kTcMaxGP * 4);
  return L;
}

// The tensor-core kernel's launch for these shapes, or gp = 0 where it does not apply (fp32,
// Lq or Lc above kTcMaxLen, or not even one pair's block fits `limit` bytes).
// gp: pairs per block (1 paired, never more than P; lowered one at a time until the block fits);
// mt: row tiles, 16 mt >= gp * bq.
struct TcPlan {
  int bq, bc, gp, mt;
};

// Whether the tensor-core forward's projection runs on wgmma (attention_fwd_tc_kernel's WG
// instance) where the device and the build have it (launch.h use_wgmma): one 64-row block.
RCAR_HD constexpr bool tc_wgmma_projection(int mt, int mode) { return mt == 4 && mode == kModeAlignment; }

// The packing of the 64-row tensor-core blocks (forward and backward): Lq rows a pair back to back,
// GP = kTcRows / Lq pairs (1 paired; at most P), lowered one at a time while fits(rows, bc, gp)
// is false (gp 0 where even one pair does not fit, or fp32, or Lq or Lc above kTcMaxLen).
template <typename Fits>
RCAR_HD TcPlan pack_tc_plan(int elem, int64_t Lq, int64_t Lc, int64_t P, bool paired, Fits fits) {
  TcPlan t{0, 0, 0, 0};
  if (elem != 2 || Lq < 1 || Lc < 1 || P < 1 || Lq > kTcMaxLen || Lc > kTcMaxLen) return t;
  const int bq = (int)Lq, bc = (int)round_up(Lc, 16);
  int gp = paired ? 1 : kTcRows / bq;
  if (gp < 1) gp = 1;
  if (gp > P) gp = (int)P;
  for (;;) {
    const int mt = (gp * bq + 15) / 16;
    if (fits(16 * mt, bc, gp)) return TcPlan{bq, bc, gp, mt};
    if (gp == 1) return t;
    --gp;
  }
}

RCAR_HD TcPlan choose_tc_plan(int elem, int64_t Lq, int64_t Lc, int64_t s, int64_t P, bool paired, int mode,
                              int64_t limit) {
  return pack_tc_plan(elem, Lq, Lc, P, paired, [&](int rows, int bc, int gp) {
    return attn_tc_layout(elem, rows, bc, gp, s, mode).total <= limit;
  });
}

// ---------------------------------------------------------------- the backward's chunks of pairs
// attention_bwd_cuda (with a weight) takes the pairs pid = b P + p (p; B = 1 paired) in chunks of
// about `chunk` pairs, each a rectangle of the pair grid, so that the tensor-core forward can
// write the chunk's (Q - A)^2 rows in pid order: whole context items (b0 .. b0 + nb - 1, every p)
// where a chunk holds at least P pairs, else pairs p0 .. p0 + np - 1 of one item b0.
struct PairRect {
  int64_t b0, nb, p0, np;
};

// The end of the chunk that starts at pair pid0 (pairs in all; pid0 a chunk start of this rule).
RCAR_HD int64_t bwd_chunk_end(int64_t pid0, int64_t chunk, int64_t pairs, int64_t P) {
  const int64_t item_end = (pid0 / P + 1) * P;
  int64_t end = chunk >= P ? pid0 + (chunk / P) * P : pid0 + chunk;
  if (chunk < P && end > item_end) end = item_end;
  return end < pairs ? end : pairs;
}

// The rectangle of pairs pid0 .. pid1 - 1 (a chunk of bwd_chunk_end).
RCAR_HD PairRect bwd_chunk_rect(int64_t pid0, int64_t pid1, int64_t P) {
  const int64_t b0 = pid0 / P, p0 = pid0 - b0 * P;
  if (p0 == 0 && (pid1 - pid0) % P == 0) return PairRect{b0, (pid1 - pid0) / P, 0, P};
  return PairRect{b0, 1, p0, pid1 - pid0};
}

// ---------------------------------------------------------------- attention forward on wgmma (sm_90a, fp16/bf16)
// attention_fwd_wg_kernel (kModeAlignment, where launch.h use_wgmma says): one block holds GP =
// kWgRows / Lq packed pairs of one context item (pair g in rows g * Lq .. g * Lq + qlen - 1 of 128),
// warpgroup w owns rows 64 w .. 64 w + 63 of every product, and every product is a wgmma with both
// operands in shared memory as core matrices (wg_core_offset below): the scores m64nBCk16, P C
// m64n32k16 per kBD chunk of d, the projection m64n256k16 (s <= 256: one pass, E's l2n from the
// accumulator registers). Blocks that would hold 64 rows or fewer keep attention_fwd_tc_kernel.
// Regions (bytes from the start of dynamic shared memory):
//   S     kWgRows x ldS fp32 scores, then the probabilities in place (ldS = BC + 4)
//   Pb    kWgRows x BC probabilities in the compute type, core matrices (the A operand of P C)
//   nrm   GP x BC column norms (per pair); inv, lam  kWgRows fp32 each; qls kWgMaxGP int32
//   xs    kWgRows x kBD (F * Q) chunk, cs BC x kBD context chunk: pass 1, core matrices
//   ct    kBD x BC context chunk transposed (the B operand of P C), ws kNG x kBD weight chunk,
//   as    kWgRows x kBD (Q - A)^2 chunk: pass 2, core matrices, over pass 1's xs and cs
constexpr int kWgRows = 128;
constexpr int kWgMaxGP = kWgRows;   // Lq = 1
struct AttnWgLayout {
  int64_t S, Pb, nrm, inv, lam, qls, xs, cs, ct, ws, as, total;
  int ldS;
};

RCAR_HD AttnWgLayout attn_wg_layout(int elem, int bc, int gp) {
  AttnWgLayout L{};
  L.ldS = bc + 4;
  L.S = 0;
  L.Pb = a128(L.S + (int64_t)kWgRows * L.ldS * 4);
  L.nrm = a128(L.Pb + (int64_t)kWgRows * bc * elem);
  L.inv = a128(L.nrm + (int64_t)gp * bc * 4);
  L.lam = a128(L.inv + (int64_t)kWgRows * 4);
  L.qls = a128(L.lam + (int64_t)kWgRows * 4);
  const int64_t stage = a128(L.qls + (int64_t)kWgMaxGP * 4);
  L.xs = stage;
  L.cs = a128(L.xs + (int64_t)kWgRows * kBD * elem);
  const int64_t end1 = a128(L.cs + (int64_t)bc * kBD * elem);
  L.ct = stage;
  L.ws = a128(L.ct + (int64_t)kBD * bc * elem);
  L.as = a128(L.ws + (int64_t)kNG * kBD * elem);
  const int64_t end2 = a128(L.as + (int64_t)kWgRows * kBD * elem);
  L.total = max64(end1, end2);
  return L;
}

// The wgmma kernel's launch (mt 8: 128 rows), or gp = 0 where it does not apply: not fp16/bf16,
// not kModeAlignment, paired (one pair a block), Lq or Lc above kTcMaxLen, s above kNG, a block
// of 64 rows or fewer (attention_fwd_tc_kernel holds it whole), or more shared memory than `limit`.
RCAR_HD TcPlan choose_wg_plan(int elem, int64_t Lq, int64_t Lc, int64_t s, int64_t P, bool paired, int mode,
                              int64_t limit) {
  const TcPlan none{0, 0, 0, 0};
  if (elem != 2 || mode != kModeAlignment || paired || Lq < 1 || Lc < 1 || P < 1 || s < 1 || s > kNG ||
      Lq > kTcMaxLen || Lc > kTcMaxLen)
    return none;
  const int bq = (int)Lq, bc = (int)round_up(Lc, 16);
  const int gp = (int)(kWgRows / bq < P ? kWgRows / bq : P);
  if (gp * bq <= kTcRows || attn_wg_layout(elem, bc, gp).total > limit) return none;
  return TcPlan{bq, bc, gp, kWgRows / 16};
}

// ---------------------------------------------------------------- RCR GEMM (fp16/bf16, inference)
// rcr_gemm_kernel: a 128 x 256 block of out, 8 warps of 64 x 64. Regions (aliased):
//   as, bs   128 and 256 rows x ld_op of the K chunk of A and of B, compute type (the K loop)
//   ep       kWarps x 16 x kRcrEpiLd fp32: each warp's 16-row slice of its tile (the epilogue)
constexpr int kRcrBM = 128, kRcrBN = 256;
constexpr int kRcrEpiLd = 64 + 4;
RCAR_HD int64_t rcr_gemm_smem(int elem) {
  return max64(a128((int64_t)(kRcrBM + kRcrBN) * ld_op(elem) * elem), (int64_t)kWarps * 16 * kRcrEpiLd * 4);
}

// rcr_wgmma_kernel (sm_90a): the same 128 x 256 block, 2 warpgroups of 64 x 256, K staged
// kRcrWgBK columns at a time in two buffers (the next chunk loads while wgmma reads the other).
// One buffer: A's 128 rows, then B's 256 rows, each as 8 x 8 core matrices (8 rows of 16 bytes,
// 128 contiguous bytes; the K chunk's 8 core matrices of a row group back to back, then the
// next row group: rcr_wgmma_offset). The epilogue reads the accumulator registers (no region).
constexpr int kRcrWgBK = 64;
constexpr int kRcrSmoothBN = 128;   // rcr_wgmma_kernel<.., kRcrSmooth>'s block columns (s / 2 at most)
RCAR_HD int64_t rcr_wgmma_stage(int elem) { return (int64_t)(kRcrBM + kRcrBN) * kRcrWgBK * elem; }
RCAR_HD int64_t rcr_wgmma_smem(int elem) { return 2 * rcr_wgmma_stage(elem); }
// Byte offset of element (r, k) of a 16-bit wgmma operand tile of bk columns (a K chunk) stored
// as core matrices (csrc/cuda/wgmma.cuh: 8 rows of 16 bytes, 128 contiguous bytes; a row group's
// bk / 8 core matrices back to back, then the next row group's): lbo 128, sbo bk * 16.
RCAR_HD int wg_core_offset(int r, int k, int bk) { return (r >> 3) * (bk * 16) + (k >> 3) * 128 + (r & 7) * 16 + (k & 7) * 2; }
RCAR_HD int rcr_wgmma_offset(int r, int k) { return wg_core_offset(r, k, kRcrWgBK); }

// ---------------------------------------------------------------- attention backward (per pair)
//   S, P, dP   Lq x Lc fp32 (leaky scores, probabilities, then dP -> dZ -> dSn -> dS0 in place)
//   M          Lc x Lc fp32, P^T diag(coefU) P
//   nrm, colc  Lc; inv, un, udA, coefU, lam  Lq
//   cs         Lc x kLDF; qs, fs, das  Lq x kLDF (qs doubles as pass 1's (F * Q) chunk)
struct AttnBwdLayout {
  int64_t S, P, dP, M, nrm, colc, inv, un, udA, coefU, lam, cs, qs, fs, das, total;
};

RCAR_HD AttnBwdLayout attn_bwd_layout(int64_t Lq, int64_t Lc) {
  AttnBwdLayout L{};
  L.S = 0;
  L.P = a128(L.S + Lq * Lc * 4);
  L.dP = a128(L.P + Lq * Lc * 4);
  L.M = a128(L.dP + Lq * Lc * 4);
  L.nrm = a128(L.M + Lc * Lc * 4);
  L.colc = a128(L.nrm + Lc * 4);
  L.inv = a128(L.colc + Lc * 4);
  L.un = a128(L.inv + Lq * 4);
  L.udA = a128(L.un + Lq * 4);
  L.coefU = a128(L.udA + Lq * 4);
  L.lam = a128(L.coefU + Lq * 4);
  L.cs = a128(L.lam + Lq * 4);
  L.qs = a128(L.cs + Lc * kLDF * 4);
  L.fs = a128(L.qs + Lq * kLDF * 4);
  L.das = a128(L.fs + Lq * kLDF * 4);
  L.total = a128(L.das + Lq * kLDF * 4);
  return L;
}

// ---------------------------------------------------------------- attention backward on tensor cores (fp16/bf16)
// attention_bwd_tc_kernel: the blocks of attention_fwd_tc_kernel (GP packed pairs of one context
// item, 16 MT rows, BC = Lc rounded up to 16), every d-wide product on wmma. Regions:
//   S     rows x ldS fp32: the scores S0, then the probabilities P (tc_block_probs)
//   Sl    rows x ldS fp32: LeakyReLU(S0) kept for the temperatures' and the norms' gradients
//   dP    rows x ldS fp32: dP (the split-K meet), then dZ -> dSn -> dS0 in place
//   Pb, dSb  rows x ldP: P and dS0 in the compute type (A operands; transposed: dC's)
//   nrm, colc  gp x bc fp32 (per pair); inv, un, udA, coefU, lam  rows fp32 each
//   xs    rows x ld_op: the (F * Q) chunk (pass A and E), compute type
//   das   rows x ld_op: dA (pass C) / dU (pass E), compute type
//   cs    bc x ld_op context chunk, compute type
//   us, ux  rows x kLDU fp32: P C and dS0 C chunks;  dcs  bc x kLDU fp32: the block's dC chunk
//   qls   kTcMaxGP int32
struct AttnBwdTcLayout {
  int64_t S, Sl, dP, Pb, dSb, nrm, colc, inv, un, udA, coefU, lam, xs, das, cs, us, ux, dcs, qls, total;
  int ldS, ldP;
};

RCAR_HD AttnBwdTcLayout attn_bwd_tc_layout(int elem, int rows, int bc, int gp) {
  AttnBwdTcLayout L{};
  L.ldS = tc_ld_scores(bc);
  L.ldP = tc_ld_probs(bc);
  const int64_t fS = (int64_t)rows * L.ldS * 4, hP = (int64_t)rows * L.ldP * elem, op = (int64_t)ld_op(elem) * elem;
  L.S = 0;
  L.Sl = a128(L.S + fS);
  L.dP = a128(L.Sl + fS);
  L.Pb = a128(L.dP + fS);
  L.dSb = a128(L.Pb + hP);
  L.nrm = a128(L.dSb + hP);
  L.colc = a128(L.nrm + (int64_t)gp * bc * 4);
  L.inv = a128(L.colc + (int64_t)gp * bc * 4);
  L.un = a128(L.inv + (int64_t)rows * 4);
  L.udA = a128(L.un + (int64_t)rows * 4);
  L.coefU = a128(L.udA + (int64_t)rows * 4);
  L.lam = a128(L.coefU + (int64_t)rows * 4);
  L.xs = a128(L.lam + (int64_t)rows * 4);
  L.das = a128(L.xs + (int64_t)rows * op);
  L.cs = a128(L.das + (int64_t)rows * op);
  L.us = a128(L.cs + (int64_t)bc * op);
  L.ux = a128(L.us + (int64_t)rows * kLDU * 4);
  L.dcs = a128(L.ux + (int64_t)rows * kLDU * 4);
  L.qls = a128(L.dcs + (int64_t)bc * kLDU * 4);
  L.total = a128(L.qls + kTcMaxGP * 4);
  return L;
}

// The tensor-core backward's launch (choose_tc_plan's packing, its own layout), or gp = 0 where it
// does not apply: fp32, Lq or Lc above kTcMaxLen, or not even one pair's block fits `limit`.
RCAR_HD TcPlan choose_bwd_tc_plan(int elem, int64_t Lq, int64_t Lc, int64_t P, bool paired, int64_t limit) {
  return pack_tc_plan(elem, Lq, Lc, P, paired,
                      [&](int rows, int bc, int gp) { return attn_bwd_tc_layout(elem, rows, bc, gp).total <= limit; });
}

// ---------------------------------------------------------------- Gram matrix G = C C^T per context item
struct GramLayout {
  int64_t cs, G, total;
};

RCAR_HD GramLayout gram_layout(int64_t Lc) {
  GramLayout L{};
  L.cs = 0;
  L.G = a128(Lc * kLDF * 4);
  L.total = a128(L.G + Lc * Lc * 4);
  return L;
}

// ---------------------------------------------------------------- RAR forward / backward (per pair)
//   es     rows x lde, E in the compute type, rows = round_up(Lq, 16 mt), lde = round_up(s, kBD) + 8
//   ws     kNG x ld_op Wk chunk, compute type
//   y      16 mt x kLDY fp32, one (row group, column group) of E Wk^T
//   h, g, gw, du   round_up(s, kBD) fp32 each
//   logit, a       rows fp32 each; red 64 fp32 (block reductions)
struct RarLayout {
  int64_t es, ws, y, h, g, gw, du, logit, a, red, total;
  int lde, rows, sk;
};

RCAR_HD RarLayout rar_layout(int elem, int64_t Lq, int64_t s, int mt) {
  RarLayout L{};
  const int rg = 16 * mt;
  L.rows = (int)round_up(Lq, rg);
  L.sk = (int)round_up(s, kBD);
  L.lde = L.sk + 8;
  L.es = 0;
  L.ws = a128(L.es + (int64_t)L.rows * L.lde * elem);
  L.y = a128(L.ws + (int64_t)kNG * ld_op(elem) * elem);
  L.h = a128(L.y + (int64_t)rg * kLDY * 4);
  L.g = a128(L.h + (int64_t)L.sk * 4);
  L.gw = a128(L.g + (int64_t)L.sk * 4);
  L.du = a128(L.gw + (int64_t)L.sk * 4);
  L.logit = a128(L.du + (int64_t)L.sk * 4);
  L.a = a128(L.logit + (int64_t)L.rows * 4);
  L.red = a128(L.a + (int64_t)L.rows * 4);
  L.total = a128(L.red + 64 * 4);
  return L;
}

// ---------------------------------------------------------------- RAR forward: one step, GP pairs per block
// rar_fwd_kernel: GP pairs of one block of the grid (consecutive query items of one context item),
// pair g in rows g * BQ .. g * BQ + qlen - 1 of GP * BQ rows (packed: BQ = Lq; GP = 64 / Lq, 1 past
// 64 rows), the keys K = tanh(E Wk^T + bk) by the block GEMM over 16 MT rows at a time.
//   es     rows x lde, E in the compute type (lde = round_up(s, kBD) + 8)
//   ws     kNG x ld_op Wk chunk, compute type;  y  16 mt x kLDY fp32, one group of E Wk^T
//   gw     GP x sk fp32 (each pair's g keep_g wv, from the host);  u  sk fp32
//   logit, a   rows fp32 each; red 64 fp32; qls kTcMaxGP int32
struct RarStepLayout {
  int64_t es, ws, y, gw, u, logit, a, red, qls, total;
  int lde, rows, sk;
};

RCAR_HD RarStepLayout rar_step_layout(int elem, int rows, int64_t s, int mt, int gp) {
  RarStepLayout L{};
  L.rows = (int)round_up(rows, 16 * mt);
  L.sk = (int)round_up(s, kBD);
  L.lde = L.sk + 8;
  L.es = 0;
  L.ws = a128(L.es + (int64_t)L.rows * L.lde * elem);
  L.y = a128(L.ws + (int64_t)kNG * ld_op(elem) * elem);
  L.gw = a128(L.y + (int64_t)16 * mt * kLDY * 4);
  L.u = a128(L.gw + (int64_t)gp * L.sk * 4);
  L.logit = a128(L.u + (int64_t)L.sk * 4);
  L.a = a128(L.logit + (int64_t)L.rows * 4);
  L.red = a128(L.a + (int64_t)L.rows * 4);
  L.qls = a128(L.red + 64 * 4);
  L.total = a128(L.qls + kTcMaxGP * 4);
  return L;
}

// bq: Lq (packed pairs); gp pairs per block (<= P; 1 past kTcRows rows); mt row tiles per GEMM
// group (16 mt covers gp * bq up to 64). gp, then mt, lowered until the block fits `limit`;
// gp = 0: not even one pair with mt = 1 fits (the launcher refuses).
struct RarPlan {
  int bq, gp, mt;
};

RCAR_HD RarPlan choose_rar_plan(int elem, int64_t Lq, int64_t s, int64_t P, int64_t limit) {
  const int bq = (int)(Lq < 1 ? 1 : Lq);
  int gp = bq <= kTcRows ? kTcRows / bq : 1;
  if (gp > P) gp = P < 1 ? 1 : (int)P;
  for (; gp >= 1; --gp) {
    const int rows = gp * bq;
    for (int mt = rows <= 16 ? 1 : (rows <= 32 ? 2 : (rows <= 48 ? 3 : 4)); mt >= 1; --mt)
      if (rar_step_layout(elem, rows, s, mt, gp).total <= limit) return RarPlan{bq, gp, mt};
  }
  return RarPlan{bq, 0, 0};
}

// ---------------------------------------------------------------- RAR forward on wgmma (sm_90a, fp16/bf16)
// rar_fwd_wg_kernel (where launch.h use_wgmma says): GP = kWgRows / Lq packed pairs of one context
// item in 128 rows, warpgroup w owning rows 64 w .. 64 w + 63, K = E Wk^T by wgmma m64n256k16 (s <=
// kNG) with both operands as core matrices (wg_core_offset). Blocks of 64 rows or fewer keep
// rar_fwd_kernel. Regions:
//   es     kWgRows x sk E in the compute type, core matrices (sk = s rounded up to kBD; zeros past s)
//   ws     kNG x kBD Wk chunk, core matrices
//   gw     GP x sk fp32 (each pair's tanh(pre) keep_g wv);  logit, a  kWgRows fp32;  qls kWgMaxGP int32
struct RarWgLayout {
  int64_t es, ws, gw, logit, a, qls, total;
  int sk;
};

RCAR_HD RarWgLayout rar_wg_layout(int elem, int gp, int64_t s) {
  RarWgLayout L{};
  L.sk = (int)round_up(s, kBD);
  L.es = 0;
  L.ws = a128(L.es + (int64_t)kWgRows * L.sk * elem);
  L.gw = a128(L.ws + (int64_t)kNG * kBD * elem);
  L.logit = a128(L.gw + (int64_t)gp * L.sk * 4);
  L.a = a128(L.logit + (int64_t)kWgRows * 4);
  L.qls = a128(L.a + (int64_t)kWgRows * 4);
  L.total = a128(L.qls + (int64_t)kWgMaxGP * 4);
  return L;
}

// gp = 0 where it does not apply: not fp16/bf16, Lq above kWgRows, s above kNG, 64 rows or fewer
// (GP * Lq <= kTcRows: rar_fwd_kernel), or more shared memory than `limit`. mt 8: 128 rows.
RCAR_HD RarPlan choose_rar_wg_plan(int elem, int64_t Lq, int64_t s, int64_t P, int64_t limit) {
  const int bq = (int)(Lq < 1 ? 1 : Lq);
  const RarPlan none{bq, 0, 0};
  if (elem != 2 || Lq < 1 || Lq > kWgRows || s < 1 || s > kNG || P < 1) return none;
  const int gp = (int)(kWgRows / bq < P ? kWgRows / bq : P);
  if (gp * bq <= kTcRows || rar_wg_layout(elem, gp, s).total > limit) return none;
  return RarPlan{bq, gp, kWgRows / 16};
}

// ---------------------------------------------------------------- the launchers' choice of MT
// The smallest row group covering Lq, halved while the block's shared memory exceeds `limit`
// (the device's opt-in bytes per block). The launcher refuses when even MT = 1 does not fit.
RCAR_HD int choose_attn_mt(int elem, int64_t Lq, int64_t Lc, int64_t s, int64_t limit) {
  int mt = pick_mt(Lq);
  while (mt > 1 && attn_fwd_layout(elem, Lq, Lc, s, mt, 1).total > limit) mt = smaller_mt(mt);
  return mt;
}

RCAR_HD int choose_rar_mt(int elem, int64_t Lq, int64_t s, int64_t limit) {
  int mt = pick_mt(Lq);
  while (mt > 1 && rar_layout(elem, Lq, s, mt).total > limit) mt = smaller_mt(mt);
  return mt;
}

}  // namespace cuda_plan
}  // namespace rcar_fast
