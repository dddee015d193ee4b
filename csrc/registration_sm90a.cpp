// tilesmith._C_sm90a: kernels that use Hopper-only instructions (wgmma, FP8 operands),
// compiled with -gencode=arch=compute_90a,code=sm_90a in an extension of their own, since
// sm_90a code loads on no other GPU. Like registration.cpp, it only binds: the schemas live in
// python/tilesmith/ops/.
#include <Python.h>
#include <torch/library.h>

#include "common/hopper_kernels.h"
#include "fp8/fp8_api.h"

namespace {
const tilesmith::HopperKernels kHopperKernels = {
    &tilesmith::run_matmul_sm90a, &tilesmith::run_conv2d_fwd_sm90a,
    &tilesmith::run_conv2d_dgrad_sm90a, &tilesmith::run_conv2d_wgrad_sm90a,
    &tilesmith::run_attention_fwd_sm90a, &tilesmith::run_attention_bwd_sm90a};

// _set_tma_kernels(enabled: bool): see tilesmith::set_tma_kernels.
PyObject* set_tma_kernels(PyObject*, PyObject* enabled) {
  const int truth = PyObject_IsTrue(enabled);
  if (truth < 0) return nullptr;
  tilesmith::set_tma_kernels(truth != 0);
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"_set_tma_kernels", &set_tma_kernels, METH_O,
     "Whether matmul/gemm and scaled_gemm take their TMA kernels (default True)."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// The module carries `hopper_kernels`, a capsule of the table above that backend.py hands
// to tilesmith._C (whose ops run them; see common/hopper_kernels.h), and _set_tma_kernels.
extern "C" PyObject* PyInit__C_sm90a(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_sm90a", nullptr, -1, kMethods};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(const_cast<tilesmith::HopperKernels*>(&kHopperKernels),
                                    "tilesmith.hopper_kernels", nullptr);
  if (capsule == nullptr || PyModule_AddObject(m, "hopper_kernels", capsule) != 0) {
    Py_XDECREF(capsule);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY_IMPL(tilesmith, CUDA, m) {
  m.impl("quantize_fp8_cuda", &tilesmith::quantize_fp8_cuda);
  m.impl("scaled_gemm_cuda", &tilesmith::scaled_gemm_cuda);
}
