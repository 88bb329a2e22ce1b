// Causal attention softmax for MLX's CPU backend, one pass per score row (mlx_dpo/native.py builds
// this file on first use; mlx_dpo/cpu_attention.py calls it).
//
// MLX's CPU backend runs a softmax as separate passes over the (queries x keys) scores: the
// mask's select, the row maximum, the exp's kernels and the row sum each read (and most write)
// the whole block. Here each row's visible keys are one contiguous range (causal, after the
// row's left padding), so a row is read once into cache, its maximum, exp and sum taken there,
// and the weights written once; keys outside the range are written as 0 and never computed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <typeinfo>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2**23: adding then subtracting it rounds to an integer

// exp(x) for x <= 0 (a score minus its row's maximum or log-partition): 2**n * 2**g with n the
// nearest integer to x log2(e) and Cephes' polynomial for 2**g on [-0.5, 0.5]. Exactly 0 once 2**n
// leaves float32's normal range (no denormals: they are slow on x86 and the backward multiplies
// them into more). Branch-free, so that the row loops vectorise.
inline float exp_nonpositive(float x) {
  float y = x * kLog2e;
  float n = (y + kRound) - kRound;
  float g = y - n;
  float p = 1.535336188319500e-4f;
  p = p * g + 1.339887440266574e-3f;
  p = p * g + 9.618437357674640e-3f;
  p = p * g + 5.550332471162809e-2f;
  p = p * g + 2.402264791363012e-1f;
  p = p * g + 6.931472028550421e-1f;
  p = p * g + 1.0f;
  int32_t bits = (static_cast<int32_t>(std::max(n, -127.0f)) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Rows {
  int batch, heads, queries, keys, offset;
  const int32_t* left_pad;

  // The keys [lo, hi] that query i of batch row b sees: from its row's first real token to itself;
  // a query inside the left padding sees only itself, so that no row is empty.
  void range(int b, int i, int& lo, int& hi) const {
    int query = std::min(i + offset, keys - 1);
    int pad = left_pad[b];
    lo = pad <= query ? pad : query;
    hi = query;
  }
};

void zero_outside(float* row, int lo, int hi, int keys) {
  std::memset(row, 0, sizeof(float) * lo);
  std::memset(row + hi + 1, 0, sizeof(float) * (keys - hi - 1));
}

void softmax_rows(const Rows& r, const float* scores, float* weights, float* top, float* total) {
  for (int b = 0; b < r.batch; ++b) {
    for (int h = 0; h < r.heads; ++h) {
      for (int i = 0; i < r.queries; ++i) {
        size_t row = (static_cast<size_t>(b) * r.heads + h) * r.queries + i;
        const float* s = scores + row * r.keys;
        float* w = weights + row * r.keys;
        int lo, hi;
        r.range(b, i, lo, hi);
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int j = lo; j <= hi; ++j) {
          m = s[j] > m ? s[j] : m;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int j = lo; j <= hi; ++j) {
          float e = exp_nonpositive(s[j] - m);
          w[j] = e;
          sum += e;
        }
        zero_outside(w, lo, hi, r.keys);
        top[row] = m;
        total[row] = sum;
      }
    }
  }
}

// dS = W * (dW - row_dot) on each row's visible keys, 0 elsewhere: the backward of attention whose
// forward kept W (with 1 / row sum folded into dW and row_dot by the caller).
void weights_grad_rows(const Rows& r, const float* weights, const float* d_weights, const float* row_dot,
                       float* d_scores) {
  for (int b = 0; b < r.batch; ++b) {
    for (int h = 0; h < r.heads; ++h) {
      for (int i = 0; i < r.queries; ++i) {
        size_t row = (static_cast<size_t>(b) * r.heads + h) * r.queries + i;
        const float* w = weights + row * r.keys;
        const float* dw = d_weights + row * r.keys;
        float* ds = d_scores + row * r.keys;
        int lo, hi;
        r.range(b, i, lo, hi);
        float rd = row_dot[row];
#pragma omp simd
        for (int j = lo; j <= hi; ++j) {
          ds[j] = w[j] * (dw[j] - rd);
        }
        zero_outside(ds, lo, hi, r.keys);
      }
    }
  }
}

// An output takes over a donatable input's buffer (same size, read before written, element by
// element), else a fresh one.
void reuse_or_allocate(mx::array& out, const mx::array& in) {
  if (in.is_donatable() && in.nbytes() == out.nbytes()) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

Rows rows_of(const mx::array& scores, const mx::array& left_pad, int offset) {
  return Rows{static_cast<int>(scores.shape(0)), static_cast<int>(scores.shape(1)),
              static_cast<int>(scores.shape(2)), static_cast<int>(scores.shape(3)), offset,
              left_pad.data<int32_t>()};
}

// What both primitives share: the causal mask's offset; CPU only; equal (for mx.compile's
// common-subexpression pass) when of one kind and one offset.
class CausalRowsPrimitive : public mx::Primitive {
 public:
  CausalRowsPrimitive(mx::Stream stream, int offset) : mx::Primitive(stream), offset_(offset) {}

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx-dpo's fused causal softmax runs on the CPU only");
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const CausalRowsPrimitive*>(&other);
    return o && typeid(*o) == typeid(*this) && o->offset_ == offset_;
  }

 protected:
  // This stream's encoder, told of every input and output (after the outputs have their buffers).
  mx::cpu::CommandEncoder& encoder_for(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& in : inputs) {
      encoder.set_input_array(in);
    }
    for (auto& out : outputs) {
      encoder.set_output_array(out);
    }
    return encoder;
  }

  int offset_;
};

class CausalSoftmax : public CausalRowsPrimitive {
 public:
  using CausalRowsPrimitive::CausalRowsPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto& scores = inputs[0];
    const auto& left_pad = inputs[1];
    auto& weights = outputs[0];
    reuse_or_allocate(weights, scores);
    outputs[1].set_data(mx::allocator::malloc(outputs[1].nbytes()));
    outputs[2].set_data(mx::allocator::malloc(outputs[2].nbytes()));
    encoder_for(inputs, outputs).dispatch([rows = rows_of(scores, left_pad, offset_), s = scores.data<float>(),
                                           w = weights.data<float>(), top = outputs[1].data<float>(),
                                           total = outputs[2].data<float>()]() {
      softmax_rows(rows, s, w, top, total);
    });
  }

  const char* name() const override { return "CausalSoftmax"; }
};

class CausalSoftmaxGrad : public CausalRowsPrimitive {
 public:
  using CausalRowsPrimitive::CausalRowsPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto& weights = inputs[0];
    const auto& d_weights = inputs[1];
    const auto& row_dot = inputs[2];
    const auto& left_pad = inputs[3];
    reuse_or_allocate(outputs[0], d_weights);
    encoder_for(inputs, outputs).dispatch([rows = rows_of(weights, left_pad, offset_), w = weights.data<float>(),
                                           dw = d_weights.data<float>(), rd = row_dot.data<float>(), ds = outputs[0].data<float>()]() {
      weights_grad_rows(rows, w, dw, rd, ds);
    });
  }

  const char* name() const override { return "CausalSoftmaxGrad"; }
};

mx::array float_rows(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string(what) + " must be float32");
  }
  return mx::contiguous(a);
}

mx::array pads_of(const mx::array& left_pad, int batch) {
  if (left_pad.ndim() != 1 || left_pad.shape(0) != batch) {
    throw std::invalid_argument("left_pad must have one entry per batch row");
  }
  return mx::contiguous(mx::astype(left_pad, mx::int32));
}

std::vector<mx::array> causal_softmax(const mx::array& scores, const mx::array& left_pad, int offset) {
  if (scores.ndim() != 4) {
    throw std::invalid_argument("scores must be (batch, heads, queries, keys)");
  }
  auto s = float_rows(scores, "scores");
  auto pads = pads_of(left_pad, s.shape(0));
  auto row_shape = s.shape();
  row_shape.back() = 1;
  auto stream = mx::default_stream(mx::default_device());
  return mx::array::make_arrays({s.shape(), row_shape, row_shape}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<CausalSoftmax>(stream, offset), {s, pads});
}

mx::array causal_softmax_grad(const mx::array& weights, const mx::array& d_weights, const mx::array& row_dot,
                              const mx::array& left_pad, int offset) {
  if (weights.ndim() != 4 || d_weights.shape() != weights.shape()) {
    throw std::invalid_argument("weights and d_weights must both be (batch, heads, queries, keys)");
  }
  auto w = float_rows(weights, "weights");
  auto row_shape = w.shape();
  row_shape.back() = 1;
  auto rd = float_rows(mx::broadcast_to(row_dot, row_shape), "row_dot");
  auto stream = mx::default_stream(mx::default_device());
  return mx::array(w.shape(), mx::float32, std::make_shared<CausalSoftmaxGrad>(stream, offset),
                   {w, float_rows(d_weights, "d_weights"), rd, pads_of(left_pad, w.shape(0))});
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "mlx-dpo's fused CPU kernels (built on first use by mlx_dpo.native)";
  m.def("causal_softmax", &causal_softmax, nb::arg("scores"), nb::arg("left_pad"), nb::arg("offset"),
        "(exp(scores - row max) over each row's visible keys, 0 elsewhere; row max; row sum). "
        "Query i of batch row b sees keys left_pad[b]..i + offset, or only itself inside the padding.");
  m.def("causal_softmax_grad", &causal_softmax_grad, nb::arg("weights"), nb::arg("d_weights"), nb::arg("row_dot"),
        nb::arg("left_pad"), nb::arg("offset"),
        "weights * (d_weights - row_dot) over the visible keys, 0 elsewhere: the scores' gradient when the "
        "forward kept its weights.");
}
