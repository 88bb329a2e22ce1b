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

// exp(x) for x <= 0 (a score minus its row's maximum, -|x| of a sigmoid): 2**n * 2**g with n the
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

// An output takes over a donatable input's buffer (same size, read before written, element by
// element), else a fresh one.
inline void reuse_or_allocate(mx::array& out, const mx::array& in) {
  if (in.is_donatable() && in.nbytes() == out.nbytes()) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

inline void allocate(mx::array& out) { out.set_data(mx::allocator::malloc(out.nbytes())); }

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

// A float32 input, row-contiguous (a copy only when it is not already).
inline mx::array float_rows(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string(what) + " must be float32");
  }
  return mx::contiguous(a);
}

inline mx::Stream cpu_stream() { return mx::default_stream(mx::default_device()); }

void add_attention_kernels(nb::module_& m);
void add_layer_kernels(nb::module_& m);
void add_optimizer_kernels(nb::module_& m);
void add_causal_attention(nb::module_& m);

}  // namespace mlx_dpo
