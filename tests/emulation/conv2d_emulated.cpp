// csrc/conv2d's kernels on the CPU emulator, for tests/test_cuda_emulated.py.
#include "sm80_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh.
#include "../../csrc/conv2d/conv2d_sm80.cuh"
#include "../../csrc/conv2d/depthwise.cuh"

namespace tilesmith::conv2d_sm80 {
// The kernels' `extern __shared__` buffer, which block-scope extern declares in this namespace.
alignas(128) unsigned char shared_bytes[smem_bytes<float>()];
}  // namespace tilesmith::conv2d_sm80

namespace {

using tilesmith::ConvParams;
using tilesmith::ConvPass;
using tilesmith::kDgrad;
using tilesmith::kForward;
using tilesmith::kWgrad;
using tilesmith::MatmulParams;
namespace cv = tilesmith::conv2d_sm80;

template <typename T>
std::string run_pass(int pass, const ConvParams& cp, const MatmulParams& out, int splits,
                     std::vector<tilesmith_emu::Buffer> buffers) {
  const size_t smem = cv::smem_bytes<T>();
  const auto kind = static_cast<ConvPass>(pass);
  const dim3 grid = tilesmith::conv_grid<cv::kBlockM, cv::kBlockN>(kind, cp, out, splits);
  return tilesmith_emu::launch(grid, dim3(cv::kThreads), smem, cv::shared_bytes,
                               std::move(buffers), [&] {
                                 if (kind == kForward) cv::conv2d_fwd_kernel<T>(cp, out);
                                 if (kind == kDgrad) cv::conv2d_dgrad_kernel<T>(cp, out);
                                 if (kind == kWgrad) cv::conv2d_wgrad_kernel<T>(cp, out);
                               });
}

// The depthwise kernels: one thread per (pixel, 8 channels) or (tap, 8 channels).
template <typename T>
std::string run_depthwise(int pass, const tilesmith::DepthwiseParams& p, int splits,
                          std::vector<tilesmith_emu::Buffer> buffers) {
  namespace dw = tilesmith::depthwise;
  const int64_t chunks = p.channels / dw::kVector;
  const int64_t threads = pass == 0   ? p.batch * p.out_h * p.out_w * chunks
                          : pass == 1 ? p.batch * p.height * p.width * chunks
                                      : p.kernel_h * p.kernel_w * chunks;
  const dim3 grid(static_cast<unsigned>((threads + dw::kThreads - 1) / dw::kThreads),
                  pass == 2 ? static_cast<unsigned>(splits) : 1u);
  return tilesmith_emu::launch(grid, dim3(dw::kThreads), 0, cv::shared_bytes, std::move(buffers),
                               [&] {
                                 if (pass == 0) dw::depthwise_fwd_kernel<T>(p);
                                 if (pass == 1) dw::depthwise_dgrad_kernel<T>(p);
                                 if (pass == 2) dw::depthwise_wgrad_kernel<T>(p);
                               });
}

}  // namespace

// pass: 0 forward, 1 dgrad, 2 wgrad (with `splits`); dtype: 0 bfloat16, 1 float16.
extern "C" int emulate_depthwise(int pass, int dtype, const tilesmith::DepthwiseParams* params,
                                 int splits, char* error, int error_capacity) {
  const std::string message =
      dtype == 0 ? run_depthwise<__nv_bfloat16>(pass, *params, splits, {})
                 : run_depthwise<__half>(pass, *params, splits, {});
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

extern "C" int depthwise_params_size() {
  return static_cast<int>(sizeof(tilesmith::DepthwiseParams));
}

// pass: 0 forward, 1 dgrad, 2 wgrad (with `splits`); dtype: 0 bfloat16, 1 float16.
// Returns 0, or 1 with the emulator's message in `error`.
extern "C" int emulate_conv2d(int pass, int dtype, const ConvParams* conv,
                              const MatmulParams* out, int splits,
                              const void* const* buffer_ptrs, const int64_t* buffer_bytes,
                              int buffers, char* error, int error_capacity) {
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const std::string message =
      dtype == 0 ? run_pass<__nv_bfloat16>(pass, *conv, *out, splits, std::move(regions))
                 : run_pass<__half>(pass, *conv, *out, splits, std::move(regions));
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// For the test's check that its ctypes mirror of ConvParams has the same layout.
extern "C" int conv_params_size() { return static_cast<int>(sizeof(ConvParams)); }

// conv2d.h's choice of wgrad's split count (host code, tested beside the kernels).
extern "C" int64_t conv2d_wgrad_splits(int64_t pixels, int64_t blocks, int64_t slots,
                                       int64_t min_pixels) {
  return tilesmith::wgrad_splits(pixels, blocks, slots, min_pixels);
}
