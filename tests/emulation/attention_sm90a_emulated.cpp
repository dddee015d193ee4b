// csrc/attention/attention_fwd_sm90a.cuh's, attention_fwd_tma_sm90a.cuh's and
// attention_bwd_sm90a.cuh's kernels on the CPU emulator, for tests/test_cuda_emulated.py.
#include "sm90a_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh / wgmma_sm90a.cuh.
#include "../../csrc/attention/attention_bwd_sm90a.cuh"
#include "../../csrc/attention/attention_fwd_tma_sm90a.cuh"

// The kernels' `extern __shared__` buffer, aligned as the GPU's shared window is: the
// 128-wide forward's is the largest.
namespace tilesmith::attention_sm90a {
static_assert(kSmemBytes<128> >= kDkdvSmemBytes<128, true> && kSmemBytes<128> >= kDqSmemBytes<128>);
alignas(1024) unsigned char shared_bytes[kSmemBytes<128>];
}  // namespace tilesmith::attention_sm90a
namespace tilesmith::attention_tma_sm90a {
alignas(1024) unsigned char shared_bytes[kSmemBytes<128>];
}  // namespace tilesmith::attention_tma_sm90a

namespace {

using tilesmith::AttentionParams;
namespace at80 = tilesmith::attention_sm80;
namespace at90 = tilesmith::attention_sm90a;
namespace tma = tilesmith::attention_tma_sm90a;

template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout>
std::string forward(const AttentionParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  return tilesmith_emu::launch(
      at80::query_grid<at90::kBlockM>(p), dim3(at90::kThreads), at90::kSmemBytes<kHeadDim>,
      at90::shared_bytes, std::move(buffers),
      [&p] { at90::attention_fwd_kernel<T, kHeadDim, kCausal, kMasked, kDropout>(p); });
}

// The kernels as launch_bwd runs them (attention_bwd_sm90a.cuh's backward_plan).
template <typename T, int kHeadDim, bool kCausal, bool kMasked, bool kDropout>
std::string backward(const AttentionParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  std::string error;
  at90::backward_plan<T, kHeadDim, kCausal, kMasked, kDropout>(
      p, [&](auto kernel, dim3 grid, int threads, int smem_bytes) {
        error = tilesmith_emu::launch(grid, dim3(threads), smem_bytes, at90::shared_bytes,
                                      buffers, [&] { kernel(p); });
        return error.empty();
      });
  return error;
}

// The kernel variant run / run_bwd choose (attention_fwd_sm90a.cuh's with_variant).
template <typename T>
std::string run(const AttentionParams& p, bool causal, bool is_backward,
                std::vector<tilesmith_emu::Buffer> buffers) {
  return at90::with_variant(p, causal, [&](auto width, auto is_causal, auto masked,
                                            auto dropout) {
    constexpr int kHeadDim = decltype(width)::value;
    constexpr bool kCausal = decltype(is_causal)::value, kMasked = decltype(masked)::value;
    constexpr bool kDropout = decltype(dropout)::value;
    return is_backward
        ? backward<T, kHeadDim, kCausal, kMasked, kDropout>(p, std::move(buffers))
        : forward<T, kHeadDim, kCausal, kMasked, kDropout>(p, std::move(buffers));
  });
}

// The TMA-fed forward, as attention_tma_sm90a::run launches it.
template <typename T, int kHeadDim, bool kCausal>
std::string forward_tma(const tma::Arguments& args, std::vector<tilesmith_emu::Buffer> buffers) {
  return tilesmith_emu::launch(
      at80::query_grid<tma::kBlockM>(args.params), dim3(tilesmith::kRingThreads),
      tma::kSmemBytes<kHeadDim>, tma::shared_bytes, std::move(buffers),
      [&args] { tma::attention_fwd_tma_kernel<T, kHeadDim, kCausal>(args); });
}

template <typename T>
std::string run_tma(const tma::Arguments& args, bool causal,
                    std::vector<tilesmith_emu::Buffer> buffers) {
  const bool wide = args.params.head_dim > 64;
  if (causal) {
    return wide ? forward_tma<T, 128, true>(args, std::move(buffers))
                : forward_tma<T, 64, true>(args, std::move(buffers));
  }
  return wide ? forward_tma<T, 128, false>(args, std::move(buffers))
              : forward_tma<T, 64, false>(args, std::move(buffers));
}

}  // namespace

// The TMA-fed forward (attention_fwd_tma_sm90a.cuh). Returns as emulate_attention_sm90a;
// 2 where takes_tma or the tile maps refuse the call.
extern "C" int emulate_attention_fwd_tma(const AttentionParams* params, int dtype, int causal,
                                         const void* const* buffer_ptrs,
                                         const int64_t* buffer_bytes, int buffers, char* error,
                                         int error_capacity) {
  tma::Arguments args;
  if (!tma::takes_tma(*params) || !tma::describe_operands(*params, args)) return 2;
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const std::string message = dtype == 0
      ? run_tma<__nv_bfloat16>(args, causal, std::move(regions))
      : run_tma<__half>(args, causal, std::move(regions));
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// dtype: 0 bfloat16, 1 float16; backward 0 (the forward kernel) or 1 (the dK/dV and dQ
// kernels). Returns 0, or 1 with the emulator's message in `error`; 2 where the kernels do
// not take the call (attention_sm90a::takes), launching nothing.
extern "C" int emulate_attention_sm90a(const AttentionParams* params, int dtype, int causal,
                                       int backward, const void* const* buffer_ptrs,
                                       const int64_t* buffer_bytes, int buffers, char* error,
                                       int error_capacity) {
  if (!at90::takes(*params)) return 2;
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const std::string message = dtype == 0
      ? run<__nv_bfloat16>(*params, causal, backward, std::move(regions))
      : run<__half>(*params, causal, backward, std::move(regions));
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}
