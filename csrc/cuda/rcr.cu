// CUDA implementation of rcar_fast::rcr (csrc/README.md): one RCR step for inference.
//
// fp16 / bf16: RCR's two d-wide GEMMs on tensor cores with their element-wise chain in the epilogue
//   hidden = tanh(E W1^T + b1)               rcr_gemm_kernel<T, kRcrHidden>
//   F      = clamp(tanh(hidden W2^T + b2) + F_old, -1, 1)
//                                            rcr_gemm_kernel<T, kRcrFactors>: the product never
//                                            stored, F_old read once, F written once
//   (rcr_wgmma_kernel, the same on Hopper's wgmma, in their place where launch.h use_wgmma says:
//   an H100/H200 and a build for sm_90a)
// fp32:
//   hidden = tanh(E W1^T + b1)               cuBLAS (at::addmm), tanh in place
//   M      = hidden W2^T + b2                cuBLAS, into the new F's buffer
//   F      = clamp(tanh(M) + F_old, -1, 1)   rcr_factors_kernel, in place over M: one read of M and
//                                            of F_old, one write (torch's tanh_, add_, clamp_: three
//                                            passes over the d-wide rows)
// both:
//   hs     = E ws1^T + bs1                   cuBLAS
//   lam    = relu(ws2 tanh(hs) + bs2 + lam_old)   rcr_smooth_kernel: a warp per row, fp32, one rounding
//                                            (was tanh_, a GEMV, add, relu and a mask in ATen)
//   (fp16/bf16 with wgmma and s / 2 <= 128: in their place one more block a row block of the
//   hidden layer's rcr_wgmma_kernel launch, its kRcrSmooth epilogue: lam from the accumulators of
//   E ws1^T, hs never stored)
//
// rcr_factors_bwd (training: the d-wide chain of rcar_fast.torch_math.rcr_step_recomputed's
// backward, every row): fp16/bf16 one launch, the kRcrFactorsBwd epilogue of rcr_wgmma_kernel (with
// wgmma) or rcr_gemm_kernel: M = hidden W2^T on the tensor cores, never stored, F_old and the
// gradient read once, gm and dF written once; fp32 cuBLAS hidden W2^T, then rcr_factors_bwd_kernel.
//
// F_old is all ones where factors is None. Rows at or past a pair's query length are zero in F
// and lam whatever E, factors and lam hold there (selection: the kernel never reads F_old there).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "checks.h"
#include "launch.h"
#include "rcr_kernels.cuh"

namespace rcar_fast {
namespace cuda {

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Grid of the RCR GEMM kernels: 128 x 256 blocks of a (rows, n) output and `extra` more a row block.
unsigned rcr_blocks(int64_t rows, int64_t n, int64_t extra, const char* op) {
  const int64_t nblocks = (rows + kRcrBM - 1) / kRcrBM * ((n + kRcrBN - 1) / kRcrBN + extra);
  TORCH_CHECK(nblocks < (int64_t(1) << 31), op, ": ", rows, " rows are more than one launch of the CUDA RCR GEMM "
              "takes (2^31 blocks of 128 x 256); split the call");
  return static_cast<unsigned>(nblocks);
}

std::tuple<Tensor, Tensor> rcr_cuda(const Tensor& E, const Tensor& qlens, const OptTensor& factors,
                                    const OptTensor& lam, double lam_scalar, const Tensor& w1, const Tensor& b1,
                                    const Tensor& w2, const Tensor& b2, const Tensor& ws1, const Tensor& bs1,
                                    const Tensor& ws2, const Tensor& bs2) {
  rcar_fast::check_rcr(E, qlens, factors, lam, w1, b1, w2, b2, ws1, bs1, ws2, bs2);
  check_cuda_dtype(E, "E");
  c10::cuda::CUDAGuard guard(E.device());
  const int64_t B = E.size(0), P = E.size(1), Lq = E.size(2), S = E.size(3), D = w2.size(0);
  const int64_t rows = B * P * Lq;
  const Tensor x = E.reshape({rows, S});
  const bool fused = E.scalar_type() != at::kFloat;   // fp16 / bf16: rcr_gemm_kernel
  const int64_t H1 = w1.size(0);
  Tensor F = fused ? at::empty({rows, D}, E.options())
                   : at::addmm(b2, at::addmm(b1, x, w1.t()).tanh_(), w2.t());   // (rows, D), contiguous
  Tensor lam_new = at::empty({B, P, Lq}, E.options());
  if (rows > 0) {
    const Tensor ql = qlens.contiguous();
    cudaStream_t stream = current_stream();
    const Tensor ws2c = ws2.contiguous(), bs2c = bs2.contiguous();
    const Tensor lam_old = lam ? lam->reshape({rows}).contiguous() : Tensor();
    const int64_t H2 = ws1.size(0);
    // the temperatures in rcr_wgmma_kernel's kRcrSmooth epilogue (fp16/bf16 with wgmma, s / 2 <=
    // 128), else cuBLAS hs = E ws1^T + bs1 and rcr_smooth_kernel
    const bool wgmma = fused && use_wgmma();
    const bool smooth_wg = wgmma && H2 > 0 && H2 <= kRcrSmoothBN;   // (H2 0: the kernel's "none")
    const Tensor f_old = factors ? factors->reshape({rows, D}).contiguous() : Tensor();
    dispatch_float(E.scalar_type(), "E", [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      if constexpr (!std::is_same<T, float>::value) {
        const Tensor xc = x.contiguous(), w1c = w1.contiguous(), b1c = b1.contiguous();
        const Tensor w2c = w2.contiguous(), b2c = b2.contiguous();
        Tensor hidden = at::empty({rows, H1}, E.options());
        // rcr_wgmma_kernel where the device and the build have wgmma, else rcr_gemm_kernel: the
        // same arguments, grid and results (up to the order of the fp32 sums)
        auto hidden_k = wgmma ? rcr_wgmma_kernel<T, kRcrHidden> : rcr_gemm_kernel<T, kRcrHidden>;
        auto factors_k = wgmma ? rcr_wgmma_kernel<T, kRcrFactors> : rcr_gemm_kernel<T, kRcrFactors>;
        const int64_t smem = wgmma ? rcr_wgmma_smem((int)sizeof(T)) : rcr_gemm_smem((int)sizeof(T));
        if (H1 > 0 || smooth_wg) prepare_smem(hidden_k, smem, "rcr (hidden layer GEMM)");
        if (D > 0) prepare_smem(factors_k, smem, "rcr (factors GEMM)");
        auto blocks = [&](int64_t n, int64_t extra) { return rcr_blocks(rows, n, extra, "rcr"); };
        // the temperatures in the hidden layer's launch (one more block a row block; E from L2)
        const Tensor ws1c = ws1.contiguous(), bs1c = bs1.contiguous();
        RcrSmooth<T> sm{};
        if (smooth_wg)
          sm = RcrSmooth<T>{ptr<T>(ws1c), ptr<T>(bs1c), ptr<T>(ws2c), ptr<T>(bs2c),
                            lam_old.defined() ? ptr<T>(lam_old) : nullptr, mut_ptr<T>(lam_new), H2,
                            static_cast<float>(lam_scalar)};
        if (H1 > 0 || smooth_wg) {
          hidden_k<<<blocks(H1, smooth_wg ? 1 : 0), kThreads, smem, stream>>>(
              ptr<T>(xc), ptr<T>(w1c), ptr<T>(b1c), nullptr, ql.data_ptr<int>(), rows, H1, S, P, Lq, mut_ptr<T>(hidden),
              sm, RcrGrad<T>{});
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (D > 0) {
          factors_k<<<blocks(D, 0), kThreads, smem, stream>>>(ptr<T>(hidden), ptr<T>(w2c), ptr<T>(b2c),
                                                              f_old.defined() ? ptr<T>(f_old) : nullptr,
                                                              ql.data_ptr<int>(), rows, D, H1, P, Lq, mut_ptr<T>(F),
                                                              RcrSmooth<T>{}, RcrGrad<T>{});
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      } else if (F.numel() > 0) {
        const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, int64_t(1) << 20));
        rcr_factors_kernel<T><<<grid, kThreads, 0, stream>>>(mut_ptr<T>(F), f_old.defined() ? ptr<T>(f_old) : nullptr,
                                                             ql.data_ptr<int>(), rows, P, Lq, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (!smooth_wg) {
        const Tensor hs = at::addmm(bs1, x, ws1.t());   // (rows, s/2), contiguous
        const unsigned sgrid = static_cast<unsigned>(std::min<int64_t>((rows + kWarps - 1) / kWarps, int64_t(1) << 20));
        rcr_smooth_kernel<T><<<sgrid, kThreads, 0, stream>>>(
            ptr<T>(hs), ptr<T>(ws2c), ptr<T>(bs2c), lam_old.defined() ? ptr<T>(lam_old) : nullptr,
            static_cast<float>(lam_scalar), ql.data_ptr<int>(), rows, P, Lq, H2, mut_ptr<T>(lam_new));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return std::make_tuple(F.view({B, P, Lq, D}), lam_new);
}

Tensor rcr_factors_bwd_cuda(const Tensor& hidden, const Tensor& w2, const Tensor& b2, const OptTensor& factors,
                            const Tensor& grad, const OptTensor& dfactors) {
  rcar_fast::check_rcr_factors_bwd(hidden, w2, b2, factors, grad, dfactors);
  check_cuda_dtype(hidden, "hidden");
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t N = hidden.size(0), H1 = hidden.size(1), D = w2.size(0);
  Tensor gm = at::empty({N, D}, hidden.options());
  if (gm.numel() == 0) return gm;
  // dF straight into dfactors where its rows are contiguous, else through a buffer
  const bool direct = dfactors && dfactors->is_contiguous();
  Tensor df = !dfactors ? Tensor() : (direct ? *dfactors : at::empty({N, D}, hidden.options()));
  const Tensor f_old = factors ? factors->contiguous() : Tensor();
  const Tensor g = grad.contiguous(), b2c = b2.contiguous();
  cudaStream_t stream = current_stream();
  dispatch_float(hidden.scalar_type(), "hidden", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const RcrGrad<T> rg{ptr<T>(g), df.defined() ? mut_ptr<T>(df) : nullptr};
    const T* fo = f_old.defined() ? ptr<T>(f_old) : nullptr;
    if constexpr (!std::is_same<T, float>::value) {
      const Tensor hc = hidden.contiguous(), w2c = w2.contiguous();
      const bool wgmma = use_wgmma();
      auto k = wgmma ? rcr_wgmma_kernel<T, kRcrFactorsBwd> : rcr_gemm_kernel<T, kRcrFactorsBwd>;
      const int64_t smem = wgmma ? rcr_wgmma_smem((int)sizeof(T)) : rcr_gemm_smem((int)sizeof(T));
      prepare_smem(k, smem, "rcr_factors_bwd (GEMM)");
      k<<<rcr_blocks(N, D, 0, "rcr_factors_bwd"), kThreads, smem, stream>>>(
          ptr<T>(hc), ptr<T>(w2c), ptr<T>(b2c), fo, nullptr, N, D, H1, 1, 1, mut_ptr<T>(gm), RcrSmooth<T>{}, rg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const Tensor m = at::mm(hidden, w2.t());   // (N, D), contiguous; TF32 as torch's matmul setting says
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(N, int64_t(1) << 20));
      rcr_factors_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(ptr<T>(m), ptr<T>(b2c), fo, N, D, mut_ptr<T>(gm), rg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (dfactors && !direct) dfactors->copy_(df);
  return gm;
}

}  // namespace
}  // namespace cuda
}  // namespace rcar_fast

TORCH_LIBRARY_IMPL(rcar_fast, CUDA, m) {
  m.impl("rcr", &rcar_fast::cuda::rcr_cuda);
  m.impl("rcr_factors_bwd", &rcar_fast::cuda::rcr_factors_bwd_cuda);
}
