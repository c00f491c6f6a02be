// rcar_fast::rar and rcar_fast::rar_bwd on CPU (the contract: csrc/README.md).
//
// Pairs n = b * P + p are cut into tiles of consecutive pairs with at most kTileRows valid
// rows; threads take tiles dynamically. Per tile and step t, the shared-weight products are
// GEMMs over the tile: K = E Wk^T (rows x s) and Wq h (pairs x s); the tanh, the keep-masks
// and the logit sum_n tanh(K + bk)[n] g[n] wv[n] are one fused pass per row, then each pair's
// softmax over its valid rows and h = l2n(sum_q a[q] E[q]). Padded rows are never read.
// The backward (one step) recomputes the step per tile and returns the per-row and per-pair
// pieces of the contract; dE gets its dKp Wk term from one GEMM per tile, dh = dgp Wq likewise.
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/common.h"

namespace rcar_fast::cpu {
namespace {

template <class T>
struct RarInputs {
  const T* E;   // (B, P, Lq, S)
  const T* h0;  // (B, P, S) or null
  const T *wq, *bq, *wk, *bk, *wv, *bv;  // (T, S, S), (T, S), (T, S, S), (T, S), (T, S), (T)
  const T *wqt, *wkt;                    // the weights transposed and packed, T blocks of S * S
  const T *wqp, *wkp;                    // the weights packed (backward), T blocks of S * S
  const T* keep_k;  // (B, P, Lq, S) or null
  const T* keep_g;  // (B, P, S) or null
  const int32_t* ql;
  int64_t B, P, Lq, S, steps;
  int64_t rows_max;
};

template <class T>
constexpr T eps() {
  return T(1e-8);
}

template <class T>
struct RarState {
  // the scratch buffers, in the order of the sizes below: Ec K dK dE, h G dG, logit/a, da, u, vsum
  enum Slot : size_t { kE, kKeys, kGradKeys, kGradE, kH, kQuery, kGradQuery, kLogits, kGradA, kU, kVSum };
  Scratch<T> buf;
  std::vector<int64_t> ro;
  explicit RarState(const RarInputs<T>& a)
      : buf({a.rows_max * a.S, a.rows_max * a.S, a.rows_max * a.S, a.rows_max * a.S,  // Ec K dK dE
             a.rows_max * a.S, a.rows_max * a.S, a.rows_max * a.S,                    // h G gw
             a.rows_max, a.rows_max, a.rows_max * a.S, a.S}) {}  // logit/a, da, u, vsum
};

// The tile's valid E rows (compact, stride S): E itself when there is no padding.
template <class T>
const T* rar_e(const RarInputs<T>& a, int64_t n0, int64_t n1, const std::vector<int64_t>& ro, T* Ec) {
  const int64_t S = a.S, Lq = a.Lq;
  if (ro[n1 - n0] == (n1 - n0) * Lq) return a.E + n0 * Lq * S;
  for (int64_t n = n0; n < n1; ++n)
    std::memcpy(Ec + ro[n - n0] * S, a.E + n * Lq * S, sizeof(T) * a.ql[n % a.P] * S);
  return Ec;
}

// softmax over the pair's rows [r0, r0 + nq) of logit, in place
template <class T>
void softmax_rows(T* logit, int64_t nq) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < nq; ++i) m = std::max(m, logit[i]);
  const T s = exp_shift_sum(logit, m, nq);
  scale(logit, logit, T(1) / s, nq);
}

// Before the tiles, per chunk of pairs: the start h (h0, or the mean of the valid E rows) and
// step 0's g * wv = tanh(Wq h + bq) * keep_g * wv, one GEMM per chunk of 64 pairs (inside a
// tile, a handful of pairs would make M too small for an efficient GEMM).
template <class T>
void rar_start_chunk(const RarInputs<T>& a, int64_t n0, int64_t n1, T* H, T* GW) {
  const int64_t S = a.S, Lq = a.Lq;
  for (int64_t n = n0; n < n1; ++n) {
    T* hn = H + n * S;
    if (a.h0) {
      std::memcpy(hn, a.h0 + n * S, sizeof(T) * S);
    } else {  // the plain mean of the valid rows
      const int64_t nq = a.ql[n % a.P];
      std::fill(hn, hn + S, T(0));
      for (int64_t qi = 0; qi < nq; ++qi) axpy(hn, T(1), a.E + (n * Lq + qi) * S, S);
      scale(hn, hn, T(1) / T(nq), S);
    }
  }
  gemm_kn(n1 - n0, S, S, H + n0 * S, S, a.wqt, GW + n0 * S, S, false);
  for (int64_t n = n0; n < n1; ++n) {
    T* g = GW + n * S;
    tanh_bias(g, a.bq, S);
    if (a.keep_g) mul(g, g, a.keep_g + n * S, S);
    mul(g, g, a.wv, S);
  }
}

template <class T>
void rar_forward_tile(const RarInputs<T>& a, int64_t n0, int64_t n1, RarState<T>& st, const T* H0,
                      const T* GW0, T* out) {
  const int64_t S = a.S, Lq = a.Lq, np = n1 - n0;
  T* Ec = st.buf[RarState<T>::kE];
  T* K = st.buf[RarState<T>::kKeys];
  T* h = st.buf[RarState<T>::kH];
  T* G = st.buf[RarState<T>::kQuery];
  T* logit = st.buf[RarState<T>::kLogits];
  auto& ro = st.ro;
  const int64_t rows = compact_rows(a, n0, n1, ro);
  const T* Ep = rar_e(a, n0, n1, ro, Ec);
  RCAR_PROF_START
  std::memcpy(h, H0 + n0 * S, sizeof(T) * np * S);
  for (int64_t t = 0; t < a.steps; ++t) {
    const T* wkt = a.wkt + t * S * S;
    const T* bk = a.bk + t * S;
    const T bv = a.bv[t];
    const T* GW = GW0 + n0 * S;
    if (t > 0) {  // g * wv from this tile's h
      const T* wqt = a.wqt + t * S * S;
      const T* bq = a.bq + t * S;
      const T* wv = a.wv + t * S;
      gemm_kn(np, S, S, h, S, wqt, G, S, false);
      for (int64_t k = 0; k < np; ++k) {
        T* g = G + k * S;
        tanh_bias(g, bq, S);
        mul(g, g, wv, S);
      }
      GW = G;
    }
    RCAR_PROF("rar g")
    gemm_kn(rows, S, S, Ep, S, wkt, K, S, false);
    RCAR_PROF("rar gemm K")
    for (int64_t k = 0; k < np; ++k) {
      const int64_t n = n0 + k, nq = ro[k + 1] - ro[k];
      for (int64_t qi = 0; qi < nq; ++qi) {
        const int64_t r = ro[k] + qi;
        const T* kk = a.keep_k ? a.keep_k + (n * Lq + qi) * S : nullptr;
        logit[r] = tanh_dot(K + r * S, bk, GW + k * S, kk, S) + bv;
      }
      softmax_rows(logit + ro[k], nq);
      T* hk = h + k * S;
      std::fill(hk, hk + S, T(0));
      for (int64_t qi = 0; qi < nq; ++qi) axpy(hk, logit[ro[k] + qi], Ep + (ro[k] + qi) * S, S);
      scale(hk, hk, T(1) / (std::sqrt(sumsq(hk, S)) + eps<T>()), S);
    }
    RCAR_PROF("rar logits+h")
  }
  std::memcpy(out + n0 * S, h, sizeof(T) * np * S);
}

struct RarPrepared {
  at::ScalarType compute;
  at::Tensor E, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g, wqt, wkt, wqp, wkp;
  std::vector<int32_t> ql;
};

at::Tensor as_compute(const at::Tensor& t, at::ScalarType st) { return t.to(st).contiguous(); }

// (T, S, S) weights as T packed blocks (pack_kn) of W^T (transposed) or W, concatenated
at::Tensor pack_steps(const at::Tensor& w, bool transposed) {
  std::vector<at::Tensor> steps;
  for (int64_t t = 0; t < w.size(0); ++t) steps.push_back(pack_kn(transposed ? w[t].t() : w[t]));
  return at::cat(steps, 0);
}

RarPrepared rar_prepare(const at::Tensor& E, const at::Tensor& qlens, const c10::optional<at::Tensor>& h,
                        const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
                        const at::Tensor& wv, const at::Tensor& bv, const c10::optional<at::Tensor>& keep_k,
                        const c10::optional<at::Tensor>& keep_g) {
  check_rar(E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g);
  TORCH_CHECK(E.device().is_cpu(), "E: the CPU kernels take CPU tensors, got ", E.device());
  RarPrepared pr;
  pr.compute = E.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto cv = [&](const at::Tensor& t) { return as_compute(t, pr.compute); };
  pr.E = cv(E);
  if (h) pr.h = cv(*h);
  pr.wq = cv(wq);
  pr.wqt = cached_pack("rar Wq^T", {pr.wq}, [&] { return pack_steps(pr.wq, true); });
  pr.bq = cv(bq);
  pr.wk = cv(wk);
  pr.wkt = cached_pack("rar Wk^T", {pr.wk}, [&] { return pack_steps(pr.wk, true); });
  pr.bk = cv(bk);
  pr.wv = cv(wv);
  pr.bv = cv(bv);
  if (keep_k) {
    pr.keep_k = cv(*keep_k);
    pr.keep_g = cv(*keep_g);
  }
  pr.ql = read_lengths(qlens, "qlens", E.size(2), "1 <= qlens[p] <= Lq");
  return pr;
}

template <class T>
RarInputs<T> rar_inputs(const RarPrepared& pr) {
  RarInputs<T> a;
  a.E = pr.E.data_ptr<T>();
  a.h0 = pr.h.defined() ? pr.h.data_ptr<T>() : nullptr;
  a.wq = pr.wq.data_ptr<T>();
  a.wqt = pr.wqt.data_ptr<T>();
  a.wkt = pr.wkt.data_ptr<T>();
  a.wqp = pr.wqp.defined() ? pr.wqp.data_ptr<T>() : nullptr;
  a.wkp = pr.wkp.defined() ? pr.wkp.data_ptr<T>() : nullptr;
  a.bq = pr.bq.data_ptr<T>();
  a.wk = pr.wk.data_ptr<T>();
  a.bk = pr.bk.data_ptr<T>();
  a.wv = pr.wv.data_ptr<T>();
  a.bv = pr.bv.data_ptr<T>();
  a.keep_k = pr.keep_k.defined() ? pr.keep_k.data_ptr<T>() : nullptr;
  a.keep_g = pr.keep_g.defined() ? pr.keep_g.data_ptr<T>() : nullptr;
  a.ql = pr.ql.data();
  a.B = pr.E.size(0);
  a.P = pr.E.size(1);
  a.Lq = pr.E.size(2);
  a.S = pr.E.size(3);
  a.steps = pr.wq.size(0);
  a.rows_max = std::max<int64_t>(kTileRows, a.Lq);
  return a;
}

template <class T, class Tile>
void over_tiles(const RarInputs<T>& a, Tile tile) {
  if (a.B * a.P == 0) return;
  const auto tiles = pair_tiles(a.B, a.P, a.ql, a.rows_max, false);
  run_tiles(
      static_cast<int64_t>(tiles.size()) - 1, [&] { return RarState<T>(a); },
      [&](int64_t t, RarState<T>& st) { tile(tiles[t], tiles[t + 1], st); });
}

at::Tensor rar_cpu(const at::Tensor& E, const at::Tensor& qlens, const c10::optional<at::Tensor>& h0,
                   const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
                   const at::Tensor& wv, const at::Tensor& bv, const c10::optional<at::Tensor>& keep_k,
                   const c10::optional<at::Tensor>& keep_g) {
  RarPrepared pr = rar_prepare(E, qlens, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g);
  at::Tensor out = at::empty({E.size(0), E.size(1), E.size(3)}, pr.E.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto a = rar_inputs<T>(pr);
    T* o = out.data_ptr<T>();
    const int64_t NP = a.B * a.P;
    std::vector<T> H0(static_cast<size_t>(NP) * a.S), GW0(static_cast<size_t>(NP) * a.S);
    constexpr int64_t kChunk = 64;
    run_tiles(
        (NP + kChunk - 1) / kChunk, [] { return 0; },
        [&](int64_t c, int) { rar_start_chunk(a, c * kChunk, std::min(NP, (c + 1) * kChunk), H0.data(), GW0.data()); });
    over_tiles(a, [&](int64_t n0, int64_t n1, RarState<T>& st) {
      rar_forward_tile(a, n0, n1, st, H0.data(), GW0.data(), o);
    });
  };
  if (pr.compute == at::kDouble) run(double{});
  else run(float{});
  return out.scalar_type() == E.scalar_type() ? out : out.to(E.scalar_type());
}

// ------------------------------------------------------------------------------ backward

template <class T>
struct RarGrads {
  const T* grad;  // (B, P, S)
  const T* h;     // (B, P, S), the step's input
  T *dE, *dh, *dKp, *dgp, *dwv;
};

template <class T>
void rar_backward_tile(const RarInputs<T>& a, const RarGrads<T>& o, int64_t n0, int64_t n1, RarState<T>& st) {
  const int64_t S = a.S, Lq = a.Lq, np = n1 - n0;
  T* Ec = st.buf[RarState<T>::kE];
  T* K = st.buf[RarState<T>::kKeys];   // tanh(E Wk^T + bk), then dKp
  T* dEc = st.buf[RarState<T>::kGradE];
  T* G = st.buf[RarState<T>::kQuery];   // tanh(Wq h + bq)
  T* dG = st.buf[RarState<T>::kGradQuery];  // dgp
  T* logit = st.buf[RarState<T>::kLogits];
  T* da = st.buf[RarState<T>::kGradA];
  T* u = st.buf[RarState<T>::kU];
  T* vsum = st.buf[RarState<T>::kVSum];
  auto& ro = st.ro;
  const int64_t rows = compact_rows(a, n0, n1, ro);
  const T* Ep = rar_e(a, n0, n1, ro, Ec);
  const T bv = a.bv[0];

  gemm_kn(np, S, S, o.h + n0 * S, S, a.wqt, G, S, false);
  for (int64_t k = 0; k < np; ++k) tanh_bias(G + k * S, a.bq, S);
  gemm_kn(rows, S, S, Ep, S, a.wkt, K, S, false);
  for (int64_t r = 0; r < rows; ++r) tanh_bias(K + r * S, a.bk, S);

  for (int64_t k = 0; k < np; ++k) {
    const int64_t n = n0 + k, r0 = ro[k], nq = ro[k + 1] - ro[k];
    const T* g = G + k * S;
    const T* kg = a.keep_g ? a.keep_g + n * S : nullptr;
    // gw = g * keep_g * wv (in the dG row for now)
    T* gw = dG + k * S;
    for (int64_t j = 0; j < S; ++j) gw[j] = g[j] * (kg ? kg[j] : T(1)) * a.wv[j];
    for (int64_t qi = 0; qi < nq; ++qi) {
      const T* kr = K + (r0 + qi) * S;
      const T* kk = a.keep_k ? a.keep_k + (n * Lq + qi) * S : nullptr;
      T s = 0;
      for (int64_t j = 0; j < S; ++j) s += kr[j] * (kk ? kk[j] : T(1)) * gw[j];
      logit[r0 + qi] = s + bv;
    }
    T* at = logit + r0;
    softmax_rows(at, nq);
    std::fill(u, u + S, T(0));
    for (int64_t qi = 0; qi < nq; ++qi) axpy(u, at[qi], Ep + (r0 + qi) * S, S);
    // through h = u / (|u| + eps)
    const T* gr = o.grad + n * S;
    const T rn = std::sqrt(sumsq(u, S));
    const T re = rn + eps<T>();
    const T coef = rn > T(0) ? dot(u, gr, S) / (rn * re * re) : T(0);
    for (int64_t j = 0; j < S; ++j) u[j] = gr[j] / re - u[j] * coef;  // u becomes du
    T sada = 0;
    for (int64_t qi = 0; qi < nq; ++qi) {
      da[qi] = dot(Ep + (r0 + qi) * S, u, S);
      sada += at[qi] * da[qi];
      scale(dEc + (r0 + qi) * S, u, at[qi], S);  // dE = a du, the softmax-weighted sum's part
    }
    // dlogit, then dKp per row and vsum = sum_q dlogit[q] K[q] (K after the keep-mask)
    std::fill(vsum, vsum + S, T(0));
    for (int64_t qi = 0; qi < nq; ++qi) {
      const T dl = at[qi] * (da[qi] - sada);
      T* kr = K + (r0 + qi) * S;
      const T* kk = a.keep_k ? a.keep_k + (n * Lq + qi) * S : nullptr;
      for (int64_t j = 0; j < S; ++j) {
        const T m = kk ? kk[j] : T(1);
        const T kt = kr[j];
        vsum[j] += dl * kt * m;
        kr[j] = dl * gw[j] * m * (T(1) - kt * kt);  // dKp
      }
    }
    T* dwv = o.dwv + n * S;
    T* dgp = dG + k * S;
    for (int64_t j = 0; j < S; ++j) {
      const T m = kg ? kg[j] : T(1);
      dwv[j] = vsum[j] * g[j] * m;
      dgp[j] = vsum[j] * a.wv[j] * m * (T(1) - g[j] * g[j]);
    }
    std::memcpy(o.dgp + n * S, dgp, sizeof(T) * S);
    for (int64_t qi = 0; qi < nq; ++qi)
      std::memcpy(o.dKp + (n * Lq + qi) * S, K + (r0 + qi) * S, sizeof(T) * S);
  }
  gemm_kn(rows, S, S, K, S, a.wkp, dEc, S, true);           // dE += dKp Wk
  gemm_kn(np, S, S, dG, S, a.wqp, o.dh + n0 * S, S, false);  // dh = dgp Wq
  for (int64_t k = 0; k < np; ++k) {
    const int64_t n = n0 + k;
    std::memcpy(o.dE + n * Lq * S, dEc + ro[k] * S, sizeof(T) * (ro[k + 1] - ro[k]) * S);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rar_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& E, const at::Tensor& qlens, const at::Tensor& h,
    const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk, const at::Tensor& wv,
    const at::Tensor& bv, const c10::optional<at::Tensor>& keep_k, const c10::optional<at::Tensor>& keep_g) {
  RarPrepared pr = rar_prepare(E, qlens, h, wq, bq, wk, bk, wv, bv, keep_k, keep_g);
  TORCH_CHECK(wq.size(0) == 1, "wq: rar_bwd differentiates one step (T = 1), got T = ", wq.size(0));
  const int64_t B = E.size(0), P = E.size(1), Lq = E.size(2), S = E.size(3);
  check_float(grad, "grad", E);
  check_shape(grad, "grad", {B, P, S});
  at::Tensor g = as_compute(grad, pr.compute);
  pr.wqp = cached_pack("rar Wq", {pr.wq}, [&] { return pack_steps(pr.wq, false); });
  pr.wkp = cached_pack("rar Wk", {pr.wk}, [&] { return pack_steps(pr.wk, false); });
  const auto opts = pr.E.options();
  at::Tensor dE = at::zeros({B, P, Lq, S}, opts);
  at::Tensor dKp = at::zeros({B, P, Lq, S}, opts);
  at::Tensor dh = at::empty({B, P, S}, opts);
  at::Tensor dgp = at::empty({B, P, S}, opts);
  at::Tensor dwv = at::empty({B, P, S}, opts);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto a = rar_inputs<T>(pr);
    RarGrads<T> o{g.data_ptr<T>(),   pr.h.data_ptr<T>(),  dE.data_ptr<T>(), dh.data_ptr<T>(),
                  dKp.data_ptr<T>(), dgp.data_ptr<T>(), dwv.data_ptr<T>()};
    over_tiles(a, [&](int64_t n0, int64_t n1, RarState<T>& st) { rar_backward_tile(a, o, n0, n1, st); });
  };
  if (pr.compute == at::kDouble) run(double{});
  else run(float{});
  return {dE, dh, dKp, dgp, dwv};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcar_fast, CPU, m) {
  m.impl("rar", &rar_cpu);
  m.impl("rar_bwd", &rar_bwd_cpu);
}

}  // namespace rcar_fast::cpu
