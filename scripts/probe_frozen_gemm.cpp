// Probe, not part of mlx-dpo: can a GEMM that never packs the frozen weight beat OpenBLAS on a
// LoRA step's products? (docs/benchmarks.md, session 14; the answer on that machine was no.)
//
// OpenBLAS packs every operand of every call; in a LoRA step the frozen weights are packed four
// times (two CPU streams x forward and input gradient), 13% of the step's CPU samples. These
// AVX-512 kernels read W (outputs x inputs, row-major, as MLX holds it) where it lies:
//   forward  y = x W^T : computed as y^T = W x^T, W's rows broadcast in place, x transposed once
//                        per call, each (8 x 48) tile over the full depth and stored transposed;
//   backward dx = dy W : W's rows are the vector operand, read in place, dy's rows broadcast,
//                        (8 x 48) tiles in depth blocks of 256.
// Build and run (Linux x86-64 with AVX-512 and Debian's OpenBLAS):
//   g++ -O3 -march=native -std=c++17 scripts/probe_frozen_gemm.cpp -o /tmp/probe_frozen_gemm \
//       -pthread /usr/lib/x86_64-linux-gnu/libopenblas.so.0
//   OPENBLAS_CORETYPE=SkylakeX /tmp/probe_frozen_gemm
// It prints, for SmolLM2-135M's weight shapes and 384 tokens, the best of 30 calls on one thread
// (operands hot), then a LoRA step's order: 30 layers' 7 products, forward and input gradient,
// on two threads at once (the two CPU streams), OpenBLAS and these kernels alternating, and
// OpenBLAS on both streams' tokens at once with two threads.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

extern "C" void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                            float*, int);
extern "C" void openblas_set_num_threads(int);
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

constexpr int MR = 8, NV = 3, NR = 16 * NV, DEPTH_BLOCK = 256;

// c[MR x NR] (+)= a[MR x depth] b[depth x NR]; a's rows broadcast, b's rows loaded as vectors.
template <int Rows>
static inline void tile(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int depth,
                        bool accumulate, bool transposed_store) {
  __m512 acc[Rows][NV];
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int d = 0; d < depth; ++d) {
    __m512 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + d * ldb + 16 * j);
    for (int i = 0; i < Rows; ++i) {
      __m512 av = _mm512_set1_ps(a[i * lda + d]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  if (!transposed_store) {
    for (int i = 0; i < Rows; ++i)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
    return;
  }
  alignas(64) float buf[Rows][NR];
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < NV; ++j) _mm512_store_ps(buf[i] + 16 * j, acc[i][j]);
  for (int m = 0; m < NR; ++m)
    for (int i = 0; i < Rows; ++i) c[m * ldc + i] = buf[i][m];
}

// dx[M x K] = dy[M x N] W[N x K]; K a multiple of NR.
static void backward(const float* dy, const float* w, float* dx, int M, int N, int K) {
  for (int d0 = 0; d0 < N; d0 += DEPTH_BLOCK) {
    int depth = std::min(DEPTH_BLOCK, N - d0);
    for (int k0 = 0; k0 < K; k0 += NR) {
      int m = 0;
      for (; m + MR <= M; m += MR)
        tile<MR>(dy + m * N + d0, N, w + d0 * K + k0, K, dx + m * K + k0, K, depth, d0 > 0, false);
      for (; m < M; ++m) tile<1>(dy + m * N + d0, N, w + d0 * K + k0, K, dx + m * K + k0, K, depth, d0 > 0, false);
    }
  }
}

// y[M x N] = x[M x K] W[N x K]^T; M a multiple of NR, N of MR.
static void forward(const float* x, const float* w, float* y, int M, int N, int K) {
  thread_local std::vector<float> xt;
  xt.resize(static_cast<size_t>(K) * M);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) xt[k * M + m] = x[m * K + k];
  for (int m0 = 0; m0 < M; m0 += NR)
    for (int n = 0; n < N; n += MR) tile<MR>(w + n * K, K, xt.data() + m0, M, y + m0 * N + n, N, K, false, true);
}

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int TOKENS = 384;
// SmolLM2-135M's projections, W as (outputs, inputs): q, k, v, o, gate, up, down.
constexpr int SHAPES[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};

struct Operands {
  int m;
  std::vector<float> w, x, y, dy, dx;
  Operands(int n, int k, int tokens = TOKENS)
      : m(tokens), w(static_cast<size_t>(n) * k), x(static_cast<size_t>(m) * k), y(static_cast<size_t>(m) * n),
        dy(static_cast<size_t>(m) * n), dx(static_cast<size_t>(m) * k) {
    for (auto* v : {&w, &x, &dy})
      for (auto& e : *v) e = static_cast<float>(rand()) / RAND_MAX - 0.5f;
  }
};

static void products(Operands& o, int n, int k, bool mine) {
  if (mine) {
    forward(o.x.data(), o.w.data(), o.y.data(), o.m, n, k);
    backward(o.dy.data(), o.w.data(), o.dx.data(), o.m, n, k);
  } else {
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, o.m, n, k, 1.f, o.x.data(), k, o.w.data(), k, 0.f, o.y.data(), n);
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, o.m, k, n, 1.f, o.dy.data(), n, o.w.data(), k, 0.f, o.dx.data(), k);
  }
}

// GFLOP/s of 30 layers' products in a step's order, `rounds` times over.
static double step_order(bool mine, int rounds, int tokens = TOKENS) {
  std::vector<Operands> layers;
  for (int l = 0; l < 30; ++l)
    for (auto& s : SHAPES) layers.emplace_back(s[0], s[1], tokens);
  double flops = 0, start = now();
  for (int r = 0; r < rounds; ++r)
    for (size_t j = 0; j < layers.size(); ++j) {
      int n = SHAPES[j % 7][0], k = SHAPES[j % 7][1];
      products(layers[j], n, k, mine);
      flops += 4.0 * tokens * n * k;
    }
  return flops / (now() - start) / 1e9;
}

int main() {
  openblas_set_num_threads(1);
  printf("one thread, %d tokens, best of 30 (operands hot), GFLOP/s\n", TOKENS);
  for (int s : {0, 1, 4, 6}) {  // the four distinct shapes
    int n = SHAPES[s][0], k = SHAPES[s][1];
    Operands blas(n, k), mine(n, k);
    mine.x = blas.x, mine.w = blas.w, mine.dy = blas.dy;
    double rate[2][2];  // [mine][forward, backward]
    for (int who = 0; who < 2; ++who) {
      Operands& o = who ? mine : blas;
      for (int dir = 0; dir < 2; ++dir) {
        double best = 1e9;
        for (int r = 0; r < 30; ++r) {
          double t = now();
          if (dir == 0 && who) forward(o.x.data(), o.w.data(), o.y.data(), TOKENS, n, k);
          if (dir == 0 && !who)
            cblas_sgemm(kRowMajor, kNoTrans, kTrans, TOKENS, n, k, 1.f, o.x.data(), k, o.w.data(), k, 0.f, o.y.data(), n);
          if (dir == 1 && who) backward(o.dy.data(), o.w.data(), o.dx.data(), TOKENS, n, k);
          if (dir == 1 && !who)
            cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, TOKENS, k, n, 1.f, o.dy.data(), n, o.w.data(), k, 0.f, o.dx.data(),
                        k);
          best = std::min(best, now() - t);
        }
        rate[who][dir] = 2.0 * TOKENS * n * k / best / 1e9;
      }
    }
    double err = 0;
    for (size_t i = 0; i < blas.y.size(); ++i) err = std::max(err, static_cast<double>(std::fabs(blas.y[i] - mine.y[i])));
    for (size_t i = 0; i < blas.dx.size(); ++i) err = std::max(err, static_cast<double>(std::fabs(blas.dx[i] - mine.dx[i])));
    printf("  W %4d x %4d: forward OpenBLAS %5.1f, unpacked %5.1f; backward OpenBLAS %5.1f, unpacked %5.1f"
           " (largest difference %.1e)\n", n, k, rate[0][0], rate[1][0], rate[0][1], rate[1][1], err);
  }
  printf("a step's order, 30 layers x 7 products, forward and input gradient, two threads, GFLOP/s\n");
  for (int round = 0; round < 3; ++round)
    for (int mine = 0; mine < 2; ++mine) {
      double a = 0, b = 0;
      std::thread t1([&] { a = step_order(mine, 3); }), t2([&] { b = step_order(mine, 3); });
      t1.join();
      t2.join();
      printf("  %s %5.1f + %5.1f = %5.1f\n", mine ? "unpacked" : "OpenBLAS", a, b, a + b);
      if (mine) {  // the alternative to two streams: both streams' tokens in one call on both cores
        openblas_set_num_threads(2);
        printf("  OpenBLAS, %d tokens per call on two threads: %5.1f\n", 2 * TOKENS, step_order(false, 3, 2 * TOKENS));
        openblas_set_num_threads(1);
      }
    }
}
