// csrc/conv2d/conv2d_sm90a.cuh's kernels (forward, dgrad, wgrad) on the CPU emulator, for
// tests/test_cuda_emulated.py.
#include "sm90a_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh / wgmma_sm90a.cuh.
#include "../../csrc/conv2d/conv2d_sm90a.cuh"

namespace tilesmith::conv2d_sm90a {
// The kernels' `extern __shared__` buffer, aligned as the GPU's shared window is.
alignas(1024) unsigned char shared_bytes[Tiling<256>::kSmemBytes];  // the larger of the two
}  // namespace tilesmith::conv2d_sm90a

namespace {

using tilesmith::ConvParams;
using tilesmith::ConvPass;
using tilesmith::kDgrad;
using tilesmith::kForward;
using tilesmith::kWgrad;
using tilesmith::MatmulParams;
namespace cv = tilesmith::conv2d_sm90a;

template <ConvPass kPass, typename T, int kBlockN>
std::string launch(const ConvParams& cp, const MatmulParams& out, int splits,
                   std::vector<tilesmith_emu::Buffer> buffers) {
  const dim3 grid = tilesmith::conv_grid<cv::kBlockM, kBlockN>(kPass, cp, out, splits);
  return tilesmith_emu::launch(grid, dim3(cv::kThreads), cv::Tiling<kBlockN>::kSmemBytes,
                               cv::shared_bytes, std::move(buffers),
                               [&] { cv::kernel_of<kPass, T, kBlockN>()(cp, out); });
}

// The tile width the launcher in conv2d_sm90a.cuh picks.
template <ConvPass kPass, typename T>
std::string run(const ConvParams& cp, const MatmulParams& out, int splits,
                std::vector<tilesmith_emu::Buffer> buffers) {
  return cv::tile_width(out) == 256 ? launch<kPass, T, 256>(cp, out, splits, std::move(buffers))
                                    : launch<kPass, T, 128>(cp, out, splits, std::move(buffers));
}

template <typename T>
std::string run_pass(int pass, const ConvParams& cp, const MatmulParams& out, int splits,
                     std::vector<tilesmith_emu::Buffer> buffers) {
  if (pass == kForward) return run<kForward, T>(cp, out, splits, std::move(buffers));
  if (pass == kDgrad) return run<kDgrad, T>(cp, out, splits, std::move(buffers));
  return run<kWgrad, T>(cp, out, splits, std::move(buffers));
}

}  // namespace

// pass: 0 forward, 1 dgrad, 2 wgrad (with `splits`); dtype: 0 bfloat16, 1 float16.
// Returns 0, or 1 with the emulator's message in `error`.
extern "C" int emulate_conv2d_sm90a(int pass, int dtype, const ConvParams* conv,
                                    const MatmulParams* out, int splits,
                                    const void* const* buffer_ptrs, const int64_t* buffer_bytes,
                                    int buffers, char* error, int error_capacity) {
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const std::string message = dtype == 0
      ? run_pass<__nv_bfloat16>(pass, *conv, *out, splits, std::move(regions))
      : run_pass<__half>(pass, *conv, *out, splits, std::move(regions));
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}
