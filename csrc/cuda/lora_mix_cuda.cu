// CUDA kernels of reclora::lora_mix_forward / lora_mix_backward (fp32, fp16, bf16; sm_80+).
//
// The base GEMM is cuBLAS's (at::addmm_, beta = 1): these kernels are only the memory-bound
// LoRA part around it. (The hand-written wmma 64x64 GEMM that was here ran at ~18 TFLOP/s,
// 42x the base on an H100; it is gone.)
//
// Forward, factor mode (each row's factors mixed once):
//   A_p, B_p = mix_kernel(A), mix_kernel(B)          [R, r, d_in], [R, d_out, r] in x's dtype
//   s = shrink_kernel(x; A_p[row])                    [T, 1, r] fp32, saved for backward
//   y = expand_kernel(s; B_p, bias)                   y = bias + scale * B_p[row] s, written once
//   y += x W^T                                        cuBLAS, beta = 1
// Output mode: s[:, j] = A[i_j] x, then the expand writes bias + scale * sum_j w_j B[i_j] s_j.
// Both per-token kernels read row_ids directly: the forward needs no sort.
//
// Backward: v = shrink(g; B^T), dx = expand(v; A^T) then dx += g W (cuBLAS); dA, dB by
// per-row segment outer products (over a row-sorted order made here) accumulated with fp32
// atomics; factor mode then scatters dA_p, dB_p to the bank and reduces dw in
// mix_backward_kernel. dW = g^T x and dbias = sum g are at::mm / sum, only when asked.
//
// Correctness first: the LoRA kernels are simple (one thread per output element in the
// expand, one warp per (token, slot, rank) in the shrink) and not yet measured on a GPU;
// `auto` picks this backend only where a card's table says it measured fastest.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>

#include "../lora_mix_common.h"

namespace reclora {
namespace {

using at::Tensor;

template <typename T>
struct Tag {
  using type = T;
};

// The three dtypes with their device types (no float64: wmma has no 16x16x16 double shape).
template <typename F>
void dispatch(at::ScalarType dtype, F&& fn) {
  switch (dtype) {
    case at::kFloat: fn(Tag<float>{}); break;
    case at::kHalf: fn(Tag<__half>{}); break;
    case at::kBFloat16: fn(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "lora_mix (cuda): dtype must be float16, bfloat16 or float32, got ", dtype);
  }
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Which factor slot j of row b uses: an index table, slot j itself (dense), or the row's own
// mixed factor (factor mode after mixing).
enum SourceMode : int { kTable = 0, kDense = 1, kOwnRow = 2 };

// The op trusts its indices (the Python layer checks them once per batch, the CPU kernel
// per call): a table index outside [0, adapters) or a row id outside [0, rows) from a direct
// torch.ops call stops the kernel with a device-side assert instead of reading or adding
// out of bounds (a compare per index load; no host sync, capture-safe).
struct Source {
  const int64_t* idx;
  int64_t s0, s1;
  int mode;
  int64_t adapters;
  __device__ __forceinline__ int64_t operator()(int64_t b, int64_t j) const {
    if (mode != kTable) return mode == kDense ? j : b;
    const int64_t i = idx[b * s0 + j * s1];
    CUDA_KERNEL_ASSERT(i >= 0 && i < adapters && "lora_mix (cuda): adapter_idx out of range");
    return i;
  }
};

__device__ __forceinline__ int64_t checked_row(const int64_t* row_ids, int64_t n, int64_t rows) {
  const int64_t b = row_ids[n];
  CUDA_KERNEL_ASSERT(b >= 0 && b < rows && "lora_mix (cuda): row_ids out of range");
  return b;
}

Source make_source(const std::optional<Tensor>& idx, bool own_row, int64_t adapters) {
  if (own_row) return {nullptr, 0, 0, kOwnRow, adapters};
  if (!idx.has_value()) return {nullptr, 0, 0, kDense, adapters};
  return {idx->data_ptr<int64_t>(), idx->stride(0), idx->stride(1), kTable, adapters};
}

constexpr int kThreads = 256;

// out[b, e] = sum_j w[b, j] bank[src(b, j), e]; bank contiguous [M, size].
template <typename T>
__global__ void mix_kernel(const T* __restrict__ bank, const T* __restrict__ w, int64_t sw0,
                           int64_t sw1, Source src, T* __restrict__ out, int64_t size,
                           int64_t slots) {
  const int64_t b = blockIdx.x;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (e >= size) return;
  float acc = 0.f;
  for (int64_t j = 0; j < slots; ++j)
    acc += to_f(w[b * sw0 + j * sw1]) * to_f(bank[src(b, j) * size + e]);
  out[b * size + e] = from_f<T>(acc);
}

// out[n, j, c] = sum_k x[n, k] F[src(row(n), j), c, k]; one block of 4 warps per (n, j),
// a warp per output c, lanes striding over k.
template <typename T>
__global__ void shrink_kernel(const T* __restrict__ x, int64_t sx0, int64_t sx1,
                              const T* __restrict__ f, int64_t sf, int64_t sc, int64_t sk,
                              Source src, const int64_t* __restrict__ row_ids, int64_t rows,
                              float* __restrict__ out, int64_t so0, int64_t so1, int64_t depth,
                              int rank) {
  const int64_t n = blockIdx.x, j = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const T* fp = f + src(checked_row(row_ids, n, rows), j) * sf;
  const T* xp = x + n * sx0;
  for (int c = warp; c < rank; c += warps) {
    float acc = 0.f;
    for (int64_t k = lane; k < depth; k += 32) acc += to_f(xp[k * sx1]) * to_f(fp[c * sc + k * sk]);
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[n * so0 + j * so1 + c] = acc;
  }
}

// y[n, o] = (bias[o]) + scale * sum_{j, c} coef[row(n), j] * u[n, j, c] * F[src(row(n), j), o, c]
// One thread per output element; u [T, kk, r] fp32 is read by every thread of the block
// (a broadcast from L1), F along o (coalesced when F's o stride is 1, as for A^T).
template <typename T>
__global__ void expand_kernel(T* __restrict__ y, int64_t sy0, const T* __restrict__ bias,
                              int64_t sbias, const float* __restrict__ u, int64_t su0,
                              int64_t su1, const T* __restrict__ f, int64_t sf, int64_t so,
                              int64_t sc, Source src, const T* __restrict__ coef, int64_t scf0,
                              int64_t scf1, const int64_t* __restrict__ row_ids, int64_t rows,
                              int64_t n_out, int64_t slots, int rank, float scale) {
  const int64_t n = blockIdx.y;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= n_out) return;
  const int64_t b = checked_row(row_ids, n, rows);
  float acc = 0.f;
  for (int64_t j = 0; j < slots; ++j) {
    const T* fj = f + src(b, j) * sf + o * so;
    const float* uj = u + n * su0 + j * su1;
    float part = 0.f;
    for (int c = 0; c < rank; ++c) part += uj[c] * to_f(fj[c * sc]);
    acc += (coef ? to_f(coef[b * scf0 + j * scf1]) : 1.f) * part;
  }
  float v = scale * acc;
  if (bias) v += to_f(bias[o * sbias]);
  y[n * sy0 + o] = from_f<T>(v);
}

// out[src(b, j), o, c] += scale * coef[b, j] * sum_{n in row b} P[n, o] Q[n, j, c]
template <typename T>
__global__ void segment_outer_kernel(const T* __restrict__ P, int64_t sp0, int64_t sp1,
                                     const float* __restrict__ Q, int64_t sq0, int64_t sq1,
                                     Source src, const T* __restrict__ coef, int64_t scf0,
                                     int64_t scf1, const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ row_start, float* out,
                                     int64_t sof, int64_t soo, int64_t soc, int64_t width,
                                     int rank, float scale) {
  const int64_t b = blockIdx.x, j = blockIdx.z;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (e >= width * rank) return;
  const int64_t o = e / rank, c = e % rank;
  float acc = 0.f;
  for (int64_t q = row_start[b]; q < row_start[b + 1]; ++q) {
    const int64_t n = order[q];
    acc += to_f(P[n * sp0 + o * sp1]) * Q[n * sq0 + j * sq1 + c];
  }
  if (row_start[b + 1] == row_start[b]) return;
  const float cj = coef ? to_f(coef[b * scf0 + j * scf1]) : 1.f;
  atomicAdd(out + src(b, j) * sof + o * soo + c * soc, scale * cj * acc);
}

// Factor mode: dbank[src(b, j)] += w[b, j] dmix[b]; dw[b, j] += <dmix[b], bank[src(b, j)]>.
template <typename T>
__global__ void mix_backward_kernel(const float* __restrict__ dmix, const T* __restrict__ bank,
                                    const T* __restrict__ w, int64_t sw0, int64_t sw1,
                                    Source src, float* dbank, float* dw, int64_t size,
                                    int64_t slots) {
  __shared__ float partial[kThreads / 32];
  const int64_t b = blockIdx.x;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool inside = e < size;
  const float dm = inside ? dmix[b * size + e] : 0.f;
  for (int64_t j = 0; j < slots; ++j) {
    const int64_t i = src(b, j);
    float part = 0.f;
    if (inside) {
      atomicAdd(dbank + i * size + e, to_f(w[b * sw0 + j * sw1]) * dm);
      part = dm * to_f(bank[i * size + e]);
    }
    for (int off = 16; off > 0; off /= 2) part += __shfl_down_sync(0xffffffffu, part, off);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = part;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (int q = 0; q < kThreads / 32; ++q) total += partial[q];
      atomicAdd(dw + b * slots + j, total);
    }
    __syncthreads();
  }
}

// ---- host side --------------------------------------------------------------------------

inline unsigned blocks(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

struct RowPlan {
  Tensor order, sorted_rows, row_start;
};

RowPlan make_plan(const Tensor& row_ids, int64_t rows) {
  // All on the device, no host sync (CUDA graphs): stable sort, then row bounds.
  RowPlan plan;
  plan.order = std::get<1>(at::sort(row_ids, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  plan.sorted_rows = row_ids.index_select(0, plan.order);
  Tensor bounds = at::arange(rows + 1, row_ids.options());
  plan.row_start = at::searchsorted(plan.sorted_rows, bounds).contiguous();
  return plan;
}

template <typename T>
Tensor mix(const Tensor& bank, const Tensor& w, const Source& src) {
  const int64_t rows = w.size(0), slots = w.size(1), size = bank[0].numel();
  Tensor out = at::empty({rows, size}, bank.options());
  if (rows == 0 || size == 0) return out;
  TORCH_CHECK(blocks(size, kThreads) <= 65535, "lora_mix (cuda): factor too large to mix");
  auto stream = c10::cuda::getCurrentCUDAStream();
  mix_kernel<T><<<dim3(rows, blocks(size, kThreads)), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(bank.data_ptr()), reinterpret_cast<const T*>(w.data_ptr()),
      w.stride(0), w.stride(1), src, reinterpret_cast<T*>(out.data_ptr()), size, slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename T>
Tensor shrink(const Tensor& x, const Tensor& f, int64_t sf, int64_t sc, int64_t sk,
              const Source& src, const Tensor& row_ids, int64_t rows, int64_t slots,
              int64_t rank) {
  const int64_t tokens = x.size(0);
  Tensor out = at::empty({tokens, slots, rank}, x.options().dtype(at::kFloat));
  if (tokens == 0) return out;
  TORCH_CHECK(slots <= 65535, "lora_mix (cuda): at most 65535 slots");
  auto stream = c10::cuda::getCurrentCUDAStream();
  shrink_kernel<T><<<dim3(tokens, slots), 128, 0, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1),
      reinterpret_cast<const T*>(f.data_ptr()), sf, sc, sk, src, row_ids.data_ptr<int64_t>(), rows,
      out.data_ptr<float>(), out.stride(0), out.stride(1), x.size(1), static_cast<int>(rank));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// y = x W^T + bias + scale * sum_j coef_j F[src_j] u_j: the expand writes y, then cuBLAS
// accumulates the base into it (beta = 1). `mat` is W^T [K, N] (or W for the dx pass).
template <typename T>
Tensor lora_linear(const Tensor& x, const Tensor& mat, const std::optional<Tensor>& bias,
                   const Tensor& u, const Tensor& f, int64_t sf, int64_t so, int64_t sc,
                   const Source& src, const std::optional<Tensor>& coef, const Tensor& row_ids,
                   int64_t rows, int64_t slots, int64_t rank, double scale) {
  const int64_t tokens = x.size(0), n_out = mat.size(1);
  Tensor y = at::empty({tokens, n_out}, x.options());
  if (tokens == 0 || n_out == 0) return y;
  TORCH_CHECK(tokens <= 65535 * 1024LL, "lora_mix (cuda): too many tokens for one call");
  const int64_t chunk = 65535;  // grid.y limit: launch in slices of tokens
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t first = 0; first < tokens; first += chunk) {
    const int64_t count = std::min(chunk, tokens - first);
    dim3 grid(blocks(n_out, kThreads), static_cast<unsigned>(count));
    expand_kernel<T><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<T*>(y.data_ptr()) + first * n_out, n_out,
        bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
        bias.has_value() ? bias->stride(0) : 0, u.data_ptr<float>() + first * u.stride(0),
        u.stride(0), u.stride(1), reinterpret_cast<const T*>(f.data_ptr()), sf, so, sc, src,
        coef.has_value() ? reinterpret_cast<const T*>(coef->data_ptr()) : nullptr,
        coef.has_value() ? coef->stride(0) : 0, coef.has_value() ? coef->stride(1) : 0,
        row_ids.data_ptr<int64_t>() + first, rows, n_out, slots, static_cast<int>(rank),
        static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  y.addmm_(x, mat);  // the base, by cuBLAS
  return y;
}

template <typename T>
void segment_outer(const Tensor& P, const Tensor& Q, const Source& src,
                   const std::optional<Tensor>& coef, const RowPlan& plan, int64_t rows,
                   int64_t slots, int64_t rank, Tensor& out, int64_t sof, int64_t soo,
                   int64_t soc, double scale) {
  const int64_t width = P.size(1);
  if (P.size(0) == 0 || rows == 0 || width == 0) return;  // a zero grid dim is refused
  TORCH_CHECK(blocks(width * rank, kThreads) <= 65535 && slots <= 65535,
              "lora_mix (cuda): factor too large for segment_outer_kernel");
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid(rows, blocks(width * rank, kThreads), slots);
  segment_outer_kernel<T><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(P.data_ptr()), P.stride(0), P.stride(1), Q.data_ptr<float>(),
      Q.stride(0), Q.stride(1), src,
      coef.has_value() ? reinterpret_cast<const T*>(coef->data_ptr()) : nullptr,
      coef.has_value() ? coef->stride(0) : 0, coef.has_value() ? coef->stride(1) : 0,
      plan.order.data_ptr<int64_t>(), plan.row_start.data_ptr<int64_t>(), out.data_ptr<float>(),
      sof, soo, soc, width, static_cast<int>(rank), static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void mix_backward(const Tensor& dmix, const Tensor& bank, const Tensor& w, const Source& src,
                  Tensor& dbank, Tensor& dw) {
  const int64_t rows = w.size(0), slots = w.size(1), size = bank[0].numel();
  if (rows == 0 || size == 0) return;
  TORCH_CHECK(blocks(size, kThreads) <= 65535, "lora_mix (cuda): factor too large to mix");
  auto stream = c10::cuda::getCurrentCUDAStream();
  mix_backward_kernel<T><<<dim3(rows, blocks(size, kThreads)), kThreads, 0, stream>>>(
      dmix.data_ptr<float>(), reinterpret_cast<const T*>(bank.data_ptr()),
      reinterpret_cast<const T*>(w.data_ptr()), w.stride(0), w.stride(1), src,
      dbank.data_ptr<float>(), dw.data_ptr<float>(), size, slots);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda_dtype(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "lora_mix (cuda): dtype must be float16, bfloat16 or float32, got ", x.scalar_type());
}

std::tuple<Tensor, Tensor> lora_mix_forward_cuda(
    const Tensor& x, const Tensor& row_ids, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& lora_a_in, const Tensor& lora_b_in, const Tensor& adapter_w,
    const std::optional<Tensor>& adapter_idx, double scale, int64_t mix_mode) {
  const NoAutocast no_autocast;
  const Sizes s = check_inputs(x, row_ids, weight, bias, lora_a_in, lora_b_in, adapter_w,
                               adapter_idx, mix_mode);
  check_cuda_dtype(x);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t kk = mix_mode == 1 ? s.slots : 1;
  if (s.tokens == 0) {
    return {at::empty({0, s.d_out}, x.options()),
            at::empty({0, kk, s.rank}, x.options().dtype(at::kFloat))};
  }
  const Tensor lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous();
  const Tensor rows_c = row_ids.contiguous();
  const int64_t r = s.rank, d_in = s.d_in;
  Tensor y, sh;
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (mix_mode == 0) {
      const Source table = make_source(adapter_idx, false, s.adapters);
      const Source own = make_source(adapter_idx, true, s.adapters);
      Tensor a_mix = mix<T>(lora_a, adapter_w, table);  // [R, r * d_in]
      Tensor b_mix = mix<T>(lora_b, adapter_w, table);  // [R, d_out * r]
      sh = shrink<T>(x, a_mix, r * d_in, d_in, 1, own, rows_c, s.rows, 1, r);
      y = lora_linear<T>(x, weight.t(), bias, sh, b_mix, s.d_out * r, r, 1, own, std::nullopt,
                         rows_c, s.rows, 1, r, scale);
    } else {
      const Source table = make_source(adapter_idx, false, s.adapters);
      sh = shrink<T>(x, lora_a, r * d_in, d_in, 1, table, rows_c, s.rows, s.slots, r);
      y = lora_linear<T>(x, weight.t(), bias, sh, lora_b, s.d_out * r, r, 1, table, adapter_w,
                         rows_c, s.rows, s.slots, r, scale);
    }
  });
  return {y, sh};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lora_mix_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& row_ids, const Tensor& weight,
    const Tensor& lora_a_in, const Tensor& lora_b_in, const Tensor& adapter_w,
    const std::optional<Tensor>& adapter_idx, const Tensor& shrink_in, double scale,
    int64_t mix_mode, bool need_x, bool need_weight, bool need_bias, bool need_lora) {
  const NoAutocast no_autocast;
  const Sizes s = check_inputs(x, row_ids, weight, std::nullopt, lora_a_in, lora_b_in, adapter_w,
                               adapter_idx, mix_mode);
  check_cuda_dtype(x);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t kk = mix_mode == 1 ? s.slots : 1;
  check_backward_inputs(grad_y, shrink_in, x, s, kk);
  // In x's dtype, as the CPU kernel takes it: the kernels read g as x's element type.
  const Tensor g = grad_y.to(x.scalar_type()).contiguous();
  const Tensor sh = shrink_in.to(at::kFloat).contiguous();
  const Tensor lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous();
  const Tensor rows_c = row_ids.contiguous();
  const int64_t r = s.rank, d_in = s.d_in, d_out = s.d_out, R = s.rows;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = none_like(x), da = none_like(x), db = none_like(x), dw = none_like(x);
  if (need_lora) {
    da = at::zeros(lora_a.sizes(), f32);
    db = at::zeros(lora_b.sizes(), f32);
    dw = at::zeros(adapter_w.sizes(), f32);
  }
  if (need_x && s.tokens == 0) dx = at::empty({0, d_in}, x.options());
  if (s.tokens > 0 && (need_x || need_lora)) {
    const RowPlan plan = make_plan(rows_c, R);
    dispatch(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      const Source table = make_source(adapter_idx, false, s.adapters);
      if (mix_mode == 0) {
        const Source own = make_source(adapter_idx, true, s.adapters);
        Tensor a_mix = mix<T>(lora_a, adapter_w, table);
        Tensor b_mix = mix<T>(lora_b, adapter_w, table);
        // v = B_p^T g: F[f, c, k] = B_p[f, k, c]
        Tensor v = shrink<T>(g, b_mix, d_out * r, 1, r, own, rows_c, R, 1, r);
        if (need_x)  // dx = g W + scale * A_p^T v: F = A_p^T [R, d_in, r]
          dx = lora_linear<T>(g, weight, std::nullopt, v, a_mix, r * d_in, 1, d_in, own,
                              std::nullopt, rows_c, R, 1, r, scale);
        if (need_lora) {
          Tensor da_mix = at::zeros({R, r * d_in}, f32), db_mix = at::zeros({R, d_out * r}, f32);
          segment_outer<T>(g, sh, own, std::nullopt, plan, R, 1, r, db_mix, d_out * r, r, 1,
                           scale);
          segment_outer<T>(x, v, own, std::nullopt, plan, R, 1, r, da_mix, r * d_in, 1, d_in,
                           scale);
          // A row without tokens has dA_p = dB_p = 0 (y does not read it): its weights are
          // taken as 0 here, else a NaN or inf one made 0 * NaN in the gradients of every
          // adapter it lists, which other rows share. (On the device: no host sync.)
          const Tensor filled = plan.row_start.slice(0, 1).gt(plan.row_start.slice(0, 0, R));
          const Tensor w_used = at::where(filled.unsqueeze(1), adapter_w,
                                          at::zeros({}, adapter_w.options()));
          mix_backward<T>(da_mix, lora_a, w_used, table, da, dw);
          mix_backward<T>(db_mix, lora_b, w_used, table, db, dw);
        }
      } else {
        Tensor v = shrink<T>(g, lora_b, d_out * r, 1, r, table, rows_c, R, s.slots, r);
        if (need_x)
          dx = lora_linear<T>(g, weight, std::nullopt, v, lora_a, r * d_in, 1, d_in, table,
                              adapter_w, rows_c, R, s.slots, r, scale);
        if (need_lora) {
          segment_outer<T>(g, sh, table, adapter_w, plan, R, s.slots, r, db, d_out * r, r, 1,
                           scale);
          segment_outer<T>(x, v, table, adapter_w, plan, R, s.slots, r, da, r * d_in, 1, d_in,
                           scale);
          // dw[b, j] = scale * sum_{n in b} <v_j(n), s_j(n)>: T*k*r values, ATen glue.
          dw.index_add_(0, rows_c, (v * sh).sum(-1) * scale);
        }
      }
    });
  }
  if (need_lora) {
    da = da.to(x.scalar_type());
    db = db.to(x.scalar_type());
    dw = dw.to(x.scalar_type());
  }
  Tensor dweight = need_weight ? at::mm(g.t(), x) : none_like(x);
  Tensor dbias = need_bias ? g.sum(0, /*keepdim=*/false, at::kFloat).to(x.scalar_type())
                           : none_like(x);
  return {dx, dweight, dbias, da, db, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(reclora, CUDA, m) {
  m.impl("lora_mix_forward", &lora_mix_forward_cuda);
  m.impl("lora_mix_backward", &lora_mix_backward_cuda);
}

}  // namespace reclora
