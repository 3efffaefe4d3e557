// Thin fp32 GEMMs (one dimension of a LoRA rank) in AVX2/FMA, for the CPU op's LoRA part.
//
// Every LoRA GEMM of the op has one small dimension, the rank r (8 in the benchmarks): the
// shrink x A^T is [len, d] x [d, r], the expand s B^T [len, r] x [r, d], the factor gradients
// v^T x [r, len] x [len, d] and g^T s [d, len] x [len, r]. MKL 2024.2 (inside torch 2.14.1)
// runs these shapes at 4.5-45 GFLOP/s at r = 8 on the AMD EPYC (Zen 3, AVX2) of this
// project's machine, against 85 for the base GEMM on one core (perf: mkl_blas_def_sgemm_pst,
// its generic code path; `python benchmarks/thin_gemm_rates.py`, results/thin_gemm_cpu.md),
// so the LoRA part of a d = 1024 backward took 3.9 ms for ~34 MFLOP. These loops are written for that shape: vectorised along the
// long side, the rank in registers, memory-bound as the shape is.
//
// Two forms cover every call (row-major; C is never read when beta = 0, so it may hold NaN):
//   rows_x_rows:  C[i, j] = alpha * sum_p A(i, p) B[p, j] + beta C   B's rows contiguous;
//                 A(i, p) any strides (A or A^T); vectorised along j, A broadcast.
//   dots:         C[i, j] = alpha * sum_p A[i, p] B[j, p] + beta C   (A B^T, small n);
//                 vectorised along p, one horizontal sum per output.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RECLORA_HAVE_AVX2_THIN 1
#else
#define RECLORA_HAVE_AVX2_THIN 0
#endif

namespace reclora {
namespace thin {

// Shapes whose smallest side is at most this go to these loops. GFLOP/s on one core (128
// tokens, d = 1024; benchmarks/results/thin_gemm_cpu.md), MKL vs these loops: at 8,
// 4.5-45 vs 47-61; at 16, 28-61 vs 38-63 (the loops ahead for g^T s, behind for the expand);
// at 32 MKL runs 39-84 and takes them. Not tuned finer.
constexpr int64_t kMaxThin = 16;

#if RECLORA_HAVE_AVX2_THIN
#define RECLORA_AVX2 __attribute__((target("avx2,fma")))
// Register tiles are arrays indexed by small loops; unless those loops are unrolled GCC 12 keeps
// the arrays in memory and stores every accumulator on every step (the expand ran at 24
// GFLOP/s, store-bound).
#define RECLORA_UNROLL _Pragma("GCC unroll 16")

// Lanes [0, n) of 8 set, n clamped to [0, 8].
RECLORA_AVX2 inline __m256i lanes(int64_t n) {
  static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  n = std::min<int64_t>(std::max<int64_t>(n, 0), 8);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - n));
}

RECLORA_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Loads and stores of 8 floats; masked (lanes of m) only where a row ends: with masks on every
// vector the expand (128 x 8 x 1024, beta = 1) took 108 us here, 80 us without.
template <bool Full>
RECLORA_AVX2 inline __m256 load8(const float* p, __m256i m) {
  return Full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m);
}

// out = alpha * acc + beta * out on the lanes of m (beta = 0: out is not read).
template <bool Full>
RECLORA_AVX2 inline void store8(float* out, __m256 acc, __m256i m, float alpha, float beta) {
  __m256 v = _mm256_mul_ps(_mm256_set1_ps(alpha), acc);
  if (beta != 0.f) v = _mm256_fmadd_ps(_mm256_set1_ps(beta), load8<Full>(out, m), v);
  if (Full)
    _mm256_storeu_ps(out, v);
  else
    _mm256_maskstore_ps(out, m, v);
}

// rows_x_rows on TB rows of C from i0 and columns [j, j + 8 * V) (V = 1 or 2 vectors; lanes
// m0, m1 of the two when not Full).
template <int TB, int V, bool Full>
RECLORA_AVX2 void rxr_tile(int64_t i0, int64_t j, __m256i m0, __m256i m1, int64_t k,
                           float alpha, const float* a, int64_t sa_i, int64_t sa_p,
                           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  __m256 acc[TB][V];
  RECLORA_UNROLL for (int t = 0; t < TB; ++t)
    RECLORA_UNROLL for (int v = 0; v < V; ++v) acc[t][v] = _mm256_setzero_ps();
  const float* ap = a + i0 * sa_i;
  const float* bp = b + j;
  for (int64_t p = 0; p < k; ++p, ap += sa_p, bp += ldb) {
    __m256 bv[V];
    bv[0] = load8<Full>(bp, m0);
    if (V == 2) bv[V - 1] = load8<Full>(bp + 8, m1);
    RECLORA_UNROLL for (int t = 0; t < TB; ++t) {
      const __m256 s = _mm256_broadcast_ss(ap + t * sa_i);
      RECLORA_UNROLL for (int v = 0; v < V; ++v) acc[t][v] = _mm256_fmadd_ps(s, bv[v], acc[t][v]);
    }
  }
  RECLORA_UNROLL for (int t = 0; t < TB; ++t) {
    float* cp = c + (i0 + t) * ldc + j;
    store8<Full>(cp, acc[t][0], m0, alpha, beta);
    if (V == 2) store8<Full>(cp + 8, acc[t][V - 1], m1, alpha, beta);
  }
}

template <int TB>
RECLORA_AVX2 void rxr_rows(int64_t i0, int64_t n, int64_t k, float alpha, const float* a,
                           int64_t sa_i, int64_t sa_p, const float* b, int64_t ldb, float beta,
                           float* c, int64_t ldc) {
  const __m256i all = lanes(8);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    rxr_tile<TB, 2, true>(i0, j, all, all, k, alpha, a, sa_i, sa_p, b, ldb, beta, c, ldc);
  const int64_t w = n - j;
  if (w == 8)
    rxr_tile<TB, 1, true>(i0, j, all, all, k, alpha, a, sa_i, sa_p, b, ldb, beta, c, ldc);
  else if (w > 8)
    rxr_tile<TB, 2, false>(i0, j, all, lanes(w - 8), k, alpha, a, sa_i, sa_p, b, ldb, beta, c,
                           ldc);
  else if (w > 0)
    rxr_tile<TB, 1, false>(i0, j, lanes(w), all, k, alpha, a, sa_i, sa_p, b, ldb, beta, c, ldc);
}

RECLORA_AVX2 inline void rows_x_rows(int64_t m, int64_t n, int64_t k, float alpha,
                                     const float* a, int64_t sa_i, int64_t sa_p, const float* b,
                                     int64_t ldb, float beta, float* c, int64_t ldc) {
  int64_t i = 0;
  // One vector of C per row (n <= 8, as in v = g B_p): eight rows at a time, or the four
  // accumulators' FMA latency bounds the loop.
  if (n <= 8)
    for (; i + 8 <= m; i += 8) rxr_rows<8>(i, n, k, alpha, a, sa_i, sa_p, b, ldb, beta, c, ldc);
  for (; i + 4 <= m; i += 4) rxr_rows<4>(i, n, k, alpha, a, sa_i, sa_p, b, ldb, beta, c, ldc);
  for (; i < m; ++i) rxr_rows<1>(i, n, k, alpha, a, sa_i, sa_p, b, ldb, beta, c, ldc);
}

// C = alpha A^T B + beta C for a few rows of C (m small, A stored [k, m], B [k, n]: the factor
// gradient v^T x), or its transpose (transpose_out: C is [n, m], as in g^T s). rows_x_rows
// walks B's columns down all k rows, and with B's rows 4 KB apart (d = 1024) those lines share
// one L1 set: 27-33 GFLOP/s at d = 1024 against 43-55 at d = 1000. Here B is read along its
// rows, a few rows (tokens) at a time, each row of the [m, n] result in a scratch buffer
// (padded so that its rows do not share sets either) updated with the broadcast A values in
// registers; then C gets alpha * buffer + beta * C.
RECLORA_AVX2 inline void tn_rows(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                                 int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                                 int64_t ldc, bool transpose_out) {
  const int64_t ldw = (n + 7) / 8 * 8 + 16;
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < m * ldw) scratch.resize(m * ldw);
  float* w = scratch.data();
  std::fill(w, w + m * ldw, 0.f);
  const __m256i tail = lanes(n % 8);
  const int64_t full = n / 8 * 8;
  // Four rows of B at a time: with eight, the eight lines 4 KB apart and the scratch line
  // overflowed the 8-way L1 set again (30 GFLOP/s at d = 1024).
  constexpr int PB = 4;
  for (int64_t p = 0; p < k; p += PB) {
    const int64_t q_end = std::min<int64_t>(PB, k - p);
    const float* bp = b + p * ldb;
    for (int64_t i = 0; i < m; ++i) {
      float* wi = w + i * ldw;
      __m256 s[PB];
      RECLORA_UNROLL for (int q = 0; q < PB; ++q)
        s[q] = _mm256_set1_ps(q < q_end ? a[(p + q) * lda + i] : 0.f);
      if (q_end == PB) {
        for (int64_t j = 0; j < full; j += 8) {
          __m256 acc0 = _mm256_fmadd_ps(s[0], _mm256_loadu_ps(bp + j), _mm256_loadu_ps(wi + j));
          __m256 acc1 = _mm256_mul_ps(s[1], _mm256_loadu_ps(bp + ldb + j));
          acc0 = _mm256_fmadd_ps(s[2], _mm256_loadu_ps(bp + 2 * ldb + j), acc0);
          acc1 = _mm256_fmadd_ps(s[3], _mm256_loadu_ps(bp + 3 * ldb + j), acc1);
          _mm256_storeu_ps(wi + j, _mm256_add_ps(acc0, acc1));
        }
      } else {
        for (int64_t j = 0; j < full; j += 8) {
          __m256 acc = _mm256_loadu_ps(wi + j);
          for (int64_t q = 0; q < q_end; ++q)
            acc = _mm256_fmadd_ps(s[q], _mm256_loadu_ps(bp + q * ldb + j), acc);
          _mm256_storeu_ps(wi + j, acc);
        }
      }
      if (full < n) {  // the ragged end of each row (the scratch row has room for 8)
        __m256 acc = _mm256_loadu_ps(wi + full);
        for (int64_t q = 0; q < q_end; ++q)
          acc = _mm256_fmadd_ps(s[q], _mm256_maskload_ps(bp + q * ldb + full, tail), acc);
        _mm256_storeu_ps(wi + full, acc);
      }
    }
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float* out = transpose_out ? c + j * ldc + i : c + i * ldc + j;
      const float v = alpha * w[i * ldw + j];
      *out = beta == 0.f ? v : v + beta * *out;
    }
}

// One step of dots_tile: p .. p + 8 of TB rows of A and JB rows of B.
template <int TB, int JB, bool Full>
RECLORA_AVX2 inline void dots_step(__m256 (&acc)[TB][JB], const float* a, int64_t lda,
                                   const float* b, int64_t ldb, int64_t p, __m256i m) {
  __m256 av[TB];
  RECLORA_UNROLL for (int t = 0; t < TB; ++t) av[t] = load8<Full>(a + t * lda + p, m);
  RECLORA_UNROLL for (int u = 0; u < JB; ++u) {
    const __m256 bv = load8<Full>(b + u * ldb + p, m);
    RECLORA_UNROLL for (int t = 0; t < TB; ++t) acc[t][u] = _mm256_fmadd_ps(av[t], bv, acc[t][u]);
  }
}

// dots on rows [i0, i0 + TB) x columns [j0, j0 + JB) of C.
template <int TB, int JB>
RECLORA_AVX2 void dots_tile(int64_t i0, int64_t j0, int64_t k, float alpha, const float* a,
                            int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                            int64_t ldc) {
  __m256 acc[TB][JB];
  RECLORA_UNROLL for (int t = 0; t < TB; ++t)
    RECLORA_UNROLL for (int u = 0; u < JB; ++u) acc[t][u] = _mm256_setzero_ps();
  const float* ai = a + i0 * lda;
  const float* bj = b + j0 * ldb;
  int64_t p = 0;
  for (; p + 8 <= k; p += 8) dots_step<TB, JB, true>(acc, ai, lda, bj, ldb, p, lanes(8));
  if (p < k) dots_step<TB, JB, false>(acc, ai, lda, bj, ldb, p, lanes(k - p));
  RECLORA_UNROLL for (int t = 0; t < TB; ++t)
    RECLORA_UNROLL for (int u = 0; u < JB; ++u) {
      float* out = c + (i0 + t) * ldc + j0 + u;
      const float v = alpha * hsum(acc[t][u]);
      *out = beta == 0.f ? v : v + beta * *out;
    }
}

template <int TB>
RECLORA_AVX2 void dots_rows(int64_t i0, int64_t n, int64_t k, float alpha, const float* a,
                            int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                            int64_t ldc) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) dots_tile<TB, 4>(i0, j, k, alpha, a, lda, b, ldb, beta, c, ldc);
  for (; j < n; ++j) dots_tile<TB, 1>(i0, j, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

RECLORA_AVX2 inline void dots(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                              int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                              int64_t ldc) {
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) dots_rows<2>(i, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  for (; i < m; ++i) dots_rows<1>(i, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#endif  // RECLORA_HAVE_AVX2_THIN

// Whether this CPU can run the loops above.
inline bool cpu_has_avx2() {
#if RECLORA_HAVE_AVX2_THIN
  __builtin_cpu_init();  // may run from a static initialiser (the default mode)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// C[m, n] = alpha op(A) op(B) + beta C in the layout of reclora's gemm (row-major; op(A) is
// [m, k], stored [k, m] when ta; op(B) [k, n], stored [n, k] when tb). Returns false, having
// done nothing, for shapes these loops do not take (the caller then calls BLAS).
inline bool gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#if RECLORA_HAVE_AVX2_THIN
  if (std::min({m, n, k}) > kMaxThin || k == 0) return false;
  if (ta && !tb && k > kMaxThin) {
    if (m <= kMaxThin && n >= 64) {
      tn_rows(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, false);
      return true;
    }
    if (n <= kMaxThin && m >= 64) {  // C^T = B^T A, the same form with A and B swapped
      tn_rows(n, m, k, alpha, b, ldb, a, lda, beta, c, ldc, true);
      return true;
    }
  }
  if (!tb) {
    if (ta)
      rows_x_rows(m, n, k, alpha, a, 1, lda, b, ldb, beta, c, ldc);
    else
      rows_x_rows(m, n, k, alpha, a, lda, 1, b, ldb, beta, c, ldc);
    return true;
  }
  if (!ta && n <= kMaxThin) {
    dots(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return true;
  }
#endif
  (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b;
  (void)ldb, (void)beta, (void)c, (void)ldc;
  return false;
}

}  // namespace thin
}  // namespace reclora
