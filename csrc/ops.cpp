// Registers afkern's CUDA kernels as the CUDA implementations of the afkern:: custom ops.
//
// The schemas, the fake (meta) implementations, the CPU reference implementations and the
// autograd formulas live in Python (afkern/_cuda.py), so they exist and are testable without
// this library; loading it only adds the CUDA dispatch key. The dispatcher accepts an impl
// before or after its def, so import order does not matter.

#include <Python.h>
#include <torch/library.h>

#include "afkern.h"

TORCH_LIBRARY_IMPL(afkern, CUDA, m) {
  m.impl("rowop_fwd", &afkern::rowop_fwd_cuda);
  m.impl("rowop_bwd", &afkern::rowop_bwd_cuda);
  m.impl("add_layernorm_fwd", &afkern::add_layernorm_fwd_cuda);
  m.impl("add_layernorm_bwd", &afkern::add_layernorm_bwd_cuda);
}

// A Python module with no attributes: `import afkern._C` runs the static registration above.
#define AFKERN_CONCAT_(a, b) a##b
#define AFKERN_CONCAT(a, b) AFKERN_CONCAT_(a, b)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PyMODINIT_FUNC AFKERN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "afkern._C",
                                   "afkern CUDA kernels (registered as torch.ops.afkern.*)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
