// Shared pieces of the CPU kernels (csrc/cpu/*.cpp): BLAS calls, vectorised element-wise
// loops, a dynamic tile scheduler on top of at::parallel_for, and small helpers.
//
// GEMMs: row-major wrappers over the Fortran BLAS sgemm_/dgemm_ that libtorch_cpu carries
// (MKL in the standard builds), found once with dlsym and checked on a small product; when
// they are missing or wrong, the same wrappers go through at::mm_out. Called inside
// at::parallel_for, each GEMM runs on the calling thread (MKL does not nest its threads).
//
// Element-wise loops over fp32 have AVX2/AVX-512 clones picked at load time (target_clones,
// see vec.cpp); fp64 uses the plain loops and libm (fp64 is the exact, testing dtype).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace rcar_fast::cpu {

// ------------------------------------------------------------------------------------ GEMM
// Row-major C (M x N) = alpha * op(A) op(B) + beta * C; op(A) is M x K (A stored K x M when
// ta), op(B) is K x N (B stored N x K when tb); lda/ldb/ldc are row strides in elements.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc);
// whether the GEMMs call the BLAS directly (true) or fall back to at::mm
bool blas_direct();
// Row-major C (M x N) = A (M x K) B (K x N) (+ C when accumulate), B a weight packed by
// pack_kn. fp32 goes through at::native::cpublas::brgemm: oneDNN's JIT micro-kernels
// (AVX-512/AVX2), measured 105-117 GFLOP/s on one core of the dev box for the shapes here
// against 80-100 for MKL's sgemm; it falls back to the BLAS where oneDNN's ukernels are not
// built in. fp64 calls the BLAS.
void gemm_kn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
             bool accumulate);
void gemm_kn(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* Bp, double* C,
             int64_t ldc, bool accumulate);
// Row offsets of pairs [n0, n1) (pair n = b P + p, p = n % P) in a tile's compact row space,
// where pair n has ql[p] valid query rows: ro[n - n0] = first row, ro[n1 - n0] = the total,
// which is returned. In: any input struct with ql (int32 per query item) and P.
template <class In>
int64_t compact_rows(const In& a, int64_t n0, int64_t n1, std::vector<int64_t>& ro) {
  ro.resize(n1 - n0 + 1);
  int64_t rows = 0;
  for (int64_t n = n0; n < n1; ++n) {
    ro[n - n0] = rows;
    rows += a.ql[n % a.P];
  }
  ro[n1 - n0] = rows;
  return rows;
}

// Columns per block of a packed weight: wide weights are cut into blocks of 128 columns, each
// stored K x width contiguously (rows 4 KB apart, as in a plain 1024-wide weight, alias in L1
// and cost the kernels 20%); up to 640 columns the packed weight is the plain row-major one.
inline int64_t packed_block(int64_t N) { return N <= 640 ? N : 128; }
// B (K x N, any strides) packed for gemm_kn: a contiguous tensor of K * N elements.
at::Tensor pack_kn(const at::Tensor& B);
// make() (a packed form of the weights srcs), reused from an earlier call while every src is
// contiguous and holds the same bytes as then (compared in full: a changed weight is never
// missed, whatever way it was changed). kind names what make() builds. Packing a 1024 x 512
// weight costs ~1 ms of one thread per call; the comparison ~0.05 ms. A small LRU cache.
at::Tensor cached_pack(const char* kind, std::initializer_list<at::Tensor> srcs,
                       const std::function<at::Tensor()>& make);

// --------------------------------------------------------------------- element-wise loops
// fp32 versions live in vec.cpp (CPU-dispatched clones); fp64 versions are the templates.
namespace vm {

#define RCAR_INLINE __attribute__((always_inline)) inline

template <class T>
RCAR_INLINE T bitcast_i2f(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// exp for fp32 on [-87, 88]: Cody-Waite range reduction and Cephes' degree-6 polynomial, ~1 ulp;
// branch-free so that the loops around it vectorise.
RCAR_INLINE float exp_core_f32(float x) {
  const float big = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + big) - big;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  float y = p * (r * r) + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return y * bitcast_i2f<float>(e);
}

// exp for fp32, inputs clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands in for smaller values)
RCAR_INLINE float exp_f32(float x) { return exp_core_f32(std::min(std::max(x, -87.0f), 88.0f)); }

// tanh for fp32 as (1 - e) / (1 + e), e = exp(-2|x|), the sign restored: absolute error
// ~1e-7 everywhere (like torch's fp32 2 sigmoid(2x) - 1), about 20 operations, branch-free.
RCAR_INLINE float tanh_f32(float x) {
  const float e = exp_core_f32(-2.0f * std::min(std::fabs(x), 9.0f));
  return std::copysign((1.0f - e) / (1.0f + e), x);
}

template <class T>
RCAR_INLINE T vexp(T x) {
  if constexpr (std::is_same_v<T, float>) return exp_f32(x);
  else return std::exp(x);
}

template <class T>
RCAR_INLINE T vtanh(T x) {
  if constexpr (std::is_same_v<T, float>) return tanh_f32(x);
  else return std::tanh(x);
}

template <class T>
RCAR_INLINE T sumsq(const T* x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

template <class T>
RCAR_INLINE T dot(const T* x, const T* y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// x = tanh(x + b) (b may be null)
template <class T>
RCAR_INLINE void tanh_bias(T* x, const T* b, int64_t n) {
  if (b) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = vtanh<T>(x[i] + b[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = vtanh<T>(x[i]);
  }
}

// dst = (q - s * u)^2; dst may be u
template <class T>
RCAR_INLINE void sqdiff(T* dst, const T* q, const T* u, T s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T v = q[i] - s * u[i];
    dst[i] = v * v;
  }
}

// dst = s * x; dst may be x
template <class T>
RCAR_INLINE void scale(T* dst, const T* x, T s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = s * x[i];
}

// dst = a * b
template <class T>
RCAR_INLINE void mul(T* dst, const T* a, const T* b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = a[i] * b[i];
}

// y += a * x
template <class T>
RCAR_INLINE void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// m = clamp(tanh(m + b) + f, -1, 1), f null meaning all ones (RCR's factor update); a NaN stays
// NaN, as in torch's clamp: std::max(x, -1) and std::min(x, 1) return x when x is NaN (x first)
template <class T>
RCAR_INLINE void rcr_tail(T* m, const T* b, const T* f, int64_t n) {
  if (f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) m[i] = std::min(std::max(vtanh<T>(m[i] + b[i]) + f[i], T(-1)), T(1));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) m[i] = std::min(std::max(vtanh<T>(m[i] + b[i]) + T(1), T(-1)), T(1));
  }
}

// One row of rcr_factors_bwd over m = (hidden W2^T)'s row, in place: t = tanh(m + b), z = t + f
// (1 where f is null), gz = g where |z| <= 1 (0 for a NaN z), m <- gz (1 - t^2), df <- gz (df
// may be null)
template <class T>
RCAR_INLINE void rcr_bwd_row(T* m, const T* b, const T* f, const T* g, T* df, int64_t n) {
  if (df) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T t = vtanh<T>(m[i] + b[i]);
      const T z = t + (f ? f[i] : T(1));
      const T gz = std::abs(z) <= T(1) ? g[i] : T(0);
      m[i] = gz * (T(1) - t * t);
      df[i] = gz;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T t = vtanh<T>(m[i] + b[i]);
      const T z = t + (f ? f[i] : T(1));
      m[i] = std::abs(z) <= T(1) ? g[i] * (T(1) - t * t) : T(0);
    }
  }
}

// sum_i tanh(k[i] + b[i]) * w[i] * keep[i] (keep may be null): one RAR logit
template <class T>
RCAR_INLINE T tanh_dot(const T* k, const T* b, const T* w, const T* keep, int64_t n) {
  T s = 0;
  if (keep) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += vtanh<T>(k[i] + b[i]) * w[i] * keep[i];
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += vtanh<T>(k[i] + b[i]) * w[i];
  }
  return s;
}

// x = exp(x - m); returns the sum
template <class T>
RCAR_INLINE T exp_shift_sum(T* x, T m, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    T e = vexp<T>(x[i] - m);
    x[i] = e;
    s += e;
  }
  return s;
}

// The attention's probabilities for one group of pairs, in place in the transposed scores
// St (clen x rows_g, row stride ld; pair k holds columns [off[k], off[k + 1])): LeakyReLU,
// normalised by each column's norm over the pair's queries, times the row's temperature lam
// (lam null: lam_s), softmax over c. m and s: scratch of rows_g each. Loops run over rows.
template <class T>
RCAR_INLINE void probs_cmajor(T* St, int64_t ld, int64_t clen, const int64_t* off, int64_t npairs,
                              const T* lam, T lam_s, T* m, T* s) {
  const int64_t rg = off[npairs] - off[0];
  for (int64_t c = 0; c < clen; ++c) {
    T* row = St + c * ld;
#pragma omp simd
    for (int64_t r = 0; r < rg; ++r) row[r] = row[r] > T(0) ? row[r] : T(0.1) * row[r];
    for (int64_t k = 0; k < npairs; ++k) {
      T* seg = row + (off[k] - off[0]);
      const int64_t nq = off[k + 1] - off[k];
      T s2 = 0;
#pragma omp simd reduction(+ : s2)
      for (int64_t r = 0; r < nq; ++r) s2 += seg[r] * seg[r];
      const T inv = T(1) / (std::sqrt(s2) + T(1e-8));
      if (lam) {
        const T* l = lam + (off[k] - off[0]);
#pragma omp simd
        for (int64_t r = 0; r < nq; ++r) seg[r] = l[r] * (seg[r] * inv);
      } else {
#pragma omp simd
        for (int64_t r = 0; r < nq; ++r) seg[r] = lam_s * (seg[r] * inv);
      }
    }
  }
  for (int64_t r = 0; r < rg; ++r) m[r] = St[r];
  for (int64_t c = 1; c < clen; ++c) {
    const T* row = St + c * ld;
#pragma omp simd
    for (int64_t r = 0; r < rg; ++r) m[r] = std::max(m[r], row[r]);
  }
  for (int64_t r = 0; r < rg; ++r) s[r] = 0;
  for (int64_t c = 0; c < clen; ++c) {
    T* row = St + c * ld;
#pragma omp simd
    for (int64_t r = 0; r < rg; ++r) {
      const T e = vexp<T>(row[r] - m[r]);
      row[r] = e;
      s[r] += e;
    }
  }
#pragma omp simd
  for (int64_t r = 0; r < rg; ++r) s[r] = T(1) / s[r];
  for (int64_t c = 0; c < clen; ++c) {
    T* row = St + c * ld;
#pragma omp simd
    for (int64_t r = 0; r < rg; ++r) row[r] *= s[r];
  }
}

}  // namespace vm

// fp32 entry points (vec.cpp, CPU-dispatched) and fp64 ones (the templates above)
float sumsq(const float* x, int64_t n);
float dot(const float* x, const float* y, int64_t n);
void tanh_bias(float* x, const float* b, int64_t n);
void sqdiff(float* dst, const float* q, const float* u, float s, int64_t n);
void scale(float* dst, const float* x, float s, int64_t n);
void mul(float* dst, const float* a, const float* b, int64_t n);
void axpy(float* y, float a, const float* x, int64_t n);
void rcr_tail(float* m, const float* b, const float* f, int64_t n);
void rcr_bwd_row(float* m, const float* b, const float* f, const float* g, float* df, int64_t n);
float tanh_dot(const float* k, const float* b, const float* w, const float* keep, int64_t n);
float exp_shift_sum(float* x, float m, int64_t n);
// St[c * ldst + r] = X[r] . C[c] (r < rows, c < clen, rows of length D); U[r] = sum_c Pm[r, c] C[c].
// Row strides that are multiples of 4 KB make these 20-50% slower (L1 set conflicts): callers
// hand them rows at a padded stride (padded_ld) where they can.
void scores_t(const float* X, int64_t ldx, int64_t rows, const float* C, int64_t ldc, int64_t clen, int64_t D,
              float* St, int64_t ldst);
void mix_rows(const float* Pm, int64_t ldp, int64_t rows, const float* C, int64_t ldc, int64_t clen, int64_t D,
              float* U, int64_t ldu);
void probs_cmajor(float* St, int64_t ld, int64_t clen, const int64_t* off, int64_t npairs, const float* lam,
                  float lam_s, float* m, float* s);
inline void probs_cmajor(double* St, int64_t ld, int64_t clen, const int64_t* off, int64_t npairs,
                         const double* lam, double lam_s, double* m, double* s) {
  vm::probs_cmajor(St, ld, clen, off, npairs, lam, lam_s, m, s);
}
// U[r] = sum_c Pt[c * ldp + r] C[c]: the probabilities transposed, as probs_cmajor leaves them
void mix_rows_t(const float* Pt, int64_t ldp, int64_t rows, const float* C, int64_t ldc, int64_t clen, int64_t D,
                float* U, int64_t ldu);
inline void mix_rows_t(const double* Pt, int64_t ldp, int64_t rows, const double* C, int64_t ldc, int64_t clen,
                       int64_t D, double* U, int64_t ldu) {
  gemm(true, false, rows, D, clen, 1.0, Pt, ldp, C, ldc, 0.0, U, ldu);
}
inline void scores_t(const double* X, int64_t ldx, int64_t rows, const double* C, int64_t ldc, int64_t clen,
                     int64_t D, double* St, int64_t ldst) {
  gemm(false, true, clen, rows, D, 1.0, C, ldc, X, ldx, 0.0, St, ldst);
}
inline void mix_rows(const double* Pm, int64_t ldp, int64_t rows, const double* C, int64_t ldc, int64_t clen,
                     int64_t D, double* U, int64_t ldu) {
  gemm(false, false, rows, D, clen, 1.0, Pm, ldp, C, ldc, 0.0, U, ldu);
}
// Padded row stride of the kernels' d-wide buffers: d plus 64 bytes, off the 4 KB multiples
template <class T>
inline int64_t padded_ld(int64_t D) {
  return D + 64 / static_cast<int64_t>(sizeof(T));
}

inline double sumsq(const double* x, int64_t n) { return vm::sumsq(x, n); }
inline double dot(const double* x, const double* y, int64_t n) { return vm::dot(x, y, n); }
inline void tanh_bias(double* x, const double* b, int64_t n) { vm::tanh_bias(x, b, n); }
inline void sqdiff(double* d, const double* q, const double* u, double s, int64_t n) { vm::sqdiff(d, q, u, s, n); }
inline void scale(double* d, const double* x, double s, int64_t n) { vm::scale(d, x, s, n); }
inline void mul(double* d, const double* a, const double* b, int64_t n) { vm::mul(d, a, b, n); }
inline void axpy(double* y, double a, const double* x, int64_t n) { vm::axpy(y, a, x, n); }
inline void rcr_tail(double* m, const double* b, const double* f, int64_t n) { vm::rcr_tail(m, b, f, n); }
inline void rcr_bwd_row(double* m, const double* b, const double* f, const double* g, double* df, int64_t n) {
  vm::rcr_bwd_row(m, b, f, g, df, n);
}
inline double tanh_dot(const double* k, const double* b, const double* w, const double* keep, int64_t n) {
  return vm::tanh_dot(k, b, w, keep, n);
}
inline double exp_shift_sum(double* x, double m, int64_t n) { return vm::exp_shift_sum(x, m, n); }

template <class T>
inline T tanh_scalar(T x) {
  return vm::vtanh<T>(x);
}

// ---------------------------------------------------------------------------- profiling
// Built with -DRCAR_FAST_PROFILE (e.g. CFLAGS=-DRCAR_FAST_PROFILE at build time), the kernels
// add up thread CPU time per named section and print the totals at exit; otherwise no-ops.
#ifdef RCAR_FAST_PROFILE
void prof_add(const char* section, double seconds);
double prof_now();
#define RCAR_PROF_START double rcar_prof_t = ::rcar_fast::cpu::prof_now();
#define RCAR_PROF(name)                                            \
  {                                                                \
    const double rcar_prof_n = ::rcar_fast::cpu::prof_now();       \
    ::rcar_fast::cpu::prof_add(name, rcar_prof_n - rcar_prof_t);   \
    rcar_prof_t = rcar_prof_n;                                     \
  }
#else
#define RCAR_PROF_START
#define RCAR_PROF(name)
#endif

// --------------------------------------------------------------------------- scheduling
// Runs body(tile, worker_state) for every tile in [0, ntiles): one worker per thread of
// at::parallel_for, tiles handed out dynamically (an atomic counter), so that a thread slowed
// by another process does not hold the others back. make_state() builds a worker's buffers
// once. Serial (inline) when at::parallel_for is (nested call, one thread, one tile).
template <class MakeState, class Body>
void run_tiles(int64_t ntiles, MakeState make_state, Body body) {
  if (ntiles <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ntiles);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      auto state = make_state();
      for (int64_t t = next.fetch_add(1); t < ntiles; t = next.fetch_add(1)) body(t, state);
    }
  });
}

// A worker's scratch: one allocation cut into named pieces, 64-byte aligned, not initialised
// (a worker is built per op call and thread; zeroing ~1 MB each time showed in profiles).
template <class T>
struct Scratch {
  std::unique_ptr<T[]> mem;
  std::vector<size_t> offs;
  explicit Scratch(std::initializer_list<int64_t> sizes) {
    size_t total = 0;
    for (int64_t s : sizes) {
      offs.push_back(total);
      total += (static_cast<size_t>(std::max<int64_t>(s, 1)) + 15) / 16 * 16;
    }
    mem.reset(new T[total + 16]);
  }
  T* operator[](size_t i) {
    auto base = reinterpret_cast<uintptr_t>(mem.get());
    size_t skew = ((64 - base % 64) % 64) / sizeof(T);
    return mem.get() + skew + offs[i];
  }
};

// Rows per tile: the tile's d-wide rows stay in the core's L2 (one core's CPU time on the
// 100 x 100 shard, d = 1024, dev box: 96 / 128 / 192 / 256 rows within 5%, 128 best).
constexpr int64_t kTileRows = 128;

// Tiles of consecutive pairs n (n = b * P + p) holding at most max_rows valid rows each (a
// pair with more rows gets a tile of its own); break_on_b: a tile never spans two b.
// Returns the tile starts followed by the end (B * P).
inline std::vector<int64_t> pair_tiles(int64_t B, int64_t P, const int32_t* qlens, int64_t max_rows,
                                       bool break_on_b) {
  std::vector<int64_t> starts;
  int64_t rows = 0;
  for (int64_t n = 0; n < B * P; ++n) {
    const int64_t p = n % P;
    const int64_t r = qlens[p];
    if (starts.empty() || (rows > 0 && rows + r > max_rows) || (break_on_b && p == 0)) {
      starts.push_back(n);
      rows = 0;
    }
    rows += r;
  }
  starts.push_back(B * P);
  return starts;
}

// Lengths as a host vector, each checked to lie in [1, max_len].
inline std::vector<int32_t> read_lengths(const at::Tensor& lens, const char* name, int64_t max_len,
                                         const char* what) {
  auto l = lens.contiguous();
  const int32_t* p = l.data_ptr<int32_t>();
  std::vector<int32_t> out(p, p + l.numel());
  for (size_t i = 0; i < out.size(); ++i)
    TORCH_CHECK(out[i] >= 1 && out[i] <= max_len, name, ": expected lengths in [1, ", max_len, "] (", what,
                "), got ", out[i], " at index ", i);
  return out;
}

}  // namespace rcar_fast::cpu
