// Entry points (extern "C", for ctypes) that run the CUDA kernels of csrc/cuda/*.cuh under the
// host emulation of include/cuda_emu.h, launched the way the launchers in csrc/cuda/*.cu launch
// them (the same plan.h choices, grids and template arguments). tests/test_cuda_emu.py builds
// this file into a shared library and checks the kernels against the op contract's reference.
// Tensors are contiguous unless an entry takes their strides; dtype: 0 float32, 1 float16, 2 bfloat16.
#include "cuda_emu.h"

#include <string>

#include "cuda/attention_kernels.cuh"
#include "cuda/rar_kernels.cuh"
#include "cuda/rcr_kernels.cuh"

using namespace rcar_fast::cuda;

namespace {

std::string last_error;   // what the last entry point threw (emu_last_error), "" when it returned

// Runs body with T the element type of `dtype`; an exception (a barrier no thread can pass) is
// kept for emu_last_error instead of crossing the C boundary.
template <typename Body>
void by_dtype(int dtype, Body&& body) {
  last_error.clear();
  try {
    switch (dtype) {
      case 0: body(static_cast<float*>(nullptr)); break;
      case 1: body(static_cast<__half*>(nullptr)); break;
      default: body(static_cast<__nv_bfloat16*>(nullptr)); break;
    }
  } catch (const std::exception& e) {
    last_error = e.what();
  }
}

struct AttnIn {
  const void *q, *c, *f, *lam, *w, *bias;
  const int *qlens, *clens, *cidx;
  const float* gram;
  float lam_scalar;
  int64_t B, P, Lq, Lc, D, S;
  const int64_t* strides = nullptr;   // sq_p sq_l sc_b sc_l sf_b sf_p sf_l sl_b sl_p sl_l, or contiguous
};

template <typename T>
AttnArgs<T> attn_args(const AttnIn& in) {
  AttnArgs<T> a{};
  a.q = static_cast<const T*>(in.q);
  a.qlens = in.qlens;
  a.c = static_cast<const T*>(in.c);
  a.clens = in.clens;
  a.cidx = in.cidx;
  a.f = static_cast<const T*>(in.f);
  a.lam = static_cast<const T*>(in.lam);
  a.w = static_cast<const T*>(in.w);
  a.bias = static_cast<const T*>(in.bias);
  a.gram = in.gram;
  a.P = in.P;
  a.Lq = in.Lq;
  a.Lc = in.Lc;
  a.D = in.D;
  a.S = in.S;
  a.sq_p = in.Lq * in.D;
  a.sq_l = in.D;
  a.sc_b = in.Lc * in.D;
  a.sc_l = in.D;
  a.sf_b = in.P * in.Lq * in.D;
  a.sf_p = in.Lq * in.D;
  a.sf_l = in.D;
  a.sl_b = in.P * in.Lq;
  a.sl_p = in.Lq;
  a.sl_l = 1;
  if (in.strides != nullptr) {   // as make_args takes them from the tensors (last dimension contiguous)
    const int64_t* st = in.strides;
    a.sq_p = st[0], a.sq_l = st[1], a.sc_b = st[2], a.sc_l = st[3];
    a.sf_b = st[4], a.sf_p = st[5], a.sf_l = st[6], a.sl_b = st[7], a.sl_p = st[8], a.sl_l = st[9];
  }
  a.lam_scalar = in.lam_scalar;
  return a;
}

// RarArgs over contiguous tensors (null: absent or unused by the kernel)
template <typename T>
RarArgs<T> rar_args(const void* E, const int* qlens, const void* h, const void* wq, const void* bq, const void* wk,
                    const void* bk, const void* wv, const void* bv, const void* keep_k, const void* keep_g, int64_t P,
                    int64_t Lq, int64_t S) {
  RarArgs<T> r{};
  r.E = static_cast<const T*>(E);
  r.qlens = qlens;
  r.h = static_cast<const T*>(h);
  r.wq = static_cast<const T*>(wq);
  r.bq = static_cast<const T*>(bq);
  r.wk = static_cast<const T*>(wk);
  r.bk = static_cast<const T*>(bk);
  r.wv = static_cast<const T*>(wv);
  r.bv = static_cast<const T*>(bv);
  r.keep_k = static_cast<const T*>(keep_k);
  r.keep_g = static_cast<const T*>(keep_g);
  r.P = P;
  r.Lq = Lq;
  r.S = S;
  return r;
}

bool use_wgmma = false;   // emu_set_wgmma: launch.h use_wgmma's answer for the launches below

template <typename T, int MT, int MODE>
void run_tc(const AttnArgs<T>& a, const TcPlan& t, int64_t blocks, void* out) {
  const size_t smem = (size_t)attn_tc_layout((int)sizeof(T), 16 * MT, t.bc, t.gp, a.S, MODE).total;
  auto go = [&](auto kernel) {
    cuda_emu::launch((unsigned)blocks, kThreads, [&] { kernel(a, t.bq, t.bc, t.gp, out); }, smem);
  };
  if constexpr (tc_wgmma_projection(MT, MODE))   // attention.cu launch_fwd_tc
    if (use_wgmma) return go(attention_fwd_tc_kernel<T, MT, MODE, true>);
  go(attention_fwd_tc_kernel<T, MT, MODE, false>);
}

// The tensor-core forwards as attention.cu try_fwd_tc launches them over the pairs of rectangle r
// (a = attn_args_rect(..., r)): 1000 GP + MT of the plan taken, or 0 where neither applies.
template <typename T, int MODE>
int64_t try_tc(const AttnIn& in, const AttnArgs<T>& a, const PairRect& r, int64_t limit, void* out) {
  if constexpr (!std::is_same<T, float>::value) {
    const TcPlan w = choose_wg_plan((int)sizeof(T), in.Lq, in.Lc, in.S, r.np, in.cidx != nullptr, MODE, limit);
    if (w.gp > 0 && use_wgmma) {
      const int64_t blocks = r.nb * ((r.np + w.gp - 1) / w.gp);
      const size_t smem = (size_t)attn_wg_layout((int)sizeof(T), w.bc, w.gp).total;
      auto go = [&](auto kernel) {
        cuda_emu::launch((unsigned)blocks, kThreads, [&] { kernel(a, w.bq, w.gp, out); }, smem);
      };
      switch (w.bc) {
        case 16: go(attention_fwd_wg_kernel<T, 16>); break;
        case 32: go(attention_fwd_wg_kernel<T, 32>); break;
        case 48: go(attention_fwd_wg_kernel<T, 48>); break;
        default: go(attention_fwd_wg_kernel<T, 64>); break;
      }
      return 1000 * w.gp + w.mt;
    }
    const TcPlan t = choose_tc_plan((int)sizeof(T), in.Lq, in.Lc, in.S, r.np, in.cidx != nullptr, MODE, limit);
    if (t.gp > 0) {
      const int64_t blocks = r.nb * ((r.np + t.gp - 1) / t.gp);
      switch (t.mt) {
        case 1: run_tc<T, 1, MODE>(a, t, blocks, out); break;
        case 2: run_tc<T, 2, MODE>(a, t, blocks, out); break;
        case 3: run_tc<T, 3, MODE>(a, t, blocks, out); break;
        default: run_tc<T, 4, MODE>(a, t, blocks, out); break;
      }
      return 1000 * t.gp + t.mt;
    }
  }
  return 0;
}

template <typename T, int MODE>
int64_t attention_fwd(const AttnIn& in, int64_t limit, void* out) {
  const AttnArgs<T> a = attn_args<T>(in);
  const int64_t Bo = in.cidx != nullptr ? 1 : in.B;
  if (const int64_t used = try_tc<T, MODE>(in, a, PairRect{0, Bo, 0, in.P}, limit, out)) return used;
  const int mt = MODE == kModeAlignment ? choose_attn_mt((int)sizeof(T), in.Lq, in.Lc, in.S, limit) : 1;
  const int64_t pairs = Bo * in.P;
  auto go = [&](auto mt_tag) {
    constexpr int M = decltype(mt_tag)::value;
    const size_t smem = (size_t)attn_fwd_layout((int)sizeof(T), in.Lq, in.Lc, in.S, M, MODE).total;
    cuda_emu::launch((unsigned)pairs, kThreads, [&] { attention_fwd_kernel<T, M, MODE>(a, 0, out); }, smem);
  };
  if (MODE != kModeAlignment || mt == 1) go(std::integral_constant<int, 1>());
  else if (mt == 2) go(std::integral_constant<int, 2>());
  else go(std::integral_constant<int, 4>());
  return mt;
}

}  // namespace

extern "C" {

const char* emu_last_error() { return last_error.c_str(); }

// The wgmma kernels where the launchers take them on an sm_90a build (1) or not (0): the attention
// forward's 128-row kernel and 64-row projection, the RAR forward's 128-row kernel and the RCR
// GEMMs (launch.h use_wgmma).
void emu_set_wgmma(int on) {
  last_error.clear();
  use_wgmma = on != 0;
}

// The wgmma calls (one per thread and instruction) since the last call of this function.
long emu_wgmma_ops() {
  const long n = cuda_emu::wg_ops;
  cuda_emu::wg_ops = 0;
  return n;
}

// Threads between barriers from the first up (0) or from the last down (1).
void emu_set_reverse(int reverse) {
  last_error.clear();
  cuda_emu::reverse = reverse != 0;
}

// The emulation's own checks: which 0: out[b * 256 + t] = block_sum(t + b) (a block reduction
// through warp shuffles and __syncthreads) on 3 blocks, and out[768 + t] = the value thread
// t ^ 5 of its warp held (one shuffle); which 1: a divergent barrier (thread 0 returns, the
// others wait at __syncthreads), which must be reported, not hang.
void emu_selftest(int which, float* out) {
  by_dtype(0, [&](auto*) {
    if (which == 0) {
      cuda_emu::launch(3, kThreads, [&] {
        static float red[kWarps];   // the block's (the emulation has no static __shared__)
        const float v = block_sum((float)(threadIdx.x + blockIdx.x), red);
        out[blockIdx.x * kThreads + threadIdx.x] = v;
        if (blockIdx.x == 0) out[3 * kThreads + threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 5);
      });
    } else {
      cuda_emu::launch(1, kThreads, [&] {
        if (threadIdx.x == 0) return;
        __syncthreads();
      });
    }
  });
}

// G = C C^T per context item (gram_kernel), (B, Lc, Lc) fp32; sc_b, sc_l: the context's strides.
void emu_gram(int dtype, const void* c, const int* clens, int64_t B, int64_t Lc, int64_t D, int64_t sc_b, int64_t sc_l,
              float* gram) {
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cuda_emu::launch((unsigned)B, kThreads, [&] {
      gram_kernel<T>(static_cast<const T*>(c), clens, Lc, D, sc_b, sc_l, gram);
    }, (size_t)gram_layout(Lc).total);
  });
}

// The attention forward as attention_cuda launches it (mode 0: A, mode 1: E with the weight);
// strides: the inputs' (see AttnIn), or null for contiguous ones.
// Returns 1000 GP + MT for the tensor-core kernel, MT for the per-pair one.
int64_t emu_attention_fwd(int dtype, int mode, const void* q, const int* qlens, const void* c, const int* clens,
                          const int* cidx, const void* f, const void* lam, float lam_scalar, const void* w,
                          const void* bias, const float* gram, int64_t B, int64_t P, int64_t Lq, int64_t Lc,
                          int64_t D, int64_t S, int64_t limit, const int64_t* strides, void* out) {
  const AttnIn in{q, c, f, lam, w, bias, qlens, clens, cidx, gram, lam_scalar, B, P, Lq, Lc, D, S, strides};
  int64_t used = -1;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    used = mode == kModeAlignment ? attention_fwd<T, kModeAlignment>(in, limit, out)
                                  : attention_fwd<T, kModeAttended>(in, limit, out);
  });
  return used;
}

// One RAR forward step (rar_fwd_wg_kernel where emu_set_wgmma and plan.h choose_rar_wg_plan say,
// else rar_fwd_kernel, as rar_cuda launches them) given the gates' pre-activations
// pre = h Wq_t^T + bq_t (B, P, s) in E's type (its tanh, keep_g and wv_t taken by the kernel); h_out
// (B, P, s) in E's type, or with score_w the scores (B * P) float32 sigmoid(score_w . h + score_b[0])
// instead (rar_fwd_wg_kernel only). Returns 1000 GP + MT, or 0 when the plan does not fit `limit`.
int64_t emu_rar_step(int dtype, const void* E, const int* qlens, const void* wk, const void* bk, const void* bv,
                     const void* wv, const void* keep_k, const void* keep_g, int64_t B, int64_t P, int64_t Lq,
                     int64_t S, int64_t t, const void* pre, int64_t limit, void* h_out, const float* score_w,
                     const float* score_b, float* scores) {
  int64_t used = 0;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const RarArgs<T> r =
        rar_args<T>(E, qlens, nullptr, nullptr, nullptr, wk, bk, wv, bv, keep_k, keep_g, P, Lq, S);
    if constexpr (!std::is_same<T, float>::value) {   // rar_cuda: the 128-row kernel first
      const RarPlan w = choose_rar_wg_plan((int)sizeof(T), Lq, S, P, limit);
      if (w.gp > 0 && use_wgmma) {
        cuda_emu::launch((unsigned)(B * ((P + w.gp - 1) / w.gp)), kThreads, [&] {
          rar_fwd_wg_kernel<T>(r, w.bq, w.gp, t, static_cast<const T*>(pre), static_cast<T*>(h_out),
                               RarScore{score_w, score_b, scores});
        },
                         (size_t)rar_wg_layout((int)sizeof(T), w.gp, S).total);
        used = 1000 * w.gp + w.mt;
        return;
      }
    }
    if (score_w != nullptr) throw std::runtime_error("the scoring layer is rar_fwd_wg_kernel's");
    const RarPlan pl = choose_rar_plan((int)sizeof(T), Lq, S, P, limit);
    if (pl.gp == 0) return;
    const unsigned blocks = (unsigned)(B * ((P + pl.gp - 1) / pl.gp));
    auto go = [&](auto mt_tag) {
      constexpr int M = decltype(mt_tag)::value;
      cuda_emu::launch(blocks, kThreads, [&] {
        rar_fwd_kernel<T, M>(r, pl.bq, pl.gp, t, static_cast<const T*>(pre), static_cast<T*>(h_out));
      },
                       (size_t)rar_step_layout((int)sizeof(T), pl.gp * pl.bq, S, M, pl.gp).total);
    };
    switch (pl.mt) {
      case 1: go(std::integral_constant<int, 1>()); break;
      case 2: go(std::integral_constant<int, 2>()); break;
      case 3: go(std::integral_constant<int, 3>()); break;
      default: go(std::integral_constant<int, 4>()); break;
    }
    used = 1000 * pl.gp + pl.mt;
  });
  return used;
}

// attention_fwd_kernel in kModeSquaredDiff for pairs pid0 .. pid0 + n - 1: (Q - A)^2 in fp32,
// (n, Lq, D) indexed by the block (the backward's scratch, as attention_bwd_cuda launches it).
void emu_attention_sqdiff(int dtype, const void* q, const int* qlens, const void* c, const int* clens,
                          const int* cidx, const void* f, const void* lam, float lam_scalar, const float* gram,
                          int64_t B, int64_t P, int64_t Lq, int64_t Lc, int64_t D, int64_t pid0, int64_t n,
                          float* out) {
  const AttnIn in{q, c, f, lam, nullptr, nullptr, qlens, clens, cidx, gram, lam_scalar, B, P, Lq, Lc, D, 0};
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const AttnArgs<T> a = attn_args<T>(in);
    cuda_emu::launch((unsigned)n, kThreads, [&] { attention_fwd_kernel<T, 1, kModeSquaredDiff>(a, pid0, out); },
                     (size_t)attn_fwd_layout((int)sizeof(T), Lq, Lc, 0, 1, kModeSquaredDiff).total);
  });
}

// The backward's (Q - A)^2 for the chunk of pairs pid0 .. pid1 - 1 (plan.h bwd_chunk_end's) as
// attention_bwd_cuda writes it: fp16/bf16 where the tensor-core forward applies,
// attention_fwd_tc_kernel in kModeSquaredDiff over the chunk's rectangle (bwd_chunk_rect,
// attn_args_rect), out (pid1 - pid0, Lq, D) in the inputs' dtype: returns 1000 GP + MT; else
// emu_attention_sqdiff's fp32 (returns 0).
int64_t emu_attention_sqdiff_chunk(int dtype, const void* q, const int* qlens, const void* c, const int* clens,
                                   const int* cidx, const void* f, const void* lam, float lam_scalar,
                                   const float* gram, int64_t B, int64_t P, int64_t Lq, int64_t Lc, int64_t D,
                                   int64_t pid0, int64_t pid1, int64_t limit, void* out) {
  const AttnIn in{q, c, f, lam, nullptr, nullptr, qlens, clens, cidx, gram, lam_scalar, B, P, Lq, Lc, D, 0};
  int64_t used = 0;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const PairRect r = bwd_chunk_rect(pid0, pid1, P);
    used = try_tc<T, kModeSquaredDiff>(in, attn_args_rect(attn_args<T>(in), r), r, limit, out);
  });
  if (used == 0)
    emu_attention_sqdiff(dtype, q, qlens, c, clens, cidx, f, lam, lam_scalar, gram, B, P, Lq, Lc, D, pid0,
                         pid1 - pid0, static_cast<float*>(out));
  return used;
}

// The chunks attention_bwd_cuda takes (plan.h bwd_chunk_end): the end of the one at pid0.
int64_t emu_bwd_chunk_end(int64_t pid0, int64_t chunk, int64_t pairs, int64_t P) {
  return bwd_chunk_end(pid0, chunk, pairs, P);
}

// dY of E = l2n(Y) for rows pid0 * Lq .. (l2n_bwd_rows_kernel, kWarps rows per block).
void emu_l2n_bwd_rows(int dtype, const float* Y, const void* grad, const int* qlens, int64_t pid0, int64_t rows,
                      int64_t P, int64_t Lq, int64_t S, float* dY) {
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const unsigned blocks = (unsigned)((rows + kWarps - 1) / kWarps);
    cuda_emu::launch(blocks, kThreads, [&] {
      l2n_bwd_rows_kernel<T>(Y, static_cast<const T*>(grad), qlens, pid0, rows, P, Lq, S, dY);
    });
  });
}

// The attention backward's kernel for pairs pid0 .. pid0 + n - 1 (a chunk of plan.h bwd_chunk_end)
// as attention_bwd_cuda launches it: fp16/bf16 attention_bwd_tc_kernel over the chunk's rectangle
// where choose_bwd_tc_plan takes the shapes (returns 1000 GP + MT), else attention_bwd_kernel per
// pair (returns 0); mode 0: gsrc = grad (the input type, (Bo, P, Lq, D)); mode 1: gsrc = G2 = dY W,
// fp32 (n, Lq, D). dq, dc accumulate (fp32, zeroed by the caller); df, dlam may be null.
int64_t emu_attention_bwd(int dtype, int mode, const void* q, const int* qlens, const void* c, const int* clens,
                          const int* cidx, const void* f, const void* lam, float lam_scalar, const void* w,
                          const float* gram, int64_t B, int64_t P, int64_t Lq, int64_t Lc, int64_t D, int64_t S,
                          int64_t pid0, int64_t n, int64_t limit, const void* gsrc, float* dq, float* dc, float* df,
                          float* dlam) {
  const AttnIn in{q, c, f, lam, w, nullptr, qlens, clens, cidx, gram, lam_scalar, B, P, Lq, Lc, D, S};
  int64_t used = 0;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const AttnArgs<T> a = attn_args<T>(in);
    const BwdOut o{dq, dc, df, dlam};
    // attention.cu launch_bwd: fp16/bf16 the tensor-core kernel over the chunk's rectangle where
    // plan.h choose_bwd_tc_plan takes the shapes
    if constexpr (!std::is_same<T, float>::value) {
      const PairRect r = bwd_chunk_rect(pid0, pid0 + n, P);
      const TcPlan t = choose_bwd_tc_plan((int)sizeof(T), Lq, Lc, r.np, cidx != nullptr, limit);
      if (t.gp > 0) {
        const AttnArgs<T> ar = attn_args_rect(a, r);
        const BwdOut orr = bwd_out_rect(o, r, pid0, Lq, Lc, D, cidx != nullptr);
        const int64_t blocks = r.nb * ((r.np + t.gp - 1) / t.gp);
        const size_t smem = (size_t)attn_bwd_tc_layout((int)sizeof(T), 16 * t.mt, t.bc, t.gp).total;
        // mode 0: the gradient from the chunk's first pair, as launch_bwd
        const void* gs = mode == kModeAttended ? static_cast<const void*>(static_cast<const T*>(gsrc) + pid0 * Lq * D)
                                               : gsrc;
        auto go = [&](auto kernel) {
          cuda_emu::launch((unsigned)blocks, kThreads, [&] { kernel(ar, t.bq, t.bc, t.gp, gs, orr); }, smem);
        };
        auto by_mode = [&](auto mt_tag) {
          constexpr int M = decltype(mt_tag)::value;
          if (mode == kModeAlignment) go(attention_bwd_tc_kernel<T, M, kModeAlignment>);
          else go(attention_bwd_tc_kernel<T, M, kModeAttended>);
        };
        switch (t.mt) {
          case 1: by_mode(std::integral_constant<int, 1>()); break;
          case 2: by_mode(std::integral_constant<int, 2>()); break;
          case 3: by_mode(std::integral_constant<int, 3>()); break;
          default: by_mode(std::integral_constant<int, 4>()); break;
        }
        used = 1000 * t.gp + t.mt;
        return;
      }
    }
    const size_t smem = (size_t)attn_bwd_layout(Lq, Lc).total;
    if (mode == kModeAlignment)
      cuda_emu::launch((unsigned)n, kThreads, [&] { attention_bwd_kernel<T, kModeAlignment>(a, pid0, gsrc, o); }, smem);
    else
      cuda_emu::launch((unsigned)n, kThreads, [&] { attention_bwd_kernel<T, kModeAttended>(a, pid0, gsrc, o); }, smem);
  });
  return used;
}

// rar_bwd_kernel (one step, one block per pair, MT as rar_bwd_cuda picks it): dE's direct part,
// dKp, dgp, dwv (fp32); h (B, P, s) the step's input, in the input type; grad (B, P, s).
int64_t emu_rar_bwd(int dtype, const void* grad, const void* E, const int* qlens, const void* h, const void* wq,
                    const void* bq, const void* wk, const void* bk, const void* wv, const void* bv,
                    const void* keep_k, const void* keep_g, int64_t B, int64_t P, int64_t Lq, int64_t S,
                    int64_t limit, float* dE, float* dKp, float* dgp, float* dwv) {
  int64_t used = 0;
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const RarArgs<T> r = rar_args<T>(E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g, P, Lq, S);
    const int mt = choose_rar_mt((int)sizeof(T), Lq, S, limit);
    auto go = [&](auto mt_tag) {
      constexpr int M = decltype(mt_tag)::value;
      cuda_emu::launch((unsigned)(B * P), kThreads, [&] {
        rar_bwd_kernel<T, M>(r, static_cast<const T*>(grad), dE, dKp, dgp, dwv);
      }, (size_t)rar_layout((int)sizeof(T), Lq, S, M).total);
    };
    if (mt == 1) go(std::integral_constant<int, 1>());
    else if (mt == 2) go(std::integral_constant<int, 2>());
    else go(std::integral_constant<int, 4>());
    used = mt;
  });
  return used;
}

// The first h of the RAR forward: the mean of E over each pair's valid rows (rar_mean_kernel), fp32.
void emu_rar_mean(int dtype, const void* E, const int* qlens, int64_t B, int64_t P, int64_t Lq, int64_t S, void* h) {
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cuda_emu::launch((unsigned)(B * P), kThreads,
                     [&] { rar_mean_kernel<T>(static_cast<const T*>(E), qlens, P, Lq, S, static_cast<T*>(h)); });
  });
}

// F = clamp(tanh(M) + F_old, -1, 1) over m in place (rcr_factors_kernel), on a grid of `grid` blocks.
void emu_rcr_factors(int dtype, void* m, const void* f_old, const int* qlens, int64_t rows, int64_t P, int64_t Lq,
                     int64_t D, unsigned grid) {
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cuda_emu::launch(grid, kThreads, [&] {
      rcr_factors_kernel<T>(static_cast<T*>(m), static_cast<const T*>(f_old), qlens, rows, P, Lq, D);
    });
  });
}

// out = epilogue(A B^T + bias) by rcr_gemm_kernel<T, epi>, or rcr_wgmma_kernel<T, epi> under
// emu_set_wgmma(1) (rcr.cu's use_wgmma), fp16/bf16, on rcr.cu's grid: 128 x 256 blocks of the
// (M, N) output, the row block's column blocks back to back.
void emu_rcr_gemm(int dtype, int epi, const void* A, const void* B, const void* bias, const void* f_old,
                  const int* qlens, int64_t M, int64_t N, int64_t K, int64_t P, int64_t Lq, void* out) {
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same<T, float>::value) {
      throw std::runtime_error("the RCR GEMM kernels are fp16/bf16 only");
    } else {
      const int64_t blocks = (M + kRcrBM - 1) / kRcrBM * ((N + kRcrBN - 1) / kRcrBN);
      const size_t smem = (size_t)(use_wgmma ? rcr_wgmma_smem((int)sizeof(T)) : rcr_gemm_smem((int)sizeof(T)));
      const T *a = static_cast<const T*>(A), *b = static_cast<const T*>(B), *bi = static_cast<const T*>(bias),
              *fo = static_cast<const T*>(f_old);
      T* o = static_cast<T*>(out);
      auto run = [&](auto kernel) {
        cuda_emu::launch((unsigned)blocks, kThreads,
                         [&] { kernel(a, b, bi, fo, qlens, M, N, K, P, Lq, o, RcrSmooth<T>{}, RcrGrad<T>{}); }, smem);
      };
      if (use_wgmma)
        epi == kRcrHidden ? run(rcr_wgmma_kernel<T, kRcrHidden>) : run(rcr_wgmma_kernel<T, kRcrFactors>);
      else
        epi == kRcrHidden ? run(rcr_gemm_kernel<T, kRcrHidden>) : run(rcr_gemm_kernel<T, kRcrFactors>);
    }
  });
}

// The rcr_factors_bwd op's kernels as rcr.cu launches them: fp16/bf16 one launch of the RCR GEMM
// kernel's kRcrFactorsBwd epilogue (rcr_wgmma_kernel under emu_set_wgmma(1), else rcr_gemm_kernel),
// gm (n x D) from hidden (n x H) and w2 (D x H); fp32 rcr_factors_bwd_kernel over m = hidden w2^T
// (given: the host's cuBLAS product) on a grid of `grid` blocks. f_old and df may be null.
void emu_rcr_factors_bwd(int dtype, const void* hidden, const void* w2, const void* m, const void* b2,
                         const void* f_old, const void* grad, int64_t n, int64_t D, int64_t H, unsigned grid, void* gm,
                         void* df) {
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const RcrGrad<T> rg{static_cast<const T*>(grad), static_cast<T*>(df)};
    const T *bi = static_cast<const T*>(b2), *fo = static_cast<const T*>(f_old);
    T* out = static_cast<T*>(gm);
    if constexpr (std::is_same<T, float>::value) {
      cuda_emu::launch(grid, kThreads,
                       [&] { rcr_factors_bwd_kernel<T>(static_cast<const T*>(m), bi, fo, n, D, out, rg); });
    } else {
      const int64_t blocks = (n + kRcrBM - 1) / kRcrBM * ((D + kRcrBN - 1) / kRcrBN);
      const size_t smem = (size_t)(use_wgmma ? rcr_wgmma_smem((int)sizeof(T)) : rcr_gemm_smem((int)sizeof(T)));
      const T *h = static_cast<const T*>(hidden), *w = static_cast<const T*>(w2);
      auto run = [&](auto kernel) {
        cuda_emu::launch((unsigned)blocks, kThreads,
                         [&] { kernel(h, w, bi, fo, nullptr, n, D, H, 1, 1, out, RcrSmooth<T>{}, rg); }, smem);
      };
      use_wgmma ? run(rcr_wgmma_kernel<T, kRcrFactorsBwd>) : run(rcr_gemm_kernel<T, kRcrFactorsBwd>);
    }
  });
}

// lam = relu(ws2 . tanh(hs) + bs2 + lam_old), zero past a query length (rcr_smooth_kernel), on a
// grid of `grid` blocks of kWarps rows each (grid-stride over rows).
// rcr_wgmma_kernel<T, kRcrHidden> with the temperatures in its launch, as rcr.cu launches it on an
// sm_90a build (s / 2 <= 128): hidden (rows x H1) = tanh(E w1^T + b1) and lam (rows) = relu(ws2 .
// tanh(E ws1^T + bs1) + bs2 + lam_old), zero at padded rows; E (rows x K), w1 (H1 x K), ws1 (H2 x K);
// lam_old (rows) or null (lam_scalar). A row block's H1 / 256 hidden blocks, then its temperatures.
void emu_rcr_hidden_smooth_wg(int dtype, const void* E, const void* w1, const void* b1, const void* ws1,
                              const void* bs1, const void* ws2, const void* bs2, const void* lam_old, float lam_scalar,
                              const int* qlens, int64_t rows, int64_t H1, int64_t H2, int64_t K, int64_t P, int64_t Lq,
                              void* hidden, void* lam) {
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (std::is_same<T, float>::value) {
      throw std::runtime_error("the RCR GEMM kernels are fp16/bf16 only");
    } else {
      if (H2 > kRcrSmoothBN) throw std::runtime_error("the temperatures' block takes s / 2 <= kRcrSmoothBN");
      const RcrSmooth<T> sm{static_cast<const T*>(ws1), static_cast<const T*>(bs1), static_cast<const T*>(ws2),
                            static_cast<const T*>(bs2), static_cast<const T*>(lam_old), static_cast<T*>(lam), H2,
                            lam_scalar};
      const int64_t blocks = (rows + kRcrBM - 1) / kRcrBM * ((H1 + kRcrBN - 1) / kRcrBN + 1);
      cuda_emu::launch((unsigned)blocks, kThreads, [&] {
        rcr_wgmma_kernel<T, kRcrHidden>(static_cast<const T*>(E), static_cast<const T*>(w1), static_cast<const T*>(b1),
                                        nullptr, qlens, rows, H1, K, P, Lq, static_cast<T*>(hidden), sm,
                                        RcrGrad<T>{});
      }, (size_t)rcr_wgmma_smem((int)sizeof(T)));
    }
  });
}

void emu_rcr_smooth(int dtype, const void* hs, const void* ws2, const void* bs2, const void* lam_old,
                    float lam_scalar, const int* qlens, int64_t rows, int64_t P, int64_t Lq, int64_t H2,
                    unsigned grid, void* lam) {
  by_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cuda_emu::launch(grid, kThreads, [&] {
      rcr_smooth_kernel<T>(static_cast<const T*>(hs), static_cast<const T*>(ws2), static_cast<const T*>(bs2),
                           static_cast<const T*>(lam_old), lam_scalar, qlens, rows, P, Lq, H2, static_cast<T*>(lam));
    });
  });
}

}  // extern "C"
