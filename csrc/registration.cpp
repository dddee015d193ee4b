// The one place that binds CUDA implementations to tilesmith's ops. The schemas themselves
// are defined once, in python/tilesmith/ops/ (the same file as each op's fake kernel and
// autograd rule); the dispatcher accepts an implementation registered before its schema.
#include <Python.h>
#include <torch/library.h>

#include "attention/attention_api.h"
#include "common/hopper_kernels.h"
#include "conv2d/conv2d_api.h"
#include "gemm/gemm_api.h"
#include "matmul/matmul_api.h"

namespace tilesmith {
namespace {
const HopperKernels* installed_hopper_kernels = nullptr;
}  // namespace
const HopperKernels* hopper_kernels() { return installed_hopper_kernels; }
void set_hopper_kernels(const HopperKernels* kernels) { installed_hopper_kernels = kernels; }
}  // namespace tilesmith

namespace {

// _set_hopper_kernels(capsule or None): tilesmith._C_sm90a's `hopper_kernels`, or None for
// the sm_80 kernels everywhere.
PyObject* set_hopper_kernels(PyObject*, PyObject* kernels) {
  if (kernels == Py_None) {
    tilesmith::set_hopper_kernels(nullptr);
    Py_RETURN_NONE;
  }
  void* table = PyCapsule_GetPointer(kernels, "tilesmith.hopper_kernels");
  if (table == nullptr) return nullptr;  // not that capsule: the error is set
  tilesmith::set_hopper_kernels(static_cast<const tilesmith::HopperKernels*>(table));
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_set_hopper_kernels", set_hopper_kernels, METH_O,
     "Run matmul/gemm and conv2d forward on sm_90 through tilesmith._C_sm90a's wgmma kernels "
     "(its hopper_kernels capsule), or not (None)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing tilesmith._C runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
