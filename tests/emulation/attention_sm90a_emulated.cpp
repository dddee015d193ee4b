// csrc/attention/attention_fwd_sm90a.cuh's kernel on the CPU emulator, for
// tests/test_cuda_emulated.py.
#include "sm90a_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh / wgmma_sm90a.cuh.
#include "../../csrc/attention/attention_fwd_sm90a.cuh"

namespace tilesmith::attention_sm90a {
// The kernel's `extern __shared__` buffer, aligned as the GPU's shared window is.
alignas(1024) unsigned char shared_bytes[kSmemBytes];
}  // namespace tilesmith::attention_sm90a

namespace {

using tilesmith::AttentionParams;
namespace at90 = tilesmith::attention_sm90a;

template <typename T, bool kCausal>
std::string forward(const AttentionParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  return tilesmith_emu::launch(tilesmith::attention_sm80::query_grid<at90::kBlockM>(p),
                               dim3(at90::kThreads), at90::kSmemBytes, at90::shared_bytes,
                               std::move(buffers),
                               [&p] { at90::attention_fwd_kernel<T, kCausal>(p); });
}

template <typename T>
std::string forward(const AttentionParams& p, bool causal,
                    std::vector<tilesmith_emu::Buffer> buffers) {
  return causal ? forward<T, true>(p, std::move(buffers)) : forward<T, false>(p, std::move(buffers));
}

}  // namespace

// dtype: 0 bfloat16, 1 float16. Returns 0, or 1 with the emulator's message in `error`; 2
// where the kernel does not take the call (attention_sm90a::takes), launching nothing.
extern "C" int emulate_attention_fwd_sm90a(const AttentionParams* params, int dtype, int causal,
                                           const void* const* buffer_ptrs,
                                           const int64_t* buffer_bytes, int buffers, char* error,
                                           int error_capacity) {
  if (!at90::takes(*params)) return 2;
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const std::string message = dtype == 0
      ? forward<__nv_bfloat16>(*params, causal, std::move(regions))
      : forward<__half>(*params, causal, std::move(regions));
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}
