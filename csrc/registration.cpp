// Schemas of the native ops and the Python module that loads them.
//
// The ops are defined here once; csrc/cpu and csrc/cuda add their kernels with
// TORCH_LIBRARY_IMPL. reclora_kernels/ops.py attaches fake kernels and autograd. A FRAGMENT,
// because Python registers other ops (torch.library.custom_op) in the same namespace.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(reclora, m) {
  m.def(
      "lora_mix_forward(Tensor x, Tensor row_ids, Tensor weight, Tensor? bias, "
      "Tensor lora_a, Tensor lora_b, Tensor adapter_w, Tensor? adapter_idx, float scale, "
      "int mix) -> (Tensor, Tensor)");
  m.def(
      "lora_mix_backward(Tensor grad_y, Tensor x, Tensor row_ids, Tensor weight, "
      "Tensor lora_a, Tensor lora_b, Tensor adapter_w, Tensor? adapter_idx, Tensor shrink, "
      "float scale, int mix, bool need_x, bool need_weight, bool need_bias, bool need_lora) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// Registration happens in static initialisers when the shared object is loaded; the module
// holds one function, the CPU shortcut (csrc/direct_call.cpp). Plain CPython API
// instead of pybind11: torch/extension.h would cost about 25 s of compile time per file on this
// machine (../shared/ENVIRONMENT.md).
extern PyMethodDef reclora_direct_methods[];

static struct PyModuleDef reclora_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "Native kernels of reclora_kernels (ops in torch.ops.reclora).",
    -1, reclora_direct_methods, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&reclora_c_module); }
