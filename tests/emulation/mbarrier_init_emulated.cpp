// Thread 0 initialises an mbarrier and loads a 64x64 tile of 16-bit values with one TMA
// counted on it; every thread of the block waits on the barrier and threads 0-63 copy a row
// of the tile out. For tests/test_cuda_emulated.py's check that the emulator
// (sm90a_emulator.h) rejects an mbarrier whose init was not published: without the
// fence.mbarrier_init that makes it visible to the TMA, or without the __syncthreads that
// makes it visible to the other threads.
#include "sm90a_emulator.h"
// The emulator must come first: it replaces the inline PTX of tma_sm90a.cuh.
#include "../../csrc/common/tma_sm90a.cuh"

namespace {

constexpr int kThreads = 128, kRows = 64, kColumns = 64;  // a row: 128 bytes
constexpr int kTileBytes = kRows * kColumns * 2;
alignas(1024) unsigned char shared_bytes[kTileBytes + 8];

enum Publication { kPublished = 0, kNoFence = 1, kNoSyncthreads = 2 };

void load_kernel(int publication, const CUtensorMap* map, uint16_t* out) {
  using namespace tilesmith;
  unsigned char* tile = shared_bytes;
  uint64_t* landed = reinterpret_cast<uint64_t*>(shared_bytes + kTileBytes);
  if (threadIdx.x == 0) {
    mbarrier_init(landed, 1);
    if (publication != kNoFence) fence_barrier_init();
  }
  if (publication != kNoSyncthreads) __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(landed, kTileBytes);
    tma_load_tile(tile, map, landed, 0, 0, 0);
  }
  mbarrier_wait(landed, 0);
  if (threadIdx.x < kRows) {
    for (int c = 0; c < kColumns; ++c) {  // undo the 128-byte swizzle
      const uint32_t logical = threadIdx.x * 128 + c * 2;
      std::memcpy(&out[threadIdx.x * kColumns + c], tile + (logical ^ (((logical >> 7) & 7) << 4)),
                  2);
    }
  }
}

}  // namespace

// Runs one block on the 64x64 row-major `source`; `out` receives the tile as the threads
// read it back. Returns 0, or 1 with the emulator's message in `error`.
extern "C" int emulate_mbarrier_init(int publication, const uint16_t* source, uint16_t* out,
                                     char* error, int error_capacity) {
  CUtensorMap map;
  const tilesmith::TileMapShape shape{source, 2, kColumns, kRows, 1, kColumns, 0, kRows};
  if (!tilesmith::encode_tile_map(&map, shape)) {
    std::snprintf(error, error_capacity, "encode_tile_map refused the shape");
    return 1;
  }
  const std::string message = tilesmith_emu::launch(
      dim3(1), dim3(kThreads), sizeof shared_bytes, shared_bytes,
      {{reinterpret_cast<const unsigned char*>(source), kTileBytes}},
      [&] { load_kernel(publication, &map, out); });
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}
