// Access patterns with known costs, for tests/test_cuda_emulated.py's check of the emulator's
// shared-memory bank and global-sector meter (MemoryTraffic in sm80_emulator.h): one warp,
// one ldmatrix.x4 or one round of 16-byte cp.async copies.
#include "sm80_emulator.h"

namespace {

alignas(1024) unsigned char shared_bytes[4096];
alignas(1024) unsigned char source[4096];

std::string run_one_warp(const std::function<void()>& kernel) {
  return tilesmith_emu::launch(dim3(1), dim3(32), sizeof shared_bytes, shared_bytes,
                               {{source, sizeof source}}, kernel);
}

int report(const std::string& message, char* error, int error_capacity) {
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}

}  // namespace

// Lane l gives row l % 8 of matrix l / 8 at (l % 8) * pitch_bytes + 16 * (l / 8), with
// `swizzle` the 16-byte chunk index XORed with the row as SwizzledTile does.
extern "C" int emulate_ldmatrix_pattern(int pitch_bytes, int swizzle, char* error,
                                        int error_capacity) {
  return report(run_one_warp([&] {
                  const int lane = static_cast<int>(threadIdx.x);
                  const int row = lane % 8, chunk = lane / 8;
                  const int offset = row * pitch_bytes + 16 * (swizzle ? chunk ^ row : chunk);
                  uint32_t frag[4];
                  tilesmith::ldmatrix_x4(frag, shared_bytes + offset);
                }),
                error, error_capacity);
}

// Lane l copies 16 bytes from source + src_offset + l * src_step to shared memory at
// l * smem_step; the lanes below `extra_lanes` then issue one more copy, which no other
// lane matches.
extern "C" int emulate_cp_async_pattern(int smem_step, int src_step, int src_offset,
                                        int extra_lanes, char* error, int error_capacity) {
  return report(run_one_warp([&] {
                  const int lane = static_cast<int>(threadIdx.x);
                  tilesmith::cp_async_16(shared_bytes + lane * smem_step,
                                         source + src_offset + lane * src_step, 16);
                  if (lane < extra_lanes) tilesmith::cp_async_16(shared_bytes, source, 16);
                  tilesmith::cp_async_commit();
                  tilesmith::cp_async_wait<0>();
                }),
                error, error_capacity);
}
