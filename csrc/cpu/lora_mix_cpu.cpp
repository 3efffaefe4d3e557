// CPU kernels of reclora::lora_mix_forward / lora_mix_backward (ATen + at::parallel_for).
//
// Plan (forward, factor mode):
//   A_p, B_p = mix(A), mix(B)                  each row's factors once (R*k*r*d)
//   for each run of consecutive tokens of one row, in one parallel pass:
//     y_run = bias + x_run W^T                 the base, single-threaded BLAS per run
//     s_run = x_run A_p[b]^T                   [len, r], saved for backward
//     y_run += scale * s_run B_p[b]^T          the only extra pass over y, while the
//                                              run's rows of y are still in cache
// When runs are short (shuffled tokens, one-token rows) the base is instead one multithreaded
// addmm over all tokens before the pass. Output mode shrinks over each slot j and expands
// sum_j w_j B[i_j] s_j the same way.
// Runs: tokens are counting-sorted by row once; a run is a maximal stretch of consecutive
// token indices of one row (the whole row when rows are packed), cut so that even one long
// row spreads over all threads.
//
// Precision: fp16/bf16 inputs are computed in fp32 (upcast once on entry, one rounding on
// exit), fp32 in fp32, fp64 in fp64 (for gradcheck). `shrink` is float32, or float64 for
// float64 inputs (as in the Triton backend).
//
// The small GEMMs call BLAS (?gemm_, exported by libtorch_cpu from its MKL) directly: an
// ATen at::mm call costs a few microseconds of dispatch each, and with one run per row that
// is several calls per row. The symbols are bound weakly; without them a plain loop runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "../lora_mix_common.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
// MKL's C entry (mkl_service.h maps mkl_set_num_threads_local to it); the lowercase
// symbol exported beside it is the Fortran one, which takes a pointer.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace reclora {
namespace {

using at::Tensor;

// Runs are cut to at most T / (2 * threads) tokens, within [kMinRun, kMaxRun]: two pieces per
// thread keep both threads busy when one row holds all tokens, and 32..256 tokens x d = 1024
// fp32 (128 KB..1 MB of x) still amortise a BLAS call.
constexpr int64_t kMinRun = 32, kMaxRun = 256;
// With runs at least this long on average (rows packed, as in training and prefill), the base
// GEMM is done inside the same parallel pass as the LoRA (see base_runs), so the op has one
// parallel region, as F.linear has. Measured here (2 threads, fp32, d = 1024, T = 512, load
// from other users): with a separate addmm and at::mm mixing the op took 6.3x F.linear, as
// each extra region paid a thread wake-up; with one region, 0.55x (F.linear pays one wake-up).
// Shorter runs (shuffled tokens, one-token rows) would turn the base into GEMVs: there the base
// is one addmm over all tokens and the LoRA is added afterwards.
constexpr int64_t kMinFusedRun = 16;

// C[m, n] = alpha * op(A) op(B) + beta * C, all row-major; op(A) is [m, k] (A stored [k, m]
// when ta), op(B) is [k, n] (B stored [n, k] when tb). lda/ldb/ldc are row strides.
template <typename T>
void gemm_naive(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        acc += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      }
      c[i * ldc + j] = alpha * acc + (beta == T(0) ? T(0) : beta * c[i * ldc + j]);
    }
  }
}

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int LDB = static_cast<int>(std::max<int64_t>(lda, 1));
  const int LDC = static_cast<int>(std::max<int64_t>(ldc, 1));
  // One BLAS thread per call: the calls run inside at::parallel_for, and MKL, told by
  // torch.set_num_threads(2) to use 2 threads, otherwise opened a nested team per call; on
  // this loaded 2-core machine that cost a 24 ms wake-up per call (the op at d = 64 took
  // 190 ms on 2 threads against 0.08 ms on 1). The setting is thread-local and restored.
  struct OneBlasThread {
    int prev = 0;
    OneBlasThread() {
      if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
    }
    ~OneBlasThread() {
      if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
    }
  } one_thread;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&tra, &trb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
      return;
    }
  }
  gemm_naive(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

struct Run {
  int64_t row, first, len;  // tokens first .. first+len-1 (consecutive indices) of one row
};

// Tokens counting-sorted by row (stable), then cut into runs; runs of row b are
// runs[run_start[b] .. run_start[b+1]).
struct Plan {
  std::vector<Run> runs;
  std::vector<int64_t> run_start;
};

Plan make_plan(const Tensor& row_ids, int64_t rows) {
  const int64_t tokens = row_ids.numel();
  const int64_t pieces = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t max_run = std::min(kMaxRun, std::max(kMinRun, (tokens + pieces - 1) / pieces));
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  std::vector<int64_t> count(rows + 1, 0);
  for (int64_t n = 0; n < tokens; ++n) {
    TORCH_CHECK(ids[n] >= 0 && ids[n] < rows, "lora_mix: row_ids values must lie in [0, ",
                num(rows), "), got ", num(ids[n]));
    ++count[ids[n] + 1];
  }
  for (int64_t b = 0; b < rows; ++b) count[b + 1] += count[b];
  std::vector<int64_t> order(tokens), fill(count.begin(), count.end() - 1);
  for (int64_t n = 0; n < tokens; ++n) order[fill[ids[n]]++] = n;
  Plan plan;
  plan.run_start.assign(rows + 1, 0);
  for (int64_t b = 0; b < rows; ++b) {
    plan.run_start[b] = static_cast<int64_t>(plan.runs.size());
    for (int64_t p = count[b]; p < count[b + 1];) {
      int64_t q = p + 1;
      while (q < count[b + 1] && order[q] == order[q - 1] + 1 && q - p < max_run) ++q;
      plan.runs.push_back({b, order[p], q - p});
      p = q;
    }
  }
  plan.run_start[rows] = static_cast<int64_t>(plan.runs.size());
  return plan;
}

// Adapter -> the (row, slot) pairs that use it, so that bank gradients can be accumulated
// adapter by adapter in parallel without two threads writing one adapter.
struct Users {
  std::vector<int64_t> start;  // [M + 1]
  std::vector<int64_t> pair;   // row * k + slot, grouped by adapter
};

Users make_users(const int64_t* idx, int64_t rows, int64_t slots, int64_t adapters) {
  Users u;
  u.start.assign(adapters + 1, 0);
  const int64_t pairs = rows * slots;
  for (int64_t q = 0; q < pairs; ++q) {
    const int64_t i = idx ? idx[q] : q % slots;
    TORCH_CHECK(i >= 0 && i < adapters, "lora_mix: adapter_idx values must lie in [0, ",
                num(adapters), "), got ", num(i));
    ++u.start[i + 1];
  }
  for (int64_t i = 0; i < adapters; ++i) u.start[i + 1] += u.start[i];
  u.pair.resize(pairs);
  std::vector<int64_t> fill(u.start.begin(), u.start.end() - 1);
  for (int64_t q = 0; q < pairs; ++q) u.pair[fill[idx ? idx[q] : q % slots]++] = q;
  return u;
}

void check_adapter_idx(const Tensor& idx, int64_t adapters) {
  if (!idx.defined()) return;
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t q = 0; q < idx.numel(); ++q)
    TORCH_CHECK(p[q] >= 0 && p[q] < adapters, "lora_mix: adapter_idx values must lie in [0, ",
                num(adapters), "), got ", num(p[q]));
}

inline int64_t source(const int64_t* idx, int64_t slots, int64_t b, int64_t j) {
  return idx ? idx[b * slots + j] : j;
}

// [M, *shape] bank -> [R, *shape] with out[b] = sum_j w[b, j] bank[i_j].
template <typename T>
Tensor mix_factors(const Tensor& bank, const Tensor& w, const int64_t* idx, int64_t adapters) {
  const int64_t rows = w.size(0), slots = w.size(1), size = bank[0].numel();
  if (idx == nullptr) {  // dense: one GEMM [R, M] x [M, size]
    return at::mm(w, bank.view({adapters, size}));
  }
  Tensor out = at::empty({rows, size}, bank.options());
  const T* src = bank.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      T* o = dst + b * size;
      std::fill(o, o + size, T(0));
      for (int64_t j = 0; j < slots; ++j) {
        const T wj = wp[b * slots + j];
        const T* a = src + idx[b * slots + j] * size;
        for (int64_t e = 0; e < size; ++e) o[e] += wj * a[e];
      }
    }
  });
  return out;
}

// out = sum_j w[b, j] bank[i_j] for one row b (size elements per adapter).
template <typename T>
void mix_row(const T* bank, int64_t size, const T* w, const int64_t* idx, int64_t slots,
             int64_t b, T* out) {
  std::fill(out, out + size, T(0));
  for (int64_t j = 0; j < slots; ++j) {
    const T wj = w[b * slots + j];
    const T* src = bank + source(idx, slots, b, j) * size;
    for (int64_t e = 0; e < size; ++e) out[e] += wj * src[e];
  }
}

struct Args {
  Tensor x, weight, bias, lora_a, lora_b, adapter_w, idx;
  at::ScalarType in_dtype, comp;
};

// Every float input in the compute dtype (fp32, or fp64), contiguous.
Args upcast(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
            const Tensor& lora_a, const Tensor& lora_b, const Tensor& adapter_w,
            const std::optional<Tensor>& adapter_idx) {
  Args a;
  a.in_dtype = x.scalar_type();
  TORCH_CHECK(a.in_dtype == at::kFloat || a.in_dtype == at::kDouble || a.in_dtype == at::kHalf ||
                  a.in_dtype == at::kBFloat16,
              "lora_mix (cpu): dtype must be float16, bfloat16, float32 or float64, got ",
              a.in_dtype);
  a.comp = a.in_dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto conv = [&](const Tensor& t) { return t.to(a.comp).contiguous(); };
  a.x = conv(x);
  a.weight = conv(weight);
  if (bias.has_value()) a.bias = conv(*bias);
  a.lora_a = conv(lora_a);
  a.lora_b = conv(lora_b);
  a.adapter_w = conv(adapter_w);
  if (adapter_idx.has_value()) a.idx = adapter_idx->contiguous();
  return a;
}

// y_run = bias + x_run W^T (single-threaded BLAS inside the caller's parallel pass)
template <typename T>
void base_run(const Args& a, const Sizes& s, const Run& u, T* y) {
  T* yr = y + u.first * s.d_out;
  T beta = T(0);
  if (a.bias.defined()) {
    const T* b = a.bias.data_ptr<T>();
    for (int64_t n = 0; n < u.len; ++n) std::copy(b, b + s.d_out, yr + n * s.d_out);
    beta = T(1);
  }
  gemm<T>(false, true, u.len, s.d_out, s.d_in, T(1), a.x.data_ptr<T>() + u.first * s.d_in, s.d_in,
          a.weight.data_ptr<T>(), s.d_in, beta, yr, s.d_out);
}

// The base of runs[lo, hi): one GEMM per stretch of runs whose tokens follow each other (all
// of them when rows are packed), so W is read once per thread's share, as in a threaded GEMM
// split by rows. Per-run GEMMs instead re-read W per run: at d = 2048 (W = 16 MB) that took the
// op from 1.05x to 1.11x F.linear on one thread.
template <typename T>
void base_runs(const Args& a, const Sizes& s, const std::vector<Run>& runs, int64_t lo,
               int64_t hi, T* y) {
  for (int64_t q = lo; q < hi;) {
    int64_t e = q + 1;
    while (e < hi && runs[e].first == runs[e - 1].first + runs[e - 1].len) ++e;
    const int64_t len = runs[e - 1].first + runs[e - 1].len - runs[q].first;
    base_run<T>(a, s, Run{runs[q].row, runs[q].first, len}, y);
    q = e;
  }
}

// y += LoRA part; with fuse_base, y is uninitialised and each thread first computes the base
// of its share of the runs.
template <typename T>
void forward_lora(const Args& a, const Sizes& s, const Plan& plan, double scale_d, int64_t mix,
                  bool fuse_base, Tensor& y, Tensor& shrink) {
  const int64_t r = s.rank, k = s.slots, d_in = s.d_in, d_out = s.d_out;
  const T scale = static_cast<T>(scale_d);
  const int64_t* idx = a.idx.defined() ? a.idx.data_ptr<int64_t>() : nullptr;
  const T* x = a.x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  T* sp = shrink.data_ptr<T>();
  const auto& runs = plan.runs;
  if (mix == 0) {
    // Each row's factors are mixed inside the same parallel pass, by whichever thread first
    // meets one of the row's runs: every extra parallel region costs a thread wake-up, and on
    // this loaded 2-core machine a multithreaded at::mm of [R, M] x [M, r*d] took 24 ms
    // against 0.02 ms on one thread (F.linear itself pays that once).
    Tensor a_mix = at::empty({s.rows, r * d_in}, a.x.options());
    Tensor b_mix = at::empty({s.rows, d_out * r}, a.x.options());
    T* ap = a_mix.data_ptr<T>();
    T* bp = b_mix.data_ptr<T>();
    const T* wp = a.adapter_w.data_ptr<T>();
    std::vector<std::once_flag> mixed(s.rows);
    auto ensure_mixed = [&](int64_t b) {
      std::call_once(mixed[b], [&] {
        mix_row<T>(a.lora_a.data_ptr<T>(), r * d_in, wp, idx, k, b, ap + b * r * d_in);
        mix_row<T>(a.lora_b.data_ptr<T>(), d_out * r, wp, idx, k, b, bp + b * d_out * r);
      });
    };
    at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t lo, int64_t hi) {
      if (fuse_base) base_runs<T>(a, s, runs, lo, hi, yp);
      for (int64_t q = lo; q < hi; ++q) {
        const Run& u = runs[q];
        ensure_mixed(u.row);
        T* sr = sp + u.first * r;
        gemm<T>(false, true, u.len, r, d_in, T(1), x + u.first * d_in, d_in,
                ap + u.row * r * d_in, d_in, T(0), sr, r);
        gemm<T>(false, true, u.len, d_out, r, scale, sr, r, bp + u.row * d_out * r, r, T(1),
                yp + u.first * d_out, d_out);
      }
    });
  } else {
    const T* ap = a.lora_a.data_ptr<T>();
    const T* bp = a.lora_b.data_ptr<T>();
    const T* wp = a.adapter_w.data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t lo, int64_t hi) {
      if (fuse_base) base_runs<T>(a, s, runs, lo, hi, yp);
      for (int64_t q = lo; q < hi; ++q) {
        const Run& u = runs[q];
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = source(idx, k, u.row, j);
          T* sr = sp + u.first * k * r + j * r;
          gemm<T>(false, true, u.len, r, d_in, T(1), x + u.first * d_in, d_in,
                  ap + i * r * d_in, d_in, T(0), sr, k * r);
          gemm<T>(false, true, u.len, d_out, r, scale * wp[u.row * k + j], sr, k * r,
                  bp + i * d_out * r, r, T(1), yp + u.first * d_out, d_out);
        }
      }
    });
  }
}

std::tuple<Tensor, Tensor> lora_mix_forward_cpu(
    const Tensor& x, const Tensor& row_ids, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& lora_a, const Tensor& lora_b, const Tensor& adapter_w,
    const std::optional<Tensor>& adapter_idx, double scale, int64_t mix) {
  const Sizes s = check_inputs(x, row_ids, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                               mix);
  Args a = upcast(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx);
  check_adapter_idx(a.idx, s.adapters);
  const int64_t slots_out = mix == 1 ? s.slots : 1;
  Tensor shrink = at::empty({s.tokens, slots_out, s.rank}, a.x.options());
  Plan plan;
  if (s.tokens > 0) plan = make_plan(row_ids.contiguous(), s.rows);
  const bool fuse_base =
      !plan.runs.empty() && s.tokens >= kMinFusedRun * static_cast<int64_t>(plan.runs.size());
  Tensor y;
  if (fuse_base) {
    y = at::empty({s.tokens, s.d_out}, a.x.options());
  } else {
    y = a.bias.defined() ? at::addmm(a.bias, a.x, a.weight.t()) : at::mm(a.x, a.weight.t());
  }
  if (s.tokens > 0) {
    AT_DISPATCH_FLOATING_TYPES(a.comp, "lora_mix_forward_cpu", [&] {
      forward_lora<scalar_t>(a, s, plan, scale, mix, fuse_base, y, shrink);
    });
  }
  return {y.to(a.in_dtype), shrink};
}

template <typename T>
T dot(const T* p, const T* q, int64_t n) {
  T acc = 0;
  for (int64_t e = 0; e < n; ++e) acc += p[e] * q[e];
  return acc;
}

// Factor mode: gradients of the mixed factors -> bank gradients and mixture weights.
//   dbank[i] += sum_{(b, j) using i} w[b, j] dmix[b];  dw[b, j] += <dmix[b], bank[i_j]>
template <typename T>
void mix_backward(const Tensor& dmix, const Tensor& bank, const Tensor& w, const int64_t* idx,
                  const Users& users, Tensor& dbank, Tensor& dw) {
  const int64_t rows = w.size(0), slots = w.size(1), adapters = bank.size(0);
  const int64_t size = bank[0].numel();
  if (idx == nullptr) {  // dense: two GEMMs
    dbank.view({adapters, size}).addmm_(w.t(), dmix.view({rows, size}));
    dw.addmm_(dmix.view({rows, size}), bank.view({adapters, size}).t());
    return;
  }
  const T* dm = dmix.data_ptr<T>();
  const T* bk = bank.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* db = dbank.data_ptr<T>();
  T* dwp = dw.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t j = 0; j < slots; ++j)
        dwp[b * slots + j] += dot(dm + b * size, bk + idx[b * slots + j] * size, size);
  });
  at::parallel_for(0, adapters, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T* o = db + i * size;
      for (int64_t p = users.start[i]; p < users.start[i + 1]; ++p) {
        const int64_t q = users.pair[p];
        const T wq = wp[q];
        const T* g = dm + (q / slots) * size;
        for (int64_t e = 0; e < size; ++e) o[e] += wq * g[e];
      }
    }
  });
}

template <typename T>
void backward_lora(const Args& a, const Tensor& g_t, const Tensor& shrink_t, const Sizes& s,
                   const Plan& plan, double scale_d, int64_t mix, bool need_x, bool need_lora,
                   Tensor& dx, Tensor& da, Tensor& db, Tensor& dw) {
  const int64_t r = s.rank, k = s.slots, d_in = s.d_in, d_out = s.d_out, R = s.rows;
  const T scale = static_cast<T>(scale_d);
  const int64_t* idx = a.idx.defined() ? a.idx.data_ptr<int64_t>() : nullptr;
  const T* x = a.x.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  const T* sh = shrink_t.data_ptr<T>();
  T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
  const auto& runs = plan.runs;
  const int64_t nruns = static_cast<int64_t>(runs.size());
  const int64_t kk = mix == 0 ? 1 : k;
  Tensor v_t = at::empty({s.tokens, kk * r}, g_t.options());  // v_j = B_j^T g (unscaled)
  T* v = v_t.data_ptr<T>();
  Users users;
  if (need_lora) users = make_users(idx, R, k, s.adapters);

  if (mix == 0) {
    Tensor a_mix = mix_factors<T>(a.lora_a, a.adapter_w, idx, s.adapters);
    Tensor b_mix = mix_factors<T>(a.lora_b, a.adapter_w, idx, s.adapters);
    const T* ap = a_mix.data_ptr<T>();
    const T* bp = b_mix.data_ptr<T>();
    // v = g B_p, dx += scale * v A_p
    at::parallel_for(0, nruns, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        const Run& u = runs[q];
        T* vr = v + u.first * r;
        gemm<T>(false, false, u.len, r, d_out, T(1), g + u.first * d_out, d_out,
                bp + u.row * d_out * r, r, T(0), vr, r);
        if (need_x)
          gemm<T>(false, false, u.len, d_in, r, scale, vr, r, ap + u.row * r * d_in, d_in, T(1),
                  dxp + u.first * d_in, d_in);
      }
    });
    if (!need_lora) return;
    // dA_p[b] = scale * sum_n v_n x_n^T, dB_p[b] = scale * sum_n g_n s_n^T (row by row)
    Tensor da_mix = at::zeros({R, r * d_in}, g_t.options());
    Tensor db_mix = at::zeros({R, d_out * r}, g_t.options());
    T* dap = da_mix.data_ptr<T>();
    T* dbp = db_mix.data_ptr<T>();
    at::parallel_for(0, R, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        for (int64_t q = plan.run_start[b]; q < plan.run_start[b + 1]; ++q) {
          const Run& u = runs[q];
          gemm<T>(true, false, r, d_in, u.len, scale, v + u.first * r, r, x + u.first * d_in,
                  d_in, T(1), dap + b * r * d_in, d_in);
          gemm<T>(true, false, d_out, r, u.len, scale, g + u.first * d_out, d_out,
                  sh + u.first * r, r, T(1), dbp + b * d_out * r, r);
        }
      }
    });
    mix_backward<T>(da_mix, a.lora_a, a.adapter_w, idx, users, da, dw);
    mix_backward<T>(db_mix, a.lora_b, a.adapter_w, idx, users, db, dw);
    return;
  }

  // Output mode. v_j = g B[i_j]; dx += scale * sum_j w_j v_j A[i_j]
  const T* ap = a.lora_a.data_ptr<T>();
  const T* bp = a.lora_b.data_ptr<T>();
  const T* wp = a.adapter_w.data_ptr<T>();
  at::parallel_for(0, nruns, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const Run& u = runs[q];
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = source(idx, k, u.row, j);
        T* vr = v + u.first * k * r + j * r;
        gemm<T>(false, false, u.len, r, d_out, T(1), g + u.first * d_out, d_out,
                bp + i * d_out * r, r, T(0), vr, k * r);
        if (need_x)
          gemm<T>(false, false, u.len, d_in, r, scale * wp[u.row * k + j], vr, k * r,
                  ap + i * r * d_in, d_in, T(1), dxp + u.first * d_in, d_in);
      }
    }
  });
  if (!need_lora) return;
  // dw[b, j] = scale * sum_{n in b} <v_j(n), s_j(n)>
  T* dwp = dw.data_ptr<T>();
  at::parallel_for(0, R, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t q = plan.run_start[b]; q < plan.run_start[b + 1]; ++q) {
        const Run& u = runs[q];
        for (int64_t n = u.first; n < u.first + u.len; ++n)
          for (int64_t j = 0; j < k; ++j)
            dwp[b * k + j] += scale * dot(v + (n * k + j) * r, sh + (n * k + j) * r, r);
      }
  });
  // dA[i] += scale * w * v_j^T x, dB[i] += scale * w * g^T s_j, adapter by adapter.
  T* dap = da.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
  at::parallel_for(0, s.adapters, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t p = users.start[i]; p < users.start[i + 1]; ++p) {
        const int64_t pair = users.pair[p], b = pair / k, j = pair % k;
        const T coef = scale * wp[pair];
        for (int64_t q = plan.run_start[b]; q < plan.run_start[b + 1]; ++q) {
          const Run& u = runs[q];
          gemm<T>(true, false, r, d_in, u.len, coef, v + u.first * k * r + j * r, k * r,
                  x + u.first * d_in, d_in, T(1), dap + i * r * d_in, d_in);
          gemm<T>(true, false, d_out, r, u.len, coef, g + u.first * d_out, d_out,
                  sh + u.first * k * r + j * r, k * r, T(1), dbp + i * d_out * r, r);
        }
      }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lora_mix_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& row_ids, const Tensor& weight,
    const Tensor& lora_a, const Tensor& lora_b, const Tensor& adapter_w,
    const std::optional<Tensor>& adapter_idx, const Tensor& shrink, double scale, int64_t mix,
    bool need_x, bool need_weight, bool need_bias, bool need_lora) {
  const Sizes s = check_inputs(x, row_ids, weight, std::nullopt, lora_a, lora_b, adapter_w,
                               adapter_idx, mix);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.tokens && grad_y.size(1) == s.d_out,
              "lora_mix: grad_y must be [T, d_out], got ", shape(grad_y.sizes()));
  const int64_t slots_out = mix == 1 ? s.slots : 1;
  TORCH_CHECK(shrink.dim() == 3 && shrink.size(0) == s.tokens && shrink.size(1) == slots_out &&
                  shrink.size(2) == s.rank,
              "lora_mix: shrink must be [T, ", num(slots_out), ", r], got ", shape(shrink.sizes()));
  Args a = upcast(x, weight, std::nullopt, lora_a, lora_b, adapter_w, adapter_idx);
  check_adapter_idx(a.idx, s.adapters);
  Tensor g = grad_y.to(a.comp).contiguous();
  Tensor dx = need_x ? at::mm(g, a.weight) : Tensor();
  Tensor da, db, dw;
  if (need_lora) {
    da = at::zeros_like(a.lora_a);
    db = at::zeros_like(a.lora_b);
    dw = at::zeros_like(a.adapter_w);
  }
  if (s.tokens > 0 && (need_x || need_lora)) {
    const Plan plan = make_plan(row_ids.contiguous(), s.rows);
    Tensor sh = shrink.to(a.comp).contiguous();
    AT_DISPATCH_FLOATING_TYPES(a.comp, "lora_mix_backward_cpu", [&] {
      backward_lora<scalar_t>(a, g, sh, s, plan, scale, mix, need_x, need_lora, dx, da, db, dw);
    });
  }
  auto out = [&](bool flag, const Tensor& t) {
    return flag ? t.to(a.in_dtype) : none_like(x);
  };
  Tensor dweight = need_weight ? at::mm(g.t(), a.x).to(a.in_dtype) : none_like(x);
  Tensor dbias = need_bias ? g.sum(0).to(a.in_dtype) : none_like(x);
  return {out(need_x, dx), dweight, dbias, out(need_lora, da), out(need_lora, db),
          out(need_lora, dw)};
}

}  // namespace

TORCH_LIBRARY_IMPL(reclora, CPU, m) {
  m.impl("lora_mix_forward", &lora_mix_forward_cpu);
  m.impl("lora_mix_backward", &lora_mix_backward_cpu);
}

}  // namespace reclora
