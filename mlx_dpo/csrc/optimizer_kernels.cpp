// AdamW's step over one tensor in one pass, and a gradient's sum of squares (mlx_dpo/native.py
// builds this file; mlx_dpo/engines/mlx_fast.py calls it for full fine-tuning on the CPU).
//
// Both take the gradient as one array or as two that add up to it: the parts that two CPU streams
// made (engines/cpu_streams.py). Adding them inside these passes, in float as mx.add does, spares a
// full pass that writes the sum (two reads and a write of every gradient) and its allocation.
//
// MLX's compiled AdamW reads and writes each weight's four arrays at ~10 ns per parameter on one
// core here (its generated kernels are built without the CPU's vector width), a fifth of a full
// fine-tuning step of SmolLM2-135M; this loop does the same arithmetic, in the same order and
// rounding, as one vectorised pass. Outputs take over the weight's and moments' buffers when
// nothing else holds them.
#include <cmath>
#include <optional>
#include <tuple>

#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>

#include "common.h"

namespace mlx_dpo {

namespace {

// 1 - beta comes from the caller, rounded from Python's double as MLX rounds its scalar operands.
struct AdamWParams {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  bool operator==(const AdamWParams& o) const {
    return beta1 == o.beta1 && one_minus_beta1 == o.one_minus_beta1 && beta2 == o.beta2 &&
           one_minus_beta2 == o.one_minus_beta2 && eps == o.eps && weight_decay == o.weight_decay;
  }
};

// MLX's AdamW, operation for operation: p (1 - lr wd) - c1 m' / (sqrt(v') c2 + eps) with
// m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2 and g the gradient times `scale` (clipping). With
// bias correction c1 = lr / (1 - b1^t) and c2 = 1 / sqrt(1 - b2^t), computed by the caller as MLX
// does; without it c1 = lr and c2 = 1, which gives MLX's other formula exactly (x * 1 = x).
struct Scalars {
  float lr, c1, c2, scale;
};

// g2: the gradient's second part, or null.
template <bool TwoParts>
void adamw_pass(const AdamWParams& a, Scalars k, const float* g, const float* g2, const float* p, const float* m,
                const float* v, float* p_out, float* m_out, float* v_out, int64_t n) {
  // Locals, not the structs' fields: the outputs might alias those, so GCC would reload them every
  // element and give up vectorising the loop.
  const float decay = 1.0f - k.lr * a.weight_decay, scale = k.scale, c1 = k.c1, c2 = k.c2;
  const float b1 = a.beta1, one_minus_b1 = a.one_minus_beta1, b2 = a.beta2, one_minus_b2 = a.one_minus_beta2;
  const float eps = a.eps;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gi = (TwoParts ? g[i] + g2[i] : g[i]) * scale;
    float mi = b1 * m[i] + one_minus_b1 * gi;
    float vi = b2 * v[i] + one_minus_b2 * (gi * gi);
    float pi = p[i] * decay;
    m_out[i] = mi;
    v_out[i] = vi;
    p_out[i] = pi - (c1 * mi) / (std::sqrt(vi) * c2 + eps);
  }
}

void keep(const float* in, float* out, int64_t n) {
  if (in != out) {
    std::memcpy(out, in, sizeof(float) * n);
  }
}

class AdamW : public CpuPrimitive {
 public:
  AdamW(mx::Stream stream, AdamWParams params) : CpuPrimitive(stream), params_(params) {}

  // inputs: gradient, weight, m, v, then scalars: learning rate, c1, c2, gradient scale, ok, then
  // the gradient's second part if it has one; outputs: weight, m, v
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    for (int i = 0; i < 3; ++i) {
      reuse_or_allocate(outputs[i], in[i + 1]);
    }
    encoder_for(inputs, outputs).dispatch(
        [a = params_, g = in[0].data<float>(), p = in[1].data<float>(), m = in[2].data<float>(),
         v = in[3].data<float>(), lr = in[4].data<float>(), c1 = in[5].data<float>(),
         c2 = in[6].data<float>(), scale = in[7].data<float>(), ok = in[8].data<bool>(),
         g2 = inputs.size() > 9 ? in[9].data<float>() : nullptr, p_out = outputs[0].data<float>(),
         m_out = outputs[1].data<float>(), v_out = outputs[2].data<float>(), n = static_cast<int64_t>(in[0].size())]() {
          if (*ok && g2) {
            adamw_pass<true>(a, Scalars{*lr, *c1, *c2, *scale}, g, g2, p, m, v, p_out, m_out, v_out, n);
          } else if (*ok) {
            adamw_pass<false>(a, Scalars{*lr, *c1, *c2, *scale}, g, g2, p, m, v, p_out, m_out, v_out, n);
          } else {  // a non-finite gradient norm: everything stays as it was
            keep(p, p_out, n);
            keep(m, m_out, n);
            keep(v, v_out, n);
          }
        });
  }

  const char* name() const override { return "AdamW"; }

 protected:
  bool same_parameters(const mx::Primitive& other) const override {
    return static_cast<const AdamW&>(other).params_ == params_;
  }

 private:
  AdamWParams params_;
};

// Float lanes over blocks of 4096 (vectorised), the blocks' sums in double: 135M squares summed
// without float32's drift. A free function: written inside the dispatch lambda, GCC vectorised the
// loop with gathers through the closure's pointer, at a sixth of memory speed.
// y: x's second part (the sum of squares of x + y), or null.
template <bool TwoParts>
double sum_of_squares_pass(const float* x, const float* y, int64_t n) {
  constexpr int64_t kBlock = 4096;
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    int64_t end = std::min(n, start + kBlock);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t i = start; i < end; ++i) {
      float xi = TwoParts ? x[i] + y[i] : x[i];
      part += xi * xi;
    }
    total += part;
  }
  return total;
}

class SumOfSquares : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    allocate(outputs[0]);
    encoder_for(inputs, outputs).dispatch([x = in[0].data<float>(), y = inputs.size() > 1 ? in[1].data<float>() : nullptr,
                                           out = outputs[0].data<float>(), n = static_cast<int64_t>(in[0].size())]() {
      double total = y ? sum_of_squares_pass<true>(x, y, n) : sum_of_squares_pass<false>(x, y, n);
      *out = static_cast<float>(total);
    });
  }

  const char* name() const override { return "SumOfSquares"; }

 protected:
  bool same_parameters(const mx::Primitive&) const override { return true; }
};

mx::array scalar_of(const mx::array& a, mx::Dtype dtype, const char* what) {
  if (a.size() != 1) {
    throw std::invalid_argument(std::string(what) + " must be a single number");
  }
  return mx::reshape(mx::astype(a, dtype), {});
}

std::tuple<mx::array, mx::array, mx::array> adamw(const mx::array& gradient, const mx::array& weight,
                                                  const mx::array& m, const mx::array& v,
                                                  const mx::array& learning_rate, const mx::array& c1,
                                                  const mx::array& c2, const mx::array& scale, const mx::array& ok,
                                                  float beta1, float one_minus_beta1, float beta2,
                                                  float one_minus_beta2, float eps, float weight_decay,
                                                  const std::optional<mx::array>& gradient2) {
  if (weight.shape() != gradient.shape() || m.shape() != weight.shape() || v.shape() != weight.shape() ||
      (gradient2 && gradient2->shape() != weight.shape())) {
    throw std::invalid_argument("adamw: gradient (both parts), weight, m and v must have one shape");
  }
  auto shape = weight.shape();
  std::vector<mx::array> inputs = {
      float_input(gradient, "gradient"), float_input(weight, "weight"), float_input(m, "m"), float_input(v, "v"),
      scalar_of(learning_rate, mx::float32, "learning_rate"), scalar_of(c1, mx::float32, "c1"),
      scalar_of(c2, mx::float32, "c2"), scalar_of(scale, mx::float32, "scale"), scalar_of(ok, mx::bool_, "ok")};
  if (gradient2) {
    inputs.push_back(float_input(*gradient2, "gradient2"));
  }
  auto outs = mx::array::make_arrays(
      {shape, shape, shape}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<AdamW>(cpu_stream(), AdamWParams{beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay}),
      inputs);
  return {outs[0], outs[1], outs[2]};
}

mx::array sum_of_squares(const mx::array& x, const std::optional<mx::array>& y) {
  std::vector<mx::array> inputs = {float_input(x, "x")};
  if (y) {
    if (y->shape() != x.shape()) {
      throw std::invalid_argument("sum_of_squares: x and y must have one shape");
    }
    inputs.push_back(float_input(*y, "y"));
  }
  return mx::array({}, mx::float32, std::make_shared<SumOfSquares>(cpu_stream()), inputs);
}

}  // namespace

void add_optimizer_kernels(nb::module_& m) {
  m.def("adamw", &adamw, nb::arg("gradient"), nb::arg("weight"), nb::arg("m"), nb::arg("v"),
        nb::arg("learning_rate"), nb::arg("c1"), nb::arg("c2"), nb::arg("scale"), nb::arg("ok"), nb::arg("beta1"), nb::arg("one_minus_beta1"),
        nb::arg("beta2"), nb::arg("one_minus_beta2"), nb::arg("eps"), nb::arg("weight_decay"),
        nb::arg("gradient2") = nb::none(),
        "(weight, m, v) after MLX's AdamW step on gradient * scale: weight (1 - lr wd) - c1 m / (sqrt(v) c2 + eps) "
        "(c1 = lr / (1 - beta1^t), c2 = 1 / sqrt(1 - beta2^t) with bias correction; lr and 1 without); the "
        "inputs unchanged where ok is false. With gradient2 the gradient is gradient + gradient2.");
  m.def("sum_of_squares", &sum_of_squares, nb::arg("x"), nb::arg("y") = nb::none(),
        "sum(x^2) as a float32 scalar (with y: sum((x + y)^2)): float lanes over blocks of 4096, the blocks' sums "
        "in float64.");
}

}  // namespace mlx_dpo
