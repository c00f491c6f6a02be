// rcar_fast::rcr on CPU (inference only; the contract: csrc/README.md), and rcr_factors_bwd (below).
//
// One RCR step, row-wise: tiles of at most kTileRows valid rows (consecutive pairs), threads
// take tiles dynamically. Per tile: H = tanh(E [W1; Ws1]^T + [b1; bs1]) is one GEMM (both
// first layers share E), M = H1 W2^T one more, written straight into the new factors when the
// tile has no padding; then one pass per row in cache: F <- clamp(tanh(M + b2) + F, -1, 1) and
// lam <- relu(ws2 . H2 + bs2 + lam). Padded rows are never read and are written as zeros.
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/common.h"

namespace rcar_fast::cpu {
namespace {

template <class T>
struct RcrInputs {
  const T* E;    // (B, P, Lq, S)
  const T* f;    // (B, P, Lq, D) or null (ones)
  const T* lam;  // (B, P, Lq) or null (lam_s)
  T lam_s;
  const T* w1t;  // [w1; ws1]^T (S, H1 + H2), packed (pack_kn)
  const T* b1c;  // [b1; bs1] (H1 + H2)
  const T* w2t;  // w2^T (H1, D), packed
  const T* b2;   // (D)
  const T* ws2;  // (H2)
  T bs2;
  const int32_t* ql;
  int64_t B, P, Lq, S, D, H1, H2;
  int64_t rows_max;
};

template <class T>
struct RcrState {
  // the scratch buffers, in the order of the sizes below: Ec, H (both hidden layers), M
  enum Slot : size_t { kE, kHidden, kMlpOut };
  Scratch<T> buf;
  std::vector<int64_t> ro;
  explicit RcrState(const RcrInputs<T>& a)
      : buf({a.rows_max * a.S, a.rows_max * (a.H1 + a.H2), a.rows_max * a.D}) {}  // Ec H M
};

template <class T>
void rcr_tile(const RcrInputs<T>& a, int64_t n0, int64_t n1, RcrState<T>& st, T* fout, T* lout) {
  const int64_t S = a.S, D = a.D, Lq = a.Lq, P = a.P, HH = a.H1 + a.H2, np = n1 - n0;
  T* Ec = st.buf[RcrState<T>::kE];
  T* H = st.buf[RcrState<T>::kHidden];
  T* Mb = st.buf[RcrState<T>::kMlpOut];
  auto& ro = st.ro;
  ro.resize(np + 1);
  int64_t rows = 0;
  for (int64_t k = 0; k < np; ++k) {
    ro[k] = rows;
    rows += a.ql[(n0 + k) % P];
  }
  ro[np] = rows;
  RCAR_PROF_START
  const bool dense = rows == np * Lq;
  const T* Ep = a.E + n0 * Lq * S;
  if (!dense) {
    for (int64_t k = 0; k < np; ++k)
      std::memcpy(Ec + ro[k] * S, a.E + (n0 + k) * Lq * S, sizeof(T) * (ro[k + 1] - ro[k]) * S);
    Ep = Ec;
  }
  gemm_kn(rows, HH, S, Ep, S, a.w1t, H, HH, false);
  RCAR_PROF("rcr gemm1")
  for (int64_t r = 0; r < rows; ++r) tanh_bias(H + r * HH, a.b1c, HH);
  RCAR_PROF("rcr tanh1")
  T* M = dense ? fout + n0 * Lq * D : Mb;
  gemm_kn(rows, D, a.H1, H, HH, a.w2t, M, D, false);
  RCAR_PROF("rcr gemm2")
  for (int64_t k = 0; k < np; ++k) {
    const int64_t n = n0 + k, nq = ro[k + 1] - ro[k];
    for (int64_t qi = 0; qi < nq; ++qi) {
      const int64_t r = ro[k] + qi, row = n * Lq + qi;
      T* m = M + r * D;
      rcr_tail(m, a.b2, a.f ? a.f + row * D : nullptr, D);
      if (!dense) std::memcpy(fout + row * D, m, sizeof(T) * D);
      const T l = dot(H + r * HH + a.H1, a.ws2, a.H2) + a.bs2 + (a.lam ? a.lam[row] : a.lam_s);
      lout[row] = l < T(0) ? T(0) : l;   // relu that keeps a NaN, as torch's
    }
    if (nq < Lq) {
      std::memset(fout + (n * Lq + nq) * D, 0, sizeof(T) * (Lq - nq) * D);
      std::memset(lout + n * Lq + nq, 0, sizeof(T) * (Lq - nq));
    }
  }
  RCAR_PROF("rcr tail")
}

at::Tensor as_compute(const at::Tensor& t, at::ScalarType st) { return t.to(st).contiguous(); }

std::tuple<at::Tensor, at::Tensor> rcr_cpu(const at::Tensor& E, const at::Tensor& qlens,
                                           const c10::optional<at::Tensor>& factors,
                                           const c10::optional<at::Tensor>& lam, double lam_scalar,
                                           const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                           const at::Tensor& b2, const at::Tensor& ws1, const at::Tensor& bs1,
                                           const at::Tensor& ws2, const at::Tensor& bs2) {
  check_rcr(E, qlens, factors, lam, w1, b1, w2, b2, ws1, bs1, ws2, bs2);
  TORCH_CHECK(E.device().is_cpu(), "E: the CPU kernels take CPU tensors, got ", E.device());
  const auto ct = E.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto cv = [&](const at::Tensor& t) { return as_compute(t, ct); };
  at::Tensor Ec = cv(E), f, l;
  if (factors) f = cv(*factors);
  if (lam) l = cv(*lam);
  const at::Tensor w1c = cv(w1), ws1c = cv(ws1), w2c = cv(w2);
  at::Tensor w1t = cached_pack("rcr [W1; Ws1]^T", {w1c, ws1c}, [&] { return pack_kn(at::cat({w1c, ws1c}, 0).t()); });
  at::Tensor b1c = at::cat({cv(b1), cv(bs1)}, 0).contiguous();
  at::Tensor w2t = cached_pack("rcr W2^T", {w2c}, [&] { return pack_kn(w2c.t()); }), b2c = cv(b2), ws2c = cv(ws2), bs2c = cv(bs2);
  const std::vector<int32_t> ql = read_lengths(qlens, "qlens", E.size(2), "1 <= qlens[p] <= Lq");
  const int64_t B = E.size(0), P = E.size(1), Lq = E.size(2), D = w2.size(0);
  at::Tensor fout = at::empty({B, P, Lq, D}, Ec.options());
  at::Tensor lout = at::empty({B, P, Lq}, Ec.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    RcrInputs<T> a;
    a.E = Ec.data_ptr<T>();
    a.f = f.defined() ? f.data_ptr<T>() : nullptr;
    a.lam = l.defined() ? l.data_ptr<T>() : nullptr;
    a.lam_s = static_cast<T>(lam_scalar);
    a.w1t = w1t.data_ptr<T>();
    a.b1c = b1c.data_ptr<T>();
    a.w2t = w2t.data_ptr<T>();
    a.b2 = b2c.data_ptr<T>();
    a.ws2 = ws2c.data_ptr<T>();
    a.bs2 = bs2c.data_ptr<T>()[0];
    a.ql = ql.data();
    a.B = B;
    a.P = P;
    a.Lq = Lq;
    a.S = E.size(3);
    a.D = D;
    a.H1 = w1.size(0);
    a.H2 = ws1.size(0);
    a.rows_max = std::max<int64_t>(kTileRows, Lq);
    if (B * P == 0) return;
    const auto tiles = pair_tiles(B, P, a.ql, a.rows_max, false);
    T* fo = fout.data_ptr<T>();
    T* lo = lout.data_ptr<T>();
    run_tiles(
        static_cast<int64_t>(tiles.size()) - 1, [&] { return RcrState<T>(a); },
        [&](int64_t t, RcrState<T>& st) { rcr_tile(a, tiles[t], tiles[t + 1], st, fo, lo); });
  };
  if (ct == at::kDouble) run(double{});
  else run(float{});
  if (fout.scalar_type() != E.scalar_type()) {
    fout = fout.to(E.scalar_type());
    lout = lout.to(E.scalar_type());
  }
  return {fout, lout};
}


// rcr_factors_bwd: the d-wide chain of RCR's recomputed backward, in float (double for double) from
// one GEMM M = hidden W2^T, then per row in cache (rcr_bwd_row, vectorised): t = tanh(M + b2),
// z = t + F_old (1 without factors), gz = grad where |z| <= 1 (torch's clamp gradient; 0 for a NaN
// z), gm = gz (1 - t^2) in M's place, dF = gz; rounded once to hidden's dtype. Every row.
at::Tensor rcr_factors_bwd_cpu(const at::Tensor& hidden, const at::Tensor& w2, const at::Tensor& b2,
                               const c10::optional<at::Tensor>& factors, const at::Tensor& grad,
                               const c10::optional<at::Tensor>& dfactors) {
  check_rcr_factors_bwd(hidden, w2, b2, factors, grad, dfactors);
  TORCH_CHECK(hidden.device().is_cpu(), "hidden: the CPU kernels take CPU tensors, got ", hidden.device());
  const auto ct = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = hidden.size(0), D = w2.size(0);
  at::Tensor m = at::mm(as_compute(hidden, ct), as_compute(w2, ct).t()).contiguous();   // becomes gm
  at::Tensor b2c = as_compute(b2, ct), g = as_compute(grad, ct), f = factors ? as_compute(*factors, ct) : at::Tensor();
  // dF straight into dfactors where it is contiguous in the compute type, else through a buffer
  const bool direct = dfactors && dfactors->scalar_type() == ct && dfactors->is_contiguous();
  at::Tensor df = !dfactors ? at::Tensor() : (direct ? *dfactors : at::empty({N, D}, m.options()));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    T* mp = m.data_ptr<T>();
    const T* bp = b2c.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    const T* fp = f.defined() ? f.data_ptr<T>() : nullptr;
    T* dp = df.defined() ? df.data_ptr<T>() : nullptr;
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        rcr_bwd_row(mp + r * D, bp, fp ? fp + r * D : nullptr, gp + r * D, dp ? dp + r * D : nullptr, D);
    });
  };
  if (ct == at::kDouble) run(double{});
  else run(float{});
  if (dfactors && !direct) dfactors->copy_(df);
  return m.scalar_type() == hidden.scalar_type() ? m : m.to(hidden.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(rcar_fast, CPU, m) {
  m.impl("rcr", &rcr_cpu);
  m.impl("rcr_factors_bwd", &rcr_factors_bwd_cpu);
}

}  // namespace rcar_fast::cpu
