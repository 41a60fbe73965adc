// Op schemas for the fastprune library. Each backend implements them in
// csrc/cpu/<family>.cpp or csrc/cuda/<family>.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastprune._C from Python only has to run the static registrations
// below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastprune, m) {
  // Exact k-th smallest value (1-based k) over all elements of a list of
  // tensors, without concatenating them. Returns (value, number of elements
  // strictly smaller than value); ties at value are broken by the caller in
  // (tensor index, flat index) order.
  m.def("kth_smallest(Tensor[] tensors, int k) -> (Tensor, Tensor)");
}
