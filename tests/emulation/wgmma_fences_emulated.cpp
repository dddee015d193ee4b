// One warpgroup stores a 64x16 A and a 64x16 B (bf16, K-major, 128-byte swizzle) into shared
// memory with plain stores and multiplies them with one wgmma, for tests/test_cuda_emulated.py's
// check that the emulator (sm90a_emulator.h) rejects a wgmma whose operands were stored
// after the last fence.proxy.async (no fence, or the fence before the stores), and one
// issued without a wgmma.fence.
#include "sm90a_emulator.h"
// The emulator must come first: it replaces the inline PTX of wgmma_sm90a.cuh.
#include "../../csrc/common/wgmma_sm90a.cuh"

namespace {

constexpr int kThreads = 128, kRows = 64, kK = 16;
constexpr int kTileBytes = kRows * 128;  // 64 rows of 128 bytes, K along each row
alignas(1024) unsigned char shared_bytes[2 * kTileBytes];

enum Fences { kBoth = 0, kNoProxyFence = 1, kProxyFenceBeforeStores = 2, kNoWgmmaFence = 3 };

float a_value(int row, int k) { return static_cast<float>((row + 2 * k) % 7 - 3); }
float b_value(int col, int k) { return static_cast<float>((3 * col + k) % 5 - 2); }

// Element (row, k) of a K-major tile in the 128-byte swizzle (wgmma_sm90a.cuh's layout).
__nv_bfloat16* element(unsigned char* tile, int row, int k) {
  const uint32_t logical = (row / 8) * 1024 + (row % 8) * 128 + k * 2;
  return reinterpret_cast<__nv_bfloat16*>(tile + (logical ^ (((logical >> 7) & 7) << 4)));
}

void product_kernel(int fences, float* out) {
  using namespace tilesmith;
  unsigned char* a_tile = shared_bytes;
  unsigned char* b_tile = shared_bytes + kTileBytes;
  if (fences == kProxyFenceBeforeStores) fence_proxy_async_shared();
  const int row = threadIdx.x % kRows;  // threads 0-63 store a row of A, 64-127 one of B
  for (int k = 0; k < kK; ++k) {
    if (threadIdx.x < kRows) {
      *element(a_tile, row, k) = __float2bfloat16(a_value(row, k));
    } else {
      *element(b_tile, row, k) = __float2bfloat16(b_value(row, k));
    }
  }
  if (fences == kBoth || fences == kNoWgmmaFence) fence_proxy_async_shared();
  __syncthreads();
  float d[kRows / 2];
  if (fences != kNoWgmmaFence) wgmma_fence();
  wgmma_m64nk16<kRows, __nv_bfloat16, 0, 0>(d, smem_descriptor_sw128(shared_address(a_tile)),
                                            smem_descriptor_sw128(shared_address(b_tile)), 0);
  wgmma_commit();
  wgmma_wait<0>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = 0; i < kRows / 2; ++i) {
    const int r = 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
    const int c = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    out[r * kRows + c] = d[i];
  }
}

}  // namespace

// Runs one block; `out` holds the 64x64 product (row-major); `expected` receives A B^T
// computed here. Returns 0, or 1 with the emulator's message in `error`.
extern "C" int emulate_wgmma_fences(int fences, float* out, float* expected, char* error,
                                    int error_capacity) {
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kRows; ++c) {
      float sum = 0.0f;
      for (int k = 0; k < kK; ++k) sum += a_value(r, k) * b_value(c, k);
      expected[r * kRows + c] = sum;
    }
  }
  const std::string message = tilesmith_emu::launch(
      dim3(1), dim3(kThreads), sizeof shared_bytes, shared_bytes, {},
      [&] { product_kernel(fences, out); });
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}
