// csrc/attention's kernels on the CPU emulator, for tests/test_cuda_emulated.py.
#include "sm80_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh.
#include "../../csrc/attention/attention_fwd_sm80.cuh"

namespace tilesmith::attention_sm80 {
// The kernels' `extern __shared__` buffer, which block-scope extern declares in this namespace.
alignas(128) unsigned char shared_bytes[fwd_smem_bytes<float, 128>()];
}  // namespace tilesmith::attention_sm80

namespace {

using tilesmith::AttentionParams;
namespace at80 = tilesmith::attention_sm80;

template <typename T, int kHeadDim, bool kCausal>
std::string forward(const AttentionParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + at80::kBlockM - 1) / at80::kBlockM),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  return tilesmith_emu::launch(grid, dim3(at80::kThreads), at80::fwd_smem_bytes<T, kHeadDim>(),
                               at80::shared_bytes, std::move(buffers), [&p] {
                                 at80::attention_fwd_kernel<T, kHeadDim, kCausal>(p);
                               });
}

template <typename T, int kHeadDim>
std::string dispatch(const AttentionParams& p, bool causal,
                     std::vector<tilesmith_emu::Buffer> buffers) {
  return causal ? forward<T, kHeadDim, true>(p, std::move(buffers))
                : forward<T, kHeadDim, false>(p, std::move(buffers));
}

}  // namespace

// dtype: 0 bfloat16, 1 float16; head_dim 64 or 128. Returns 0, or 1 with the message.
extern "C" int emulate_attention_fwd(const AttentionParams* params, int dtype, int head_dim,
                                     int causal, const void* const* buffer_ptrs,
                                     const int64_t* buffer_bytes, int buffers, char* error,
                                     int error_capacity) {
  std::vector<tilesmith_emu::Buffer> regions;
  for (int i = 0; i < buffers; ++i) {
    regions.push_back({static_cast<const unsigned char*>(buffer_ptrs[i]),
                       static_cast<size_t>(buffer_bytes[i])});
  }
  std::string message;
  if (dtype == 0) {
    message = head_dim == 64 ? dispatch<__nv_bfloat16, 64>(*params, causal, std::move(regions))
                             : dispatch<__nv_bfloat16, 128>(*params, causal, std::move(regions));
  } else {
    message = head_dim == 64 ? dispatch<__half, 64>(*params, causal, std::move(regions))
                             : dispatch<__half, 128>(*params, causal, std::move(regions));
  }
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// For the test's check that its ctypes mirror of AttentionParams has the same layout.
extern "C" int attention_params_size() { return static_cast<int>(sizeof(AttentionParams)); }
