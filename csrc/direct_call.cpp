// reclora_kernels._C.lora_mix_direct: lora_mix_linear's call on CPU tensors (and on CUDA
// tensors when the backend is the native cuda one) with no Python argument checks and no
// boxed dispatch.
//
// At tiny sizes the op's cost is fixed cost: reclora_kernels/validate.py's ~40 attribute
// reads and the boxed torch.ops call (parsing ten arguments into IValues, two outputs back)
// took ~25 us a call on the AMD EPYC, against F.linear's 5.7 us in all. Here the same checks
// run in C++ and the op is called unboxed through the dispatcher, below autograd when there
// is no gradient to record, else through its C++ autograd kernel (csrc/autograd.cpp); the
// profiler and inference mode see it as before.
//
// One home for the error messages: anything this does not accept as valid (a wrong shape,
// dtype or device, an index out of range, a Tensor subclass, a torch function or dispatch
// mode, vmap, a layout it leaves to Python) returns NotImplemented, and Python then takes the
// checked path, whose error names the argument. So this is only ever a shortcut for calls
// that would succeed there; tests/test_direct_call.py holds it to that.
//
// CUDA tensors (issue 12's decode sizes, where host time is the whole cost): the same
// shortcut for the native cuda backend, which launches its kernels from C++. Not yet run on
// a GPU; tests/test_direct_call.py's `cuda` tests (benchmarks/gpu_check.sh) compare it to the
// checked path bit for bit.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "op_handles.h"

#include <cmath>
#include <limits>
#include <optional>

namespace {

using at::Tensor;
using reclora::forward_op;
using reclora::OptTensor;

// A plain, dense torch.Tensor (or Parameter) argument; subclasses may override
// __torch_function__, and other layouts (sparse, mkldnn) get validate.py's error.
const Tensor* plain_tensor(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return nullptr;
  const Tensor& t = THPVariable_Unpack(o);
  return t.layout() == at::kStrided ? &t : nullptr;
}

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Largest finite value of the dtype: validate.py rejects a scale beyond it (a kernel would
// round it to inf).
double dtype_max(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::max());
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
    case at::kFloat: return std::numeric_limits<float>::max();
    default: return std::numeric_limits<double>::max();
  }
}

bool same_kind(const Tensor& t, const Tensor& x) {
  return t.scalar_type() == x.scalar_type() && t.device() == x.device();
}

// What validate.prepare accepts for a Python number `scale`: a float or int (not bool),
// finite and within the dtype's range.
std::optional<double> scale_of(PyObject* o, at::ScalarType dtype) {
  double v;
  if (PyFloat_Check(o)) {
    v = PyFloat_AS_DOUBLE(o);
  } else if (PyLong_Check(o) && !PyBool_Check(o)) {
    v = PyLong_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {  // too large for a double: Python's path says so
      PyErr_Clear();
      return std::nullopt;
    }
  } else {
    return std::nullopt;
  }
  if (!(std::abs(v) <= dtype_max(dtype))) return std::nullopt;
  return v;
}

bool in_range(const Tensor& idx, int64_t upper) {
  const Tensor c = idx.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t q = 0; q < c.numel(); ++q)
    if (p[q] < 0 || p[q] >= upper) return false;
  return true;
}

// Row ids of x [R, L, d_in]: token n is in row n / L.
Tensor implicit_rows(int64_t rows, int64_t len) {
  Tensor ids = at::empty({rows * len}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t n = 0; n < len; ++n) *p++ = b;
  return ids;
}

// lora_mix_direct(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx, scale, mix,
//                 row_ids, plan_rows, plan_tokens, indices_checked, cuda_ok)
//     -> Tensor | NotImplemented
// mix: 0 factor, 1 output, anything else is left to Python. row_ids: a packed plan's row ids
// (x [T, d_in]) with the plan's row and token counts, or None. cuda_ok: x may be a CUDA
// tensor (Python chose the cuda backend); then row_ids is always given, on x's device (for
// x [R, L, d_in] and one-token rows, the implicit plan's cached ids: no launch to make them),
// and indices are never read here (an unchecked adapter_idx goes to Python's device assert).
PyObject* lora_mix_direct(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 14) {
    PyErr_SetString(PyExc_TypeError, "lora_mix_direct takes 14 arguments");
    return nullptr;
  }
  auto decline = [] { Py_RETURN_NOTIMPLEMENTED; };
  if (at::impl::torch_function_mode_enabled()) return decline();
  // Dispatch keys switched on for this thread: a TorchDispatchMode, vmap / functorch
  // transforms. Their tensors may have no storage to read the indices from.
  if (!(c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty())
    return decline();
  const Tensor* xp = plain_tensor(args[0]);
  const Tensor* wp = plain_tensor(args[1]);
  const Tensor* ap = plain_tensor(args[3]);
  const Tensor* bp = plain_tensor(args[4]);
  const Tensor* gp = plain_tensor(args[5]);
  if (!xp || !wp || !ap || !bp || !gp) return decline();
  const Tensor *biasp = nullptr, *idxp = nullptr, *ridp = nullptr;
  if (args[2] != Py_None && !(biasp = plain_tensor(args[2]))) return decline();
  if (args[6] != Py_None && !(idxp = plain_tensor(args[6]))) return decline();
  if (args[9] != Py_None && !(ridp = plain_tensor(args[9]))) return decline();
  // Owned copies (a reference count each), as torch's own bindings hold them: the GIL is
  // released below, and another thread may rebind a Python tensor meanwhile.
  const Tensor x = *xp, weight = *wp, lora_a = *ap, lora_b = *bp, adapter_w = *gp;

  const at::ScalarType dtype = x.scalar_type();
  const int cuda_ok = PyObject_IsTrue(args[13]);
  if (cuda_ok < 0) return nullptr;
  const bool on_cuda = x.device().is_cuda();
  if (!(x.device().is_cpu() || (on_cuda && cuda_ok)) || !float_dtype(dtype)) return decline();
  if (on_cuda && dtype == at::kDouble) return decline();  // no float64 CUDA kernels: Python says
  // A gradient to record: the call goes through the op's autograd kernel (csrc/autograd.cpp);
  // otherwise straight below it.
  const bool record = at::GradMode::is_enabled() &&
                      (x.requires_grad() || weight.requires_grad() || lora_a.requires_grad() ||
                       lora_b.requires_grad() || adapter_w.requires_grad() ||
                       (biasp && biasp->requires_grad()));
  const std::optional<double> scale = scale_of(args[7], dtype);
  const long mix = PyLong_Check(args[8]) ? PyLong_AsLong(args[8]) : -1;
  if (mix == -1 && PyErr_Occurred()) PyErr_Clear();  // an int past a long: not 0 or 1
  if (!scale || (mix != 0 && mix != 1)) return decline();

  // Shapes, as validate.prepare checks them.
  if (x.dim() != 2 && x.dim() != 3) return decline();
  const int64_t d_in = x.size(-1);
  if (!same_kind(weight, x) || weight.dim() != 2 || weight.size(1) != d_in) return decline();
  const int64_t d_out = weight.size(0);
  if (biasp && (!same_kind(*biasp, x) || biasp->dim() != 1 || biasp->size(0) != d_out))
    return decline();
  if (!same_kind(lora_a, x) || lora_a.dim() != 3 || lora_a.size(2) != d_in) return decline();
  const int64_t adapters = lora_a.size(0), rank = lora_a.size(1);
  if (adapters < 1 || rank < 1) return decline();
  if (!same_kind(lora_b, x) || lora_b.dim() != 3 || lora_b.size(0) != adapters ||
      lora_b.size(1) != d_out || lora_b.size(2) != rank)
    return decline();
  if (!same_kind(adapter_w, x) || adapter_w.dim() != 2) return decline();
  const int64_t rows = adapter_w.size(0), slots = adapter_w.size(1);
  if (slots < 1) return decline();

  // A plan's row ids (on x's device) for x2d's tokens; on CUDA also the implicit ones.
  auto plan_fits = [&](int64_t tokens) {
    const long plan_rows = PyLong_AsLong(args[10]), plan_tokens = PyLong_AsLong(args[11]);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return plan_rows == rows && plan_tokens == tokens && ridp->scalar_type() == at::kLong &&
           ridp->dim() == 1 && ridp->size(0) == tokens && ridp->device() == x.device();
  };
  if (on_cuda && !ridp) return decline();
  Tensor x2d, row_ids;
  if (x.dim() == 3) {
    if (x.size(0) != rows) return decline();
    x2d = x.reshape({rows * x.size(1), d_in});
    if (on_cuda) {
      if (!plan_fits(rows * x.size(1))) return decline();
      row_ids = *ridp;
    } else {
      if (ridp) return decline();
      row_ids = implicit_rows(rows, x.size(1));
    }
  } else if (ridp) {
    if (!plan_fits(x.size(0))) return decline();
    x2d = x;
    row_ids = *ridp;
  } else {
    if (rows != x.size(0)) return decline();  // packed x without a plan: one token per row
    x2d = x;
    row_ids = implicit_rows(rows, 1);
  }

  const OptTensor bias = biasp ? OptTensor(*biasp) : std::nullopt;
  OptTensor idx;
  if (idxp) {
    if (idxp->scalar_type() != at::kLong || idxp->device() != x.device() || idxp->dim() != 2 ||
        idxp->size(0) != rows || idxp->size(1) != slots)
      return decline();
    const int checked = PyObject_IsTrue(args[12]);
    if (checked < 0) return nullptr;
    // Unchecked: Python raises the IndexError (CPU) or queues its device assert (CUDA; reading
    // the indices here would be a host sync).
    if (!checked && (on_cuda || !in_range(*idxp, adapters))) return decline();
    idx = *idxp;
  } else if (slots != adapters) {
    return decline();
  }

  Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own ops: other Python threads run
    std::optional<at::AutoDispatchBelowAutograd> below_autograd;
    if (!record) below_autograd.emplace();
    y = std::get<0>(forward_op().call(x2d, row_ids, weight, bias, lora_a, lora_b, adapter_w,
                                      idx, *scale, mix));
    if (x.dim() == 3) y = y.view({x.size(0), x.size(1), d_out});
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef reclora_direct_methods[] = {
    {"lora_mix_direct", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                              lora_mix_direct)),
     METH_FASTCALL, "lora_mix_linear's call without Python checks (see csrc/direct_call.cpp)."},
    {nullptr, nullptr, 0, nullptr}};
