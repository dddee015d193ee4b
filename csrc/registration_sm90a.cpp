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
// The same kernels with matmul/gemm on the cp.async kernel only (for tests and benchmarks
// of that one beside the TMA kernel).
const tilesmith::HopperKernels kHopperKernelsCpAsync = {
    &tilesmith::run_matmul_sm90a_cp_async, &tilesmith::run_conv2d_fwd_sm90a,
    &tilesmith::run_conv2d_dgrad_sm90a, &tilesmith::run_conv2d_wgrad_sm90a,
    &tilesmith::run_attention_fwd_sm90a, &tilesmith::run_attention_bwd_sm90a};

bool add_table(PyObject* module, const char* name, const tilesmith::HopperKernels& table) {
  PyObject* capsule = PyCapsule_New(const_cast<tilesmith::HopperKernels*>(&table),
                                    "tilesmith.hopper_kernels", nullptr);
  if (capsule == nullptr || PyModule_AddObject(module, name, capsule) != 0) {
    Py_XDECREF(capsule);
    return false;
  }
  return true;
}
}  // namespace

// The module carries `hopper_kernels` and `hopper_kernels_cp_async`, capsules of the tables
// above that backend.py hands to tilesmith._C (whose ops run them; see
// common/hopper_kernels.h).
extern "C" PyObject* PyInit__C_sm90a(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_sm90a", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (!add_table(m, "hopper_kernels", kHopperKernels) ||
      !add_table(m, "hopper_kernels_cp_async", kHopperKernelsCpAsync)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY_IMPL(tilesmith, CUDA, m) {
  m.impl("quantize_fp8_cuda", &tilesmith::quantize_fp8_cuda);
  m.impl("scaled_gemm_cuda", &tilesmith::scaled_gemm_cuda);
}
