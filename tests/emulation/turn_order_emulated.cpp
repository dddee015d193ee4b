// Two kernels that miss a barrier, for tests/test_cuda_emulated.py's check that the
// emulator's turn orders (TILESMITH_EMULATOR_ORDER) expose such a race: one thread writes
// shared memory that every thread reads ("broadcast"), or every thread writes a slot that
// one thread reads ("gather"). With the barrier both are correct in every order.
#include "sm80_emulator.h"

namespace {

constexpr int kThreads = 64;
alignas(16) int slots[kThreads];

void broadcast_kernel(bool barrier, int* out) {
  if (threadIdx.x == 0) slots[0] = 7;
  if (barrier) __syncthreads();
  out[threadIdx.x] = slots[0];
}

void gather_kernel(bool barrier, int* out) {
  slots[threadIdx.x] = static_cast<int>(threadIdx.x);
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int i = 0; i < kThreads; ++i) sum += slots[i];
    out[0] = sum;
  }
}

}  // namespace

// Runs one block of 64 threads; `out` holds 64 ints. Returns 0, or 1 with the emulator's
// message in `error`.
extern "C" int emulate_turn_order(int gather, int barrier, int* out, char* error,
                                  int error_capacity) {
  const std::string message = tilesmith_emu::launch(
      dim3(1), dim3(kThreads), sizeof slots, reinterpret_cast<unsigned char*>(slots), {},
      [&] { gather ? gather_kernel(barrier, out) : broadcast_kernel(barrier, out); });
  std::snprintf(error, error_capacity, "%s", message.c_str());
  return message.empty() ? 0 : 1;
}
