// Row-major GEMM wrappers of common.h.
//
// The Fortran BLAS routines sgemm_/dgemm_ that libtorch_cpu exports (MKL in the standard
// wheels) are called directly: at::mm costs a dispatch and two tensor wrappers per call, and
// the kernels make thousands of small (M in the hundreds) calls. Integer arguments are passed
// as pointers to int64 holding values below 2^31, which both the LP64 (32-bit int) and the
// ILP64 interfaces read correctly on little-endian machines. The routines are looked up once
// and checked on a small product; if that fails, at::mm_out does the work instead.
#include "cpu/common.h"

#include <ATen/native/CPUBlas.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <dlfcn.h>
#include <limits>
#include <mutex>
#include <string>
#ifdef RCAR_FAST_PROFILE
#include <cstdio>
#include <string>
#include <time.h>
#endif

namespace rcar_fast::cpu {
namespace {

template <class T>
using fortran_gemm = void (*)(const char*, const char*, const void*, const void*, const void*, const T*,
                              const T*, const void*, const T*, const void*, const T*, T*, const void*);

void* find_symbol(const char* name) {
  void* f = dlsym(RTLD_DEFAULT, name);
  if (!f) {
    // libtorch_cpu is already loaded (this extension links it): find it without loading anew
    if (void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) f = dlsym(h, name);
  }
  return f;
}

template <class T>
void gemm_aten(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
              : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  auto b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
              : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  auto prod = at::mm(a, b);
  if (beta == T(0)) c.copy_(prod.mul_(alpha));
  else c.mul_(beta).add_(prod, alpha);
}

template <class T>
void gemm_blas(fortran_gemm<T> f, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
               int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  // column-major view: C^T (N x M) = op(B)^T op(A)^T
  const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
  const int64_t m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
  f(&opb, &opa, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

template <class T>
fortran_gemm<T> resolve(const char* name) {
  auto f = reinterpret_cast<fortran_gemm<T>>(find_symbol(name));
  if (!f) return nullptr;
  // check: (2 x 3) = (2 x 2) (2 x 3) with padded strides and both transposes
  const T A[2][3] = {{1, 2, 0}, {3, 4, 0}};          // A (2 x 2), lda 3
  const T Bt[3][3] = {{5, 8, 0}, {6, 9, 0}, {7, 10, 0}};  // B^T (3 x 2), ldb 3
  T C[2][4] = {{1, 1, 1, 1}, {1, 1, 1, 1}};
  gemm_blas<T>(f, false, true, 2, 3, 2, T(1), &A[0][0], 3, &Bt[0][0], 3, T(1), &C[0][0], 4);
  const T want[2][3] = {{22, 25, 28}, {48, 55, 62}};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      if (C[i][j] != want[i][j]) return nullptr;
  if (C[0][3] != T(1) || C[1][3] != T(1)) return nullptr;
  return f;
}

template <class T>
fortran_gemm<T> blas_routine() {
  static const fortran_gemm<T> f = resolve<T>(std::is_same_v<T, float> ? "sgemm_" : "dgemm_");
  return f;
}

template <class T>
void gemm_impl(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  // BLAS wants leading dimensions >= the stored rows' length
  lda = std::max<int64_t>(lda, ta ? M : K);
  ldb = std::max<int64_t>(ldb, tb ? K : N);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  auto f = blas_routine<T>();
  if (f && M < kMax && N < kMax && K < kMax && lda < kMax && ldb < kMax && ldc < kMax)
    gemm_blas<T>(f, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    gemm_aten<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_impl<float>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_impl<double>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm_kn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
             bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  // blocks of 64 rows (plus the tail): the kernels are JIT compiled once per shape and thread,
  // so the shapes are kept few
  constexpr int64_t kMb = 64;
  const int64_t nb = packed_block(N);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t w = std::min(nb, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kMb)
      at::native::cpublas::brgemm(std::min(kMb, M - m0), w, K, lda, w, ldc, accumulate, A + m0 * lda, Bp + n0 * K,
                                  C + m0 * ldc + n0, false);
  }
}

void gemm_kn(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* Bp, double* C,
             int64_t ldc, bool accumulate) {
  const int64_t nb = packed_block(N);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t w = std::min(nb, N - n0);
    gemm(false, false, M, w, K, 1.0, A, lda, Bp + n0 * K, w, accumulate ? 1.0 : 0.0, C + n0, ldc);
  }
}

at::Tensor pack_kn(const at::Tensor& B) {
  TORCH_CHECK(B.dim() == 2, "pack_kn: expected a matrix, got shape ", B.sizes());
  const int64_t N = B.size(1), nb = packed_block(N);
  if (nb >= N) return B.contiguous().view({-1});
  std::vector<at::Tensor> blocks;
  for (int64_t n0 = 0; n0 < N; n0 += nb) blocks.push_back(B.narrow(1, n0, std::min(nb, N - n0)).reshape({-1}));
  return at::cat(blocks, 0);
}

namespace {

struct PackEntry {
  std::string kind;
  std::vector<at::Tensor> snaps;  // copies of the sources' bytes when packed
  at::Tensor packed;
  uint64_t used = 0;
};

struct PackCache {
  std::mutex mu;
  std::vector<PackEntry> entries;
  uint64_t clock = 0;
  static constexpr size_t kEntries = 24;
};

PackCache& pack_cache() {
  static PackCache* c = new PackCache();  // never destroyed: no teardown order issues at exit
  return *c;
}

bool same_bytes(const at::Tensor& snap, const at::Tensor& src) {
  return snap.scalar_type() == src.scalar_type() && snap.sizes() == src.sizes() &&
         std::memcmp(snap.data_ptr(), src.data_ptr(), src.nbytes()) == 0;
}

}  // namespace

at::Tensor cached_pack(const char* kind, std::initializer_list<at::Tensor> srcs,
                       const std::function<at::Tensor()>& make) {
  bool cacheable = true;
  for (const auto& t : srcs) cacheable = cacheable && t.is_contiguous() && t.device().is_cpu();
  if (!cacheable) return make();
  auto& cache = pack_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  for (auto& e : cache.entries) {
    if (e.kind != kind || e.snaps.size() != srcs.size()) continue;
    bool hit = true;
    size_t i = 0;
    for (const auto& t : srcs) hit = hit && same_bytes(e.snaps[i++], t);
    if (hit) {
      e.used = ++cache.clock;
      return e.packed;
    }
  }
  PackEntry e;
  e.kind = kind;
  for (const auto& t : srcs) e.snaps.push_back(t.clone());
  e.packed = make();
  e.used = ++cache.clock;
  if (cache.entries.size() >= PackCache::kEntries) {
    auto lru = std::min_element(cache.entries.begin(), cache.entries.end(),
                                [](const PackEntry& a, const PackEntry& b) { return a.used < b.used; });
    *lru = std::move(e);
    return lru->packed;
  }
  cache.entries.push_back(std::move(e));
  return cache.entries.back().packed;
}

#ifdef RCAR_FAST_PROFILE
namespace {
struct ProfTable {
  std::mutex mu;
  std::vector<std::pair<std::string, double>> rows;
  ~ProfTable() {
    double total = 0;
    for (auto& r : rows) total += r.second;
    for (auto& r : rows) std::fprintf(stderr, "rcar_fast profile %-24s %8.3f s %5.1f%%\n", r.first.c_str(), r.second, 100 * r.second / total);
  }
} g_prof;
}  // namespace
void prof_add(const char* section, double seconds) {
  std::lock_guard<std::mutex> lock(g_prof.mu);
  for (auto& r : g_prof.rows)
    if (r.first == section) {
      r.second += seconds;
      return;
    }
  g_prof.rows.emplace_back(section, seconds);
}
double prof_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
#endif

bool blas_direct() { return blas_routine<float>() != nullptr && blas_routine<double>() != nullptr; }

}  // namespace rcar_fast::cpu
