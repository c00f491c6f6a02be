// CUDA implementation of rcar_fast::attention and rcar_fast::attention_bwd (csrc/README.md).
//
// Forward: gram_kernel (G = C C^T per context item, fp32), then for fp16/bf16 with Lq and Lc up
// to 64: with the projection on an sm_90a build and device (launch.h use_wgmma), where more than 64
// rows fill a block (plan.h choose_wg_plan), attention_fwd_wg_kernel: 128 rows of packed pairs per
// block, every product on wgmma; else attention_fwd_tc_kernel: GP pairs of one context item per
// block, packed (GP = 64 / Lq, each pair's Lq rows back to back; paired: one pair), the scores,
// P C and the projection on tensor cores (wmma, fp32 accumulators). Otherwise (fp32, longer rows) attention_fwd_kernel, one block per (b, p)
// pair, scores and P C in fp32 SIMT, the projection by the block GEMM (wmma for fp16/bf16, exact
// fp32 FMAs for fp32). With a weight the d-wide attended context never leaves the chip.
//
// Backward (launch_bwd): the backward kernel recomputes the pairs and produces every gradient:
// fp16/bf16 with Lq, Lc <= 64 attention_bwd_tc_kernel (the forward's blocks of packed pairs, every
// d-wide product on wmma, dcontext's atomics once per block), else attention_bwd_kernel per pair
// (fp32 SIMT). Without a weight it takes the output's gradient (kModeAttended). With a weight,
// pairs are processed in chunks that bound the scratch memory (rectangles of the pair grid, plan.h
// bwd_chunk_end): the forward in kModeSquaredDiff
// writes D2 = (Q - A)^2 for the chunk (fp16/bf16 with Lq, Lc <= 64: attention_fwd_tc_kernel, GP
// packed pairs a block, D2 in the inputs' dtype; else attention_fwd_kernel per pair, D2 in fp32), the
// shared-weight products run in cuBLAS (Y = D2 W^T + b, dW += dY^T D2, G2 = dY W; fp16/bf16 on tensor
// cores from D2 and dY in the inputs' dtype, fp32 outputs; fp32 exact) with
// dY from l2n_bwd_rows_kernel, and the backward kernel (kModeAlignment) takes G2 = d(D2) from there.
// dquery and dcontext are accumulated with fp32 atomics (summed over pairs).
// Paired (context_index given): block pid = p is pair p, which reads context item
// context_index[p] (its clens, its Gram matrix, its rows of dcontext); the output's B is 1.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention_kernels.cuh"
#include "checks.h"
#include "launch.h"

namespace rcar_fast {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Inputs as the kernels read them: last dimension contiguous, lengths contiguous.
struct AttnInputs {
  Tensor q, qlens, c, clens, cidx, f, lam, w, bias;
  bool has_f = false, has_lam = false, has_w = false;
  int64_t P = 0, Lq = 0, D = 0, B = 0, Lc = 0, S = 0;
  int64_t Bo = 0;   // the output's context side: B, or 1 paired (context_index given)
};

AttnInputs prepare(const Tensor& query, const Tensor& qlens, const Tensor& context, const Tensor& clens,
                   const OptTensor& factors, const OptTensor& lam, const OptTensor& weight, const OptTensor& bias,
                   const OptTensor& context_index) {
  AttnInputs in;
  if (context_index) in.cidx = context_index->contiguous();
  in.q = last_dim_contiguous(query);
  in.c = last_dim_contiguous(context);
  in.qlens = qlens.contiguous();
  in.clens = clens.contiguous();
  in.has_f = factors.has_value();
  in.has_lam = lam.has_value();
  in.has_w = weight.has_value();
  if (in.has_f) in.f = last_dim_contiguous(*factors);
  if (in.has_lam) in.lam = *lam;
  if (in.has_w) {
    in.w = weight->contiguous();
    in.bias = bias->contiguous();
  }
  in.P = query.size(0);
  in.Lq = query.size(1);
  in.D = query.size(2);
  in.B = context.size(0);
  in.Bo = context_index ? 1 : in.B;
  in.Lc = context.size(1);
  in.S = in.has_w ? weight->size(0) : 0;
  return in;
}

template <typename T>
AttnArgs<T> make_args(const AttnInputs& in, double lam_scalar, const Tensor& gram) {
  AttnArgs<T> a{};
  a.q = ptr<T>(in.q);
  a.qlens = in.qlens.data_ptr<int>();
  a.c = ptr<T>(in.c);
  a.clens = in.clens.data_ptr<int>();
  a.cidx = in.cidx.defined() ? in.cidx.data_ptr<int>() : nullptr;
  a.f = in.has_f ? ptr<T>(in.f) : nullptr;
  a.lam = in.has_lam ? ptr<T>(in.lam) : nullptr;
  a.w = in.has_w ? ptr<T>(in.w) : nullptr;
  a.bias = in.has_w ? ptr<T>(in.bias) : nullptr;
  a.gram = gram.data_ptr<float>();
  a.P = in.P;
  a.Lq = in.Lq;
  a.Lc = in.Lc;
  a.D = in.D;
  a.S = in.S;
  a.sq_p = in.q.stride(0);
  a.sq_l = in.q.stride(1);
  a.sc_b = in.c.stride(0);
  a.sc_l = in.c.stride(1);
  if (in.has_f) {
    a.sf_b = in.f.stride(0);
    a.sf_p = in.f.stride(1);
    a.sf_l = in.f.stride(2);
  }
  if (in.has_lam) {
    a.sl_b = in.lam.stride(0);
    a.sl_p = in.lam.stride(1);
    a.sl_l = in.lam.stride(2);
  }
  a.lam_scalar = static_cast<float>(lam_scalar);
  return a;
}

// G = C C^T over each context item's valid rows, (B, Lc, Lc) fp32; c: (B, Lc, d), last dimension
// contiguous; clens: (B,) int32, contiguous.
template <typename T>
Tensor gram_of(const Tensor& c, const Tensor& clens, cudaStream_t stream) {
  const int64_t B = c.size(0), Lc = c.size(1), D = c.size(2);
  Tensor gram = at::empty({B, Lc, Lc}, c.options().dtype(at::kFloat));
  if (gram.numel() == 0) return gram;
  const int64_t smem = gram_layout(Lc).total;
  prepare_smem(gram_kernel<T>, smem, "attention (Gram matrix of the context)");
  gram_kernel<T><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(ptr<T>(c), clens.data_ptr<int>(), Lc, D,
                                                                      c.stride(0), c.stride(1), gram.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gram;
}

// rcar_fast::context_gram: the Gram matrices the attention's `gram` argument takes.
Tensor context_gram_cuda(const Tensor& context, const Tensor& clens) {
  TORCH_CHECK(context.is_floating_point(), "context: expected a floating tensor, got ", context.scalar_type());
  TORCH_CHECK(context.dim() == 3, "context: expected (B, Lc, d), got shape ", context.sizes());
  rcar_fast::check_lens(clens, "clens", context.size(0), context);
  check_cuda_dtype(context, "context");
  TORCH_CHECK(context.size(0) <= INT32_MAX, "context: ", context.size(0), " items are more than one launch takes");
  c10::cuda::CUDAGuard guard(context.device());
  const Tensor c = last_dim_contiguous(context), cl = clens.contiguous();
  Tensor out;
  dispatch_float(context.scalar_type(), "context", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    out = gram_of<T>(c, cl, current_stream());
  });
  return out;
}

template <typename T, int MT, int MODE>
void launch_fwd(const AttnArgs<T>& a, int64_t pid0, int64_t n, void* out, cudaStream_t stream) {
  auto* kernel = attention_fwd_kernel<T, MT, MODE>;
  const int64_t smem = attn_fwd_layout((int)sizeof(T), a.Lq, a.Lc, a.S, MT, MODE).total;
  prepare_smem(kernel, smem, "attention");
  kernel<<<static_cast<unsigned>(n), kThreads, smem, stream>>>(a, pid0, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_grid(int64_t pairs) {
  TORCH_CHECK(pairs <= 0x7fffffffLL, "attention: ", pairs, " (context, query) pairs exceed one launch; "
              "split the pair grid");
}

template <typename T, int MT, int MODE>
void launch_fwd_tc(const AttnArgs<T>& a, const TcPlan& t, int64_t blocks, void* out, cudaStream_t stream) {
  auto* kernel = attention_fwd_tc_kernel<T, MT, MODE, false>;
  // a 64-row block's projection on wgmma where the device and the build have it (launch.h)
  if constexpr (tc_wgmma_projection(MT, MODE))
    if (use_wgmma()) kernel = attention_fwd_tc_kernel<T, MT, MODE, true>;
  const int64_t smem = attn_tc_layout((int)sizeof(T), 16 * MT, t.bc, t.gp, a.S, MODE).total;
  prepare_smem(kernel, smem, "attention");
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a, t.bq, t.bc, t.gp, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BC>
void launch_fwd_wg(const AttnArgs<T>& a, const TcPlan& t, int64_t blocks, void* out, cudaStream_t stream) {
  auto* kernel = attention_fwd_wg_kernel<T, BC>;
  const int64_t smem = attn_wg_layout((int)sizeof(T), BC, t.gp).total;
  prepare_smem(kernel, smem, "attention");
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a, t.bq, t.gp, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// fp16/bf16 with Lq, Lc <= kTcMaxLen: on an sm_90a build and device (launch.h use_wgmma) the
// 128-row wgmma kernel where plan.h choose_wg_plan takes the shapes, else the tensor-core kernel,
// GP pairs of one context item per block (plan.h choose_tc_plan). Returns false where neither
// applies (the caller runs attention_fwd_kernel).
// r: the pairs to run (the whole grid by default; the backward's chunks: a rectangle, with `a`
// from attn_args_rect).
template <typename T, int MODE>
bool try_fwd_tc(const AttnInputs& in, const AttnArgs<T>& a, const PairRect& r, void* out, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return false;
  } else {
    const TcPlan w = choose_wg_plan((int)sizeof(T), in.Lq, in.Lc, in.S, r.np, in.cidx.defined(), MODE, smem_limit());
    if (w.gp > 0 && use_wgmma()) {
      const int64_t blocks = r.nb * ((r.np + w.gp - 1) / w.gp);
      check_grid(blocks);
      switch (w.bc) {
        case 16: launch_fwd_wg<T, 16>(a, w, blocks, out, stream); break;
        case 32: launch_fwd_wg<T, 32>(a, w, blocks, out, stream); break;
        case 48: launch_fwd_wg<T, 48>(a, w, blocks, out, stream); break;
        default: launch_fwd_wg<T, 64>(a, w, blocks, out, stream); break;
      }
      return true;
    }
    const TcPlan t = choose_tc_plan((int)sizeof(T), in.Lq, in.Lc, in.S, r.np, in.cidx.defined(), MODE, smem_limit());
    if (t.gp == 0) return false;
    const int64_t blocks = r.nb * ((r.np + t.gp - 1) / t.gp);
    check_grid(blocks);
    switch (t.mt) {
      case 1: launch_fwd_tc<T, 1, MODE>(a, t, blocks, out, stream); break;
      case 2: launch_fwd_tc<T, 2, MODE>(a, t, blocks, out, stream); break;
      case 3: launch_fwd_tc<T, 3, MODE>(a, t, blocks, out, stream); break;
      default: launch_fwd_tc<T, 4, MODE>(a, t, blocks, out, stream); break;
    }
    return true;
  }
}

// The backward kernel for pairs pid0 .. pid0 + n - 1 (one chunk of bwd_chunk_end; mode 0 all pairs):
// fp16/bf16 attention_bwd_tc_kernel over the chunk's rectangle where plan.h choose_bwd_tc_plan
// takes the shapes (its arguments and outputs pointed at the rectangle), else attention_bwd_kernel
// per pair. gsrc: mode 0 the output's gradient (every pair: the tensor-core kernel takes it from the
// chunk's first pair, as its outputs), mode 1 the chunk's G2.
template <typename T, int MODE>
void launch_bwd(const AttnInputs& in, const AttnArgs<T>& a, int64_t pid0, int64_t n, const void* gsrc,
                const BwdOut& o, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    const PairRect r = bwd_chunk_rect(pid0, pid0 + n, in.P);
    const bool paired = in.cidx.defined();
    const TcPlan t = choose_bwd_tc_plan((int)sizeof(T), in.Lq, in.Lc, r.np, paired, smem_limit());
    if (t.gp > 0) {
      const AttnArgs<T> ar = attn_args_rect(a, r);
      const BwdOut orr = bwd_out_rect(o, r, pid0, in.Lq, in.Lc, in.D, paired);
      const int64_t blocks = r.nb * ((r.np + t.gp - 1) / t.gp);
      check_grid(blocks);
      const int64_t smem = attn_bwd_tc_layout((int)sizeof(T), 16 * t.mt, t.bc, t.gp).total;
      auto go = [&](auto kernel) {
        prepare_smem(kernel, smem, "attention_bwd");
        const T* grad0 = static_cast<const T*>(gsrc) + pid0 * in.Lq * in.D;   // mode 0: the chunk's first pair
        const void* gs = MODE == kModeAttended ? static_cast<const void*>(grad0) : gsrc;
        kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(ar, t.bq, t.bc, t.gp, gs, orr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (t.mt) {
        case 1: go(attention_bwd_tc_kernel<T, 1, MODE>); break;
        case 2: go(attention_bwd_tc_kernel<T, 2, MODE>); break;
        case 3: go(attention_bwd_tc_kernel<T, 3, MODE>); break;
        default: go(attention_bwd_tc_kernel<T, 4, MODE>); break;
      }
      return;
    }
  }
  const int64_t smem = attn_bwd_layout(in.Lq, in.Lc).total;
  prepare_smem(attention_bwd_kernel<T, MODE>, smem, "attention_bwd");
  attention_bwd_kernel<T, MODE><<<static_cast<unsigned>(n), kThreads, smem, stream>>>(a, pid0, gsrc, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The row-group size of the fused projection (plan.h: smallest covering Lq that fits the device).
int projection_mt(int elem, const AttnInputs& in) {
  return choose_attn_mt(elem, in.Lq, in.Lc, in.S, smem_limit());
}


Tensor attention_cuda(const Tensor& query, const Tensor& qlens, const Tensor& context, const Tensor& clens,
                      const OptTensor& factors, const OptTensor& lam, double lam_scalar, const OptTensor& weight,
                      const OptTensor& bias, const OptTensor& context_index, const OptTensor& gram) {
  rcar_fast::check_attention(query, qlens, context, clens, factors, lam, weight, bias, context_index);
  rcar_fast::check_gram(gram, context);
  check_cuda_dtype(query, "query");
  c10::cuda::CUDAGuard guard(query.device());
  const AttnInputs in = prepare(query, qlens, context, clens, factors, lam, weight, bias, context_index);
  const int64_t width = in.has_w ? in.S : in.D;
  Tensor out = at::empty({in.Bo, in.P, in.Lq, width}, query.options());
  const int64_t pairs = in.Bo * in.P;
  if (pairs == 0 || out.numel() == 0) return out;
  check_grid(pairs);
  cudaStream_t stream = current_stream();
  dispatch_float(query.scalar_type(), "query", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // the caller's (context_gram, made once for several calls on this context) or this call's own
    const Tensor g = gram ? *gram : gram_of<T>(in.c, in.clens, stream);
    const AttnArgs<T> a = make_args<T>(in, lam_scalar, g);
    const PairRect grid{0, in.Bo, 0, in.P};   // every pair
    void* o = out.data_ptr();
    if (!in.has_w) {
      if (!try_fwd_tc<T, kModeAttended>(in, a, grid, o, stream)) launch_fwd<T, 1, kModeAttended>(a, 0, pairs, o, stream);
      return;
    }
    if (try_fwd_tc<T, kModeAlignment>(in, a, grid, o, stream)) return;
    switch (projection_mt((int)sizeof(T), in)) {
      case 1: launch_fwd<T, 1, kModeAlignment>(a, 0, pairs, o, stream); break;
      case 2: launch_fwd<T, 2, kModeAlignment>(a, 0, pairs, o, stream); break;
      default: launch_fwd<T, 4, kModeAlignment>(a, 0, pairs, o, stream); break;
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd_cuda(
    const Tensor& grad, const Tensor& query, const Tensor& qlens, const Tensor& context, const Tensor& clens,
    const OptTensor& factors, const OptTensor& lam, double lam_scalar, const OptTensor& weight,
    const OptTensor& bias, bool need_dfactors, const OptTensor& context_index) {
  rcar_fast::check_attention(query, qlens, context, clens, factors, lam, weight, bias, context_index);
  check_cuda_dtype(query, "query");
  c10::cuda::CUDAGuard guard(query.device());
  const AttnInputs in = prepare(query, qlens, context, clens, factors, lam, weight, bias, context_index);
  const int64_t width = in.has_w ? in.S : in.D;
  rcar_fast::check_float(grad, "grad", query);
  rcar_fast::check_shape(grad, "grad", {in.Bo, in.P, in.Lq, width});

  const auto f32 = query.options().dtype(at::kFloat);
  const bool want_df = in.has_f && need_dfactors;
  Tensor dq = at::zeros({in.P, in.Lq, in.D}, f32);
  Tensor dc = at::zeros({in.B, in.Lc, in.D}, f32);
  Tensor df = want_df ? at::empty({in.Bo, in.P, in.Lq, in.D}, f32) : at::empty({0}, f32);
  Tensor dlam = in.has_lam ? at::empty({in.Bo, in.P, in.Lq}, f32) : at::empty({0}, f32);
  Tensor dw = in.has_w ? at::zeros({in.S, in.D}, f32) : at::empty({0}, f32);
  Tensor db = in.has_w ? at::zeros({in.S}, f32) : at::empty({0}, f32);
  const int64_t pairs = in.Bo * in.P;
  if (pairs == 0 || in.Lq == 0) return std::make_tuple(dq, dc, df, dlam, dw, db);
  check_grid(pairs);

  cudaStream_t stream = current_stream();
  const Tensor g = grad.contiguous();
  BwdOut o{dq.data_ptr<float>(), dc.data_ptr<float>(), want_df ? df.data_ptr<float>() : nullptr,
           in.has_lam ? dlam.data_ptr<float>() : nullptr};

  dispatch_float(query.scalar_type(), "query", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Tensor gram = gram_of<T>(in.c, in.clens, stream);
    const AttnArgs<T> a = make_args<T>(in, lam_scalar, gram);
    if (!in.has_w) {
      launch_bwd<T, kModeAttended>(in, a, 0, pairs, g.data_ptr(), o, stream);
      return;
    }
    // chunks of pairs: D2 and G2 (Lq x d) and Y, dY (Lq x s) per pair, fp32, about 256 MiB in all
    // (whole context items where a chunk holds P pairs, else a part of one: bwd_chunk_end)
    const int64_t per_pair = in.Lq * (2 * in.D + 2 * in.S) * 4;
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(pairs, (int64_t(256) << 20) / std::max<int64_t>(1, per_pair)));
    constexpr bool kHalf = !std::is_same<T, float>::value;
    const at::ScalarType st = query.scalar_type();
    // fp16/bf16 with Lq, Lc <= 64: D2 from attention_fwd_tc_kernel in the inputs' dtype
    const bool tc_d2 = kHalf && choose_tc_plan((int)sizeof(T), in.Lq, in.Lc, in.S, 1, in.cidx.defined(),
                                               kModeSquaredDiff, smem_limit()).gp > 0;
    Tensor D2 = at::empty({chunk * in.Lq, in.D}, tc_d2 ? query.options() : f32);
    Tensor G2 = at::empty({chunk * in.Lq, in.D}, f32);
    Tensor dY = at::empty({chunk * in.Lq, in.S}, f32);
    const Tensor& W = in.w;   // contiguous, the inputs' dtype (prepare)
    const Tensor bf = in.bias.to(at::kFloat);
    // The three products with the shared weight (Y = D2 W^T + b, dW += dY^T D2, G2 = dY W): fp16/bf16
    // on tensor cores, D2 and dY rounded to the inputs' dtype (as the forward's projection took
    // (Q - A)^2 and W, and as the Triton backward takes dY), fp32 sums and outputs (cuBLAS with an
    // fp32 output, at::mm's out_dtype); fp32 exact fp32 products (TF32 off).
    for (int64_t pid0 = 0, pid1; pid0 < pairs; pid0 = pid1) {
      pid1 = bwd_chunk_end(pid0, chunk, pairs, in.P);
      const int64_t n = pid1 - pid0;
      const int64_t rows = n * in.Lq;
      Tensor d2 = D2.narrow(0, 0, rows);
      Tensor g2 = G2.narrow(0, 0, rows);
      Tensor dy = dY.narrow(0, 0, rows);
      if (tc_d2) {
        const PairRect r = bwd_chunk_rect(pid0, pid1, in.P);
        const bool ok = try_fwd_tc<T, kModeSquaredDiff>(in, attn_args_rect(a, r), r, d2.data_ptr(), stream);
        TORCH_CHECK(ok, "attention_bwd: the tensor-core forward refused a chunk it was planned for");
      } else {
        launch_fwd<T, 1, kModeSquaredDiff>(a, pid0, n, d2.data_ptr(), stream);
      }
      const Tensor d2h = !kHalf ? Tensor() : (tc_d2 ? d2 : d2.to(st));
      const Tensor Y = kHalf ? at::mm(d2h, W.t(), at::kFloat).add_(bf) : at::addmm(bf, d2, W.t());
      const int64_t blocks = (rows + kWarps - 1) / kWarps;
      l2n_bwd_rows_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          Y.data_ptr<float>(), ptr<T>(g), in.qlens.data_ptr<int>(), pid0, rows, in.P, in.Lq, in.S,
          dy.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      db.add_(dy.sum(0));
      if constexpr (kHalf) {
        const Tensor dyh = dy.to(st);
        dw.add_(at::mm(dyh.t(), d2h, at::kFloat));
        at::mm_out(g2, dyh, W, at::kFloat);
      } else {
        dw.addmm_(dy.t(), d2);
        at::mm_out(g2, dy, W);
      }
      launch_bwd<T, kModeAlignment>(in, a, pid0, n, g2.data_ptr(), o, stream);
    }
  });
  return std::make_tuple(dq, dc, df, dlam, dw, db);
}

}  // namespace
}  // namespace cuda
}  // namespace rcar_fast

TORCH_LIBRARY_IMPL(rcar_fast, CUDA, m) {
  m.impl("attention", &rcar_fast::cuda::attention_cuda);
  m.impl("context_gram", &rcar_fast::cuda::context_gram_cuda);
  m.impl("attention_bwd", &rcar_fast::cuda::attention_bwd_cuda);
}
