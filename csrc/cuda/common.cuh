// Device helpers shared by the rcar_fast CUDA kernels: element types, conversions, reductions,
// and the block GEMM used for the shared-weight products (the alignment projection
// (Q - A)^2 W^T and RAR's E Wk^T): tensor cores (nvcuda::wmma, fp32 accumulators, lowers to HMMA)
// for fp16/bf16, exact fp32 FMAs for fp32.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "plan.h"

namespace rcar_fast {
namespace cuda {

using namespace cuda_plan;

constexpr float kEps = 1e-8f;

// The index arithmetic below assumes these (idx >> 5 / idx & 31 split a chunk row; GemmF32's
// 64 x 4 thread grid and GemmTC's 8 warps x 2 column tiles cover kNG = 256 columns).
static_assert(kBD == 32, "chunk loops split idx into (idx >> 5, idx & 31)");
static_assert(kThreads == 256 && kNG == 256, "block GEMM thread layouts cover 256 columns with 256 threads");

// ---------------------------------------------------------------- conversions (T: float, __half, __nv_bfloat16)
template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The 16 bits of a 16-bit value (fp16 / bf16), for packing.
__device__ __forceinline__ uint32_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// 8 values of a 16-bit type as one 16-byte store (dst 16-byte aligned): a core-matrix row of a
// wgmma operand (plan.h wg_core_offset), written by one thread so that the 8 threads of a
// quarter-warp write 128 contiguous bytes.
template <typename T>
__device__ __forceinline__ void store8(T* dst, const T (&v)[8]) {
  static_assert(sizeof(T) == 2, "16-bit types");
  uint4 u;
  u.x = bits16(v[0]) | (bits16(v[1]) << 16);
  u.y = bits16(v[2]) | (bits16(v[3]) << 16);
  u.z = bits16(v[4]) | (bits16(v[5]) << 16);
  u.w = bits16(v[6]) | (bits16(v[7]) << 16);
  *reinterpret_cast<uint4*>(dst) = u;
}

// Unit u (8 elements) of a BK-column chunk tile stored as core matrices (plan.h wg_core_offset):
// row 8 (u / BK) + u % 8, columns 8 ((u / 8) % (BK / 8)) ..; it sits at element 8 u of the tile.
template <int BK = kBD>
__device__ __forceinline__ int core_unit_row(int u) {
  static_assert(BK % 8 == 0, "whole core matrices");
  return (int)((unsigned)u / BK) * 8 + (u & 7);   // unsigned: shifts for a power-of-two BK
}
template <int BK = kBD>
__device__ __forceinline__ int core_unit_col(int u) { return (int)(((unsigned)u >> 3) % (BK / 8)) * 8; }

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum of v over the block (every thread gets it); red: >= kWarps floats of shared memory.
// Starts and ends with a barrier, so red can be reused right away.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += red[w];
  __syncthreads();
  return t;
}

__device__ __forceinline__ int clamp_len(int n, int64_t hi) {
  return n < 0 ? 0 : (n > hi ? (int)hi : n);
}

// ---------------------------------------------------------------- shared-weight chunks and rows
// ws[n][k] = W[n0 + n][k0 + k] for n < ROWS, k < kBD (row stride ldo; CORE, 16-bit types: as the
// core matrices a wgmma descriptor reads, plan.h wg_core_offset, 8 elements of a row a thread in
// one 16-byte store), zero past N rows or K columns: a kBD-column chunk of ROWS rows of a
// row-major N x K operand (the block GEMM's B operand by default: kNG rows of a weight). No barrier.
template <typename T, int ROWS = kNG, bool CORE = false>
__device__ __forceinline__ void load_weight_chunk(const T* __restrict__ w, int64_t N, int64_t K, int64_t n0,
                                                  int64_t k0, T* ws, int ldo) {
  if constexpr (CORE) {
    for (int u = threadIdx.x; u < ROWS * kBD / 8; u += kThreads) {
      const int64_t gn = n0 + core_unit_row(u), gk = k0 + core_unit_col(u);
      T v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = (gn < N && gk + e < K) ? w[gn * K + gk + e] : from_f<T>(0.f);
      store8(ws + 8 * u, v);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * kBD; idx += kThreads) {
      const int n = idx >> 5, k = idx & 31;
      const int64_t gn = n0 + n, gk = k0 + k;
      ws[n * ldo + k] = (gn < N && gk < K) ? w[gn * K + gk] : from_f<T>(0.f);
    }
  }
}

// One warp: orow[n] = l2n(yr + bias)[n] for n < S (eps added to the norm), the alignment vector
// of one row from its fp32 projection yr.
template <typename T>
__device__ __forceinline__ void store_l2n_bias_row(const float* yr, const T* __restrict__ bias, int64_t S, T* orow) {
  const int lane = threadIdx.x & 31;
  float ss = 0.f;
  for (int64_t n = lane; n < S; n += 32) {
    const float v = yr[n] + to_f(bias[n]);
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  const float rn = 1.f / (sqrtf(ss) + kEps);
  for (int64_t n = lane; n < S; n += 32) orow[n] = from_f<T>((yr[n] + to_f(bias[n])) * rn);
}

// ---------------------------------------------------------------- block GEMM
// Y[r, n] (+)= sum_k A[r, k] B[n, k] for r < 16 MT rows and n < kNG = 256 columns, fed one
// kBD = 32 wide k-chunk at a time from shared memory: A row-major (A + r * lda + k),
// B as [n][k] (B + n * ldb + k). Accumulators stay in registers across chunks.

// fp32: thread (ty = tid / 64, tx = tid % 64) owns rows ty + 4 i (i < 4 MT), columns tx + 64 j (j < 4).
template <int MT>
struct GemmF32 {
  float acc[4 * MT][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4 * MT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void chunk(const float* A, int lda, const float* B, int ldb) {
    const int tx = threadIdx.x & 63, ty = threadIdx.x >> 6;
#pragma unroll 4
    for (int k = 0; k < kBD; ++k) {
      float bv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = B[(tx + 64 * j) * ldb + k];
#pragma unroll
      for (int i = 0; i < 4 * MT; ++i) {
        const float av = A[(ty + 4 * i) * lda + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av, bv[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(float* Y, int ldy) const {
    const int tx = threadIdx.x & 63, ty = threadIdx.x >> 6;
#pragma unroll
    for (int i = 0; i < 4 * MT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Y[(ty + 4 * i) * ldy + tx + 64 * j] = acc[i][j];
  }
};

// fp16 / bf16: warp w owns the 16 x 16 tiles of columns 16 w and 16 (w + 8), all MT row tiles.
template <typename T, int MT>
struct GemmTC {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[MT][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  __device__ __forceinline__ void chunk(const T* A, int lda, const T* B, int ldb) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int kk = 0; kk < kBD; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], B + (warp + 8 * j) * 16 * ldb + kk, ldb);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
        wmma::load_matrix_sync(af, A + i * 16 * lda + kk, lda);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af, bf[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void store(float* Y, int ldy) const {
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(Y + i * 16 * ldy + (warp + 8 * j) * 16, acc[i][j], ldy,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <typename T, int MT>
using BlockGemm = std::conditional_t<std::is_same<T, float>::value, GemmF32<MT>, GemmTC<T, MT>>;

}  // namespace cuda
}  // namespace rcar_fast
