// csrc/fp8/quantize_sm90a.cuh's kernels on the CPU emulator, for tests/test_cuda_emulated.py.
#include "sm80_emulator.h"
// The emulator must come first: it replaces the CUDA built-ins the kernels use.
#include <cuda_fp8.h>

#include "../../csrc/fp8/quantize_sm90a.cuh"

namespace tilesmith::fp8_quantize {
// The kernels' `extern __shared__` buffers: one float per warp, and the column-major
// kernel's tile.
alignas(16) float quantize_warp_amax[kWarps];
alignas(16) unsigned char quantize_column_shared[sizeof(ColumnTileShared)];
}  // namespace tilesmith::fp8_quantize

namespace {

using tilesmith::QuantizeParams;
namespace fq = tilesmith::fp8_quantize;

unsigned char* warp_amax_smem() {
  return reinterpret_cast<unsigned char*>(fq::quantize_warp_amax);
}

// Per-tensor scaling's first kernel: the amax into *p.amax.
template <typename T, int kVec>
std::string launch_amax(const QuantizeParams& p) {
  return tilesmith_emu::launch(fq::grid_of<kVec>(p), dim3(fq::kThreads),
                               sizeof fq::quantize_warp_amax, warp_amax_smem(), {},
                               [&] { fq::tensor_amax_kernel<T, kVec>(p); });
}

template <typename T, bool kE5m2, int kVec>
std::string launch(const QuantizeParams& p) {
  if (p.granularity == tilesmith::Granularity::kTensor) {
    const std::string error = launch_amax<T, kVec>(p);
    if (!error.empty()) return error;
  }
  return tilesmith_emu::launch(fq::grid_of<kVec>(p), dim3(fq::kThreads),
                               sizeof fq::quantize_warp_amax, warp_amax_smem(), {},
                               [&] { fq::quantize_kernel<T, kE5m2, kVec>(p); });
}

// The column-major kernel, after the per-tensor amax read along memory rows.
template <typename T, bool kE5m2>
std::string launch_column_major(const QuantizeParams& p) {
  if (p.granularity == tilesmith::Granularity::kTensor) {
    const std::string error = launch_amax<T, 8>(fq::memory_rows(p));
    if (!error.empty()) return error;
  }
  return tilesmith_emu::launch(
      fq::column_major_grid(p), dim3(fq::kThreads), sizeof fq::quantize_column_shared,
      fq::quantize_column_shared, {}, [&] { fq::quantize_column_major_kernel<T, kE5m2>(p); });
}

// The path the launcher in quantize_sm90a.cuh picks.
template <typename T, bool kE5m2>
std::string run(const QuantizeParams& p) {
  if constexpr (sizeof(T) == 2) {
    if (tilesmith::quantizes_column_major(p)) return launch_column_major<T, kE5m2>(p);
  }
  return fq::rows_vectorizable<T>(p) ? launch<T, kE5m2, 16 / sizeof(T)>(p)
                                     : launch<T, kE5m2, 1>(p);
}

template <typename T>
std::string run_format(const QuantizeParams& p) {
  return p.e5m2 ? run<T, true>(p) : run<T, false>(p);
}

}  // namespace

// The path the launcher takes: 0 element loads, 1 16-byte loads along rows, 2 the
// column-major kernel.
template <typename T>
int path(const QuantizeParams& p) {
  if (sizeof(T) == 2 && tilesmith::quantizes_column_major(p)) return 2;
  return fq::rows_vectorizable<T>(p) ? 1 : 0;
}

// Returns 0, or 1 with the emulator's message in `error`. `path` reports which path ran (as
// path() numbers them), so the tests can show each one did.
extern "C" int emulate_quantize_fp8(const QuantizeParams* params, int* path_taken, char* error,
                                    int error_capacity) {
  const QuantizeParams& p = *params;
  std::string message;
  switch (p.input) {
    case tilesmith::QuantizeInput::kBFloat16:
      *path_taken = path<__nv_bfloat16>(p);
      message = run_format<__nv_bfloat16>(p);
      break;
    case tilesmith::QuantizeInput::kFloat16:
      *path_taken = path<__half>(p);
      message = run_format<__half>(p);
      break;
    default:
      *path_taken = path<float>(p);
      message = run_format<float>(p);
  }
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// For the test's check that its ctypes mirror of QuantizeParams has the same layout.
extern "C" int quantize_params_size() { return static_cast<int>(sizeof(QuantizeParams)); }
