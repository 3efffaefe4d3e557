// Typed handles of the native ops, for C++ callers that go through the dispatcher unboxed
// (csrc/direct_call.cpp, csrc/autograd.cpp). The schemas are in csrc/registration.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace reclora {

using OptTensor = std::optional<at::Tensor>;
using ForwardFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double, int64_t);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
    const at::Tensor&, double, int64_t, bool, bool, bool, bool);

// reclora::lora_mix_forward (looked up once)
inline const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("reclora::lora_mix_forward", "")
                             .typed<ForwardFn>();
  return op;
}

// reclora::lora_mix_backward (looked up once)
inline const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("reclora::lora_mix_backward", "")
                             .typed<BackwardFn>();
  return op;
}

}  // namespace reclora
