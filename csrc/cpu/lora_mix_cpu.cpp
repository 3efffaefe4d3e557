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
// addmm over all tokens before the pass. Output mode: one shrink GEMM against the row's k*r
// concatenated rows of A (the bank itself when dense), the weights applied to the [len, k*r]
// result, one expand GEMM against the k*r concatenated columns of B: x and y are each passed
// once for all k slots, forward and backward.
// Runs: tokens are counting-sorted by row once; a run is a maximal stretch of consecutive
// token indices of one row (the whole row when rows are packed), cut so that even one long
// row spreads over all threads.
//
// Precision and dtypes: fp32 in fp32, fp64 in fp64 (for gradcheck). fp16/bf16 are never upcast
// as a whole: the base (x W^T, and dx = g W, dW = g^T x) is one ATen GEMM in the input dtype,
// the path F.linear takes (oneDNN; AMX/AVX512-BF16 where the CPU has them); the thin LoRA GEMMs
// take half operands with fp32 accumulation (MKL gemm_bf16bf16f32 / gemm_f16f16f32), or fp32
// operands where one side is a small fp32 tensor (the per-row mixed factors, the shrink); each
// run's LoRA part is summed in an fp32 tile and added to the half base in one pass. `shrink`
// is float32, or float64 for float64 inputs (as in the Triton backend).
//
// The small GEMMs call BLAS (?gemm_, exported by libtorch_cpu from its MKL) directly: an
// ATen at::mm call costs a few microseconds of dispatch each, and with one run per row that
// is several calls per row. The symbols are bound weakly; without them a plain loop runs.
// fp32 GEMMs with a thin side (the rank) go instead to thin_gemm.h's AVX2 loops on non-Intel
// CPUs, where MKL runs those shapes on its generic code path (see there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <memory>
#include <thread>
#include <vector>

#include "../lora_mix_common.h"
#include "bf16_gemm.h"
#include "thin_gemm.h"

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
// MKL's half-precision GEMMs with fp32 accumulation and output (CBLAS: layout 101 = row major,
// transpose 111 = no, 112 = yes; MKL_BF16 and MKL_F16 are 16-bit integers).
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
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
// The backward's smaller passes (the per-row factor gradients, mixing them back into the bank,
// the output mode's dw and scatter) run on one thread below this many multiply-adds: each
// parallel region ends in a barrier, and on a 2-core machine shared with other jobs (load
// average 8 while measuring, 2026-11) a barrier often waits out a scheduler time slice,
// milliseconds; 2^24 was chosen then. On the idle AMD EPYC (2026-12-01) 2^20 took the fp32
// factor backward's LoRA part at d = 576, T = 1024 from 1.26 to 1.07 ms (9.4M multiply-adds
// on two threads instead of one; the backward op alone, median of 40 calls, a one-off
// timing); a loaded machine may prefer the old value.
constexpr int64_t kMinParallelWork = int64_t(1) << 20;

// at::parallel_for's grain for n items that cost `work` multiply-adds in all: n (inline, no
// parallel region) when the work is small, else 1.
inline int64_t grain(int64_t work, int64_t n) {
  return work < kMinParallelWork ? std::max<int64_t>(n, 1) : 1;
}

// Whether fp32 GEMMs with a side of at most thin::kMaxThin go to thin_gemm.h's AVX2 loops (1)
// or to BLAS (0). Default: the loops on CPUs with AVX2+FMA that are not Intel's, where MKL
// takes its generic code path for such shapes (thin_gemm.h); on Intel CPUs MKL as before (not
// re-measured there). RECLORA_CPU_THIN=avx2|blas overrides; reclora::cpu_thin_gemm switches
// it at run time (the tests run both paths).
int default_thin_mode() {
  const char* env = std::getenv("RECLORA_CPU_THIN");
  if (env != nullptr && std::strcmp(env, "blas") == 0) return 0;
  if (!thin::cpu_has_avx2()) return 0;
  if (env != nullptr && std::strcmp(env, "avx2") == 0) return 1;
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_is("intel") ? 0 : 1;
#else
  return 0;
#endif
}
std::atomic<int> g_thin_mode{default_thin_mode()};
inline bool thin_on() { return g_thin_mode.load(std::memory_order_relaxed) == 1; }

// Where the base GEMM of half inputs runs: 0 = ATen in the input dtype (what F.linear uses:
// oneDNN on CPUs with AVX512/AMX bf16 support), 1 = MKL's gemm_bf16bf16f32 / gemm_f16f16f32
// inside the op's parallel pass, into an fp32 tile that the LoRA part joins before one
// rounding. reclora_kernels.ops sets 1 where torch reports no oneDNN bf16 support: there
// ATen's half GEMM is a scalar loop (AMD EPYC, d = 1024, T = 512: bf16 F.linear 53 ms, fp32
// 7.8 ms, benchmarks/results/cpu_issue13_amd_*.md; on one core MKL's bf16 GEMM took 16 ms
// against ATen's bf16 mm 113 ms, timed through ctypes, 2026-12-01). 2 = MKL for fp16 only,
// where torch has oneDNN bf16 but not fp16 (Zen 5 EPYC, AVX512-BF16 without AVX512-FP16, 2
// threads, d = 1024, T = 512, 2026-12-02: fp16 F.linear 20.5 ms, the op with MKL's fp16 base
// 8.1 ms, fp32 F.linear 5.1 ms; medians of 10 calls).
std::atomic<int> g_half_base_mode{0};
inline bool half_base_in_mkl(at::ScalarType t) {
  const int mode = g_half_base_mode.load(std::memory_order_relaxed);
  if (mode == 0 || (mode == 2 && t != at::kHalf)) return false;
  return t == at::kBFloat16 ? cblas_gemm_bf16bf16f32 != nullptr
                            : t == at::kHalf && cblas_gemm_f16f16f32 != nullptr;
}

// Else, with the bf16 loops on (bf16_gemm.h), the base GEMM still goes through ATen, but one
// stretch of runs at a time inside the op's parallel pass (aten_base_runs), the LoRA part added
// into y right after, while its rows are in cache, and one parallel region instead of two. AMD
// EPYC (Zen 5), 2 threads, factor forward at issue 13's sizes (d, T) = (1024, 512), (2048, 512),
// (576, 1024), bench_lora.py in one run each: 1.21x, 1.07x, 1.22x F.linear with a separate
// at::mm, 1.12x, 1.03x, 1.15x inside the pass (2026-12-02).
inline bool half_base_in_pass(at::ScalarType t) {
  return !half_base_in_mkl(t) && t == at::kBFloat16 && bf16::on();
}

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
};

// Per-item "run once" flags for work done by whichever thread first needs it (a row's mixed
// factors, its concatenated adapters). Not std::call_once: glibc ends every call_once with a
// futex wake syscall, waiters or not, i.e. one syscall per row per op call (strace: 2 a call
// at R = 2). Here a done flag costs one atomic load; a thread that finds another mid-way
// yields until it is done (the work is one row's mixing, microseconds). If the work throws,
// the flag is released and the next thread that needs it tries again, as std::call_once does.
class OnceFlags {
 public:
  explicit OnceFlags(int64_t n) : n_(std::max<int64_t>(n, 1)), state_(new std::atomic<int>[n_]) {
    for (int64_t i = 0; i < n_; ++i) state_[i].store(kIdle, std::memory_order_relaxed);
  }
  template <typename F>
  void run(int64_t i, F&& work) {
    std::atomic<int>& st = state_[i];
    for (;;) {
      int seen = st.load(std::memory_order_acquire);
      if (seen == kDone) return;
      if (seen == kIdle && st.compare_exchange_strong(seen, kBusy, std::memory_order_acq_rel)) {
        try {
          work();
        } catch (...) {
          st.store(kIdle, std::memory_order_release);
          throw;
        }
        st.store(kDone, std::memory_order_release);
        return;
      }
      std::this_thread::yield();
    }
  }

 private:
  static constexpr int kIdle = 0, kBusy = 1, kDone = 2;
  int64_t n_;
  std::unique_ptr<std::atomic<int>[]> state_;
};

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
  if constexpr (std::is_same_v<T, float>) {
    if (thin_on() && thin::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc))
      return;
  }
  OneBlasThread one_thread;
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

// Whether the runs are long enough on average (kMinFusedRun) for the base GEMM to go inside
// the op's parallel pass, stretch by stretch of runs.
inline bool long_runs(const Plan& plan, int64_t tokens) {
  return !plan.runs.empty() && tokens >= kMinFusedRun * static_cast<int64_t>(plan.runs.size());
}

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

// --- dtypes -----------------------------------------------------------------------------------
// T is the input dtype (float, double, BFloat16, Half); Acc<T> the accumulation dtype (double
// for double, float otherwise). Half inputs are never upcast as a whole: the base GEMMs run in
// T through ATen (oneDNN, as F.linear does), the thin LoRA GEMMs take T operands with fp32
// accumulation (MKL's gemm_bf16bf16f32 / gemm_f16f16f32), and the only fp32 tensors are the
// small ones: the per-row mixed factors, the [T, k*r] shrink, per-thread tiles.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
constexpr bool kHalf = !std::is_same_v<T, Acc<T>>;

// A 16-bit type's raw bits, for the loops written on them (bf16_gemm.h and below). Templated
// so that code shared by every T compiles; only bf16 and fp16 pointers reach it at run time.
template <typename T>
inline const uint16_t* bits(const T* p) { return reinterpret_cast<const uint16_t*>(p); }
template <typename T>
inline uint16_t* bits(T* p) { return reinterpret_cast<uint16_t*>(p); }

// Whether T's thin GEMMs take bf16_gemm.h's AVX512-BF16 loops (bf16 on a CPU that has them).
template <typename T>
inline bool bf16_loops() {
  if constexpr (std::is_same_v<T, at::BFloat16>) return bf16::on();
  return false;
}

// C (Acc) = alpha * op(A) op(B) + beta * C with A, B in T (see gemm for the layout); A B^T of
// bf16 in bf16_gemm.h's loops where bf16_loops.
template <typename T>
void gemm_acc(bool ta, bool tb, int64_t m, int64_t n, int64_t k, Acc<T> alpha, const T* a,
              int64_t lda, const T* b, int64_t ldb, Acc<T> beta, Acc<T>* c, int64_t ldc) {
  if constexpr (!kHalf<T>) {
    gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j)
          c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
      return;
    }
    if (bf16_loops<T>() && !ta && tb) {
      bf16::dots(m, n, k, alpha, bits(a), lda,
                 bits(b), ldb, beta, c, ldc);
      return;
    }
    auto fn = std::is_same_v<T, at::BFloat16> ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
    if (fn != nullptr) {
      OneBlasThread one_thread;
      fn(101 /* row major */, ta ? 112 : 111, tb ? 112 : 111, static_cast<int>(m),
         static_cast<int>(n), static_cast<int>(k), alpha, bits(a),
         static_cast<int>(std::max<int64_t>(lda, 1)), bits(b),
         static_cast<int>(std::max<int64_t>(ldb, 1)), beta, c,
         static_cast<int>(std::max<int64_t>(ldc, 1)));
      return;
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        float acc = 0;
        for (int64_t p = 0; p < k; ++p)
          acc += static_cast<float>(ta ? a[p * lda + i] : a[i * lda + p]) *
                 static_cast<float>(tb ? b[j * ldb + p] : b[p * ldb + j]);
        c[i * ldc + j] = alpha * acc + (beta == 0.f ? 0.f : beta * c[i * ldc + j]);
      }
    }
  }
}

// --- bf16 element loops, vectorised -----------------------------------------------------------
// The extension is compiled for the baseline x86-64 (it must load on any CPU), where the bf16
// <-> fp32 conversions of c10::BFloat16 run one element at a time; next to the AMX/AVX512-BF16
// base GEMM those scalar loops (mixing the factors, adding the LoRA tile to y) cost as much as
// the LoRA GEMMs. These loops are written on the raw 16-bit patterns, compiled a second time
// for AVX512 (function attribute) and picked at run time when the CPU has it.
// fp32 -> bf16 rounds to nearest even and keeps NaN a NaN, as c10::BFloat16 does.
inline float bf16_f(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t r = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? static_cast<uint16_t>(0x7FC0) : r;
}

#define RECLORA_BF16_LOOPS(ATTR, SUFFIX)                                                        \
  ATTR static void axpy_bf16##SUFFIX(float* out, float w, const uint16_t* src, int64_t n) {   \
    for (int64_t e = 0; e < n; ++e) out[e] += w * bf16_f(src[e]);                               \
  }                                                                                             \
  ATTR static void round_bf16##SUFFIX(const float* src, int64_t n, uint16_t* dst) {           \
    for (int64_t e = 0; e < n; ++e) dst[e] = f_bf16(src[e]);                                    \
  }                                                                                             \
  ATTR static void add_bf16##SUFFIX(uint16_t* dst, const float* src, int64_t n) {             \
    for (int64_t e = 0; e < n; ++e) dst[e] = f_bf16(bf16_f(dst[e]) + src[e]);                   \
  }

RECLORA_BF16_LOOPS(, _base)
#if defined(__x86_64__) && defined(__GNUC__)
RECLORA_BF16_LOOPS(RECLORA_AVX512, _auto512)
// (RECLORA_AVX512 and the conversions are bf16_gemm.h's)
RECLORA_AVX512 static void add_bf16_avx512(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t o = 0; o < n; o += 16) {
    const __mmask16 m = bf16::first16(n - o);
    bf16::narrow16(dst + o,
                   _mm512_add_ps(bf16::widen16(dst + o, m), _mm512_maskz_loadu_ps(m, src + o)),
                   m);
  }
}
static void axpy_bf16_avx512(float* out, float w, const uint16_t* src, int64_t n) {
  axpy_bf16_auto512(out, w, src, n);
}
static void round_bf16_avx512(const float* src, int64_t n, uint16_t* dst) {
  round_bf16_auto512(src, n, dst);
}
static const bool kAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#define RECLORA_PICK(name, ...) (kAvx512 ? name##_avx512(__VA_ARGS__) : name##_base(__VA_ARGS__))
#else
#define RECLORA_PICK(name, ...) name##_base(__VA_ARGS__)
#endif

// A per-thread scratch buffer that, unlike std::vector::resize, does not zero what it grows
// (a 1 MB memset per run showed up at 1.4% of the bf16 forward's samples).
template <typename A>
struct Scratch {
  std::unique_ptr<A[]> p;
  int64_t n = 0;
  void resize(int64_t m) {
    if (m > n) {
      p.reset(new A[m]);
      n = m;
    }
  }
  A* data() { return p.get(); }
};


// dst (T, rows of `cols` at stride ld_dst) = round(dst + src) for half T (the epilogue that adds
// a LoRA tile to the base the half GEMM wrote).
template <typename T>
void add_tile(T* dst, int64_t ld_dst, const Acc<T>* src, int64_t rows, int64_t cols) {
  for (int64_t n = 0; n < rows; ++n) {
    T* o = dst + n * ld_dst;
    const Acc<T>* p = src + n * cols;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      RECLORA_PICK(add_bf16, bits(o), p, cols);
    } else {
      for (int64_t e = 0; e < cols; ++e) o[e] = static_cast<T>(static_cast<Acc<T>>(o[e]) + p[e]);
    }
  }
}

// out = sum_j w[b, j] bank[i_j] for one row b (size elements per adapter), in Acc.
template <typename T>
void mix_row(const T* bank, int64_t size, const Acc<T>* w, const int64_t* idx, int64_t slots,
             int64_t b, Acc<T>* out) {
  if constexpr (std::is_same_v<T, float>) {
    // Dense: out = w[b, :] bank[M, size], one GEMM (out written once instead of k times).
    if (idx == nullptr && thin_on()) {
      gemm<float>(false, false, 1, size, slots, 1.f, w + b * slots, slots, bank, size, 0.f, out,
                  size);
      return;
    }
  }
  if (bf16_loops<T>()) {
    bf16::mix(reinterpret_cast<float*>(out), bits(bank), size,
              reinterpret_cast<const float*>(w + b * slots),
              idx != nullptr ? idx + b * slots : nullptr, slots);
    return;
  }
  std::fill(out, out + size, Acc<T>(0));
  for (int64_t j = 0; j < slots; ++j) {
    const Acc<T> wj = w[b * slots + j];
    const T* src = bank + source(idx, slots, b, j) * size;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      RECLORA_PICK(axpy_bf16, out, wj, bits(src), size);
    } else {
      for (int64_t e = 0; e < size; ++e) out[e] += wj * static_cast<Acc<T>>(src[e]);
    }
  }
}

template <typename T>
void round_to(const Acc<T>* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    RECLORA_PICK(round_bf16, src, n, bits(dst));
  } else {
    for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<T>(src[e]);
  }
}

// [rows, cols] -> [cols, rows] (row-major, Acc).
template <typename A>
void transpose_into(const A* src, int64_t rows, int64_t cols, A* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

struct Args {
  Tensor x, weight, bias, lora_a, lora_b, adapter_w, idx;  // adapter_w in Acc, the rest as given
  at::ScalarType dtype;
};

// Contiguous inputs in their own dtype (a copy only for strided ones); the mixture weights
// ([R, k], tiny) in the accumulation dtype.
Args prepare(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
             const Tensor& lora_a, const Tensor& lora_b, const Tensor& adapter_w,
             const std::optional<Tensor>& adapter_idx) {
  Args a;
  a.dtype = x.scalar_type();
  TORCH_CHECK(a.dtype == at::kFloat || a.dtype == at::kDouble || a.dtype == at::kHalf ||
                  a.dtype == at::kBFloat16,
              "lora_mix (cpu): dtype must be float16, bfloat16, float32 or float64, got ",
              a.dtype);
  a.x = x.contiguous();
  a.weight = weight.contiguous();
  if (bias.has_value()) a.bias = bias->contiguous();
  a.lora_a = lora_a.contiguous();
  a.lora_b = lora_b.contiguous();
  a.adapter_w = adapter_w.to(a.dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  if (adapter_idx.has_value()) a.idx = adapter_idx->contiguous();
  return a;
}

// y_run = bias + x_run W^T (fp32/fp64: single-threaded BLAS inside the caller's parallel pass)
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

// out = bias + in w_op for the tokens of runs[lo, hi), through ATen in the input dtype (oneDNN,
// the GEMM F.linear uses), one call per stretch of consecutive tokens, inside the caller's
// parallel pass (where ATen runs it on the calling thread). w_op is W^T for the forward's base
// and W for dx's.
void aten_base_runs(const Tensor& in, const Tensor& w_op, const Tensor& bias,
                    const std::vector<Run>& runs, int64_t lo, int64_t hi, Tensor& out) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: plain kernels only
  for (int64_t q = lo; q < hi;) {
    int64_t e = q + 1;
    while (e < hi && runs[e].first == runs[e - 1].first + runs[e - 1].len) ++e;
    const int64_t first = runs[q].first, len = runs[e - 1].first + runs[e - 1].len - first;
    Tensor out_s = out.narrow(0, first, len);
    if (bias.defined())
      at::addmm_out(out_s, bias, in.narrow(0, first, len), w_op);
    else
      at::mm_out(out_s, in.narrow(0, first, len), w_op);
    q = e;
  }
}

// Output mode: each row's k adapters as one [k*r, d_in] A and one [d_out, k*r] B, so x (and g)
// is read once for all k slots and the expand is one GEMM. Dense: A is the bank itself viewed
// [M*r, d_in] and B is repacked once; gathered: both copied per row (k*r*(d_in + d_out) values
// per row, in the input dtype), by whichever thread first meets the row.
// With the bf16 loops the GEMMs whose B is A_cat or B_cat read them in bf16_gemm.h's pairs
// layout as well: the backward A_cat [k*r, d_in] (dx's t A_cat) and B_cat [d_out, k*r]
// (v = g B_cat), the forward B_cat^T (the expand t B_cat^T).
enum class Pairs { none, backward, forward };

template <typename T>
struct Concat {
  const Sizes& s;
  const T* bank_a;
  const T* bank_b;
  const int64_t* idx;
  const Pairs pairs;
  Tensor a_buf, b_buf, a_pairs, b_pairs;
  OnceFlags ready;  // per row when gathered; dense: flag 0 guards the one B repack

  Concat(const Sizes& s_, const Args& a, Pairs pairs_ = Pairs::none)
      : s(s_), pairs(pairs_), ready(s_.rows) {
    bank_a = a.lora_a.data_ptr<T>();
    bank_b = a.lora_b.data_ptr<T>();
    idx = a.idx.defined() ? a.idx.data_ptr<int64_t>() : nullptr;
    const int64_t kr = s.slots * s.rank;
    const int64_t copies = idx == nullptr ? 1 : s.rows;
    if (idx == nullptr) {
      b_buf = at::empty({s.d_out, kr}, a.lora_b.options());
    } else {
      a_buf = at::empty({s.rows, kr * s.d_in}, a.lora_a.options());
      b_buf = at::empty({s.rows, s.d_out * kr}, a.lora_b.options());
    }
    if (pairs == Pairs::backward) {
      a_pairs = at::empty({copies, bf16::pairs_size(kr, s.d_in)}, a.lora_a.options());
      b_pairs = at::empty({copies, bf16::pairs_size(s.d_out, kr)}, a.lora_b.options());
    } else if (pairs == Pairs::forward) {
      b_pairs = at::empty({copies, bf16::pairs_size(kr, s.d_out)}, a.lora_b.options());
    }
  }
  // the row's copy (dense: the one shared copy) in the pairs layout
  void pack_pairs(int64_t b) {
    const int64_t kr = s.slots * s.rank, c = idx == nullptr ? 0 : b;
    uint16_t* bp = bits(b_pairs.data_ptr<T>()) + c * b_pairs.size(1);
    if (pairs == Pairs::forward) {
      bf16::pack_pairs_t(bits(b_of(b)), kr, kr, s.d_out, bp);
      return;
    }
    bf16::pack_pairs(bits(a_of(b)), s.d_in, kr, s.d_in,
                     bits(a_pairs.data_ptr<T>()) + c * a_pairs.size(1));
    bf16::pack_pairs(bits(b_of(b)), kr, s.d_out, kr, bp);
  }
  const uint16_t* a_pairs_of(int64_t b) const {
    return bits(a_pairs.data_ptr<T>()) +
           (idx == nullptr ? 0 : b) * a_pairs.size(1);
  }
  const uint16_t* b_pairs_of(int64_t b) const {
    return bits(b_pairs.data_ptr<T>()) +
           (idx == nullptr ? 0 : b) * b_pairs.size(1);
  }
  void pack_b(int64_t b, T* dst) const {
    const int64_t r = s.rank, k = s.slots, kr = k * r;
    for (int64_t j = 0; j < k; ++j) {
      const T* src = bank_b + source(idx, k, b, j) * s.d_out * r;
      for (int64_t o = 0; o < s.d_out; ++o) std::copy(src + o * r, src + o * r + r, dst + o * kr + j * r);
    }
  }
  void ensure(int64_t b) {
    const int64_t kr = s.slots * s.rank;
    if (idx == nullptr) {
      ready.run(0, [&] {
        pack_b(0, b_buf.data_ptr<T>());
        if (pairs != Pairs::none) pack_pairs(0);
      });
      return;
    }
    ready.run(b, [&] {
      T* ad = a_buf.data_ptr<T>() + b * kr * s.d_in;
      for (int64_t j = 0; j < s.slots; ++j) {
        const T* src = bank_a + idx[b * s.slots + j] * s.rank * s.d_in;
        std::copy(src, src + s.rank * s.d_in, ad + j * s.rank * s.d_in);
      }
      pack_b(b, b_buf.data_ptr<T>() + b * s.d_out * kr);
      if (pairs != Pairs::none) pack_pairs(b);
    });
  }
  const T* a_of(int64_t b) const {
    return idx == nullptr ? bank_a : a_buf.data_ptr<T>() + b * s.slots * s.rank * s.d_in;
  }
  const T* b_of(int64_t b) const {
    return idx == nullptr ? b_buf.data_ptr<T>() : b_buf.data_ptr<T>() + b * s.d_out * s.slots * s.rank;
  }
};

// t[n, j*r + c] = scale * w[b, j] * v[n, j*r + c] for the len tokens of a run, rounded to T.
// A NaN or inf weight reaches every value of its own row's t, hence every output of that row,
// as in the reference; no other row reads it.
template <typename T>
void weigh(const Acc<T>* v, int64_t len, int64_t k, int64_t r, const Acc<T>* w_row,
           Acc<T> scale, T* t) {
  const int64_t kr = k * r;
  for (int64_t n = 0; n < len; ++n)
    for (int64_t j = 0; j < k; ++j) {
      const Acc<T> c = scale * w_row[j];
      for (int64_t e = 0; e < r; ++e)
        t[n * kr + j * r + e] = static_cast<T>(c * v[n * kr + j * r + e]);
    }
}

// Half inputs with the base in MKL (half_base_in_mkl): for each stretch of runs in [lo, hi)
// whose tokens follow each other, out = round(bias + in op(W) + LoRA) through one fp32 tile, so
// the output is written once and rounded once. op(W) is W^T (W [n_dim, k_dim]; the forward)
// or W (W [k_dim, n_dim]; dx in the backward). lora(run, dst) adds the run's LoRA part to dst
// (fp32, [run.len, n_dim]).
template <typename T, typename F>
void half_stretches(const std::vector<Run>& runs, int64_t lo, int64_t hi, const T* in,
                    int64_t k_dim, const T* w, bool w_t, int64_t n_dim, const T* bias, T* out,
                    F&& lora) {
  Scratch<float> tile;
  for (int64_t q = lo; q < hi;) {
    int64_t e = q + 1;
    while (e < hi && runs[e].first == runs[e - 1].first + runs[e - 1].len) ++e;
    const int64_t first = runs[q].first, len = runs[e - 1].first + runs[e - 1].len - first;
    tile.resize(len * n_dim);
    float* tp = tile.data();
    float beta = 0.f;
    if (bias != nullptr) {
      for (int64_t n = 0; n < len; ++n)
        for (int64_t o = 0; o < n_dim; ++o) tp[n * n_dim + o] = static_cast<float>(bias[o]);
      beta = 1.f;
    }
    gemm_acc<T>(false, w_t, len, n_dim, k_dim, 1.f, in + first * k_dim, k_dim, w,
                w_t ? k_dim : n_dim, beta, tp, n_dim);
    for (int64_t u = q; u < e; ++u) lora(runs[u], tp + (runs[u].first - first) * n_dim);
    round_to<T>(tp, len * n_dim, out + first * n_dim);
    q = e;
  }
}

// y += LoRA part. fp32/fp64: with fuse_base, y is uninitialised and each thread first computes
// the base of its share of the runs; the expand accumulates into y (beta = 1). Half: y already
// holds the base (the half GEMM); each run's LoRA part goes to an fp32 tile added in one pass.
template <typename T>
void forward_lora(const Args& a, const Sizes& s, const Plan& plan, double scale_d, int64_t mix,
                  bool fuse_base, Tensor& y, Tensor& shrink) {
  using A = Acc<T>;
  const int64_t r = s.rank, k = s.slots, d_in = s.d_in, d_out = s.d_out;
  const A scale = static_cast<A>(scale_d);
  const int64_t* idx = a.idx.defined() ? a.idx.data_ptr<int64_t>() : nullptr;
  const T* x = a.x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  A* sp = shrink.data_ptr<A>();
  const A* wp = a.adapter_w.data_ptr<A>();
  const auto& runs = plan.runs;
  const int64_t nruns = static_cast<int64_t>(runs.size());
  if (mix == 0) {
    // Each row's factors are mixed inside the same parallel pass, by whichever thread first
    // meets one of the row's runs: every extra parallel region costs a thread wake-up, and on
    // this loaded 2-core machine a multithreaded at::mm of [R, M] x [M, r*d] took 24 ms
    // against 0.02 ms on one thread (F.linear itself pays that once). A_p is kept in T (the
    // shrink is a T x T GEMM with fp32 accumulation), B_p in Acc (the expand's operand).
    Tensor a_mix = at::empty({s.rows, r * d_in}, a.x.options());
    Tensor b_mix = at::empty({s.rows, d_out * r}, a.adapter_w.options());
    T* ap = a_mix.data_ptr<T>();
    A* bp = b_mix.data_ptr<A>();
    OnceFlags mixed(s.rows);
    auto ensure_mixed = [&](int64_t b) {
      mixed.run(b, [&] {
        if constexpr (kHalf<T>) {
          std::vector<A> tmp(r * d_in);
          mix_row<T>(a.lora_a.data_ptr<T>(), r * d_in, wp, idx, k, b, tmp.data());
          round_to<T>(tmp.data(), r * d_in, ap + b * r * d_in);
        } else {
          mix_row<T>(a.lora_a.data_ptr<T>(), r * d_in, wp, idx, k, b, ap + b * r * d_in);
        }
        // B_p^T [r, d_out]: the expand s B_p^T is then a GEMM over contiguous rows of
        // B_p^T (the form thin_gemm.h takes; the fused expand below reads it too)
        std::vector<A> tmp(d_out * r);
        mix_row<T>(a.lora_b.data_ptr<T>(), d_out * r, wp, idx, k, b, tmp.data());
        transpose_into<A>(tmp.data(), d_out, r, bp + b * d_out * r);
      });
    };
    // One run: s = x A_p^T (saved for backward), then dst = scale * s B_p^T + beta * dst
    // (no dst: the shrink alone, for the fused bf16 expand). Returns s.
    auto run_lora = [&](const Run& u, A* dst, A beta) -> const A* {
      ensure_mixed(u.row);
      A* sr = sp + u.first * r;
      gemm_acc<T>(false, true, u.len, r, d_in, A(1), x + u.first * d_in, d_in,
                  ap + u.row * r * d_in, d_in, A(0), sr, r);
      if (dst != nullptr)
        gemm<A>(false, false, u.len, d_out, r, scale, sr, r, bp + u.row * d_out * r, d_out, beta,
                dst, d_out);
      return sr;
    };
    at::parallel_for(0, nruns, 1, [&](int64_t lo, int64_t hi) {
      if constexpr (kHalf<T>) {
        if (fuse_base && !half_base_in_mkl(a.dtype)) {
          aten_base_runs(a.x, a.weight.t(), a.bias, runs, lo, hi, y);
        } else if (fuse_base) {
          half_stretches<T>(runs, lo, hi, x, d_in, a.weight.data_ptr<T>(), true, d_out,
                            a.bias.defined() ? a.bias.data_ptr<T>() : nullptr, yp,
                            [&](const Run& u, float* dst) { run_lora(u, dst, A(1)); });
          return;
        }
      } else {
        if (fuse_base) base_runs<T>(a, s, runs, lo, hi, yp);
      }
      Scratch<A> tile;
      for (int64_t q = lo; q < hi; ++q) {
        const Run& u = runs[q];
        if (bf16_loops<T>()) {
          // y = round(y + scale * s B_p^T) in one pass over y (no fp32 tile)
          const A* sr = run_lora(u, nullptr, A(0));
          bf16::expand_add(u.len, d_out, r, static_cast<float>(scale),
                           reinterpret_cast<const float*>(sr), r,
                           reinterpret_cast<const float*>(bp + u.row * d_out * r), d_out,
                           bits(yp + u.first * d_out), d_out);
        } else if constexpr (kHalf<T>) {
          tile.resize(u.len * d_out);
          run_lora(u, tile.data(), A(0));
          add_tile<T>(yp + u.first * d_out, d_out, tile.data(), u.len, d_out);
        } else {
          run_lora(u, reinterpret_cast<A*>(yp) + u.first * d_out, A(1));
        }
      }
    });
    return;
  }
  // Output mode: one shrink GEMM over the row's k*r concatenated rows of A, the weights applied
  // to the [len, k*r] result, one expand GEMM over the k*r concatenated columns of B.
  const int64_t kr = k * r;
  const bool loops = bf16_loops<T>();  // the expand as pairs_gemm
  Concat<T> cat(s, a, loops ? Pairs::forward : Pairs::none);
  // One run: s = x A_cat^T (saved), t = scale * w * s (in t, the thread's scratch), then
  // dst = t B_cat^T + beta * dst.
  auto run_lora = [&](const Run& u, std::vector<T>& t, A* dst, A beta) {
    cat.ensure(u.row);
    A* sr = sp + u.first * kr;
    gemm_acc<T>(false, true, u.len, kr, d_in, A(1), x + u.first * d_in, d_in, cat.a_of(u.row),
                d_in, A(0), sr, kr);
    t.resize(u.len * kr);
    weigh<T>(sr, u.len, k, r, wp + u.row * k, scale, t.data());
    if (loops)
      bf16::pairs_gemm(u.len, d_out, kr, 1.f, bits(t.data()), kr,
                       cat.b_pairs_of(u.row), static_cast<float>(beta),
                       reinterpret_cast<float*>(dst), d_out);
    else
      gemm_acc<T>(false, true, u.len, d_out, kr, A(1), t.data(), kr, cat.b_of(u.row), kr, beta,
                  dst, d_out);
  };
  at::parallel_for(0, nruns, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> t;
    if constexpr (kHalf<T>) {
      if (fuse_base && !half_base_in_mkl(a.dtype)) {
        aten_base_runs(a.x, a.weight.t(), a.bias, runs, lo, hi, y);  // then the LoRA part below
      } else if (fuse_base) {
        half_stretches<T>(runs, lo, hi, x, d_in, a.weight.data_ptr<T>(), true, d_out,
                          a.bias.defined() ? a.bias.data_ptr<T>() : nullptr, yp,
                          [&](const Run& u, float* dst) { run_lora(u, t, dst, A(1)); });
        return;
      }
    } else {
      if (fuse_base) base_runs<T>(a, s, runs, lo, hi, yp);
    }
    Scratch<A> tile;
    for (int64_t q = lo; q < hi; ++q) {
      const Run& u = runs[q];
      if constexpr (kHalf<T>) {
        tile.resize(u.len * d_out);
        run_lora(u, t, tile.data(), A(0));
        add_tile<T>(yp + u.first * d_out, d_out, tile.data(), u.len, d_out);
      } else {
        run_lora(u, t, reinterpret_cast<A*>(yp) + u.first * d_out, A(1));
      }
    }
  });
}

std::tuple<Tensor, Tensor> lora_mix_forward_cpu(
    const Tensor& x, const Tensor& row_ids, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& lora_a, const Tensor& lora_b, const Tensor& adapter_w,
    const std::optional<Tensor>& adapter_idx, double scale, int64_t mix) {
  const NoAutocast no_autocast;
  const Sizes s = check_inputs(x, row_ids, weight, bias, lora_a, lora_b, adapter_w, adapter_idx,
                               mix);
  Args a = prepare(x, weight, bias, lora_a, lora_b, adapter_w, adapter_idx);
  check_adapter_idx(a.idx, s.adapters);
  const bool half = a.dtype == at::kHalf || a.dtype == at::kBFloat16;
  const int64_t slots_out = mix == 1 ? s.slots : 1;
  Tensor shrink = at::empty({s.tokens, slots_out, s.rank}, a.adapter_w.options());
  Plan plan;
  if (s.tokens > 0) plan = make_plan(row_ids.contiguous(), s.rows);
  const bool base_in_pass = !half || half_base_in_mkl(a.dtype) || half_base_in_pass(a.dtype);
  const bool fuse_base = base_in_pass && long_runs(plan, s.tokens);
  Tensor y;
  if (fuse_base) {
    y = at::empty({s.tokens, s.d_out}, a.x.options());
  } else {
    // Half: the base in the input dtype through the GEMM F.linear uses (oneDNN where the CPU
    // has bf16 support; see g_half_base_mode and half_base_in_pass).
    y = a.bias.defined() ? at::addmm(a.bias, a.x, a.weight.t()) : at::mm(a.x, a.weight.t());
  }
  if (s.tokens > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "lora_mix_forward_cpu", [&] {
      forward_lora<scalar_t>(a, s, plan, scale, mix, fuse_base, y, shrink);
    });
  }
  return {y, shrink};
}

template <typename A, typename T>
A dot(const A* p, const T* q, int64_t n) {
  if constexpr (std::is_same_v<A, float> && std::is_same_v<T, float>) {
    float out;
    if (thin_on() && thin::gemm(false, true, 1, 1, n, 1.f, p, n, q, n, 0.f, &out, 1)) return out;
  }
  A acc = 0;
  for (int64_t e = 0; e < n; ++e) acc += p[e] * static_cast<A>(q[e]);
  return acc;
}

// One factor's part in mix_backward: the gradient of its mixed per-row factors (Acc, [R, size]),
// its bank and the bank's gradient.
struct FactorGrad {
  const Tensor& dmix;
  const Tensor& bank;
  Tensor& dbank;
  // elements per adapter, without indexing the Tensor (each bank[i] is an aten::select call)
  int64_t size() const { return bank.size(0) == 0 ? 0 : bank.numel() / bank.size(0); }
};

// Factor mode: gradients of the mixed factors (Acc) -> bank gradients (T) and mixture weights,
// for both factors at once.
//   dbank[i] = sum_{(b, j) using i} w[b, j] dmix[b];  dw[b, j] += <dmix[b], bank[i_j]>
// Dense rows are pairs (b, j) with i = j, so both modes share one loop; each adapter is summed
// in an Acc buffer and rounded once. The work items (a row's dw, an adapter's dbank) are split
// between the threads by their multiply-adds, in one parallel region (each is a barrier).
template <typename T>
void mix_backward(const std::array<FactorGrad, 2>& factors, const Tensor& w, const int64_t* idx,
                  const Users& users, Tensor& dw) {
  using A = Acc<T>;
  const int64_t rows = w.size(0), slots = w.size(1), adapters = factors[0].bank.size(0);
  const A* wp = w.data_ptr<A>();
  A* dwp = dw.data_ptr<A>();
  if constexpr (std::is_same_v<T, float>) {
    if (idx == nullptr && thin_on()) {
      // Dense: dbank = w^T dmix and dw += dmix bank^T, two GEMMs (k = R or n = M is thin).
      for (const FactorGrad& f : factors) {
        const int64_t size = f.size();
        const float* dm = f.dmix.data_ptr<float>();
        gemm<float>(true, false, adapters, size, rows, 1.f, wp, slots, dm, size, 0.f,
                    f.dbank.data_ptr<float>(), size);
        gemm<float>(false, true, rows, slots, size, 1.f, dm, size, f.bank.data_ptr<float>(), size,
                    1.f, dwp, slots);
      }
      return;
    }
  }
  const int64_t size_sum = factors[0].size() + factors[1].size();
  auto row_dw = [&](int64_t b) {
    for (const FactorGrad& f : factors) {
      const int64_t size = f.size();
      const A* dm = f.dmix.data_ptr<A>() + b * size;
      for (int64_t j = 0; j < slots; ++j) {
        const T* bank_j = f.bank.data_ptr<T>() + source(idx, slots, b, j) * size;
        dwp[b * slots + j] +=
            bf16_loops<T>() ? bf16::dot_f32_bf16(reinterpret_cast<const float*>(dm),
                                                 bits(bank_j), size)
                            : dot(dm, bank_j, size);
      }
    }
  };
  auto adapter_dbank = [&](int64_t i, std::vector<A>& acc) {
    for (const FactorGrad& f : factors) {
      const int64_t size = f.size();
      acc.assign(size, A(0));
      for (int64_t p = users.start[i]; p < users.start[i + 1]; ++p) {
        const int64_t q = users.pair[p];
        const A* g = f.dmix.data_ptr<A>() + (q / slots) * size;
        if (bf16_loops<T>())
          bf16::axpy_f32(reinterpret_cast<float*>(acc.data()), static_cast<float>(wp[q]),
                         reinterpret_cast<const float*>(g), size);
        else
          for (int64_t e = 0; e < size; ++e) acc[e] += wp[q] * g[e];
      }
      round_to<T>(acc.data(), size, f.dbank.data_ptr<T>() + i * size);
    }
  };
  // items [0, rows) are rows, [rows, rows + adapters) adapters; cost[q] = work before item q
  const int64_t items = rows + adapters;
  std::vector<int64_t> cost(items + 1, 0);
  for (int64_t q = 0; q < items; ++q) {
    const int64_t pairs = q < rows ? slots : users.start[q - rows + 1] - users.start[q - rows];
    cost[q + 1] = cost[q] + size_sum * pairs;
  }
  const int64_t parts = cost[items] < kMinParallelWork ? 1 : at::get_num_threads();
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> acc;
    for (int64_t t = lo; t < hi; ++t) {
      // this part's items: those whose work starts in [t, t + 1) / parts of the total (the
      // last part takes the rest, items without work included)
      auto start_of = [&](int64_t part) -> int64_t {
        if (part == parts) return items;
        return std::lower_bound(cost.begin(), cost.end() - 1, cost[items] * part / parts) -
               cost.begin();
      };
      for (int64_t q = start_of(t); q < start_of(t + 1); ++q) {
        if (q < rows)
          row_dw(q);
        else
          adapter_dbank(q - rows, acc);
      }
    }
  });
}

// The rows of a [len, cols] Acc block as T: a T view when T is Acc, else rounded into buf.
template <typename T>
const T* as_t(const Acc<T>* src, int64_t n, std::vector<T>& buf) {
  if constexpr (kHalf<T>) {
    buf.resize(n);
    round_to<T>(src, n, buf.data());
    return buf.data();
  } else {
    return src;
  }
}

template <typename T>
void backward_lora(const Args& a, const Tensor& g_t, const Tensor& shrink_t, const Sizes& s,
                   const Plan& plan, double scale_d, int64_t mix, bool need_x, bool need_lora,
                   bool fuse_dx, Tensor& dx, Tensor& da, Tensor& db, Tensor& dw) {
  using A = Acc<T>;
  const int64_t r = s.rank, k = s.slots, d_in = s.d_in, d_out = s.d_out, R = s.rows;
  const A scale = static_cast<A>(scale_d);
  const int64_t* idx = a.idx.defined() ? a.idx.data_ptr<int64_t>() : nullptr;
  const T* x = a.x.data_ptr<T>();
  const T* g = g_t.data_ptr<T>();
  const A* sh = shrink_t.data_ptr<A>();
  const A* wp = a.adapter_w.data_ptr<A>();
  T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
  const auto& runs = plan.runs;
  const int64_t nruns = static_cast<int64_t>(runs.size());
  const int64_t kr = (mix == 0 ? 1 : k) * r;
  Tensor v_t = at::empty({s.tokens, kr}, a.adapter_w.options());  // v = g B (unscaled)
  A* v = v_t.data_ptr<A>();
  // dx_run += LoRA part: directly (fp32/fp64, beta = 1) or through an fp32 tile (half).
  auto add_dx = [&](const Run& u, auto&& lora_into, Scratch<A>& tile) {
    if constexpr (kHalf<T>) {
      tile.resize(u.len * d_in);
      lora_into(tile.data(), A(0));
      add_tile<T>(dxp + u.first * d_in, d_in, tile.data(), u.len, d_in);
    } else {
      lora_into(reinterpret_cast<A*>(dxp) + u.first * d_in, A(1));
    }
  };

  if (mix == 0) {
    // Per-row factors, mixed lazily inside the pass: A_p in Acc (dx's operand), B_p in T
    // (g is T: v = g B_p is a T x T GEMM with fp32 accumulation). With the bf16 loops B_p is
    // kept transposed, [r, d_out], so that v is their dots form (g B_p = g (B_p^T)^T).
    const bool loops = bf16_loops<T>();
    Tensor a_mix = at::empty({R, r * d_in}, a.adapter_w.options());
    Tensor b_mix = at::empty({R, d_out * r}, a.x.options());
    A* ap = a_mix.data_ptr<A>();
    T* bp = b_mix.data_ptr<T>();
    OnceFlags mixed(R);
    auto ensure_mixed = [&](int64_t b) {
      mixed.run(b, [&] {
        mix_row<T>(a.lora_a.data_ptr<T>(), r * d_in, wp, idx, k, b, ap + b * r * d_in);
        if constexpr (kHalf<T>) {
          std::vector<A> tmp(d_out * r);
          mix_row<T>(a.lora_b.data_ptr<T>(), d_out * r, wp, idx, k, b, tmp.data());
          if (loops) {
            std::vector<A> tmp_t(d_out * r);
            transpose_into<A>(tmp.data(), d_out, r, tmp_t.data());
            tmp.swap(tmp_t);
          }
          round_to<T>(tmp.data(), d_out * r, bp + b * d_out * r);
        } else {
          mix_row<T>(a.lora_b.data_ptr<T>(), d_out * r, wp, idx, k, b, bp + b * d_out * r);
        }
      });
    };
    // One run: v = g B_p (saved for the factor gradients); with dst, dst = scale * v A_p +
    // beta * dst (dx's LoRA part). Returns v.
    auto run_lora = [&](const Run& u, A* dst, A beta) -> const A* {
      ensure_mixed(u.row);
      A* vr = v + u.first * r;
      gemm_acc<T>(false, loops, u.len, r, d_out, A(1), g + u.first * d_out, d_out,
                  bp + u.row * d_out * r, loops ? d_out : r, A(0), vr, r);
      if (dst != nullptr)
        gemm<A>(false, false, u.len, d_in, r, scale, vr, r, ap + u.row * r * d_in, d_in, beta,
                dst, d_in);
      return vr;
    };
    at::parallel_for(0, nruns, 1, [&](int64_t lo, int64_t hi) {
      if constexpr (kHalf<T>) {
        if (fuse_dx && !half_base_in_mkl(a.dtype)) {
          aten_base_runs(g_t, a.weight, Tensor(), runs, lo, hi, dx);  // then the LoRA part below
        } else if (fuse_dx) {  // dx = round(g W + LoRA part), stretch by stretch
          half_stretches<T>(runs, lo, hi, g, d_out, a.weight.data_ptr<T>(), false, d_in, nullptr,
                            dxp, [&](const Run& u, float* dst) { run_lora(u, dst, A(1)); });
          return;
        }
      }
      Scratch<A> tile;
      for (int64_t q = lo; q < hi; ++q) {
        const Run& u = runs[q];
        if (bf16_loops<T>()) {
          // dx = round(dx + scale * v A_p) in one pass over dx
          const A* vr = run_lora(u, nullptr, A(0));
          if (need_x)
            bf16::expand_add(u.len, d_in, r, static_cast<float>(scale),
                             reinterpret_cast<const float*>(vr), r,
                             reinterpret_cast<const float*>(ap + u.row * r * d_in), d_in,
                             bits(dxp + u.first * d_in), d_in);
        } else if (need_x) {
          add_dx(u, [&](A* out, A beta) { run_lora(u, out, beta); }, tile);
        } else {
          run_lora(u, nullptr, A(0));
        }
      }
    });
    if (!need_lora) return;
    // dA_p[b] = scale * sum_n v_n x_n^T, dB_p[b] = scale * sum_n g_n s_n^T (row by row)
    Tensor da_mix = at::zeros({R, r * d_in}, a.adapter_w.options());
    Tensor db_mix = at::zeros({R, d_out * r}, a.adapter_w.options());
    A* dap = da_mix.data_ptr<A>();
    A* dbp = db_mix.data_ptr<A>();
    at::parallel_for(0, R, grain(s.tokens * r * (d_in + d_out), R), [&](int64_t lo, int64_t hi) {
      std::vector<T> vbuf, sbuf;
      std::vector<float> db_t;
      for (int64_t b = lo; b < hi; ++b) {
        if (loops) {
          // v and s in fp32 as they are (no rounding to bf16); dB_p^T = s^T g, [r, d_out],
          // summed over the row's runs, then transposed into dB_p's [d_out, r].
          db_t.assign(r * d_out, 0.f);
          for (int64_t q = plan.run_start[b]; q < plan.run_start[b + 1]; ++q) {
            const Run& u = runs[q];
            bf16::outer(r, d_in, u.len, static_cast<float>(scale),
                        reinterpret_cast<const float*>(v + u.first * r), r,
                        bits(x + u.first * d_in), d_in,
                        reinterpret_cast<float*>(dap + b * r * d_in), d_in);
            bf16::outer(r, d_out, u.len, static_cast<float>(scale),
                        reinterpret_cast<const float*>(sh + u.first * r), r,
                        bits(g + u.first * d_out), d_out,
                        db_t.data(), d_out);
          }
          transpose_into<float>(db_t.data(), r, d_out,
                                reinterpret_cast<float*>(dbp + b * d_out * r));
          continue;
        }
        for (int64_t q = plan.run_start[b]; q < plan.run_start[b + 1]; ++q) {
          const Run& u = runs[q];
          const T* vt = as_t<T>(v + u.first * r, u.len * r, vbuf);
          const T* st = as_t<T>(sh + u.first * r, u.len * r, sbuf);
          gemm_acc<T>(true, false, r, d_in, u.len, scale, vt, r, x + u.first * d_in, d_in, A(1),
                      dap + b * r * d_in, d_in);
          gemm_acc<T>(true, false, d_out, r, u.len, scale, g + u.first * d_out, d_out, st, r,
                      A(1), dbp + b * d_out * r, r);
        }
      }
    });
    const Users users = make_users(idx, R, k, s.adapters);
    // A row without tokens has dA_p = dB_p = 0 (y does not read it): its weights are taken as
    // 0 here, else a NaN or inf one made 0 * NaN in the gradients of every adapter it lists,
    // which other rows share.
    Tensor w_used = a.adapter_w;
    for (int64_t b = 0; b < R; ++b) {
      if (plan.run_start[b] != plan.run_start[b + 1]) continue;
      if (w_used.is_same(a.adapter_w)) w_used = a.adapter_w.clone();
      w_used.select(0, b).zero_();
    }
    mix_backward<T>({FactorGrad{da_mix, a.lora_a, da}, FactorGrad{db_mix, a.lora_b, db}},
                    w_used, idx, users, dw);
    return;
  }

  // Output mode. v = g B_cat (one GEMM over the row's k*r columns); t = scale * w * v;
  // dx += t A_cat (one GEMM). t is kept (in T) for dA.
  const bool loops = bf16_loops<T>();  // both GEMMs below as pairs_gemm
  Concat<T> cat(s, a, loops ? Pairs::backward : Pairs::none);
  Tensor t_t = at::empty({s.tokens, kr}, a.x.options());
  T* tw = t_t.data_ptr<T>();
  // One run: v = g B_cat, t = scale * w * v; with dst, dst = t A_cat + beta * dst.
  auto run_lora = [&](const Run& u, A* dst, A beta) {
    cat.ensure(u.row);
    A* vr = v + u.first * kr;
    if (loops)
      bf16::pairs_gemm(u.len, kr, d_out, 1.f, bits(g + u.first * d_out), d_out,
                       cat.b_pairs_of(u.row), 0.f, reinterpret_cast<float*>(vr), kr);
    else
      gemm_acc<T>(false, false, u.len, kr, d_out, A(1), g + u.first * d_out, d_out,
                  cat.b_of(u.row), kr, A(0), vr, kr);
    T* tr = tw + u.first * kr;
    weigh<T>(vr, u.len, k, r, wp + u.row * k, scale, tr);
    if (dst == nullptr) return;
    if (loops)
      bf16::pairs_gemm(u.len, d_in, kr, 1.f, bits(tr), kr, cat.a_pairs_of(u.row),
                       static_cast<float>(beta), reinterpret_cast<float*>(dst), d_in);
    else
      gemm_acc<T>(false, false, u.len, d_in, kr, A(1), tr, kr, cat.a_of(u.row), d_in, beta, dst,
                  d_in);
  };
  at::parallel_for(0, nruns, 1, [&](int64_t lo, int64_t hi) {
    if constexpr (kHalf<T>) {
      if (fuse_dx && !half_base_in_mkl(a.dtype)) {
        aten_base_runs(g_t, a.weight, Tensor(), runs, lo, hi, dx);  // then the LoRA part below
      } else if (fuse_dx) {  // dx = round(g W + LoRA part), stretch by stretch
        half_stretches<T>(runs, lo, hi, g, d_out, a.weight.data_ptr<T>(), false, d_in, nullptr,
                          dxp, [&](const Run& u, float* dst) { run_lora(u, dst, A(1)); });
        return;
      }
    }
    Scratch<A> tile;
    for (int64_t q = lo; q < hi; ++q) {
      const Run& u = runs[q];
      if (need_x)
        add_dx(u, [&](A* out, A beta) { run_lora(u, out, beta); }, tile);
      else
        run_lora(u, nullptr, A(0));
    }
  });
  if (!need_lora) return;
  // dw[b, j] = scale * sum_{n in b} <v_j(n), s_j(n)>; u = scale * w * s (T) for dB.
  A* dwp = dw.data_ptr<A>();
  Tensor u_t = at::empty({s.tokens, kr}, a.x.options());
  T* uw = u_t.data_ptr<T>();
  at::parallel_for(0, R, grain(s.tokens * kr * 2, R), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t q = plan.run_start[b]; q < plan.run_start[b + 1]; ++q) {
        const Run& u = runs[q];
        for (int64_t n = u.first; n < u.first + u.len; ++n)
          for (int64_t j = 0; j < k; ++j)
            dwp[b * k + j] += scale * dot(v + n * kr + j * r, sh + n * kr + j * r, r);
        weigh<T>(sh + u.first * kr, u.len, k, r, wp + b * k, scale, uw + u.first * kr);
      }
  });
  if (idx == nullptr) {
    // Dense: every row uses every adapter, so dA = t^T x and dB = g^T u are GEMMs over all
    // tokens at once (in T, fp32 accumulation inside, one rounding).
    da.view({kr, d_in}).copy_(at::mm(t_t.t(), a.x));
    db.copy_(at::mm(g_t.t(), u_t).view({d_out, k, r}).permute({1, 0, 2}));
    return;
  }
  // Gathered: per row dA_cat[b] = t_b^T x_b, dB_cat[b] = g_b^T u_b (one GEMM each, x and g read
  // once for all k slots), then summed adapter by adapter over the (row, slot) pairs using it.
  Tensor da_cat = at::zeros({R, kr * d_in}, a.adapter_w.options());
  Tensor db_cat = at::zeros({R, d_out * kr}, a.adapter_w.options());
  A* dac = da_cat.data_ptr<A>();
  A* dbc = db_cat.data_ptr<A>();
  at::parallel_for(0, R, grain(s.tokens * kr * (d_in + d_out), R), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t q = plan.run_start[b]; q < plan.run_start[b + 1]; ++q) {
        const Run& u = runs[q];
        gemm_acc<T>(true, false, kr, d_in, u.len, A(1), tw + u.first * kr, kr,
                    x + u.first * d_in, d_in, A(1), dac + b * kr * d_in, d_in);
        gemm_acc<T>(true, false, d_out, kr, u.len, A(1), g + u.first * d_out, d_out,
                    uw + u.first * kr, kr, A(1), dbc + b * d_out * kr, kr);
      }
  });
  const Users users = make_users(idx, R, k, s.adapters);
  T* dap = da.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
  at::parallel_for(0, s.adapters, grain(R * kr * (d_in + d_out), s.adapters), [&](int64_t lo, int64_t hi) {
    std::vector<A> acc_a(r * d_in), acc_b(d_out * r);
    for (int64_t i = lo; i < hi; ++i) {
      std::fill(acc_a.begin(), acc_a.end(), A(0));
      std::fill(acc_b.begin(), acc_b.end(), A(0));
      for (int64_t p = users.start[i]; p < users.start[i + 1]; ++p) {
        const int64_t pair = users.pair[p], b = pair / k, j = pair % k;
        const A* sa = dac + b * kr * d_in + j * r * d_in;
        for (int64_t e = 0; e < r * d_in; ++e) acc_a[e] += sa[e];
        const A* sb = dbc + b * d_out * kr + j * r;
        for (int64_t o = 0; o < d_out; ++o)
          for (int64_t c = 0; c < r; ++c) acc_b[o * r + c] += sb[o * kr + c];
      }
      round_to<T>(acc_a.data(), r * d_in, dap + i * r * d_in);
      round_to<T>(acc_b.data(), d_out * r, dbp + i * d_out * r);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lora_mix_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& row_ids, const Tensor& weight,
    const Tensor& lora_a, const Tensor& lora_b, const Tensor& adapter_w,
    const std::optional<Tensor>& adapter_idx, const Tensor& shrink, double scale, int64_t mix,
    bool need_x, bool need_weight, bool need_bias, bool need_lora) {
  const NoAutocast no_autocast;
  const Sizes s = check_inputs(x, row_ids, weight, std::nullopt, lora_a, lora_b, adapter_w,
                               adapter_idx, mix);
  const int64_t slots_out = mix == 1 ? s.slots : 1;
  check_backward_inputs(grad_y, shrink, x, s, slots_out);
  Args a = prepare(x, weight, std::nullopt, lora_a, lora_b, adapter_w, adapter_idx);
  check_adapter_idx(a.idx, s.adapters);
  Tensor g = grad_y.to(a.dtype).contiguous();
  Plan plan;
  if (s.tokens > 0 && (need_x || need_lora)) plan = make_plan(row_ids.contiguous(), s.rows);
  const bool half = a.dtype == at::kHalf || a.dtype == at::kBFloat16;
  // Half with rows in runs: with the base in MKL (g_half_base_mode) dx's base joins the LoRA
  // part in one fp32 tile per stretch; with the bf16 loops (half_base_in_pass) it goes through
  // ATen stretch by stretch inside the pass; else through ATen in the input dtype before it.
  const bool fuse_dx = need_x && half &&
                       (half_base_in_mkl(a.dtype) || half_base_in_pass(a.dtype)) &&
                       long_runs(plan, s.tokens);
  Tensor dx;
  if (need_x) dx = fuse_dx ? at::empty({s.tokens, s.d_in}, a.x.options()) : at::mm(g, a.weight);
  Tensor da, db, dw;
  if (need_lora) {
    da = at::zeros_like(a.lora_a);
    db = at::zeros_like(a.lora_b);
    dw = at::zeros_like(a.adapter_w);
  }
  if (s.tokens > 0 && (need_x || need_lora)) {
    Tensor sh = shrink.to(a.adapter_w.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "lora_mix_backward_cpu", [&] {
      backward_lora<scalar_t>(a, g, sh, s, plan, scale, mix, need_x, need_lora, fuse_dx, dx, da,
                              db, dw);
    });
  }
  Tensor dweight = need_weight ? at::mm(g.t(), a.x) : none_like(x);
  Tensor dbias = need_bias ? g.sum(0) : none_like(x);
  return {need_x ? dx : none_like(x), dweight, dbias, need_lora ? da : none_like(x),
          need_lora ? db : none_like(x), need_lora ? dw.to(a.dtype) : none_like(x)};
}

}  // namespace

// cpu_thin_gemm(mode): 1 = thin_gemm.h's loops, 0 = BLAS, -1 = leave as is; returns the mode
// before the call. Not thread-safe against ops running at the same time (a test switch).
int64_t cpu_thin_gemm(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "cpu_thin_gemm: mode must be -1, 0 or 1, got ", num(mode));
  TORCH_CHECK(mode != 1 || thin::cpu_has_avx2(), "cpu_thin_gemm: this CPU has no AVX2+FMA");
  return mode == -1 ? g_thin_mode.load() : g_thin_mode.exchange(static_cast<int>(mode));
}

// cpu_gemm_f32(c, a, b, ta, tb, alpha, beta): c = alpha op(a) op(b) + beta c through the op's
// own fp32 gemm (thin loops or BLAS, by cpu_thin_gemm's mode), for the tests: 2-D float32
// tensors with unit column stride and any row stride (slices of bigger ones).
void cpu_gemm_f32(const Tensor& c, const Tensor& a, const Tensor& b, bool ta, bool tb,
                  double alpha, double beta) {
  for (const Tensor* t : {&c, &a, &b})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->device().is_cpu() &&
                    t->stride(1) == 1 && t->stride(0) >= t->size(1),
                "cpu_gemm_f32: 2-D float32 CPU tensors with unit column stride expected");
  const int64_t m = c.size(0), n = c.size(1), k = ta ? a.size(0) : a.size(1);
  TORCH_CHECK((ta ? a.size(1) : a.size(0)) == m && (tb ? b.size(1) : b.size(0)) == k &&
                  (tb ? b.size(0) : b.size(1)) == n,
              "cpu_gemm_f32: shapes do not agree");
  gemm<float>(ta, tb, m, n, k, static_cast<float>(alpha), a.data_ptr<float>(), a.stride(0),
              b.data_ptr<float>(), b.stride(0), static_cast<float>(beta), c.data_ptr<float>(),
              c.stride(0));
}

// cpu_bf16_gemm(mode): 1 = bf16_gemm.h's AVX512-BF16 loops, 0 = MKL, -1 = leave as is;
// returns the mode before the call. Not thread-safe against ops running at the same time (a
// test switch).
int64_t cpu_bf16_gemm(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "cpu_bf16_gemm: mode must be -1, 0 or 1, got ", num(mode));
  TORCH_CHECK(mode != 1 || bf16::cpu_has_avx512_bf16(),
              "cpu_bf16_gemm: this CPU has no AVX512-BF16");
  return mode == -1 ? bf16::g_mode.load() : bf16::g_mode.exchange(static_cast<int>(mode));
}

// For the tests: 2-D CPU tensors with unit column stride and any row stride.
static void check_test_operand(const Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == dtype && t.device().is_cpu() &&
                  t.stride(1) == 1 && t.stride(0) >= t.size(1),
              name, ": 2-D ", dtype, " CPU tensors with unit column stride expected");
}

// cpu_gemm_bf16(c, a, b, ta, tb, alpha, beta): c (fp32) = alpha op(a) op(b) + beta c with a, b
// bf16, through the op's own gemm_acc (the AVX512-BF16 loops or MKL, by cpu_bf16_gemm's mode).
void cpu_gemm_bf16(const Tensor& c, const Tensor& a, const Tensor& b, bool ta, bool tb,
                   double alpha, double beta) {
  check_test_operand(c, at::kFloat, "cpu_gemm_bf16");
  check_test_operand(a, at::kBFloat16, "cpu_gemm_bf16");
  check_test_operand(b, at::kBFloat16, "cpu_gemm_bf16");
  const int64_t m = c.size(0), n = c.size(1), k = ta ? a.size(0) : a.size(1);
  TORCH_CHECK((ta ? a.size(1) : a.size(0)) == m && (tb ? b.size(1) : b.size(0)) == k &&
                  (tb ? b.size(0) : b.size(1)) == n,
              "cpu_gemm_bf16: shapes do not agree");
  gemm_acc<at::BFloat16>(ta, tb, m, n, k, static_cast<float>(alpha),
                         a.data_ptr<at::BFloat16>(), a.stride(0), b.data_ptr<at::BFloat16>(),
                         b.stride(0), static_cast<float>(beta), c.data_ptr<float>(), c.stride(0));
}

// cpu_outer_bf16(c, p, q, alpha): c [m, n] += alpha p^T q with p fp32 [k, m], q bf16 [k, n]
// (bf16_gemm.h's outer, the factor gradients' loop; needs the AVX512-BF16 loops on).
void cpu_outer_bf16(const Tensor& c, const Tensor& p, const Tensor& q, double alpha) {
  check_test_operand(c, at::kFloat, "cpu_outer_bf16");
  check_test_operand(p, at::kFloat, "cpu_outer_bf16");
  check_test_operand(q, at::kBFloat16, "cpu_outer_bf16");
  TORCH_CHECK(p.size(0) == q.size(0) && p.size(1) == c.size(0) && q.size(1) == c.size(1),
              "cpu_outer_bf16: shapes do not agree");
  TORCH_CHECK(bf16::on(), "cpu_outer_bf16: the AVX512-BF16 loops are off (cpu_bf16_gemm)");
  bf16::outer(c.size(0), c.size(1), p.size(0), static_cast<float>(alpha), p.data_ptr<float>(),
              p.stride(0), bits(q.data_ptr<at::BFloat16>()),
              q.stride(0), c.data_ptr<float>(), c.stride(0));
}

// cpu_pairs_gemm_bf16(c, a, b, b_t, alpha, beta): c (fp32) = alpha a op(b) + beta c with a, b
// bf16 through bf16_gemm.h's pairs layout and pairs_gemm: b [k, n] packed by pack_pairs, or with
// b_t b [n, k] packed transposed by pack_pairs_t (needs the AVX512-BF16 loops on).
void cpu_pairs_gemm_bf16(const Tensor& c, const Tensor& a, const Tensor& b, bool b_t,
                         double alpha, double beta) {
  check_test_operand(c, at::kFloat, "cpu_pairs_gemm_bf16");
  check_test_operand(a, at::kBFloat16, "cpu_pairs_gemm_bf16");
  check_test_operand(b, at::kBFloat16, "cpu_pairs_gemm_bf16");
  const int64_t m = c.size(0), n = c.size(1), k = a.size(1);
  TORCH_CHECK(a.size(0) == m && b.size(b_t ? 1 : 0) == k && b.size(b_t ? 0 : 1) == n,
              "cpu_pairs_gemm_bf16: shapes do not agree");
  TORCH_CHECK(bf16::on(), "cpu_pairs_gemm_bf16: the AVX512-BF16 loops are off (cpu_bf16_gemm)");
  std::vector<uint16_t> packed(bf16::pairs_size(k, n));
  const auto* bp = bits(b.data_ptr<at::BFloat16>());
  if (b_t)
    bf16::pack_pairs_t(bp, b.stride(0), k, n, packed.data());
  else
    bf16::pack_pairs(bp, b.stride(0), k, n, packed.data());
  bf16::pairs_gemm(m, n, k, static_cast<float>(alpha),
                   bits(a.data_ptr<at::BFloat16>()), a.stride(0),
                   packed.data(), static_cast<float>(beta), c.data_ptr<float>(), c.stride(0));
}

// cpu_half_base(mode): where the base GEMM of half inputs runs (see g_half_base_mode): 1 = MKL,
// 2 = MKL for fp16 only, 0 = ATen, -1 = leave as is; returns the mode before the call.
int64_t cpu_half_base(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 2, "cpu_half_base: mode must be -1, 0, 1 or 2, got ",
              num(mode));
  TORCH_CHECK(mode != 1 || cblas_gemm_bf16bf16f32 != nullptr,
              "cpu_half_base: MKL's gemm_bf16bf16f32 is not in this torch");
  TORCH_CHECK(mode != 2 || cblas_gemm_f16f16f32 != nullptr,
              "cpu_half_base: MKL's gemm_f16f16f32 is not in this torch");
  return mode == -1 ? g_half_base_mode.load() : g_half_base_mode.exchange(static_cast<int>(mode));
}

TORCH_LIBRARY_FRAGMENT(reclora, m) {
  m.def("cpu_thin_gemm(int mode) -> int", &cpu_thin_gemm);
  m.def("cpu_half_base(int mode) -> int", &cpu_half_base);
  m.def("cpu_bf16_gemm(int mode) -> int", &cpu_bf16_gemm);
  m.def("cpu_gemm_bf16(Tensor(a!) c, Tensor a, Tensor b, bool ta, bool tb, float alpha, "
        "float beta) -> ()", &cpu_gemm_bf16);
  m.def("cpu_outer_bf16(Tensor(a!) c, Tensor p, Tensor q, float alpha) -> ()", &cpu_outer_bf16);
  m.def("cpu_pairs_gemm_bf16(Tensor(a!) c, Tensor a, Tensor b, bool b_t, float alpha, "
        "float beta) -> ()", &cpu_pairs_gemm_bf16);
  m.def("cpu_gemm_f32(Tensor(a!) c, Tensor a, Tensor b, bool ta, bool tb, float alpha, "
        "float beta) -> ()", &cpu_gemm_f32);
}

TORCH_LIBRARY_IMPL(reclora, CPU, m) {
  m.impl("lora_mix_forward", &lora_mix_forward_cpu);
  m.impl("lora_mix_backward", &lora_mix_backward_cpu);
}

}  // namespace reclora
