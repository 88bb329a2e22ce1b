// LoRA's rank-r branch for MLX's CPU backend, forward and backward, one pass over the rows
// (mlx_dpo/native.py builds this file; mlx_dpo/cpu_lora.py calls it).
//
// The frozen product x W^T and its input gradient dY W stay with OpenBLAS. What LoRA adds is six
// products with r (8) as one of their sizes: x A and (xA) B in the forward; dY B^T, dLow A^T, x^T dLow
// and (xA)^T dY in the backward. Through OpenBLAS each is a call that packs both operands and passes
// over a (tokens x width) array for a few FLOPs per float. Here the forward reads each row of x once
// and writes scale (xA) B; the backward reads each row of x and dY once and writes dLow A^T, with both
// LoRA gradients made while the rows are in cache. The caller hands each result to OpenBLAS as the
// frozen product's C with beta = 1 (`mx.addmm`), so the branch costs no pass over the frozen
// product's output and OpenBLAS skips its zeroing pass (beta = 0 clears C first). The bench's LoRA
// step ran 1.06-1.10x faster than through mx.addmm (docs/benchmarks.md, session 17).
//
// Layouts: x (tokens, in), A (in, r), B (r, out), row-major; scale a (1,) array.
#include <tuple>
#include <vector>

#include <nanobind/stl/tuple.h>

#include "common.h"
#include "simd.h"

namespace mlx_dpo {

namespace {

constexpr int kRows = 8;  // rows per block: their rank-r values are made and used while the rows are in cache

#if defined(MLX_DPO_SIMD_TILES)
// low[i][j] = scale * sum_k x[i][k] mt[j][k] for `rows` rows: P rows x R columns of dot products
// at a time, along the depth in vectors (mt is (R, depth)); a horizontal sum per product at the end.
template <int R>
inline void rank_dots(const float* x, int64_t ldx, int rows, const float* mt, int depth, float scale,
                      float (&low)[kRows][R]) {
  using simd::Vec;
  constexpr int L = simd::kLanes, kAccumulators = simd::kRegisters / 2;
  constexpr int P = R >= kAccumulators ? 1 : kAccumulators / R;  // half the registers up to that rank
  const int tail = depth % L;
  for (int i0 = 0; i0 < rows; i0 += P) {
    const int n = std::min(P, rows - i0);
    Vec acc[P][R];
#pragma GCC unroll 16
    for (int i = 0; i < P; ++i) {
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        acc[i][j] = simd::zero();
      }
    }
    // One step of `width` lanes at k: a full vector, or the depth's last `tail` floats.
    auto step = [&](int k, auto load) {
      Vec xv[P];
#pragma GCC unroll 16
      for (int i = 0; i < P; ++i) {
        xv[i] = i < n ? load(x + (i0 + i) * ldx + k) : simd::zero();
      }
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const Vec m = load(mt + static_cast<int64_t>(j) * depth + k);
#pragma GCC unroll 16
        for (int i = 0; i < P; ++i) {
          acc[i][j] = simd::fmadd(xv[i], m, acc[i][j]);
        }
      }
    };
    int k = 0;
    for (; k + L <= depth; k += L) {
      step(k, [](const float* p) { return simd::load(p); });
    }
    if (tail) {
      step(k, [tail](const float* p) { return simd::load_first(p, tail); });
    }
    // Constant indices only, so that the accumulators stay in registers.
#pragma GCC unroll 16
    for (int i = 0; i < P; ++i) {
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        if (i < n) {
          low[i0 + i][j] = scale * simd::sum(acc[i][j]);
        }
      }
    }
  }
}

// out[i][c] = sum_j low[i][j] m[j][c] over `width` columns (m is (R, width)), for `rows` rows of ld.
template <int R>
inline void rank_rows(const float (&low)[kRows][R], int rows, const float* m, int width, float* out, int64_t ld) {
  using simd::Vec;
  constexpr int L = simd::kLanes;
  for (int i = 0; i < rows; ++i) {
    float* row = out + i * ld;
    for (int c = 0; c < width; c += L) {
      const int n = std::min(L, width - c);
      Vec acc = simd::zero();
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const float* mj = m + static_cast<int64_t>(j) * width + c;
        acc = simd::fmadd(simd::broadcast(low[i][j]), simd::load_first(mj, n), acc);
      }
      simd::store_first(row + c, acc, n);
    }
  }
}

// acc[j][c] += sum_i low[i][j] x[i][c]: an (R x width) gradient over a block of rows.
template <int R>
inline void add_outer(const float (&low)[kRows][R], int rows, const float* x, int64_t ldx, int width, float* acc) {
  using simd::Vec;
  constexpr int L = simd::kLanes;
  for (int c = 0; c < width; c += L) {
    const int n = std::min(L, width - c);
    Vec xv[kRows];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      xv[i] = i < rows ? simd::load_first(x + i * ldx + c, n) : simd::zero();
    }
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      float* aj = acc + static_cast<int64_t>(j) * width + c;
      Vec s = simd::load_first(aj, n);
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        s = simd::fmadd(simd::broadcast(low[i][j]), xv[i], s);
      }
      simd::store_first(aj, s, n);
    }
  }
}
#else
// low[i][j] = scale * sum_k x[i][k] mt[j][k] for `rows` rows (mt is (R, depth)).
template <int R>
inline void rank_dots(const float* x, int64_t ldx, int rows, const float* mt, int depth, float scale,
                      float (&low)[kRows][R]) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < R; ++j) {
      const float* xi = x + i * ldx;
      const float* mj = mt + static_cast<int64_t>(j) * depth;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int k = 0; k < depth; ++k) {
        s += xi[k] * mj[k];
      }
      low[i][j] = scale * s;
    }
  }
}

// out[i][c] = sum_j low[i][j] m[j][c] over `width` columns (m is (R, width)), for `rows` rows of ld.
template <int R>
inline void rank_rows(const float (&low)[kRows][R], int rows, const float* m, int width, float* out, int64_t ld) {
  for (int i = 0; i < rows; ++i) {
    float* row = out + i * ld;
    std::fill(row, row + width, 0.0f);
    for (int j = 0; j < R; ++j) {
      const float l = low[i][j];
      const float* mj = m + static_cast<int64_t>(j) * width;
#pragma omp simd
      for (int c = 0; c < width; ++c) {
        row[c] += l * mj[c];
      }
    }
  }
}

// acc[j][c] += sum_i low[i][j] x[i][c]: an (R x width) gradient over a block of rows.
template <int R>
inline void add_outer(const float (&low)[kRows][R], int rows, const float* x, int64_t ldx, int width, float* acc) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < R; ++j) {
      const float l = low[i][j];
      float* aj = acc + static_cast<int64_t>(j) * width;
      const float* xi = x + i * ldx;
#pragma omp simd
      for (int c = 0; c < width; ++c) {
        aj[c] += l * xi[c];
      }
    }
  }
}
#endif

// (rows x cols) -> (cols x rows)
std::vector<float> transposed(const float* m, int rows, int cols) {
  std::vector<float> t(static_cast<size_t>(rows) * cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      t[static_cast<size_t>(c) * rows + r] = m[static_cast<size_t>(r) * cols + c];
    }
  }
  return t;
}

struct Sizes {
  int64_t tokens;
  int in, out;
};

// y = scale (x A) B.
template <int R>
void lora_low_rows(const Sizes& s, const float* x, const float* a, const float* b, float scale, float* y) {
  const std::vector<float> a_t = transposed(a, s.in, R);  // (R, in): x A as dot products
  float low[kRows][R] = {};
  for (int64_t i0 = 0; i0 < s.tokens; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, s.tokens - i0));
    rank_dots<R>(x + i0 * s.in, s.in, rows, a_t.data(), s.in, scale, low);
    rank_rows<R>(low, rows, b, s.out, y + i0 * s.out, s.out);
  }
}

// With dLow = scale dY B^T: dX_low = dLow A^T, dA = x^T dLow, dB = (scale x A)^T dY.
template <int R>
void lora_grad_rows(const Sizes& s, const float* d_y, const float* x, const float* a, const float* b, float scale,
                    float* d_x_low, float* d_a, float* d_b) {
  const std::vector<float> a_t = transposed(a, s.in, R);  // (R, in): x A as dot products, dLow A^T as rank rows
  std::vector<float> d_a_t(static_cast<size_t>(R) * s.in, 0.0f);
  std::fill(d_b, d_b + static_cast<int64_t>(R) * s.out, 0.0f);
  // rows past a short last block stay finite: add_outer multiplies them by 0
  float low[kRows][R] = {}, d_low[kRows][R] = {};
  for (int64_t i0 = 0; i0 < s.tokens; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, s.tokens - i0));
    const float* xi = x + i0 * s.in;
    const float* dyi = d_y + i0 * s.out;
    rank_dots<R>(xi, s.in, rows, a_t.data(), s.in, scale, low);
    rank_dots<R>(dyi, s.out, rows, b, s.out, scale, d_low);
    add_outer<R>(low, rows, dyi, s.out, s.out, d_b);
    add_outer<R>(d_low, rows, xi, s.in, s.in, d_a_t.data());
    rank_rows<R>(d_low, rows, a_t.data(), s.in, d_x_low + i0 * s.in, s.in);
  }
  for (int k = 0; k < s.in; ++k) {
    for (int j = 0; j < R; ++j) {
      d_a[static_cast<int64_t>(k) * R + j] = d_a_t[static_cast<size_t>(j) * s.in + k];
    }
  }
}

template <typename F>
void by_rank(int r, F&& f) {
  switch (r) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: throw std::invalid_argument("lora: rank must be 4, 8, 16, 32 or 64");
  }
}

Sizes sizes_of(const mx::array& x, const mx::array& b) {
  return Sizes{x.shape(0), static_cast<int>(x.shape(1)), static_cast<int>(b.shape(1))};
}

class LoraPrimitive : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;

 protected:
  bool same_parameters(const mx::Primitive&) const override { return true; }
};

// inputs: x, a, b, scale; output: scale (x a) b
class LoraLow : public LoraPrimitive {
 public:
  using LoraPrimitive::LoraPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    allocate(outputs[0]);
    Sizes s = sizes_of(in[0], in[2]);
    int r = static_cast<int>(in[1].shape(1));
    encoder_for(inputs, outputs).dispatch([s, r, x = in[0].data<float>(), a = in[1].data<float>(),
                                           b = in[2].data<float>(), scale = in[3].data<float>(),
                                           y = outputs[0].data<float>()]() {
      by_rank(r, [&](auto rank) { lora_low_rows<decltype(rank)::value>(s, x, a, b, *scale, y); });
    });
  }

  const char* name() const override { return "LoraLow"; }
};

// inputs: d_y, x, a, b, scale; outputs: d_x's rank-r part, d_a, d_b
class LoraGrad : public LoraPrimitive {
 public:
  using LoraPrimitive::LoraPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    for (auto& o : outputs) {
      allocate(o);
    }
    Sizes s = sizes_of(in[1], in[3]);
    int r = static_cast<int>(in[2].shape(1));
    encoder_for(inputs, outputs).dispatch(
        [s, r, d_y = in[0].data<float>(), x = in[1].data<float>(), a = in[2].data<float>(), b = in[3].data<float>(),
         scale = in[4].data<float>(), d_x_low = outputs[0].data<float>(), d_a = outputs[1].data<float>(),
         d_b = outputs[2].data<float>()]() {
          by_rank(r, [&](auto rank) {
            lora_grad_rows<decltype(rank)::value>(s, d_y, x, a, b, *scale, d_x_low, d_a, d_b);
          });
        });
  }

  const char* name() const override { return "LoraGrad"; }
};

void check_lora(const mx::array& x, const mx::array& a, const mx::array& b, const mx::array& scale) {
  if (x.ndim() != 2 || a.ndim() != 2 || b.ndim() != 2 || a.shape(0) != x.shape(1) || b.shape(0) != a.shape(1) ||
      scale.size() != 1) {
    throw std::invalid_argument("lora: x (tokens, in), a (in, r), b (r, out), scale (1,)");
  }
  by_rank(static_cast<int>(a.shape(1)), [](auto) {});  // throws for a rank without kernels
}

mx::array lora_low(const mx::array& x, const mx::array& a, const mx::array& b, const mx::array& scale) {
  check_lora(x, a, b, scale);
  return mx::array({x.shape(0), b.shape(1)}, mx::float32, std::make_shared<LoraLow>(cpu_stream()),
                   {float_input(x, "x"), float_input(a, "a"), float_input(b, "b"), float_input(scale, "scale")});
}

std::tuple<mx::array, mx::array, mx::array> lora_grad(const mx::array& d_y, const mx::array& x, const mx::array& a,
                                                      const mx::array& b, const mx::array& scale) {
  check_lora(x, a, b, scale);
  if (d_y.ndim() != 2 || d_y.shape(0) != x.shape(0) || d_y.shape(1) != b.shape(1)) {
    throw std::invalid_argument("lora_grad: d_y must be (tokens, out)");
  }
  auto outs = mx::array::make_arrays(
      {x.shape(), a.shape(), b.shape()}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<LoraGrad>(cpu_stream()),
      {float_input(d_y, "d_y"), float_input(x, "x"), float_input(a, "a"), float_input(b, "b"),
       float_input(scale, "scale")});
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

void add_lora_kernels(nb::module_& m) {
  m.def("lora_low", &lora_low, nb::arg("x"), nb::arg("a"), nb::arg("b"), nb::arg("scale"),
        "scale * (x @ a) @ b, for x (tokens, in), a (in, r), b (r, out), scale (1,); r in 4, 8, 16, 32, 64.");
  m.def("lora_grad", &lora_grad, nb::arg("d_y"), nb::arg("x"), nb::arg("a"), nb::arg("b"), nb::arg("scale"),
        "(d_x_low, d_a, d_b) of lora_low: with d_low = scale * d_y @ b.T, d_x_low = d_low @ a.T (what x's gradient "
        "adds to the frozen product's), d_a = x.T @ d_low, d_b = (scale * x @ a).T @ d_y.");
}

}  // namespace mlx_dpo
