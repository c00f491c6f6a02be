// fp32 element-wise loops of common.h, compiled three times (AVX-512, AVX2+FMA, baseline x86-64)
// and picked at load time by the CPU's features (GCC/Clang target_clones). The loop bodies are
// the vm:: templates of common.h, inlined into each clone.
#include "cpu/common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__INTEL_COMPILER)
#define RCAR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RCAR_CLONES
#endif

namespace rcar_fast::cpu {

RCAR_CLONES float sumsq(const float* x, int64_t n) { return vm::sumsq(x, n); }
RCAR_CLONES float dot(const float* x, const float* y, int64_t n) { return vm::dot(x, y, n); }
RCAR_CLONES void tanh_bias(float* x, const float* b, int64_t n) { vm::tanh_bias(x, b, n); }
RCAR_CLONES void sqdiff(float* d, const float* q, const float* u, float s, int64_t n) { vm::sqdiff(d, q, u, s, n); }
RCAR_CLONES void scale(float* d, const float* x, float s, int64_t n) { vm::scale(d, x, s, n); }
RCAR_CLONES void mul(float* d, const float* a, const float* b, int64_t n) { vm::mul(d, a, b, n); }
RCAR_CLONES void axpy(float* y, float a, const float* x, int64_t n) { vm::axpy(y, a, x, n); }
RCAR_CLONES void rcr_tail(float* m, const float* b, const float* f, int64_t n) { vm::rcr_tail(m, b, f, n); }
RCAR_CLONES void rcr_bwd_row(float* m, const float* b, const float* f, const float* g, float* df, int64_t n) {
  vm::rcr_bwd_row(m, b, f, g, df, n);
}
RCAR_CLONES float tanh_dot(const float* k, const float* b, const float* w, const float* keep, int64_t n) {
  return vm::tanh_dot(k, b, w, keep, n);
}
RCAR_CLONES float exp_shift_sum(float* x, float m, int64_t n) { return vm::exp_shift_sum(x, m, n); }
RCAR_CLONES void probs_cmajor(float* St, int64_t ld, int64_t clen, const int64_t* off, int64_t npairs,
                              const float* lam, float lam_s, float* m, float* s) {
  vm::probs_cmajor(St, ld, clen, off, npairs, lam, lam_s, m, s);
}

}  // namespace rcar_fast::cpu

// ------------------------------------------------------------------ small-K / small-N GEMMs
// The attention's two products with one context item, whose short side (the context length,
// 6 to 36) BLAS handles at 25-80 GFLOP/s (measured, MKL, one thread); register-blocked here:
//   scores_t:  St[c * ldst + r] = X[r] . C[c]                (rows x clen dot products of length D)
//   mix_rows:  U[r] = sum_c Pm[r * ldp + c] C[c]              (rows x D, K = clen)
namespace rcar_fast::cpu {
namespace {

typedef float v8f __attribute__((vector_size(32)));

RCAR_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

RCAR_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

RCAR_INLINE float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

template <int MR, int NR>
RCAR_INLINE void scores_micro(const float* X, int64_t ldx, const float* C, int64_t ldc, int64_t D, float* St,
                              int64_t ldst) {
  v8f acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = v8f{};
  int64_t k = 0;
  for (; k + 8 <= D; k += 8) {
    v8f xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = load8(X + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const v8f cv = load8(C + j * ldc + k);
      for (int i = 0; i < MR; ++i) acc[i][j] += xv[i] * cv;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum8(acc[i][j]);
      for (int64_t kk = k; kk < D; ++kk) s += X[i * ldx + kk] * C[j * ldc + kk];
      St[j * ldst + i] = s;
    }
}

template <int MR>
RCAR_INLINE void scores_rowblock(const float* X, int64_t ldx, const float* C, int64_t ldc, int64_t clen, int64_t D,
                                 float* St, int64_t ldst) {
  int64_t c = 0;
  for (; c + 4 <= clen; c += 4) scores_micro<MR, 4>(X, ldx, C + c * ldc, ldc, D, St + c * ldst, ldst);
  switch (clen - c) {
    case 3: scores_micro<MR, 3>(X, ldx, C + c * ldc, ldc, D, St + c * ldst, ldst); break;
    case 2: scores_micro<MR, 2>(X, ldx, C + c * ldc, ldc, D, St + c * ldst, ldst); break;
    case 1: scores_micro<MR, 1>(X, ldx, C + c * ldc, ldc, D, St + c * ldst, ldst); break;
    default: break;
  }
}

// Pm[i * rs + c * cs]: the probability of row i and context row c
template <int MR>
RCAR_INLINE void mix_micro(const float* Pm, int64_t rs, int64_t cs, const float* C, int64_t ldc, int64_t clen,
                           int64_t D, float* U, int64_t ldu) {
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    v8f acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = v8f{};
    for (int64_t c = 0; c < clen; ++c) {
      const v8f c0 = load8(C + c * ldc + j), c1 = load8(C + c * ldc + j + 8);
      for (int i = 0; i < MR; ++i) {
        const float p = Pm[i * rs + c * cs];
        acc[i][0] += p * c0;
        acc[i][1] += p * c1;
      }
    }
    for (int i = 0; i < MR; ++i) {
      store8(U + i * ldu + j, acc[i][0]);
      store8(U + i * ldu + j + 8, acc[i][1]);
    }
  }
  for (; j < D; ++j)
    for (int i = 0; i < MR; ++i) {
      float s = 0;
      for (int64_t c = 0; c < clen; ++c) s += Pm[i * rs + c * cs] * C[c * ldc + j];
      U[i * ldu + j] = s;
    }
}

}  // namespace

RCAR_CLONES void scores_t(const float* X, int64_t ldx, int64_t rows, const float* C, int64_t ldc, int64_t clen,
                          int64_t D, float* St, int64_t ldst) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) scores_rowblock<3>(X + r * ldx, ldx, C, ldc, clen, D, St + r, ldst);
  if (rows - r == 2) scores_rowblock<2>(X + r * ldx, ldx, C, ldc, clen, D, St + r, ldst);
  else if (rows - r == 1) scores_rowblock<1>(X + r * ldx, ldx, C, ldc, clen, D, St + r, ldst);
}

namespace {
RCAR_INLINE void mix_any(const float* Pm, int64_t rs, int64_t cs, int64_t rows, const float* C, int64_t ldc,
                         int64_t clen, int64_t D, float* U, int64_t ldu) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) mix_micro<6>(Pm + r * rs, rs, cs, C, ldc, clen, D, U + r * ldu, ldu);
  const float* P = Pm + r * rs;
  float* Ur = U + r * ldu;
  switch (rows - r) {
    case 5: mix_micro<5>(P, rs, cs, C, ldc, clen, D, Ur, ldu); break;
    case 4: mix_micro<4>(P, rs, cs, C, ldc, clen, D, Ur, ldu); break;
    case 3: mix_micro<3>(P, rs, cs, C, ldc, clen, D, Ur, ldu); break;
    case 2: mix_micro<2>(P, rs, cs, C, ldc, clen, D, Ur, ldu); break;
    case 1: mix_micro<1>(P, rs, cs, C, ldc, clen, D, Ur, ldu); break;
    default: break;
  }
}
}  // namespace

RCAR_CLONES void mix_rows(const float* Pm, int64_t ldp, int64_t rows, const float* C, int64_t ldc, int64_t clen,
                          int64_t D, float* U, int64_t ldu) {
  mix_any(Pm, ldp, 1, rows, C, ldc, clen, D, U, ldu);
}

RCAR_CLONES void mix_rows_t(const float* Pt, int64_t ldp, int64_t rows, const float* C, int64_t ldc, int64_t clen,
                            int64_t D, float* U, int64_t ldu) {
  mix_any(Pt, 1, ldp, rows, C, ldc, clen, D, U, ldu);
}

}  // namespace rcar_fast::cpu
