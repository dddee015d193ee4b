// csrc/matmul/matmul_sm80.cuh's kernel on the CPU emulator, for tests/test_cuda_emulated.py.
#include "sm80_emulator.h"
// The emulator must come first: it replaces the inline PTX of mma_sm80.cuh.
#include "../../csrc/matmul/matmul_sm80.cuh"

namespace tilesmith::matmul_sm80 {
// The kernel's `extern __shared__` buffer, which block-scope extern declares in this namespace.
alignas(128) unsigned char shared_bytes[smem_bytes<float>()];
}  // namespace tilesmith::matmul_sm80

namespace {

using tilesmith::MatmulParams;
namespace mm = tilesmith::matmul_sm80;

template <typename T, typename OutT, bool kAK, bool kBN, bool kVec>
std::string run_variant(const MatmulParams& p, std::vector<tilesmith_emu::Buffer> buffers) {
  const int64_t tiles = ((p.m + mm::kBlockM - 1) / mm::kBlockM) *
                        ((p.n + mm::kBlockN - 1) / mm::kBlockN);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.batch));
  return tilesmith_emu::launch(grid, dim3(mm::kThreads), mm::smem_bytes<T>(), mm::shared_bytes,
                               std::move(buffers), [&p] {
                                 mm::matmul_kernel<T, OutT, kAK, kBN, kVec>(p, 0);
                               });
}

// The 2 x 2 x 2 x 2 layout/load/output variants of one dtype, picked at run time.
template <typename T>
std::string dispatch(const MatmulParams& p, int a_k_contiguous, int b_n_contiguous,
                     int vector_loads, std::vector<tilesmith_emu::Buffer> buffers) {
  const int index = (p.out_fp32 ? 8 : 0) | (a_k_contiguous ? 4 : 0) | (b_n_contiguous ? 2 : 0) |
                    (vector_loads ? 1 : 0);
  using Runner = std::string (*)(const MatmulParams&, std::vector<tilesmith_emu::Buffer>);
  static constexpr Runner runners[16] = {
      run_variant<T, T, false, false, false>,     run_variant<T, T, false, false, true>,
      run_variant<T, T, false, true, false>,      run_variant<T, T, false, true, true>,
      run_variant<T, T, true, false, false>,      run_variant<T, T, true, false, true>,
      run_variant<T, T, true, true, false>,       run_variant<T, T, true, true, true>,
      run_variant<T, float, false, false, false>, run_variant<T, float, false, false, true>,
      run_variant<T, float, false, true, false>,  run_variant<T, float, false, true, true>,
      run_variant<T, float, true, false, false>,  run_variant<T, float, true, false, true>,
      run_variant<T, float, true, true, false>,   run_variant<T, float, true, true, true>,
  };
  return runners[index](p, std::move(buffers));
}

}  // namespace

// dtype: 0 bfloat16, 1 float16. buffer_ptrs/buffer_bytes: the global memory cp.async may
// read. Returns 0, or 1 with the emulator's message in `error`.
extern "C" int emulate_matmul(const MatmulParams* params, int dtype, int a_k_contiguous,
                              int b_n_contiguous, int vector_loads, const void* const* buffer_ptrs,
                              const int64_t* buffer_bytes, int buffers, char* error,
                              int error_capacity) {
  auto regions = tilesmith_emu::buffers_from(buffer_ptrs, buffer_bytes, buffers);
  const std::string message =
      dtype == 0 ? dispatch<__nv_bfloat16>(*params, a_k_contiguous, b_n_contiguous, vector_loads,
                                           std::move(regions))
                 : dispatch<__half>(*params, a_k_contiguous, b_n_contiguous, vector_loads,
                                    std::move(regions));
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

// For the test's check that its ctypes mirror of MatmulParams has the same layout.
extern "C" int matmul_params_size() { return static_cast<int>(sizeof(MatmulParams)); }
