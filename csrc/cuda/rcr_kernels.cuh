// The kernel of the rcr op's CUDA implementation (rcr.cu): RCR's d-wide element-wise chain over
// the output of its second GEMM (csrc/README.md, `rcr`).
#pragma once

#include "common.cuh"

namespace rcar_fast {
namespace cuda {

// F = clamp(tanh(M) + F_old, -1, 1) over M (rows x D, contiguous) in place; f_old likewise or
// nullptr (all ones). Row r is position r % Lq of query item (r / Lq) % P: zero at or past its length.
// Block per row (grid-stride over rows), threads over the columns.
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
      if (valid) v = fminf(fmaxf(tanhf(to_f(mr[c])) + (fr != nullptr ? to_f(fr[c]) : 1.f), -1.f), 1.f);
      mr[c] = from_f<T>(v);
    }
  }
}

}  // namespace cuda
}  // namespace rcar_fast
