// Evaluates csrc/cuda/plan.h (the CUDA kernels' launch plan) for the compile report
// (bench/cuda_resources.py): reads one query per line on stdin, answers one line each.
//
//   fwd ELEM LQ LC S MODE LIMIT  ->  MT BYTES   attention_fwd_kernel (kModeAlignment: the launcher's MT)
//   tc ELEM LQ LC S MODE P PAIRED LIMIT -> MT BYTES GP WG  attention_fwd_tc_kernel (choose_tc_plan;
//                                             0 0 0 0: not applicable, the launcher runs
//                                             attention_fwd_kernel; WG: tc_wgmma_projection)
//   wg ELEM LQ LC S MODE P PAIRED LIMIT -> MT BYTES GP BC  attention_fwd_wg_kernel (choose_wg_plan;
//                                             0 0 0 0: not applicable; on sm_90a builds the
//                                             launcher takes it before attention_fwd_tc_kernel)
//   bwd LQ LC                    ->  1 BYTES    attention_bwd_kernel
//   bwdtc ELEM LQ LC P PAIRED LIMIT -> MT BYTES GP  attention_bwd_tc_kernel (choose_bwd_tc_plan;
//                                             0 0 0: not applicable, attention_bwd_kernel runs)
//   gram LC                      ->  1 BYTES    gram_kernel
//   rar ELEM LQ S LIMIT          ->  MT BYTES   rar_bwd_kernel
//   rarfwd ELEM LQ S P LIMIT     ->  MT BYTES GP  rar_fwd_kernel (choose_rar_plan; 0 0 0: does not fit)
//   rarwg ELEM LQ S P LIMIT      ->  MT BYTES GP  rar_fwd_wg_kernel (choose_rar_wg_plan; 0 0 0: not
//                                             applicable; on sm_90a builds the launcher takes it
//                                             before rar_fwd_kernel)
//   rcrgemm ELEM                 ->  1 BYTES    rcr_gemm_kernel
//   rcrwgmma ELEM                ->  1 BYTES    rcr_wgmma_kernel
//
// ELEM: bytes of the element type; LIMIT: the chip's shared memory per block; BYTES: dynamic
// shared memory of the launch. Not part of the extension (setup.py builds csrc/ only).
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>

#include "cuda/plan.h"

int main() {
  using namespace rcar_fast::cuda_plan;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string what;
    in >> what;
    if (what == "fwd") {
      int64_t elem, lq, lc, s, mode, limit;
      in >> elem >> lq >> lc >> s >> mode >> limit;
      const int mt = mode == kModeAlignment ? choose_attn_mt((int)elem, lq, lc, s, limit) : 1;
      std::cout << mt << " " << attn_fwd_layout((int)elem, lq, lc, s, mt, (int)mode).total << "\n";
    } else if (what == "tc") {
      int64_t elem, lq, lc, s, mode, p, paired, limit;
      in >> elem >> lq >> lc >> s >> mode >> p >> paired >> limit;
      const TcPlan t = choose_tc_plan((int)elem, lq, lc, s, p, paired != 0, (int)mode, limit);
      const int64_t bytes = t.gp ? attn_tc_layout((int)elem, 16 * t.mt, t.bc, t.gp, s, (int)mode).total : 0;
      std::cout << t.mt << " " << bytes << " " << t.gp << " " << (t.gp && tc_wgmma_projection(t.mt, (int)mode)) << "\n";
    } else if (what == "wg") {
      int64_t elem, lq, lc, s, mode, p, paired, limit;
      in >> elem >> lq >> lc >> s >> mode >> p >> paired >> limit;
      const TcPlan t = choose_wg_plan((int)elem, lq, lc, s, p, paired != 0, (int)mode, limit);
      const int64_t bytes = t.gp ? attn_wg_layout((int)elem, t.bc, t.gp).total : 0;
      std::cout << t.mt << " " << bytes << " " << t.gp << " " << t.bc << "\n";
    } else if (what == "bwd") {
      int64_t lq, lc;
      in >> lq >> lc;
      std::cout << 1 << " " << attn_bwd_layout(lq, lc).total << "\n";
    } else if (what == "bwdtc") {
      int64_t elem, lq, lc, p, paired, limit;
      in >> elem >> lq >> lc >> p >> paired >> limit;
      const TcPlan t = choose_bwd_tc_plan((int)elem, lq, lc, p, paired != 0, limit);
      const int64_t bytes = t.gp ? attn_bwd_tc_layout((int)elem, 16 * t.mt, t.bc, t.gp).total : 0;
      std::cout << t.mt << " " << bytes << " " << t.gp << "\n";
    } else if (what == "gram") {
      int64_t lc;
      in >> lc;
      std::cout << 1 << " " << gram_layout(lc).total << "\n";
    } else if (what == "rar") {
      int64_t elem, lq, s, limit;
      in >> elem >> lq >> s >> limit;
      const int mt = choose_rar_mt((int)elem, lq, s, limit);
      std::cout << mt << " " << rar_layout((int)elem, lq, s, mt).total << "\n";
    } else if (what == "rarfwd") {
      int64_t elem, lq, s, p, limit;
      in >> elem >> lq >> s >> p >> limit;
      const RarPlan pl = choose_rar_plan((int)elem, lq, s, p, limit);
      const int64_t bytes = pl.gp ? rar_step_layout((int)elem, pl.gp * pl.bq, s, pl.mt, pl.gp).total : 0;
      std::cout << pl.mt << " " << bytes << " " << pl.gp << "\n";
    } else if (what == "rarwg") {
      int64_t elem, lq, s, p, limit;
      in >> elem >> lq >> s >> p >> limit;
      const RarPlan pl = choose_rar_wg_plan((int)elem, lq, s, p, limit);
      std::cout << pl.mt << " " << (pl.gp ? rar_wg_layout((int)elem, pl.gp, s).total : 0) << " " << pl.gp << "\n";
    } else if (what == "rcrgemm") {
      int64_t elem;
      in >> elem;
      std::cout << 1 << " " << rcr_gemm_smem((int)elem) << "\n";
    } else if (what == "rcrwgmma") {
      int64_t elem;
      in >> elem;
      std::cout << 1 << " " << rcr_wgmma_smem((int)elem) << "\n";
    } else {
      std::cout << "error unknown query " << what << "\n";
    }
  }
  return 0;
}
