// csrc/fp8/scaled_gemm_sm90a.cuh's kernels (cp.async, and TMA + warp specialization) on the CPU
// emulator, for tests/test_cuda_emulated.py.
#include "sm90a_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh / wgmma_sm90a.cuh.
#include "../../csrc/fp8/scaled_gemm_sm90a.cuh"

namespace tilesmith::fp8_sm90a {
// The kernels' `extern __shared__` buffer, aligned as the GPU's shared window is: the
// largest any of them asks for.
alignas(1024) unsigned char shared_bytes[std::max(Tiling<256>::kSmemBytes,
                                                  std::max(TmaTiling<128>::kSmemBytes,
                                                           TmaTiling<256>::kSmemBytes))];
}  // namespace tilesmith::fp8_sm90a

namespace {

using tilesmith::ScaledGemmParams;
namespace f8 = tilesmith::fp8_sm90a;

template <typename A, typename B, int kBlockN, bool kBlockScaled>
std::string launch(const ScaledGemmParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  const int64_t tiles = ((p.m + f8::kBlockM - 1) / f8::kBlockM) *
                        ((p.n + kBlockN - 1) / kBlockN);
  return tilesmith_emu::launch(dim3(static_cast<unsigned>(tiles)), dim3(f8::kThreads),
                               f8::Tiling<kBlockN>::kSmemBytes, f8::shared_bytes,
                               std::move(buffers), [&] {
                                 f8::scaled_gemm_kernel<A, B, kBlockN, kBlockScaled>(p);
                               });
}

// The TMA kernel on `blocks` persistent blocks (0: the cp.async kernel, one block per tile).
template <typename A, typename B, int kBlockN, bool kBlockScaled>
std::string launch(const ScaledGemmParams& p, int blocks,
                   std::vector<tilesmith_emu::Buffer> buffers) {
  if (blocks == 0) return launch<A, B, kBlockN, kBlockScaled>(p, std::move(buffers));
  f8::TmaArguments args;
  if (!f8::describe_operands<kBlockN>(p, args)) return "no tile map";
  return tilesmith_emu::launch(dim3(blocks), dim3(tilesmith::kRingThreads),
                               f8::TmaTiling<kBlockN>::kSmemBytes, f8::shared_bytes,
                               std::move(buffers), [&] {
                                 f8::scaled_gemm_tma_kernel<A, B, kBlockN, kBlockScaled>(args);
                               });
}

// The kernel variant the launcher in scaled_gemm_sm90a.cuh picks.
template <typename A, typename B>
std::string run(const ScaledGemmParams& p, int blocks,
                std::vector<tilesmith_emu::Buffer> buffers) {
  if (p.scale_a_kind == tilesmith::ScaleKind::kBlock) {
    return launch<A, B, 128, true>(p, blocks, std::move(buffers));
  }
  return f8::tile_width(p) == 256 ? launch<A, B, 256, false>(p, blocks, std::move(buffers))
                                  : launch<A, B, 128, false>(p, blocks, std::move(buffers));
}

}  // namespace

// a_e5m2 / b_e5m2: the operands' fp8 formats (e4m3fn otherwise); tma_blocks: 0 for the
// cp.async kernel, else the TMA kernel on that many blocks. Returns 0, or 1 with the
// emulator's message in `error`.
extern "C" int emulate_scaled_gemm(const ScaledGemmParams* params, int a_e5m2, int b_e5m2,
                                   int tma_blocks, const void* const* buffer_ptrs,
                                   const int64_t* buffer_bytes, int buffers, char* error,
                                   int error_capacity) {
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  using E4 = __nv_fp8_e4m3;
  using E5 = __nv_fp8_e5m2;
  std::string message;
  if (a_e5m2) {
    message = b_e5m2 ? run<E5, E5>(*params, tma_blocks, regions)
                     : run<E5, E4>(*params, tma_blocks, regions);
  } else {
    message = b_e5m2 ? run<E4, E5>(*params, tma_blocks, regions)
                     : run<E4, E4>(*params, tma_blocks, regions);
  }
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// For the test's check that its ctypes mirror of ScaledGemmParams has the same layout.
extern "C" int scaled_gemm_params_size() { return static_cast<int>(sizeof(ScaledGemmParams)); }
