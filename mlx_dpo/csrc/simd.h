// The vector registers that the kernels' register tiles are written in: AVX-512 (16 floats, 32
// registers) or, on x86 machines without it, AVX2 with FMA (8 floats, 16 registers). Elsewhere
// (ARM, or a build with neither) MLX_DPO_SIMD_TILES stays undefined and the kernels use their
// plain C++ tiles, which GCC vectorises but whose accumulators it keeps on the stack.
//
// The kernels are written once, in these few operations, with a row of kTileVectors vectors per tile
// row: 6 rows x 4 AVX-512 vectors (64 floats, 24 accumulators), or 6 rows x 2 AVX2 vectors (16
// floats, 12 accumulators, leaving registers for the 2 loaded vectors and the broadcast).
#pragma once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

#define MLX_DPO_SIMD_TILES 1

namespace mlx_dpo::simd {

#if defined(__AVX512F__)
constexpr const char* kName = "AVX-512";
using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kRegisters = 32;
constexpr int kTileVectors = 4;
[[gnu::always_inline]] inline Vec zero() { return _mm512_setzero_ps(); }
[[gnu::always_inline]] inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
[[gnu::always_inline]] inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
[[gnu::always_inline]] inline Vec broadcast(float x) { return _mm512_set1_ps(x); }
[[gnu::always_inline]] inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
// The first n lanes (0 <= n <= kLanes) of p, zero in the others; stored back the same way. (A
// full mask loads and stores as fast as a plain load and store here.)
[[gnu::always_inline]] inline Vec load_first(const float* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
[[gnu::always_inline]] inline void store_first(float* p, Vec v, int n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}
[[gnu::always_inline]] inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
#else
constexpr const char* kName = "AVX2";
using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kRegisters = 16;
constexpr int kTileVectors = 2;
[[gnu::always_inline]] inline Vec zero() { return _mm256_setzero_ps(); }
[[gnu::always_inline]] inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
[[gnu::always_inline]] inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
[[gnu::always_inline]] inline Vec broadcast(float x) { return _mm256_set1_ps(x); }
[[gnu::always_inline]] inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
[[gnu::always_inline]] inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// As on AVX-512, but a whole vector by a plain load or store: AVX2's masked ones are slower.
[[gnu::always_inline]] inline Vec load_first(const float* p, int n) {
  return n == kLanes ? load(p) : _mm256_maskload_ps(p, first_lanes(n));
}
[[gnu::always_inline]] inline void store_first(float* p, Vec v, int n) {
  if (n == kLanes) {
    store(p, v);
  } else {
    _mm256_maskstore_ps(p, first_lanes(n), v);
  }
}
[[gnu::always_inline]] inline float sum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Floats per register-tile row.
constexpr int kTileWidth = kTileVectors * kLanes;

}  // namespace mlx_dpo::simd

#endif
