// The launch both matmul kernels (matmul_sm80.cuh, matmul_sm90a.cuh) share: a grid of
// output tiles by batch entries, kernel(params, first batch entry).
#pragma once

#include <cuda_runtime.h>

#include "matmul.h"

namespace tilesmith {

#ifndef TILESMITH_CPU_EMULATION  // the emulator launches kernels itself
template <typename Kernel>
cudaError_t launch_over_batch(Kernel kernel, const MatmulParams& params, int64_t tiles,
                              int threads, int smem_bytes, cudaStream_t stream) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in; cheap, so done per launch
  // rather than guarded by a static that would be per-process, not per-device.
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // grid.y is capped at 65535: larger batches go in several launches.
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t z0 = 0; z0 < params.batch; z0 += kMaxGridY) {
    const int64_t batches = params.batch - z0 < kMaxGridY ? params.batch - z0 : kMaxGridY;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(batches));
    kernel<<<grid, threads, smem_bytes, stream>>>(params, z0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}
#endif  // TILESMITH_CPU_EMULATION

}  // namespace tilesmith
