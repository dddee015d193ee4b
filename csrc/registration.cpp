// The one place that binds CUDA implementations to tilesmith's ops. The schemas themselves
// are defined once, in python/tilesmith/ops/ (the same file as each op's fake kernel and
// autograd rule); the dispatcher accepts an implementation registered before its schema.
#include <Python.h>
#include <torch/library.h>

#include "attention/attention_api.h"
#include "conv2d/conv2d_api.h"
#include "gemm/gemm_api.h"
#include "matmul/matmul_api.h"

// An empty module: importing tilesmith._C runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY_IMPL(tilesmith, CUDA, m) {
  m.impl("matmul_cuda", &tilesmith::matmul_cuda);
  m.impl("gemm_cuda", &tilesmith::gemm_cuda);
  m.impl("activation_backward_cuda", &tilesmith::activation_backward_cuda);
  m.impl("attention_fwd_cuda", &tilesmith::attention_fwd_cuda);
  m.impl("attention_bwd_cuda", &tilesmith::attention_bwd_cuda);
  m.impl("varlen_attention_fwd_cuda", &tilesmith::varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd_cuda", &tilesmith::varlen_attention_bwd_cuda);
  m.impl("conv2d_fwd_cuda", &tilesmith::conv2d_fwd_cuda);
  m.impl("conv2d_dgrad_cuda", &tilesmith::conv2d_dgrad_cuda);
  m.impl("conv2d_wgrad_cuda", &tilesmith::conv2d_wgrad_cuda);
}
