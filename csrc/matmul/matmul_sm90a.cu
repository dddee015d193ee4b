// tilesmith._C_sm90a's entries for the Hopper matmul kernels (common/hopper_kernels.h): whether
// they take the call here, and which dtype's kernels run it; and the switch between their
// TMA and cp.async kernels (scaled_gemm's too).
#include <atomic>

#include "../common/hopper_kernels.h"
#include "matmul_sm90a.cuh"

namespace tilesmith {

bool current_device_is_sm90() {
  // sm_90a code runs on compute capability 9.0 only (it is compiled for nothing else).
  int device = 0, major = 0, minor = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
             cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) ==
             cudaSuccess &&
         major == 9 && minor == 0;
}

namespace {
std::atomic<bool> tma_enabled{true};
}  // namespace

void set_tma_kernels(bool enabled) { tma_enabled.store(enabled, std::memory_order_relaxed); }
bool tma_kernels() { return tma_enabled.load(std::memory_order_relaxed); }

bool run_matmul_sm90a(const MatmulParams& params, bool bf16, cudaStream_t stream,
                      cudaError_t* error) {
  if (!current_device_is_sm90() || !matmul_sm90a::takes(params)) return false;
  const bool tma = tma_kernels();
  if (params.out_fp32) {
    *error = bf16 ? run_matmul_sm90a_bf16_fp32_out(params, tma, stream)
                  : run_matmul_sm90a_fp16_fp32_out(params, tma, stream);
  } else {
    *error = bf16 ? run_matmul_sm90a_bf16(params, tma, stream)
                  : run_matmul_sm90a_fp16(params, tma, stream);
  }
  return true;
}

}  // namespace tilesmith
