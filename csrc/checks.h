// Input checks shared by the CPU and CUDA implementations of the rcar_fast ops (see README.md).
// Each names the argument and what is wrong, so a user can act on the message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace rcar_fast {

inline void check_float(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(),
              " (the dtype of the features), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, ": expected a tensor on ", like.device(), ", got ",
              t.device());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
}

inline void check_lens(const at::Tensor& lens, const char* name, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(lens.scalar_type() == at::kInt, name, ": expected int32 lengths, got ", lens.scalar_type());
  TORCH_CHECK(lens.device() == like.device(), name, ": expected a tensor on ", like.device(), ", got ",
              lens.device());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == n, name, ": expected shape [", n, "], got ", lens.sizes());
}

// query (P, Lq, d), context (B, Lc, d), factors (B, P, Lq, d), lam (B, P, Lq), weight (s, d), bias (s)
inline void check_attention(const at::Tensor& query, const at::Tensor& qlens, const at::Tensor& context,
                            const at::Tensor& clens, const c10::optional<at::Tensor>& factors,
                            const c10::optional<at::Tensor>& lam, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& context_index = c10::nullopt) {
  TORCH_CHECK(query.is_floating_point(), "query: expected a floating tensor, got ", query.scalar_type());
  TORCH_CHECK(query.dim() == 3, "query: expected (P, Lq, d), got shape ", query.sizes());
  TORCH_CHECK(context.dim() == 3, "context: expected (B, Lc, d), got shape ", context.sizes());
  check_float(context, "context", query);
  const int64_t P = query.size(0), Lq = query.size(1), D = query.size(2);
  const int64_t B = context.size(0);
  TORCH_CHECK(context.size(2) == D, "context: feature size ", context.size(2),
              " differs from query's ", D);
  check_lens(qlens, "qlens", P, query);
  check_lens(clens, "clens", B, query);
  // paired (context_index given): pair p is query p against context item context_index[p]; the
  // per-pair tensors then have one item on the context side
  const int64_t Bo = context_index ? 1 : B;
  if (context_index) {
    TORCH_CHECK(context_index->scalar_type() == at::kInt, "context_index: expected int32, got ",
                context_index->scalar_type());
    TORCH_CHECK(context_index->dim() == 1 && context_index->size(0) == P, "context_index: expected shape (", P,
                ",) (one context item per query item), got ", context_index->sizes());
    TORCH_CHECK(context_index->device() == query.device(), "context_index: on ", context_index->device(),
                " but query is on ", query.device());
  }
  if (factors) {
    check_float(*factors, "factors", query);
    check_shape(*factors, "factors", {Bo, P, Lq, D});
  }
  if (lam) {
    check_float(*lam, "lam", query);
    check_shape(*lam, "lam", {Bo, P, Lq});
  }
  TORCH_CHECK(weight.has_value() == bias.has_value(), "weight, bias: give both or neither");
  if (weight) {
    check_float(*weight, "weight", query);
    TORCH_CHECK(weight->dim() == 2 && weight->size(1) == D, "weight: expected (s, ", D, "), got ",
                weight->sizes());
    check_float(*bias, "bias", query);
    check_shape(*bias, "bias", {weight->size(0)});
  }
}

// gram (the attention's optional argument): context_gram(context, clens), (B, Lc, Lc) float32,
// contiguous, on the context's device
inline void check_gram(const c10::optional<at::Tensor>& gram, const at::Tensor& context) {
  if (!gram) return;
  TORCH_CHECK(gram->scalar_type() == at::kFloat, "gram: expected float32 (context_gram's output), got ",
              gram->scalar_type());
  TORCH_CHECK(gram->device() == context.device(), "gram: expected a tensor on ", context.device(), ", got ",
              gram->device());
  check_shape(*gram, "gram", {context.size(0), context.size(1), context.size(1)});
  TORCH_CHECK(gram->is_contiguous(), "gram: not contiguous (pass context_gram's output as it is)");
}

// E (B, P, Lq, s), h (B, P, s), wq/wk (T, s, s), bq/bk (T, s), wv (T, s), bv (T)
inline void check_rar(const at::Tensor& E, const at::Tensor& qlens, const c10::optional<at::Tensor>& h,
                      const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
                      const at::Tensor& wv, const at::Tensor& bv, const c10::optional<at::Tensor>& keep_k,
                      const c10::optional<at::Tensor>& keep_g) {
  TORCH_CHECK(E.is_floating_point(), "E: expected a floating tensor, got ", E.scalar_type());
  TORCH_CHECK(E.dim() == 4, "E: expected (B, P, Lq, s), got shape ", E.sizes());
  const int64_t B = E.size(0), P = E.size(1), Lq = E.size(2), S = E.size(3);
  check_lens(qlens, "qlens", P, E);
  TORCH_CHECK(wq.dim() == 3, "wq: expected (T, s, s), got shape ", wq.sizes());
  const int64_t T = wq.size(0);
  TORCH_CHECK(T >= 1, "wq: expected at least one RAR step, got T = 0");
  const std::pair<const at::Tensor*, const char*> w3[] = {{&wq, "wq"}, {&wk, "wk"}};
  for (auto& [t, name] : w3) {
    check_float(*t, name, E);
    check_shape(*t, name, {T, S, S});
  }
  const std::pair<const at::Tensor*, const char*> w2[] = {{&bq, "bq"}, {&bk, "bk"}, {&wv, "wv"}};
  for (auto& [t, name] : w2) {
    check_float(*t, name, E);
    check_shape(*t, name, {T, S});
  }
  check_float(bv, "bv", E);
  check_shape(bv, "bv", {T});
  if (h) {
    check_float(*h, "h", E);
    check_shape(*h, "h", {B, P, S});
  }
  TORCH_CHECK(keep_k.has_value() == keep_g.has_value(), "keep_k, keep_g: give both or neither");
  if (keep_k) {
    TORCH_CHECK(T == 1, "keep_k: dropout masks are per step; run one step (T = 1) at a time, got T = ", T);
    check_float(*keep_k, "keep_k", E);
    check_shape(*keep_k, "keep_k", {B, P, Lq, S});
    check_float(*keep_g, "keep_g", E);
    check_shape(*keep_g, "keep_g", {B, P, S});
  }
}

// E (B, P, Lq, s), factors (B, P, Lq, d), lam (B, P, Lq); w1 (h1, s), b1 (h1), w2 (d, h1), b2 (d),
// ws1 (h2, s), bs1 (h2), ws2 (1, h2), bs2 (1)
inline void check_rcr(const at::Tensor& E, const at::Tensor& qlens, const c10::optional<at::Tensor>& factors,
                      const c10::optional<at::Tensor>& lam, const at::Tensor& w1, const at::Tensor& b1,
                      const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& ws1, const at::Tensor& bs1,
                      const at::Tensor& ws2, const at::Tensor& bs2) {
  TORCH_CHECK(E.is_floating_point(), "E: expected a floating tensor, got ", E.scalar_type());
  TORCH_CHECK(E.dim() == 4, "E: expected (B, P, Lq, s), got shape ", E.sizes());
  const int64_t B = E.size(0), P = E.size(1), Lq = E.size(2), S = E.size(3);
  check_lens(qlens, "qlens", P, E);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == S, "w1: expected (h1, ", S, "), got ", w1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == w1.size(0), "w2: expected (d, ", w1.size(0), "), got ", w2.sizes());
  TORCH_CHECK(ws1.dim() == 2 && ws1.size(1) == S, "ws1: expected (h2, ", S, "), got ", ws1.sizes());
  const int64_t H1 = w1.size(0), D = w2.size(0), H2 = ws1.size(0);
  const std::pair<const at::Tensor*, const char*> ws[] = {{&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"}, {&b2, "b2"},
                                                          {&ws1, "ws1"}, {&bs1, "bs1"}, {&ws2, "ws2"}, {&bs2, "bs2"}};
  for (auto& [t, name] : ws) check_float(*t, name, E);
  check_shape(b1, "b1", {H1});
  check_shape(b2, "b2", {D});
  check_shape(bs1, "bs1", {H2});
  check_shape(ws2, "ws2", {1, H2});
  check_shape(bs2, "bs2", {1});
  if (factors) {
    check_float(*factors, "factors", E);
    check_shape(*factors, "factors", {B, P, Lq, D});
  }
  if (lam) {
    check_float(*lam, "lam", E);
    check_shape(*lam, "lam", {B, P, Lq});
  }
}

// rcr_factors_bwd: hidden (n, h1), w2 (d, h1), b2 (d), factors None | (n, d), grad (n, d),
// dfactors None | (n, d), all of hidden's dtype and device
inline void check_rcr_factors_bwd(const at::Tensor& hidden, const at::Tensor& w2, const at::Tensor& b2,
                                  const c10::optional<at::Tensor>& factors, const at::Tensor& grad,
                                  const c10::optional<at::Tensor>& dfactors) {
  TORCH_CHECK(hidden.is_floating_point(), "hidden: expected a floating tensor, got ", hidden.scalar_type());
  TORCH_CHECK(hidden.dim() == 2, "hidden: expected (n, h1), got shape ", hidden.sizes());
  const int64_t N = hidden.size(0), H1 = hidden.size(1);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == H1, "w2: expected (d, ", H1, "), got ", w2.sizes());
  const int64_t D = w2.size(0);
  check_float(w2, "w2", hidden);
  check_float(b2, "b2", hidden);
  check_shape(b2, "b2", {D});
  check_float(grad, "grad", hidden);
  check_shape(grad, "grad", {N, D});
  if (factors) {
    check_float(*factors, "factors", hidden);
    check_shape(*factors, "factors", {N, D});
  }
  if (dfactors) {
    check_float(*dfactors, "dfactors", hidden);
    check_shape(*dfactors, "dfactors", {N, D});
  }
}

}  // namespace rcar_fast
