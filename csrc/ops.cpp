// The op schemas of rcar_fast (declared once; see README.md for the contract) and the small
// Python module rcar_fast._C, which loads them and reports how the extension was built.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(rcar_fast, m) {
  m.def("attention(Tensor query, Tensor qlens, Tensor context, Tensor clens, Tensor? factors, "
        "Tensor? lam, float lam_scalar, Tensor? weight, Tensor? bias, Tensor? context_index=None, "
        "Tensor? gram=None) -> Tensor");
  // the context items' Gram matrices as the CUDA attention takes them (its `gram`; CUDA only)
  m.def("context_gram(Tensor context, Tensor clens) -> Tensor");
  m.def("attention_bwd(Tensor grad, Tensor query, Tensor qlens, Tensor context, Tensor clens, "
        "Tensor? factors, Tensor? lam, float lam_scalar, Tensor? weight, Tensor? bias, "
        "bool need_dfactors, Tensor? context_index=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rar(Tensor E, Tensor qlens, Tensor? h0, Tensor wq, Tensor bq, Tensor wk, Tensor bk, "
        "Tensor wv, Tensor bv, Tensor? keep_k, Tensor? keep_g) -> Tensor");
  m.def("rar_bwd(Tensor grad, Tensor E, Tensor qlens, Tensor h, Tensor wq, Tensor bq, Tensor wk, "
        "Tensor bk, Tensor wv, Tensor bv, Tensor? keep_k, Tensor? keep_g) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // rar with the scoring layer in its last step's launch: (B, P) float32 sigmoid(score_w . h +
  // score_b), h rounded to E's dtype first (inference only; CUDA only)
  m.def("rar_scores(Tensor E, Tensor qlens, Tensor? h0, Tensor wq, Tensor bq, Tensor wk, Tensor bk, "
        "Tensor wv, Tensor bv, Tensor score_w, Tensor score_b) -> Tensor");
  m.def("rcr(Tensor E, Tensor qlens, Tensor? factors, Tensor? lam, float lam_scalar, Tensor w1, Tensor b1, "
        "Tensor w2, Tensor b2, Tensor ws1, Tensor bs1, Tensor ws2, Tensor bs2) -> (Tensor, Tensor)");
  // the d-wide chain of RCR's recomputed backward (rcar_fast.torch_math.rcr_step_recomputed):
  // gm = grad [|z| <= 1] (1 - t^2), t = tanh(hidden w2^T + b2), z = t + factors (ones for None),
  // (n, d) in hidden's dtype; grad [|z| <= 1] written into dfactors where given
  m.def("rcr_factors_bwd(Tensor hidden, Tensor w2, Tensor b2, Tensor? factors, Tensor grad, "
        "Tensor(a!)? dfactors) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch"] = TORCH_VERSION;
#ifdef RCAR_FAST_WITH_CUDA
  info["cuda"] = true;
#ifdef RCAR_FAST_CUDA_ARCHS
  info["cuda_archs"] = RCAR_FAST_CUDA_ARCHS;
#endif
  // the wgmma kernels' code is in this build (sm_90a; csrc/cuda/launch.h use_wgmma)
#ifdef RCAR_FAST_SM90A
  info["wgmma"] = true;
#else
  info["wgmma"] = false;
#endif
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcar_fast compiled ops (registered as torch.ops.rcar_fast.*) and build info";
  m.def("build_info", &build_info, "how this extension was built: torch version, CUDA, archs");
}
