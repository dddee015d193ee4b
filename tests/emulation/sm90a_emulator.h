// The sm_90a instructions of csrc/common/wgmma_sm90a.cuh on the CPU emulator of
// sm80_emulator.h (read its header first: what it checks and what it cannot).
//
// wgmma is modelled as the PTX ISA describes it for operands in the 128-byte swizzle: K-major
// fp8 and 16-bit operands, and MN-major 16-bit ones (descriptor_element below); 16-bit A
// may also come from registers (issue_wgmma_m64nk16_a_registers). Each thread
// computes its own accumulators from shared memory, one fp32 fma per product.
// wgmma is asynchronous as on the GPU, at its latest: an issued wgmma joins the thread's
// open group, wgmma_commit closes the group, and wgmma_wait<N> runs the oldest committed
// groups until N remain, only then reading shared memory and the accumulators. So a kernel
// that refills a stage while a wgmma may still read it, or reads accumulators before the
// wait, computes wrong values here. wgmma reads shared memory through the async proxy, which
// sees a thread's stores (and its cp.async copies, generic proxy too) only after that
// thread's fence.proxy.async: here each fence copies the block's shared memory into the
// async proxy's view (TMA loads write both), and a wgmma that reads a byte differing from
// that view fails the launch. This finds a missing fence, and a store after the last fence;
// not a fence missing in some threads only (any thread's fence takes every thread's stores
// so far), nor a store of the byte already there. A group of wgmma whose first was issued
// without a wgmma.fence since the thread's last commit fails too (wgmma_fence below). The
// other fences are no-ops.
//
// The TMA and mbarriers (csrc/common/tma_sm90a.cuh): a tile map is the TileMapShape it was
// encoded from; a TMA load copies its box into shared memory in the 128-byte swizzle (by
// address bits, as the hardware does), zero outside the matrix, and counts its bytes on the
// mbarrier. It lands when no thread can run without it (or at issue with
// TILESMITH_EMULATOR_COPIES=early). A thread waiting on an mbarrier phase sleeps until the
// phase completes; a phase that never completes is reported as a deadlock. An mbarrier's
// init must be published: a thread other than the one that initialised it may use it only
// after a __syncthreads completed since the init, and the TMA may count bytes on it only
// after the initialising thread's fence.mbarrier_init (the TMA may otherwise see the
// barrier's memory as it was before the init). Named barriers
// (bar.sync, bar.arrive) count arrivals per phase; a block that exits with a phase part-way
// counted is an error (the turns of a kernel that take them do not balance).
#pragma once

#include <cuda.h>
#include <cuda_fp8.h>

#include "sm80_emulator.h"

#undef __grid_constant__
#define __grid_constant__
#define __syncwarp() ::tilesmith_emu::arrive_and_wait(::tilesmith_emu::warp_slots().barrier)

#include "../../csrc/common/tma_sm90a.cuh"  // TileMapShape, tile_map_fits

namespace tilesmith_emu {

inline float decode_fp8(uint8_t bits, bool e5m2) {
  const float sign = (bits & 0x80) ? -1.0f : 1.0f;
  if (e5m2) {  // the top byte of an IEEE half
    const uint16_t half_bits = static_cast<uint16_t>(bits) << 8;
    __half value;
    std::memcpy(&value, &half_bits, 2);
    return __half2float(value);
  }
  const int exponent = (bits >> 3) & 15, mantissa = bits & 7;  // e4m3fn: no inf
  if (exponent == 15 && mantissa == 7) return NAN;
  if (exponent == 0) return sign * std::ldexp(mantissa / 8.0f, -6);
  return sign * std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
}

// The shared-memory address of element (row, k) of an operand described by `desc`, in the
// 128-byte swizzle: K-major, row r at start + (r / 8) * stride + (r % 8) * 128 holds K
// along its bytes; MN-major (16-bit elements only here), rows of 64 elements of M or N, K
// row k of the column block r / 64 at start + (r / 64) * leading + (k / 8) * stride +
// (k % 8) * 128. The swizzle then XORs address bits 4-6 with bits 7-9.
inline const unsigned char* descriptor_element(uint64_t desc, int row, int k, int element_bytes,
                                               bool mn_major) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t leading = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  if ((desc >> 62) != 1) fail("wgmma: only the 128-byte swizzle is modelled");
  const int per_row = 128 / element_bytes;
  const uint32_t logical = mn_major
      ? start + (row / per_row) * leading + (k / 8) * stride + (k % 8) * 128 +
            (row % per_row) * element_bytes
      : start + (row / 8) * stride + (row % 8) * 128 + k * element_bytes;
  const uint32_t physical = logical ^ (((logical >> 7) & 7) << 4);
  if (physical + element_bytes > machine->smem_bytes) {
    fail("wgmma: descriptor reads past shared memory");
  }
  if (std::memcmp(machine->smem + physical, machine->async_view.data() + physical,
                  element_bytes) != 0) {
    fail("wgmma: reads shared memory at offset " + std::to_string(physical) +
         " written by a store or cp.async after the last fence.proxy.async");
  }
  return machine->smem + physical;
}

inline uint8_t descriptor_byte(uint64_t desc, int row, int k) {
  return *descriptor_element(desc, row, k, 1, false);
}

template <typename T>
float descriptor_float(uint64_t desc, int row, int k, bool mn_major) {
  T value;
  std::memcpy(&value, descriptor_element(desc, row, k, 2, mn_major), 2);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(value);
  } else {
    return __half2float(value);
  }
}

// d (+)= A B for this thread's accumulators of an m64nNkK wgmma: element i is row
// 16 warp + lane / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + i % 2, and
// a(row, k) / b(col, k) read the operands' elements, summed k = 0, 1, ... by fp32 fma.
template <int kN, int kK, typename ElementA, typename ElementB>
void run_wgmma(float (&d)[kN / 2], int accumulate, ElementA&& a, ElementB&& b) {
  const int rank = thread_rank();
  const int warp = (rank / 32) % 4, lane = rank % 32;
  for (int i = 0; i < kN / 2; ++i) {
    const int row = 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
    const int col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    float sum = accumulate ? d[i] : 0.0f;
    for (int k = 0; k < kK; ++k) sum = std::fma(a(row, k), b(col, k), sum);
    d[i] = sum;
  }
}

template <int kN, typename A, typename B>
void run_wgmma_m64nk32(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  constexpr bool a_e5m2 = std::is_same_v<A, __nv_fp8_e5m2>;
  constexpr bool b_e5m2 = std::is_same_v<B, __nv_fp8_e5m2>;
  run_wgmma<kN, 32>(
      d, accumulate,
      [&](int row, int k) { return decode_fp8(descriptor_byte(desc_a, row, k), a_e5m2); },
      [&](int col, int k) { return decode_fp8(descriptor_byte(desc_b, col, k), b_e5m2); });
}

template <int kN, typename T, int kMnMajorA, int kMnMajorB>
void run_wgmma_m64nk16(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  run_wgmma<kN, 16>(
      d, accumulate,
      [&](int row, int k) { return descriptor_float<T>(desc_a, row, k, kMnMajorA); },
      [&](int col, int k) { return descriptor_float<T>(desc_b, col, k, kMnMajorB); });
}

// wgmma.fence must come before the first wgmma, and between a thread's own access to
// registers (accumulators, A fragments) and a wgmma that uses them. The emulator cannot see
// register accesses, so it asks for the fence before every group's first wgmma, as our
// kernels issue them.
inline void wgmma_fence() { self().wgmma_fenced = true; }

inline void issue(std::function<void()> wgmma) {
  Fiber& fiber = self();
  if (fiber.async_open.empty() && !fiber.wgmma_fenced) {
    fail("wgmma: a group's first wgmma issued without a wgmma.fence since the last commit");
  }
  fiber.async_open.push_back(std::move(wgmma));
}

// wgmma with A from registers: the warp's lanes exchange their A fragments at issue (the
// instruction is warp-synchronous), and the product runs at the wait like any wgmma. The
// registers are read at issue here; on the GPU they are read later, and a kernel that
// changed them before the wait would be wrong there and not here (ptxas keeps them alive
// for code that does not).
template <int kN, typename T, int kMnMajorB>
void issue_wgmma_m64nk16_a_registers(float (&d)[kN / 2], const uint32_t (&a)[4],
                                     uint64_t desc_b, int accumulate) {
  WarpSlots& w = warp_slots();
  for (int i = 0; i < 4; ++i) w.a[lane_id()][i] = a[i];
  arrive_and_wait(w.barrier);
  struct WarpRows {
    float values[16][16];  // this warp's 16 rows of A
  } rows;
  fragment_a_matrix<T>(w, rows.values);
  arrive_and_wait(w.barrier);
  issue([&d, rows, desc_b, accumulate] {
    run_wgmma<kN, 16>(
        d, accumulate, [&](int row, int k) { return rows.values[row % 16][k]; },
        [&](int col, int k) { return descriptor_float<T>(desc_b, col, k, kMnMajorB); });
  });
}

inline void wgmma_commit() {
  Fiber& fiber = self();
  fiber.async_committed.push_back(std::move(fiber.async_open));
  fiber.async_open.clear();
  fiber.wgmma_fenced = false;
}

// fence.proxy.async.shared::cta: the stores so far become visible to the async proxy.
inline void fence_proxy_async_shared() {
  std::memcpy(machine->async_view.data(), machine->smem, machine->smem_bytes);
}

inline void wgmma_wait(int pending_groups) {
  Fiber& fiber = self();
  while (static_cast<int>(fiber.async_committed.size()) > pending_groups) {
    for (const std::function<void()>& op : fiber.async_committed.front()) op();
    fiber.async_committed.pop_front();
  }
}

// ---- mbarriers and the TMA ------------------------------------------------------------------

struct EmulatedTileMap {
  tilesmith::TileMapShape shape;
  int64_t batches;  // 1 where the map reads matrix 0 for every batch entry
  int64_t groups;   // likewise, for the groups of a rank-4 map
};
static_assert(sizeof(EmulatedTileMap) <= sizeof(CUtensorMap), "fits the opaque tile map");

inline MBarrier& mbarrier_at(const uint64_t* barrier) {
  if (!in_shared(barrier, 8) || reinterpret_cast<uintptr_t>(barrier) % 8 != 0) {
    fail("mbarrier: " + hex(barrier) + " not an 8-byte aligned shared-memory address");
  }
  const uint32_t offset = static_cast<uint32_t>(
      reinterpret_cast<const unsigned char*>(barrier) - machine->smem);
  auto found = machine->mbarriers.find(offset);
  if (found == machine->mbarriers.end()) fail("mbarrier used before mbarrier.init");
  MBarrier& b = found->second;
  if (thread_rank() != b.init_thread && machine->block_barrier.generation == b.init_generation) {
    fail("mbarrier used before a __syncthreads published its mbarrier.init (by thread " +
         std::to_string(b.init_thread) + ")");
  }
  return b;
}

inline void complete_phase_if_done(MBarrier& b) {
  if (b.pending == 0 && b.tx_bytes == 0) {
    ++b.completed;
    b.pending = b.count;
  }
}

inline void mbarrier_init(uint64_t* barrier, int count) {
  if (!in_shared(barrier, 8) || reinterpret_cast<uintptr_t>(barrier) % 8 != 0) {
    fail("mbarrier.init: " + hex(barrier) + " not an 8-byte aligned shared-memory address");
  }
  if (count < 1) fail("mbarrier.init: count " + std::to_string(count));
  const uint32_t offset = static_cast<uint32_t>(
      reinterpret_cast<const unsigned char*>(barrier) - machine->smem);
  machine->mbarriers[offset] =
      MBarrier{count, count, 0, 0, thread_rank(), machine->block_barrier.generation, false};
}

// fence.mbarrier_init: the thread's mbarrier.init so far become visible to the TMA, which
// counts its bytes on them through the async proxy.
inline void fence_barrier_init() {
  for (auto& [offset, b] : machine->mbarriers) {
    if (b.init_thread == thread_rank()) b.init_fenced = true;
  }
}

inline void mbarrier_arrive(uint64_t* barrier, uint32_t expect_bytes) {
  MBarrier& b = mbarrier_at(barrier);
  b.tx_bytes += expect_bytes;
  if (--b.pending < 0) fail("mbarrier: more arrivals than its count in one phase");
  complete_phase_if_done(b);
}

inline void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  const MBarrier& b = mbarrier_at(barrier);
  if (b.completed_parity(parity)) return;
  Fiber& fiber = self();
  fiber.waiting_on_mbarrier = &b;
  fiber.waiting_parity = parity;
  yield();
  fiber.waiting_on_mbarrier = nullptr;
}

inline void tma_load_tile(void* dst, const CUtensorMap* map, uint64_t* barrier, int inner,
                          int outer, int batch, int group) {
  EmulatedTileMap tile_map;
  std::memcpy(&tile_map, map, sizeof tile_map);
  const tilesmith::TileMapShape& s = tile_map.shape;
  const int row_elements = 128 / s.element_bytes;
  const size_t box_bytes = static_cast<size_t>(128) * s.box_outer;
  if (!in_shared(dst, box_bytes) || reinterpret_cast<uintptr_t>(dst) % 1024 != 0) {
    fail("TMA: destination " + hex(dst) + " (" + std::to_string(box_bytes) +
         " bytes) out of shared memory or not 1024-byte aligned");
  }
  if (batch < 0 || batch >= tile_map.batches) {
    fail("TMA: batch coordinate " + std::to_string(batch) + " of a map with " +
         std::to_string(tile_map.batches));
  }
  if (group < 0 || group >= tile_map.groups) {
    fail("TMA: group coordinate " + std::to_string(group) + " of a map with " +
         std::to_string(tile_map.groups));
  }
  const uint32_t base = static_cast<uint32_t>(static_cast<unsigned char*>(dst) - machine->smem);
  MBarrier* landed = &mbarrier_at(barrier);  // must exist at issue
  if (!landed->init_fenced) {
    fail("TMA: counts its bytes on an mbarrier whose init thread " +
         std::to_string(landed->init_thread) + " has not fenced it (fence.mbarrier_init)");
  }
  // Returns "" or what went wrong (it may run in the scheduler, outside any thread).
  auto land_copy = [tile_map, base, landed, inner, outer, batch, group, row_elements,
                    box_bytes]() -> std::string {
    const tilesmith::TileMapShape& s = tile_map.shape;
    for (int r = 0; r < s.box_outer; ++r) {
      for (int c = 0; c < row_elements; ++c) {
        const int64_t x = int64_t{inner} + c, y = int64_t{outer} + r;
        const uint32_t logical = base + r * 128 + c * s.element_bytes;
        const uint32_t physical = logical ^ (((logical >> 7) & 7) << 4);
        unsigned char* out = machine->smem + physical;
        unsigned char* async_out = machine->async_view.data() + physical;
        if (x < 0 || x >= s.inner || y < 0 || y >= s.outer) {
          std::memset(out, 0, s.element_bytes);
          std::memset(async_out, 0, s.element_bytes);
          continue;
        }
        const unsigned char* src =
            static_cast<const unsigned char*>(s.base) +
            (group * s.group_stride + batch * s.batch_stride + y * s.outer_stride + x) *
                s.element_bytes;
        if (!in_global(src, s.element_bytes)) {
          return "TMA: reads " + hex(src) + " outside every buffer";
        }
        std::memcpy(out, src, s.element_bytes);
        std::memcpy(async_out, src, s.element_bytes);
      }
    }
    landed->tx_bytes -= static_cast<int64_t>(box_bytes);
    complete_phase_if_done(*landed);
    return "";
  };
  if (machine->copies_land_at_issue) {
    const std::string error = land_copy();
    if (!error.empty()) fail(error);
  } else {
    machine->bulk_copies.push_back(land_copy);
  }
}

// Named barrier `id` for a phase of `threads` threads: ids 1-15 (0 is __syncthreads'),
// whole warps, and one count for every arrival of a phase.
inline Barrier& named_barrier(int id, int threads) {
  const int block_threads =
      static_cast<int>(machine->block_dim.x * machine->block_dim.y * machine->block_dim.z);
  if (id < 1 || id > 15) fail("bar: barrier id " + std::to_string(id) + " outside 1-15");
  if (threads <= 0 || threads % 32 != 0 || threads > block_threads) {
    fail("bar: " + std::to_string(threads) + " threads in a block of " +
         std::to_string(block_threads));
  }
  Barrier& b = machine->named_barriers[id];
  if (b.arrived == 0) {
    b.size = threads;
  } else if (b.size != threads) {
    fail("bar: barrier " + std::to_string(id) + " phase of " + std::to_string(b.size) +
         " threads reached with a count of " + std::to_string(threads));
  }
  return b;
}
inline void named_barrier_sync(int id, int threads) {
  arrive_and_wait(named_barrier(id, threads));
}
inline void named_barrier_arrive(int id, int threads) {
  Barrier& b = named_barrier(id, threads);
  if (++b.arrived == b.size) {
    b.arrived = 0;
    ++b.generation;
  }
}

}  // namespace tilesmith_emu

namespace tilesmith {
// The tile map holds the shape itself here (tma_load_tile reads it back).
inline bool encode_tile_map_4d(CUtensorMap* map, const TileMapShape& s) {
  if (!tile_map_fits(s)) return false;
  std::memset(map, 0, sizeof *map);
  const tilesmith_emu::EmulatedTileMap emulated{s, tile_map_batched(s) ? s.batches : 1,
                                                tile_map_grouped(s) ? s.groups : 1};
  std::memcpy(map, &emulated, sizeof emulated);
  return true;
}
inline bool encode_tile_map(CUtensorMap* map, const TileMapShape& s) {
  return s.groups == 1 && encode_tile_map_4d(map, s);
}
inline void mbarrier_init(uint64_t* barrier, int count) {
  tilesmith_emu::mbarrier_init(barrier, count);
}
inline void fence_barrier_init() { tilesmith_emu::fence_barrier_init(); }
inline void mbarrier_arrive(uint64_t* barrier) { tilesmith_emu::mbarrier_arrive(barrier, 0); }
inline void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  tilesmith_emu::mbarrier_arrive(barrier, bytes);
}
inline void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  tilesmith_emu::mbarrier_wait(barrier, parity);
}
inline void tma_load_tile(void* dst, const CUtensorMap* map, uint64_t* barrier, int inner,
                          int outer, int batch) {
  tilesmith_emu::tma_load_tile(dst, map, barrier, inner, outer, batch, 0);
}
inline void tma_load_tile_4d(void* dst, const CUtensorMap* map, uint64_t* barrier, int inner,
                             int outer, int batch, int group) {
  tilesmith_emu::tma_load_tile(dst, map, barrier, inner, outer, batch, group);
}
inline void prefetch_tile_map(const CUtensorMap*) {}
template <int kRegisters>
inline void warpgroup_release_registers() {}
template <int kRegisters>
inline void warpgroup_claim_registers() {}
template <int kId, int kThreads>
inline void named_barrier_sync() {
  tilesmith_emu::named_barrier_sync(kId, kThreads);
}
template <int kId, int kThreads>
inline void named_barrier_arrive() {
  tilesmith_emu::named_barrier_arrive(kId, kThreads);
}

template <typename A, typename B>
inline void wgmma_m64n128k32(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  tilesmith_emu::issue([&d, desc_a, desc_b, accumulate] {
    tilesmith_emu::run_wgmma_m64nk32<128, A, B>(d, desc_a, desc_b, accumulate);
  });
}
template <typename A, typename B>
inline void wgmma_m64n256k32(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  tilesmith_emu::issue([&d, desc_a, desc_b, accumulate] {
    tilesmith_emu::run_wgmma_m64nk32<256, A, B>(d, desc_a, desc_b, accumulate);
  });
}
template <int kN, typename T, int kMnMajorA, int kMnMajorB>
inline void wgmma_m64nk16(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  tilesmith_emu::issue([&d, desc_a, desc_b, accumulate] {
    tilesmith_emu::run_wgmma_m64nk16<kN, T, kMnMajorA, kMnMajorB>(d, desc_a, desc_b, accumulate);
  });
}
template <int kN, typename T, int kMnMajorB>
inline void wgmma_m64nk16_a_registers(float (&d)[kN / 2], const uint32_t (&a)[4],
                                      uint64_t desc_b, int accumulate) {
  tilesmith_emu::issue_wgmma_m64nk16_a_registers<kN, T, kMnMajorB>(d, a, desc_b, accumulate);
}
inline void wgmma_fence() { tilesmith_emu::wgmma_fence(); }
template <int kCount>
inline void fence_registers(float (&)[kCount]) {}  // compiler ordering only
inline void wgmma_commit() { tilesmith_emu::wgmma_commit(); }
template <int kPending>
inline void wgmma_wait() {
  tilesmith_emu::wgmma_wait(kPending);
}
inline void fence_proxy_async_shared() { tilesmith_emu::fence_proxy_async_shared(); }
}  // namespace tilesmith
