// Thin bf16 GEMMs with fp32 accumulation in AVX512-BF16 (vdpbf16ps), for the CPU op's LoRA
// part on CPUs that have it.
//
// The op's bf16 LoRA GEMMs went to MKL's cblas_gemm_bf16bf16f32, which on AMD CPUs takes its
// generic code path (perf on the AMD EPYC, Zen 5 with AVX512-BF16, of this project's machine,
// 2026-12-02: mkl_blas_def_xgemm_bf16bf16f32 and mkl_blas_def_sgemm_pst were 9.6% of a bf16
// factor forward at d = 576, T = 1024, whose base GEMM was 49%; torch's own bmm for the same
// shrink costs 0.10x F.linear). These loops are written for the LoRA shapes: one side is the
// rank (or k * r), the work is a pass over x or g.
//
// The forms (row-major; beta = 0 never reads C, so C may hold NaN):
//   dots:       C[i, j] = alpha * sum_p A[i, p] B[j, p] + beta * C   A, B bf16 (A B^T, p long);
//               32 products per instruction along p, one horizontal sum per output. The
//               shrinks x A^T and, with B kept transposed, g B.
//   outer:      C[i, j] += alpha * sum_p P[p, i] Q[p, j]   P fp32 (i thin), Q bf16; along j,
//               P broadcast. The factor gradients v^T x and s^T g.
//   pairs_gemm: C = alpha * A B + beta * C, A bf16, B bf16 in the pairs layout (pack_pairs,
//               pack_pairs_t); a broadcast pair of A against 16 columns of two B rows. Output
//               mode's k*r-wide GEMMs (t B_cat^T, g B_cat, t A_cat).
//   expand_add: y (bf16) = round(y + alpha * s bt), s and bt fp32: the factor expand fused
//               with its add into y or dx.
//   mix, dot_f32_bf16, axpy_f32: the factors' mixing and its backward.
// All accumulate in fp32. The products of two bf16 values are exact in fp32, so the GEMMs
// differ from an fp32 GEMM on the same values only by summation order; only expand_add
// rounds, once, to the bf16 output.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RECLORA_HAVE_BF16_DOTS 1
#else
#define RECLORA_HAVE_BF16_DOTS 0
#endif

namespace reclora {
namespace bf16 {

// Whether this CPU runs vdpbf16ps (AVX512-BF16 with the AVX512 subsets the loops use).
inline bool cpu_has_avx512_bf16() {
#if RECLORA_HAVE_BF16_DOTS
  __builtin_cpu_init();  // may run from a static initialiser (the default mode)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// 1 = these loops, 0 = MKL's gemm_bf16bf16f32 (as before). Default: the loops wherever the CPU
// has AVX512-BF16 (measured on AMD only; not on an Intel CPU); RECLORA_CPU_BF16=mkl turns them
// off; reclora::cpu_bf16_gemm switches them at run time (the tests run both paths).
inline int default_mode() {
  const char* env = std::getenv("RECLORA_CPU_BF16");
  if (env != nullptr && std::strcmp(env, "mkl") == 0) return 0;
  return cpu_has_avx512_bf16() ? 1 : 0;
}
inline std::atomic<int> g_mode{default_mode()};
inline bool on() { return g_mode.load(std::memory_order_relaxed) == 1; }

// Pairs layout: B [k, n] (bf16, row-major) as [ceil(k / 2), n, 2], rows 2q and 2q + 1
// interleaved (the last one paired with zeros when k is odd), so that one 512-bit load holds
// two rows of 16 columns, vdpbf16ps's operand (pack_pairs, pairs_gemm).
inline int64_t pairs_size(int64_t k, int64_t n) { return (k + 1) / 2 * n * 2; }

// B^T in the pairs layout from B [n, k] (row-major, row stride ld): B's rows hold the pairs
// side by side, so this is a transpose of 32-bit words (k * n / 2 of them, once per row's
// adapters; AVX512 gathers where the words are whole, pack_pairs_t below).
inline void pack_pairs_t_scalar(const uint16_t* src, int64_t ld, int64_t k, int64_t n,
                                uint16_t* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* row = src + j * ld;
    for (int64_t q = 0; 2 * q < k; ++q) {
      dst[(q * n + j) * 2] = row[2 * q];
      dst[(q * n + j) * 2 + 1] = 2 * q + 1 < k ? row[2 * q + 1] : uint16_t(0);
    }
  }
}

#if RECLORA_HAVE_BF16_DOTS
// AVX512 without BF16 (the conversions; lora_mix_cpu.cpp's AVX512 loops use them too), and with.
#define RECLORA_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define RECLORA_BF16DP \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// 16 bf16 values (lanes of m; the others 0) as fp32.
RECLORA_AVX512 inline __m512 widen16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// v rounded to bf16 into the lanes of m of p: to nearest even, a NaN kept a NaN, denormals kept
// (as c10::BFloat16 rounds; vcvtneps2bf16 would flush denormals).
RECLORA_AVX512 inline void narrow16(uint16_t* p, __m512 v, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  __m512i r = _mm512_srli_epi32(biased, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
// Register tiles are arrays indexed by small loops; unrolled so that GCC keeps them in
// registers (see thin_gemm.h).
#define RECLORA_BF16_UNROLL _Pragma("GCC unroll 16")

// Mask of the first n (< 32) 16-bit lanes.
RECLORA_BF16DP inline __mmask32 first32(int64_t n) {
  return _cvtu32_mask32(n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1u);
}
RECLORA_AVX512 inline __mmask16 first16(int64_t n) {
  return _cvtu32_mask16(n >= 16 ? 0xFFFFu : (1u << std::max<int64_t>(n, 0)) - 1u);
}

// The lane masks of four 16-wide vectors from the start of a row with n values left.
RECLORA_AVX512 inline __attribute__((always_inline)) void first64(int64_t n, __mmask16 (&m)[4]) {
  RECLORA_BF16_UNROLL
  for (int v = 0; v < 4; ++v) m[v] = first16(n - 16 * v);
}

// A register tile of accumulators set to 0.
template <int M, int N>
RECLORA_AVX512 inline __attribute__((always_inline)) void zero_tile(__m512 (&acc)[M][N]) {
  RECLORA_BF16_UNROLL
  for (int i = 0; i < M; ++i)
    RECLORA_BF16_UNROLL
    for (int j = 0; j < N; ++j) acc[i][j] = _mm512_setzero_ps();
}

// The sums of v[0..8) (each 16 lanes), as 8 lanes: halves added, then a transpose by hadds.
RECLORA_BF16DP inline __m256 sums8(const __m512* v) {
  __m256 h[8];
  RECLORA_BF16_UNROLL
  for (int j = 0; j < 8; ++j)
    h[j] = _mm256_add_ps(_mm512_castps512_ps256(v[j]), _mm512_extractf32x8_ps(v[j], 1));
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// One step of dots_tile: 32 values of p (lanes of m; masked lanes load as zeros).
template <int MI, int NJ>
RECLORA_BF16DP inline __attribute__((always_inline)) void dots_step(
    __m512 (&acc)[MI][8], const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
    int64_t p, __mmask32 m) {
  __m512bh av[MI];
  RECLORA_BF16_UNROLL
  for (int i = 0; i < MI; ++i) av[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, a + i * lda + p);
  RECLORA_BF16_UNROLL
  for (int j = 0; j < NJ; ++j) {
    const __m512bh bv = (__m512bh)_mm512_maskz_loadu_epi16(m, b + j * ldb + p);
    RECLORA_BF16_UNROLL
    for (int i = 0; i < MI; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av[i], bv);
  }
}

// dots on MI rows of C from a, NJ (<= 8) columns from b.
template <int MI, int NJ>
RECLORA_BF16DP void dots_tile(int64_t k, float alpha, const uint16_t* a, int64_t lda,
                              const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  __m512 acc[MI][8];
  zero_tile(acc);
  int64_t p = 0;
  for (; p + 32 <= k; p += 32) dots_step<MI, NJ>(acc, a, lda, b, ldb, p, first32(32));
  if (p < k) dots_step<MI, NJ>(acc, a, lda, b, ldb, p, first32(k - p));
  const __mmask8 m = _cvtu32_mask8((1u << NJ) - 1u);
  RECLORA_BF16_UNROLL
  for (int i = 0; i < MI; ++i) {
    __m256 out = _mm256_mul_ps(_mm256_set1_ps(alpha), sums8(acc[i]));
    float* ci = c + i * ldc;
    if (beta != 0.f)
      out = _mm256_fmadd_ps(_mm256_set1_ps(beta), _mm256_maskz_loadu_ps(m, ci), out);
    _mm256_mask_storeu_ps(ci, m, out);
  }
}

template <int MI>
RECLORA_BF16DP void dots_rows(int64_t nj, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                              const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  switch (nj) {
    case 1: return dots_tile<MI, 1>(k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 2: return dots_tile<MI, 2>(k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 3: return dots_tile<MI, 3>(k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 4: return dots_tile<MI, 4>(k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 5: return dots_tile<MI, 5>(k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 6: return dots_tile<MI, 6>(k, alpha, a, lda, b, ldb, beta, c, ldc);
    case 7: return dots_tile<MI, 7>(k, alpha, a, lda, b, ldb, beta, c, ldc);
    default: return dots_tile<MI, 8>(k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

// C [m, n] = alpha * A [m, k] B [n, k]^T + beta * C. Three rows of A at a time against every
// 8 rows of B (24 accumulators): the three rows stay in L1 while B streams.
RECLORA_BF16DP inline void dots(int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                                int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
                                int64_t ldc) {
  int64_t i = 0;
  for (; i + 3 <= m; i += 3)
    for (int64_t j = 0; j < n; j += 8)
      dots_rows<3>(std::min<int64_t>(8, n - j), k, alpha, a + i * lda, lda, b + j * ldb, ldb,
                   beta, c + i * ldc + j, ldc);
  for (; i < m; ++i)
    for (int64_t j = 0; j < n; j += 8)
      dots_rows<1>(std::min<int64_t>(8, n - j), k, alpha, a + i * lda, lda, b + j * ldb, ldb,
                   beta, c + i * ldc + j, ldc);
}

// outer on MI (<= 8) rows of C, columns [j, j + 32) masked by lo/hi.
template <int MI>
RECLORA_BF16DP void outer_tile(int64_t k, float alpha, const float* p, int64_t ldp,
                               const uint16_t* q, int64_t ldq, float* c, int64_t ldc,
                               __mmask16 lo, __mmask16 hi) {
  __m512 acc[MI][2];
  zero_tile(acc);
  for (int64_t t = 0; t < k; ++t) {
    const __m512 v0 = widen16(q + t * ldq, lo), v1 = widen16(q + t * ldq + 16, hi);
    RECLORA_BF16_UNROLL
    for (int i = 0; i < MI; ++i) {
      const __m512 s = _mm512_set1_ps(p[t * ldp + i]);
      acc[i][0] = _mm512_fmadd_ps(s, v0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(s, v1, acc[i][1]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  RECLORA_BF16_UNROLL
  for (int i = 0; i < MI; ++i) {
    float* ci = c + i * ldc;
    _mm512_mask_storeu_ps(ci, lo, _mm512_fmadd_ps(va, acc[i][0], _mm512_maskz_loadu_ps(lo, ci)));
    _mm512_mask_storeu_ps(ci + 16, hi,
                          _mm512_fmadd_ps(va, acc[i][1], _mm512_maskz_loadu_ps(hi, ci + 16)));
  }
}

// C [m, n] += alpha * P [k, m]^T Q [k, n]: 32 columns at a time, 8 rows of C per pass over Q's
// columns (the whole k; Q's 64-byte column stripe is read once per 8 rows of C).
RECLORA_BF16DP inline void outer(int64_t m, int64_t n, int64_t k, float alpha, const float* p,
                                 int64_t ldp, const uint16_t* q, int64_t ldq, float* c,
                                 int64_t ldc) {
  for (int64_t j = 0; j < n; j += 32) {
    const __mmask16 lo = first16(n - j), hi = first16(n - j - 16);
    for (int64_t i = 0; i < m; i += 8) {
      const float* pi = p + i;
      float* ci = c + i * ldc + j;
      switch (std::min<int64_t>(8, m - i)) {
        case 1: outer_tile<1>(k, alpha, pi, ldp, q + j, ldq, ci, ldc, lo, hi); break;
        case 2: outer_tile<2>(k, alpha, pi, ldp, q + j, ldq, ci, ldc, lo, hi); break;
        case 3: outer_tile<3>(k, alpha, pi, ldp, q + j, ldq, ci, ldc, lo, hi); break;
        case 4: outer_tile<4>(k, alpha, pi, ldp, q + j, ldq, ci, ldc, lo, hi); break;
        case 5: outer_tile<5>(k, alpha, pi, ldp, q + j, ldq, ci, ldc, lo, hi); break;
        case 6: outer_tile<6>(k, alpha, pi, ldp, q + j, ldq, ci, ldc, lo, hi); break;
        case 7: outer_tile<7>(k, alpha, pi, ldp, q + j, ldq, ci, ldc, lo, hi); break;
        default: outer_tile<8>(k, alpha, pi, ldp, q + j, ldq, ci, ldc, lo, hi); break;
      }
    }
  }
}

// y [len, n] (bf16) = round(y + alpha * s [len, rank] bt [rank, n]) with s and bt fp32: the
// expand and its add into the bf16 output in one pass, MT tokens by V vectors of 16 outputs
// in registers (bt's rows are read once per MT tokens).
template <int MT, int V>
RECLORA_BF16DP void expand_tile(int64_t rank, float alpha, const float* s, int64_t lds,
                                const float* bt, int64_t ldb, uint16_t* y, int64_t ldy,
                                const __mmask16* m) {
  __m512 acc[MT][V];
  zero_tile(acc);
  for (int64_t c = 0; c < rank; ++c) {
    __m512 b[V];
    RECLORA_BF16_UNROLL
    for (int v = 0; v < V; ++v) b[v] = _mm512_maskz_loadu_ps(m[v], bt + c * ldb + 16 * v);
    RECLORA_BF16_UNROLL
    for (int t = 0; t < MT; ++t) {
      const __m512 st = _mm512_set1_ps(s[t * lds + c]);
      RECLORA_BF16_UNROLL
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_fmadd_ps(st, b[v], acc[t][v]);
    }
  }
  // y's new values rounded 32 at a time (vcvtne2ps2bf16: to nearest even, as oneDNN rounds
  // the base GEMM's bf16 output; the integer rounding of narrow16 took as many instructions as
  // the products here)
  const __m512 va = _mm512_set1_ps(alpha);
  RECLORA_BF16_UNROLL
  for (int t = 0; t < MT; ++t) {
    uint16_t* yt = y + t * ldy;
    RECLORA_BF16_UNROLL
    for (int v = 0; v + 1 < V; v += 2) {
      const __m512 lo = _mm512_fmadd_ps(va, acc[t][v], widen16(yt + 16 * v, m[v]));
      const __m512 hi = _mm512_fmadd_ps(va, acc[t][v + 1], widen16(yt + 16 * v + 16, m[v + 1]));
      _mm512_mask_storeu_epi16(yt + 16 * v, _mm512_kunpackw(m[v + 1], m[v]),
                               (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    if constexpr (V % 2 == 1) {
      const __m512 last = _mm512_fmadd_ps(va, acc[t][V - 1], widen16(yt + 16 * (V - 1), m[V - 1]));
      _mm256_mask_storeu_epi16(yt + 16 * (V - 1), m[V - 1], (__m256i)_mm512_cvtneps_pbh(last));
    }
  }
}

template <int MT>
RECLORA_BF16DP void expand_tokens(int64_t n, int64_t rank, float alpha, const float* s,
                                  int64_t lds, const float* bt, int64_t ldb, uint16_t* y,
                                  int64_t ldy) {
  for (int64_t j = 0; j < n; j += 64) {
    __mmask16 m[4];
    first64(n - j, m);
    const float* bj = bt + j;
    uint16_t* yj = y + j;
    switch ((std::min<int64_t>(64, n - j) + 15) / 16) {
      case 1: expand_tile<MT, 1>(rank, alpha, s, lds, bj, ldb, yj, ldy, m); break;
      case 2: expand_tile<MT, 2>(rank, alpha, s, lds, bj, ldb, yj, ldy, m); break;
      case 3: expand_tile<MT, 3>(rank, alpha, s, lds, bj, ldb, yj, ldy, m); break;
      default: expand_tile<MT, 4>(rank, alpha, s, lds, bj, ldb, yj, ldy, m); break;
    }
  }
}

RECLORA_BF16DP inline void expand_add(int64_t len, int64_t n, int64_t rank, float alpha,
                                      const float* s, int64_t lds, const float* bt, int64_t ldb,
                                      uint16_t* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + 4 <= len; t += 4)
    expand_tokens<4>(n, rank, alpha, s + t * lds, lds, bt, ldb, y + t * ldy, ldy);
  for (; t < len; ++t)
    expand_tokens<1>(n, rank, alpha, s + t * lds, lds, bt, ldb, y + t * ldy, ldy);
}

// out [size] (fp32) = sum_j w[j] src_j, src_j = bank + adapter(j) * size in bf16 (adapter(j)
// = idx[j], or j when idx is null): 64 outputs in registers across all slots, so out is
// written once rather than once per slot.
RECLORA_AVX512 inline void mix(float* out, const uint16_t* bank, int64_t size, const float* w,
                               const int64_t* idx, int64_t slots) {
  for (int64_t e = 0; e < size; e += 64) {
    __mmask16 m[4];
    first64(size - e, m);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t j = 0; j < slots; ++j) {
      const uint16_t* src = bank + (idx != nullptr ? idx[j] : j) * size + e;
      const __m512 wj = _mm512_set1_ps(w[j]);
      RECLORA_BF16_UNROLL
      for (int v = 0; v < 4; ++v) acc[v] = _mm512_fmadd_ps(wj, widen16(src + 16 * v, m[v]), acc[v]);
    }
    RECLORA_BF16_UNROLL
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(out + e + 16 * v, m[v], acc[v]);
  }
}

RECLORA_AVX512 inline void pack_pairs(const uint16_t* src, int64_t ld, int64_t k, int64_t n,
                                      uint16_t* dst) {
  // output lane l of the low half takes column l / 2 of row 2q + l % 2; the high half + 16
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int l = 0; l < 32; ++l) {
    lo_idx[l] = static_cast<uint16_t>((l % 2) * 32 + l / 2);
    hi_idx[l] = static_cast<uint16_t>((l % 2) * 32 + 16 + l / 2);
  }
  const __m512i vlo = _mm512_load_si512(lo_idx), vhi = _mm512_load_si512(hi_idx);
  for (int64_t q = 0; 2 * q < k; ++q) {
    const uint16_t* r0 = src + 2 * q * ld;
    const uint16_t* r1 = 2 * q + 1 < k ? r0 + ld : nullptr;
    uint16_t* out = dst + q * n * 2;
    for (int64_t j = 0; j < n; j += 32) {
      const __mmask32 m = first32(n - j);
      const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + j);
      const __m512i b =
          r1 != nullptr ? _mm512_maskz_loadu_epi16(m, r1 + j) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(out + 2 * j, first16(n - j), _mm512_permutex2var_epi16(a, vlo, b));
      _mm512_mask_storeu_epi32(out + 2 * j + 32, first16(n - j - 16),
                               _mm512_permutex2var_epi16(a, vhi, b));
    }
  }
}

// pairs_gemm on MT rows of C, columns [0, 16 V) of the pointers given (lanes of m).
template <int MT, int V>
RECLORA_BF16DP void pairs_tile(int64_t k, float alpha, const uint16_t* a, int64_t lda,
                               const uint16_t* bp, int64_t n, float beta, float* c, int64_t ldc,
                               const __mmask16* m) {
  __m512 acc[MT][V];
  zero_tile(acc);
  for (int64_t q = 0; 2 * q < k; ++q) {
    __m512bh b[V];
    RECLORA_BF16_UNROLL
    for (int v = 0; v < V; ++v)
      b[v] = (__m512bh)_mm512_maskz_loadu_epi32(m[v], bp + (q * n + 16 * v) * 2);
    const bool whole = 2 * q + 1 < k;  // else the pair's second value is 0, not read
    RECLORA_BF16_UNROLL
    for (int t = 0; t < MT; ++t) {
      uint32_t pair = a[t * lda + 2 * q];  // A's two values, little-endian
      if (whole) std::memcpy(&pair, a + t * lda + 2 * q, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      RECLORA_BF16_UNROLL
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], av, b[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  RECLORA_BF16_UNROLL
  for (int t = 0; t < MT; ++t)
    RECLORA_BF16_UNROLL
    for (int v = 0; v < V; ++v) {
      float* ct = c + t * ldc + 16 * v;
      __m512 out = _mm512_mul_ps(va, acc[t][v]);
      if (beta != 0.f)
        out = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(m[v], ct), out);
      _mm512_mask_storeu_ps(ct, m[v], out);
    }
}

template <int MT>
RECLORA_BF16DP void pairs_rows(int64_t n, int64_t k, float alpha, const uint16_t* a, int64_t lda,
                               const uint16_t* bp, float beta, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += 64) {
    __mmask16 m[4];
    first64(n - j, m);
    const uint16_t* bj = bp + 2 * j;
    float* cj = c + j;
    switch ((std::min<int64_t>(64, n - j) + 15) / 16) {
      case 1: pairs_tile<MT, 1>(k, alpha, a, lda, bj, n, beta, cj, ldc, m); break;
      case 2: pairs_tile<MT, 2>(k, alpha, a, lda, bj, n, beta, cj, ldc, m); break;
      case 3: pairs_tile<MT, 3>(k, alpha, a, lda, bj, n, beta, cj, ldc, m); break;
      default: pairs_tile<MT, 4>(k, alpha, a, lda, bj, n, beta, cj, ldc, m); break;
    }
  }
}

// C [m, n] = alpha * A [m, k] B [k, n] + beta * C, A bf16, B bf16 in the pairs layout
// (pack_pairs); 4 rows by 64 columns in registers. For the LoRA GEMMs whose short side is
// the inner one (k * r) or whose B is reused by every token (g B_cat).
RECLORA_BF16DP inline void pairs_gemm(int64_t m, int64_t n, int64_t k, float alpha,
                                      const uint16_t* a, int64_t lda, const uint16_t* bp,
                                      float beta, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) pairs_rows<4>(n, k, alpha, a + i * lda, lda, bp, beta, c + i * ldc, ldc);
  for (; i < m; ++i) pairs_rows<1>(n, k, alpha, a + i * lda, lda, bp, beta, c + i * ldc, ldc);
}

// pack_pairs_t: with k and ld even (every pair a whole 32-bit word of B) 16 words of one
// column of pairs at a time by a gather (a scalar loop took ~0.3 ms a call at d_out = 2048,
// k * r = 128: more than the expand it feeds).
RECLORA_AVX512 inline void pack_pairs_t(const uint16_t* src, int64_t ld, int64_t k, int64_t n,
                                        uint16_t* dst) {
  if (k % 2 != 0 || ld % 2 != 0 || reinterpret_cast<uintptr_t>(src) % 4 != 0 || n * ld / 2 > INT32_MAX)
    return pack_pairs_t_scalar(src, ld, k, n, dst);
  const int* words = reinterpret_cast<const int*>(src);
  const __m512i lane = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                           4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(ld / 2)));
  for (int64_t q = 0; q < k / 2; ++q) {
    int* out = reinterpret_cast<int*>(dst) + q * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = first16(n - j);
      const __m512i at = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j * ld / 2 + q)));
      _mm512_mask_storeu_epi32(out + j, m,
                               _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, at, words, 4));
    }
  }
}

// sum_e p[e] * bf16(q[e]).
RECLORA_BF16DP inline float dot_f32_bf16(const float* p, const uint16_t* q, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 m = first16(n - e);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p + e), widen16(q + e, m), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// out[e] += w * g[e] (fp32).
RECLORA_BF16DP inline void axpy_f32(float* out, float w, const float* g, int64_t n) {
  const __m512 vw = _mm512_set1_ps(w);
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 m = first16(n - e);
    _mm512_mask_storeu_ps(out + e, m,
                          _mm512_fmadd_ps(vw, _mm512_maskz_loadu_ps(m, g + e),
                                          _mm512_maskz_loadu_ps(m, out + e)));
  }
}
#else
// Without the intrinsics on() is always false and these are never called.
inline void dots(int64_t, int64_t, int64_t, float, const uint16_t*, int64_t, const uint16_t*,
                 int64_t, float, float*, int64_t) { std::abort(); }
inline void outer(int64_t, int64_t, int64_t, float, const float*, int64_t, const uint16_t*,
                  int64_t, float*, int64_t) { std::abort(); }
inline float dot_f32_bf16(const float*, const uint16_t*, int64_t) { std::abort(); }
inline void axpy_f32(float*, float, const float*, int64_t) { std::abort(); }
inline void expand_add(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                       int64_t, uint16_t*, int64_t) { std::abort(); }
inline void mix(float*, const uint16_t*, int64_t, const float*, const int64_t*, int64_t) {
  std::abort();
}
inline void pack_pairs(const uint16_t*, int64_t, int64_t, int64_t, uint16_t*) { std::abort(); }
inline void pack_pairs_t(const uint16_t* src, int64_t ld, int64_t k, int64_t n, uint16_t* dst) {
  pack_pairs_t_scalar(src, ld, k, n, dst);
}
inline void pairs_gemm(int64_t, int64_t, int64_t, float, const uint16_t*, int64_t,
                       const uint16_t*, float, float*, int64_t) { std::abort(); }
#endif  // RECLORA_HAVE_BF16_DOTS

}  // namespace bf16
}  // namespace reclora
