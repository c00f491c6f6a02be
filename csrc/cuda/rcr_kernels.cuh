// The kernels of the rcr op's CUDA implementation (rcr.cu): RCR's d-wide element-wise chain over
// the output of its second GEMM, and the temperatures over the smooth MLP's first (csrc/README.md, `rcr`).
#pragma once

#include "common.cuh"

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
