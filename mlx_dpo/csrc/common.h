// What mlx-dpo's CPU kernels share (mlx_dpo/native.py builds every .cpp file here into one
// module): the branch-free exp, buffer donation, and the base class of their MLX primitives.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlx_dpo {

namespace nb = nanobind;
namespace mx = mlx::core;

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2**23: adding then subtracting it rounds to an integer

// p * g + c as one fused multiply-add where the CPU has them (explicit: the build's
// -ffp-contract=off keeps exp's rounding step below apart): 6 instructions of exp's polynomial
// instead of 12, with one rounding each. Without FMA hardware fmaf would be a library call.
[[gnu::always_inline]] inline float horner_step(float p, float g, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return __builtin_fmaf(p, g, c);
#else
  return p * g + c;
#endif
}

// exp(x) for x <= 0 (a score minus its row's maximum, -|x| of a sigmoid): 2**n * 2**g with n the
// nearest integer to x log2(e) and Cephes' polynomial for 2**g on [-0.5, 0.5]. Exactly 0 once 2**n
// leaves float32's normal range (no denormals: they are slow on x86 and the backward multiplies
// them into more). Branch-free, so that the row loops vectorise; always inlined, since a call
// inside an `omp simd` loop leaves the loop scalar.
[[gnu::always_inline]] inline float exp_nonpositive(float x) {
  float y = x * kLog2e;
  float n = (y + kRound) - kRound;
  float g = y - n;
  float p = 1.535336188319500e-4f;
  p = horner_step(p, g, 1.339887440266574e-3f);
  p = horner_step(p, g, 9.618437357674640e-3f);
  p = horner_step(p, g, 5.550332471162809e-2f);
  p = horner_step(p, g, 2.402264791363012e-1f);
  p = horner_step(p, g, 6.931472028550421e-1f);
  p = horner_step(p, g, 1.0f);
  int32_t bits = (static_cast<int32_t>(std::max(n, -127.0f)) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// An output takes over a donatable input's buffer (row-contiguous, same size, read before written,
// element by element), else a fresh one.
inline void reuse_or_allocate(mx::array& out, const mx::array& in) {
  if (in.is_donatable() && in.flags().row_contiguous && in.nbytes() == out.nbytes()) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

inline void allocate(mx::array& out) { out.set_data(mx::allocator::malloc(out.nbytes())); }

// A float32 input, checked when the graph is built. Its layout is only known once it is evaluated:
// `Readable` below makes it row-contiguous then, in the primitive. (mx::contiguous here would add a
// node that shares the buffer, and so keep every input from being donated to an output.)
inline const mx::array& float_input(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string(what) + " must be float32");
  }
  return a;
}

// Copies the elements at src (any strides, broadcasts included) into dst, row-major.
template <typename T>
void strided_copy(const T* src, T* dst, const mx::Shape& shape, const mx::Strides& strides) {
  int ndim = static_cast<int>(shape.size());
  if (ndim == 0) {
    *dst = *src;
    return;
  }
  int64_t inner = shape[ndim - 1], step = strides[ndim - 1];
  int64_t rows = 1;
  for (int d = 0; d < ndim - 1; ++d) {
    rows *= shape[d];
  }
  std::vector<int64_t> index(ndim, 0);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t offset = 0;
    for (int d = 0; d < ndim - 1; ++d) {
      offset += index[d] * strides[d];
    }
    const T* s = src + offset;
    for (int64_t j = 0; j < inner; ++j) {
      dst[j] = s[j * step];
    }
    dst += inner;
    for (int d = ndim - 2; d >= 0 && ++index[d] == shape[d]; --d) {
      index[d] = 0;
    }
  }
}

// A row-major copy of `a`, made on the encoder's stream before the kernels dispatched after it.
inline mx::array row_major_copy(const mx::array& a, mx::cpu::CommandEncoder& encoder) {
  mx::array out(a.shape(), a.dtype(), nullptr, {});
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (a.dtype() == mx::int32) {
    encoder.dispatch([src = a.data<int32_t>(), dst = out.data<int32_t>(), shape = a.shape(), strides = a.strides()]() {
      strided_copy(src, dst, shape, strides);
    });
  } else {
    encoder.dispatch([src = a.data<float>(), dst = out.data<float>(), shape = a.shape(), strides = a.strides()]() {
      strided_copy(src, dst, shape, strides);
    });
  }
  encoder.add_temporary(out);
  return out;
}

// A primitive's inputs as its kernels read them: each one itself when row-contiguous (referred to,
// not copied, so that `is_donatable` still sees one owner), else a row-major copy (MLX hands
// primitives transposes, slices and broadcasts).
class Readable {
 public:
  Readable(const std::vector<mx::array>& inputs, mx::cpu::CommandEncoder& encoder) {
    copies_.reserve(inputs.size());  // no reallocation: arrays_ points into it
    for (const auto& a : inputs) {
      if (a.flags().row_contiguous) {
        arrays_.push_back(&a);
      } else {
        copies_.push_back(row_major_copy(a, encoder));
        arrays_.push_back(&copies_.back());
      }
    }
  }
  Readable(const Readable&) = delete;
  Readable& operator=(const Readable&) = delete;

  const mx::array& operator[](size_t i) const { return *arrays_[i]; }

 private:
  std::vector<mx::array> copies_;
  std::vector<const mx::array*> arrays_;
};

// A primitive that runs on the CPU only and is equal (for mx.compile's common-subexpression pass)
// to another of its kind with the same parameters, as `same_parameters` says.
class CpuPrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("mlx-dpo's ") + name() + " runs on the CPU only");
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return typeid(other) == typeid(*this) && same_parameters(other);
  }

 protected:
  virtual bool same_parameters(const mx::Primitive& other) const = 0;

  // The inputs as the kernels read them: row-contiguous, copied first on this stream where not.
  //
  // First the other outputs let go of their copies of the input list. MLX gives each output of a
  // primitive its own list, so with three outputs every input has three owners and `is_donatable`
  // refuses it: AdamW's weight and moments were never updated in place, and each step mapped and
  // zeroed fresh pages for them. MLX evaluates all outputs in this one call and then detaches
  // them, so nothing reads those lists again. `inputs` itself (the evaluated output's list, which
  // MLX reads afterwards to keep the buffers alive until the kernel has run) stays, and nothing is
  // dropped unless it is found among the outputs'. A tracer (evaluated inside a function being
  // transformed) keeps its graph: MLX does not detach it.
  Readable readable(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
    bool called_on_an_output = std::any_of(outputs.begin(), outputs.end(),
                                           [&](const mx::array& out) { return &out.inputs() == &inputs; });
    for (auto& out : outputs) {
      if (called_on_an_output && &out.inputs() != &inputs && !out.is_tracer()) {
        out.inputs().clear();
      }
    }
    return Readable(inputs, mx::cpu::get_command_encoder(stream()));
  }

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
};

inline mx::Stream cpu_stream() { return mx::default_stream(mx::default_device()); }

// x's shape with a last axis of 1: one number per row.
inline mx::Shape row_shape(const mx::array& x) {
  auto shape = x.shape();
  shape.back() = 1;
  return shape;
}

void add_attention_kernels(nb::module_& m);
void add_layer_kernels(nb::module_& m);
void add_optimizer_kernels(nb::module_& m);
void add_causal_attention(nb::module_& m);
void add_lora_kernels(nb::module_& m);
void add_frozen_gemm(nb::module_& m);

}  // namespace mlx_dpo
