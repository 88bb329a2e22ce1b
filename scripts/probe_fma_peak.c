// Probe, not part of mlx-dpo: the arithmetic ceiling of one core in fp32, for reading the bench's
// utilisation (docs/benchmarks.md, session 19). Sixteen independent AVX-512 multiply-add chains on
// registers only, no memory traffic: what one core's vector units can do at all.
// Build and run (x86-64 with AVX-512):
//   gcc -O2 -march=native scripts/probe_fma_peak.c -o /tmp/probe_fma_peak && /tmp/probe_fma_peak
// It prints GFLOP/s for five runs of 2e8 multiply-adds (2 FLOPs each, 16 lanes); compare one core's
// figure with half of the bench's two-thread 2048^3 matmul rate.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

int main(void) {
  const long lanes_total = 200000000;  // multiply-adds per lane over the 16 chains, per run
  __m512 acc[16];
  const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.999999f);
  for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_ps((float)i);
  for (int run = 0; run < 5; run++) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < lanes_total / 16; k++) {
#pragma GCC unroll 16
      for (int i = 0; i < 16; i++) acc[i] = _mm512_fmadd_ps(acc[i], x, y);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    float sum = 0.0f;  // used, so that the chains are not optimised away
    for (int i = 0; i < 16; i++) sum += _mm512_reduce_add_ps(acc[i]);
    printf("%.1f GFLOP/s on one core (checksum %g)\n", (double)lanes_total * 32.0 / seconds / 1e9, sum);
  }
  return 0;
}
