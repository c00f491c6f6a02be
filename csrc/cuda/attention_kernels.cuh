// Kernels of the fused adaptive attention (forward and backward), one thread block per
// (context item b, query item p) pair; see csrc/README.md for the op contract and
// kernels/attention.py for the same computation in Triton.
//
// Per pair, with Q (Lq x d), C (Lc x d), F (Lq x d) read in place (rows past a length are never
// read), and G = C C^T precomputed per context item (gram_kernel):
//   pass 1 over d:  S0 = (F * Q) C^T                                  (fp32, SIMT)
//   on chip:        S = LeakyReLU_0.1(S0); N[c] = ||S[:, c]||; P = softmax_c(lam[q] S / (N + eps))
//                   |U[q]| = sqrt(P[q] G P[q]^T), the norm of U = P C before U exists
//   pass 2 over d:  A = P C / (|U| + eps) chunk by chunk, then by mode:
//                   0 store A;  1 Y += (Q - A)^2 W^T (block GEMM: tensor cores for fp16/bf16),
//                   then E = l2n(Y + b);  2 store (Q - A)^2 in fp32 (the backward's scratch)
#pragma once

#include "common.cuh"
#include "wgmma.cuh"

namespace rcar_fast {
namespace cuda {

template <typename T>
struct AttnArgs {
  const T* q;          // (P, Lq, d), last dim contiguous
  const int* qlens;    // (P,)
  const T* c;          // (B, Lc, d), last dim contiguous
  const int* clens;    // (B,)
  const int* cidx;     // (P,) the context item of each pair (paired; the output's B is 1), or nullptr
  const T* f;          // (B, P, Lq, d) last dim contiguous, or nullptr (all ones)
  const T* lam;        // (B, P, Lq) any strides, or nullptr (lam_scalar)
  const T* w;          // (s, d) contiguous (mode 1)
  const T* bias;       // (s,) (mode 1)
  const float* gram;   // (B, Lc, Lc) fp32, C C^T over valid rows, zero elsewhere
  int64_t P, Lq, Lc, D, S;
  int64_t sq_p, sq_l, sc_b, sc_l, sf_b, sf_p, sf_l, sl_b, sl_p, sl_l;
  float lam_scalar;
};

// a's pairs restricted to the rectangle r of the pair grid (plan.h PairRect: context items r.b0 ..,
// pairs r.p0 .. of each; paired: r.b0 = 0): a kernel's b and p then count from there and P = r.np,
// so its output rows are the rectangle's, in pid order (the backward's chunks). Host side.
template <typename T>
inline AttnArgs<T> attn_args_rect(AttnArgs<T> a, const PairRect& r) {
  a.q += r.p0 * a.sq_p;
  a.qlens += r.p0;
  if (a.cidx != nullptr) {
    a.cidx += r.p0;
  } else {
    a.c += r.b0 * a.sc_b;
    a.clens += r.b0;
    a.gram += r.b0 * a.Lc * a.Lc;
  }
  if (a.f != nullptr) a.f += r.b0 * a.sf_b + r.p0 * a.sf_p;
  if (a.lam != nullptr) a.lam += r.b0 * a.sl_b + r.p0 * a.sl_p;
  a.P = r.np;
  return a;
}

// ---------------------------------------------------------------- G = C C^T per context item
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) gram_kernel(const T* __restrict__ c, const int* __restrict__ clens,
                                                        int64_t Lc, int64_t D, int64_t sc_b, int64_t sc_l,
                                                        float* __restrict__ gram) {
  extern __shared__ __align__(128) unsigned char smem[];
  const GramLayout L = gram_layout(Lc);
  float* cs = reinterpret_cast<float*>(smem + L.cs);
  float* G = reinterpret_cast<float*>(smem + L.G);
  const int64_t b = blockIdx.x;
  const int clen = clamp_len(clens[b], Lc);
  const T* cb = c + b * sc_b;
  const int tid = threadIdx.x;
  for (int idx = tid; idx < clen * clen; idx += kThreads) G[idx] = 0.f;
  __syncthreads();
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    for (int idx = tid; idx < clen * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      cs[r * kLDF + k] = d < D ? to_f(cb[r * sc_l + d]) : 0.f;
    }
    __syncthreads();
    for (int idx = tid; idx < clen * clen; idx += kThreads) {
      const int i = idx / clen, j = idx - i * clen;
      float acc = 0.f;
#pragma unroll 8
      for (int k = 0; k < kBD; ++k) acc = fmaf(cs[i * kLDF + k], cs[j * kLDF + k], acc);
      G[idx] += acc;
    }
    __syncthreads();
  }
  float* gb = gram + b * Lc * Lc;
  for (int64_t idx = tid; idx < Lc * Lc; idx += kThreads) {
    const int i = (int)(idx / Lc), j = (int)(idx - i * Lc);
    gb[idx] = (i < clen && j < clen) ? G[i * clen + j] : 0.f;
  }
}

// ---------------------------------------------------------------- pass 1: S0 = (F * Q) C^T
// qp, cb, fp: row 0 of the pair's query, context and factors. S: qlen x clen (row stride ldS),
// xs, cs: chunk buffers. Ends with a barrier.
template <typename T>
__device__ __forceinline__ void scores_pass(const T* __restrict__ qp, int64_t sq_l, const T* __restrict__ cb,
                                            int64_t sc_l, const T* __restrict__ fp, int64_t sf_l, int qlen,
                                            int clen, int64_t D, float* S, int ldS, float* xs, float* cs) {
  const int tid = threadIdx.x;
  const int n = qlen * clen;
  for (int idx = tid; idx < n; idx += kThreads) {
    const int q = idx / clen;
    S[q * ldS + idx - q * clen] = 0.f;
  }
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    for (int idx = tid; idx < qlen * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      float v = 0.f;
      if (d < D) {
        v = to_f(qp[r * sq_l + d]);
        if (fp != nullptr) v *= to_f(fp[r * sf_l + d]);
      }
      xs[r * kLDF + k] = v;
    }
    for (int idx = tid; idx < clen * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      cs[r * kLDF + k] = d < D ? to_f(cb[r * sc_l + d]) : 0.f;
    }
    __syncthreads();
    for (int idx = tid; idx < n; idx += kThreads) {
      const int q = idx / clen, cc = idx - q * clen;
      const float* x = xs + q * kLDF;
      const float* y = cs + cc * kLDF;
      float acc = 0.f;
#pragma unroll 8
      for (int k = 0; k < kBD; ++k) acc = fmaf(x[k], y[k], acc);
      S[q * ldS + cc] += acc;
    }
    __syncthreads();
  }
  if (D <= 0) __syncthreads();
}

// ---------------------------------------------------------------- on chip: S -> P, |U|
// S (qlen x clen, stride ldS) holds S0 on entry and LeakyReLU(S0) on exit; P (may alias S) gets
// the probabilities; nrm the column norms; un (optional) |U|, inv 1 / (|U| + eps).
// G: the context item's Gram matrix (global, row stride ldG). Ends with a barrier.
__device__ __forceinline__ void attention_probs(float* S, float* P, int ldS, int qlen, int clen, float* nrm,
                                                const float* lam_s, const float* __restrict__ G, int64_t ldG,
                                                float* un, float* inv) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int idx = tid; idx < qlen * clen; idx += kThreads) {
    const int q = idx / clen, c = idx - q * clen;
    const float s = S[q * ldS + c];
    S[q * ldS + c] = s > 0.f ? s : 0.1f * s;
  }
  __syncthreads();
  for (int c = tid; c < clen; c += kThreads) {
    float acc = 0.f;
    for (int q = 0; q < qlen; ++q) {
      const float s = S[q * ldS + c];
      acc = fmaf(s, s, acc);
    }
    nrm[c] = sqrtf(acc);
  }
  __syncthreads();
  for (int q = warp; q < qlen; q += kWarps) {
    const float lq = lam_s[q];
    const float* srow = S + q * ldS;
    float m = -INFINITY;
    for (int c = lane; c < clen; c += 32) m = fmaxf(m, lq * (srow[c] / (nrm[c] + kEps)));
    m = warp_max(m);
    float sum = 0.f;
    for (int c = lane; c < clen; c += 32) sum += expf(lq * (srow[c] / (nrm[c] + kEps)) - m);
    sum = warp_sum(sum);
    const float rs = 1.f / sum;
    for (int c = lane; c < clen; c += 32) {
      const float z = lq * (srow[c] / (nrm[c] + kEps));
      P[q * ldS + c] = expf(z - m) * rs;
    }
  }
  __syncthreads();
  for (int q = warp; q < qlen; q += kWarps) {
    const float* prow = P + q * ldS;
    float acc = 0.f;
    for (int c2 = lane; c2 < clen; c2 += 32) {
      float t = 0.f;
      for (int c = 0; c < clen; ++c) t = fmaf(prow[c], G[c * ldG + c2], t);
      acc = fmaf(t, prow[c2], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      const float u = sqrtf(fmaxf(acc, 0.f));
      if (un != nullptr) un[q] = u;
      inv[q] = 1.f / (u + kEps);
    }
  }
  __syncthreads();
}

// Temperatures of the pair's valid rows into lam_s (no barrier).
template <typename T>
__device__ __forceinline__ void load_lam(const AttnArgs<T>& a, int64_t b, int64_t p, int qlen, float* lam_s) {
  for (int q = threadIdx.x; q < qlen; q += kThreads)
    lam_s[q] = a.lam != nullptr ? to_f(a.lam[b * a.sl_b + p * a.sl_p + q * a.sl_l]) : a.lam_scalar;
}

// The projection of a 64-row block (MT 4) on Hopper's wgmma (wgmma.cuh; the kernel's WG instances,
// launched where launch.h use_wgmma says): Y (64 x kNG fp32) += A B^T per kBD chunk, A (64 x kBD)
// and B (kNG x kBD) in shared memory as core matrices (wg_core_offset), warpgroup g taking the
// chunk's 16 columns 16 g .. 16 g + 15 (TcProjection's split-K), its 64 x 256 sums in 128
// registers a thread. chunk waits for its wgmma before it returns: the caller's next barrier
// frees A and B. The writers of A and B fence the async proxy before the barrier ahead of chunk.
template <typename T>
struct TcProjectionWg {
  float acc[128];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  }

  __device__ __forceinline__ void chunk(const T* A, const T* B) {
    const int k0 = (threadIdx.x >> 7) * 16;   // this warpgroup's 16 columns of the chunk
    const auto* a8 = reinterpret_cast<const unsigned char*>(A) + wg_core_offset(0, k0, kBD);
    const auto* b8 = reinterpret_cast<const unsigned char*>(B) + wg_core_offset(0, k0, kBD);
    wg::batch(acc, [&] { wg::mma_m64n256k16<T>(acc, wg::desc(a8, 128, kBD * 16), wg::desc(b8, 128, kBD * 16)); });
  }

  // Both warpgroups' sums into Y (holds a barrier: every thread calls it): the second stores, the
  // first adds its own.
  __device__ __forceinline__ void store(float* Y, int ldy) {
    const int g = threadIdx.x >> 7, t = threadIdx.x & 127;
    if (g == 1) {
#pragma unroll
      for (int i = 0; i < 128; ++i) Y[wg::acc_row(t, i) * ldy + wg::acc_col(t, i)] = acc[i];
    }
    __syncthreads();
    if (g == 0) {
#pragma unroll
      for (int i = 0; i < 128; ++i) Y[wg::acc_row(t, i) * ldy + wg::acc_col(t, i)] += acc[i];
    }
  }
};

// Context chunk of the valid rows into cs (fp32, zero past d; no barrier).
template <typename T>
__device__ __forceinline__ void load_ctx_chunk(const T* __restrict__ cb, int64_t sc_l, int clen, int64_t d0,
                                               int64_t D, float* cs) {
  for (int idx = threadIdx.x; idx < clen * kBD; idx += kThreads) {
    const int r = idx >> 5, k = idx & 31;
    const int64_t d = d0 + k;
    cs[r * kLDF + k] = d < D ? to_f(cb[r * sc_l + d]) : 0.f;
  }
}

// ---------------------------------------------------------------- forward
// One block per pair pid = pid0 + blockIdx.x. out: kModeAttended T (B, P, Lq, d); kModeAlignment T
// (B, P, Lq, s); kModeSquaredDiff float (gridDim.x, Lq, d) indexed by blockIdx.x. Rows at or past qlen are written as zeros.
template <typename T, int MT, int MODE>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttnArgs<T> a, int64_t pid0, void* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnFwdLayout L = attn_fwd_layout((int)sizeof(T), a.Lq, a.Lc, a.S, MT, MODE);
  float* S = reinterpret_cast<float*>(smem + L.S);
  float* nrm = reinterpret_cast<float*>(smem + L.nrm);
  float* inv = reinterpret_cast<float*>(smem + L.inv);
  float* lam_s = reinterpret_cast<float*>(smem + L.lam);
  float* cs = reinterpret_cast<float*>(smem + L.cs);
  float* xs = reinterpret_cast<float*>(smem + L.xs);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t pid = pid0 + blockIdx.x;
  const int64_t b = pid / a.P, p = pid - b * a.P;
  const int64_t bc = a.cidx != nullptr ? (int64_t)a.cidx[p] : b;   // the pair's context item
  int qlen = clamp_len(a.qlens[p], a.Lq);
  const int clen = clamp_len(a.clens[bc], a.Lc);
  if (clen == 0) qlen = 0;   // nothing to attend to: every row is written as zeros
  const int64_t D = a.D, Lq = a.Lq;
  const int64_t width = MODE == kModeAlignment ? a.S : D;
  const int64_t orow0 = (MODE == kModeSquaredDiff ? (int64_t)blockIdx.x : pid) * Lq;   // first output row of the pair

  // rows at or past the query length: zeros
  for (int64_t idx = (int64_t)qlen * width + tid; idx < Lq * width; idx += kThreads) {
    if (MODE == kModeSquaredDiff)
      static_cast<float*>(out)[orow0 * width + idx] = 0.f;
    else
      static_cast<T*>(out)[orow0 * width + idx] = from_f<T>(0.f);
  }
  if (qlen == 0) return;

  const T* qp = a.q + p * a.sq_p;
  const T* cb = a.c + bc * a.sc_b;
  const T* fp = a.f != nullptr ? a.f + b * a.sf_b + p * a.sf_p : nullptr;
  const int ldS = (int)a.Lc;
  load_lam(a, b, p, qlen, lam_s);
  scores_pass(qp, a.sq_l, cb, a.sc_l, fp, a.sf_l, qlen, clen, D, S, ldS, xs, cs);
  attention_probs(S, S, ldS, qlen, clen, nrm, lam_s, a.gram + bc * a.Lc * a.Lc, a.Lc, nullptr, inv);
  const float* P = S;

  if (MODE != kModeAlignment) {
    for (int64_t d0 = 0; d0 < D; d0 += kBD) {
      load_ctx_chunk(cb, a.sc_l, clen, d0, D, cs);
      __syncthreads();
      for (int idx = tid; idx < qlen * kBD; idx += kThreads) {
        const int r = idx >> 5, k = idx & 31;
        const int64_t d = d0 + k;
        if (d < D) {
          const float* prow = P + r * ldS;
          float u = 0.f;
          for (int c = 0; c < clen; ++c) u = fmaf(prow[c], cs[c * kLDF + k], u);
          const float A = u * inv[r];
          if (MODE == kModeAttended) {
            static_cast<T*>(out)[(orow0 + r) * D + d] = from_f<T>(A);
          } else {
            const float dq = to_f(qp[r * a.sq_l + d]) - A;
            static_cast<float*>(out)[(orow0 + r) * D + d] = dq * dq;
          }
        }
      }
      __syncthreads();
    }
    return;
  }

  // mode 1: E = l2n((Q - A)^2 W^T + b), row group by row group, 256 output columns per pass
  if constexpr (MODE == kModeAlignment) {
    constexpr int RG = 16 * MT;
    const int ldo = ld_op((int)sizeof(T));
    T* as = reinterpret_cast<T*>(smem + L.as);
    T* ws = reinterpret_cast<T*>(smem + L.ws);
    float* y = reinterpret_cast<float*>(smem + L.y);
    const int64_t Sw = a.S;
    T* o = static_cast<T*>(out);
    for (int r0 = 0; r0 < qlen; r0 += RG) {
      for (int64_t n0 = 0; n0 < Sw; n0 += kNG) {
        BlockGemm<T, MT> gemm;
        gemm.zero();
        for (int64_t d0 = 0; d0 < D; d0 += kBD) {
          load_ctx_chunk(cb, a.sc_l, clen, d0, D, cs);
          load_weight_chunk(a.w, Sw, D, n0, d0, ws, ldo);
          __syncthreads();
          for (int idx = tid; idx < RG * kBD; idx += kThreads) {
            const int r = idx >> 5, k = idx & 31;
            const int q = r0 + r;
            const int64_t d = d0 + k;
            float v = 0.f;
            if (q < qlen && d < D) {
              const float* prow = P + q * ldS;
              float u = 0.f;
              for (int c = 0; c < clen; ++c) u = fmaf(prow[c], cs[c * kLDF + k], u);
              const float dq = to_f(qp[q * a.sq_l + d]) - u * inv[q];
              v = dq * dq;
            }
            as[r * ldo + k] = from_f<T>(v);
          }
          __syncthreads();
          gemm.chunk(as, ldo, ws, ldo);
          __syncthreads();
        }
        gemm.store(y + n0, L.ldy);
      }
      __syncthreads();
      for (int r = warp; r < RG; r += kWarps) {
        const int q = r0 + r;
        if (q >= qlen) break;
        store_l2n_bias_row(y + r * L.ldy, a.bias, Sw, o + (orow0 + q) * Sw);
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------- forward on tensor cores (fp16/bf16)
// ---------------------------------------------------------------- blocks of packed pairs (tensor cores)
// attention_fwd_tc_kernel and attention_fwd_wg_kernel hold pairs p0 .. p0 + gp - 1 of context
// item b, pair g in rows g * bq .. g * bq + qls[g] - 1 of the block; a row is valid while below
// its pair's length.
__device__ __forceinline__ bool tc_row_valid(int r, int bq, int gp, const int* qls) {
  const int g = r / bq;
  return g < gp && r - g * bq < qls[g];
}

// The block of a launch of packed pairs (attention_fwd_tc_kernel, attention_fwd_wg_kernel,
// attention_bwd_tc_kernel): pairs p0 .. p0 + gp - 1 of item b (block x = b * groups + p0 / gp,
// groups = ceil(P / gp)), whose context item is bcx (paired: gp = 1, b = 0, cidx[p0]).
struct TcBlock {
  int64_t b, p0, bcx;
};

template <typename T>
__device__ __forceinline__ TcBlock tc_block_of(const AttnArgs<T>& a, int gp) {
  const int64_t groups = (a.P + gp - 1) / gp;
  const int64_t b = (int64_t)blockIdx.x / groups;                 // 0 when paired (the output's B is 1)
  const int64_t p0 = ((int64_t)blockIdx.x - b * groups) * gp;
  const int64_t bcx = a.cidx != nullptr ? (int64_t)a.cidx[p0] : b;   // the block's context item
  return TcBlock{b, p0, bcx};
}

// The forwards' zero_pad for tc_block_begin: pair g's output rows (width wide, T) at or past its length.
template <typename T>
struct TcZeroOut {
  void* out;
  int64_t b, p0, P, Lq, width;
  const int* qls;
  __device__ __forceinline__ void operator()(int g) const {
    T* o = static_cast<T*>(out) + (b * P + p0 + g) * Lq * width;
    for (int64_t idx = (int64_t)qls[g] * width + threadIdx.x; idx < Lq * width; idx += kThreads) o[idx] = from_f<T>(0.f);
  }
};

// The block's start: qls (each pair's query length; 0 past P or where clen is 0), zero_pad(g) for
// each pair g of the block (its outputs at padded rows: every row where clen is 0), lam_s[r] (the
// temperature of row r, 0 where r is not valid). Returns false where clen is 0 (nothing to attend
// to). Holds a barrier: every thread calls it.
template <typename T, int MAXGP, typename ZeroPad>
__device__ __forceinline__ bool tc_block_begin(const AttnArgs<T>& a, int64_t b, int64_t p0, int gp, int bq, int rows,
                                               int clen, int* qls, float* lam_s, ZeroPad zero_pad) {
  const int tid = threadIdx.x;
  const int64_t P = a.P, Lq = a.Lq;
  if (tid < MAXGP) {
    const int64_t p = p0 + tid;
    qls[tid] = (tid < gp && p < P && clen > 0) ? clamp_len(a.qlens[p], Lq) : 0;
  }
  __syncthreads();
  for (int g = 0; g < gp && p0 + g < P; ++g) zero_pad(g);
  if (clen == 0) return false;
  for (int r = tid; r < rows; r += kThreads) {
    float lv = 0.f;
    if (tc_row_valid(r, bq, gp, qls)) {
      const int g = r / bq;
      lv = a.lam != nullptr ? to_f(a.lam[b * a.sl_b + (p0 + g) * a.sl_p + (r - g * bq) * a.sl_l]) : a.lam_scalar;
    }
    lam_s[r] = lv;
  }
  return true;
}

// The block's probabilities from its fp32 scores S (rows x bc, row stride ldS), on chip:
// LeakyReLU (zero rows and columns stay zero), each pair's column norms over its own rows (nrm,
// gp x bc), the softmax over the valid columns (fp32 in S; put_p(r, c, p) for every r < rows and
// c < bc, zeros past clen and in rows of no pair) and inv[r] = 1 / (|U[r]| + eps), |U[r]| =
// sqrt(P[r] G P[r]^T) from the item's Gram matrix G (Lc x Lc), |U[r]| itself into un where given
// (the backward's; 0 in rows of no pair). Holds barriers: every thread calls it; the last barrier
// follows every write.
template <typename PutP>
__device__ __forceinline__ void tc_block_probs(float* S, int ldS, int rows, int bc, int gp, int bq, const int* qls,
                                               const float* lam_s, int clen, const float* G, int64_t Lc, float* nrm,
                                               float* inv, PutP put_p, float* un = nullptr) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int idx = tid; idx < rows * bc; idx += kThreads) {
    const int r = idx / bc, c = idx - r * bc;
    const float s = S[r * ldS + c];
    S[r * ldS + c] = s > 0.f ? s : 0.1f * s;
  }
  __syncthreads();
  for (int idx = tid; idx < gp * bc; idx += kThreads) {
    const int g = idx / bc, c = idx - g * bc;
    float acc = 0.f;
    for (int q = 0; q < qls[g]; ++q) {
      const float s = S[(g * bq + q) * ldS + c];
      acc = fmaf(s, s, acc);
    }
    nrm[idx] = sqrtf(acc);
  }
  __syncthreads();
  for (int r = warp; r < rows; r += kWarps) {
    if (!tc_row_valid(r, bq, gp, qls)) {
      for (int c = lane; c < bc; c += 32) put_p(r, c, 0.f);
      continue;
    }
    const float lq = lam_s[r];
    const float* nr = nrm + (r / bq) * bc;
    float* srow = S + r * ldS;
    float m = -INFINITY;
    for (int c = lane; c < clen; c += 32) m = fmaxf(m, lq * (srow[c] / (nr[c] + kEps)));
    m = warp_max(m);
    float sum = 0.f;
    for (int c = lane; c < clen; c += 32) sum += expf(lq * (srow[c] / (nr[c] + kEps)) - m);
    sum = warp_sum(sum);
    const float rs = 1.f / sum;
    for (int c = lane; c < bc; c += 32) {
      float pv = 0.f;
      if (c < clen) pv = expf(lq * (srow[c] / (nr[c] + kEps)) - m) * rs;
      srow[c] = pv;
      put_p(r, c, pv);
    }
  }
  __syncthreads();
  for (int r = warp; r < rows; r += kWarps) {
    if (!tc_row_valid(r, bq, gp, qls)) {
      if (lane == 0) inv[r] = 0.f;
      if (lane == 0 && un != nullptr) un[r] = 0.f;
      continue;
    }
    const float* prow = S + r * ldS;
    float acc = 0.f;
    for (int c2 = lane; c2 < clen; c2 += 32) {
      float t = 0.f;
      for (int c = 0; c < clen; ++c) t = fmaf(prow[c], G[c * Lc + c2], t);
      acc = fmaf(t, prow[c2], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) inv[r] = 1.f / (sqrtf(fmaxf(acc, 0.f)) + kEps);
    if (lane == 0 && un != nullptr) un[r] = sqrtf(fmaxf(acc, 0.f));
  }
  __syncthreads();
}

// Block x: pairs p0 .. p0 + gp - 1 of context item b (x = b * groups + p0 / gp, groups = ceil(P / gp));
// paired (cidx): gp = 1, block x is pair x with context item cidx[x]. Pair g owns rows
// g * bq .. g * bq + qlen_g - 1 of the block's 16 MT rows (bq = Lq: packed, plan.h choose_tc_plan;
// any bq >= the pairs' lengths works); the other rows are zeros in every
// operand, so every product is one 16 MT-row GEMM of the tensor-core shape:
//   pass 1:  S0 (rows x bc) = X C^T, X = F * Q rounded to T        (wmma, fp32 accumulators, split-K)
//   on chip: per pair, the column norms over its own rows, the softmax, |U| = sqrt(P G P^T) (fp32)
//   pass 2:  U = P C chunk by chunk (P rounded to T, in registers: TcPC; wmma), A = U / (|U| + eps),
//            then kModeAttended: store A;  kModeAlignment: Y += (Q - A)^2 W^T (TcProjection, split-K),
//            E = l2n(Y + b).
// Rows at or past a pair's query length are written as zeros. (The backward recomputes each pair
// with attention_fwd_kernel in fp32 products: its gradients are those of that, very slightly
// different, forward.)

// The block's tensor-core products split K between two halves of the warps: warps 0-3 take the
// first 16 of every kBD-column chunk, warps 4-7 the second, each half covering every output tile,
// and the halves' fp32 sums meet in shared memory at the end (tc_splitk_meet). A warp so loads an
// A fragment once for several products (shared memory is what bounds this kernel).
constexpr int kTcHalf = kWarps / 2;
static_assert(kBD == 32 && kTcHalf == 4, "two halves of 4 warps, one 16-wide K step of each chunk each");
constexpr int kTcMaxCT = kTcMaxLen / 16;   // most 16-wide column tiles of the scores (bc <= 64)

// The two halves' accumulators summed into shared memory (ld floats a row; at(i): tile i's first
// element): the second half stores its live tiles, then the first loads each, adds its own and
// stores the sum. Holds a barrier: every thread calls it.
template <int N, typename Live, typename At>
__device__ __forceinline__ void tc_splitk_meet(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[N],
                                               int ld, Live live, At at) {
  using namespace nvcuda;
  const bool second = (threadIdx.x >> 5) >= kTcHalf;
  if (second) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (live(i)) wmma::store_matrix_sync(at(i), acc[i], ld, wmma::mem_row_major);
  }
  __syncthreads();
  if (!second) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (!live(i)) continue;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> other;
      wmma::load_matrix_sync(other, at(i), ld, wmma::mem_row_major);
#pragma unroll
      for (int e = 0; e < other.num_elements; ++e) acc[i].x[e] += other.x[e];
      wmma::store_matrix_sync(at(i), acc[i], ld, wmma::mem_row_major);
    }
  }
}

// One warp's tiles of the scores, the same in both halves: row tile wi / wpr (wpr = 4 / MT warps a
// row tile, 1 for MT 3; wi = warp % 4) and column tiles tj(j) = wi % wpr + wpr j while below bc / 16.
template <int MT>
struct TcScoreTiles {
  static constexpr int kWpr = MT >= 3 ? 1 : kTcHalf / MT;
  int ti, tj0, nct;
  __device__ __forceinline__ explicit TcScoreTiles(int bc) {
    const int wi = (threadIdx.x >> 5) % kTcHalf;
    ti = wi / kWpr;
    tj0 = wi % kWpr;
    nct = bc / 16;
  }
  __device__ __forceinline__ int tj(int j) const { return tj0 + kWpr * j; }
  __device__ __forceinline__ bool live(int j) const { return ti < MT && tj(j) < nct; }

  // One kBD chunk of A C^T into this warp's tiles: A (16 MT rows x kBD, row stride ldo), the
  // context chunk cs (bc rows x kBD), this half's 16 columns of the chunk (split-K). No barrier.
  template <typename T>
  __device__ __forceinline__ void times_ctx_t(const T* A, const T* cs, int ldo,
                                              nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[kTcMaxCT]) const {
    using namespace nvcuda;
    if (!live(0)) return;
    const int kk = ((threadIdx.x >> 5) / kTcHalf) * 16;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
    wmma::load_matrix_sync(af, A + ti * 16 * ldo + kk, ldo);
#pragma unroll
    for (int j = 0; j < kTcMaxCT; ++j) {
      if (live(j)) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, cs + tj(j) * 16 * ldo + kk, ldo);
        wmma::mma_sync(acc[j], af, bf, acc[j]);
      }
    }
  }
};

// P C, one warp's share: row tile w / 2 of P (16 x bc, the inputs' type) held as bc / 16 A
// fragments, loaded once (load), times column tile w % 2 of each context chunk (chunk: the
// U chunk, 16 MT rows x kBD fp32, into us). No barrier in either.
template <typename T, int MT>
struct TcPC {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> pf[kTcMaxCT];
  int ti, tj, nkt;

  __device__ __forceinline__ void load(const T* Pb, int ldP, int bc) {
    const int warp = threadIdx.x >> 5;
    ti = warp >> 1;
    tj = warp & 1;
    nkt = bc / 16;
    if (ti >= MT) return;
#pragma unroll
    for (int k = 0; k < kTcMaxCT; ++k)
      if (k < nkt) nvcuda::wmma::load_matrix_sync(pf[k], Pb + ti * 16 * ldP + k * 16, ldP);
  }

  __device__ __forceinline__ void chunk(const T* cs, int ldo, float* us) const {
    using namespace nvcuda;
    if (ti >= MT) return;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int k = 0; k < kTcMaxCT; ++k) {
      if (k < nkt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, cs + k * 16 * ldo + tj * 16, ldo);
        wmma::mma_sync(acc, pf[k], bf, acc);
      }
    }
    wmma::store_matrix_sync(us + ti * 16 * kLDU + tj * 16, acc, kLDU, wmma::mem_row_major);
  }
};

// The projection Y (16 MT x kNG fp32) += A (16 MT x kBD chunk) B^T (B: kNG x kBD chunk), split-K:
// in each half, warp w % 4 owns the tiles of columns 64 (w % 4) .. 64 (w % 4) + 63 in every row
// tile (MT x 4 accumulators; per K step MT A and 4 B fragments for 4 MT products).
template <typename T, int MT>
struct TcProjection {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[MT * 4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < MT * 4; ++i) nvcuda::wmma::fill_fragment(acc[i], 0.f);
  }

  __device__ __forceinline__ void chunk(const T* A, int lda, const T* B, int ldb) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5, kk = (warp / kTcHalf) * 16, c0 = (warp % kTcHalf) * 4;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(bf[j], B + (c0 + j) * 16 * ldb + kk, ldb);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
      wmma::load_matrix_sync(af, A + i * 16 * lda + kk, lda);
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i * 4 + j], af, bf[j], acc[i * 4 + j]);
    }
  }

  // Both halves' sums into Y (holds a barrier: every thread calls it).
  __device__ __forceinline__ void store(float* Y, int ldy) {
    const int c0 = ((threadIdx.x >> 5) % kTcHalf) * 4;
    tc_splitk_meet(acc, ldy, [](int) { return true; },
                   [&](int t) { return Y + (t / 4) * 16 * ldy + (c0 + t % 4) * 16; });
  }
};

// Context chunk of the valid rows into cs (compute type, bc rows, zero past clen and past d; no barrier).
template <typename T>
__device__ __forceinline__ void tc_ctx_chunk(const T* __restrict__ cb, int64_t sc_l, int clen, int bc, int64_t d0,
                                             int64_t D, T* cs, int ldo) {
  for (int idx = threadIdx.x; idx < bc * kBD; idx += kThreads) {
    const int r = idx >> 5, k = idx & 31;
    const int64_t d = d0 + k;
    cs[r * ldo + k] = (r < clen && d < D) ? cb[r * sc_l + d] : from_f<T>(0.f);
  }
}

// Pass 1 of the tensor-core blocks (attention_fwd_tc_kernel, attention_bwd_tc_kernel): S0 (16 MT
// rows x bc fp32, into S) = X C^T, X = F * Q rounded to T (rows of no pair zero), split-K between
// the two halves of the warps (TcScoreTiles), the halves meeting in S. xs, cs: the chunks' staging
// (rows x ld_op, bc x ld_op). Holds barriers: every thread calls it; the last follows S's writes.
template <typename T, int MT, typename RowValid>
__device__ __forceinline__ void tc_block_scores(const AttnArgs<T>& a, int64_t b, int64_t p0, int bq, int bc, int clen,
                                                const T* __restrict__ cb, RowValid row_valid, T* xs, T* cs, float* S,
                                                int ldS) {
  using namespace nvcuda;
  constexpr int ROWS = 16 * MT;
  const int tid = threadIdx.x, warp = tid >> 5, ldo = ld_op((int)sizeof(T));
  const int64_t D = a.D;
  auto row_pair = [&](int r) { return r / bq; };
  const TcScoreTiles<MT> st(bc);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> sacc[kTcMaxCT];
#pragma unroll
  for (int j = 0; j < kTcMaxCT; ++j) wmma::fill_fragment(sacc[j], 0.f);
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    for (int idx = tid; idx < ROWS * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      float v = 0.f;
      if (d < D && row_valid(r)) {
        const int g = row_pair(r), q = r - g * bq;
        v = to_f(a.q[(p0 + g) * a.sq_p + q * a.sq_l + d]);
        if (a.f != nullptr) v *= to_f(a.f[b * a.sf_b + (p0 + g) * a.sf_p + q * a.sf_l + d]);
      }
      xs[r * ldo + k] = from_f<T>(v);
    }
    tc_ctx_chunk(cb, a.sc_l, clen, bc, d0, D, cs, ldo);
    __syncthreads();
    st.times_ctx_t(xs, cs, ldo, sacc);
    __syncthreads();
  }
  tc_splitk_meet(sacc, ldS, [&](int j) { return st.live(j); },
                 [&](int j) { return S + st.ti * 16 * ldS + st.tj(j) * 16; });
  __syncthreads();
}

// WG: the projection on wgmma (TcProjectionWg; kModeAlignment, MT 4 only), else on wmma.
// kModeAttended writes A, kModeSquaredDiff (Q - A)^2 (the backward's scratch, the inputs' dtype,
// (B, P, Lq, d) of the launch's pairs: attn_args_rect gives a chunk's), kModeAlignment E.
template <typename T, int MT, int MODE, bool WG = false>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_tc_kernel(const AttnArgs<T> a, int bq, int bc, int gp,
                                                                       void* out) {
  static_assert(!std::is_same<T, float>::value, "fp32 runs attention_fwd_kernel (exact SIMT products)");
  static_assert(MODE == kModeAttended || MODE == kModeAlignment || MODE == kModeSquaredDiff, "a mode of the list");
  static_assert(MT >= 1 && MT <= kTcMaxMT, "16 MT rows, at most kTcRows");
  static_assert(!WG || (tc_wgmma_projection(MT, MODE) && kThreads == 256), "wgmma: one 64-row block, 2 warpgroups");
  using namespace nvcuda;
  constexpr int ROWS = 16 * MT;
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnTcLayout L = attn_tc_layout((int)sizeof(T), ROWS, bc, gp, a.S, MODE);
  int* qls = reinterpret_cast<int*>(smem + L.qls);
  float* S = reinterpret_cast<float*>(smem + L.S);
  T* Pb = reinterpret_cast<T*>(smem + L.Pb);
  float* nrm = reinterpret_cast<float*>(smem + L.nrm);
  float* inv = reinterpret_cast<float*>(smem + L.inv);
  float* lam_s = reinterpret_cast<float*>(smem + L.lam);
  T* xs = reinterpret_cast<T*>(smem + L.xs);
  T* cs = reinterpret_cast<T*>(smem + L.cs);
  float* us = reinterpret_cast<float*>(smem + L.us);
  const int ldS = L.ldS, ldP = L.ldP, ldo = ld_op((int)sizeof(T));

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t P = a.P, Lq = a.Lq, D = a.D;
  const TcBlock blk = tc_block_of(a, gp);
  const int64_t b = blk.b, p0 = blk.p0, bcx = blk.bcx;
  const int clen = clamp_len(a.clens[bcx], a.Lc);
  const int64_t width = MODE == kModeAlignment ? a.S : D;
  if (!tc_block_begin<T, kTcMaxGP>(a, b, p0, gp, bq, ROWS, clen, qls, lam_s, TcZeroOut<T>{out, b, p0, P, Lq, width, qls}))
    return;
  auto row_pair = [&](int r) { return r / bq; };
  auto row_valid = [&](int r) { return tc_row_valid(r, bq, gp, qls); };
  const T* cb = a.c + bcx * a.sc_b;

  // pass 1: S0 = X C^T (tc_block_scores)
  tc_block_scores<T, MT>(a, b, p0, bq, bc, clen, cb, row_valid, xs, cs, S, ldS);

  tc_block_probs(S, ldS, ROWS, bc, gp, bq, qls, lam_s, clen, a.gram + bcx * a.Lc * a.Lc, a.Lc, nrm, inv,
                 [&](int r, int c, float v) { Pb[r * ldP + c] = from_f<T>(v); });

  TcPC<T, MT> pc;   // this warp's row tile of P, in registers for every chunk of pass 2
  pc.load(Pb, ldP, bc);
  if constexpr (MODE != kModeAlignment) {
    T* o = static_cast<T*>(out);
    for (int64_t d0 = 0; d0 < D; d0 += kBD) {
      tc_ctx_chunk(cb, a.sc_l, clen, bc, d0, D, cs, ldo);
      __syncthreads();
      pc.chunk(cs, ldo, us);
      __syncthreads();
      for (int idx = tid; idx < ROWS * kBD; idx += kThreads) {
        const int r = idx >> 5, k = idx & 31;
        const int64_t d = d0 + k;
        if (d < D && row_valid(r)) {
          const int g = row_pair(r), q = r - g * bq;
          float v = us[r * kLDU + k] * inv[r];
          if constexpr (MODE == kModeSquaredDiff) {
            const float dq = to_f(a.q[(p0 + g) * a.sq_p + q * a.sq_l + d]) - v;
            v = dq * dq;
          }
          o[((b * P + p0 + g) * Lq + q) * D + d] = from_f<T>(v);
        }
      }
      // the next chunk's cs is written before a barrier that every thread reaches after this loop,
      // and us only after the one that follows it
    }
  } else {
    // E = l2n((Q - A)^2 W^T + b), 256 output columns per pass over d
    T* as = xs;
    T* ws = reinterpret_cast<T*>(smem + L.ws);
    float* y = reinterpret_cast<float*>(smem + L.y);
    const int64_t Sw = a.S;
    for (int64_t n0 = 0; n0 < Sw; n0 += kNG) {
      std::conditional_t<WG, TcProjectionWg<T>, TcProjection<T, MT>> gemm;
      gemm.zero();
      for (int64_t d0 = 0; d0 < D; d0 += kBD) {
        tc_ctx_chunk(cb, a.sc_l, clen, bc, d0, D, cs, ldo);
        load_weight_chunk<T, kNG, WG>(a.w, Sw, D, n0, d0, ws, ldo);
        __syncthreads();
        pc.chunk(cs, ldo, us);
        __syncthreads();
        // (Q - A)^2 of row r, column k of the chunk (zero past D and in rows of no pair)
        auto sq = [&](int r, int k) {
          const int64_t d = d0 + k;
          float v = 0.f;
          if (d < D && row_valid(r)) {
            const int g = row_pair(r), q = r - g * bq;
            const float dq = to_f(a.q[(p0 + g) * a.sq_p + q * a.sq_l + d]) - us[r * kLDU + k] * inv[r];
            v = dq * dq;
          }
          return from_f<T>(v);
        };
        if constexpr (WG) {   // core matrices: 8 columns a thread, one 16-byte store
          for (int u = tid; u < ROWS * kBD / 8; u += kThreads) {
            const int r = core_unit_row(u), k = core_unit_col(u);
            T v[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = sq(r, k + e);
            store8(as + 8 * u, v);
          }
        } else {
          for (int idx = tid; idx < ROWS * kBD; idx += kThreads) as[(idx >> 5) * ldo + (idx & 31)] = sq(idx >> 5, idx & 31);
        }
        if constexpr (WG) wg::proxy_fence();   // this thread's as and ws stores, visible to wgmma
        __syncthreads();
        if constexpr (WG)
          gemm.chunk(as, ws);
        else
          gemm.chunk(as, ldo, ws, ldo);
        __syncthreads();
      }
      gemm.store(y + n0, L.ldy);
    }
    __syncthreads();
    T* o = static_cast<T*>(out);
    for (int r = warp; r < ROWS; r += kWarps) {
      if (!row_valid(r)) continue;
      const int g = row_pair(r), q = r - g * bq;
      store_l2n_bias_row(y + r * L.ldy, a.bias, Sw, o + ((b * P + p0 + g) * Lq + q) * Sw);
    }
  }
}

// ---------------------------------------------------------------- forward on wgmma (sm_90a, 128-row blocks)
// attention_fwd_wg_kernel (kModeAlignment; plan.h choose_wg_plan, launched where launch.h
// use_wgmma says): the block of attention_fwd_tc_kernel with 128 rows (GP = 128 / Lq packed pairs
// of context item b) and every product on wgmma (wgmma.cuh), warpgroup w taking rows 64 w ..
// 64 w + 63 of each (no split-K, no meets). Operands are stored as core matrices (plan.h
// wg_core_offset), each writer fencing the async proxy before the barrier ahead of the wgmma that
// reads them; every batch is waited for before the next barrier.
//   pass 1, per kBD chunk of d:  S0 (128 x BC) += X C^T, X = F * Q rounded to T: m64nBCk16 x 2
//   on chip (tc_block_probs): the column norms per pair, the softmax, |U|; P rounded to T as the
//   A operand of pass 2 (128 x BC, K = the context rows)
//   pass 2, per kBD chunk of d:  U = P C (m64n32k16 x BC / 16, the chunk of C stored transposed:
//   N = d, K = the context rows); A = U / (|U| + eps) and (Q - A)^2 from the accumulator
//   registers (Q read at each register's element) stored as a 128 x kBD operand;
//   Y (128 x 256) += (Q - A)^2 W^T (m64n256k16 x 2, W's chunk of kNG rows, zero past s)
//   E = l2n(Y + b) from Y's registers: a row's 256 columns are in 4 lanes (acc_col), its sum of
//   squares by two shuffles.
template <typename T, int BC>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_wg_kernel(const AttnArgs<T> a, int bq, int gp, void* out) {
  static_assert(!std::is_same<T, float>::value, "16-bit operands");
  static_assert(BC >= 16 && BC <= kTcMaxLen && BC % 16 == 0, "the scores' N: 16, 32, 48 or 64");
  static_assert(kThreads == 256 && kWgRows == 128 && kBD == 32 && kNG == 256, "2 warpgroups of 64 rows");
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnWgLayout L = attn_wg_layout((int)sizeof(T), BC, gp);
  int* qls = reinterpret_cast<int*>(smem + L.qls);
  float* S = reinterpret_cast<float*>(smem + L.S);
  unsigned char* Pb = smem + L.Pb;
  float* nrm = reinterpret_cast<float*>(smem + L.nrm);
  float* inv = reinterpret_cast<float*>(smem + L.inv);
  float* lam_s = reinterpret_cast<float*>(smem + L.lam);
  unsigned char* xs = smem + L.xs;
  unsigned char* cs = smem + L.cs;
  unsigned char* ct = smem + L.ct;
  unsigned char* ws = smem + L.ws;
  unsigned char* as = smem + L.as;
  const int ldS = L.ldS;
  auto at = [](unsigned char* base, int off) { return reinterpret_cast<T*>(base + off); };

  const int tid = threadIdx.x, wt = tid & 127, r0 = 64 * (tid >> 7);   // r0: this warpgroup's first row
  const int64_t P = a.P, Lq = a.Lq, D = a.D, Sw = a.S;
  const TcBlock blk = tc_block_of(a, gp);
  const int64_t b = blk.b, p0 = blk.p0, bcx = blk.bcx;   // bcx = b: never paired
  const int clen = clamp_len(a.clens[bcx], a.Lc);
  if (!tc_block_begin<T, kWgMaxGP>(a, b, p0, gp, bq, kWgRows, clen, qls, lam_s, TcZeroOut<T>{out, b, p0, P, Lq, Sw, qls}))
    return;
  auto row_valid = [&](int r) { return tc_row_valid(r, bq, gp, qls); };
  // element (r, d) of the query (f: times the factors), for a valid row r
  auto query = [&](int r, int64_t d, bool f) {
    const int g = r / bq, q = r - g * bq;
    float v = to_f(a.q[(p0 + g) * a.sq_p + q * a.sq_l + d]);
    if (f && a.f != nullptr) v *= to_f(a.f[b * a.sf_b + (p0 + g) * a.sf_p + q * a.sf_l + d]);
    return v;
  };
  const T* cb = a.c + b * a.sc_b;

  // pass 1: S0 = X C^T
  float sacc[BC / 2];
#pragma unroll
  for (int i = 0; i < BC / 2; ++i) sacc[i] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    for (int u = tid; u < kWgRows * kBD / 8; u += kThreads) {
      const int r = core_unit_row(u), k = core_unit_col(u);
      const bool live = row_valid(r);
      T v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = from_f<T>(live && d0 + k + e < D ? query(r, d0 + k + e, true) : 0.f);
      store8(at(xs, 16 * u), v);
    }
    for (int u = tid; u < BC * kBD / 8; u += kThreads) {
      const int r = core_unit_row(u), k = core_unit_col(u);
      T v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = (r < clen && d0 + k + e < D) ? cb[r * a.sc_l + d0 + k + e] : from_f<T>(0.f);
      store8(at(cs, 16 * u), v);
    }
    wg::proxy_fence();
    __syncthreads();
    wg::batch(sacc, [&] {
#pragma unroll
      for (int kk = 0; kk < kBD; kk += 16)
        wg::mma_m64k16<T, BC>(sacc, wg::desc(xs + wg_core_offset(r0, kk, kBD), 128, kBD * 16),
                              wg::desc(cs + wg_core_offset(0, kk, kBD), 128, kBD * 16));
    });
    __syncthreads();   // xs and cs free for the next chunk
  }
#pragma unroll
  for (int i = 0; i < BC / 2; ++i) S[(r0 + wg::acc_row(wt, i)) * ldS + wg::acc_col(wt, i)] = sacc[i];
  __syncthreads();
  tc_block_probs(S, ldS, kWgRows, BC, gp, bq, qls, lam_s, clen, a.gram + b * a.Lc * a.Lc, a.Lc, nrm, inv,
                 [&](int r, int c, float v) { *at(Pb, wg_core_offset(r, c, BC)) = from_f<T>(v); });
  // (P's stores reach the async proxy by each thread's fence after its first chunk's stores below,
  // which follows them in program order and precedes the barrier ahead of P C's wgmma)

  // pass 2: U = P C, (Q - A)^2, Y += (Q - A)^2 W^T. A thread's accumulator rows r0 + acc_row(wt, 0)
  // and + 8 (plain query row and 1 / (|U| + eps) kept; null: not a valid row)
  const T* qrow[2];
  float irow[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + wg::acc_row(wt, 2 * h), g = r / bq;
    qrow[h] = row_valid(r) ? a.q + (p0 + g) * a.sq_p + (r - g * bq) * a.sq_l : nullptr;
    irow[h] = inv[r];
  }
  // W's chunk: 16-byte loads where W is 16-byte aligned and d a multiple of 8, all of a thread's
  // issued before its stores
  const bool wvec = D % 8 == 0 && reinterpret_cast<uintptr_t>(a.w) % 16 == 0;
  constexpr int kWPer = kNG * kBD / 8 / kThreads;
  static_assert(kNG * kBD / 8 % kThreads == 0, "whole units of W a thread");
  float yacc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) yacc[i] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    for (int u = tid; u < kBD * BC / 8; u += kThreads) {   // C^T: row n = column d0 + n of C
      const int n = u % kBD, c0 = (u / kBD) * 8;
      T v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = (c0 + e < clen && d0 + n < D) ? cb[(c0 + e) * a.sc_l + d0 + n] : from_f<T>(0.f);
      store8(at(ct, wg_core_offset(n, c0, BC)), v);
    }
    if (wvec) {
      uint4 w8[kWPer];
#pragma unroll
      for (int j = 0; j < kWPer; ++j) {
        const int u = tid + j * kThreads, n = core_unit_row(u);
        const int64_t k = d0 + core_unit_col(u);
        w8[j] = n < Sw && k < D ? *reinterpret_cast<const uint4*>(a.w + n * D + k) : uint4{0u, 0u, 0u, 0u};
      }
#pragma unroll
      for (int j = 0; j < kWPer; ++j) *reinterpret_cast<uint4*>(ws + 16 * (tid + j * kThreads)) = w8[j];
    } else {
      load_weight_chunk<T, kNG, true>(a.w, Sw, D, 0, d0, reinterpret_cast<T*>(ws), 0);
    }
    wg::proxy_fence();
    __syncthreads();
    float uacc[kBD / 2];
#pragma unroll
    for (int i = 0; i < kBD / 2; ++i) uacc[i] = 0.f;
    wg::batch(uacc, [&] {
#pragma unroll
      for (int kk = 0; kk < BC; kk += 16)
        wg::mma_m64k16<T, kBD>(uacc, wg::desc(Pb + wg_core_offset(r0, kk, BC), 128, BC * 16),
                               wg::desc(ct + wg_core_offset(0, kk, BC), 128, BC * 16));
    });
    // (Q - A)^2 at each register's element, two adjacent columns a pair
#pragma unroll
    for (int i = 0; i < kBD / 2; i += 2) {
      const int h = (i >> 1) & 1, r = r0 + wg::acc_row(wt, i), k = wg::acc_col(wt, i);
      const float ir = irow[h];
      float v[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        v[j] = 0.f;
        if (qrow[h] != nullptr && d0 + k + j < D) {
          const float dq = to_f(qrow[h][d0 + k + j]) - uacc[i + j] * ir;
          v[j] = dq * dq;
        }
      }
      T* dst = at(as, wg_core_offset(r, k, kBD));
      dst[0] = from_f<T>(v[0]);
      dst[1] = from_f<T>(v[1]);
    }
    wg::proxy_fence();
    __syncthreads();
    wg::batch(yacc, [&] {
#pragma unroll
      for (int kk = 0; kk < kBD; kk += 16)
        wg::mma_m64k16<T, kNG>(yacc, wg::desc(as + wg_core_offset(r0, kk, kBD), 128, kBD * 16),
                               wg::desc(ws + wg_core_offset(0, kk, kBD), 128, kBD * 16));
    });
    __syncthreads();   // ct, ws and as free for the next chunk
  }

  // E = l2n(Y + b). Register 4 m + 2 h + j holds row r0 + acc_row(wt, 2 h), column 8 m + 2 (wt % 4) + j
  // (acc_row / acc_col); the columns past s are zeros (W's rows there are), so their bias is 0 too.
  const int c0 = 2 * (wt & 3);
  float ss[2] = {0.f, 0.f};
#pragma unroll
  for (int m = 0; m < 32; ++m) {
    const int n = 8 * m + c0;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float bj = n + j < Sw ? to_f(a.bias[n + j]) : 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float& y = yacc[4 * m + 2 * h + j];
        y += bj;
        ss[h] = fmaf(y, y, ss[h]);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {   // the 4 lanes of a row: lane % 4
    ss[h] += __shfl_xor_sync(0xffffffffu, ss[h], 1);
    ss[h] += __shfl_xor_sync(0xffffffffu, ss[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + wg::acc_row(wt, 2 * h);
    if (!row_valid(r)) continue;
    const int g = r / bq, q = r - g * bq;
    const float rn = 1.f / (sqrtf(ss[h]) + kEps);
    T* orow = static_cast<T*>(out) + ((b * P + p0 + g) * Lq + q) * Sw;
#pragma unroll
    for (int m = 0; m < 32; ++m)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        if (8 * m + c0 + j < Sw) orow[8 * m + c0 + j] = from_f<T>(yacc[4 * m + 2 * h + j] * rn);
  }
}

// ---------------------------------------------------------------- backward (per pair)
// Gradients of sum(grad * out) for the pair pid = pid0 + blockIdx.x, recomputing the forward:
//   mode 0: gsrc = grad, T (B, P, Lq, d): dA = grad
//   mode 1: gsrc = G2 = dY W, float (gridDim.x, Lq, d) (dY: gradient of Y = (Q - A)^2 W^T + b,
//           from the host): dDq = 2 (Q - A) G2, dQ += dDq, dA = -dDq
// then dU = dA / (|U| + eps) - U coefU, coefU = (U . dA) / (|U| (|U| + eps)^2), and with
// U C^T = P G:  dP = diag(inv) dA C^T - diag(coefU) P G,  dC += P^T diag(inv) dA - M C with
// M = P^T diag(coefU) P;  dZ = P (dP - rowsum(P dP)); dlam = rowsum(dZ Sn); dSn = lam dZ;
// dS = dSn / (N + eps) - S colsum(S dSn) / (N (N + eps)^2); dS0 = LeakyReLU'(S0) dS;
// dX = dS0 C: dF = dX Q, dQ += dX F;  dC += dS0^T X.
// dq (P, Lq, d) and dc (B, Lc, d) are shared across pairs: fp32 atomics. df (B, P, Lq, d) and
// dlam (B, P, Lq) belong to the pair: stored, zeros at padded rows.
struct BwdOut {
  float* dq;
  float* dc;
  float* df;     // nullptr: not wanted
  float* dlam;   // nullptr: no lam tensor
};

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_kernel(const AttnArgs<T> a, int64_t pid0,
                                                                 const void* gsrc, BwdOut o) {
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnBwdLayout L = attn_bwd_layout(a.Lq, a.Lc);
  float* S = reinterpret_cast<float*>(smem + L.S);
  float* P = reinterpret_cast<float*>(smem + L.P);
  float* dP = reinterpret_cast<float*>(smem + L.dP);
  float* M = reinterpret_cast<float*>(smem + L.M);
  float* nrm = reinterpret_cast<float*>(smem + L.nrm);
  float* colc = reinterpret_cast<float*>(smem + L.colc);
  float* inv = reinterpret_cast<float*>(smem + L.inv);
  float* un = reinterpret_cast<float*>(smem + L.un);
  float* udA = reinterpret_cast<float*>(smem + L.udA);
  float* coefU = reinterpret_cast<float*>(smem + L.coefU);
  float* lam_s = reinterpret_cast<float*>(smem + L.lam);
  float* cs = reinterpret_cast<float*>(smem + L.cs);
  float* qs = reinterpret_cast<float*>(smem + L.qs);
  float* fs = reinterpret_cast<float*>(smem + L.fs);
  float* das = reinterpret_cast<float*>(smem + L.das);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t pid = pid0 + blockIdx.x;
  const int64_t b = pid / a.P, p = pid - b * a.P;
  const int64_t bc = a.cidx != nullptr ? (int64_t)a.cidx[p] : b;   // the pair's context item
  int qlen = clamp_len(a.qlens[p], a.Lq);
  const int clen = clamp_len(a.clens[bc], a.Lc);
  if (clen == 0) qlen = 0;
  const int64_t D = a.D, Lq = a.Lq, Lc = a.Lc;
  const int ldS = (int)Lc;

  // per-pair outputs at padded rows
  if (o.dlam != nullptr)
    for (int64_t q = qlen + tid; q < Lq; q += kThreads) o.dlam[pid * Lq + q] = 0.f;
  if (o.df != nullptr)
    for (int64_t idx = (int64_t)qlen * D + tid; idx < Lq * D; idx += kThreads) o.df[pid * Lq * D + idx] = 0.f;
  if (qlen == 0) return;

  const T* qp = a.q + p * a.sq_p;
  const T* cb = a.c + bc * a.sc_b;
  const T* fp = a.f != nullptr ? a.f + b * a.sf_b + p * a.sf_p : nullptr;
  const float* G = a.gram + bc * Lc * Lc;
  const T* grad = MODE == kModeAttended ? static_cast<const T*>(gsrc) + pid * Lq * D : nullptr;
  const float* g2 = MODE == kModeAlignment ? static_cast<const float*>(gsrc) + (int64_t)blockIdx.x * Lq * D : nullptr;

  load_lam(a, b, p, qlen, lam_s);
  scores_pass(qp, a.sq_l, cb, a.sc_l, fp, a.sf_l, qlen, clen, D, S, ldS, qs, cs);
  attention_probs(S, P, ldS, qlen, clen, nrm, lam_s, G, Lc, un, inv);

  // pass C: udA = rowsum(U dA), dP <- dA C^T
  for (int idx = tid; idx < qlen * clen; idx += kThreads) {
    const int q = idx / clen;
    dP[q * ldS + idx - q * clen] = 0.f;
  }
  for (int q = tid; q < qlen; q += kThreads) udA[q] = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    load_ctx_chunk(cb, a.sc_l, clen, d0, D, cs);
    __syncthreads();
    // warp-uniform rows: r = idx / 32 is the same for the 32 lanes of a warp
    for (int idx = tid; idx < qlen * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      float dA = 0.f, u = 0.f;
      if (d < D) {
        const float* prow = P + r * ldS;
        for (int c = 0; c < clen; ++c) u = fmaf(prow[c], cs[c * kLDF + k], u);
        if (MODE == kModeAlignment) {
          const float dq = to_f(qp[r * a.sq_l + d]) - u * inv[r];
          dA = -2.f * dq * g2[r * D + d];
        } else {
          dA = to_f(grad[r * D + d]);
        }
      }
      das[r * kLDF + k] = dA;
      const float t = warp_sum(u * dA);
      if (lane == 0) udA[r] += t;   // row r belongs to this warp in every chunk
    }
    __syncthreads();
    for (int idx = tid; idx < qlen * clen; idx += kThreads) {
      const int q = idx / clen, c = idx - q * clen;
      const float* x = das + q * kLDF;
      const float* y = cs + c * kLDF;
      float acc = 0.f;
#pragma unroll 8
      for (int k = 0; k < kBD; ++k) acc = fmaf(x[k], y[k], acc);
      dP[q * ldS + c] += acc;
    }
    __syncthreads();
  }

  // on chip: dP, M, softmax, temperatures, normalisation across queries, LeakyReLU
  for (int q = tid; q < qlen; q += kThreads) {
    const float u = un[q];
    coefU[q] = u > 0.f ? udA[q] * inv[q] * inv[q] / u : 0.f;
  }
  __syncthreads();
  for (int idx = tid; idx < qlen * clen; idx += kThreads) {
    const int q = idx / clen, c = idx - q * clen;
    const float* prow = P + q * ldS;
    float pg = 0.f;
    for (int c2 = 0; c2 < clen; ++c2) pg = fmaf(prow[c2], G[c2 * Lc + c], pg);
    dP[q * ldS + c] = inv[q] * dP[q * ldS + c] - coefU[q] * pg;
  }
  for (int idx = tid; idx < clen * clen; idx += kThreads) {
    const int c = idx / clen, c2 = idx - c * clen;
    float m = 0.f;
    for (int q = 0; q < qlen; ++q) m = fmaf(P[q * ldS + c] * coefU[q], P[q * ldS + c2], m);
    M[c * ldS + c2] = m;
  }
  __syncthreads();
  for (int q = warp; q < qlen; q += kWarps) {
    const float* prow = P + q * ldS;
    float* drow = dP + q * ldS;
    float rs = 0.f;
    for (int c = lane; c < clen; c += 32) rs = fmaf(prow[c], drow[c], rs);
    rs = warp_sum(rs);
    float dl = 0.f;
    const float lq = lam_s[q];
    for (int c = lane; c < clen; c += 32) {
      const float dz = prow[c] * (drow[c] - rs);
      dl = fmaf(dz, S[q * ldS + c] / (nrm[c] + kEps), dl);
      drow[c] = dz * lq;   // dSn
    }
    dl = warp_sum(dl);
    if (o.dlam != nullptr && lane == 0) o.dlam[pid * Lq + q] = dl;
  }
  __syncthreads();
  for (int c = tid; c < clen; c += kThreads) {
    float acc = 0.f;
    for (int q = 0; q < qlen; ++q) acc = fmaf(S[q * ldS + c], dP[q * ldS + c], acc);
    const float n = nrm[c];
    colc[c] = n > 0.f ? acc / (n * (n + kEps) * (n + kEps)) : 0.f;
  }
  __syncthreads();
  for (int idx = tid; idx < qlen * clen; idx += kThreads) {
    const int q = idx / clen, c = idx - q * clen;
    const float s = S[q * ldS + c];
    const float ds = dP[q * ldS + c] / (nrm[c] + kEps) - s * colc[c];
    dP[q * ldS + c] = s > 0.f ? ds : 0.1f * ds;   // dS0 (S0 > 0 exactly where S > 0)
  }
  __syncthreads();
  const float* dS0 = dP;

  // pass E: dX = dS0 C, dF, dQ; dC
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    load_ctx_chunk(cb, a.sc_l, clen, d0, D, cs);
    for (int idx = tid; idx < qlen * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      qs[r * kLDF + k] = d < D ? to_f(qp[r * a.sq_l + d]) : 0.f;
      fs[r * kLDF + k] = (d < D && fp != nullptr) ? to_f(fp[r * a.sf_l + d]) : 1.f;
    }
    __syncthreads();
    for (int idx = tid; idx < qlen * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      float dAs = 0.f;
      if (d < D) {
        const float* prow = P + r * ldS;
        const float* srow = dS0 + r * ldS;
        float u = 0.f, dx = 0.f;
        for (int c = 0; c < clen; ++c) {
          const float cv = cs[c * kLDF + k];
          u = fmaf(prow[c], cv, u);
          dx = fmaf(srow[c], cv, dx);
        }
        const float qv = qs[r * kLDF + k], fv = fs[r * kLDF + k];
        float dDq = 0.f, dA;
        if (MODE == kModeAlignment) {
          dDq = 2.f * (qv - u * inv[r]) * g2[r * D + d];
          dA = -dDq;
        } else {
          dA = to_f(grad[r * D + d]);
        }
        atomicAdd(o.dq + (p * Lq + r) * D + d, dDq + dx * fv);
        if (o.df != nullptr) o.df[(pid * Lq + r) * D + d] = dx * qv;
        dAs = dA * inv[r];
      }
      das[r * kLDF + k] = dAs;
    }
    __syncthreads();
    for (int idx = tid; idx < clen * kBD; idx += kThreads) {
      const int c = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      if (d < D) {
        float acc = 0.f;
        for (int q = 0; q < qlen; ++q)
          acc += P[q * ldS + c] * das[q * kLDF + k] + dS0[q * ldS + c] * (qs[q * kLDF + k] * fs[q * kLDF + k]);
        const float* mrow = M + c * ldS;
        for (int c2 = 0; c2 < clen; ++c2) acc = fmaf(-mrow[c2], cs[c2 * kLDF + k], acc);
        atomicAdd(o.dc + (bc * Lc + c) * D + d, acc);
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- backward on tensor cores (fp16/bf16)
// attention_bwd_tc_kernel<T, MT, MODE>: attention_bwd_kernel's gradients (same formulas, same
// outputs) for the blocks of attention_fwd_tc_kernel (plan.h choose_bwd_tc_plan: GP packed pairs
// of context item b in 16 MT rows, BC = Lc rounded up to 16), every d-wide product on wmma with
// fp32 accumulators, its operands rounded to T (X = F * Q, P, dA, dS0, dU, as the Triton backward's):
//   pass A  S0 = X C^T (tc_block_scores); LeakyReLU(S0) kept (Sl); tc_block_probs: P, |U|, inv
//   pass C  per chunk of d: U = P C (TcPC); dA (mode 0: grad; mode 1: -2 (Q - A) G2), udA =
//           rowsum(U dA) (fp32); dP += dA C^T (split-K halves, met after the last chunk)
//   on chip (fp32): coefU; dP = inv dP - coefU (P G); dZ, dlam, dSn; per pair the column terms; dS0
//   pass E  per chunk: U = P C and dX = dS0 C (TcPC each); dQ += dDq + dX F (atomics), dF = dX Q;
//           dU = dA / (|U| + eps) - coefU U in fp32, rounded once (not P^T diag(coefU) P C as a
//           separate product: the two terms nearly cancel where dA is near parallel to U, and
//           coefU ~ |dA| / |U|^2 would overflow fp16); the block's dC chunk = P^T dU + dS0^T X (a
//           warp per 16 x 16 tile, K the block's rows: its pairs share the context item, so their
//           terms add) into dcontext by atomics, once per block instead of once per pair
// The launch's pairs are those of `a` (attn_args_rect may narrow them to a chunk of the backward):
// pair (b, p) of it is pid = b P + p; gsrc (mode 0: grad (B, P, Lq, d) T; mode 1: G2 (pairs, Lq, d)
// fp32) and o.df, o.dlam start at its first pair, o.dq at its first query item, o.dc at its first
// context item (paired: every item; cidx names them).
template <typename T, int MT, int MODE>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_tc_kernel(const AttnArgs<T> a, int bq, int bc, int gp,
                                                                    const void* gsrc, BwdOut o) {
  static_assert(!std::is_same<T, float>::value, "fp32 runs attention_bwd_kernel (exact SIMT products)");
  static_assert(MODE == kModeAttended || MODE == kModeAlignment, "the gradient of A, or of (Q - A)^2");
  static_assert(MT >= 1 && MT <= kTcMaxMT && kWarps == 8, "16 MT rows; dC's 16 x 16 tiles a warp each");
  using namespace nvcuda;
  constexpr int ROWS = 16 * MT;
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnBwdTcLayout L = attn_bwd_tc_layout((int)sizeof(T), ROWS, bc, gp);
  float* S = reinterpret_cast<float*>(smem + L.S);
  float* Sl = reinterpret_cast<float*>(smem + L.Sl);
  float* dP = reinterpret_cast<float*>(smem + L.dP);
  T* Pb = reinterpret_cast<T*>(smem + L.Pb);
  T* dSb = reinterpret_cast<T*>(smem + L.dSb);
  float* nrm = reinterpret_cast<float*>(smem + L.nrm);
  float* colc = reinterpret_cast<float*>(smem + L.colc);
  float* inv = reinterpret_cast<float*>(smem + L.inv);
  float* un = reinterpret_cast<float*>(smem + L.un);
  float* udA = reinterpret_cast<float*>(smem + L.udA);
  float* coefU = reinterpret_cast<float*>(smem + L.coefU);
  float* lam_s = reinterpret_cast<float*>(smem + L.lam);
  T* xs = reinterpret_cast<T*>(smem + L.xs);
  T* das = reinterpret_cast<T*>(smem + L.das);
  T* cs = reinterpret_cast<T*>(smem + L.cs);
  float* us = reinterpret_cast<float*>(smem + L.us);
  float* ux = reinterpret_cast<float*>(smem + L.ux);
  float* dcs = reinterpret_cast<float*>(smem + L.dcs);
  int* qls = reinterpret_cast<int*>(smem + L.qls);
  const int ldS = L.ldS, ldP = L.ldP, ldo = ld_op((int)sizeof(T));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t P = a.P, Lq = a.Lq, D = a.D, Lc = a.Lc;
  const TcBlock blk = tc_block_of(a, gp);
  const int64_t b = blk.b, p0 = blk.p0, bcx = blk.bcx;
  const int clen = clamp_len(a.clens[bcx], a.Lc);
  // the per-pair outputs at padded rows (every row where clen is 0)
  auto zero_pad = [&](int g) {
    const int64_t pid = b * P + p0 + g;
    if (o.dlam != nullptr)
      for (int64_t q = qls[g] + tid; q < Lq; q += kThreads) o.dlam[pid * Lq + q] = 0.f;
    if (o.df != nullptr)
      for (int64_t idx = (int64_t)qls[g] * D + tid; idx < Lq * D; idx += kThreads) o.df[pid * Lq * D + idx] = 0.f;
  };
  if (!tc_block_begin<T, kTcMaxGP>(a, b, p0, gp, bq, ROWS, clen, qls, lam_s, zero_pad)) return;
  auto row_valid = [&](int r) { return tc_row_valid(r, bq, gp, qls); };
  for (int r = tid; r < ROWS; r += kThreads) udA[r] = 0.f;
  const T* cb = a.c + bcx * a.sc_b;
  const float* G = a.gram + bcx * Lc * Lc;
  const T* grad = MODE == kModeAttended ? static_cast<const T*>(gsrc) : nullptr;
  const float* g2 = MODE == kModeAlignment ? static_cast<const float*>(gsrc) : nullptr;
  // row r's pair-local index and element d of its d-wide tensors (pid order: G2, grad, dF)
  auto row_elem = [&](int r, int64_t d) {
    const int g = r / bq;
    return ((b * P + p0 + g) * Lq + (r - g * bq)) * D + d;
  };
  auto q_elem = [&](int r, int64_t d) {   // Q's
    const int g = r / bq;
    return (p0 + g) * a.sq_p + (r - g * bq) * a.sq_l + d;
  };

  // pass A: the scores, LeakyReLU kept, the probabilities
  tc_block_scores<T, MT>(a, b, p0, bq, bc, clen, cb, row_valid, xs, cs, S, ldS);
  for (int idx = tid; idx < ROWS * bc; idx += kThreads) {
    const int r = idx / bc, c = idx - r * bc;
    const float v = S[r * ldS + c];
    Sl[r * ldS + c] = v > 0.f ? v : 0.1f * v;
  }
  __syncthreads();
  tc_block_probs(S, ldS, ROWS, bc, gp, bq, qls, lam_s, clen, G, Lc, nrm, inv,
                 [&](int r, int c, float v) { Pb[r * ldP + c] = from_f<T>(v); }, un);
  const float* Pf = S;   // P, fp32

  // pass C: udA = rowsum(U dA), dP = dA C^T (split-K halves)
  TcPC<T, MT> pc;   // this warp's row tile of P, in registers for passes C and E
  pc.load(Pb, ldP, bc);
  const TcScoreTiles<MT> st(bc);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dacc[kTcMaxCT];
#pragma unroll
  for (int j = 0; j < kTcMaxCT; ++j) wmma::fill_fragment(dacc[j], 0.f);
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    tc_ctx_chunk(cb, a.sc_l, clen, bc, d0, D, cs, ldo);
    __syncthreads();
    pc.chunk(cs, ldo, us);
    __syncthreads();
    // warp-uniform rows: r = idx / 32 is the same for the 32 lanes of a warp, and in every chunk
    for (int idx = tid; idx < ROWS * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      float dA = 0.f, u = 0.f;
      if (d < D && row_valid(r)) {
        u = us[r * kLDU + k];
        if constexpr (MODE == kModeAlignment) {
          const float dq = to_f(a.q[q_elem(r, d)]) - u * inv[r];
          dA = -2.f * dq * g2[row_elem(r, d)];
        } else {
          dA = to_f(grad[row_elem(r, d)]);
        }
      }
      das[r * ldo + k] = from_f<T>(dA);
      const float t = warp_sum(u * dA);
      if (lane == 0) udA[r] += t;
    }
    __syncthreads();
    st.times_ctx_t(das, cs, ldo, dacc);
    __syncthreads();
  }
  tc_splitk_meet(dacc, ldS, [&](int j) { return st.live(j); },
                 [&](int j) { return dP + st.ti * 16 * ldS + st.tj(j) * 16; });
  for (int r = tid; r < ROWS; r += kThreads) {
    const float u = un[r];
    coefU[r] = u > 0.f ? udA[r] * inv[r] * inv[r] / u : 0.f;
  }
  __syncthreads();

  // on chip: dP through |U| (P G), M; the softmax, temperatures, norms across queries, LeakyReLU
  for (int idx = tid; idx < ROWS * bc; idx += kThreads) {
    const int r = idx / bc, c = idx - r * bc;
    float v = 0.f;
    if (c < clen && row_valid(r)) {
      const float* prow = Pf + r * ldS;
      float pg = 0.f;
      for (int c2 = 0; c2 < clen; ++c2) pg = fmaf(prow[c2], G[c2 * Lc + c], pg);
      v = inv[r] * dP[r * ldS + c] - coefU[r] * pg;
    }
    dP[r * ldS + c] = v;
  }
  __syncthreads();
  for (int r = warp; r < ROWS; r += kWarps) {
    if (!row_valid(r)) continue;
    const int g = r / bq;
    const float* prow = Pf + r * ldS;
    float* drow = dP + r * ldS;
    float rs = 0.f;
    for (int c = lane; c < clen; c += 32) rs = fmaf(prow[c], drow[c], rs);
    rs = warp_sum(rs);
    float dl = 0.f;
    const float lq = lam_s[r];
    const float* nr = nrm + g * bc;
    for (int c = lane; c < clen; c += 32) {
      const float dz = prow[c] * (drow[c] - rs);
      dl = fmaf(dz, Sl[r * ldS + c] / (nr[c] + kEps), dl);
      drow[c] = dz * lq;   // dSn
    }
    dl = warp_sum(dl);
    if (o.dlam != nullptr && lane == 0) o.dlam[(b * P + p0 + g) * Lq + (r - g * bq)] = dl;
  }
  __syncthreads();
  for (int idx = tid; idx < gp * bc; idx += kThreads) {
    const int g = idx / bc, c = idx - g * bc;
    float acc = 0.f;
    for (int q = 0; q < qls[g]; ++q) acc = fmaf(Sl[(g * bq + q) * ldS + c], dP[(g * bq + q) * ldS + c], acc);
    const float n = nrm[idx];
    colc[idx] = c < clen && n > 0.f ? acc / (n * (n + kEps) * (n + kEps)) : 0.f;
  }
  __syncthreads();
  for (int idx = tid; idx < ROWS * bc; idx += kThreads) {
    const int r = idx / bc, c = idx - r * bc;
    float v = 0.f;
    if (c < clen && row_valid(r)) {
      const int g = r / bq;
      const float s = Sl[r * ldS + c];
      const float ds = dP[r * ldS + c] / (nrm[g * bc + c] + kEps) - s * colc[g * bc + c];
      v = s > 0.f ? ds : 0.1f * ds;   // dS0 (S0 > 0 exactly where the LeakyReLU's output is)
    }
    dSb[r * ldP + c] = from_f<T>(v);
  }
  __syncthreads();

  // pass E: dX = dS0 C, dF, dQ; the block's dC
  TcPC<T, MT> px;   // this warp's row tile of dS0
  px.load(dSb, ldP, bc);
  const int nct = bc / 16, ct = warp >> 1, kt = warp & 1;   // dC: this warp's 16 x 16 tile of the chunk
  for (int64_t d0 = 0; d0 < D; d0 += kBD) {
    tc_ctx_chunk(cb, a.sc_l, clen, bc, d0, D, cs, ldo);
    for (int idx = tid; idx < ROWS * kBD; idx += kThreads) {   // X = F * Q, the dS0^T X operand
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      float v = 0.f;
      if (d < D && row_valid(r)) {
        v = to_f(a.q[q_elem(r, d)]);
        if (a.f != nullptr) {
          const int g = r / bq;
          v *= to_f(a.f[b * a.sf_b + (p0 + g) * a.sf_p + (r - g * bq) * a.sf_l + d]);
        }
      }
      xs[r * ldo + k] = from_f<T>(v);
    }
    __syncthreads();
    pc.chunk(cs, ldo, us);
    px.chunk(cs, ldo, ux);
    __syncthreads();
    for (int idx = tid; idx < ROWS * kBD; idx += kThreads) {
      const int r = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      float dAs = 0.f;
      if (d < D && row_valid(r)) {
        const int g = r / bq;
        const float qv = to_f(a.q[q_elem(r, d)]);
        const float fv = a.f != nullptr ? to_f(a.f[b * a.sf_b + (p0 + g) * a.sf_p + (r - g * bq) * a.sf_l + d]) : 1.f;
        const float dx = ux[r * kLDU + k], u = us[r * kLDU + k];
        float dDq = 0.f, dA;
        if constexpr (MODE == kModeAlignment) {
          dDq = 2.f * (qv - u * inv[r]) * g2[row_elem(r, d)];
          dA = -dDq;
        } else {
          dA = to_f(grad[row_elem(r, d)]);
        }
        atomicAdd(o.dq + ((p0 + g) * Lq + (r - g * bq)) * D + d, dDq + dx * fv);
        if (o.df != nullptr) o.df[row_elem(r, d)] = dx * qv;
        dAs = dA * inv[r] - coefU[r] * u;   // dU
      }
      das[r * ldo + k] = from_f<T>(dAs);
    }
    __syncthreads();
    if (ct < nct) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int r0 = 0; r0 < ROWS; r0 += 16) {   // P^T dU + dS0^T X: K the block's rows
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> at;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bt;
        wmma::load_matrix_sync(at, Pb + r0 * ldP + ct * 16, ldP);
        wmma::load_matrix_sync(bt, das + r0 * ldo + kt * 16, ldo);
        wmma::mma_sync(acc, at, bt, acc);
        wmma::load_matrix_sync(at, dSb + r0 * ldP + ct * 16, ldP);
        wmma::load_matrix_sync(bt, xs + r0 * ldo + kt * 16, ldo);
        wmma::mma_sync(acc, at, bt, acc);
      }
      wmma::store_matrix_sync(dcs + ct * 16 * kLDU + kt * 16, acc, kLDU, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = tid; idx < clen * kBD; idx += kThreads) {
      const int c = idx >> 5, k = idx & 31;
      const int64_t d = d0 + k;
      if (d < D) atomicAdd(o.dc + (bcx * Lc + c) * D + d, dcs[c * kLDU + k]);
    }
    // the next chunk's stores (cs, xs) come before a barrier that follows this loop in every thread;
    // dcs is written again only after two more barriers
  }
}

// o for the pairs pid0 .. of rectangle r (attn_args_rect's): the per-pair outputs from its first
// pair, dquery from its first query item, dcontext from its first context item (paired: all items,
// which the pairs name). Host side.
inline BwdOut bwd_out_rect(BwdOut o, const PairRect& r, int64_t pid0, int64_t Lq, int64_t Lc, int64_t D, bool paired) {
  o.dq += r.p0 * Lq * D;
  if (!paired) o.dc += r.b0 * Lc * D;
  if (o.df != nullptr) o.df += pid0 * Lq * D;
  if (o.dlam != nullptr) o.dlam += pid0 * Lq;
  return o;
}

// ---------------------------------------------------------------- dY for the backward's mode 1
// Per row (pair pid0 + row / Lq, query row % Lq): Y (with bias) and the output gradient dE give
// dY = dE / (r + eps) - Y (Y . dE) / (r (r + eps)^2), r = |Y|; zero at rows past the query length.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) l2n_bwd_rows_kernel(const float* __restrict__ Y, const T* __restrict__ grad,
                                                                const int* __restrict__ qlens, int64_t pid0,
                                                                int64_t rows, int64_t P, int64_t Lq, int64_t S,
                                                                float* __restrict__ dY) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t pid = pid0 + row / Lq, q = row % Lq;
  const int64_t p = pid % P;
  const float* yr = Y + row * S;
  float* dr = dY + row * S;
  if (q >= clamp_len(qlens[p], Lq)) {
    for (int64_t n = lane; n < S; n += 32) dr[n] = 0.f;
    return;
  }
  const T* gr = grad + (pid * Lq + q) * S;
  float yy = 0.f, yg = 0.f;
  for (int64_t n = lane; n < S; n += 32) {
    const float y = yr[n], g = to_f(gr[n]);
    yy = fmaf(y, y, yy);
    yg = fmaf(y, g, yg);
  }
  yy = warp_sum(yy);
  yg = warp_sum(yg);
  const float r = sqrtf(yy);
  const float ir = 1.f / (r + kEps);
  const float coef = r > 0.f ? yg / (r * (r + kEps) * (r + kEps)) : 0.f;
  for (int64_t n = lane; n < S; n += 32) dr[n] = to_f(gr[n]) * ir - yr[n] * coef;
}

}  // namespace cuda
}  // namespace rcar_fast
