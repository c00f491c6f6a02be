// rcar_fast::attention and rcar_fast::attention_bwd on CPU (the contract: csrc/README.md).
//
// Forward. The pair grid (b, p), n = b * P + p, is cut into tiles of consecutive pairs holding
// at most kTileRows valid query rows; threads take tiles dynamically (run_tiles). Inside a tile
// the pairs that share a context item b form a group, and the group's work is three GEMMs
// with that context item:
//   St = C_b X^T            (clen x rows)  X = F * Q, or Q; the scores, transposed
//   per pair, on the small St: LeakyReLU, norms across the pair's valid queries, softmax
//   over valid context of lam[q] * Sn -> Pm (rows x clen)
//   U = Pm C_b              (rows x d)
// then, per tile, row by row in cache: A = U / (|U| + eps), and without weight A is stored;
// with weight D = (Q - A)^2 overwrites U and one GEMM Y = D W^T (rows x s) of the tile's rows
// projects it, E = l2n(Y + b) is stored. Only valid rows enter any product (padding is never
// read: a pair's valid query rows and the context's valid rows are prefixes), and rows past a
// pair's query length are written as zeros. The d-wide A, D never leave the core's cache.
//
// Backward. The same per-tile recomputation (one context item per tile), then the chain of
// kernels/attention_bwd.py with GEMMs over the tile's rows. Shared gradients without atomics:
// b and p are cut into L chunks each and the pairs are processed in L waves; in wave k task i
// takes (b chunk i, p chunk (i + k) mod L), so the tasks of a wave write disjoint rows of
// dquery and dcontext; dweight and dbias are summed per task index and reduced at the end.
//
// Paired (context_index given, the pair lists of rcar_fast.ops.pair_scores): pair n = p is query
// item p with context item ci[p], the output has B = 1. The forward groups consecutive pairs
// with the same context item (the pipeline sorts a block's pairs by it); the backward gives all
// the runs of one context item to one task, so tasks write disjoint rows of dcontext (each
// query item belongs to one pair: dquery rows never collide).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/common.h"

namespace rcar_fast::cpu {
namespace {

template <class T>
struct AttnInputs {
  const T* q;    // (P, Lq, D)
  const T* c;    // (B, Lc, D)
  const T* f;    // (B, P, Lq, D) or null
  const T* lam;  // (B, P, Lq) or null
  const T* w;    // (S, D) or null
  const T* wt;   // W^T (D, S) packed (pack_kn) or null
  const T* wp;   // W (S, D) packed, for the backward, or null
  const T* bias; // (S) or null
  const int32_t* ql;
  const int32_t* cl;
  const int32_t* ci;           // (P) context item of each pair (paired), or null (the grid)
  T lam_s;
  int64_t B, P, Lq, Lc, D, S;  // S = 0 without weight; B: context items
  int64_t Bo;                  // items on the output's context side: B, or 1 paired
  int64_t rows_max;            // rows a tile may hold: max(kTileRows, Lq)
};

// The context item of pair n = b * P + p: b on the grid, ci[p] paired.
template <class T>
RCAR_INLINE int64_t context_of(const AttnInputs<T>& a, int64_t n) {
  return a.ci ? a.ci[n % a.P] : n / a.P;
}

template <class T>
constexpr T eps() {
  return T(1e-8);
}

template <class T>
RCAR_INLINE T leaky(T v) {
  return v > T(0) ? v : T(0.1) * v;
}

// One pair's softmax probabilities from its transposed scores: St (clen x ldst) holds S0 in
// columns [r0, r0 + nq). Writes Pm rows r0.. (row stride ldp) and the column norms N (clen).
template <class T>
void pair_probs(const T* St, int64_t ldst, int64_t r0, int64_t nq, int64_t clen, const T* lam, T lam_s,
                T* Pm, int64_t ldp, T* N, T* invN) {
  for (int64_t c = 0; c < clen; ++c) {
    const T* s = St + c * ldst + r0;
    T s2 = 0;
    for (int64_t q = 0; q < nq; ++q) {
      const T v = leaky(s[q]);
      s2 += v * v;
    }
    N[c] = std::sqrt(s2);
    invN[c] = T(1) / (N[c] + eps<T>());
  }
  for (int64_t q = 0; q < nq; ++q) {
    const T l = lam ? lam[q] : lam_s;
    T* row = Pm + (r0 + q) * ldp;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < clen; ++c) {
      const T z = l * (leaky(St[c * ldst + r0 + q]) * invN[c]);
      row[c] = z;
      m = std::max(m, z);
    }
    const T sum = exp_shift_sum(row, m, clen);
    scale(row, row, T(1) / sum, clen);
  }
}

// X rows of pairs [k0, k1) of the tile (pair n = n0 + k): F * Q, or Q, written to X at row
// stride ldx. Returns the group's first X row and the row stride: Q itself (stride D) when
// there is no F and no padding.
template <class T>
std::pair<const T*, int64_t> group_x(const AttnInputs<T>& a, int64_t n0, int64_t k0, int64_t k1,
                                     const std::vector<int64_t>& ro, T* X, int64_t ldx, bool force_copy) {
  const int64_t D = a.D, Lq = a.Lq, P = a.P;
  bool full = true;
  for (int64_t k = k0; k < k1; ++k) full = full && a.ql[(n0 + k) % P] == Lq;
  if (!a.f && full && !force_copy) return {a.q + ((n0 + k0) % P) * Lq * D, D};
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t n = n0 + k, p = n % P, nq = a.ql[p];
    for (int64_t qi = 0; qi < nq; ++qi) {
      T* x = X + (ro[k] + qi) * ldx;
      const T* qrow = a.q + (p * Lq + qi) * D;
      if (a.f) mul(x, a.f + (n * Lq + qi) * D, qrow, D);
      else std::memcpy(x, qrow, sizeof(T) * D);
    }
  }
  return {X + ro[k0] * ldx, ldx};
}

template <class T>
struct FwdState {
  // the scratch buffers, in the order of the sizes below: the tile's (F Q) rows, U = P C, S^T, lam per row, Y, softmax max and sum, C copied
  enum Slot : size_t { kQueryRows, kAttended, kScoresT, kTemperatures, kProjection, kRowMax, kRowSum, kContextCopy };
  Scratch<T> buf;
  std::vector<int64_t> ro;
  explicit FwdState(const AttnInputs<T>& a)
      : buf({a.rows_max * padded_ld<T>(a.D), a.rows_max * padded_ld<T>(a.D), a.Lc * a.rows_max, a.rows_max,
             a.rows_max * std::max<int64_t>(a.S, 1), a.rows_max, a.rows_max, a.Lc * padded_ld<T>(a.D)}) {}
};

// Forward of the pairs [n0, n1) into out (B, P, Lq, W).
template <class T>
void forward_tile(const AttnInputs<T>& a, int64_t n0, int64_t n1, FwdState<T>& st, T* out) {
  const int64_t D = a.D, Lq = a.Lq, Lc = a.Lc, P = a.P, S = a.S, RT = a.rows_max;
  T* X = st.buf[FwdState<T>::kQueryRows];
  T* U = st.buf[FwdState<T>::kAttended];
  T* St = st.buf[FwdState<T>::kScoresT];
  T* lamr = st.buf[FwdState<T>::kTemperatures];
  T* Yb = st.buf[FwdState<T>::kProjection];
  T* mrow = st.buf[FwdState<T>::kRowMax];
  T* srow = st.buf[FwdState<T>::kRowSum];
  T* Cp = st.buf[FwdState<T>::kContextCopy];
  const int64_t DP = padded_ld<T>(D);  // U, X and the context copy Cp: rows off 4 KB multiples
  auto& ro = st.ro;
  const int64_t rows = compact_rows(a, n0, n1, ro);
  const int64_t np = n1 - n0;
  RCAR_PROF_START
  // attention, one group of pairs per context item
  for (int64_t k0 = 0; k0 < np;) {
    const int64_t b = context_of(a, n0 + k0);
    int64_t k1 = k0 + 1;
    while (k1 < np && context_of(a, n0 + k1) == b) ++k1;
    const int64_t clen = a.cl[b];
    const T* Cb = a.c + b * Lc * D;
    const int64_t r0 = ro[k0], rg = ro[k1] - ro[k0];
    const auto [Xg, ldx] = group_x(a, n0, k0, k1, ro, X, DP, false);
    for (int64_t c = 0; c < clen; ++c) std::memcpy(Cp + c * DP, Cb + c * D, sizeof(T) * D);
    RCAR_PROF("fwd x")
    scores_t(Xg, ldx, rg, Cp, DP, clen, D, St + r0, RT);
    RCAR_PROF("fwd scores")
    if (a.lam)
      for (int64_t k = k0; k < k1; ++k)
        std::memcpy(lamr + ro[k] - r0, a.lam + (n0 + k) * Lq, sizeof(T) * (ro[k + 1] - ro[k]));
    probs_cmajor(St + r0, RT, clen, ro.data() + k0, k1 - k0, a.lam ? lamr : nullptr, a.lam_s, mrow, srow);
    RCAR_PROF("fwd probs")
    mix_rows_t(St + r0, RT, rg, Cp, DP, clen, D, U + r0 * DP, DP);
    RCAR_PROF("fwd mix")
    k0 = k1;
  }

  const int64_t W = S ? S : D;
  if (S == 0) {
    for (int64_t k = 0; k < np; ++k) {
      const int64_t n = n0 + k, nq = a.ql[n % P];
      for (int64_t qi = 0; qi < nq; ++qi) {
        const T* u = U + (ro[k] + qi) * DP;
        scale(out + (n * Lq + qi) * D, u, T(1) / (std::sqrt(sumsq(u, D)) + eps<T>()), D);
      }
    }
  } else {
    // D = (Q - A)^2 in place of U, then the tile's projection
    for (int64_t k = 0; k < np; ++k) {
      const int64_t p = (n0 + k) % P, nq = a.ql[p];
      for (int64_t qi = 0; qi < nq; ++qi) {
        T* u = U + (ro[k] + qi) * DP;
        sqdiff(u, a.q + (p * Lq + qi) * D, u, T(1) / (std::sqrt(sumsq(u, D)) + eps<T>()), D);
      }
    }
    const bool dense = rows == np * Lq;  // no padding: the tile's rows are contiguous in out
    T* Y = dense ? out + n0 * Lq * S : Yb;
    RCAR_PROF("fwd sqdiff")
    gemm_kn(rows, S, D, U, DP, a.wt, Y, S, false);
    RCAR_PROF("fwd projection")
    for (int64_t k = 0; k < np; ++k) {
      const int64_t n = n0 + k, nq = a.ql[n % P];
      for (int64_t qi = 0; qi < nq; ++qi) {
        T* y = Y + (ro[k] + qi) * S;
        axpy(y, T(1), a.bias, S);
        T* o = out + (n * Lq + qi) * S;
        scale(o, y, T(1) / (std::sqrt(sumsq(y, S)) + eps<T>()), S);
      }
    }
  }
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t nq = a.ql[n % P];
    if (nq < Lq) std::memset(out + (n * Lq + nq) * W, 0, sizeof(T) * (Lq - nq) * W);
  }
  RCAR_PROF("fwd epilogue")
}

// ------------------------------------------------------------------------------ backward

template <class T>
struct BwdState {
  // the scratch buffers, in the order of the sizes below: X U D2 G, S^T P dP, Y dY, |U| 1/|U|, N 1/N per pair
  enum Slot : size_t { kQueryRows, kAttended, kSquaredDiff, kGrad, kScoresT, kProbs, kGradProbs, kProjection, kGradProjection, kNormU, kInvNormU, kNormS, kInvNormS };
  Scratch<T> buf;
  std::vector<int64_t> ro;
  explicit BwdState(const AttnInputs<T>& a)
      : buf({a.rows_max * a.D, a.rows_max * a.D, a.rows_max * a.D, a.rows_max * a.D,  // X U D2 G
             a.Lc * a.rows_max, a.rows_max * a.Lc, a.rows_max * a.Lc,                 // St Pm dP
             a.rows_max * std::max<int64_t>(a.S, 1), a.rows_max * std::max<int64_t>(a.S, 1),  // Y dY
             a.rows_max, a.rows_max, a.rows_max * a.Lc, a.rows_max * a.Lc}) {}  // un inv N invN
};

template <class T>
struct BwdOutputs {
  const T* grad;  // (B, P, Lq, W)
  T* dq;          // (P, Lq, D)
  T* dc;          // (B, Lc, D)
  T* df;          // (B, P, Lq, D) or null
  T* dlam;        // (B, P, Lq) or null
};

// Backward of the pairs [n0, n1), all with the same context item b. dw (S, D) and db (S)
// are this task's accumulators.
template <class T>
void backward_tile(const AttnInputs<T>& a, const BwdOutputs<T>& o, int64_t n0, int64_t n1, BwdState<T>& st,
                   T* dw, T* db) {
  const int64_t D = a.D, Lq = a.Lq, Lc = a.Lc, P = a.P, S = a.S, RT = a.rows_max;
  const int64_t W = S ? S : D;
  T* X = st.buf[BwdState<T>::kQueryRows];
  T* U = st.buf[BwdState<T>::kAttended];
  T* D2 = st.buf[BwdState<T>::kSquaredDiff];
  T* G = st.buf[BwdState<T>::kGrad];
  T* St = st.buf[BwdState<T>::kScoresT];
  T* Pm = st.buf[BwdState<T>::kProbs];
  T* dP = st.buf[BwdState<T>::kGradProbs];
  T* Y = st.buf[BwdState<T>::kProjection];
  T* dY = st.buf[BwdState<T>::kGradProjection];
  T* un = st.buf[BwdState<T>::kNormU];
  T* inv = st.buf[BwdState<T>::kInvNormU];
  T* Nall = st.buf[BwdState<T>::kNormS];     // per pair, Lc each
  T* invNall = st.buf[BwdState<T>::kInvNormS];  // per pair, Lc each
  auto& ro = st.ro;
  const int64_t rows = compact_rows(a, n0, n1, ro);
  const int64_t np = n1 - n0;
  const int64_t b = context_of(a, n0);
  const int64_t clen = a.cl[b];
  const T* Cb = a.c + b * Lc * D;
  T* dCb = o.dc + b * Lc * D;

  // recompute: scores, probabilities, U
  group_x(a, n0, 0, np, ro, X, D, true);
  scores_t(X, D, rows, Cb, D, clen, D, St, RT);
  for (int64_t k = 0; k < np; ++k) {
    const int64_t n = n0 + k;
    pair_probs(St, RT, ro[k], ro[k + 1] - ro[k], clen, a.lam ? a.lam + n * Lq : nullptr, a.lam_s, Pm, Lc,
               Nall + k * Lc, invNall + k * Lc);
  }
  mix_rows(Pm, Lc, rows, Cb, D, clen, D, U, D);
  for (int64_t r = 0; r < rows; ++r) {
    un[r] = std::sqrt(sumsq(U + r * D, D));
    inv[r] = T(1) / (un[r] + eps<T>());
  }

  // G = dL/dA
  if (S) {
    for (int64_t k = 0; k < np; ++k) {
      const int64_t p = (n0 + k) % P;
      for (int64_t qi = 0; qi < ro[k + 1] - ro[k]; ++qi) {
        const int64_t r = ro[k] + qi;
        sqdiff(D2 + r * D, a.q + (p * Lq + qi) * D, U + r * D, inv[r], D);
      }
    }
    gemm_kn(rows, S, D, D2, D, a.wt, Y, S, false);
    for (int64_t k = 0; k < np; ++k) {
      const int64_t n = n0 + k;
      for (int64_t qi = 0; qi < ro[k + 1] - ro[k]; ++qi) {
        const int64_t r = ro[k] + qi;
        T* y = Y + r * S;
        axpy(y, T(1), a.bias, S);
        const T* dE = o.grad + (n * Lq + qi) * W;
        const T rn = std::sqrt(sumsq(y, S));
        const T re = rn + eps<T>();
        const T coef = rn > T(0) ? dot(y, dE, S) / (rn * re * re) : T(0);
        T* dy = dY + r * S;
        for (int64_t j = 0; j < S; ++j) dy[j] = dE[j] / re - y[j] * coef;
        axpy(db, T(1), dy, S);
      }
    }
    gemm(true, false, S, D, rows, T(1), dY, S, D2, D, T(1), dw, D);  // dW += dY^T (Q - A)^2
    gemm_kn(rows, D, S, dY, S, a.wp, G, D, false);                    // dL/dD
    for (int64_t k = 0; k < np; ++k) {
      const int64_t p = (n0 + k) % P;
      for (int64_t qi = 0; qi < ro[k + 1] - ro[k]; ++qi) {
        const int64_t r = ro[k] + qi;
        const T* qrow = a.q + (p * Lq + qi) * D;
        const T* u = U + r * D;
        T* g = G + r * D;
        T* dq = o.dq + (p * Lq + qi) * D;
        const T s = inv[r];
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          const T t = T(2) * g[j] * (qrow[j] - s * u[j]);  // dL/dQ (direct) = -dL/dA
          dq[j] += t;
          g[j] = -t;
        }
      }
    }
  } else {
    for (int64_t k = 0; k < np; ++k) {
      const int64_t n = n0 + k;
      for (int64_t qi = 0; qi < ro[k + 1] - ro[k]; ++qi)
        std::memcpy(G + (ro[k] + qi) * D, o.grad + (n * Lq + qi) * D, sizeof(T) * D);
    }
  }

  // through A = U / (|U| + eps): G becomes dL/dU
  for (int64_t r = 0; r < rows; ++r) {
    T* g = G + r * D;
    const T* u = U + r * D;
    const T coef = un[r] > T(0) ? dot(u, g, D) * inv[r] * inv[r] / un[r] : T(0);
    const T s = inv[r];
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) g[j] = g[j] * s - u[j] * coef;
  }
  gemm(false, true, rows, clen, D, T(1), G, D, Cb, D, T(0), dP, Lc);    // dP = dU C^T
  gemm(true, false, clen, D, rows, T(1), Pm, Lc, G, D, T(1), dCb, D);   // dC += P^T dU

  // softmax, temperatures, normalisation across queries, LeakyReLU: dP becomes dL/dS0
  for (int64_t k = 0; k < np; ++k) {
    const int64_t n = n0 + k, r0 = ro[k], nq = ro[k + 1] - ro[k];
    const T* Nv = Nall + k * Lc;
    const T* invN = invNall + k * Lc;
    for (int64_t qi = 0; qi < nq; ++qi) {
      const int64_t r = r0 + qi;
      const T* pr = Pm + r * Lc;
      T* dp = dP + r * Lc;
      const T l = a.lam ? a.lam[n * Lq + qi] : a.lam_s;
      T sdp = 0;
      for (int64_t c = 0; c < clen; ++c) sdp += pr[c] * dp[c];
      T dl = 0;
      for (int64_t c = 0; c < clen; ++c) {
        const T dz = pr[c] * (dp[c] - sdp);
        dl += dz * leaky(St[c * RT + r]) * invN[c];
        dp[c] = dz * l;  // dL/dSn
      }
      if (o.dlam) o.dlam[n * Lq + qi] = dl;
    }
    for (int64_t c = 0; c < clen; ++c) {
      T acc = 0;
      for (int64_t qi = 0; qi < nq; ++qi) acc += leaky(St[c * RT + r0 + qi]) * dP[(r0 + qi) * Lc + c];
      const T coefN = Nv[c] > T(0) ? acc / (Nv[c] * (Nv[c] + eps<T>()) * (Nv[c] + eps<T>())) : T(0);
      for (int64_t qi = 0; qi < nq; ++qi) {
        const T s0 = St[c * RT + r0 + qi];
        T& d = dP[(r0 + qi) * Lc + c];
        const T ds = d * invN[c] - leaky(s0) * coefN;
        d = s0 > T(0) ? ds : T(0.1) * ds;
      }
    }
  }

  // dX = dS0 C; dF = dX Q, dQ += dX F (or dX); dC += dS0^T X
  gemm(false, false, rows, D, clen, T(1), dP, Lc, Cb, D, T(0), G, D);
  for (int64_t k = 0; k < np; ++k) {
    const int64_t n = n0 + k, p = n % P;
    for (int64_t qi = 0; qi < ro[k + 1] - ro[k]; ++qi) {
      const T* g = G + (ro[k] + qi) * D;
      T* dq = o.dq + (p * Lq + qi) * D;
      if (a.f) {
        const T* frow = a.f + (n * Lq + qi) * D;
        if (o.df) mul(o.df + (n * Lq + qi) * D, g, a.q + (p * Lq + qi) * D, D);
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) dq[j] += g[j] * frow[j];
      } else {
        axpy(dq, T(1), g, D);
      }
    }
  }
  gemm(true, false, clen, D, rows, T(1), dP, Lc, X, D, T(1), dCb, D);
}

// --------------------------------------------------------------------------- op entries

struct Prepared {
  at::ScalarType compute;  // kFloat or kDouble
  at::Tensor q, c, f, lam, w, wt, wp, bias;
  std::vector<int32_t> ql, cl, ci;
};

at::Tensor as_compute(const at::Tensor& t, at::ScalarType st) { return t.to(st).contiguous(); }

Prepared prepare(const at::Tensor& query, const at::Tensor& qlens, const at::Tensor& context,
                 const at::Tensor& clens, const c10::optional<at::Tensor>& factors,
                 const c10::optional<at::Tensor>& lam, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& context_index) {
  check_attention(query, qlens, context, clens, factors, lam, weight, bias, context_index);
  TORCH_CHECK(query.device().is_cpu(), "query: the CPU kernels take CPU tensors, got ", query.device());
  Prepared pr;
  pr.compute = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  pr.q = as_compute(query, pr.compute);
  pr.c = as_compute(context, pr.compute);
  if (factors) pr.f = as_compute(*factors, pr.compute);
  if (lam) pr.lam = as_compute(*lam, pr.compute);
  if (weight) {
    pr.w = as_compute(*weight, pr.compute);
    pr.wt = cached_pack("attention W^T", {pr.w}, [&] { return pack_kn(pr.w.t()); });
    pr.bias = as_compute(*bias, pr.compute);
  }
  pr.ql = read_lengths(qlens, "qlens", query.size(1), "1 <= qlens[p] <= Lq");
  pr.cl = read_lengths(clens, "clens", context.size(1), "1 <= clens[b] <= Lc");
  if (context_index) {
    auto ci = context_index->contiguous();
    const int32_t* v = ci.data_ptr<int32_t>();
    pr.ci.assign(v, v + ci.numel());
    for (size_t i = 0; i < pr.ci.size(); ++i)
      TORCH_CHECK(pr.ci[i] >= 0 && pr.ci[i] < context.size(0), "context_index: expected indices in [0, ",
                  context.size(0), ") (the context items), got ", pr.ci[i], " at index ", i);
  }
  return pr;
}

template <class T>
AttnInputs<T> inputs_of(const Prepared& pr, double lam_scalar) {
  AttnInputs<T> a;
  a.q = pr.q.data_ptr<T>();
  a.c = pr.c.data_ptr<T>();
  a.f = pr.f.defined() ? pr.f.data_ptr<T>() : nullptr;
  a.lam = pr.lam.defined() ? pr.lam.data_ptr<T>() : nullptr;
  a.w = pr.w.defined() ? pr.w.data_ptr<T>() : nullptr;
  a.wt = pr.wt.defined() ? pr.wt.data_ptr<T>() : nullptr;
  a.wp = pr.wp.defined() ? pr.wp.data_ptr<T>() : nullptr;
  a.bias = pr.bias.defined() ? pr.bias.data_ptr<T>() : nullptr;
  a.ql = pr.ql.data();
  a.cl = pr.cl.data();
  a.ci = pr.ci.empty() ? nullptr : pr.ci.data();
  a.lam_s = static_cast<T>(lam_scalar);
  a.P = pr.q.size(0);
  a.Lq = pr.q.size(1);
  a.D = pr.q.size(2);
  a.B = pr.c.size(0);
  a.Lc = pr.c.size(1);
  a.Bo = a.ci ? 1 : a.B;
  a.S = pr.w.defined() ? pr.w.size(0) : 0;
  a.rows_max = std::max<int64_t>(kTileRows, a.Lq);
  return a;
}

template <class T>
void attention_forward(const AttnInputs<T>& a, T* out) {
  if (a.Bo * a.P == 0) return;
  const auto tiles = pair_tiles(a.Bo, a.P, a.ql, a.rows_max, false);
  run_tiles(
      static_cast<int64_t>(tiles.size()) - 1, [&] { return FwdState<T>(a); },
      [&](int64_t t, FwdState<T>& st) { forward_tile(a, tiles[t], tiles[t + 1], st, out); });
}

at::Tensor attention_cpu(const at::Tensor& query, const at::Tensor& qlens, const at::Tensor& context,
                         const at::Tensor& clens, const c10::optional<at::Tensor>& factors,
                         const c10::optional<at::Tensor>& lam, double lam_scalar,
                         const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& context_index, const c10::optional<at::Tensor>& gram) {
  Prepared pr = prepare(query, qlens, context, clens, factors, lam, weight, bias, context_index);
  check_gram(gram, context);   // checked, not used: this kernel takes |U| from U itself, not through G
  const int64_t B = context_index ? 1 : context.size(0), P = query.size(0), Lq = query.size(1);
  const int64_t W = weight ? weight->size(0) : query.size(2);
  at::Tensor out = at::empty({B, P, Lq, W}, pr.q.options());
  if (pr.compute == at::kDouble) attention_forward<double>(inputs_of<double>(pr, lam_scalar), out.data_ptr<double>());
  else attention_forward<float>(inputs_of<float>(pr, lam_scalar), out.data_ptr<float>());
  return out.scalar_type() == query.scalar_type() ? out : out.to(query.scalar_type());
}

// dweight and dbias per lane (task index), summed at the end: no atomics.
template <class T>
struct Lanes {
  int64_t L, S, D;
  std::vector<T> dw, db;
  Lanes(int64_t L_, int64_t S_, int64_t D_) : L(L_), S(S_), D(D_) {
    if (S) {
      dw.assign(static_cast<size_t>(L) * S * D, T(0));
      db.assign(static_cast<size_t>(L) * S, T(0));
    }
  }
  T* dw_of(int64_t i) { return S ? dw.data() + i * S * D : nullptr; }
  T* db_of(int64_t i) { return S ? db.data() + i * S : nullptr; }
  void reduce(T* dw_out, T* db_out) const {
    for (int64_t i = 0; S && i < L; ++i) {
      axpy(dw_out, T(1), dw.data() + i * S * D, S * D);
      axpy(db_out, T(1), db.data() + i * S, S);
    }
  }
};

// Paired backward: runs of consecutive pairs with one context item (at most rows_max rows), all
// the runs of a context item in one task, tasks spread over L lanes (lane i takes the context
// items k = i mod L among those named); dweight and dbias summed per lane.
template <class T>
void attention_backward_paired(const AttnInputs<T>& a, const BwdOutputs<T>& o, T* dw, T* db) {
  const int64_t P = a.P, S = a.S, D = a.D;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> runs(a.B);
  for (int64_t p0 = 0; p0 < P;) {
    int64_t p1 = p0 + 1, rows = a.ql[p0];
    while (p1 < P && a.ci[p1] == a.ci[p0] && rows + a.ql[p1] <= a.rows_max) rows += a.ql[p1++];
    runs[a.ci[p0]].emplace_back(p0, p1);
    p0 = p1;
  }
  std::vector<int64_t> named;
  for (int64_t b = 0; b < a.B; ++b)
    if (!runs[b].empty()) named.push_back(b);
  const int64_t L = std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(named.size()),
                                                           2 * at::get_num_threads()));
  Lanes<T> lanes(L, S, D);
  run_tiles(
      L, [&] { return BwdState<T>(a); },
      [&](int64_t i, BwdState<T>& st) {
        for (size_t k = i; k < named.size(); k += L)
          for (const auto& [p0, p1] : runs[named[k]])
            backward_tile(a, o, p0, p1, st, lanes.dw_of(i), lanes.db_of(i));
      });
  lanes.reduce(dw, db);
}

template <class T>
void attention_backward(const AttnInputs<T>& a, const BwdOutputs<T>& o, T* dw, T* db) {
  const int64_t B = a.B, P = a.P, S = a.S, D = a.D;
  if (a.Bo * P == 0) return;
  if (a.ci) return attention_backward_paired(a, o, dw, db);
  // L lanes: b and p in L chunks each; wave k runs the L tasks (i, (i + k) mod L)
  const int64_t L = std::max<int64_t>(1, std::min<int64_t>({B, P, 2 * at::get_num_threads()}));
  std::vector<int64_t> bcut(L + 1), pcut(L + 1);
  for (int64_t i = 0; i <= L; ++i) {
    bcut[i] = B * i / L;
    pcut[i] = P * i / L;
  }
  Lanes<T> lanes(L, S, D);
  for (int64_t wave = 0; wave < L; ++wave) {
    run_tiles(
        L, [&] { return BwdState<T>(a); },
        [&](int64_t i, BwdState<T>& st) {
          const int64_t j = (i + wave) % L;
          T* dwi = lanes.dw_of(i);
          T* dbi = lanes.db_of(i);
          for (int64_t b = bcut[i]; b < bcut[i + 1]; ++b) {
            int64_t rows = 0, start = pcut[j];
            for (int64_t p = pcut[j]; p < pcut[j + 1]; ++p) {
              if (rows > 0 && rows + a.ql[p] > a.rows_max) {
                backward_tile(a, o, b * P + start, b * P + p, st, dwi, dbi);
                start = p;
                rows = 0;
              }
              rows += a.ql[p];
            }
            if (start < pcut[j + 1]) backward_tile(a, o, b * P + start, b * P + pcut[j + 1], st, dwi, dbi);
          }
        });
  }
  lanes.reduce(dw, db);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& query, const at::Tensor& qlens, const at::Tensor& context,
    const at::Tensor& clens, const c10::optional<at::Tensor>& factors, const c10::optional<at::Tensor>& lam,
    double lam_scalar, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    bool need_dfactors, const c10::optional<at::Tensor>& context_index) {
  Prepared pr = prepare(query, qlens, context, clens, factors, lam, weight, bias, context_index);
  const int64_t B = context_index ? 1 : context.size(0), P = query.size(0), Lq = query.size(1), D = query.size(2);
  const int64_t Lc = context.size(1);
  const int64_t W = weight ? weight->size(0) : D;
  check_float(grad, "grad", query);
  check_shape(grad, "grad", {B, P, Lq, W});
  at::Tensor g = as_compute(grad, pr.compute);
  if (weight) pr.wp = cached_pack("attention W", {pr.w}, [&] { return pack_kn(pr.w); });
  const auto opts = pr.q.options();
  at::Tensor dq = at::zeros({P, Lq, D}, opts);
  at::Tensor dc = at::zeros({context.size(0), Lc, D}, opts);
  const bool want_df = factors.has_value() && need_dfactors;
  at::Tensor df = want_df ? at::zeros({B, P, Lq, D}, opts) : at::empty({0}, opts);
  at::Tensor dlam = lam ? at::zeros({B, P, Lq}, opts) : at::empty({0}, opts);
  at::Tensor dw = weight ? at::zeros({W, D}, opts) : at::empty({0}, opts);
  at::Tensor db = weight ? at::zeros({W}, opts) : at::empty({0}, opts);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    BwdOutputs<T> o{g.data_ptr<T>(), dq.data_ptr<T>(), dc.data_ptr<T>(), want_df ? df.data_ptr<T>() : nullptr,
                    lam ? dlam.data_ptr<T>() : nullptr};
    attention_backward<T>(inputs_of<T>(pr, lam_scalar), o, weight ? dw.data_ptr<T>() : nullptr,
                          weight ? db.data_ptr<T>() : nullptr);
  };
  if (pr.compute == at::kDouble) run(double{});
  else run(float{});
  return {dq, dc, df, dlam, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcar_fast, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace rcar_fast::cpu
