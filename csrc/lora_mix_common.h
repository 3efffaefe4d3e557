// Argument checks shared by the CPU and CUDA kernels of reclora::lora_mix_{forward,backward}.
//
// reclora_kernels/validate.py has already checked everything with messages that name the
// user's argument; these TORCH_CHECKs guard direct calls through torch.ops.reclora.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <string>

namespace reclora {

// Integers and shapes in error messages are formatted with std::to_string, never streamed:
// on the GPU machine (torch 2.11, built there) every TORCH_CHECK whose message streamed an
// int64 crashed the process (segfault) while checks streaming only strings and dtypes raised
// cleanly; torch 2.14 here raised in both cases. Not root-caused (device time ran out).
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

struct Sizes {
  int64_t tokens, d_in, d_out, adapters, rank, rows, slots;
  bool dense;
};

inline Sizes check_inputs(const at::Tensor& x, const at::Tensor& row_ids, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, const at::Tensor& adapter_w,
                          const std::optional<at::Tensor>& adapter_idx, int64_t mix) {
  TORCH_CHECK(x.dim() == 2, "lora_mix: x must be packed [T, d_in], got ", shape(x.sizes()));
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "lora_mix: weight must be [d_out, d_in=", num(x.size(1)), "], got ",
              shape(weight.sizes()));
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == x.size(1) && lora_a.size(0) >= 1 &&
                  lora_a.size(1) >= 1,
              "lora_mix: lora_a must be [M, r, d_in=", num(x.size(1)), "], got ",
              shape(lora_a.sizes()));
  Sizes s{x.size(0), x.size(1), weight.size(0), lora_a.size(0), lora_a.size(1), 0, 0, true};
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(0) == s.adapters && lora_b.size(1) == s.d_out &&
                  lora_b.size(2) == s.rank,
              "lora_mix: lora_b must be [M, d_out, r], got ", shape(lora_b.sizes()));
  TORCH_CHECK(adapter_w.dim() == 2 && adapter_w.size(1) >= 1,
              "lora_mix: adapter_w must be [R, k] with k >= 1, got ", shape(adapter_w.sizes()));
  s.rows = adapter_w.size(0);
  s.slots = adapter_w.size(1);
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == s.tokens &&
                  row_ids.scalar_type() == at::kLong,
              "lora_mix: row_ids must be int64 [T=", num(s.tokens), "], got ", shape(row_ids.sizes()), " ",
              row_ids.scalar_type());
  TORCH_CHECK(mix == 0 || mix == 1, "lora_mix: mix must be 0 (factor) or 1 (output), got ", num(mix));
  const auto dtype = x.scalar_type();
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype, "lora_mix: ", name, " must have x's dtype ", dtype,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "lora_mix: ", name, " must be on x's device ",
                x.device().str(), ", got ", t.device().str());
  };
  same(weight, "weight");
  same(lora_a, "lora_a");
  same(lora_b, "lora_b");
  same(adapter_w, "adapter_w");
  TORCH_CHECK(row_ids.device() == x.device(), "lora_mix: row_ids must be on x's device");
  if (bias.has_value()) {
    same(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.d_out, "lora_mix: bias must be [d_out=",
                num(s.d_out), "], got ", shape(bias->sizes()));
  }
  if (adapter_idx.has_value()) {
    s.dense = false;
    TORCH_CHECK(adapter_idx->scalar_type() == at::kLong && adapter_idx->dim() == 2 &&
                    adapter_idx->size(0) == s.rows && adapter_idx->size(1) == s.slots,
                "lora_mix: adapter_idx must be int64 [R, k] like adapter_w ", shape(adapter_w.sizes()),
                ", got ", shape(adapter_idx->sizes()), " ", adapter_idx->scalar_type());
    TORCH_CHECK(adapter_idx->device() == x.device(), "lora_mix: adapter_idx must be on x's device");
  } else {
    TORCH_CHECK(s.slots == s.adapters, "lora_mix: dense mode (adapter_idx None) needs adapter_w "
                "[R, M=", num(s.adapters), "], got ", shape(adapter_w.sizes()));
  }
  return s;
}

// The backward's own inputs: grad_y [T, d_out] and the forward's shrink [T, slots_out, r], on
// x's device (any floating dtype: the kernels cast them).
inline void check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& shrink,
                                  const at::Tensor& x, const Sizes& s, int64_t slots_out) {
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.tokens && grad_y.size(1) == s.d_out,
              "lora_mix: grad_y must be [T, d_out], got ", shape(grad_y.sizes()));
  TORCH_CHECK(shrink.dim() == 3 && shrink.size(0) == s.tokens && shrink.size(1) == slots_out &&
                  shrink.size(2) == s.rank,
              "lora_mix: shrink must be [T, ", num(slots_out), ", r], got ", shape(shrink.sizes()));
  auto on_x = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), "lora_mix: ", name, " must be on x's device ",
                x.device().str(), ", got ", t.device().str());
    TORCH_CHECK(t.is_floating_point(), "lora_mix: ", name, " must be floating, got ",
                t.scalar_type());
  };
  on_x(grad_y, "grad_y");
  on_x(shrink, "shrink");
}

// Held by each kernel entry: its own ATen calls (the base GEMM's addmm, mm) run in the
// inputs' dtype. Under an enclosing torch.autocast they were recast to bf16 and then read as
// float ("expected scalar type Float but found BFloat16" on every direct op call).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Distinct empty tensors for gradients that were not asked for: outputs of one op must not
// alias each other.
inline at::Tensor none_like(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace reclora
