// CUDA kernels of reclora::lora_mix_forward / lora_mix_backward (fp32, fp16, bf16; sm_80+).
//
// Forward, factor mode (each row's factors mixed once):
//   A_p, B_p = mix_kernel(A), mix_kernel(B)          [R, r, d_in], [R, d_out, r] in x's dtype
//   s = shrink_kernel(x; A_p[row])                    [T, 1, r] fp32, saved for backward
//   y = fused_kernel(x, W, bias; s, B_p)              y written once
// Output mode: s[:, j] = A[i_j] x, then the fused kernel expands sum_j w_j B[i_j] s_j.
//
// fused_kernel: one 64x64 output tile of tokens (sorted by row) x output features per block.
// The base x W^T runs over K = d_in; the LoRA expand continues the same K loop over k'*r
// extra columns, once per row present in the tile (the A operand masked to that row's
// tokens, holding scale * coef_j * s_j; the B operand its row's factor F[i_j]^T), so both
// land in one accumulator and y is written once. fp16/bf16 tiles go through tensor cores
// (wmma 16x16x16, fp32 accumulate); fp32 runs a plain FMA micro-tile (full fp32, as torch's
// F.linear is by default; no tf32).
//
// Backward reuses the kernels with transposed strides: v = shrink(g; B^T), dx = fused(g, W^T;
// v, A^T); dA, dB by per-row segment outer products accumulated with fp32 atomics; factor
// mode then scatters dA_p, dB_p to the bank and reduces dw in mix_backward_kernel. dW = g^T x
// and dbias = sum g are at::mm / sum (cuBLAS is at the roofline there).
//
// Correctness first: no cp.async pipelining, no split-K; see the report of issue 3.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <type_traits>

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

struct Source {
  const int64_t* idx;
  int64_t s0, s1;
  int mode;
  __device__ __forceinline__ int64_t operator()(int64_t b, int64_t j) const {
    return mode == kTable ? idx[b * s0 + j * s1] : (mode == kDense ? j : b);
  }
};

Source make_source(const std::optional<Tensor>& idx, bool own_row) {
  if (own_row) return {nullptr, 0, 0, kOwnRow};
  if (!idx.has_value()) return {nullptr, 0, 0, kDense};
  return {idx->data_ptr<int64_t>(), idx->stride(0), idx->stride(1), kTable};
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
                              Source src, const int64_t* __restrict__ row_ids,
                              float* __restrict__ out, int64_t so0, int64_t so1, int64_t depth,
                              int rank) {
  const int64_t n = blockIdx.x, j = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const T* fp = f + src(row_ids[n], j) * sf;
  const T* xp = x + n * sx0;
  for (int c = warp; c < rank; c += warps) {
    float acc = 0.f;
    for (int64_t k = lane; k < depth; k += 32) acc += to_f(xp[k * sx1]) * to_f(fp[c * sc + k * sk]);
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[n * so0 + j * so1 + c] = acc;
  }
}

struct FusedParams {
  const void* x;
  int64_t sx0, sx1;  // x [T, K]
  const void* w;
  int64_t sw0, sw1;  // W as [N, K]: element (o, k) at o * sw0 + k * sw1
  const void* bias;  // [N] or null
  const float* u;
  int64_t su0, su1;  // u [T, kk, r] fp32 (unit stride over r)
  const void* f;
  int64_t sf, so, sc;  // F[f, o, c]
  Source src;
  const void* coef;
  int64_t scf0, scf1;  // coef [R, kk] or null
  void* y;             // [T, N] contiguous
  const int64_t* order;
  const int64_t* sorted_rows;
  const int64_t* row_start;
  int64_t tokens, n_out, depth;
  int rank, slots;
  float scale;
};

constexpr int BM = 64, BN = 64, BK = 32, kFusedThreads = 128;
constexpr int kPadA = 8;  // keeps wmma's ldm a multiple of 16 bytes and spreads smem banks
constexpr int kPadC = 4;

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kFusedThreads) fused_kernel(FusedParams p) {
  __shared__ __align__(128) T As[BM][BK + kPadA];
  __shared__ __align__(128) T Bs[BN][BK + kPadA];
  __shared__ __align__(128) float Cs[BM][BN + kPadC];

  const int tid = threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* f = static_cast<const T*>(p.f);
  const T* coef = static_cast<const T*>(p.coef);
  const bool w_k_fast = p.sw1 == 1;  // coalesce along whichever W dimension is contiguous

  // Tensor-core accumulators: 4 warps in 2 x 2, each 32 x 32 = 2 x 2 fragments.
  const int warp = tid / 32, wr = warp / 2, wc = warp % 2;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc_tc[2][2];
  // FMA accumulators: thread (ty, tx) owns rows ty*4.. and columns tx*8..
  const int ty = tid / 8, tx = tid % 8;
  float acc_f[4][8];
  if constexpr (kTensorCores) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) nvcuda::wmma::fill_fragment(acc_tc[i][jj], 0.f);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) acc_f[i][jj] = 0.f;
  }

  auto mma_tile = [&]() {
    if constexpr (kTensorCores) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
      using namespace nvcuda;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(a[i], &As[wr * 32 + i * 16][kk], BK + kPadA);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
          wmma::load_matrix_sync(b[jj], &Bs[wc * 32 + jj * 16][kk], BK + kPadA);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) wmma::mma_sync(acc_tc[i][jj], a[i], b[jj], acc_tc[i][jj]);
      }
#endif
    } else {
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_f(As[ty * 4 + i][kk]);
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) b[jj] = to_f(Bs[tx * 8 + jj][kk]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) acc_f[i][jj] += a[i] * b[jj];
      }
    }
  };

  // Base: K = depth over x and W.
  for (int64_t k0 = 0; k0 < p.depth; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kFusedThreads) {
      const int i = e / BK, kk = e % BK;
      const int64_t m = m0 + i, k = k0 + kk;
      As[i][kk] = (m < p.tokens && k < p.depth) ? x[p.order[m] * p.sx0 + k * p.sx1] : from_f<T>(0.f);
    }
    for (int e = tid; e < BN * BK; e += kFusedThreads) {
      const int o = w_k_fast ? e / BK : e % BN, kk = w_k_fast ? e % BK : e / BN;
      const int64_t col = n0 + o, k = k0 + kk;
      Bs[o][kk] = (col < p.n_out && k < p.depth) ? w[col * p.sw0 + k * p.sw1] : from_f<T>(0.f);
    }
    __syncthreads();
    mma_tile();
    __syncthreads();
  }

  // LoRA expand: K continues over (slot j, rank c), once per row present in the tile.
  const int64_t extra = static_cast<int64_t>(p.slots) * p.rank;
  const int64_t last = (m0 + BM < p.tokens ? m0 + BM : p.tokens) - 1;
  const int64_t b_first = p.sorted_rows[m0], b_last = p.sorted_rows[last];
  for (int64_t b = b_first; b <= b_last; ++b) {
    if (p.row_start[b + 1] == p.row_start[b]) continue;  // block-uniform
    for (int64_t q0 = 0; q0 < extra; q0 += BK) {
      for (int e = tid; e < BM * BK; e += kFusedThreads) {
        const int i = e / BK, kk = e % BK;
        const int64_t m = m0 + i, q = q0 + kk;
        float v = 0.f;
        if (m < p.tokens && q < extra && p.sorted_rows[m] == b) {
          const int64_t j = q / p.rank, c = q % p.rank;
          const float cj = coef ? to_f(coef[b * p.scf0 + j * p.scf1]) : 1.f;
          v = p.scale * cj * p.u[p.order[m] * p.su0 + j * p.su1 + c];
        }
        As[i][kk] = from_f<T>(v);
      }
      for (int e = tid; e < BN * BK; e += kFusedThreads) {
        const int o = e / BK, kk = e % BK;
        const int64_t col = n0 + o, q = q0 + kk;
        T v = from_f<T>(0.f);
        if (col < p.n_out && q < extra) {
          const int64_t j = q / p.rank, c = q % p.rank;
          v = f[p.src(b, j) * p.sf + col * p.so + c * p.sc];
        }
        Bs[o][kk] = v;
      }
      __syncthreads();
      mma_tile();
      __syncthreads();
    }
  }

  // Epilogue: accumulators -> smem -> + bias -> y (rows scattered back to token order).
  if constexpr (kTensorCores) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
        nvcuda::wmma::store_matrix_sync(&Cs[wr * 32 + i * 16][wc * 32 + jj * 16], acc_tc[i][jj],
                                        BN + kPadC, nvcuda::wmma::mem_row_major);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) Cs[ty * 4 + i][tx * 8 + jj] = acc_f[i][jj];
  }
  __syncthreads();
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  for (int e = tid; e < BM * BN; e += kFusedThreads) {
    const int i = e / BN, o = e % BN;
    const int64_t m = m0 + i, col = n0 + o;
    if (m < p.tokens && col < p.n_out) {
      float v = Cs[i][o];
      if (bias) v += to_f(bias[col]);
      y[p.order[m] * p.n_out + col] = from_f<T>(v);
    }
  }
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
              const Source& src, const Tensor& row_ids, int64_t slots, int64_t rank) {
  const int64_t tokens = x.size(0);
  Tensor out = at::empty({tokens, slots, rank}, x.options().dtype(at::kFloat));
  if (tokens == 0) return out;
  TORCH_CHECK(slots <= 65535, "lora_mix (cuda): at most 65535 slots");
  auto stream = c10::cuda::getCurrentCUDAStream();
  shrink_kernel<T><<<dim3(tokens, slots), 128, 0, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1),
      reinterpret_cast<const T*>(f.data_ptr()), sf, sc, sk, src, row_ids.data_ptr<int64_t>(),
      out.data_ptr<float>(), out.stride(0), out.stride(1), x.size(1), static_cast<int>(rank));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// y = x W^T + bias + scale * sum_j coef_j F[src_j] u_j, W given by strides over [N, K].
template <typename T>
Tensor fused(const Tensor& x, const Tensor& w, int64_t sw0, int64_t sw1, int64_t n_out,
             const std::optional<Tensor>& bias, const Tensor& u, const Tensor& f, int64_t sf,
             int64_t so, int64_t sc, const Source& src, const std::optional<Tensor>& coef,
             const RowPlan& plan, int64_t slots, int64_t rank, double scale) {
  const int64_t tokens = x.size(0);
  Tensor y = at::empty({tokens, n_out}, x.options());
  if (tokens == 0 || n_out == 0) return y;
  TORCH_CHECK(blocks(tokens, BM) <= 65535, "lora_mix (cuda): too many tokens for one call");
  FusedParams p;
  p.x = x.data_ptr();
  p.sx0 = x.stride(0);
  p.sx1 = x.stride(1);
  p.w = w.data_ptr();
  p.sw0 = sw0;
  p.sw1 = sw1;
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.u = u.data_ptr<float>();
  p.su0 = u.stride(0);
  p.su1 = u.stride(1);
  p.f = f.data_ptr();
  p.sf = sf;
  p.so = so;
  p.sc = sc;
  p.src = src;
  p.coef = coef.has_value() ? coef->data_ptr() : nullptr;
  p.scf0 = coef.has_value() ? coef->stride(0) : 0;
  p.scf1 = coef.has_value() ? coef->stride(1) : 0;
  p.y = y.data_ptr();
  p.order = plan.order.data_ptr<int64_t>();
  p.sorted_rows = plan.sorted_rows.data_ptr<int64_t>();
  p.row_start = plan.row_start.data_ptr<int64_t>();
  p.tokens = tokens;
  p.n_out = n_out;
  p.depth = x.size(1);
  p.rank = static_cast<int>(rank);
  p.slots = static_cast<int>(slots);
  p.scale = static_cast<float>(scale);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid(blocks(n_out, BN), blocks(tokens, BM));
  fused_kernel<T, !std::is_same_v<T, float>><<<grid, kFusedThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

template <typename T>
void segment_outer(const Tensor& P, const Tensor& Q, const Source& src,
                   const std::optional<Tensor>& coef, const RowPlan& plan, int64_t rows,
                   int64_t slots, int64_t rank, Tensor& out, int64_t sof, int64_t soo,
                   int64_t soc, double scale) {
  const int64_t width = P.size(1);
  if (P.size(0) == 0 || rows == 0) return;
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
  const std::optional<Tensor> bias_c =
      bias.has_value() ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
  const Tensor rows_c = row_ids.contiguous();
  const RowPlan plan = make_plan(rows_c, s.rows);
  const int64_t r = s.rank, d_in = s.d_in, d_out = s.d_out;
  Tensor y, sh;
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (mix_mode == 0) {
      const Source table = make_source(adapter_idx, false), own = make_source(adapter_idx, true);
      Tensor a_mix = mix<T>(lora_a, adapter_w, table);  // [R, r * d_in]
      Tensor b_mix = mix<T>(lora_b, adapter_w, table);  // [R, d_out * r]
      sh = shrink<T>(x, a_mix, r * d_in, d_in, 1, own, rows_c, 1, r);
      y = fused<T>(x, weight, weight.stride(0), weight.stride(1), d_out, bias_c, sh, b_mix,
                   d_out * r, r, 1, own, std::nullopt, plan, 1, r, scale);
    } else {
      const Source table = make_source(adapter_idx, false);
      sh = shrink<T>(x, lora_a, r * d_in, d_in, 1, table, rows_c, s.slots, r);
      y = fused<T>(x, weight, weight.stride(0), weight.stride(1), d_out, bias_c, sh, lora_b,
                   d_out * r, r, 1, table, adapter_w, plan, s.slots, r, scale);
    }
  });
  return {y, sh};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lora_mix_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& row_ids, const Tensor& weight,
    const Tensor& lora_a_in, const Tensor& lora_b_in, const Tensor& adapter_w,
    const std::optional<Tensor>& adapter_idx, const Tensor& shrink_in, double scale,
    int64_t mix_mode, bool need_x, bool need_weight, bool need_bias, bool need_lora) {
  const Sizes s = check_inputs(x, row_ids, weight, std::nullopt, lora_a_in, lora_b_in, adapter_w,
                               adapter_idx, mix_mode);
  check_cuda_dtype(x);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t kk = mix_mode == 1 ? s.slots : 1;
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.tokens && grad_y.size(1) == s.d_out,
              "lora_mix: grad_y must be [T, d_out], got ", shape(grad_y.sizes()));
  TORCH_CHECK(shrink_in.dim() == 3 && shrink_in.size(0) == s.tokens && shrink_in.size(1) == kk &&
                  shrink_in.size(2) == s.rank,
              "lora_mix: shrink must be [T, ", num(kk), ", r], got ", shape(shrink_in.sizes()));
  const Tensor g = grad_y.contiguous();
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
      const Source table = make_source(adapter_idx, false);
      if (mix_mode == 0) {
        const Source own = make_source(adapter_idx, true);
        Tensor a_mix = mix<T>(lora_a, adapter_w, table);
        Tensor b_mix = mix<T>(lora_b, adapter_w, table);
        // v = B_p^T g: F[f, c, k] = B_p[f, k, c]
        Tensor v = shrink<T>(g, b_mix, d_out * r, 1, r, own, rows_c, 1, r);
        if (need_x)  // dx = g W + scale * A_p^T v: W^T as [N = d_in, K = d_out], F = A_p^T
          dx = fused<T>(g, weight, weight.stride(1), weight.stride(0), d_in, std::nullopt, v,
                        a_mix, r * d_in, 1, d_in, own, std::nullopt, plan, 1, r, scale);
        if (need_lora) {
          Tensor da_mix = at::zeros({R, r * d_in}, f32), db_mix = at::zeros({R, d_out * r}, f32);
          segment_outer<T>(g, sh, own, std::nullopt, plan, R, 1, r, db_mix, d_out * r, r, 1,
                           scale);
          segment_outer<T>(x, v, own, std::nullopt, plan, R, 1, r, da_mix, r * d_in, 1, d_in,
                           scale);
          mix_backward<T>(da_mix, lora_a, adapter_w, table, da, dw);
          mix_backward<T>(db_mix, lora_b, adapter_w, table, db, dw);
        }
      } else {
        Tensor v = shrink<T>(g, lora_b, d_out * r, 1, r, table, rows_c, s.slots, r);
        if (need_x)
          dx = fused<T>(g, weight, weight.stride(1), weight.stride(0), d_in, std::nullopt, v,
                        lora_a, r * d_in, 1, d_in, table, adapter_w, plan, s.slots, r, scale);
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
