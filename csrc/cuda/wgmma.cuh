// Hopper's warpgroup MMA (wgmma, PTX ISA 8.0+, sm_90a only) for the kernels that use it
// (rcr_kernels.cuh: rcr_wgmma_kernel; attention_kernels.cuh: TcProjectionWg). A warpgroup is 4 consecutive warps (128 threads, the first
// warp's index a multiple of 4); every one of its threads calls each function below with the same
// arguments (.sync.aligned).
//
// Operands: both from shared memory through 64-bit matrix descriptors (desc), K-major (A: M x K
// with K contiguous, B: N x K with K contiguous; no transpose), no swizzle: the operand is a grid
// of core matrices of 8 rows x 16 bytes (8 x 8 16-bit elements), each 128 contiguous bytes (row i
// at byte 16 i); lbo is the byte distance between two core matrices adjacent along K, sbo between
// two adjacent along M (or N). One m64n256k16 reads A's 64 x 16 (8 x 2 core matrices) and B's
// 256 x 16 (32 x 2) from their descriptors' start addresses.
//
// The fp32 accumulator of m64n256k16: 128 registers a thread; thread t of the warpgroup (warp
// w = t / 32, lane l = t % 32) holds in register i the element (row, col) of the 64 x 256 tile
//     row = 16 w + l / 4 + 8 ((i / 2) % 2),   col = 8 (i / 4) + 2 (l % 4) + i % 2
// (acc_row / acc_col).
//
// Order (the PTX ISA's rules): shared memory written by ordinary stores is made visible to wgmma
// by fence.proxy.async (proxy_fence) in each writing thread, before the barrier that publishes it;
// fence() (wgmma.fence) before the first wgmma of a batch, after any other access to the
// accumulator registers; commit() closes the batch; wait0() waits for every committed batch (the
// accumulators and the shared memory it reads are the kernel's again after it).
//
// Under the host emulation (tests/cuda_emu/include/cuda_emu.h defines RCAR_FAST_CUDA_EMU) the
// same functions are the emulator's: it decodes the descriptors, computes a batch at wait0 from
// the shared memory of that moment, and fills the registers in the layout above.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace rcar_fast {
namespace cuda {
namespace wg {

// register i of thread t (of the warpgroup): its row and column of the 64 x 256 accumulator tile
__host__ __device__ __forceinline__ int acc_row(int t, int i) { return 16 * ((t >> 5) & 3) + ((t & 31) >> 2) + 8 * ((i >> 1) & 1); }
__host__ __device__ __forceinline__ int acc_col(int t, int i) { return 8 * (i >> 2) + 2 * (t & 3) + (i & 1); }

// The descriptor's fields: start address, lbo and sbo in 16-byte units (14 bits each: bits 0-13,
// 16-29, 32-45); base offset (bits 49-51) and layout type (bits 62-63) zero: no swizzle.
__host__ __device__ __forceinline__ uint64_t encode_desc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((smem_addr >> 4) & 0x3FFF) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
         ((uint64_t)((sbo >> 4) & 0x3FFF) << 32);
}

#if !defined(RCAR_FAST_CUDA_EMU) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RCAR_FAST_WGMMA_ON_DEVICE 1

__device__ __forceinline__ uint64_t desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return encode_desc(static_cast<uint32_t>(__cvta_generic_to_shared(p)), lbo, sbo);
}
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// keeps the compiler from moving other accesses of the accumulator registers across these calls
template <int N>
__device__ __forceinline__ void fence_acc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D += A B^T for a 64 x N tile, N in {16, 32, 48, 64, 128, 256} (scale-d true, set from a register as
// CUTLASS does: the accumulators' zeros come from the kernel), scales of A and B 1, no transposes,
// fp32 accumulators: N / 2 registers a thread, in the layout of acc_row / acc_col.
template <typename T, int N>
__device__ __forceinline__ void mma_m64k16(float (&d)[N / 2], uint64_t da, uint64_t db);

#define RCAR_FAST_WG_REGS_16 \
  "%0, %1, %2, %3, %4, %5, %6, %7"
#define RCAR_FAST_WG_OUTS_16 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define RCAR_FAST_WG_PRED_16 "%10"
#define RCAR_FAST_WG_DESC_16 "%8, %9"
#define RCAR_FAST_WG_REGS_32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define RCAR_FAST_WG_OUTS_32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define RCAR_FAST_WG_PRED_32 "%18"
#define RCAR_FAST_WG_DESC_32 "%16, %17"
#define RCAR_FAST_WG_REGS_48 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23"
#define RCAR_FAST_WG_OUTS_48 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23])
#define RCAR_FAST_WG_PRED_48 "%26"
#define RCAR_FAST_WG_DESC_48 "%24, %25"
#define RCAR_FAST_WG_REGS_64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define RCAR_FAST_WG_OUTS_64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define RCAR_FAST_WG_PRED_64 "%34"
#define RCAR_FAST_WG_DESC_64 "%32, %33"
#define RCAR_FAST_WG_REGS_128 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define RCAR_FAST_WG_OUTS_128 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define RCAR_FAST_WG_PRED_128 "%66"
#define RCAR_FAST_WG_DESC_128 "%64, %65"
#define RCAR_FAST_WG_REGS_256 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define RCAR_FAST_WG_OUTS_256 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define RCAR_FAST_WG_PRED_256 "%130"
#define RCAR_FAST_WG_DESC_256 "%128, %129"

#define RCAR_FAST_WGMMA(N, TNAME, PTX)                                                                  \
template <>                                                                                             \
__device__ __forceinline__ void mma_m64k16<TNAME, N>(float (&d)[N / 2], uint64_t da, uint64_t db) {     \
  asm volatile(                                                                                         \
      "{\n"                                                                                             \
      ".reg .pred p;\n"                                                                                 \
      "setp.ne.b32 p, " RCAR_FAST_WG_PRED_##N ", 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX "\n"                                \
      "{" RCAR_FAST_WG_REGS_##N "},\n"                                                                   \
      RCAR_FAST_WG_DESC_##N ", p, 1, 1, 0, 0;\n"                                                        \
      "}\n"                                                                                             \
      : RCAR_FAST_WG_OUTS_##N                                                                           \
      : "l"(da), "l"(db), "r"(1));                                                                      \
}
RCAR_FAST_WGMMA(16, __half, "f16")
RCAR_FAST_WGMMA(16, __nv_bfloat16, "bf16")
RCAR_FAST_WGMMA(32, __half, "f16")
RCAR_FAST_WGMMA(32, __nv_bfloat16, "bf16")
RCAR_FAST_WGMMA(48, __half, "f16")
RCAR_FAST_WGMMA(48, __nv_bfloat16, "bf16")
RCAR_FAST_WGMMA(64, __half, "f16")
RCAR_FAST_WGMMA(64, __nv_bfloat16, "bf16")
RCAR_FAST_WGMMA(128, __half, "f16")
RCAR_FAST_WGMMA(128, __nv_bfloat16, "bf16")
RCAR_FAST_WGMMA(256, __half, "f16")
RCAR_FAST_WGMMA(256, __nv_bfloat16, "bf16")
#undef RCAR_FAST_WGMMA
#undef RCAR_FAST_WG_REGS_16
#undef RCAR_FAST_WG_OUTS_16
#undef RCAR_FAST_WG_PRED_16
#undef RCAR_FAST_WG_DESC_16
#undef RCAR_FAST_WG_REGS_32
#undef RCAR_FAST_WG_OUTS_32
#undef RCAR_FAST_WG_PRED_32
#undef RCAR_FAST_WG_DESC_32
#undef RCAR_FAST_WG_REGS_48
#undef RCAR_FAST_WG_OUTS_48
#undef RCAR_FAST_WG_PRED_48
#undef RCAR_FAST_WG_DESC_48
#undef RCAR_FAST_WG_REGS_64
#undef RCAR_FAST_WG_OUTS_64
#undef RCAR_FAST_WG_PRED_64
#undef RCAR_FAST_WG_DESC_64
#undef RCAR_FAST_WG_REGS_128
#undef RCAR_FAST_WG_OUTS_128
#undef RCAR_FAST_WG_PRED_128
#undef RCAR_FAST_WG_DESC_128
#undef RCAR_FAST_WG_REGS_256
#undef RCAR_FAST_WG_OUTS_256
#undef RCAR_FAST_WG_PRED_256
#undef RCAR_FAST_WG_DESC_256
#elif !defined(RCAR_FAST_CUDA_EMU)
// Any other target (sm_80, plain sm_90, the host pass): the same names, each a trap, for kernels
// whose wgmma instances are compiled for every target but launched only where launch.h use_wgmma
// says (attention_fwd_tc_kernel's WG instances).
__device__ __forceinline__ uint64_t desc(const void*, uint32_t, uint32_t) {
  __trap();
  return 0;
}
__device__ __forceinline__ void fence() { __trap(); }
__device__ __forceinline__ void commit() { __trap(); }
__device__ __forceinline__ void wait0() { __trap(); }
__device__ __forceinline__ void proxy_fence() { __trap(); }
template <int N>
__device__ __forceinline__ void fence_acc(float (&)[N]) {}
template <typename T, int N>
__device__ __forceinline__ void mma_m64k16(float (&)[N / 2], uint64_t, uint64_t) {
  __trap();
}
#endif

#if !defined(RCAR_FAST_CUDA_EMU)
template <typename T>
__device__ __forceinline__ void mma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db) {
  mma_m64k16<T, 256>(d, da, db);
}
#endif

// One batch on the accumulators acc, waited for: the fences before (no access of acc moved past
// them, as CUTLASS), issue() (its wgmma calls), commit, wait, the compiler fence after. The
// operands' writers fenced the async proxy before the barrier ahead of this; the caller's next
// barrier frees them.
template <int N, typename Issue>
__device__ __forceinline__ void batch(float (&acc)[N], Issue&& issue) {
  fence_acc(acc);
  fence();
  issue();
  commit();
  wait0();
  fence_acc(acc);
}

}  // namespace wg
}  // namespace cuda
}  // namespace rcar_fast
