// csrc/attention's kernels on the CPU emulator, for tests/test_cuda_emulated.py.
#include "sm80_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh.
#include "../../csrc/attention/attention_bwd_sm80.cuh"

namespace tilesmith::attention_sm80 {
// The kernels' `extern __shared__` buffer, which block-scope extern declares in this namespace.
// Sized for the largest kernel (float stands in for 16-bit types: twice that).
alignas(128) unsigned char shared_bytes[dq_smem_bytes<float, 256>()];
}  // namespace tilesmith::attention_sm80

namespace {

using tilesmith::AttentionParams;
namespace at80 = tilesmith::attention_sm80;

// The launch callback of forward_plan and backward_plan on the emulator: the first error is
// left in *error and stops the plan.
auto emulator_launcher(const AttentionParams& p, const std::vector<tilesmith_emu::Buffer>& buffers,
                       std::string* error) {
  return [&p, &buffers, error](auto kernel, dim3 grid, int smem_bytes) {
    *error = tilesmith_emu::launch(grid, dim3(at80::kThreads), smem_bytes, at80::shared_bytes,
                                   buffers, [&] { kernel(p); });
    return error->empty();
  };
}

// The forward kernel, and with a split over the keys its combine, as launch_fwd runs them.
template <typename T, int kHeadDim, bool kCausal, bool kDropout>
std::string forward(const AttentionParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  std::string error;
  at80::forward_plan<T, kHeadDim, kCausal, kDropout>(p, emulator_launcher(p, buffers, &error));
  return error;
}

// The backward kernels as launch_bwd runs them (attention_bwd_sm80.cuh's backward_plan).
template <typename T, int kHeadDim, bool kCausal, bool kDropout>
std::string backward(const AttentionParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  std::string error;
  at80::backward_plan<T, kHeadDim, kCausal, kDropout>(p, emulator_launcher(p, buffers, &error));
  return error;
}

template <typename T, int kHeadDim, bool kDropout>
std::string dispatch(const AttentionParams& p, bool causal, bool is_backward,
                     std::vector<tilesmith_emu::Buffer> buffers) {
  if (is_backward) {
    return causal ? backward<T, kHeadDim, true, kDropout>(p, std::move(buffers))
                  : backward<T, kHeadDim, false, kDropout>(p, std::move(buffers));
  }
  return causal ? forward<T, kHeadDim, true, kDropout>(p, std::move(buffers))
                : forward<T, kHeadDim, false, kDropout>(p, std::move(buffers));
}

// As run_fwd / run_bwd choose: the dropout instantiation when there is a seed.
template <typename T, int kHeadDim>
std::string dispatch(const AttentionParams& p, bool causal, bool is_backward,
                     std::vector<tilesmith_emu::Buffer> buffers) {
  return p.dropout_seed != nullptr
             ? dispatch<T, kHeadDim, true>(p, causal, is_backward, std::move(buffers))
             : dispatch<T, kHeadDim, false>(p, causal, is_backward, std::move(buffers));
}

}  // namespace

// dtype: 0 bfloat16, 1 float16; backward 0 (forward) or 1 (the dK/dV and dQ kernels). The
// kernels' head dim is chosen from params->head_dim as attention_api.cpp chooses it.
// Returns 0, or 1 with the message.
extern "C" int emulate_attention(const AttentionParams* params, int dtype, int causal,
                                 int backward, const void* const* buffer_ptrs,
                                 const int64_t* buffer_bytes, int buffers, char* error,
                                 int error_capacity) {
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const AttentionParams& p = *params;
  std::string message;
  if (dtype == 0) {
    message = p.head_dim <= 64    ? dispatch<__nv_bfloat16, 64>(p, causal, backward, regions)
              : p.head_dim <= 128 ? dispatch<__nv_bfloat16, 128>(p, causal, backward, regions)
                                  : dispatch<__nv_bfloat16, 256>(p, causal, backward, regions);
  } else {
    message = p.head_dim <= 64    ? dispatch<__half, 64>(p, causal, backward, regions)
              : p.head_dim <= 128 ? dispatch<__half, 128>(p, causal, backward, regions)
                                  : dispatch<__half, 256>(p, causal, backward, regions);
  }
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// For the test's check that its ctypes mirror of AttentionParams has the same layout.
extern "C" int attention_params_size() { return static_cast<int>(sizeof(AttentionParams)); }

// The shared memory the head-dim-256 kernels ask for, for the test that compares it with
// ops/attention.py's CUDA_D256_SMEM_BYTES (which routes GPUs with less to Triton).
extern "C" int attention_d256_smem_bytes() {
  return std::max({at80::fwd_smem_bytes<__half, 256>(), at80::dkdv_smem_bytes<__half, 256>(),
                   at80::dq_smem_bytes<__half, 256>()});
}
