"""Planted bugs in the CUDA kernels (csrc/cuda/*.cuh, plan.h), each caught by the host emulation
of tests/test_cuda_emu.py (the kernels compiled for the CPU and checked against the reference).
Format: tests/mutants/run.py."""

ATT = "csrc/cuda/attention_kernels.cuh"
RAR = "csrc/cuda/rar_kernels.cuh"
EMU = "tests/test_cuda_emu.py"

MUTANTS = [
    dict(name="cuda tc forward: the column norms of a pair taken over the first pair's rows",
         file=ATT, old="      const float s = S[(g * bq + q) * ldS + c];", new="      const float s = S[q * ldS + c];",
         tests=[f"{EMU}::test_tensor_core_forward_groups"]),
    dict(name="cuda tc forward: no barrier between P C into us and its readers (kModeAttended)",
         file=ATT,
         old="      tc_pc_chunk<T, MT>(Pb, ldP, cs, ldo, bc, us);\n      __syncthreads();\n      for (int idx = tid; idx < ROWS * kBD; idx += kThreads) {\n        const int r = idx >> 5, k = idx & 31;\n        const int64_t d = d0 + k;\n        if (d < D && row_valid(r)) {\n          const int g = row_pair(r), q = r - g * bq;\n          o[",
         new="      tc_pc_chunk<T, MT>(Pb, ldP, cs, ldo, bc, us);\n      for (int idx = tid; idx < ROWS * kBD; idx += kThreads) {\n        const int r = idx >> 5, k = idx & 31;\n        const int64_t d = d0 + k;\n        if (d < D && row_valid(r)) {\n          const int g = row_pair(r), q = r - g * bq;\n          o[",
         tests=[f"{EMU}::test_tensor_core_forward_groups"]),
    dict(name="cuda tc forward: every pair's rows masked with the first pair's query length",
         file=ATT, old="    return g < gp && r - g * bq < qls[g];", new="    return g < gp && r - g * bq < qls[0];",
         tests=[f"{EMU}::test_tensor_core_forward_groups"]),
    dict(name="cuda tc forward: the paired form reads context item b instead of context_index[p]",
         file=ATT, old="  const int64_t bcx = a.cidx != nullptr ? (int64_t)a.cidx[p0] : b;   // the block's context item",
         new="  const int64_t bcx = b;", tests=[f"{EMU}::test_tensor_core_forward_paired"]),
    dict(name="cuda plan: the projection's row stride s + 4, not rounded up to the 256-column passes",
         file="csrc/cuda/plan.h",
         old="    L.y = a128(L.ws + (int64_t)kNG * ld_op(elem) * elem);\n    L.ldy = (int)round_up(s, kNG) + 4;\n    end = a128(L.y + (int64_t)rows * L.ldy * 4);",
         new="    L.y = a128(L.ws + (int64_t)kNG * ld_op(elem) * elem);\n    L.ldy = (int)s + 4;\n    end = a128(L.y + (int64_t)rows * L.ldy * 4);",
         tests=[f"{EMU}::test_tensor_core_forward_wide_projection"]),
    dict(name="cuda rar forward: every pair of a block reads the first pair's gate",
         file=RAR, old="          part = fmaf(kv, gws[g * sk + n], part);", new="          part = fmaf(kv, gws[n], part);",
         tests=[f"{EMU}::test_rar_forward"]),
    dict(name="cuda rar forward: only the first 16 MT-row group of the keys computed",
         file=RAR, old="  for (int r0 = 0; r0 < rows; r0 += RG) {\n    for (int64_t n0 = 0; n0 < S; n0 += kNG) {\n      BlockGemm<T, MT> gemm;",
         new="  for (int r0 = 0; r0 < RG; r0 += RG) {\n    for (int64_t n0 = 0; n0 < S; n0 += kNG) {\n      BlockGemm<T, MT> gemm;",
         tests=[f"{EMU}::test_rar_forward"]),
    dict(name="cuda rar mean: the sum of E divided by Lq, not the pair's length",
         file=RAR, old="    h[pid * S + m] = n > 0 ? v / (float)n : 0.f;", new="    h[pid * S + m] = n > 0 ? v / (float)Lq : 0.f;",
         tests=[f"{EMU}::test_rar_forward"]),
    dict(name="cuda rar backward: dgp with tanh's derivative 1 - g instead of 1 - g^2",
         file=RAR, old="    dgp[pid * S + n] = col * wvn * kg * (1.f - g * g);", new="    dgp[pid * S + n] = col * wvn * kg * (1.f - g);",
         tests=[f"{EMU}::test_rar_backward"]),
    dict(name="cuda attention backward: dquery's score term without the factors",
         file=ATT, old="        atomicAdd(o.dq + (p * Lq + r) * D + d, dDq + dx * fv);",
         new="        atomicAdd(o.dq + (p * Lq + r) * D + d, dDq + dx);", tests=[f"{EMU}::test_attention_backward"]),
    dict(name="cuda l2n backward: the projection term's sign flipped",
         file=ATT, old="  for (int64_t n = lane; n < S; n += 32) dr[n] = to_f(gr[n]) * ir - yr[n] * coef;",
         new="  for (int64_t n = lane; n < S; n += 32) dr[n] = to_f(gr[n]) * ir + yr[n] * coef;",
         tests=[f"{EMU}::test_attention_backward"]),
    dict(name="cuda rcr: the row at a pair's query length counted valid (off by one)",
         file="csrc/cuda/rcr_kernels.cuh", old="    const bool valid = q < (int64_t)qlens[p];",
         new="    const bool valid = q <= (int64_t)qlens[p];", tests=[f"{EMU}::test_rcr_factors"]),
]
