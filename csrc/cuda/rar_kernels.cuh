// Kernels of the recurrent aggregation regulator (RAR), E held in shared memory (in the input
// dtype); see csrc/README.md for the op contract and kernels/rar.py for the Triton forward.
//
// Per step t:  g = tanh(Wq h + bq) (* keep_g);  K = tanh(E Wk^T + bk) (* keep_k), computed
// 16 MT rows x 256 columns at a time by the block GEMM (tensor cores for fp16/bf16) and never
// stored whole;  logit[q] = sum_n K[q, n] g[n] wv[n] + bv;  a = softmax over valid q;
// h = l2n(sum_q a[q] E[q]).
// Forward: one launch per step, GP pairs of one context item per block (the gate of every pair
// one GEMM on the host before it). Backward: one step, one block per pair.
#pragma once

#include "common.cuh"
#include "wgmma.cuh"

namespace rcar_fast {
namespace cuda {

template <typename T>
struct RarArgs {
  const T* E;        // (B, P, Lq, s) contiguous
  const int* qlens;  // (P,)
  const T* h;        // (B, P, s) contiguous: the step's input (backward; the forward's h is the host's)
  const T* wq;       // (T, s, s)
  const T* bq;       // (T, s)
  const T* wk;       // (T, s, s)
  const T* bk;       // (T, s)
  const T* wv;       // (T, s)
  const T* bv;       // (T,)
  const T* keep_k;   // (B, P, Lq, s) or nullptr
  const T* keep_g;   // (B, P, s) or nullptr
  int64_t P, Lq, S;
};

// Shared memory of one RAR block, carved from the layout.
template <typename T>
struct RarSmem {
  T* es;
  T* ws;
  float *y, *h, *g, *gw, *du, *logit, *a, *red;
  RarLayout L;

  __device__ __forceinline__ RarSmem(unsigned char* smem, int64_t Lq, int64_t S, int mt) {
    L = rar_layout((int)sizeof(T), Lq, S, mt);
    es = reinterpret_cast<T*>(smem + L.es);
    ws = reinterpret_cast<T*>(smem + L.ws);
    y = reinterpret_cast<float*>(smem + L.y);
    h = reinterpret_cast<float*>(smem + L.h);
    g = reinterpret_cast<float*>(smem + L.g);
    gw = reinterpret_cast<float*>(smem + L.gw);
    du = reinterpret_cast<float*>(smem + L.du);
    logit = reinterpret_cast<float*>(smem + L.logit);
    a = reinterpret_cast<float*>(smem + L.a);
    red = reinterpret_cast<float*>(smem + L.red);
  }
};

// E of the pair (rows < qlen; zeros elsewhere, padding columns included) into es. No barrier.
template <typename T>
__device__ __forceinline__ void load_e(const RarArgs<T>& r, const RarSmem<T>& sm, int64_t pid, int qlen) {
  const int64_t S = r.S;
  const T* Ep = r.E + pid * r.Lq * S;
  const int sk = sm.L.sk, lde = sm.L.lde;
  for (int64_t idx = threadIdx.x; idx < (int64_t)sm.L.rows * sk; idx += kThreads) {
    const int q = (int)(idx / sk), m = (int)(idx - (int64_t)q * sk);
    sm.es[q * lde + m] = (q < qlen && m < S) ? Ep[q * S + m] : from_f<T>(0.f);
  }
}

// g[n] = tanh(Wq_t h + bq_t)[n] (before dropout), gw[n] = g[n] keep_g[n] wv_t[n]; warp per n.
// Needs h complete (barrier before); no barrier after.
template <typename T>
__device__ __forceinline__ void query_gate(const RarArgs<T>& r, const RarSmem<T>& sm, int64_t pid, int64_t t) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t S = r.S;
  for (int64_t n = warp; n < S; n += kWarps) {
    const T* wrow = r.wq + (t * S + n) * S;
    float acc = 0.f;
    for (int64_t m = lane; m < S; m += 32) acc = fmaf(to_f(wrow[m]), sm.h[m], acc);
    acc = warp_sum(acc);
    if (lane == 0) {
      const float gv = tanhf(acc + to_f(r.bq[t * S + n]));
      const float kg = r.keep_g != nullptr ? to_f(r.keep_g[pid * S + n]) : 1.f;
      sm.g[n] = gv;
      sm.gw[n] = gv * kg * to_f(r.wv[t * S + n]);
    }
  }
}

// logit[q] = sum_n tanh(E Wk_t^T + bk_t)[q, n] keep_k[q, n] gw[n] + bv_t for q < qlen.
// kout (bwd): also stores K = tanh(.) (before dropout) at kout[q * S + n]. Needs es, gw complete
// (barrier before); ends with a barrier.
template <typename T, int MT>
__device__ __forceinline__ void key_logits(const RarArgs<T>& r, const RarSmem<T>& sm, int64_t pid, int64_t t,
                                           int qlen, float* kout) {
  constexpr int RG = 16 * MT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t S = r.S;
  const int ldo = ld_op((int)sizeof(T));
  const T* wk = r.wk + t * S * S;
  const T* kk = r.keep_k != nullptr ? r.keep_k + pid * r.Lq * S : nullptr;
  for (int q = tid; q < sm.L.rows; q += kThreads) sm.logit[q] = 0.f;
  for (int r0 = 0; r0 < qlen; r0 += RG) {
    for (int64_t n0 = 0; n0 < S; n0 += kNG) {
      BlockGemm<T, MT> gemm;
      gemm.zero();
      for (int m0 = 0; m0 < sm.L.sk; m0 += kBD) {
        load_weight_chunk(wk, S, S, n0, m0, sm.ws, ldo);
        __syncthreads();
        gemm.chunk(sm.es + r0 * sm.L.lde + m0, sm.L.lde, sm.ws, ldo);
        __syncthreads();
      }
      gemm.store(sm.y, kLDY);
      __syncthreads();
      for (int rr = warp; rr < RG; rr += kWarps) {
        const int q = r0 + rr;
        if (q >= qlen) break;
        float part = 0.f;
        for (int nl = lane; nl < kNG && n0 + nl < S; nl += 32) {
          const int64_t n = n0 + nl;
          const float K = tanhf(sm.y[rr * kLDY + nl] + to_f(r.bk[t * S + n]));
          if (kout != nullptr) kout[q * S + n] = K;
          const float kv = kk != nullptr ? K * to_f(kk[q * S + n]) : K;
          part = fmaf(kv, sm.gw[n], part);
        }
        part = warp_sum(part);
        if (lane == 0) sm.logit[q] += part;   // row q belongs to this warp here
      }
      __syncthreads();
    }
  }
}

// a[q] = softmax over q < qlen of logit[q] + bv_t (warp 0). Ends with a barrier.
template <typename T>
__device__ __forceinline__ void softmax_rows(const RarArgs<T>& r, const RarSmem<T>& sm, int64_t t, int qlen) {
  if ((threadIdx.x >> 5) == 0) {
    const int lane = threadIdx.x & 31;
    const float bv = to_f(r.bv[t]);
    float m = -INFINITY;
    for (int q = lane; q < qlen; q += 32) m = fmaxf(m, sm.logit[q] + bv);
    m = warp_max(m);
    float sum = 0.f;
    for (int q = lane; q < qlen; q += 32) sum += expf(sm.logit[q] + bv - m);
    sum = warp_sum(sum);
    const float rs = 1.f / sum;
    for (int q = lane; q < qlen; q += 32) sm.a[q] = expf(sm.logit[q] + bv - m) * rs;
  }
  __syncthreads();
}

// u[m] = sum_q a[q] E[q, m] into dst (m < S; zero up to sk); returns |u|^2 (block-wide).
template <typename T>
__device__ __forceinline__ float attend(const RarSmem<T>& sm, int64_t S, int qlen, float* dst) {
  float ss = 0.f;
  for (int m = threadIdx.x; m < sm.L.sk; m += kThreads) {
    float u = 0.f;
    if (m < S)
      for (int q = 0; q < qlen; ++q) u = fmaf(sm.a[q], to_f(sm.es[q * sm.L.lde + m]), u);
    dst[m] = u;
    ss = fmaf(u, u, ss);
  }
  return block_sum(ss, sm.red);
}

// ---------------------------------------------------------------- forward: the first h
// h[pid, m] = mean over q < qlen of E[pid, q, m], summed in fp32 and written in E's type (zeros when
// qlen is 0), one block per pair.
template <typename T>
__global__ void __launch_bounds__(kThreads) rar_mean_kernel(const T* __restrict__ E, const int* __restrict__ qlens,
                                                            int64_t P, int64_t Lq, int64_t S, T* __restrict__ h) {
  const int64_t pid = blockIdx.x;
  const int n = clamp_len(qlens[pid % P], Lq);
  const T* e = E + pid * Lq * S;
  for (int64_t m = threadIdx.x; m < S; m += kThreads) {
    float v = 0.f;
    for (int q = 0; q < n; ++q) v += to_f(e[q * S + m]);
    h[pid * S + m] = from_f<T>(n > 0 ? v / (float)n : 0.f);
  }
}

// The scoring layer in a RAR step's launch (rar_fwd_wg_kernel; w null: h written instead):
// out[pair] = sigmoid(w . h + b[0]) in fp32 from h rounded to E's dtype; w (s,), b (1,), out
// (B * P,) float32.
struct RarScore {
  const float* w;
  const float* b;
  float* out;
};

// ---------------------------------------------------------------- forward: GP pairs per block (shared parts)
// Block x of a RAR forward launch: pairs p0 .. p0 + gp - 1 of context item b (x = b * groups +
// p0 / gp, groups = ceil(P / gp)). rar_block_pid0: the pair id b * P + p0 of its first pair.
// rar_block_pairs: qls[g] = pair g's query length (0 past P, up to MAXGP), and the block's pairs
// (fewer than gp in a partial last block); holds a barrier: every thread calls it.
__device__ __forceinline__ int64_t rar_block_pid0(int64_t P, int gp) {
  const int64_t groups = (P + gp - 1) / gp, b = (int64_t)blockIdx.x / groups;
  return b * P + ((int64_t)blockIdx.x - b * groups) * gp;
}

template <int MAXGP, typename T>
__device__ __forceinline__ int rar_block_pairs(const RarArgs<T>& r, int gp, int* qls) {
  const int64_t P = r.P, p0 = rar_block_pid0(P, gp) % P;
  const int np = (int)(P - p0 < gp ? P - p0 : gp);
  if (threadIdx.x < MAXGP) qls[threadIdx.x] = (int)threadIdx.x < np ? clamp_len(r.qlens[p0 + threadIdx.x], r.Lq) : 0;
  __syncthreads();
  return np;
}

// gws[g * sk + m] = tanh(pre[pair g, m]) keep_g[pair g, m] wv_t[m] in fp32 for the block's pairs
// pid0 .. pid0 + np - 1 (zeros past s and for g >= np, up to gp). No barrier.
template <typename T>
__device__ __forceinline__ void rar_stage_gates(const RarArgs<T>& r, const T* __restrict__ pre, int64_t pid0, int np,
                                                int gp, int sk, int64_t t, float* gws) {
  const int64_t S = r.S;
  for (int idx = threadIdx.x; idx < gp * sk; idx += kThreads) {
    const int g = idx / sk, m = idx - g * sk;
    float v = 0.f;
    if (g < np && m < S) {
      const int64_t at = (pid0 + g) * S + m;
      const float kg = r.keep_g != nullptr ? to_f(r.keep_g[at]) : 1.f;
      v = tanhf(to_f(pre[at])) * kg * to_f(r.wv[t * S + m]);
    }
    gws[idx] = v;
  }
}

// a[g * bq + q] = softmax over q < qls[g] of logit[g * bq + q] + bv, for the block's np pairs (warp w
// for pairs w, w + 8, ...). Ends with a barrier: every thread calls it.
__device__ __forceinline__ void rar_block_softmax(const float* logit, float bv, const int* qls, int np, int bq,
                                                  float* a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int g = warp; g < np; g += kWarps) {
    const int n = qls[g];
    const float* lg = logit + g * bq;
    float m = -INFINITY;
    for (int q = lane; q < n; q += 32) m = fmaxf(m, lg[q] + bv);
    m = warp_max(m);
    float sum = 0.f;
    for (int q = lane; q < n; q += 32) sum += expf(lg[q] + bv - m);
    sum = warp_sum(sum);
    const float rs = 1.f / sum;
    for (int q = lane; q < n; q += 32) a[g * bq + q] = expf(lg[q] + bv - m) * rs;
  }
  __syncthreads();
}

// ---------------------------------------------------------------- forward: one step, GP pairs per block
// Step t for the pairs p0 .. p0 + gp - 1 of context item b (block x = b * groups + p0 / gp,
// groups = ceil(P / gp)); pair g's rows g * bq .. g * bq + qlen - 1 of es. pre (B, P, s) in E's type:
// each pair's gate pre-activation Wq_t h + bq_t (one GEMM over every pair on the host); staged here as
// gw = tanh(pre) keep_g wv_t in fp32. Writes h_out (B, P, s) in E's type: h = l2n(sum_q a[q] E[q])
// (zeros for a pair without valid rows), the type the next step's GEMM reads it in.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 1) rar_fwd_kernel(const RarArgs<T> r, int bq, int gp, int64_t t,
                                                           const T* __restrict__ pre,
                                                           T* __restrict__ h_out) {
  constexpr int RG = 16 * MT;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t S = r.S, P = r.P, Lq = r.Lq;
  const RarStepLayout L = rar_step_layout((int)sizeof(T), gp * bq, S, MT, gp);
  T* es = reinterpret_cast<T*>(smem + L.es);
  T* ws = reinterpret_cast<T*>(smem + L.ws);
  float* y = reinterpret_cast<float*>(smem + L.y);
  float* gws = reinterpret_cast<float*>(smem + L.gw);
  float* u = reinterpret_cast<float*>(smem + L.u);
  float* logit = reinterpret_cast<float*>(smem + L.logit);
  float* a = reinterpret_cast<float*>(smem + L.a);
  float* red = reinterpret_cast<float*>(smem + L.red);
  int* qls = reinterpret_cast<int*>(smem + L.qls);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sk = L.sk, lde = L.lde, ldo = ld_op((int)sizeof(T));
  const int np = rar_block_pairs<kTcMaxGP>(r, gp, qls);   // pairs in this block
  const int64_t pid0 = rar_block_pid0(P, gp);            // pair id of g = 0

  // E of every pair (valid rows; zeros elsewhere, padding columns included), the gates, zero logits
  const int rows = L.rows;
  for (int64_t idx = tid; idx < (int64_t)rows * sk; idx += kThreads) {
    const int rr = (int)(idx / sk), m = (int)(idx - (int64_t)rr * sk);
    const int g = rr / bq, q = rr - g * bq;
    T v = from_f<T>(0.f);
    if (g < gp && q < qls[g] && m < S) v = r.E[((pid0 + g) * Lq + q) * S + m];
    es[rr * lde + m] = v;
  }
  rar_stage_gates(r, pre, pid0, np, gp, sk, t, gws);
  for (int rr = tid; rr < rows; rr += kThreads) logit[rr] = 0.f;
  __syncthreads();

  // logit[row] = sum_n tanh(E Wk_t^T + bk_t)[row, n] keep_k[row, n] gw[n], 16 MT rows x 256 columns at a time
  const T* wk = r.wk + t * S * S;
  for (int r0 = 0; r0 < rows; r0 += RG) {
    for (int64_t n0 = 0; n0 < S; n0 += kNG) {
      BlockGemm<T, MT> gemm;
      gemm.zero();
      for (int m0 = 0; m0 < sk; m0 += kBD) {
        load_weight_chunk(wk, S, S, n0, m0, ws, ldo);
        __syncthreads();
        gemm.chunk(es + r0 * lde + m0, lde, ws, ldo);
        __syncthreads();
      }
      gemm.store(y, kLDY);
      __syncthreads();
      for (int rl = warp; rl < RG; rl += kWarps) {
        const int rr = r0 + rl, g = rr / bq, q = rr - g * bq;
        if (g >= gp || q >= qls[g]) continue;
        const T* kk = r.keep_k != nullptr ? r.keep_k + ((pid0 + g) * Lq + q) * S : nullptr;
        float part = 0.f;
        for (int nl = lane; nl < kNG && n0 + nl < S; nl += 32) {
          const int64_t n = n0 + nl;
          const float K = tanhf(y[rl * kLDY + nl] + to_f(r.bk[t * S + n]));
          const float kv = kk != nullptr ? K * to_f(kk[n]) : K;
          part = fmaf(kv, gws[g * sk + n], part);
        }
        part = warp_sum(part);
        if (lane == 0) logit[rr] += part;   // row rr belongs to this warp here
      }
      __syncthreads();
    }
  }

  rar_block_softmax(logit, to_f(r.bv[t]), qls, np, bq, a);

  // h = l2n(sum_q a[q] E[q]) per pair
  for (int g = 0; g < np; ++g) {
    const int n = qls[g];
    float ss = 0.f;
    for (int m = tid; m < sk; m += kThreads) {
      float v = 0.f;
      if (m < S)
        for (int q = 0; q < n; ++q) v = fmaf(a[g * bq + q], to_f(es[(g * bq + q) * lde + m]), v);
      u[m] = v;
      ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, red);   // barriers before and after
    const float rn = 1.f / (sqrtf(ss) + kEps);
    for (int64_t m = tid; m < S; m += kThreads) h_out[(pid0 + g) * S + m] = from_f<T>(n > 0 ? u[m] * rn : 0.f);
    __syncthreads();           // u is rewritten by the next pair
  }
}

// ---------------------------------------------------------------- forward: one step on wgmma (sm_90a, 128-row blocks)
// rar_fwd_wg_kernel (plan.h choose_rar_wg_plan, where launch.h use_wgmma says): rar_fwd_kernel's
// step for GP = 128 / Lq packed pairs of context item b, with K = E Wk_t^T on wgmma (wgmma.cuh):
// E staged once as core matrices (128 x sk), Wk_t kBD columns of K at a time (kNG x kBD; zeros past
// s), warpgroup w one m64n256k16 per 16 of K over rows 64 w .. 64 w + 63. The logits from the
// accumulator registers: a row's 256 columns are in 4 lanes (acc_col), summed by two shuffles.
// Then the softmax and h = l2n(sum_q a[q] E[q]) per pair, a warp per pair. s <= 256.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) rar_fwd_wg_kernel(const RarArgs<T> r, int bq, int gp, int64_t t,
                                                              const T* __restrict__ pre, T* __restrict__ h_out,
                                                              const RarScore score) {
  static_assert(!std::is_same<T, float>::value, "16-bit operands");
  static_assert(kThreads == 256 && kWgRows == 128 && kBD == 32 && kNG == 256, "2 warpgroups of 64 rows");
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t S = r.S, P = r.P, Lq = r.Lq;
  const RarWgLayout L = rar_wg_layout((int)sizeof(T), gp, S);
  unsigned char* es = smem + L.es;
  unsigned char* ws = smem + L.ws;
  float* gws = reinterpret_cast<float*>(smem + L.gw);
  float* logit = reinterpret_cast<float*>(smem + L.logit);
  float* a = reinterpret_cast<float*>(smem + L.a);
  int* qls = reinterpret_cast<int*>(smem + L.qls);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wt = tid & 127, r0 = 64 * (tid >> 7);
  const int sk = L.sk;
  const int np = rar_block_pairs<kWgMaxGP>(r, gp, qls);   // pairs in this block
  const int64_t pid0 = rar_block_pid0(P, gp);            // pair id of g = 0
  auto row_valid = [&](int rr) {
    const int g = rr / bq;
    return g < gp && rr - g * bq < qls[g];
  };
  auto e_at = [&](int rr, int m) { return reinterpret_cast<const T*>(es + wg_core_offset(rr, m, sk)); };

  // E of every pair as core matrices (unit u: 8 columns of one row, at byte 16 u; zeros past s and
  // in rows of no pair), 16-byte loads where E is 16-byte aligned and s a multiple of 8
  const bool evec = S % 8 == 0 && reinterpret_cast<uintptr_t>(r.E) % 16 == 0;
  for (int u = tid; u < kWgRows * sk / 8; u += kThreads) {
    const int rr = (u / sk) * 8 + (u & 7), m = ((u % sk) >> 3) * 8;
    const int g = rr / bq;
    const T* src = row_valid(rr) ? r.E + ((pid0 + g) * Lq + (rr - g * bq)) * S + m : nullptr;
    if (evec) {
      *reinterpret_cast<uint4*>(es + 16 * u) =
          src != nullptr && m < S ? *reinterpret_cast<const uint4*>(src) : uint4{0u, 0u, 0u, 0u};
    } else {
      T v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = src != nullptr && m + e < S ? src[e] : from_f<T>(0.f);
      store8(reinterpret_cast<T*>(es + 16 * u), v);
    }
  }
  rar_stage_gates(r, pre, pid0, np, gp, sk, t, gws);

  // Y = E Wk_t^T (128 x 256), kBD columns of K a chunk
  const T* wk = r.wk + t * S * S;
  const bool wvec = S % 8 == 0 && reinterpret_cast<uintptr_t>(wk) % 16 == 0;
  constexpr int kWPer = kNG * kBD / 8 / kThreads;
  float yacc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) yacc[i] = 0.f;
  for (int k0 = 0; k0 < sk; k0 += kBD) {
    if (wvec) {   // all of a thread's 16-byte loads before its stores
      uint4 w8[kWPer];
#pragma unroll
      for (int j = 0; j < kWPer; ++j) {
        const int u = tid + j * kThreads, n = core_unit_row(u), k = k0 + core_unit_col(u);
        w8[j] = n < S && k < S ? *reinterpret_cast<const uint4*>(wk + n * S + k) : uint4{0u, 0u, 0u, 0u};
      }
#pragma unroll
      for (int j = 0; j < kWPer; ++j) *reinterpret_cast<uint4*>(ws + 16 * (tid + j * kThreads)) = w8[j];
    } else {
      load_weight_chunk<T, kNG, true>(wk, S, S, 0, k0, reinterpret_cast<T*>(ws), 0);
    }
    wg::proxy_fence();   // this thread's stores of Wk (and, the first time, of E), visible to wgmma
    __syncthreads();
    wg::batch(yacc, [&] {
#pragma unroll
      for (int kk = 0; kk < kBD; kk += 16)
        wg::mma_m64k16<T, kNG>(yacc, wg::desc(es + wg_core_offset(r0, k0 + kk, sk), 128, sk * 16),
                               wg::desc(ws + wg_core_offset(0, kk, kBD), 128, kBD * 16));
    });
    __syncthreads();   // ws free for the next chunk
  }

  // logit[row] = sum_n tanh(Y + bk_t)[row, n] keep_k[row, n] gw[n]: register 4 m + 2 h + j holds row
  // r0 + acc_row(wt, 2 h), column 8 m + 2 (wt % 4) + j
  const int c0 = 2 * (wt & 3);
  const T* bk = r.bk + t * S;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rr = r0 + wg::acc_row(wt, 2 * h), g = rr / bq;
    const bool live = row_valid(rr);
    const T* kk = live && r.keep_k != nullptr ? r.keep_k + ((pid0 + g) * Lq + (rr - g * bq)) * S : nullptr;
    const float* gw = gws + (live ? g : 0) * sk;
    float part = 0.f;
    if (live) {
#pragma unroll
      for (int m = 0; m < 32; ++m)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n = 8 * m + c0 + j;
          if (n < S) {
            const float K = tanhf(yacc[4 * m + 2 * h + j] + to_f(bk[n]));
            part = fmaf(kk != nullptr ? K * to_f(kk[n]) : K, gw[n], part);
          }
        }
    }
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    if ((wt & 3) == 0) logit[rr] = part;
  }
  __syncthreads();

  rar_block_softmax(logit, to_f(r.bv[t]), qls, np, bq, a);

  // h = l2n(sum_q a[q] E[q]) per pair, warp w for pairs w, w + 8, ...: lane l holds columns l + 32 i
  for (int g = warp; g < np; g += kWarps) {
    const int n = qls[g];
    float u[kNG / 32];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < kNG / 32; ++i) {
      const int m = lane + 32 * i;
      float v = 0.f;
      if (m < S)
        for (int q = 0; q < n; ++q) v = fmaf(a[g * bq + q], to_f(*e_at(g * bq + q, m)), v);
      u[i] = v;
      ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    const float rn = 1.f / (sqrtf(ss) + kEps);
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kNG / 32; ++i) {
      const int m = lane + 32 * i;
      if (m >= S) continue;
      const T hv = from_f<T>(n > 0 ? u[i] * rn : 0.f);
      if (score.w != nullptr)
        dot = fmaf(to_f(hv), score.w[m], dot);   // h rounded to E's dtype, as rar returns it
      else
        h_out[(pid0 + g) * S + m] = hv;
    }
    if (score.w != nullptr) {
      dot = warp_sum(dot);
      if (lane == 0) score.out[pid0 + g] = 1.f / (1.f + expf(-(dot + score.b[0])));
    }
  }
}

// ---------------------------------------------------------------- backward: one step (t = 0)
// grad: dL/dh_out (B, P, s). Writes dE (B, P, Lq, s) without the E Wk^T path (the host adds
// dKp Wk), dKp (B, P, Lq, s) = dL/d(E Wk^T + bk), dgp (B, P, s) = dL/d(Wq h + bq),
// dwv (B, P, s) = sum_q dlogit[q] K[q, n] g[n] (dropout applied); zeros at padded rows.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 1) rar_bwd_kernel(const RarArgs<T> r, const T* __restrict__ grad,
                                                           float* __restrict__ dE, float* __restrict__ dKp,
                                                           float* __restrict__ dgp, float* __restrict__ dwv) {
  extern __shared__ __align__(128) unsigned char smem[];
  const RarSmem<T> sm(smem, r.Lq, r.S, MT);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t pid = blockIdx.x, S = r.S, Lq = r.Lq;
  const int64_t p = pid % r.P;
  const int qlen = clamp_len(r.qlens[p], Lq);
  float* dEp = dE + pid * Lq * S;
  float* dKpp = dKp + pid * Lq * S;
  // padded rows (all rows when qlen == 0) are zero
  for (int64_t idx = (int64_t)qlen * S + tid; idx < Lq * S; idx += kThreads) {
    dEp[idx] = 0.f;
    dKpp[idx] = 0.f;
  }
  if (qlen == 0) {
    for (int64_t m = tid; m < S; m += kThreads) {
      dgp[pid * S + m] = 0.f;
      dwv[pid * S + m] = 0.f;
    }
    return;
  }
  load_e(r, sm, pid, qlen);
  for (int m = tid; m < sm.L.sk; m += kThreads) sm.h[m] = m < S ? to_f(r.h[pid * S + m]) : 0.f;
  __syncthreads();
  query_gate(r, sm, pid, 0);
  __syncthreads();
  key_logits<T, MT>(r, sm, pid, 0, qlen, dKpp);   // K stored in dKp, overwritten below
  softmax_rows(r, sm, 0, qlen);

  // h_out = l2n(u): du = grad / (|u| + eps) - u (u . grad) / (|u| (|u| + eps)^2)
  const float uu = attend(sm, S, qlen, sm.du);
  float ug = 0.f;
  for (int64_t m = tid; m < S; m += kThreads) ug = fmaf(sm.du[m], to_f(grad[pid * S + m]), ug);
  ug = block_sum(ug, sm.red);
  const float nu = sqrtf(uu);
  const float inu = 1.f / (nu + kEps);
  const float coef = nu > 0.f ? ug / (nu * (nu + kEps) * (nu + kEps)) : 0.f;
  for (int64_t m = tid; m < S; m += kThreads) sm.du[m] = to_f(grad[pid * S + m]) * inu - sm.du[m] * coef;
  __syncthreads();

  // da[q] = E[q] . du (into logit), then dlogit[q] = a[q] (da[q] - sum a da)
  for (int q = warp; q < qlen; q += kWarps) {
    float acc = 0.f;
    for (int64_t m = lane; m < S; m += 32) acc = fmaf(to_f(sm.es[q * sm.L.lde + m]), sm.du[m], acc);
    acc = warp_sum(acc);
    if (lane == 0) sm.logit[q] = acc;
  }
  __syncthreads();
  float sad = 0.f;
  for (int q = tid; q < qlen; q += kThreads) sad = fmaf(sm.a[q], sm.logit[q], sad);
  sad = block_sum(sad, sm.red);
  for (int q = tid; q < qlen; q += kThreads) sm.logit[q] = sm.a[q] * (sm.logit[q] - sad);
  __syncthreads();
  const float* dlogit = sm.logit;

  // dE = a[q] du[m] (the rest, dKp Wk, on the host)
  for (int64_t idx = tid; idx < (int64_t)qlen * S; idx += kThreads) {
    const int q = (int)(idx / S);
    dEp[idx] = sm.a[q] * sm.du[idx - (int64_t)q * S];
  }
  // per column n: dKp, dwv, dgp (K read back from dKp, written there by key_logits)
  const T* kk = r.keep_k != nullptr ? r.keep_k + pid * Lq * S : nullptr;
  for (int64_t n = tid; n < S; n += kThreads) {
    const float kg = r.keep_g != nullptr ? to_f(r.keep_g[pid * S + n]) : 1.f;
    const float wvn = to_f(r.wv[n]);
    const float gw = sm.gw[n];   // g keep_g wv
    float col = 0.f;
    for (int q = 0; q < qlen; ++q) {
      const float K = dKpp[q * S + n];
      const float km = kk != nullptr ? to_f(kk[q * S + n]) : 1.f;
      col = fmaf(dlogit[q], K * km, col);
      dKpp[q * S + n] = dlogit[q] * gw * km * (1.f - K * K);
    }
    const float g = sm.g[n];
    dwv[pid * S + n] = col * g * kg;
    dgp[pid * S + n] = col * wvn * kg * (1.f - g * g);
  }
}

}  // namespace cuda
}  // namespace rcar_fast
