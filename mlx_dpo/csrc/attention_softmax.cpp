// Causal attention softmax for MLX's CPU backend, one pass per score row (mlx_dpo/native.py builds
// this file on first use; mlx_dpo/cpu_attention.py calls it).
//
// MLX's CPU backend runs a softmax as separate passes over the (queries x keys) scores: the
// mask's select, the row maximum, the exp's kernels and the row sum each read (and most write)
// the whole block. Here each row's visible keys are one contiguous range (causal, after the
// row's left padding), so a row is read once into cache, its maximum, exp and sum taken there,
// and the weights written once; keys outside the range are written as 0 and never computed.
#include <cmath>
#include <limits>

#include <nanobind/stl/vector.h>

#include "causal_rows.h"

namespace mlx_dpo {

namespace {

void softmax_rows(const Rows& r, const float* scores, float* weights, float* top, float* total) {
  for (int b = 0; b < r.batch; ++b) {
    for (int h = 0; h < r.heads; ++h) {
      for (int i = 0; i < r.queries; ++i) {
        size_t row = (static_cast<size_t>(b) * r.heads + h) * r.queries + i;
        const float* s = scores + row * r.keys;
        float* w = weights + row * r.keys;
        int lo, hi;
        r.range(b, i, lo, hi);
        softmax_row(s, w, lo, hi, r.keys, top[row], total[row]);
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

Rows rows_of(const mx::array& scores, const mx::array& left_pad, int offset) {
  return Rows{static_cast<int>(scores.shape(0)), static_cast<int>(scores.shape(1)),
              static_cast<int>(scores.shape(2)), static_cast<int>(scores.shape(3)), offset,
              left_pad.data<int32_t>()};
}

// What both primitives share: the causal mask's offset.
class CausalRowsPrimitive : public CpuPrimitive {
 public:
  CausalRowsPrimitive(mx::Stream stream, int offset) : CpuPrimitive(stream), offset_(offset) {}

 protected:
  bool same_parameters(const mx::Primitive& other) const override {
    return static_cast<const CausalRowsPrimitive&>(other).offset_ == offset_;
  }

  int offset_;
};

class CausalSoftmax : public CausalRowsPrimitive {
 public:
  using CausalRowsPrimitive::CausalRowsPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    const auto& scores = in[0];
    const auto& left_pad = in[1];
    auto& weights = outputs[0];
    reuse_or_allocate(weights, scores);
    allocate(outputs[1]);
    allocate(outputs[2]);
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
    auto in = readable(inputs, outputs);
    const auto& weights = in[0];
    const auto& d_weights = in[1];
    const auto& row_dot = in[2];
    const auto& left_pad = in[3];
    reuse_or_allocate(outputs[0], d_weights);
    encoder_for(inputs, outputs).dispatch([rows = rows_of(weights, left_pad, offset_), w = weights.data<float>(),
                                           dw = d_weights.data<float>(), rd = row_dot.data<float>(), ds = outputs[0].data<float>()]() {
      weights_grad_rows(rows, w, dw, rd, ds);
    });
  }

  const char* name() const override { return "CausalSoftmaxGrad"; }
};

std::vector<mx::array> causal_softmax(const mx::array& scores, const mx::array& left_pad, int offset) {
  if (scores.ndim() != 4) {
    throw std::invalid_argument("scores must be (batch, heads, queries, keys)");
  }
  auto s = float_input(scores, "scores");
  return mx::array::make_arrays({s.shape(), row_shape(s), row_shape(s)}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<CausalSoftmax>(cpu_stream(), offset),
                                {s, left_pads(left_pad, s.shape(0))});
}

mx::array causal_softmax_grad(const mx::array& weights, const mx::array& d_weights, const mx::array& row_dot,
                              const mx::array& left_pad, int offset) {
  if (weights.ndim() != 4 || d_weights.shape() != weights.shape()) {
    throw std::invalid_argument("weights and d_weights must both be (batch, heads, queries, keys)");
  }
  auto w = float_input(weights, "weights");
  auto rd = float_input(mx::broadcast_to(row_dot, row_shape(w)), "row_dot");
  return mx::array(w.shape(), mx::float32, std::make_shared<CausalSoftmaxGrad>(cpu_stream(), offset),
                   {w, float_input(d_weights, "d_weights"), rd, left_pads(left_pad, w.shape(0))});
}

// The same row pass over whole rows (x (rows, width), no mask): the LM head's log-softmax chunks.
std::vector<mx::array> row_softmax(const mx::array& x) {
  if (x.ndim() != 2) {
    throw std::invalid_argument("x must be (rows, width)");
  }
  int rows = x.shape(0), width = x.shape(1);
  auto outs = causal_softmax(mx::reshape(x, {1, 1, rows, width}), mx::zeros({1}, mx::int32), width);
  return {mx::reshape(outs[0], {rows, width}), mx::reshape(outs[1], {rows, 1}), mx::reshape(outs[2], {rows, 1})};
}

}  // namespace

void add_attention_kernels(nb::module_& m) {
  m.def("causal_softmax", &causal_softmax, nb::arg("scores"), nb::arg("left_pad"), nb::arg("offset"),
        "(exp(scores - row max) over each row's visible keys, 0 elsewhere; row max; row sum). "
        "Query i of batch row b sees keys left_pad[b]..i + offset, or only itself inside the padding.");
  m.def("causal_softmax_grad", &causal_softmax_grad, nb::arg("weights"), nb::arg("d_weights"), nb::arg("row_dot"),
        nb::arg("left_pad"), nb::arg("offset"),
        "weights * (d_weights - row_dot) over the visible keys, 0 elsewhere: the scores' gradient when the "
        "forward kept its weights.");
  m.def("row_softmax", &row_softmax, nb::arg("x"),
        "(exp(x - row max), row max, row sum) of x (rows, width), in one pass per row.");
}

}  // namespace mlx_dpo
