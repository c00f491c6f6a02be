// A host emulation of the small part of CUDA the kernels of csrc/cuda/*.cuh use, so that the
// kernels' own code (index math, barriers, masking, the order of the passes) runs on the CPU in
// CI. One thread block at a time; its threads are fibers on one OS thread, switched only at
// barriers (below): __syncthreads waits for the whole block, a warp shuffle exchanges values
// behind a barrier of the warp. Between two barriers the threads run one after another, in thread
// order or (cuda_emu::reverse) the other way round, so a missing barrier between a write and a
// read by another thread shows in one of the two orders. nvcuda::wmma fragments hold the whole
// 16 x 16 tile in every lane (loads read it all and check the pointer's 32-byte alignment and the
// stride, mma_sync computes it in fp32 in every lane, stores write a lane's share). Shared memory
// is filled with 0xff bytes (NaN as floats) before every block, and the bytes past the launch's
// dynamic size must still hold them after it (a write past the layout throws). atomicAdd is a
// plain add (one OS thread). __half / __nv_bfloat16 are c10::Half / c10::BFloat16 (round to
// nearest even, as the device conversions). Hopper's wgmma (csrc/cuda/wgmma.cuh) is modelled from
// the PTX ISA (below: the descriptors decoded, the fp32 accumulator layout of m64n256k16), written
// apart from the kernels' own helpers so that the two can disagree.
//
// What it cannot show: anything about the hardware (timing, occupancy, register spills, the
// fragment layouts of real tensor cores), nor a race that neither thread order exposes. The
// compile tier (tests/test_compile.py) covers the code generation; only a GPU covers the rest.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__
#define __restrict__ __restrict
// csrc/cuda/wgmma.cuh: its functions are this file's (namespace rcar_fast::cuda::wg, below)
#define RCAR_FAST_CUDA_EMU 1

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
inline unsigned short __half_as_ushort(__half x) { return x.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 x) { return x.x; }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// the running thread's indices (the scheduler sets threadIdx before it switches to a thread)
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// The block's dynamic shared memory (one block runs at a time). A kernel's block-scope
// `extern __shared__ unsigned char smem[];` declares a member of its namespace: this one.
namespace rcar_fast {
namespace cuda {
inline unsigned char smem[256 * 1024] __attribute__((aligned(128)));
}  // namespace cuda
}  // namespace rcar_fast

// A block's threads are fibers on one OS thread, switched only at barriers: each runs until it
// waits at __syncthreads (released when every thread of the block waits there) or at a warp
// barrier (released when its 32 lanes wait there), or returns. A barrier that can never be
// released (a thread returned or waits elsewhere: a divergent barrier, undefined on a GPU) throws.
// The switch saves the callee-saved registers and the stack pointer (x86-64 System V; elsewhere
// ucontext, correct but much slower: it saves the signal mask with a system call per switch).
namespace cuda_emu {
constexpr int kMaxThreads = 256;
constexpr size_t kStack = 64 * 1024;
enum State { kReady, kAtBlock, kAtWarp, kDone };

#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
__asm__(R"(
.text
.globl cuda_emu_switch
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch, .-cuda_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

struct Block {
  Context sched;
  Context ctx[kMaxThreads];
  State state[kMaxThreads];
  std::unique_ptr<char[]> stacks;   // not zeroed: the fibers write before they read
  const std::function<void()>* body = nullptr;
  int n = 0, current = 0;
  float shfl[kMaxThreads / 32][32];
  std::string error;   // what a thread threw (the launch rethrows it)
};
inline Block* block = nullptr;

inline void switch_to(Context& save, Context& load) {
#if defined(__x86_64__)
  cuda_emu_switch(&save.sp, load.sp);
#else
  swapcontext(&save.uc, &load.uc);
#endif
}

inline void yield(State s) {
  Block& b = *block;
  b.state[b.current] = s;
  switch_to(b.ctx[b.current], b.sched);
}

inline void fiber_main() {
  try {
    (*block->body)();
  } catch (const std::exception& e) {   // a check above failed inside a kernel: report it after the round
    if (block->error.empty()) block->error = e.what();
  }
  Block& b = *block;
  b.state[b.current] = kDone;
  switch_to(b.ctx[b.current], b.sched);   // never resumed
  __builtin_trap();
}

inline void start_fiber(Block& b, int t) {
  char* lo = b.stacks.get() + kStack * t;
#if defined(__x86_64__)
  // [top - 8] a fake return address (the fiber entered as if called), [top - 16] fiber_main for
  // the switch's ret, below it the six registers the switch pops
  auto top = reinterpret_cast<uintptr_t>(lo + kStack) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<void**>(top);
  slot[-1] = nullptr;
  slot[-2] = reinterpret_cast<void*>(&fiber_main);
  for (int i = 3; i <= 8; ++i) slot[-i] = nullptr;
  b.ctx[t].sp = &slot[-8];
#else
  getcontext(&b.ctx[t].uc);
  b.ctx[t].uc.uc_stack.ss_sp = lo;
  b.ctx[t].uc.uc_stack.ss_size = kStack;
  b.ctx[t].uc.uc_link = nullptr;
  makecontext(&b.ctx[t].uc, &fiber_main, 0);
#endif
}

// wgmma batches of each thread of the running block (csrc/cuda/wgmma.cuh's functions, below)
struct WgOp {
  float* d;
  uint64_t da, db;
  int elem_kind;   // 1 fp16, 2 bf16
  int n;           // the tile's N (m64nNk16)
};
struct WgState {
  std::vector<WgOp> open, committed;
  bool fenced = false;
};
inline WgState wg_state[kMaxThreads];
inline long wg_ops = 0;   // wgmma calls so far (by any thread; tests/cuda_emu/kernels.cpp emu_wgmma_ops)
// .sync.aligned: the 128 threads of a warpgroup issue the same wgmma batches with the same
// descriptors. At each wait, a thread's batch is compared with the first one its warpgroup
// waited for in this round (the round ends when all 128 have waited).
struct WgRound {
  std::vector<WgOp> first;
  int waited = 0;
};
inline WgRound wg_round[kMaxThreads / 128];

inline bool reverse = false;   // run the threads between barriers from the last one down

// Runs body() for every block of a 1-D grid, one block after another; smem_bytes: the launch's
// dynamic shared memory (the bytes past it must stay untouched).
inline void launch(unsigned grid, unsigned threads, const std::function<void()>& body, size_t smem_bytes = 0) {
  constexpr size_t kSmem = sizeof(rcar_fast::cuda::smem);
  if (smem_bytes > kSmem) throw std::runtime_error("cuda_emu: the launch asks for more shared memory than 256 KB");
  Block b;
  b.n = (int)threads;
  b.body = &body;
  b.stacks.reset(new char[kStack * threads]);
  block = &b;
  blockDim.x = threads;
  gridDim.x = grid;
  for (unsigned bi = 0; bi < grid; ++bi) {
    blockIdx.x = bi;
    std::memset(rcar_fast::cuda::smem, 0xff, kSmem);   // garbage: NaN as floats
    for (int t = 0; t < b.n; ++t) {
      start_fiber(b, t);
      b.state[t] = kReady;
      wg_state[t] = WgState();
    }
    for (auto& r : wg_round) r = WgRound();
    for (;;) {
      bool ran = false;
      for (int i = 0; i < b.n; ++i) {
        const int t = reverse ? b.n - 1 - i : i;
        if (b.state[t] != kReady) continue;
        ran = true;
        b.current = t;
        threadIdx.x = (unsigned)t;
        switch_to(b.sched, b.ctx[t]);
      }
      if (!b.error.empty()) {
        block = nullptr;
        throw std::runtime_error(b.error);
      }
      int done = 0, at_block = 0;
      for (int t = 0; t < b.n; ++t) {
        done += b.state[t] == kDone;
        at_block += b.state[t] == kAtBlock;
      }
      if (done == b.n) break;
      bool released = false;
      for (int w = 0; w < b.n / 32; ++w) {
        bool all = true;
        for (int l = 0; l < 32; ++l) all = all && b.state[32 * w + l] == kAtWarp;
        if (all) {
          for (int l = 0; l < 32; ++l) b.state[32 * w + l] = kReady;
          released = true;
        }
      }
      if (at_block == b.n) {
        for (int t = 0; t < b.n; ++t) b.state[t] = kReady;
        released = true;
      }
      if (!released && !ran) {
        block = nullptr;
        throw std::runtime_error("cuda_emu: a barrier no thread can pass (divergent __syncthreads or shuffle)");
      }
    }
    for (int t = 0; t < b.n; ++t)
      if (!wg_state[t].open.empty() || !wg_state[t].committed.empty()) {
        block = nullptr;
        throw std::runtime_error("cuda_emu: a thread ended with a wgmma not waited for");
      }
    for (size_t i = smem_bytes; i < kSmem; ++i)
      if (rcar_fast::cuda::smem[i] != 0xff) {
        block = nullptr;
        throw std::runtime_error("cuda_emu: a block wrote shared memory past its dynamic size (byte " +
                                 std::to_string(i) + " of " + std::to_string(smem_bytes) + ")");
      }
  }
  block = nullptr;
}
}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::yield(cuda_emu::kAtBlock); }
// a barrier of the calling thread's warp (the full mask: the kernels call it with every lane)
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_emu::yield(cuda_emu::kAtWarp); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  auto& b = *cuda_emu::block;
  const unsigned w = threadIdx.x >> 5, l = threadIdx.x & 31;
  b.shfl[w][l] = v;
  cuda_emu::yield(cuda_emu::kAtWarp);
  const float r = b.shfl[w][l ^ lane_mask];
  cuda_emu::yield(cuda_emu::kAtWarp);
  return r;
}

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the kernels use 16 x 16 x 16 tiles");
  // every lane holds the whole tile, so an element-wise loop over num_elements (the kernels'
  // only use of x: the same operation on every element of fragments of one type) covers it all
  static constexpr int num_elements = 256;
  T x[256];   // (row, col) of the tile at x[row * 16 + col]
};

// The operand rules of wmma: a 256-bit aligned pointer, ldm a multiple of 16 bytes.
template <typename T>
inline void check_operand(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) throw std::runtime_error("cuda_emu: wmma pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) throw std::runtime_error("cuda_emu: wmma ldm not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator loads with a layout argument (as in wmma)");
  check_operand(p, ldm);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i * 16 + j] = std::is_same<Layout, row_major>::value ? p[i * ldm + j] : p[j * ldm + i];
}

// An accumulator tile from memory (fp32, row- or column-major).
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  check_operand(p, ldm);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}

template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
  for (auto& e : f.x) e = v;
}

template <typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float fa[256], fb[256], out[256];
  for (int e = 0; e < 256; ++e) {
    fa[e] = static_cast<float>(a.x[e]);
    fb[e] = static_cast<float>(b.x[e]);
    out[e] = c.x[e];
  }
  for (int i = 0; i < 16; ++i)     // fp32 products of the inputs, fp32 sums (fused multiply-adds)
    for (int k = 0; k < 16; ++k)
      for (int j = 0; j < 16; ++j) out[i * 16 + j] = std::fma(fa[i * 16 + k], fb[k * 16 + j], out[i * 16 + j]);
  std::memcpy(d.x, out, sizeof(out));
}

// Each lane writes its share (elements e with e % 32 == lane): no two lanes write one address.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_operand(p, ldm);
  for (int e = (int)(threadIdx.x & 31); e < 256; e += 32) {
    const int i = e / 16, j = e % 16;
    if (layout == mem_row_major)
      p[i * ldm + j] = f.x[e];
    else
      p[j * ldm + i] = f.x[e];
  }
}
}  // namespace wmma
}  // namespace nvcuda

// ---------------------------------------------------------------- wgmma (sm_90a)
// The functions of csrc/cuda/wgmma.cuh. A descriptor is decoded as the PTX ISA's "matrix
// descriptor" (start address, leading and stride byte offsets in 16-byte units in bits 0-13,
// 16-29, 32-45; base offset bits 49-51 and layout type bits 62-63 must be 0 here: no swizzle).
// K-major without swizzle: element (r, k) of the operand at start + (r / 8) sbo + (k / 8) lbo +
// 16 (r % 8) + 2 (k % 8) bytes. A batch (the wgmma calls between fence and commit) is computed at
// wait0 from the shared memory of that moment, as the hardware may read it at any time until
// then: a kernel that rewrites an operand before waiting, or a wgmma without a fence before it, or
// a wait with an uncommitted wgmma, fails here. What it cannot check: the proxy fence
// (fence.proxy.async) after the ordinary stores of an operand, which is a no-op here.
namespace rcar_fast {
namespace cuda {
namespace wg {

inline uint64_t desc(const void* p, uint32_t lbo, uint32_t sbo) {
  const auto off = reinterpret_cast<const unsigned char*>(p) - rcar_fast::cuda::smem;
  if (off < 0 || off >= (ptrdiff_t)sizeof(rcar_fast::cuda::smem))
    throw std::runtime_error("cuda_emu: a wgmma descriptor of a pointer outside shared memory");
  if (off % 16 != 0 || lbo % 16 != 0 || sbo % 16 != 0)
    throw std::runtime_error("cuda_emu: a wgmma descriptor's address or offsets not a multiple of 16 bytes");
  const uint64_t f = 0x3FFF;
  return ((uint64_t)off >> 4 & f) | (((uint64_t)lbo >> 4 & f) << 16) | (((uint64_t)sbo >> 4 & f) << 32);
}
inline void fence() { cuda_emu::wg_state[threadIdx.x].fenced = true; }
inline void proxy_fence() {}
template <int N>
inline void fence_acc(float (&)[N]) {}

template <typename T, int N>
inline void mma_m64k16(float (&d)[N / 2], uint64_t da, uint64_t db) {
  static_assert(sizeof(T) == 2, "wgmma .f16 / .bf16");
  static_assert(N == 16 || N == 32 || N == 48 || N == 64 || N == 128 || N == 256, "the N wgmma.cuh instantiates");
  auto& st = cuda_emu::wg_state[threadIdx.x];
  if (!st.fenced) throw std::runtime_error("cuda_emu: a wgmma without wgmma.fence before its batch");
  st.open.push_back({d, da, db, std::is_same<T, c10::Half>::value ? 1 : 2, N});
  ++cuda_emu::wg_ops;
}
template <typename T>
inline void mma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db) {
  mma_m64k16<T, 256>(d, da, db);
}

inline void commit() {
  auto& st = cuda_emu::wg_state[threadIdx.x];
  st.committed.insert(st.committed.end(), st.open.begin(), st.open.end());
  st.open.clear();
}

// element (r, k) of a K-major operand without swizzle, as fp32
inline float wg_operand(uint64_t desc, int r, int k, int elem_kind) {
  if ((desc >> 49 & 7) != 0 || (desc >> 62) != 0)
    throw std::runtime_error("cuda_emu: a wgmma descriptor with a base offset or a swizzle mode");
  const uint64_t start = (desc & 0x3FFF) << 4, lbo = (desc >> 16 & 0x3FFF) << 4, sbo = (desc >> 32 & 0x3FFF) << 4;
  const uint64_t byte = start + (r / 8) * sbo + (k / 8) * lbo + 16 * (r % 8) + 2 * (k % 8);
  if (byte + 2 > sizeof(rcar_fast::cuda::smem)) throw std::runtime_error("cuda_emu: a wgmma operand past shared memory");
  uint16_t bits;
  std::memcpy(&bits, rcar_fast::cuda::smem + byte, 2);
  if (elem_kind == 1) return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

inline void wait0() {
  auto& st = cuda_emu::wg_state[threadIdx.x];
  if (!st.open.empty()) throw std::runtime_error("cuda_emu: wgmma.wait_group with a wgmma not committed");
  auto& round = cuda_emu::wg_round[threadIdx.x / 128];
  if (round.waited == 0) {
    round.first = st.committed;
  } else {
    bool same = round.first.size() == st.committed.size();
    for (size_t i = 0; same && i < st.committed.size(); ++i)
      same = round.first[i].da == st.committed[i].da && round.first[i].db == st.committed[i].db &&
             round.first[i].elem_kind == st.committed[i].elem_kind && round.first[i].n == st.committed[i].n;
    if (!same) throw std::runtime_error("cuda_emu: the threads of a warpgroup issued different wgmma batches");
  }
  if (++round.waited == 128) round.waited = 0;
  // the thread's place in its warpgroup: warp w (of 4), lane l
  const int w = (threadIdx.x >> 5) & 3, l = threadIdx.x & 31;
  for (const auto& op : st.committed) {
    for (int n8 = 0; n8 < op.n / 8; ++n8)    // the 8-column groups of the N
      for (int half = 0; half < 2; ++half)   // rows l / 4 and l / 4 + 8 of the warp's 16
        for (int j = 0; j < 2; ++j) {        // the pair of columns 2 (l % 4), + 1
          const int row = 16 * w + l / 4 + 8 * half, col = 8 * n8 + 2 * (l % 4) + j;
          float sum = op.d[4 * n8 + 2 * half + j];
          for (int k = 0; k < 16; ++k)
            sum = std::fma(wg_operand(op.da, row, k, op.elem_kind), wg_operand(op.db, col, k, op.elem_kind), sum);
          op.d[4 * n8 + 2 * half + j] = sum;
        }
  }
  st.committed.clear();
  st.fenced = false;
}

}  // namespace wg
}  // namespace cuda
}  // namespace rcar_fast
