// A CPU stand-in for the sm_80 features tilesmith's CUDA kernels use, so that their index
// arithmetic (fragment layouts, swizzles, tile edges, pipeline stages, masking, the online
// softmax) can be tested on machines without a GPU. Test infrastructure only: nothing under
// python/ or csrc/ depends on it beyond the `TILESMITH_CPU_EMULATION` switch that makes
// csrc/common/mma_sm80.cuh leave its inline PTX to this file.
//
// How it works. The kernel source is compiled as ordinary C++ by the host compiler. Every
// CUDA thread of a block is a ucontext fiber; blocks run one after another. Fibers switch
// only at barriers (__syncthreads, and the warp barriers inside the collective
// instructions), so a run is deterministic. Warp-collective instructions (ldmatrix,
// mma.sync, shfl) exchange values through per-warp slots between two warp barriers, and
// compute each lane's result from the PTX ISA's description of the fragment layouts.
// cp.async copies are queued and only carried out by the cp.async.wait_group that must
// cover them, so a kernel that reads a stage too early reads stale shared memory. With
// TILESMITH_EMULATOR_COPIES=early in the environment they land at issue instead, the other
// extreme the hardware allows: then a kernel that refills a stage while some thread (or an
// asynchronous wgmma) may still read it reads the new data too soon.
// Addresses given to cp.async (global and shared) and to ldmatrix are bounds- and
// alignment-checked; errors end the launch with a message instead of crashing.
// The order in which runnable fibers take their turns is thread order, or with
// TILESMITH_EMULATOR_ORDER=reverse the reverse, or with =shuffle a new random order at each
// turn (seeded by TILESMITH_EMULATOR_SEED, default 0: reproducible). A missing barrier
// between one thread's write to shared memory and another's read of it gives stale data
// in one of the first two orders (the reader ran first), so running a test under both
// finds it.
//
// What it meters of speed: how the warp-wide accesses it sees use shared memory's banks and
// global memory's sectors (MemoryTraffic below: ldmatrix, and cp.async paired across a
// warp's lanes by their order of issue).
// What it cannot show: speed itself, races between threads other than through the turn order
// (fibers never interleave between barriers, nor inside a turn), register pressure or
// spills (read the ptxas report for those), and mistakes in
// my reading of the PTX ISA: it implements the ISA as I read it, so it checks the kernels
// against that reading and not against the silicon. A kernel that passes here still has to
// pass the same tests on a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#define TILESMITH_CPU_EMULATION 1

// CUDA's keywords become plain C++. Only dynamic shared memory (`extern __shared__`) is
// supported: a static __shared__ array would become one copy per fiber.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

namespace tilesmith_emu {

struct CopyOp {
  void* dst;
  const void* src;
  int bytes;  // read from src; the rest of the 16 are zero-filled
};

struct Barrier {
  int size = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

// An mbarrier of sm90a_emulator.h: the arrivals its phases take, those still due in the
// current one, the transaction bytes still to land, and how many phases have completed.
struct MBarrier {
  int count = 0, pending = 0;
  int64_t tx_bytes = 0;
  uint32_t completed = 0;
  // Its publication: the thread that initialised it, the block barrier's generation then,
  // and whether that thread has fenced the init for the TMA (fence.mbarrier_init) since.
  int init_thread = -1;
  uint64_t init_generation = 0;
  bool init_fenced = false;
  // Whether the phase of parity `parity` has completed (mbarrier.try_wait.parity): the
  // latest completed phase has that parity; before the first, "phase -1" (parity 1) has.
  bool completed_parity(uint32_t parity) const { return ((completed - 1) & 1) == parity; }
};

struct Fiber {
  ucontext_t context{};
  std::unique_ptr<char[]> stack;
  uint3 thread_idx{};
  bool finished = false;
  Barrier* waiting_on = nullptr;
  uint64_t waiting_generation = 0;
  const MBarrier* waiting_on_mbarrier = nullptr;  // with the parity it waits for
  uint32_t waiting_parity = 0;
  std::vector<CopyOp> open_group;                // cp.async issued since the last commit
  uint64_t cp_async_issued = 0;                  // in this block: the next one's ordinal
  std::deque<std::vector<CopyOp>> committed;     // oldest first
  // Asynchronous operations of sm90a_emulator.h (wgmma): queued at issue, run when a wait
  // retires their group, so that they read shared memory as late as the hardware may.
  std::vector<std::function<void()>> async_open;
  std::deque<std::vector<std::function<void()>>> async_committed;
  bool wgmma_fenced = false;  // a wgmma.fence since the last wgmma.commit_group
};

// The n-th cp.async of each lane of a warp: one warp-wide instruction on the GPU.
struct WarpCopies {
  uint32_t lanes = 0;  // those that have issued it
  uint32_t smem_offset[32];
  const unsigned char* src[32];
  int bytes[32];
};

// What one warp's lanes deposit for a collective instruction.
struct WarpSlots {
  Barrier barrier;
  const unsigned char* address[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  uint64_t value[32];
  std::map<uint64_t, WarpCopies> copies;  // by ordinal, until every lane has issued it
};

struct Buffer {
  const unsigned char* begin;
  size_t bytes;
};

struct Machine {
  dim3 grid_dim, block_dim;
  uint3 block_idx{};
  std::vector<Fiber> fibers;
  std::vector<WarpSlots> warps;
  Barrier block_barrier;
  Barrier named_barriers[16];  // bar.sync / bar.arrive of sm90a_emulator.h; 0 is unused
  int current = -1;
  ucontext_t scheduler{};
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Buffer> buffers;  // global memory the kernel may read with cp.async
  bool copies_land_at_issue = false;  // TILESMITH_EMULATOR_COPIES=early (see the header)
  // sm90a_emulator.h: the block's mbarriers by shared-memory offset, and the TMA copies
  // issued and not landed (they land when no thread can run without them, or at issue
  // with TILESMITH_EMULATOR_COPIES=early).
  std::map<uint32_t, MBarrier> mbarriers;
  std::vector<std::function<std::string()>> bulk_copies;  // each returns "" or an error
  // sm90a_emulator.h: the block's shared memory as the async proxy (wgmma) may see it: as
  // it was at the latest fence.proxy.async, with the TMA's writes (async proxy) since.
  std::vector<unsigned char> async_view;
  std::function<void()> body;
  std::string error;
};

inline Machine* machine = nullptr;

inline Fiber& self() { return machine->fibers[machine->current]; }
inline int thread_rank() {
  const uint3 t = self().thread_idx;
  return static_cast<int>(t.x + machine->block_dim.x * (t.y + machine->block_dim.y * t.z));
}
inline int lane_id() { return thread_rank() % 32; }
inline WarpSlots& warp_slots() { return machine->warps[thread_rank() / 32]; }

inline void yield() { swapcontext(&self().context, &machine->scheduler); }

// Records the first error and abandons the launch: every fiber is marked finished and control
// goes back to the scheduler, which returns the message to the caller.
[[noreturn]] inline void fail(const std::string& message) {
  if (machine->error.empty()) {
    const uint3 t = self().thread_idx;
    const uint3 b = machine->block_idx;
    machine->error = message + " (block " + std::to_string(b.x) + "," + std::to_string(b.y) +
                     "," + std::to_string(b.z) + ", thread " + std::to_string(t.x) + ")";
  }
  for (Fiber& f : machine->fibers) f.finished = true;
  yield();
  __builtin_unreachable();
}

inline void arrive_and_wait(Barrier& barrier) {
  if (++barrier.arrived == barrier.size) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  Fiber& fiber = self();
  fiber.waiting_on = &barrier;
  fiber.waiting_generation = barrier.generation;
  yield();
  fiber.waiting_on = nullptr;
}

inline bool in_shared(const void* ptr, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(ptr);
  return p >= machine->smem && p + bytes <= machine->smem + machine->smem_bytes;
}

inline bool in_global(const void* ptr, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(ptr);
  for (const Buffer& b : machine->buffers) {
    if (p >= b.begin && p + bytes <= b.begin + b.bytes) return true;
  }
  return false;
}

inline std::string hex(const void* ptr) {
  char text[32];
  std::snprintf(text, sizeof text, "%p", ptr);
  return text;
}

// ---- shared-memory banks and global-memory sectors ----------------------------------------

// Summed over this library's launches until tilesmith_emulator_traffic_reset() (static: each
// emulated kernel library keeps its own). Shared memory has 32 banks of 4 bytes; a 16-byte
// access covers the 4 of its "bank quad" (address / 16 mod 8). ldmatrix.x4 reads its four
// matrices in four phases of 8 row addresses, and a warp's 16-byte cp.async stores go in
// four phases of 8 lanes: a phase takes one wavefront per distinct 16-byte chunk in its most
// crowded bank quad, so one when it is conflict-free. Global memory moves 32-byte sectors:
// a warp's cp.async reads every sector its lanes' bytes touch, at best (contiguous, aligned)
// bytes / 32 of them.
struct MemoryTraffic {
  uint64_t ldmatrix_phases = 0, ldmatrix_wavefronts = 0;
  uint64_t cp_async_phases = 0, cp_async_wavefronts = 0;
  uint64_t cp_async_instructions = 0, cp_async_bytes = 0, cp_async_sectors = 0;
  // Lanes whose n-th cp.async had no partner in some other lane of the warp: a warp whose
  // lanes issue different numbers of copies, which the matching above cannot pair.
  uint64_t cp_async_unmatched_lanes = 0;
};
static MemoryTraffic traffic;

// Wavefronts for one phase of 16-byte shared-memory accesses at these offsets.
inline int bank_wavefronts(const uint32_t* offsets, int count) {
  uint32_t chunks[8][8];
  int distinct[8] = {};
  for (int i = 0; i < count; ++i) {
    const uint32_t chunk = offsets[i] / 16;
    uint32_t* quad = chunks[chunk % 8];
    int& n = distinct[chunk % 8];
    if (std::find(quad, quad + n, chunk) == quad + n) quad[n++] = chunk;
  }
  return std::max(1, *std::max_element(distinct, distinct + 8));
}

inline void count_warp_copies(const WarpCopies& c) {
  traffic.cp_async_instructions += 1;
  for (int phase = 0; phase < 4; ++phase) {
    uint32_t offsets[8];
    int count = 0;
    for (int lane = 8 * phase; lane < 8 * phase + 8; ++lane) {
      if (c.lanes >> lane & 1) offsets[count++] = c.smem_offset[lane];
    }
    if (count == 0) continue;
    traffic.cp_async_phases += 1;
    traffic.cp_async_wavefronts += bank_wavefronts(offsets, count);
  }
  std::vector<uintptr_t> sectors;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(c.lanes >> lane & 1) || c.bytes[lane] == 0) continue;
    const uintptr_t first = reinterpret_cast<uintptr_t>(c.src[lane]);
    traffic.cp_async_bytes += c.bytes[lane];
    for (uintptr_t s = first / 32; s <= (first + c.bytes[lane] - 1) / 32; ++s) {
      sectors.push_back(s);
    }
  }
  std::sort(sectors.begin(), sectors.end());
  traffic.cp_async_sectors += std::unique(sectors.begin(), sectors.end()) - sectors.begin();
}

// A block's copies that never found all 32 lanes: counted as unmatched, then forgotten.
inline void forget_unmatched_copies(std::vector<WarpSlots>& warps) {
  for (WarpSlots& w : warps) {
    for (const auto& entry : w.copies) {
      traffic.cp_async_unmatched_lanes += __builtin_popcount(entry.second.lanes);
    }
    w.copies.clear();
  }
}

// ---- cp.async ---------------------------------------------------------------------------

inline void land(const CopyOp& op) {
  unsigned char bytes[16] = {};
  if (op.bytes > 0) std::memcpy(bytes, op.src, op.bytes);
  std::memcpy(op.dst, bytes, 16);
}

inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src-size " + std::to_string(src_bytes));
  if (!in_shared(smem, 16) || reinterpret_cast<uintptr_t>(smem) % 16 != 0) {
    fail("cp.async: shared destination " + hex(smem) + " out of bounds or not 16-byte aligned");
  }
  if (src_bytes > 0 && (!in_global(gmem, src_bytes) || reinterpret_cast<uintptr_t>(gmem) % 16)) {
    fail("cp.async: global source " + hex(gmem) + " (" + std::to_string(src_bytes) +
         " bytes) outside every buffer or not 16-byte aligned");
  }
  if (machine->copies_land_at_issue) land(CopyOp{smem, gmem, src_bytes});
  Fiber& fiber = self();
  fiber.open_group.push_back({smem, gmem, src_bytes});
  std::map<uint64_t, WarpCopies>& copies = warp_slots().copies;
  const auto entry = copies.try_emplace(fiber.cp_async_issued++).first;
  WarpCopies& c = entry->second;
  const int lane = lane_id();
  c.lanes |= 1u << lane;
  c.smem_offset[lane] = static_cast<uint32_t>(static_cast<unsigned char*>(smem) - machine->smem);
  c.src[lane] = static_cast<const unsigned char*>(gmem);
  c.bytes[lane] = src_bytes;
  if (c.lanes == 0xffffffffu) {
    count_warp_copies(c);
    copies.erase(entry);
  }
}

inline void cp_async_commit() {
  Fiber& fiber = self();
  fiber.committed.push_back(std::move(fiber.open_group));
  fiber.open_group.clear();
}

inline void cp_async_wait(int pending_groups) {
  Fiber& fiber = self();
  while (static_cast<int>(fiber.committed.size()) > pending_groups) {
    if (!machine->copies_land_at_issue) {
      for (const CopyOp& op : fiber.committed.front()) land(op);
    }
    fiber.committed.pop_front();
  }
}

// ---- warp collectives ---------------------------------------------------------------------

inline uint16_t load_u16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ldmatrix.m8n8.x4.b16: lane l gives the address of row l % 8 of matrix l / 8. Without
// .trans lane l receives, of each matrix, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1;
// with .trans it receives column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1.
inline void ldmatrix(uint32_t (&frag)[4], const void* smem, bool transpose) {
  WarpSlots& w = warp_slots();
  const int lane = lane_id();
  if (!in_shared(smem, 16) || reinterpret_cast<uintptr_t>(smem) % 16 != 0) {
    fail("ldmatrix: row address " + hex(smem) + " out of shared memory or not 16-byte aligned");
  }
  w.address[lane] = static_cast<const unsigned char*>(smem);
  arrive_and_wait(w.barrier);
  if (lane == 0) {
    for (int m = 0; m < 4; ++m) {
      uint32_t offsets[8];
      for (int r = 0; r < 8; ++r) {
        offsets[r] = static_cast<uint32_t>(w.address[8 * m + r] - machine->smem);
      }
      traffic.ldmatrix_phases += 1;
      traffic.ldmatrix_wavefronts += bank_wavefronts(offsets, 8);
    }
  }
  for (int m = 0; m < 4; ++m) {
    uint16_t half[2];
    for (int j = 0; j < 2; ++j) {
      const int row = transpose ? 2 * (lane % 4) + j : lane / 4;
      const int col = transpose ? lane / 4 : 2 * (lane % 4) + j;
      half[j] = load_u16(w.address[m * 8 + row] + 2 * col);
    }
    frag[m] = static_cast<uint32_t>(half[0]) | (static_cast<uint32_t>(half[1]) << 16);
  }
  arrive_and_wait(w.barrier);
}

template <typename T>
float decode(uint32_t bits16) {
  T value;
  const uint16_t raw = static_cast<uint16_t>(bits16);
  std::memcpy(&value, &raw, 2);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(value);
  } else {
    return __half2float(value);
  }
}

// The 16x16 A matrix whose mma.sync m16n8k16 fragments the warp's lanes deposited in w.a:
// with g = lane / 4 and t = lane % 4, a0..a3 hold A at (g, 2t..2t+1), (g+8, 2t..),
// (g, 2t+8..), (g+8, 2t+8..).
template <typename T>
void fragment_a_matrix(const WarpSlots& w, float (&A)[16][16]) {
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < 2; ++j) {
      const int shift = 16 * j;
      A[g][2 * t + j] = decode<T>(w.a[l][0] >> shift);
      A[g + 8][2 * t + j] = decode<T>(w.a[l][1] >> shift);
      A[g][2 * t + 8 + j] = decode<T>(w.a[l][2] >> shift);
      A[g + 8][2 * t + 8 + j] = decode<T>(w.a[l][3] >> shift);
    }
  }
}

// mma.sync.m16n8k16.row.col with fp32 accumulators. A as fragment_a_matrix reads it; with
// g = lane / 4 and t = lane % 4, b0, b1 hold B (16x8, k x n) at (2t..2t+1, g) and
// (2t+8..2t+9, g); d0..d3 are D at (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  WarpSlots& w = warp_slots();
  const int lane = lane_id();
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  arrive_and_wait(w.barrier);
  float A[16][16], B[16][8];
  fragment_a_matrix<T>(w, A);
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < 2; ++j) {
      const int shift = 16 * j;
      B[2 * t + j][g] = decode<T>(w.b[l][0] >> shift);
      B[2 * t + 8 + j][g] = decode<T>(w.b[l][1] >> shift);
    }
  }
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e / 2) * 8, col = 2 * t + e % 2;
    float sum = d[e];
    for (int k = 0; k < 16; ++k) sum = std::fma(A[row][k], B[k][col], sum);
    d[e] = sum;
  }
  arrive_and_wait(w.barrier);
}

template <typename V>
V shfl_xor(V value, int lane_mask) {
  static_assert(sizeof(V) <= 8, "shfl moves at most 64 bits here");
  WarpSlots& w = warp_slots();
  const int lane = lane_id();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  w.value[lane] = bits;
  arrive_and_wait(w.barrier);
  bits = w.value[(lane ^ lane_mask) & 31];
  arrive_and_wait(w.barrier);
  V result;
  std::memcpy(&result, &bits, sizeof(V));
  return result;
}

// ---- launch -------------------------------------------------------------------------------

// The harnesses' (pointer, bytes) arrays from Python as the global memory cp.async may read.
inline std::vector<Buffer> buffers_from(const void* const* pointers, const int64_t* bytes,
                                        int count) {
  std::vector<Buffer> buffers;
  for (int i = 0; i < count; ++i) {
    buffers.push_back({static_cast<const unsigned char*>(pointers[i]),
                       static_cast<size_t>(bytes[i])});
  }
  return buffers;
}

inline void fiber_entry() {
  machine->body();
  Fiber& fiber = self();
  if (!fiber.open_group.empty() ||
      std::any_of(fiber.committed.begin(), fiber.committed.end(),
                  [](const std::vector<CopyOp>& g) { return !g.empty(); })) {
    fail("thread exited with cp.async copies it never waited for");
  }
  if (!fiber.async_open.empty() || !fiber.async_committed.empty()) {
    fail("thread exited with wgmma operations it never waited for");
  }
  fiber.finished = true;
  yield();
}

// Runs `kernel` (a callable reading threadIdx/blockIdx) over the grid. `buffers` is the
// global memory cp.async may read. Returns "" or the first error.
inline std::string launch(dim3 grid, dim3 block, size_t smem_bytes, unsigned char* smem,
                          std::vector<Buffer> buffers, std::function<void()> kernel) {
  constexpr size_t kStackBytes = 256 * 1024;
  Machine m;
  machine = &m;
  m.grid_dim = grid;
  m.block_dim = block;
  m.smem = smem;
  m.smem_bytes = smem_bytes;
  m.buffers = std::move(buffers);
  const char* copies = std::getenv("TILESMITH_EMULATOR_COPIES");
  m.copies_land_at_issue = copies != nullptr && std::string(copies) == "early";
  const char* order_name = std::getenv("TILESMITH_EMULATOR_ORDER");
  const std::string order = order_name != nullptr ? order_name : "forward";
  if (order != "forward" && order != "reverse" && order != "shuffle") {
    return "TILESMITH_EMULATOR_ORDER must be forward, reverse or shuffle, got " + order;
  }
  const char* seed = std::getenv("TILESMITH_EMULATOR_SEED");
  std::mt19937 shuffler(seed != nullptr ? std::strtoul(seed, nullptr, 10) : 0);
  m.body = std::move(kernel);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads % 32 != 0) return "block size must be a multiple of 32 here";
  m.fibers.resize(threads);
  m.warps.resize(threads / 32);
  std::vector<int> turns(threads);  // the fibers in the order they take their turns
  std::iota(turns.begin(), turns.end(), 0);
  if (order == "reverse") std::reverse(turns.begin(), turns.end());
  for (Fiber& f : m.fibers) f.stack.reset(new char[kStackBytes]);
  for (unsigned bz = 0; bz < grid.z && m.error.empty(); ++bz) {
    for (unsigned by = 0; by < grid.y && m.error.empty(); ++by) {
      for (unsigned bx = 0; bx < grid.x && m.error.empty(); ++bx) {
        m.block_idx = {bx, by, bz};
        // Shared memory starts as garbage on a GPU; here as a NaN-ish pattern.
        std::memset(smem, 0xff, smem_bytes);
        m.async_view.assign(smem, smem + smem_bytes);
        m.block_barrier = Barrier{threads, 0, 0};
        for (Barrier& b : m.named_barriers) b = Barrier{};
        m.mbarriers.clear();
        m.bulk_copies.clear();
        forget_unmatched_copies(m.warps);
        for (WarpSlots& w : m.warps) w.barrier = Barrier{32, 0, 0};
        for (int i = 0; i < threads; ++i) {
          Fiber& f = m.fibers[i];
          f.thread_idx = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
          f.finished = false;
          f.waiting_on = nullptr;
          f.waiting_on_mbarrier = nullptr;
          f.open_group.clear();
          f.cp_async_issued = 0;
          f.committed.clear();
          f.async_open.clear();
          f.async_committed.clear();
          f.wgmma_fenced = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_entry, 0);
        }
        // Round robin over the runnable fibers. A pass in which none could run lands the
        // TMA copies in flight (as late as they may land); if there are none, while some
        // fibers are unfinished, it is a deadlock (a barrier not every thread reaches, or
        // an mbarrier phase that never completes).
        for (;;) {
          bool any_unfinished = false, ran = false;
          if (order == "shuffle") std::shuffle(turns.begin(), turns.end(), shuffler);
          for (const int i : turns) {
            Fiber& f = m.fibers[i];
            if (f.finished) continue;
            any_unfinished = true;
            if (f.waiting_on && f.waiting_on->generation == f.waiting_generation) continue;
            if (f.waiting_on_mbarrier &&
                !f.waiting_on_mbarrier->completed_parity(f.waiting_parity)) {
              continue;
            }
            m.current = i;
            ran = true;
            swapcontext(&m.scheduler, &f.context);
          }
          if (!m.error.empty()) break;
          if (!any_unfinished) {
            if (!m.bulk_copies.empty()) m.error = "block exited with TMA copies in flight";
            for (int id = 1; id < 16 && m.error.empty(); ++id) {
              if (m.named_barriers[id].arrived != 0) {
                m.error = "block exited with " + std::to_string(m.named_barriers[id].arrived) +
                          " arrivals in an incomplete phase of named barrier " +
                          std::to_string(id);
              }
            }
            break;
          }
          if (!ran) {
            if (!m.bulk_copies.empty()) {
              std::vector<std::function<std::string()>> copies;
              copies.swap(m.bulk_copies);
              for (const std::function<std::string()>& land_copy : copies) {
                if (m.error.empty()) m.error = land_copy();
              }
              if (!m.error.empty()) break;
              continue;
            }
            m.error = "deadlock: some threads wait at a barrier others never reach";
            break;
          }
        }
      }
    }
  }
  forget_unmatched_copies(m.warps);
  machine = nullptr;
  return m.error;
}

}  // namespace tilesmith_emu

// MemoryTraffic for the tests: its eight counters in declaration order, and its reset.
extern "C" void tilesmith_emulator_traffic(uint64_t* counters) {
  static_assert(sizeof(tilesmith_emu::MemoryTraffic) == 8 * sizeof(uint64_t));
  std::memcpy(counters, &tilesmith_emu::traffic, sizeof tilesmith_emu::traffic);
}
extern "C" void tilesmith_emulator_traffic_reset() { tilesmith_emu::traffic = {}; }

// The CUDA built-ins the kernels read.
#define threadIdx (::tilesmith_emu::self().thread_idx)
#define blockIdx (::tilesmith_emu::machine->block_idx)
#define blockDim (::tilesmith_emu::machine->block_dim)
#define gridDim (::tilesmith_emu::machine->grid_dim)
#define __syncthreads() ::tilesmith_emu::arrive_and_wait(::tilesmith_emu::machine->block_barrier)

template <typename V>
inline V __shfl_xor_sync(unsigned /*mask*/, V value, int lane_mask, int /*width*/ = 32) {
  return ::tilesmith_emu::shfl_xor(value, lane_mask);
}
// The read-only (non-coherent) load path: a plain load here.
template <typename V>
inline V __ldg(const V* address) {
  return *address;
}
// Fibers never interleave between barriers: atomics are plain read-modify-writes here.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline unsigned int atomicMax(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old > value ? old : value;
  return old;
}
// Host float division is IEEE's, correctly rounded to nearest.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// The instruction wrappers of csrc/common/mma_sm80.cuh, on the emulator.
namespace tilesmith {
// The shared-window address of a shared-memory pointer: here its offset in the block's
// buffer (which the harnesses align like the GPU's shared window, to 1024 bytes).
inline uint32_t shared_address(const void* ptr) {
  using namespace tilesmith_emu;
  if (!in_shared(ptr, 1)) fail("shared_address of a pointer outside shared memory");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(ptr) - machine->smem);
}
inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  tilesmith_emu::cp_async_16(smem, gmem, src_bytes);
}
inline void cp_async_commit() { tilesmith_emu::cp_async_commit(); }
template <int kPendingGroups>
inline void cp_async_wait() {
  tilesmith_emu::cp_async_wait(kPendingGroups);
}
inline void ldmatrix_x4(uint32_t (&frag)[4], const void* smem) {
  tilesmith_emu::ldmatrix(frag, smem, false);
}
inline void ldmatrix_x4_trans(uint32_t (&frag)[4], const void* smem) {
  tilesmith_emu::ldmatrix(frag, smem, true);
}
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  tilesmith_emu::mma_16816<T>(d, a, b0, b1);
}
}  // namespace tilesmith
