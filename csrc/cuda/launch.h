// Host-side helpers of the CUDA ops: dtype dispatch onto the kernels' element types, the current
// stream, and the dynamic shared-memory check + opt-in before a launch.
// (c10/cuda only: ATen/cuda/CUDAContext.h pulls in cusparse.h/cublas headers, which a bare CUDA
// toolkit may not have; at::cuda::getCurrentCUDAStream is this same c10 function.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

namespace rcar_fast {
namespace cuda {

// Runs body (a generic lambda taking a T* null pointer tag) with T = float, __half or __nv_bfloat16.
template <typename Body>
void dispatch_float(at::ScalarType st, const char* name, Body&& body) {
  switch (st) {
    case at::kFloat: body(static_cast<float*>(nullptr)); break;
    case at::kHalf: body(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: body(static_cast<__nv_bfloat16*>(nullptr)); break;
    default:
      TORCH_CHECK(false, name, ": the CUDA kernels take float32, float16 or bfloat16 tensors, got ", st);
  }
}

inline void check_cuda_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              ": the CUDA kernels take float32, float16 or bfloat16 tensors, got ", st);
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Opt-in shared memory per block of the current device (A100 163 KB, H100/H200 227 KB).
inline int64_t smem_limit() {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  return static_cast<int64_t>(v);
}

// Whether the current device runs this build's wgmma kernels (wgmma.cuh): a compute capability 9.0
// device (H100/H200) and an extension built for sm_90a (setup.py defines RCAR_FAST_SM90A where
// TORCH_CUDA_ARCH_LIST holds 9.0a and not plain 9.0; the kernels trap in any other build), unless
// RCAR_FAST_CUDA_WGMMA=0 asks for the wmma kernels (the GPU tests run both).
inline bool use_wgmma() {
#if defined(RCAR_FAST_SM90A)
  const char* env = std::getenv("RCAR_FAST_CUDA_WGMMA");
  if (env != nullptr && std::string(env) == "0") return false;
  int major = 0, minor = 0;
  const int dev = c10::cuda::current_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

// Checks `bytes` of dynamic shared memory fit the current device and opts the kernel in above 48 KB.
template <typename Kernel>
void prepare_smem(Kernel* kernel, int64_t bytes, const char* what) {
  const int64_t limit = smem_limit();
  TORCH_CHECK(bytes <= limit, what, ": these shapes need ", bytes, " bytes of shared memory per block, the device "
              "allows ", limit, " (the per-pair tiles grow with the query and context lengths)");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T>
inline const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <typename T>
inline T* mut_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

}  // namespace cuda
}  // namespace rcar_fast
