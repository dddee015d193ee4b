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
using tilesmith::MatmulParams;
namespace cv = tilesmith::conv2d_sm80;

unsigned output_tiles(const MatmulParams& out) {
  return static_cast<unsigned>(((out.m + cv::kBlockM - 1) / cv::kBlockM) *
                               ((out.n + cv::kBlockN - 1) / cv::kBlockN));
}

template <typename T>
std::string run_pass(int pass, const ConvParams& cp, const MatmulParams& out, int splits,
                     std::vector<tilesmith_emu::Buffer> buffers) {
  const size_t smem = cv::smem_bytes<T>();
  const dim3 per_group(output_tiles(out), static_cast<unsigned>(cp.groups));
  if (pass == 0) {
    return tilesmith_emu::launch(per_group, dim3(cv::kThreads), smem, cv::shared_bytes,
                                 std::move(buffers), [&] { cv::conv2d_fwd_kernel<T>(cp, out); });
  }
  if (pass == 1) {
    return tilesmith_emu::launch(per_group, dim3(cv::kThreads), smem, cv::shared_bytes,
                                 std::move(buffers),
                                 [&] { cv::conv2d_dgrad_kernel<T>(cp, out); });
  }
  const dim3 grid(output_tiles(out),
                  static_cast<unsigned>(cp.groups * cp.kernel_h * cp.kernel_w),
                  static_cast<unsigned>(splits));
  return tilesmith_emu::launch(grid, dim3(cv::kThreads), smem, cv::shared_bytes,
                               std::move(buffers), [&] { cv::conv2d_wgrad_kernel<T>(cp, out); });
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
