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
// kModeAlignment the fused projection, E (s wide); kModeSquaredDiff (Q - A)^2 in fp32 (the
// backward's scratch). The backward kernel takes kModeAttended (the gradient of A given) or
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
