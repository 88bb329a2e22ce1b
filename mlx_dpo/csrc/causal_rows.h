// The causal mask's rows, shared by the attention kernels: which keys each query sees.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>

#include "common.h"

namespace mlx_dpo {

// The rows' left paddings as the kernels read them, one int32 per batch row.
inline mx::array left_pads(const mx::array& left_pad, int64_t batch) {
  if (left_pad.ndim() != 1 || left_pad.shape(0) != batch) {
    throw std::invalid_argument("left_pad must have one entry per batch row");
  }
  return mx::astype(left_pad, mx::int32);
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

inline void zero_outside(float* row, int lo, int hi, int keys) {
  std::memset(row, 0, sizeof(float) * lo);
  std::memset(row + hi + 1, 0, sizeof(float) * (keys - hi - 1));
}

// max(x[lo..hi]), -infinity for an empty range. In 16 lanes: GCC leaves `omp simd reduction(max)`
// of floats scalar (one element per cycle: half of the attention forward's softmax time).
inline float row_max(const float* x, int lo, int hi) {
  constexpr int kLanes = 16;
  constexpr float kLow = -std::numeric_limits<float>::infinity();
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    lanes[l] = kLow;
  }
  int j = lo;
  for (; j + kLanes <= hi + 1; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] = x[j + l] > lanes[l] ? x[j + l] : lanes[l];
    }
  }
  float m = kLow;
  for (; j <= hi; ++j) {
    m = x[j] > m ? x[j] : m;
  }
  for (int l = 0; l < kLanes; ++l) {
    m = lanes[l] > m ? lanes[l] : m;
  }
  return m;
}

// exp(s - top) over [lo, hi] into w (s and w may be one buffer), where no score exceeds top (keys
// the row sees, top their maximum); the sum of the exps.
inline float exp_shifted(const float* s, float* w, int lo, int hi, float top) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int j = lo; j <= hi; ++j) {
    float e = exp_nonpositive(s[j] - top);
    w[j] = e;
    sum += e;
  }
  return sum;
}

// exp(s - max) over the row's visible keys [lo, hi] (s and w may be one buffer), 0 elsewhere; its
// maximum and sum.
inline void softmax_row(const float* s, float* w, int lo, int hi, int keys, float& top, float& total) {
  const float m = row_max(s, lo, hi);
  total = exp_shifted(s, w, lo, hi, m);
  zero_outside(w, lo, hi, keys);
  top = m;
}

}  // namespace mlx_dpo
