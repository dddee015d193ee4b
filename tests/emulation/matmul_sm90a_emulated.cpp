// csrc/matmul/matmul_sm90a.cuh's (cp.async) and matmul_tma_sm90a.cuh's (TMA, warp-specialized)
// kernels on the CPU emulator, for tests/test_cuda_emulated.py.
#include "sm90a_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh / wgmma_sm90a.cuh.
#include "../../csrc/matmul/matmul_tma_sm90a.cuh"

// The kernels' `extern __shared__` buffers, aligned as the GPU's shared window is.
namespace tilesmith::matmul_sm90a {
alignas(1024) unsigned char shared_bytes[Tiling<256>::kSmemBytes];  // the larger of the two
}  // namespace tilesmith::matmul_sm90a
namespace tilesmith::matmul_tma_sm90a {
alignas(1024) unsigned char shared_bytes[std::max(Tiling<128>::kSmemBytes,
                                                  Tiling<256>::kSmemBytes)];
}  // namespace tilesmith::matmul_tma_sm90a

namespace {

using tilesmith::MatmulParams;
namespace mm = tilesmith::matmul_sm90a;

template <typename T, typename OutT, int kBlockN, bool kMnMajorA, bool kMnMajorB>
std::string launch(const MatmulParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  const int64_t tiles = ((p.m + mm::kBlockM - 1) / mm::kBlockM) * ((p.n + kBlockN - 1) / kBlockN);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.batch));
  return tilesmith_emu::launch(grid, dim3(mm::kThreads), mm::Tiling<kBlockN>::kSmemBytes,
                               mm::shared_bytes, std::move(buffers), [&p] {
                                 mm::matmul_kernel<T, OutT, kBlockN, kMnMajorA, kMnMajorB>(p, 0);
                               });
}

// The variant the launcher in matmul_sm90a.cuh picks.
template <typename T, typename OutT, int kBlockN>
std::string run_layout(const MatmulParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  if (mm::mn_major_a(p)) {
    return mm::mn_major_b(p) ? launch<T, OutT, kBlockN, true, true>(p, std::move(buffers))
                             : launch<T, OutT, kBlockN, true, false>(p, std::move(buffers));
  }
  return mm::mn_major_b(p) ? launch<T, OutT, kBlockN, false, true>(p, std::move(buffers))
                           : launch<T, OutT, kBlockN, false, false>(p, std::move(buffers));
}

template <typename T, typename OutT>
std::string run(const MatmulParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  return mm::tile_width(p) == 256 ? run_layout<T, OutT, 256>(p, std::move(buffers))
                                  : run_layout<T, OutT, 128>(p, std::move(buffers));
}

template <typename T>
std::string run_dtype(const MatmulParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  return p.out_fp32 ? run<T, float>(p, std::move(buffers)) : run<T, T>(p, std::move(buffers));
}

namespace tma = tilesmith::matmul_tma_sm90a;

// The TMA kernel on `blocks` persistent blocks (fewer than the tiles, so that each walks
// several and the mbarrier phases wrap).
template <typename T, typename OutT, int kBlockN, bool kMnMajorA, bool kMnMajorB>
std::string launch_tma(const tma::Arguments& args, int blocks,
                       std::vector<tilesmith_emu::Buffer> buffers) {
  return tilesmith_emu::launch(dim3(blocks), dim3(tilesmith::kRingThreads),
                               tma::Tiling<kBlockN>::kSmemBytes, tma::shared_bytes,
                               std::move(buffers), [&args] {
                                 tma::matmul_tma_kernel<T, OutT, kBlockN, kMnMajorA, kMnMajorB>(
                                     args);
                               });
}

template <typename T, typename OutT, int kBlockN>
std::string run_tma_layout(const MatmulParams& p, int blocks,
                           std::vector<tilesmith_emu::Buffer> buffers) {
  tma::Arguments args;
  if (!tma::describe_operands<kBlockN>(p, args)) return "no tile map";
  if (mm::mn_major_a(p)) {
    return mm::mn_major_b(p)
               ? launch_tma<T, OutT, kBlockN, true, true>(args, blocks, std::move(buffers))
               : launch_tma<T, OutT, kBlockN, true, false>(args, blocks, std::move(buffers));
  }
  return mm::mn_major_b(p)
             ? launch_tma<T, OutT, kBlockN, false, true>(args, blocks, std::move(buffers))
             : launch_tma<T, OutT, kBlockN, false, false>(args, blocks, std::move(buffers));
}

template <typename T, typename OutT>
std::string run_tma(const MatmulParams& p, int blocks, std::vector<tilesmith_emu::Buffer> buffers) {
  return mm::tile_width(p) == 256 ? run_tma_layout<T, OutT, 256>(p, blocks, std::move(buffers))
                                  : run_tma_layout<T, OutT, 128>(p, blocks, std::move(buffers));
}

}  // namespace

// The TMA kernel (matmul_tma_sm90a.cuh) on `blocks` blocks; returns as emulate_matmul_sm90a,
// 2 where the TMA cannot read the operands (describe_operands).
extern "C" int emulate_matmul_tma_sm90a(const MatmulParams* params, int dtype, int blocks,
                                        const void* const* buffer_ptrs,
                                        const int64_t* buffer_bytes, int buffers, char* error,
                                        int error_capacity) {
  tma::Arguments probe;
  if (!mm::takes(*params) || !tma::describe_operands<128>(*params, probe)) return 2;
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const MatmulParams& p = *params;
  std::string message;
  if (dtype == 0) {
    message = p.out_fp32 ? run_tma<__nv_bfloat16, float>(p, blocks, std::move(regions))
                         : run_tma<__nv_bfloat16, __nv_bfloat16>(p, blocks, std::move(regions));
  } else {
    message = p.out_fp32 ? run_tma<__half, float>(p, blocks, std::move(regions))
                         : run_tma<__half, __half>(p, blocks, std::move(regions));
  }
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// dtype: 0 bfloat16, 1 float16. Returns 0, or 1 with the emulator's message in `error`;
// 2 where the kernels do not take these operands (matmul_sm90a::takes), launching nothing.
extern "C" int emulate_matmul_sm90a(const MatmulParams* params, int dtype,
                                    const void* const* buffer_ptrs, const int64_t* buffer_bytes,
                                    int buffers, char* error, int error_capacity) {
  if (!mm::takes(*params)) return 2;
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const std::string message = dtype == 0
      ? run_dtype<__nv_bfloat16>(*params, std::move(regions))
      : run_dtype<__half>(*params, std::move(regions));
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// The tile width the launcher picks for n, for the tests' choice of shapes.
extern "C" int matmul_sm90a_tile_width(int64_t n) {
  MatmulParams p{};
  p.n = n;
  return mm::tile_width(p);
}
