// The kernels of the rcr op's CUDA implementation (rcr.cu): RCR's d-wide element-wise chain over
// the output of its second GEMM, and the temperatures over the smooth MLP's first (csrc/README.md, `rcr`).
#pragma once

#include "common.cuh"
#include "wgmma.cuh"

namespace rcar_fast {
namespace cuda {

// clamp(x, -1, 1) that keeps a NaN, as torch's clamp (fminf/fmaxf would make it -1 or 1): both
// comparisons are false for NaN
__device__ __forceinline__ float clamp_unit(float x) { return x < -1.f ? -1.f : (x > 1.f ? 1.f : x); }

// F = clamp(tanh(M) + F_old, -1, 1) over M (rows x D, contiguous) in place; f_old likewise or
// nullptr (all ones). Row r is position r % Lq of query item (r / Lq) % P: zero at or past its length.
// Block per row (grid-stride over rows), threads over the columns. A NaN in a valid row stays NaN.
template <typename T>
__global__ void __launch_bounds__(kThreads) rcr_factors_kernel(T* __restrict__ m, const T* __restrict__ f_old,
                                                               const int* __restrict__ qlens, int64_t rows,
                                                               int64_t P, int64_t Lq, int64_t D) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t q = r % Lq, p = (r / Lq) % P;
    const bool valid = q < (int64_t)qlens[p];
    T* mr = m + r * D;
    const T* fr = f_old != nullptr ? f_old + r * D : nullptr;
    for (int64_t c = threadIdx.x; c < D; c += kThreads) {
      float v = 0.f;
      if (valid) v = clamp_unit(tanhf(to_f(mr[c])) + (fr != nullptr ? to_f(fr[c]) : 1.f));
      mr[c] = from_f<T>(v);
    }
  }
}

// RCR's GEMMs for fp16/bf16 with their element-wise chain in the epilogue, fp32 accumulators:
//   kRcrHidden:  out = tanh(A B^T + bias)                                   every row
//   kRcrFactors: out = clamp(tanh(A B^T + bias) + F_old, -1, 1), F_old all ones where null, zero
//                at rows at or past their query length (row r: position r % Lq of query item
//                (r / Lq) % P; F_old is not read there); a NaN in a valid row stays NaN
//   kRcrFactorsBwd: the factors' backward (rcr_bwd_store, the rcr_factors_bwd op): out = gm,
//                rg.df = gz, every row (qlens not read)
// A (M x K), B (N x K), F_old and out (M x N): row-major, contiguous; bias (N). Block x: the
// 128 x 256 block (x / nb, x % nb) of out, nb = ceil(N / 256), so the blocks of one row block run
// together (A from HBM once, B from L2); warp w: rows 64 (w / 4), columns 64 (w % 4), 4 x 4 wmma
// tiles (4 A and 4 B fragments per 16 products). K is streamed 32 columns at a time (zeros past M,
// N and K); the epilogue takes each warp's tile 16 rows at a time through shared memory (plan.h
// rcr_gemm_smem: the regions alias).
enum { kRcrHidden = 0, kRcrFactors = 1, kRcrSmooth = 2, kRcrFactorsBwd = 3 };   // kRcrSmooth: rcr_wgmma_block only

// x rounded to T and back (a no-op for float): the roundings of torch's step in T
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

// kRcrFactorsBwd's operands beside the GEMM's (RcrGrad<T>{} for the other epilogues): grad, the
// gradient of the new factors (M x N), and df (M x N) or nullptr (not wanted)
template <typename T>
struct RcrGrad {
  const T* grad;
  T* df;
};

// The d-wide chain of RCR's recomputed backward at (gr, gc) of an (. x N) output, from acc =
// (hidden W2^T)[gr, gc]: t = tanh(acc + b2), z = t + F_old (1 where null), each rounded to T as
// torch's step rounds them; gz = grad where |z| <= 1 (the clamp's gradient, torch's convention;
// 0 for a NaN z); out = gz (1 - t^2), df = gz. rcr_gemm_kernel's and rcr_wgmma_kernel's
// kRcrFactorsBwd epilogue (fp16/bf16) and rcr_factors_bwd_kernel (fp32, acc from cuBLAS).
template <typename T>
__device__ __forceinline__ void rcr_bwd_store(float acc, int64_t gr, int64_t gc, int64_t N, const T* __restrict__ bias,
                                              const T* __restrict__ f_old, T* __restrict__ out, const RcrGrad<T>& rg) {
  const int64_t i = gr * N + gc;
  const float t = round_to<T>(tanhf(round_to<T>(acc + to_f(bias[gc]))));
  const float z = round_to<T>(t + (f_old != nullptr ? to_f(f_old[i]) : 1.f));
  const float gz = fabsf(z) <= 1.f ? to_f(rg.grad[i]) : 0.f;
  out[i] = from_f<T>(gz * (1.f - t * t));
  if (rg.df != nullptr) rg.df[i] = from_f<T>(gz);
}

// fp32's chain (rcr_bwd_store) over M = hidden W2^T (rows x D, contiguous, cuBLAS), out = gm.
// Block per row (grid-stride over rows), threads over the columns.
template <typename T>
__global__ void __launch_bounds__(kThreads) rcr_factors_bwd_kernel(const T* __restrict__ m, const T* __restrict__ bias,
                                                                   const T* __restrict__ f_old, int64_t rows,
                                                                   int64_t D, T* __restrict__ out,
                                                                   const RcrGrad<T> rg) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t c = threadIdx.x; c < D; c += kThreads) rcr_bwd_store<T>(to_f(m[r * D + c]), r, c, D, bias, f_old, out, rg);
}

// The temperatures in rcr_wgmma_kernel<T, kRcrHidden>'s launch (its kRcrSmooth blocks; H2 0: none,
// as RcrSmooth<T>{} says): lam = relu(ws2 . tanh(A ws1^T + bs1) + bs2 + lam_old) per row of A, zero at rows at or
// past their query length, lam_old (M) or lam_scalar where null, lam (M). H2 <= kRcrSmoothBN.
template <typename T>
struct RcrSmooth {
  const T* ws1;       // (H2, K), or nullptr
  const T* bs1;       // (H2,)
  const T* ws2;       // (H2,)
  const T* bs2;       // (1,)
  const T* lam_old;   // (M,) or nullptr
  T* lam;             // (M,)
  int64_t H2;
  float lam_scalar;
};

template <typename T, int EPI>
__device__ __forceinline__ float rcr_epilogue(float acc, int64_t gr, int64_t gc, const T* __restrict__ bias,
                                              const T* __restrict__ f_old, const int* __restrict__ qlens, int64_t N,
                                              int64_t P, int64_t Lq) {
  if constexpr (EPI == kRcrHidden) {
    return tanhf(acc + to_f(bias[gc]));
  } else {
    const int64_t q = gr % Lq, p = (gr / Lq) % P;
    if (q >= (int64_t)qlens[p]) return 0.f;
    return clamp_unit(tanhf(acc + to_f(bias[gc])) + (f_old != nullptr ? to_f(f_old[gr * N + gc]) : 1.f));
  }
}

// Element (gr, gc) of an RCR GEMM's output from its accumulator, by the epilogue EPI (both kernels).
template <typename T, int EPI>
__device__ __forceinline__ void rcr_store(float acc, int64_t gr, int64_t gc, const T* __restrict__ bias,
                                          const T* __restrict__ f_old, const int* __restrict__ qlens, int64_t N,
                                          int64_t P, int64_t Lq, T* __restrict__ out, const RcrGrad<T>& rg) {
  if constexpr (EPI == kRcrFactorsBwd)
    rcr_bwd_store<T>(acc, gr, gc, N, bias, f_old, out, rg);
  else
    out[gr * N + gc] = from_f<T>(rcr_epilogue<T, EPI>(acc, gr, gc, bias, f_old, qlens, N, P, Lq));
}

template <typename T, int EPI>
__global__ void __launch_bounds__(kThreads, 1) rcr_gemm_kernel(const T* __restrict__ A, const T* __restrict__ B,
                                                            const T* __restrict__ bias, const T* __restrict__ f_old,
                                                            const int* __restrict__ qlens, int64_t M, int64_t N,
                                                            int64_t K, int64_t P, int64_t Lq, T* __restrict__ out,
                                                            const RcrSmooth<T> sm, const RcrGrad<T> rg) {
  static_assert(!std::is_same<T, float>::value, "fp32 runs cuBLAS and rcr_factors_kernel");
  static_assert(EPI == kRcrHidden || EPI == kRcrFactors || EPI == kRcrFactorsBwd,
                "an epilogue of the list (kRcrSmooth: rcr_wgmma_kernel)");
  static_assert(kWarps == 8 && kRcrBM == 2 * 64 && kRcrBN == 4 * 64, "8 warps of 64 x 64");
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  const int ldo = ld_op((int)sizeof(T));
  T* as = reinterpret_cast<T*>(smem);
  T* bs = as + kRcrBM * ldo;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t nb = (N + kRcrBN - 1) / kRcrBN;
  const int64_t m0 = ((int64_t)blockIdx.x / nb) * kRcrBM, n0 = ((int64_t)blockIdx.x % nb) * kRcrBN;
  const int wr = (warp >> 2) * 64, wc = (warp & 3) * 64;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kBD) {
    load_weight_chunk<T, kRcrBM>(A, M, K, m0, k0, as, ldo);
    load_weight_chunk<T, kRcrBN>(B, N, K, n0, k0, bs, ldo);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBD; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(bf[j], bs + (wc + 16 * j) * ldo + kk, ldo);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
        wmma::load_matrix_sync(af, as + (wr + 16 * i) * ldo + kk, ldo);
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], af, bf[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  // epilogue: the warp's row tile i (16 x 64 fp32) through its own slice of shared memory (the
  // K loop's last barrier freed as and bs; warp barriers around each use), lanes along the columns
  float* ep = reinterpret_cast<float*>(smem) + warp * 16 * kRcrEpiLd;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::store_matrix_sync(ep + 16 * j, acc[i][j], kRcrEpiLd, wmma::mem_row_major);
    __syncwarp();   // the slice is this warp's alone
    for (int idx = lane; idx < 16 * 64; idx += 32) {
      const int r = idx >> 6, c = idx & 63;
      const int64_t gr = m0 + wr + 16 * i + r, gc = n0 + wc + c;
      if (gr >= M || gc >= N) continue;
      rcr_store<T, EPI>(ep[r * kRcrEpiLd + c], gr, gc, bias, f_old, qlens, N, P, Lq, out, rg);
    }
    __syncwarp();
  }
}

// rcr_wgmma_kernel: rcr_gemm_kernel's product and epilogues (same arguments, grid and 128 x 256
// blocks) on Hopper's wgmma (sm_90a; wgmma.cuh). Warpgroup g (warps 4g..4g+3) computes rows
// 64 g..64 g+63 and all 256 columns of the block: one m64n256k16 per 16 of K, A and B read by the
// instruction from shared memory, fp32 accumulators in 128 registers a thread. K is staged
// kRcrWgBK = 64 columns at a time into one of two buffers (plan.h rcr_wgmma_offset: 8 x 8 core
// matrices), the next chunk's loads running while the wgmma of this one does (each buffer is
// rewritten only after the barrier that follows every warpgroup's wait for the wgmma reading it).
// A unit of 8 elements (16 bytes) of a row is one load where A and B are 16-byte aligned and K is
// a multiple of 8 (a thread's 12 loads issued before its stores), else eight (zeros past M, N and
// K). The epilogue goes from the registers to out.
// Compiled for any other target (sm_80, plain sm_90) the kernel traps: the launcher runs it only
// where it was built for sm_90a (rcr.cu).
// One block of rcr_wgmma_kernel: rows m0 .. m0 + 127, columns n0 .. n0 + BN - 1 of out (BN 256;
// kRcrSmooth: 128, n0 = 0, N <= 128: a row's whole sum in its warpgroup; out, f_old: lam, lam_old).
template <typename T, int EPI>
__device__ __forceinline__ void rcr_wgmma_block(const T* __restrict__ A, const T* __restrict__ B,
                                                const T* __restrict__ bias, const T* __restrict__ f_old,
                                                const int* __restrict__ qlens, int64_t M, int64_t N, int64_t K,
                                                int64_t P, int64_t Lq, T* __restrict__ out, const RcrSmooth<T>& sm,
                                                const RcrGrad<T>& rg, int64_t m0, int64_t n0, unsigned char* smem) {
  constexpr int BN = EPI == kRcrSmooth ? kRcrSmoothBN : kRcrBN;
  const int tid = threadIdx.x, g = tid >> 7;
  const int64_t stage = rcr_wgmma_stage((int)sizeof(T));
  const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(A) % 16 == 0 && reinterpret_cast<uintptr_t>(B) % 16 == 0;

  // chunk k0 of A's block rows and B's into buffer b: unit u (8 elements of one row) at byte 16 u
  // of its tile (core_unit_row / core_unit_col: rcr_wgmma_offset's order).
  // vec: all of a thread's 16-byte loads issued before its stores (kPer in flight, zeros past M,
  // N and K); else element by element.
  constexpr int kUnitsA = kRcrBM * kRcrWgBK / 8, kUnits = (kRcrBM + BN) * kRcrWgBK / 8;
  constexpr int kPer = kUnits / kThreads;
  static_assert(kUnits % kThreads == 0, "whole units a thread");
  auto unit = [&](int u, int64_t k0, const T*& src, int64_t& gr, int64_t& gk, int64_t& rows) {
    const bool isa = u < kUnitsA;
    const int v = isa ? u : u - kUnitsA;
    gr = (isa ? m0 : n0) + core_unit_row<kRcrWgBK>(v);
    gk = k0 + core_unit_col<kRcrWgBK>(v);
    rows = isa ? M : N;
    src = (isa ? A : B) + gr * K + gk;
  };
  auto load_chunk = [&](int64_t k0, int b) {
    unsigned char* buf = smem + b * stage;   // A's units, then B's: unit u at byte 16 u
    if (vec) {
      uint4 r[kPer];
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const T* src;
        int64_t gr, gk, rows;
        unit(tid + j * kThreads, k0, src, gr, gk, rows);
        r[j] = gr < rows && gk < K ? *reinterpret_cast<const uint4*>(src) : uint4{0u, 0u, 0u, 0u};
      }
#pragma unroll
      for (int j = 0; j < kPer; ++j) *reinterpret_cast<uint4*>(buf + 16 * (tid + j * kThreads)) = r[j];
    } else {
      for (int u = tid; u < kUnits; u += kThreads) {
        const T* src;
        int64_t gr, gk, rows;
        unit(u, k0, src, gr, gk, rows);
        T v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (gr < rows && gk + e < K) ? src[e] : from_f<T>(0.f);
        store8(reinterpret_cast<T*>(buf + 16 * u), v);
      }
    }
    wg::proxy_fence();   // these generic-proxy stores, visible to wgmma after the next barrier
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  const int64_t chunks = (K + kRcrWgBK - 1) / kRcrWgBK;
  if (chunks > 0) load_chunk(0, 0);
  __syncthreads();
  for (int64_t c = 0; c < chunks; ++c) {
    const unsigned char* buf = smem + (c & 1) * stage;
    const unsigned char* as = buf + g * 64 * kRcrWgBK * (int)sizeof(T);   // the warpgroup's 64 rows
    const unsigned char* bs = buf + kRcrBM * kRcrWgBK * (int)sizeof(T);
    wg::fence_acc(acc);   // no access of the accumulators moved past the fence (as CUTLASS)
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < kRcrWgBK; kk += 16) {
      // lbo: the next 8 of K (the next core matrix of the row group); sbo: the next 8 rows
      wg::mma_m64k16<T, BN>(acc, wg::desc(as + rcr_wgmma_offset(0, kk), 128, kRcrWgBK * 16),
                            wg::desc(bs + rcr_wgmma_offset(0, kk), 128, kRcrWgBK * 16));
    }
    wg::commit();
    if (c + 1 < chunks) load_chunk((c + 1) * kRcrWgBK, (c + 1) & 1);
    wg::wait0();
    wg::fence_acc(acc);
    __syncthreads();   // every warpgroup done with buffer c & 1 and the next chunk stored
  }

  const int t = tid & 127;
  if constexpr (EPI == kRcrSmooth) {
    // lam of rows m0 + 64 g + acc_row(t, 2 h): register 4 m + 2 h + j holds column 8 m + 2 (t % 4) + j
    // (acc_row / acc_col), a row's columns in the 4 lanes t % 4 (zero past N: B's rows there are)
    float part[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
      const int64_t gc = wg::acc_col(t, i);
      if (gc < N) part[(i >> 1) & 1] = fmaf(tanhf(acc[i] + to_f(bias[gc])), to_f(sm.ws2[gc]), part[(i >> 1) & 1]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {   // every lane: the 4 lanes of a row, t % 4
      part[h] += __shfl_xor_sync(0xffffffffu, part[h], 1);
      part[h] += __shfl_xor_sync(0xffffffffu, part[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t gr = m0 + 64 * g + wg::acc_row(t, 2 * h);
      if ((t & 3) != 0 || gr >= M) continue;
      const int64_t q = gr % Lq, p = (gr / Lq) % P;
      float v = 0.f;
      if (q < (int64_t)clamp_len(qlens[p], Lq)) {
        v = part[h] + to_f(sm.bs2[0]) + (f_old != nullptr ? to_f(f_old[gr]) : sm.lam_scalar);
        v = v < 0.f ? 0.f : v;   // relu that keeps a NaN (fmaxf would drop it), as torch's
      }
      out[gr] = from_f<T>(v);
    }
  } else {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
      const int64_t gr = m0 + 64 * g + wg::acc_row(t, i), gc = n0 + wg::acc_col(t, i);
      if (gr >= M || gc >= N) continue;
      rcr_store<T, EPI>(acc[i], gr, gc, bias, f_old, qlens, N, P, Lq, out, rg);
    }
  }
}

// Hidden (kRcrHidden) launches with sm.H2 > 0 hold nb + 1 blocks a row block: the last one the
// temperatures (kRcrSmooth: B = ws1, beside the row block's other blocks, so A comes from L2).
template <typename T, int EPI>
__global__ void __launch_bounds__(kThreads, 1) rcr_wgmma_kernel(const T* __restrict__ A, const T* __restrict__ B,
                                                             const T* __restrict__ bias, const T* __restrict__ f_old,
                                                             const int* __restrict__ qlens, int64_t M, int64_t N,
                                                             int64_t K, int64_t P, int64_t Lq, T* __restrict__ out,
                                                             const RcrSmooth<T> sm, const RcrGrad<T> rg) {
  static_assert(!std::is_same<T, float>::value, "fp32 runs cuBLAS and rcr_factors_kernel");
  static_assert(EPI == kRcrHidden || EPI == kRcrFactors || EPI == kRcrFactorsBwd,
                "an epilogue of the list (kRcrSmooth: kRcrHidden's sm)");
  static_assert(kThreads == 2 * 128 && kRcrBM == 2 * 64 && kRcrBN == 256, "2 warpgroups of 64 x 256");
#if defined(RCAR_FAST_CUDA_EMU) || defined(RCAR_FAST_WGMMA_ON_DEVICE)
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t nb = (N + kRcrBN - 1) / kRcrBN, nbx = nb + (EPI == kRcrHidden && sm.H2 > 0 ? 1 : 0);
  const int64_t m0 = ((int64_t)blockIdx.x / nbx) * kRcrBM, cb = (int64_t)blockIdx.x % nbx;
  if constexpr (EPI == kRcrHidden) {
    if (cb == nb) {   // the row block's temperatures
      rcr_wgmma_block<T, kRcrSmooth>(A, sm.ws1, sm.bs1, sm.lam_old, qlens, M, sm.H2, K, P, Lq, sm.lam, sm, rg, m0,
                                     0, smem);
      return;
    }
  }
  rcr_wgmma_block<T, EPI>(A, B, bias, f_old, qlens, M, N, K, P, Lq, out, sm, rg, m0, cb * kRcrBN, smem);
#else
  __trap();   // built without sm_90a: never launched (rcr.cu)
#endif
}

// The new temperatures lam = relu(ws2 . tanh(hs) + bs2 + lam_old) of every row, summed in fp32 and
// rounded once; hs = E ws1^T + bs1 (rows x H2, contiguous: the host's GEMM), lam_old (rows) or
// nullptr (lam_scalar for every row). Zero at or past a row's query length, where neither hs nor
// lam_old is read. A warp per row (grid-stride over rows), lanes over the H2 columns.
template <typename T>
__global__ void __launch_bounds__(kThreads) rcr_smooth_kernel(const T* __restrict__ hs, const T* __restrict__ ws2,
                                                              const T* __restrict__ bs2, const T* __restrict__ lam_old,
                                                              float lam_scalar, const int* __restrict__ qlens,
                                                              int64_t rows, int64_t P, int64_t Lq, int64_t H2,
                                                              T* __restrict__ lam) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = (int64_t)gridDim.x * kWarps;
  for (int64_t r = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5); r < rows; r += stride) {
    const int64_t q = r % Lq, p = (r / Lq) % P;
    if (q >= (int64_t)clamp_len(qlens[p], Lq)) {
      if (lane == 0) lam[r] = from_f<T>(0.f);
      continue;
    }
    float acc = 0.f;
    for (int64_t j = lane; j < H2; j += 32) acc = fmaf(tanhf(to_f(hs[r * H2 + j])), to_f(ws2[j]), acc);
    acc = warp_sum(acc);
    if (lane == 0) {
      const float old = lam_old != nullptr ? to_f(lam_old[r]) : lam_scalar;
      const float v = acc + to_f(bs2[0]) + old;
      lam[r] = from_f<T>(v < 0.f ? 0.f : v);   // relu that keeps a NaN (fmaxf would drop it), as torch's
    }
  }
}

}  // namespace cuda
}  // namespace rcar_fast
