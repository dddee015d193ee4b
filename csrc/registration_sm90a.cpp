// tilesmith._C_sm90a: kernels that use Hopper-only instructions (wgmma, TMA, FP8 mma),
// compiled with -gencode=arch=compute_90a,code=sm_90a in an extension of their own, since
// sm_90a code loads on no other GPU. No kernels are registered here yet; the extension
// exists so that adding the first one is a matter of listing its files in setup.py.
#include <Python.h>

extern "C" PyObject* PyInit__C_sm90a(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_sm90a", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
