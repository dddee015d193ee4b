// Argument checks shared by the *_api.cpp files. Each failure becomes a Python RuntimeError
// that names the argument and what was found, never a crash inside a kernel.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define TILESMITH_CHECK_CUDA_TENSOR(x)                                                       \
  TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())

// A launch error (bad configuration, too much shared memory) is reported at once; errors
// from inside a kernel surface at the next synchronising call, as they do for native ops.
#define TILESMITH_CHECK_LAUNCH(expr)                                                         \
  do {                                                                                       \
    cudaError_t tilesmith_err_ = (expr);                                                     \
    TORCH_CHECK(tilesmith_err_ == cudaSuccess, "tilesmith kernel launch failed: ",            \
                cudaGetErrorString(tilesmith_err_));                                         \
  } while (0)
