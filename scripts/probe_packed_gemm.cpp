// Probe, not part of mlx-dpo: would keeping LoRA's frozen weights packed from one call to the
// next (panels of 32 output columns, made once) beat OpenBLAS, which packs them in every call?
// (docs/benchmarks.md, session 20: at seq 256 that packing, OpenBLAS's `itcopy` and `incopy`,
// holds 11% of a LoRA step's CPU samples; on this machine the answer was no.) Companion of
// probe_frozen_gemm.cpp, which reads the weights unpacked.
//
// The kernel: C (M x N) += A (M x K) B, B in panels[N / 32][K][32], 8 or 12 rows x 32 columns of
// accumulators, depth blocks of 256; the forward y = x W^T and the input gradient dx = dy W each
// get their own panels of W. OpenBLAS gets beta = 1, as LoRA's products do (the branch is its C).
// Build and run (Linux x86-64 with AVX-512 and Debian's OpenBLAS):
//   g++ -O3 -march=native -std=c++17 scripts/probe_packed_gemm.cpp -o /tmp/probe_packed_gemm \
//       /usr/lib/x86_64-linux-gnu/libopenblas.so.0
//   OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=SkylakeX /tmp/probe_packed_gemm [TOKENS, default 376]
// It checks one product each way against OpenBLAS, then prints four rounds of a LoRA step's order
// on one thread (30 layers' 7 products, forward and input gradient; best of 3), OpenBLAS and the
// two tile heights alternating.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <cmath>
extern "C" void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
constexpr int P = 32;   // panel width
constexpr int KC = 256; // depth block

// panels[N/32][K][32] from W laid out so that B[k][n] = w(k, n)
template <class F> std::vector<float> pack(int K, int N, F w) {
  std::vector<float> out((size_t)(N + P - 1) / P * P * K, 0.f);
  for (int p = 0; p * P < N; ++p)
    for (int k = 0; k < K; ++k)
      for (int c = 0; c < P && p * P + c < N; ++c) out[((size_t)p * K + k) * P + c] = w(k, p * P + c);
  return out;
}

template <int R>
inline void tile(const float* a, int lda, const float* b, int k0, int k1, float* c, int ldc, bool init) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    if (init) { acc[r][0] = _mm512_setzero_ps(); acc[r][1] = _mm512_setzero_ps(); }
    else { acc[r][0] = _mm512_loadu_ps(c + r * ldc); acc[r][1] = _mm512_loadu_ps(c + r * ldc + 16); }
  }
  for (int k = k0; k < k1; ++k) {
    __m512 b0 = _mm512_loadu_ps(b + k * P), b1 = _mm512_loadu_ps(b + k * P + 16);
    for (int r = 0; r < R; ++r) {
      __m512 x = _mm512_set1_ps(a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) { _mm512_storeu_ps(c + r * ldc, acc[r][0]); _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]); }
}

template <int R>
void packed_gemm(int M, int N, int K, const float* a, const float* panels, float* c, bool beta0) {
  for (int p = 0; p * P < N; ++p) {
    const float* b = panels + (size_t)p * K * P;
    for (int k0 = 0; k0 < K; k0 += KC) {
      int k1 = std::min(K, k0 + KC);
      bool init = beta0 && k0 == 0;
      int m = 0;
      for (; m + R <= M; m += R) tile<R>(a + (size_t)m * K, K, b, k0, k1, c + (size_t)m * N + p * P, N, init);
      for (; m < M; ++m) tile<1>(a + (size_t)m * K, K, b, k0, k1, c + (size_t)m * N + p * P, N, init);
    }
  }
}

int main(int argc, char** argv) {
  int M = argc > 1 ? atoi(argv[1]) : 376, layers = 30;
  struct Shape { int n, k; };
  Shape shapes[] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};  // q k v o gate up down: W (n x k)
  std::vector<std::vector<float>> W, fwd, bwd;
  srand(1);
  for (int l = 0; l < layers; ++l)
    for (auto s : shapes) {
      std::vector<float> w((size_t)s.n * s.k);
      for (auto& v : w) v = rand() / (float)RAND_MAX - 0.5f;
      fwd.push_back(pack(s.k, s.n, [&](int k, int n) { return w[(size_t)n * s.k + k]; }));   // y = x W^T: B[k][n] = W[n][k]
      bwd.push_back(pack(s.n, s.k, [&](int n, int k) { return w[(size_t)n * s.k + k]; }));   // dx = dy W: B[n][k] = W[n][k]
      W.push_back(std::move(w));
    }
  std::vector<float> x((size_t)M * 1536), y((size_t)M * 1536), y2((size_t)M * 1536);
  for (auto& v : x) v = rand() / (float)RAND_MAX - 0.5f;
  double flops = 0;
  for (auto s : shapes) flops += 2.0 * 2 * M * s.n * s.k * layers;  // forward + input gradient
  // check one product each way
  { auto s = shapes[4]; cblas_sgemm(RowMajor, NoTrans, Trans, M, s.n, s.k, 1, x.data(), s.k, W[4].data(), s.k, 0, y.data(), s.n);
    packed_gemm<8>(M, s.n, s.k, x.data(), fwd[4].data(), y2.data(), true);
    double e = 0; for (size_t i = 0; i < (size_t)M * s.n; ++i) e = std::max(e, (double)std::fabs(y[i] - y2[i]));
    cblas_sgemm(RowMajor, NoTrans, NoTrans, M, s.k, s.n, 1, x.data(), s.n, W[4].data(), s.k, 0, y.data(), s.k);
    packed_gemm<8>(M, s.k, s.n, x.data(), bwd[4].data(), y2.data(), true);
    double e2 = 0; for (size_t i = 0; i < (size_t)M * s.k; ++i) e2 = std::max(e2, (double)std::fabs(y[i] - y2[i]));
    printf("largest difference forward %.2e backward %.2e\n", e, e2); }
  for (int round = 0; round < 4; ++round) {
    for (int which = 0; which < 3; ++which) {
      double best = 1e9;
      for (int rep = 0; rep < 3; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        for (int l = 0; l < layers; ++l)
          for (int i = 0; i < 7; ++i) {
            int j = l * 7 + i; auto s = shapes[i];
            if (which == 0) {
              cblas_sgemm(RowMajor, NoTrans, Trans, M, s.n, s.k, 1, x.data(), s.k, W[j].data(), s.k, 1, y.data(), s.n);
              cblas_sgemm(RowMajor, NoTrans, NoTrans, M, s.k, s.n, 1, x.data(), s.n, W[j].data(), s.k, 1, y.data(), s.k);
            } else if (which == 1) {
              packed_gemm<8>(M, s.n, s.k, x.data(), fwd[j].data(), y.data(), false);
              packed_gemm<8>(M, s.k, s.n, x.data(), bwd[j].data(), y.data(), false);
            } else {
              packed_gemm<12>(M, s.n, s.k, x.data(), fwd[j].data(), y.data(), false);
              packed_gemm<12>(M, s.k, s.n, x.data(), bwd[j].data(), y.data(), false);
            }
          }
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      printf("M %d %-9s %.1f GFLOP/s\n", M, which == 2 ? "packed12" : which ? "packed8" : "OpenBLAS", flops / best / 1e9);
    }
  }
}
