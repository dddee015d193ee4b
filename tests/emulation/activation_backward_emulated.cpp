// csrc/gemm/activation_backward.cuh's kernels on the CPU emulator, for
// tests/test_cuda_emulated.py.
#include "sm80_emulator.h"
// The emulator must come first: it replaces the CUDA built-ins the kernels use.
#include "../../csrc/gemm/activation_backward.cuh"

namespace tilesmith::activation_backward {
// The kernels' `extern __shared__` buffer, sized for the widest strip.
alignas(16) float column_sums[kWarps * kLanes * 8];
}  // namespace tilesmith::activation_backward

namespace {

using tilesmith::ActivationBackwardParams;
namespace ab = tilesmith::activation_backward;

template <typename T, typename G, typename P, int kVec>
std::string launch(const ActivationBackwardParams& p) {
  return tilesmith_emu::launch(dim3(static_cast<unsigned>(ab::blocks<kVec>(p))), dim3(ab::kThreads),
                               ab::smem_bytes<kVec>(),
                               reinterpret_cast<unsigned char*>(ab::column_sums), {},
                               [&] { ab::activation_backward_kernel<T, G, P, kVec>(p); });
}

// The vector width the launcher in activation_backward.cuh picks.
template <typename T, typename G, typename P>
std::string run(const ActivationBackwardParams& p, int* vector_width) {
  *vector_width = ab::vector_width<T>(p);
  return *vector_width > 1 ? launch<T, G, P, 16 / sizeof(T)>(p) : launch<T, G, P, 1>(p);
}

// The dispatch of activation_backward.cu.
template <typename T>
std::string run_input_types(const ActivationBackwardParams& p, int* vector_width) {
  if (p.pre_fp32) return run<T, float, float>(p, vector_width);
  return p.grad_fp32 ? run<T, float, T>(p, vector_width) : run<T, T, T>(p, vector_width);
}

}  // namespace

// Returns 0, or 1 with the emulator's message in `error`; `vector_width` reports the
// columns per thread the launcher chose (1: element loads).
extern "C" int emulate_activation_backward(const ActivationBackwardParams* params,
                                           int* vector_width, char* error, int error_capacity) {
  const ActivationBackwardParams& p = *params;
  const std::string message = p.dz_bf16 ? run_input_types<__nv_bfloat16>(p, vector_width)
                                        : run_input_types<__half>(p, vector_width);
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// For the test's check that its ctypes mirror of ActivationBackwardParams has the same layout.
extern "C" int activation_backward_params_size() {
  return static_cast<int>(sizeof(ActivationBackwardParams));
}
