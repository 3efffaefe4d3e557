// Autograd of reclora::lora_mix_forward in C++, for every device's kernels (the Autograd alias
// key): the forward runs the kernel below autograd and saves what the backward op needs; the
// backward calls reclora::lora_mix_backward once, asking only for the gradients the graph
// needs.
//
// In Python (torch.library.register_autograd, as before) a call that records a gradient took
// ~140 us at tiny sizes on the AMD EPYC and each backward node another Python call; here both
// stay in C++, as torchvision's ops do. The fake kernels stay in Python (ops.py), which is what
// torch.compile needs to trace through this.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "op_handles.h"

namespace reclora {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LoraMix : public torch::autograd::Function<LoraMix> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& row_ids,
                               const Tensor& weight, const OptTensor& bias,
                               const Tensor& lora_a, const Tensor& lora_b,
                               const Tensor& adapter_w, const OptTensor& adapter_idx,
                               double scale, int64_t mix) {
    auto [y, shrink] = [&] {
      at::AutoDispatchBelowADInplaceOrView below;
      return forward_op().call(x, row_ids, weight, bias, lora_a, lora_b, adapter_w,
                               adapter_idx, scale, mix);
    }();
    ctx->save_for_backward({x, row_ids, weight, lora_a, lora_b, adapter_w,
                            adapter_idx.value_or(Tensor()), shrink});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["mix"] = mix;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({shrink});
    return {y, shrink};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Edges exist for tensor inputs only: x, row_ids, weight, [bias,] lora_a, lora_b,
    // adapter_w[, adapter_idx].
    const size_t after_bias = has_bias ? 4 : 3;
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_weight = ctx->needs_input_grad(2);
    const bool need_bias = has_bias && ctx->needs_input_grad(3);
    const bool need_a = ctx->needs_input_grad(after_bias);
    const bool need_b = ctx->needs_input_grad(after_bias + 1);
    const bool need_w = ctx->needs_input_grad(after_bias + 2);
    const OptTensor idx = saved[6].defined() ? OptTensor(saved[6]) : std::nullopt;
    auto [dx, dweight, dbias, da, db, dw] = backward_op().call(
        grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], idx,
        saved[7], ctx->saved_data["scale"].toDouble(), ctx->saved_data["mix"].toInt(), need_x,
        need_weight, need_bias, need_a || need_b || need_w);
    // One gradient per forward argument; undefined where none is wanted.
    return {need_x ? dx : Tensor(),  Tensor(),  need_weight ? dweight : Tensor(),
            need_bias ? dbias : Tensor(), need_a ? da : Tensor(), need_b ? db : Tensor(),
            need_w ? dw : Tensor(),  Tensor(),  Tensor(),  Tensor()};
  }
};

std::tuple<Tensor, Tensor> lora_mix_forward_autograd(
    const Tensor& x, const Tensor& row_ids, const Tensor& weight, const OptTensor& bias,
    const Tensor& lora_a, const Tensor& lora_b, const Tensor& adapter_w,
    const OptTensor& adapter_idx, double scale, int64_t mix) {
  auto out = LoraMix::apply(x, row_ids, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                            scale, mix);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(reclora, Autograd, m) {
  m.impl("lora_mix_forward", &lora_mix_forward_autograd);
  // The backward is not differentiable: a double backward raises instead of treating it as
  // a constant (it gave silently wrong second derivatives, torch only warning).
  m.impl("lora_mix_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace reclora
