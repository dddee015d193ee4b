// csrc/conv2d/conv2d_sm90a.cuh's forward kernel on the CPU emulator, for
// tests/test_cuda_emulated.py.
#include "sm90a_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh / wgmma_sm90a.cuh.
#include "../../csrc/conv2d/conv2d_sm90a.cuh"

namespace tilesmith::conv2d_sm90a {
// The kernel's `extern __shared__` buffer, aligned as the GPU's shared window is.
alignas(1024) unsigned char shared_bytes[Tiling<256>::kSmemBytes];  // the larger of the two
}  // namespace tilesmith::conv2d_sm90a

namespace {

using tilesmith::ConvParams;
using tilesmith::MatmulParams;
namespace cv = tilesmith::conv2d_sm90a;

template <typename T, int kBlockN>
std::string launch(const ConvParams& cp, const MatmulParams& out,
                   std::vector<tilesmith_emu::Buffer> buffers) {
  const int64_t tiles = ((out.m + cv::kBlockM - 1) / cv::kBlockM) *
                        ((out.n + kBlockN - 1) / kBlockN);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(cp.groups));
  return tilesmith_emu::launch(grid, dim3(cv::kThreads), cv::Tiling<kBlockN>::kSmemBytes,
                               cv::shared_bytes, std::move(buffers),
                               [&] { cv::conv2d_fwd_kernel<T, kBlockN>(cp, out); });
}

// The tile width the launcher in conv2d_sm90a.cuh picks.
template <typename T>
std::string run(const ConvParams& cp, const MatmulParams& out,
                std::vector<tilesmith_emu::Buffer> buffers) {
  return cv::tile_width(out) == 256 ? launch<T, 256>(cp, out, std::move(buffers))
                                    : launch<T, 128>(cp, out, std::move(buffers));
}

}  // namespace

// dtype: 0 bfloat16, 1 float16. Returns 0, or 1 with the emulator's message in `error`.
extern "C" int emulate_conv2d_fwd_sm90a(int dtype, const ConvParams* conv,
                                        const MatmulParams* out, const void* const* buffer_ptrs,
                                        const int64_t* buffer_bytes, int buffers, char* error,
                                        int error_capacity) {
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const std::string message = dtype == 0
      ? run<__nv_bfloat16>(*conv, *out, std::move(regions))
      : run<__half>(*conv, *out, std::move(regions));
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}
