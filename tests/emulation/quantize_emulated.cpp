// csrc/fp8/quantize_sm90a.cuh's kernels on the CPU emulator, for tests/test_cuda_emulated.py.
#include "sm80_emulator.h"
// The emulator must come first: it replaces the CUDA built-ins the kernels use.
#include <cuda_fp8.h>

#include "../../csrc/fp8/quantize_sm90a.cuh"

namespace tilesmith::fp8_quantize {
// The kernels' `extern __shared__` buffer: one float per warp.
alignas(16) float quantize_warp_amax[kWarps];
}  // namespace tilesmith::fp8_quantize

namespace {

using tilesmith::QuantizeParams;
namespace fq = tilesmith::fp8_quantize;

template <typename T, bool kE5m2, int kVec>
std::string launch(const QuantizeParams& p) {
  const dim3 grid = fq::grid_of<kVec>(p);
  auto* smem = reinterpret_cast<unsigned char*>(fq::quantize_warp_amax);
  const size_t smem_bytes = sizeof fq::quantize_warp_amax;
  if (p.granularity == tilesmith::Granularity::kTensor) {
    const std::string error = tilesmith_emu::launch(
        grid, dim3(fq::kThreads), smem_bytes, smem, {},
        [&] { fq::tensor_amax_kernel<T, kVec>(p); });
    if (!error.empty()) return error;
  }
  return tilesmith_emu::launch(grid, dim3(fq::kThreads), smem_bytes, smem, {},
                               [&] { fq::quantize_kernel<T, kE5m2, kVec>(p); });
}

// The load width the launcher in quantize_sm90a.cuh picks.
template <typename T, bool kE5m2>
std::string run(const QuantizeParams& p) {
  return fq::rows_vectorizable<T>(p) ? launch<T, kE5m2, 16 / sizeof(T)>(p)
                                     : launch<T, kE5m2, 1>(p);
}

template <typename T>
std::string run_format(const QuantizeParams& p) {
  return p.e5m2 ? run<T, true>(p) : run<T, false>(p);
}

}  // namespace

// Returns 0, or 1 with the emulator's message in `error`. `vectorized` reports the load
// width the launcher chose (1: element loads), so the tests can show both paths ran.
extern "C" int emulate_quantize_fp8(const QuantizeParams* params, int* vectorized, char* error,
                                    int error_capacity) {
  const QuantizeParams& p = *params;
  std::string message;
  switch (p.input) {
    case tilesmith::QuantizeInput::kBFloat16:
      *vectorized = fq::rows_vectorizable<__nv_bfloat16>(p);
      message = run_format<__nv_bfloat16>(p);
      break;
    case tilesmith::QuantizeInput::kFloat16:
      *vectorized = fq::rows_vectorizable<__half>(p);
      message = run_format<__half>(p);
      break;
    default:
      *vectorized = fq::rows_vectorizable<float>(p);
      message = run_format<float>(p);
  }
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// For the test's check that its ctypes mirror of QuantizeParams has the same layout.
extern "C" int quantize_params_size() { return static_cast<int>(sizeof(QuantizeParams)); }
