// tilesmith._C_sm90a: kernels that use Hopper-only instructions (wgmma, FP8 operands),
// compiled with -gencode=arch=compute_90a,code=sm_90a in an extension of their own, since
// sm_90a code loads on no other GPU. Like registration.cpp, it only binds: the schemas live in
// python/tilesmith/ops/.
#include <Python.h>
#include <torch/library.h>

#include "fp8/fp8_api.h"

extern "C" PyObject* PyInit__C_sm90a(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_sm90a", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY_IMPL(tilesmith, CUDA, m) {
  m.impl("quantize_fp8_cuda", &tilesmith::quantize_fp8_cuda);
  m.impl("scaled_gemm_cuda", &tilesmith::scaled_gemm_cuda);
}
