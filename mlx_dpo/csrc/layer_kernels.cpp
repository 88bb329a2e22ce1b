// A transformer layer's elementwise work for MLX's CPU backend, one pass per row (mlx_dpo/native.py
// builds this file; mlx_dpo/cpu_layers.py calls it): RMSNorm, SwiGLU and RoPE, forward and backward.
//
// MLX's CPU backend runs each of these as several ops, each a pass over memory (RMSNorm's square,
// mean, rsqrt and two multiplies; SwiGLU's sigmoid in ~20 elementwise ops; RoPE's slices, sines and
// concatenation), and its `fast` versions fall back to those ops on the CPU. Here a row is read once
// and written once. RoPE also writes its output in the layout the next matmul wants, so that the
// head transpose around it costs no copy.
#include <cmath>
#include <tuple>

#include <nanobind/stl/tuple.h>

#include "common.h"

namespace mlx_dpo {

namespace {

// ---- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w over the last axis -------------------------------

void rms_norm_rows(const float* x, const float* w, float* y, float* inv, int64_t rows, int d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int j = 0; j < d; ++j) {
      squares += xr[j] * xr[j];
    }
    float iv = 1.0f / std::sqrt(squares / d + eps);
    inv[r] = iv;
#pragma omp simd
    for (int j = 0; j < d; ++j) {
      yr[j] = (xr[j] * iv) * w[j];
    }
  }
}

// dx = inv * (dy w) - x inv^3 mean(dy w x);  dw = sum over rows of dy x inv.
void rms_norm_grad_rows(const float* x, const float* w, const float* inv, const float* dy, float* dx, float* dw,
                        int64_t rows, int d) {
  std::fill(dw, dw + d, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    const float* dyr = dy + r * d;
    float* dxr = dx + r * d;
    float iv = inv[r];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int j = 0; j < d; ++j) {
      dot += dyr[j] * w[j] * xr[j];
    }
    float c = dot * (iv * iv * iv) / d;
#pragma omp simd
    for (int j = 0; j < d; ++j) {
      float xj = xr[j], dyj = dyr[j];  // dx may share dy's buffer: read both first
      dw[j] += dyj * xj * iv;
      dxr[j] = dyj * w[j] * iv - xj * c;
    }
  }
}

class RMSNormPrimitive : public CpuPrimitive {
 public:
  RMSNormPrimitive(mx::Stream stream, float eps) : CpuPrimitive(stream), eps_(eps) {}

 protected:
  bool same_parameters(const mx::Primitive& other) const override {
    return static_cast<const RMSNormPrimitive&>(other).eps_ == eps_;
  }

  float eps_;
};

class RMSNorm : public RMSNormPrimitive {
 public:
  using RMSNormPrimitive::RMSNormPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    const auto& x = in[0];
    reuse_or_allocate(outputs[0], x);  // only when nothing else holds x (no backward will read it)
    allocate(outputs[1]);
    int d = static_cast<int>(x.shape(-1));
    encoder_for(inputs, outputs).dispatch([x = x.data<float>(), w = in[1].data<float>(), y = outputs[0].data<float>(),
                                           inv = outputs[1].data<float>(), rows = x.size() / d, d, eps = eps_]() {
      rms_norm_rows(x, w, y, inv, rows, d, eps);
    });
  }

  const char* name() const override { return "RMSNorm"; }
};

class RMSNormGrad : public RMSNormPrimitive {
 public:
  using RMSNormPrimitive::RMSNormPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    const auto& x = in[0];
    reuse_or_allocate(outputs[0], in[3]);
    allocate(outputs[1]);
    int d = static_cast<int>(x.shape(-1));
    encoder_for(inputs, outputs).dispatch([x = x.data<float>(), w = in[1].data<float>(), inv = in[2].data<float>(),
                                           dy = in[3].data<float>(), dx = outputs[0].data<float>(),
                                           dw = outputs[1].data<float>(), rows = x.size() / d, d]() {
      rms_norm_grad_rows(x, w, inv, dy, dx, dw, rows, d);
    });
  }

  const char* name() const override { return "RMSNormGrad"; }
};

void check_norm_weight(const mx::array& x, const mx::array& w) {
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("rms_norm: weight must be (d,) for x (..., d)");
  }
}

std::tuple<mx::array, mx::array> rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  check_norm_weight(x, weight);
  auto xs = float_input(x, "x");
  auto outs = mx::array::make_arrays({xs.shape(), row_shape(xs)}, {mx::float32, mx::float32},
                                     std::make_shared<RMSNorm>(cpu_stream(), eps), {xs, float_input(weight, "weight")});
  return {outs[0], outs[1]};
}

std::tuple<mx::array, mx::array> rms_norm_grad(const mx::array& x, const mx::array& weight, const mx::array& inv,
                                               const mx::array& d_y) {
  check_norm_weight(x, weight);
  if (d_y.shape() != x.shape() || inv.size() * x.shape(-1) != x.size()) {
    throw std::invalid_argument("rms_norm_grad: d_y must be x's shape and inv one number per row");
  }
  auto xs = float_input(x, "x");
  auto outs = mx::array::make_arrays({xs.shape(), weight.shape()}, {mx::float32, mx::float32},
                                     std::make_shared<RMSNormGrad>(cpu_stream(), 0.0f),
                                     {xs, float_input(weight, "weight"), float_input(inv, "inv"), float_input(d_y, "d_y")});
  return {outs[0], outs[1]};
}

// ---- SwiGLU: silu(gate) * up ----------------------------------------------------------------------

// sigmoid(g) from exp(-|g|), which never overflows; a select, so that the loops vectorise.
inline float sigmoid(float g) {
  float e = exp_nonpositive(-std::fabs(g));
  float r = 1.0f / (1.0f + e);
  return g >= 0.0f ? r : e * r;
}

void swiglu_rows(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = (g * sigmoid(g)) * up[i];
  }
}

void swiglu_grad_rows(const float* gate, const float* up, const float* d_out, float* d_gate, float* d_up, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i], u = up[i], d = d_out[i];  // d_gate and d_up may share d_out's and up's buffers
    float s = sigmoid(g);
    float silu = g * s;
    d_gate[i] = d * u * (s + silu * (1.0f - s));
    d_up[i] = d * silu;
  }
}

class SwiGLUPrimitive : public CpuPrimitive {
 public:
  using CpuPrimitive::CpuPrimitive;

 protected:
  bool same_parameters(const mx::Primitive&) const override { return true; }
};

class SwiGLU : public SwiGLUPrimitive {
 public:
  using SwiGLUPrimitive::SwiGLUPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    reuse_or_allocate(outputs[0], in[0]);
    encoder_for(inputs, outputs).dispatch([g = in[0].data<float>(), u = in[1].data<float>(),
                                           out = outputs[0].data<float>(), n = in[0].size()]() {
      swiglu_rows(g, u, out, n);
    });
  }

  const char* name() const override { return "SwiGLU"; }
};

class SwiGLUGrad : public SwiGLUPrimitive {
 public:
  using SwiGLUPrimitive::SwiGLUPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    reuse_or_allocate(outputs[0], in[2]);
    reuse_or_allocate(outputs[1], in[1]);
    encoder_for(inputs, outputs).dispatch([g = in[0].data<float>(), u = in[1].data<float>(),
                                           d = in[2].data<float>(), dg = outputs[0].data<float>(),
                                           du = outputs[1].data<float>(), n = in[0].size()]() {
      swiglu_grad_rows(g, u, d, dg, du, n);
    });
  }

  const char* name() const override { return "SwiGLUGrad"; }
};

void check_same_shape(const mx::array& a, const mx::array& b, const char* what) {
  if (a.shape() != b.shape()) {
    throw std::invalid_argument(std::string(what) + ": the arrays must have one shape");
  }
}

mx::array swiglu(const mx::array& gate, const mx::array& up) {
  check_same_shape(gate, up, "swiglu");
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLU>(cpu_stream()),
                   {float_input(gate, "gate"), float_input(up, "up")});
}

std::tuple<mx::array, mx::array> swiglu_grad(const mx::array& gate, const mx::array& up, const mx::array& d_out) {
  check_same_shape(gate, up, "swiglu_grad");
  check_same_shape(gate, d_out, "swiglu_grad");
  auto outs = mx::array::make_arrays({gate.shape(), gate.shape()}, {mx::float32, mx::float32},
                                     std::make_shared<SwiGLUGrad>(cpu_stream()),
                                     {float_input(gate, "gate"), float_input(up, "up"), float_input(d_out, "d_out")});
  return {outs[0], outs[1]};
}

// ---- RoPE over (batch, heads, positions, head size), rotating halves (mlx-lm's default) ------------

struct RopeParams {
  float base, scale;
  int offset, split, restart;  // column l has position l + offset before `split`, l - split + restart from it
  bool inverse;                // rotate by -theta: the backward
  bool seq_major;              // write (batch, positions, heads, size) instead of (batch, heads, positions, size)

  bool operator==(const RopeParams& o) const {
    return base == o.base && scale == o.scale && offset == o.offset && split == o.split && restart == o.restart &&
           inverse == o.inverse && seq_major == o.seq_major;
  }
};

// cos and sin of each position's angles, (positions x half) each, computed as MLX's RoPE does
// (float32 positions times float32 inverse frequencies) so that the results agree with it.
void angle_table(const RopeParams& p, int positions, int half, std::vector<float>& cos_t, std::vector<float>& sin_t) {
  cos_t.resize(static_cast<size_t>(positions) * half);
  sin_t.resize(cos_t.size());
  float step = static_cast<float>(std::log(static_cast<double>(p.base)) / half);
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = std::exp(static_cast<float>(-i) * step);
  }
  for (int l = 0; l < positions; ++l) {
    int pos = l < p.split ? l + p.offset : l - p.split + p.restart;
    float t = static_cast<float>(pos) * p.scale;
    for (int i = 0; i < half; ++i) {
      float theta = t * inv_freq[i];
      cos_t[static_cast<size_t>(l) * half + i] = std::cos(theta);
      sin_t[static_cast<size_t>(l) * half + i] = p.inverse ? -std::sin(theta) : std::sin(theta);
    }
  }
}

struct RopeLayout {
  int64_t batch, heads, positions, size;
  int64_t in_strides[4];  // elements, of the (batch, heads, positions, size) input
};

void rope_rows(const RopeParams& p, const RopeLayout& s, const float* x, float* y) {
  int half = static_cast<int>(s.size / 2);
  std::vector<float> cos_t, sin_t;
  angle_table(p, static_cast<int>(s.positions), half, cos_t, sin_t);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.heads; ++h) {
      for (int64_t l = 0; l < s.positions; ++l) {
        const float* src = x + b * s.in_strides[0] + h * s.in_strides[1] + l * s.in_strides[2];
        int64_t row = p.seq_major ? (b * s.positions + l) * s.heads + h : (b * s.heads + h) * s.positions + l;
        float* dst = y + row * s.size;
        const float* c = cos_t.data() + l * half;
        const float* sn = sin_t.data() + l * half;
        int64_t step = s.in_strides[3];
        if (step == 1) {
#pragma omp simd
          for (int i = 0; i < half; ++i) {
            float a = src[i], z = src[i + half];
            dst[i] = a * c[i] - z * sn[i];
            dst[i + half] = a * sn[i] + z * c[i];
          }
        } else {
          for (int i = 0; i < half; ++i) {
            float a = src[i * step], z = src[(i + half) * step];
            dst[i] = a * c[i] - z * sn[i];
            dst[i + half] = a * sn[i] + z * c[i];
          }
        }
      }
    }
  }
}

class Rope : public CpuPrimitive {
 public:
  Rope(mx::Stream stream, RopeParams params) : CpuPrimitive(stream), params_(params) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto& x = inputs[0];
    allocate(outputs[0]);  // a different layout from x's: never written in place
    RopeLayout layout{x.shape(0), x.shape(1), x.shape(2), x.shape(3), {}};
    for (int i = 0; i < 4; ++i) {
      layout.in_strides[i] = x.strides()[i];
    }
    encoder_for(inputs, outputs).dispatch([p = params_, layout, x = x.data<float>(), y = outputs[0].data<float>()]() {
      rope_rows(p, layout, x, y);
    });
  }

  const char* name() const override { return "RoPE"; }

 protected:
  bool same_parameters(const mx::Primitive& other) const override {
    return static_cast<const Rope&>(other).params_ == params_;
  }

 private:
  RopeParams params_;
};

mx::array rope(const mx::array& x, float base, float scale, int offset, int split, int restart, bool inverse,
               bool seq_major) {
  if (x.ndim() != 4 || x.shape(3) % 2 != 0 || x.dtype() != mx::float32) {
    throw std::invalid_argument("rope: x must be float32 (batch, heads, positions, even head size)");
  }
  auto shape = x.shape();
  if (seq_major) {
    std::swap(shape[1], shape[2]);
  }
  RopeParams params{base, scale, offset, split, restart, inverse, seq_major};
  return mx::array(shape, mx::float32, std::make_shared<Rope>(cpu_stream(), params), {x});
}

}  // namespace

void add_layer_kernels(nb::module_& m) {
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"),
        "(x / sqrt(mean(x^2) + eps) * weight over the last axis; 1 / sqrt(mean(x^2) + eps) per row, shaped (..., 1)).");
  m.def("rms_norm_grad", &rms_norm_grad, nb::arg("x"), nb::arg("weight"), nb::arg("inv"), nb::arg("d_y"),
        "(d_x, d_weight) of rms_norm, given its forward's per-row inv.");
  m.def("swiglu", &swiglu, nb::arg("gate"), nb::arg("up"), "silu(gate) * up, elementwise.");
  m.def("swiglu_grad", &swiglu_grad, nb::arg("gate"), nb::arg("up"), nb::arg("d_out"),
        "(d_gate, d_up) of swiglu.");
  m.def("rope", &rope, nb::arg("x"), nb::arg("base"), nb::arg("scale"), nb::arg("offset"), nb::arg("split"),
        nb::arg("restart"), nb::arg("inverse"), nb::arg("seq_major"),
        "Rotary embedding of x (batch, heads, positions, size), its halves rotated (mlx-lm's default "
        "layout), as mx.fast.rope with dims = size: column l has position l + offset before `split` and "
        "l - split + restart from it. inverse rotates back (the backward); seq_major returns "
        "(batch, positions, heads, size).");
}

}  // namespace mlx_dpo
