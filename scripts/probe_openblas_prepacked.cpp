// Probe, not part of mlx-dpo: LoRA's frozen products through OpenBLAS's own micro-kernel, with
// the frozen weights packed once (by OpenBLAS's own copy routines) instead of in every call.
// probe_packed_gemm.cpp tried the same with a kernel of our own, which ran at 0.81-0.85 of
// OpenBLAS; here the kernel is OpenBLAS's, so only the packing differs.
//
// Debian's OpenBLAS (DYNAMIC_ARCH) exports each core's kernels by name: sgemm_kernel_SKYLAKEX
// computes C += alpha A B on packed panels (A in strips of 16 rows, B of 4 columns), and
// sgemm_{in,it,on}copy_SKYLAKEX make those panels, as OpenBLAS's level-3 driver calls them.
// Build and run (x86-64 with AVX-512, Debian's libopenblas0-pthread):
//   g++ -O3 -march=native -std=c++17 scripts/probe_openblas_prepacked.cpp -o /tmp/probe_prepacked \
//       /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so
//   COLD=1 APART=1 OPENBLAS_NUM_THREADS=1 /tmp/probe_prepacked TOKENS ROUNDS DEPTH ROWS COLS THREADS
//   (defaults 376 tokens, 6 rounds, blocks 384 x 192 x 768, one thread; docs/benchmarks.md ran
//   376 5 384 192 768 2)
// It times packing every weight in both layouts, checks each product against cblas_sgemm, then
// times a LoRA step's order (30 layers x 7 products, forward y = x W^T and input gradient
// dx = dy W, beta = 1) on THREADS threads at once, as the CPU streams run: OpenBLAS, then the
// pre-packed driver, alternating, best of 3 per round. COLD: each product its own activations
// (none hot in cache); APART: the threads at different layers (no weight read by both at once).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

typedef long blaslong;
extern "C" {
void cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
int sgemm_kernel_SKYLAKEX(blaslong m, blaslong n, blaslong k, float alpha, float* a, float* b, float* c, blaslong ldc);
int sgemm_incopy_SKYLAKEX(blaslong m, blaslong n, const float* a, blaslong lda, float* b);
int sgemm_itcopy_SKYLAKEX(blaslong m, blaslong n, const float* a, blaslong lda, float* b);
int sgemm_oncopy_SKYLAKEX(blaslong m, blaslong n, const float* a, blaslong lda, float* b);
}
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };

static int depth_block = 384, row_block = 192, col_block = 768;

// op(A) (rows x depth) in blocks [depth block][row block], each as OpenBLAS packs it.
// transposed: W is (rows x depth) row-major (the forward, op(A) = W, OpenBLAS's TN case);
// else W is (depth x rows) row-major (the input gradient, op(A) = W^T, its NN case).
struct Packed {
  int rows, depth;
  std::vector<float> data;
  std::vector<size_t> offset;  // per (depth block, row block)
};

Packed pack(const float* w, int rows, int depth, bool forward) {
  Packed p{rows, depth, {}, {}};
  size_t total = 0;
  for (int l = 0; l < depth; l += depth_block)
    for (int i = 0; i < rows; i += row_block) {
      p.offset.push_back(total);
      total += (size_t)std::min(depth_block, depth - l) * ((std::min(row_block, rows - i) + 15) / 16 * 16);
    }
  p.data.assign(total, 0.f);
  size_t b = 0;
  for (int l = 0; l < depth; l += depth_block)
    for (int i = 0; i < rows; i += row_block, ++b) {
      int ml = std::min(depth_block, depth - l), mi = std::min(row_block, rows - i);
      if (forward) sgemm_incopy_SKYLAKEX(ml, mi, w + l + (size_t)i * depth, depth, p.data.data() + p.offset[b]);
      else sgemm_itcopy_SKYLAKEX(ml, mi, w + i + (size_t)l * rows, rows, p.data.data() + p.offset[b]);
    }
  return p;
}

// C (tokens x rows, row-major) += X (tokens x depth, row-major) op(A)^T
void product(const Packed& p, const float* x, int tokens, float* c, std::vector<float>& panel) {
  for (int j = 0; j < tokens; j += col_block) {
    int nj = std::min(col_block, tokens - j);
    size_t b = 0;
    for (int l = 0; l < p.depth; l += depth_block) {
      int ml = std::min(depth_block, p.depth - l);
      sgemm_oncopy_SKYLAKEX(ml, nj, x + l + (size_t)j * p.depth, p.depth, panel.data());
      for (int i = 0; i < p.rows; i += row_block, ++b) {
        int mi = std::min(row_block, p.rows - i);
        sgemm_kernel_SKYLAKEX(mi, nj, ml, 1.f, const_cast<float*>(p.data.data() + p.offset[b]), panel.data(),
                              c + i + (size_t)j * p.rows, p.rows);
      }
    }
  }
}

int main(int argc, char** argv) {
  int T = argc > 1 ? atoi(argv[1]) : 376, rounds = argc > 2 ? atoi(argv[2]) : 6, layers = 30;
  int threads = argc > 6 ? atoi(argv[6]) : 1;
  if (argc > 5) { depth_block = atoi(argv[3]); row_block = atoi(argv[4]); col_block = atoi(argv[5]); }
  struct Shape { int n, k; };  // W (n x k): q k v o gate up down
  Shape shapes[] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
  std::vector<std::vector<float>> W;
  std::vector<Packed> fwd, bwd;
  srand(1);
  for (int l = 0; l < layers; ++l)
    for (auto s : shapes) {
      std::vector<float> w((size_t)s.n * s.k);
      for (auto& v : w) v = rand() / (float)RAND_MAX - 0.5f;
      fwd.push_back(pack(w.data(), s.n, s.k, true));
      bwd.push_back(pack(w.data(), s.k, s.n, false));
      W.push_back(std::move(w));
    }
  {  // what packing every weight in both layouts costs, once (a step that packed them itself would pay it)
    double best = 1e9;
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      for (int j = 0; j < layers * 7; ++j) {
        auto s = shapes[j % 7];
        fwd[j] = pack(W[j].data(), s.n, s.k, true);
        bwd[j] = pack(W[j].data(), s.k, s.n, false);
      }
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    printf("packing every weight in both layouts, one thread: %.1f ms\n", best * 1e3);
  }
  std::vector<float> x((size_t)T * 1536), y((size_t)T * 1536), y2((size_t)T * 1536),
      panel((size_t)depth_block * (col_block + 3));
  for (auto& v : x) v = rand() / (float)RAND_MAX - 0.5f;
  double worst = 0;
  for (int i = 0; i < 7; ++i) {
    auto s = shapes[i];
    for (int dir = 0; dir < 2; ++dir) {
      int out = dir ? s.k : s.n, in = dir ? s.n : s.k;
      for (size_t e = 0; e < (size_t)T * out; ++e) y[e] = y2[e] = 0.25f;
      cblas_sgemm(RowMajor, NoTrans, dir ? NoTrans : Trans, T, out, in, 1, x.data(), in, W[i].data(), s.k, 1,
                  y.data(), out);
      product(dir ? bwd[i] : fwd[i], x.data(), T, y2.data(), panel);
      for (size_t e = 0; e < (size_t)T * out; ++e) worst = std::max(worst, (double)std::fabs(y[e] - y2[e]));
    }
  }
  printf("largest difference against cblas_sgemm: %.2e\n", worst);
  double flops = 0;
  for (auto s : shapes) flops += 2.0 * 2 * T * s.n * s.k * layers;
  flops *= threads;
  bool cold = getenv("COLD") != nullptr;
  std::vector<std::vector<std::vector<float>>> xs(threads), ys(threads);
  if (cold)
    for (int t = 0; t < threads; ++t)
      for (int j = 0; j < layers * 7; ++j) { xs[t].push_back(x); ys[t].push_back(y); }
  std::vector<double> rate[2];
  for (int round = 0; round < rounds; ++round)
    for (int which = 0; which < 2; ++which) {
      double best = 1e9;
      for (int rep = 0; rep < 3; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        auto stream = [&](int t) {  // a CPU stream: its own tokens, the weights (and their panels) shared
          std::vector<float> pt(panel);
          for (int l = 0; l < layers; ++l)
            for (int i = 0; i < 7; ++i) {
              int j = (l * 7 + i + (getenv("APART") ? t * 105 : 0)) % (layers * 7);
              // each product its own activations, as in a step (none of them hot in cache)
              float* xt_ = cold ? xs[t][j].data() : x.data();
              float* yt_ = cold ? ys[t][j].data() : y.data();
              auto s = shapes[i];
              if (which == 0) {
                cblas_sgemm(RowMajor, NoTrans, Trans, T, s.n, s.k, 1, xt_, s.k, W[j].data(), s.k, 1, yt_, s.n);
                cblas_sgemm(RowMajor, NoTrans, NoTrans, T, s.k, s.n, 1, xt_, s.n, W[j].data(), s.k, 1, yt_, s.k);
              } else {
                product(fwd[j], xt_, T, yt_, pt);
                product(bwd[j], xt_, T, yt_, pt);
              }
            }
        };
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) pool.emplace_back(stream, t);
        for (auto& th : pool) th.join();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      rate[which].push_back(flops / best / 1e9);
    }
  for (int which = 0; which < 2; ++which) {
    auto r = rate[which];
    std::sort(r.begin(), r.end());
    printf("T %d x %d %-10s GFLOP/s min %.1f median %.1f max %.1f\n", T, threads, which ? "prepacked" : "OpenBLAS", r.front(),
           r[r.size() / 2], r.back());
  }
}
