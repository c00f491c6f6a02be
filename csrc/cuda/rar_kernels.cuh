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
  const int64_t groups = (P + gp - 1) / gp;
  const int64_t b = (int64_t)blockIdx.x / groups;
  const int64_t p0 = ((int64_t)blockIdx.x - b * groups) * gp;
  const int np = (int)(P - p0 < gp ? P - p0 : gp);   // pairs in this block
  const int64_t pid0 = b * P + p0;                      // pair id of g = 0
  if (tid < kTcMaxGP) qls[tid] = tid < np ? clamp_len(r.qlens[p0 + tid], Lq) : 0;
  __syncthreads();

  // E of every pair (valid rows; zeros elsewhere, padding columns included), the gates, zero logits
  const int rows = L.rows;
  for (int64_t idx = tid; idx < (int64_t)rows * sk; idx += kThreads) {
    const int rr = (int)(idx / sk), m = (int)(idx - (int64_t)rr * sk);
    const int g = rr / bq, q = rr - g * bq;
    T v = from_f<T>(0.f);
    if (g < gp && q < qls[g] && m < S) v = r.E[((pid0 + g) * Lq + q) * S + m];
    es[rr * lde + m] = v;
  }
  for (int idx = tid; idx < gp * sk; idx += kThreads) {
    const int g = idx / sk, m = idx - g * sk;
    float v = 0.f;
    if (g < np && m < S) {
      const int64_t at = (pid0 + g) * S + m;
      const float kg = r.keep_g != nullptr ? to_f(r.keep_g[at]) : 1.f;
      v = tanhf(to_f(pre[at])) * kg * to_f(r.wv[t * S + m]);
    }
    gws[idx] = v;
  }
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

  // a = softmax over each pair's valid rows of logit + bv_t (warp w for pairs w, w + 8, ...)
  const float bv = to_f(r.bv[t]);
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
