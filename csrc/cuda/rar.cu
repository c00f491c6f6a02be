// CUDA implementation of rcar_fast::rar and rcar_fast::rar_bwd (csrc/README.md).
//
// rar: per step, the gates' pre-activations h Wq^T + bq of every pair as one GEMM in E's dtype (cuBLAS,
// its output rounded as torch's Linear rounds it; h starts as the mean of E over the valid rows,
// rar_mean_kernel), then rar_fwd_kernel with GP pairs of one context item per block (plan.h
// choose_rar_plan; on an sm_90a build and device, where more than 64 rows fill a block,
// rar_fwd_wg_kernel: 128 rows, the keys on wgmma, plan.h choose_rar_wg_plan): the gates' tanh, keep_g and wv in fp32 as it stages them, E in shared memory (input
// dtype), K = tanh(E Wk^T + bk) by the block GEMM (tensor cores for fp16/bf16, fp32 FMAs for fp32) over all
// the block's rows; h in E's dtype between steps (as the torch and triton backends keep it), so T steps in
// one call equal T calls of one step.
// rar_bwd (one step): rar_bwd_kernel recomputes the step per pair and writes dKp, dgp, dwv and
// dE's direct part a[q] du; the shared-weight products run in cuBLAS in fp32 on the host side:
// dE += dKp Wk, dh = dgp Wq.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/addmv.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "launch.h"
#include "rar_kernels.cuh"

namespace rcar_fast {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

struct RarInputs {
  Tensor E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g;
  bool has_h = false, has_drop = false;
  int64_t B = 0, P = 0, Lq = 0, S = 0, steps = 0;
};

RarInputs prepare(const Tensor& E, const Tensor& qlens, const OptTensor& h, const Tensor& wq, const Tensor& bq,
                  const Tensor& wk, const Tensor& bk, const Tensor& wv, const Tensor& bv, const OptTensor& keep_k,
                  const OptTensor& keep_g) {
  RarInputs in;
  in.E = E.contiguous();
  in.qlens = qlens.contiguous();
  in.has_h = h.has_value();
  if (in.has_h) in.h = h->contiguous();
  in.wq = wq.contiguous();
  in.bq = bq.contiguous();
  in.wk = wk.contiguous();
  in.bk = bk.contiguous();
  in.wv = wv.contiguous();
  in.bv = bv.contiguous();
  in.has_drop = keep_k.has_value();
  if (in.has_drop) {
    in.keep_k = keep_k->contiguous();
    in.keep_g = keep_g->contiguous();
  }
  in.B = E.size(0);
  in.P = E.size(1);
  in.Lq = E.size(2);
  in.S = E.size(3);
  in.steps = wq.size(0);
  return in;
}

template <typename T>
RarArgs<T> make_args(const RarInputs& in) {
  RarArgs<T> r{};
  r.E = ptr<T>(in.E);
  r.qlens = in.qlens.data_ptr<int>();
  r.h = in.has_h ? ptr<T>(in.h) : nullptr;
  r.wq = ptr<T>(in.wq);
  r.bq = ptr<T>(in.bq);
  r.wk = ptr<T>(in.wk);
  r.bk = ptr<T>(in.bk);
  r.wv = ptr<T>(in.wv);
  r.bv = ptr<T>(in.bv);
  r.keep_k = in.has_drop ? ptr<T>(in.keep_k) : nullptr;
  r.keep_g = in.has_drop ? ptr<T>(in.keep_g) : nullptr;
  r.P = in.P;
  r.Lq = in.Lq;
  r.S = in.S;
  return r;
}

// Row-group size (plan.h: the smallest covering Lq that fits the device).
int rar_mt(int elem, const RarInputs& in) { return choose_rar_mt(elem, in.Lq, in.S, smem_limit()); }

void check_pairs(int64_t pairs) {
  TORCH_CHECK(pairs <= 0x7fffffffLL, "rar: ", pairs, " pairs exceed one launch; split the pair grid");
}

// Shared-memory check and opt-in of the forward kernel the plan takes (once per call).
template <typename T>
void prepare_rar_fwd(int elem, const RarArgs<T>& r, const RarPlan& pl) {
  const int64_t smem = rar_step_layout(elem, pl.gp * pl.bq, r.S, pl.mt, pl.gp).total;
  switch (pl.mt) {
    case 1: prepare_smem(rar_fwd_kernel<T, 1>, smem, "rar"); break;
    case 2: prepare_smem(rar_fwd_kernel<T, 2>, smem, "rar"); break;
    case 3: prepare_smem(rar_fwd_kernel<T, 3>, smem, "rar"); break;
    default: prepare_smem(rar_fwd_kernel<T, 4>, smem, "rar"); break;
  }
}

// rar_fwd_wg_kernel's (sm_90a): T is fp16 or bf16 (choose_rar_wg_plan takes no other); an fp32
// instance is never launched
template <typename T>
void prepare_rar_fwd_wg(int elem, const RarArgs<T>& r, const RarPlan& pl) {
  if constexpr (!std::is_same<T, float>::value)
    prepare_smem(rar_fwd_wg_kernel<T>, rar_wg_layout(elem, pl.gp, r.S).total, "rar");
}

// score.w set: the step writes the scores, not h (h_out unused)
template <typename T>
void launch_rar_fwd_wg(const RarArgs<T>& r, const RarPlan& pl, int64_t blocks, int64_t t, const Tensor& pre,
                       Tensor& h_out, const RarScore& score, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    const int64_t smem = rar_wg_layout((int)sizeof(T), pl.gp, r.S).total;
    rar_fwd_wg_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        r, pl.bq, pl.gp, t, ptr<T>(pre), score.w != nullptr ? nullptr : mut_ptr<T>(h_out), score);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int MT>
void launch_rar_fwd(const RarArgs<T>& r, const RarPlan& pl, int64_t blocks, int64_t t, const Tensor& pre, Tensor& h_out,
                    cudaStream_t stream) {
  auto* kernel = rar_fwd_kernel<T, MT>;
  const int64_t smem = rar_step_layout((int)sizeof(T), pl.gp * pl.bq, r.S, MT, pl.gp).total;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(r, pl.bq, pl.gp, t, ptr<T>(pre),
                                                                   mut_ptr<T>(h_out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int MT>
void launch_rar_bwd(const RarArgs<T>& r, int64_t pairs, const Tensor& grad, Tensor& dE, Tensor& dKp, Tensor& dgp,
                    Tensor& dwv, cudaStream_t stream) {
  auto* kernel = rar_bwd_kernel<T, MT>;
  const int64_t smem = rar_layout((int)sizeof(T), r.Lq, r.S, MT).total;
  prepare_smem(kernel, smem, "rar_bwd");
  kernel<<<static_cast<unsigned>(pairs), kThreads, smem, stream>>>(
      r, ptr<T>(grad), dE.data_ptr<float>(), dKp.data_ptr<float>(), dgp.data_ptr<float>(), dwv.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The rar op's T steps (rar_cuda); with score_w (rar_scores_cuda) the scoring layer too: in the last
// step's launch where that is rar_fwd_wg_kernel (h never stored), else sigmoid(h . score_w +
// score_b) in ATen after it. Returns h (B, P, s), or the scores (B, P) float32 with score_w.
Tensor rar_run(const Tensor& E, const Tensor& qlens, const OptTensor& h0, const Tensor& wq, const Tensor& bq,
               const Tensor& wk, const Tensor& bk, const Tensor& wv, const Tensor& bv, const OptTensor& keep_k,
               const OptTensor& keep_g, const Tensor* score_w, const Tensor* score_b) {
  const RarInputs in = prepare(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g);
  const int64_t pairs = in.B * in.P;
  Tensor scores;
  if (score_w != nullptr) scores = at::empty({in.B, in.P}, E.options().dtype(at::kFloat));
  if (pairs * in.S == 0) {
    if (score_w == nullptr) return at::empty({in.B, in.P, in.S}, E.options());
    // s = 0: h is empty, each score the sigmoid of the bias alone
    return pairs == 0 ? scores : at::sigmoid(score_b->expand({in.B, in.P})).contiguous();
  }
  check_pairs(pairs);
  // h: (pairs, s) in E's dtype; the start is the mean of E over each pair's valid rows (rar_mean_kernel)
  Tensor h;
  bool scored = false;   // the last step's launch wrote the scores
  if (in.has_h) h = in.h.view({pairs, in.S});
  cudaStream_t stream = current_stream();
  dispatch_float(E.scalar_type(), "E", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const RarArgs<T> r = make_args<T>(in);
    // the 128-row wgmma kernel where the device and the build have it and the plan takes the shapes
    const RarPlan wp = choose_rar_wg_plan((int)sizeof(T), in.Lq, in.S, in.P, smem_limit());
    const bool wg = wp.gp > 0 && use_wgmma();
    const RarPlan pl = wg ? wp : choose_rar_plan((int)sizeof(T), in.Lq, in.S, in.P, smem_limit());
    TORCH_CHECK(pl.gp > 0, "rar: these shapes need ", rar_step_layout((int)sizeof(T), pl.bq, in.S, 1, 1).total,
                " bytes of shared memory per block, the device allows ", smem_limit(),
                " (E of a pair stays on chip: it grows with the query length and s)");
    const int64_t blocks = in.B * ((in.P + pl.gp - 1) / pl.gp);
    if (!in.has_h) {
      h = at::empty({pairs, in.S}, E.options());
      rar_mean_kernel<T><<<static_cast<unsigned>(pairs), kThreads, 0, stream>>>(r.E, r.qlens, in.P, in.Lq, in.S,
                                                                              mut_ptr<T>(h));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (wg)
      prepare_rar_fwd_wg((int)sizeof(T), r, pl);
    else
      prepare_rar_fwd((int)sizeof(T), r, pl);
    for (int64_t t = 0; t < in.steps; ++t) {
      // the gates' pre-activations of every pair, one GEMM in E's dtype: pre = h Wq_t^T + bq_t
      const Tensor pre = at::addmm(in.bq.select(0, t), h, in.wq.select(0, t).t());
      if (wg) {
        scored = score_w != nullptr && t == in.steps - 1;
        const RarScore sc{scored ? score_w->data_ptr<float>() : nullptr, scored ? score_b->data_ptr<float>() : nullptr,
                          scored ? scores.data_ptr<float>() : nullptr};
        Tensor h_next = scored ? Tensor() : at::empty({pairs, in.S}, E.options());
        launch_rar_fwd_wg<T>(r, pl, blocks, t, pre, h_next, sc, stream);
        h = h_next;
        continue;
      }
      Tensor h_next = at::empty({pairs, in.S}, E.options());
      switch (pl.mt) {
        case 1: launch_rar_fwd<T, 1>(r, pl, blocks, t, pre, h_next, stream); break;
        case 2: launch_rar_fwd<T, 2>(r, pl, blocks, t, pre, h_next, stream); break;
        case 3: launch_rar_fwd<T, 3>(r, pl, blocks, t, pre, h_next, stream); break;
        default: launch_rar_fwd<T, 4>(r, pl, blocks, t, pre, h_next, stream); break;
      }
      h = h_next;
    }
  });
  if (score_w == nullptr) return h.view({in.B, in.P, in.S});   // the last step's fresh output (T >= 1)
  if (!scored) scores = at::sigmoid(at::addmv(*score_b, h.to(at::kFloat), *score_w)).view({in.B, in.P});
  return scores;
}

Tensor rar_cuda(const Tensor& E, const Tensor& qlens, const OptTensor& h0, const Tensor& wq, const Tensor& bq,
                const Tensor& wk, const Tensor& bk, const Tensor& wv, const Tensor& bv, const OptTensor& keep_k,
                const OptTensor& keep_g) {
  rcar_fast::check_rar(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g);
  check_cuda_dtype(E, "E");
  c10::cuda::CUDAGuard guard(E.device());
  return rar_run(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g, nullptr, nullptr);
}

// rcar_fast::rar_scores: rar without dropout, then each pair's score sigmoid(score_w . h + score_b)
// (float32, from h rounded to E's dtype) taken in the last step's launch where that is
// rar_fwd_wg_kernel. score_w (s,), score_b (1,): contiguous float32 on E's device.
Tensor rar_scores_cuda(const Tensor& E, const Tensor& qlens, const OptTensor& h0, const Tensor& wq, const Tensor& bq,
                       const Tensor& wk, const Tensor& bk, const Tensor& wv, const Tensor& bv, const Tensor& score_w,
                       const Tensor& score_b) {
  rcar_fast::check_rar(E, qlens, h0, wq, bq, wk, bk, wv, bv, OptTensor(), OptTensor());
  check_cuda_dtype(E, "E");
  TORCH_CHECK(wq.size(0) >= 1, "wq: the fused scoring layer is taken in the last RAR step; got ", wq.size(0),
              " steps (wq.shape[0])");
  const int64_t S = E.size(3);
  auto check = [&](const char* name, const Tensor& t, int64_t n) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat && t.device() == E.device() &&
                    t.is_contiguous(),
                name, ": expected a contiguous float32 tensor of shape (", n, ") on ", E.device(), ", got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device(), t.is_contiguous() ? "" : ", not contiguous");
  };
  check("score_w", score_w, S);
  check("score_b", score_b, 1);
  c10::cuda::CUDAGuard guard(E.device());
  return rar_run(E, qlens, h0, wq, bq, wk, bk, wv, bv, OptTensor(), OptTensor(), &score_w, &score_b);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rar_bwd_cuda(
    const Tensor& grad, const Tensor& E, const Tensor& qlens, const Tensor& h, const Tensor& wq, const Tensor& bq,
    const Tensor& wk, const Tensor& bk, const Tensor& wv, const Tensor& bv, const OptTensor& keep_k,
    const OptTensor& keep_g) {
  rcar_fast::check_rar(E, qlens, OptTensor(h), wq, bq, wk, bk, wv, bv, keep_k, keep_g);
  check_cuda_dtype(E, "E");
  TORCH_CHECK(wq.size(0) == 1, "wq: rar_bwd differentiates one RAR step (T = 1), got T = ", wq.size(0));
  c10::cuda::CUDAGuard guard(E.device());
  const RarInputs in = prepare(E, qlens, OptTensor(h), wq, bq, wk, bk, wv, bv, keep_k, keep_g);
  rcar_fast::check_float(grad, "grad", E);
  rcar_fast::check_shape(grad, "grad", {in.B, in.P, in.S});
  const auto f32 = E.options().dtype(at::kFloat);
  const int64_t pairs = in.B * in.P;
  if (pairs == 0 || in.S == 0 || in.Lq == 0) {
    return std::make_tuple(at::zeros({in.B, in.P, in.Lq, in.S}, f32), at::zeros({in.B, in.P, in.S}, f32),
                           at::zeros({in.B, in.P, in.Lq, in.S}, f32), at::zeros({in.B, in.P, in.S}, f32),
                           at::zeros({in.B, in.P, in.S}, f32));
  }
  check_pairs(pairs);
  Tensor dE = at::empty({in.B, in.P, in.Lq, in.S}, f32);
  Tensor dKp = at::empty({in.B, in.P, in.Lq, in.S}, f32);
  Tensor dgp = at::empty({in.B, in.P, in.S}, f32);
  Tensor dwv = at::empty({in.B, in.P, in.S}, f32);
  const Tensor g = grad.contiguous();
  cudaStream_t stream = current_stream();
  dispatch_float(E.scalar_type(), "E", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const RarArgs<T> r = make_args<T>(in);
    switch (rar_mt((int)sizeof(T), in)) {
      case 1: launch_rar_bwd<T, 1>(r, pairs, g, dE, dKp, dgp, dwv, stream); break;
      case 2: launch_rar_bwd<T, 2>(r, pairs, g, dE, dKp, dgp, dwv, stream); break;
      default: launch_rar_bwd<T, 4>(r, pairs, g, dE, dKp, dgp, dwv, stream); break;
    }
  });
  // the shared-weight products, fp32: dE += dKp Wk, dh = dgp Wq
  dE.view({-1, in.S}).addmm_(dKp.view({-1, in.S}), in.wk.select(0, 0).to(at::kFloat));
  Tensor dh = at::mm(dgp.view({-1, in.S}), in.wq.select(0, 0).to(at::kFloat)).view({in.B, in.P, in.S});
  return std::make_tuple(dE, dh, dKp, dgp, dwv);
}

}  // namespace
}  // namespace cuda
}  // namespace rcar_fast

TORCH_LIBRARY_IMPL(rcar_fast, CUDA, m) {
  m.impl("rar", &rcar_fast::cuda::rar_cuda);
  m.impl("rar_bwd", &rcar_fast::cuda::rar_bwd_cuda);
  m.impl("rar_scores", &rcar_fast::cuda::rar_scores_cuda);
}
