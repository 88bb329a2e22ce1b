// Causal attention, forward and backward, as two MLX primitives for the CPU (mlx_dpo/native.py
// builds this file; mlx_dpo/cpu_attention.py calls it).
//
// On MLX's CPU backend attention's products go to OpenBLAS one (query group x keys) block at a
// time: matrices with an inner size of 64 (the head size), for which packing costs as much as the
// arithmetic, over the whole square although the causal mask hides half of it. Around them sit
// the reshapes, the softmax and the divisions, each a pass over memory. Here each query row block
// is multiplied only against the keys its rows can see, in register tiles written for a small
// head size (the compiler vectorises them for this machine), and the softmax, the normalisation
// and the backward's `W * (dW - rowdot)` happen on the tiles' rows while they are in cache.
//
// Layouts: queries (batch, heads, T, D), already scaled; keys and values (batch, kv heads, S, D),
// heads grouped over kv heads as mlx-lm does (head h uses kv head h / (heads / kv heads)).
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include <nanobind/stl/tuple.h>

#include "causal_rows.h"
#include "simd.h"

namespace mlx_dpo {

namespace {

// Query rows and key columns per score tile: 6 x 64 accumulators fill 24 AVX-512 registers, and
// each step of the tile loads 4 vectors of keys and broadcasts 6 query values for 24 fused
// multiply-adds. 8 x 32 tiles (16 registers) made 10 loads per 16, and ran ~10% slower in this
// kernel; much slower in the slow minutes of a machine whose cores are shared (docs/benchmarks.md,
// session 24).
constexpr int kTileRows = 6;
constexpr int kTileCols = 64;
// Query rows per block: the softmax, the products and the key gradients' accumulation go a block
// at a time, so each key gradient row is loaded and stored once per this many query rows; a
// multiple of kTileRows.
constexpr int kBlockRows = 18;

// Calls tile(std::integral_constant<int, n>{}, i) for consecutive runs [i, i + n) that cover [0, count):
// runs of R while they fit, then of 4, 2 and 1, so that a block's last rows still go through
// register tiles.
template <int R, typename Tile>
inline void in_tiles(int count, Tile&& tile) {
  int i = 0;
  for (; i + R <= count; i += R) {
    tile(std::integral_constant<int, R>{}, i);
  }
  if constexpr (R > 4) {
    if (i + 4 <= count) {
      tile(std::integral_constant<int, 4>{}, i);
      i += 4;
    }
  }
  if constexpr (R > 2) {
    if (i + 2 <= count) {
      tile(std::integral_constant<int, 2>{}, i);
      i += 2;
    }
  }
  for (; i < count; ++i) {
    tile(std::integral_constant<int, 1>{}, i);
  }
}

// acc[r][c] += sum_{k in [from, to)} a[r][k] * b[k][c] for R rows and W columns: the plain C++ tiles'
// loop (the compiler vectorises it for this machine).
template <int R, int W>
inline void multiply_add(const float* a, int64_t lda, const float* b, int64_t ldb, int from, int to,
                         float (&acc)[R][W]) {
  for (int k = from; k < to; ++k) {
    const float* bk = b + k * ldb;
    for (int r = 0; r < R; ++r) {
      float x = a[r * lda + k];
#pragma omp simd
      for (int c = 0; c < W; ++c) {
        acc[r][c] = __builtin_fmaf(x, bk[c], acc[r][c]);
      }
    }
  }
}

// out[r][c] = sum_k a[r][k] * bt[k][c] for R rows and kTileCols columns (bt padded that far); the
// first `width` columns written.
template <int R>
inline void score_tile(const float* a, int64_t lda, const float* bt, int64_t ldb, int depth, float* out,
                       int64_t ldo, int width) {
  float acc[R][kTileCols] = {};
  multiply_add(a, lda, bt, ldb, 0, depth, acc);
  for (int r = 0; r < R; ++r) {
    std::memcpy(out + r * ldo, acc[r], sizeof(float) * width);
  }
}

#if defined(MLX_DPO_SIMD_TILES)
// The same tiles in vector registers (simd.h; GCC keeps the portable versions' accumulators on the
// stack). Never inlined: inlined into a large caller, GCC has stored every accumulator to the stack
// on each step of the loop (the forward ran 1.5x slower).
//
// Scores: R rows x kTileCols columns, as register tiles of R x simd::kTileWidth (one tile on
// AVX-512; four on AVX2, each reading its 16 columns of the panel). Tiles wholly past `width` are
// skipped.
template <int R>
[[gnu::noinline]] void score_tile_simd(const float* a, int64_t lda, const float* bt, int64_t ldb, int depth, float* out,
                                       int64_t ldo, int width) {
  using simd::Vec;
  constexpr int V = simd::kTileVectors, W = simd::kTileWidth;
  for (int c0 = 0; c0 < width; c0 += W) {
    Vec acc[R][V];
    for (int r = 0; r < R; ++r) {
      for (int u = 0; u < V; ++u) acc[r][u] = simd::zero();
    }
    for (int k = 0; k < depth; ++k) {
      const float* b = bt + k * ldb + c0;
      Vec bv[V];
      for (int u = 0; u < V; ++u) bv[u] = simd::load(b + simd::kLanes * u);
      for (int r = 0; r < R; ++r) {
        Vec x = simd::broadcast(a[r * lda + k]);
        for (int u = 0; u < V; ++u) acc[r][u] = simd::fmadd(x, bv[u], acc[r][u]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float* o = out + r * ldo + c0;
      if (c0 + W <= width) {
        for (int u = 0; u < V; ++u) simd::store(o + simd::kLanes * u, acc[r][u]);
      } else {
        alignas(64) float row[W];
        for (int u = 0; u < V; ++u) simd::store(row + simd::kLanes * u, acc[r][u]);
        std::memcpy(o, row, sizeof(float) * (width - c0));
      }
    }
  }
}

// out rows (R of W) += sum_j p[r][j] b[j][:] (product) or sum_j p[j][j0 + r] b[j][:] (transposed).
template <int R, int W, bool Transposed>
[[gnu::noinline]] void rows_tile_simd(const float* p, int64_t ldp, const float* b, int64_t ldb, int from, int to, int j0,
                                      float* out, int64_t ldo) {
  using simd::Vec;
  constexpr int V = W / simd::kLanes;
  Vec acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < V; ++u) {
      acc[r][u] = simd::load(out + r * ldo + u * simd::kLanes);
    }
  }
  for (int j = from; j < to; ++j) {
    const float* bj = b + j * ldb;
    Vec bv[V];
    for (int u = 0; u < V; ++u) {
      bv[u] = simd::load(bj + u * simd::kLanes);
    }
    for (int r = 0; r < R; ++r) {
      Vec x = simd::broadcast(Transposed ? p[j * ldp + j0 + r] : p[r * ldp + j]);
      for (int u = 0; u < V; ++u) {
        acc[r][u] = simd::fmadd(x, bv[u], acc[r][u]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < V; ++u) {
      simd::store(out + r * ldo + u * simd::kLanes, acc[r][u]);
    }
  }
}
#endif

// Keys transposed into panels of kTileCols columns: panel p holds K^T's columns [p kTileCols,
// (p + 1) kTileCols) as `depth` rows of kTileCols contiguous floats, so that a score tile reads one
// contiguous block (16 KB at head size 64) instead of `depth` rows a page apart, which the hardware
// prefetcher does not follow and which each take a TLB entry.
inline const float* panel(const float* panels, int depth, int column) {
  return panels + static_cast<int64_t>(column / kTileCols) * depth * kTileCols;
}

// Scores of `rows` rows of a (lda) against key columns [c0, c1) of the panels, into out's rows (ldo)
// at the same columns. Tiles start at panel boundaries, so columns from c0's panel start on are
// written too: with the scores those columns have, whichever tile writes them.
void score_rows(const float* a, int64_t lda, int rows, const float* panels, int depth, int c0, int c1, float* out,
                int64_t ldo) {
  const int start = c0 / kTileCols * kTileCols;
  in_tiles<kTileRows>(rows, [&](auto n, int r0) {
    for (int c = start; c < c1; c += kTileCols) {
      const int width = std::min(kTileCols, c1 - c);
#if defined(MLX_DPO_SIMD_TILES)
      score_tile_simd<decltype(n)::value>(a + r0 * lda, lda, panel(panels, depth, c), kTileCols, depth,
                                            out + r0 * ldo + c, ldo, width);
#else
      score_tile<decltype(n)::value>(a + r0 * lda, lda, panel(panels, depth, c), kTileCols, depth, out + r0 * ldo + c,
                                     ldo, width);
#endif
    }
  });
}

#if defined(MLX_DPO_SIMD_TILES)
// Columns of the products' register tiles: simd::kTileWidth where the head size is a multiple of it
// (AVX-512: 64 columns, AVX2: 16; then 6 rows per tile, as the score tiles: each row of b serves 6
// rows of p per load), else 2 vectors per row (AVX-512 at head size 32; then 8 rows).
template <int D>
constexpr int kSliceWidth = D % simd::kTileWidth == 0 ? simd::kTileWidth : 2 * simd::kLanes;
#endif

// out[r][:] += sum_{j in [j0, j1)} p[r][j] * b[j][:] for R rows of size D.
template <int R, int D>
inline void product_tile(const float* p, int64_t ldp, const float* b, int64_t ldb, int j0, int j1, float* out,
                         int64_t ldo) {
#if defined(MLX_DPO_SIMD_TILES)
  if constexpr (D % kSliceWidth<D> == 0) {
    for (int c = 0; c < D; c += kSliceWidth<D>) {
      rows_tile_simd<R, kSliceWidth<D>, false>(p, ldp, b + c, ldb, j0, j1, 0, out + c, ldo);
    }
    return;
  }
#endif
  float acc[R][D];
  for (int r = 0; r < R; ++r) {
    std::memcpy(acc[r], out + r * ldo, sizeof(acc[r]));
  }
  multiply_add(p, ldp, b, ldb, j0, j1, acc);
  for (int r = 0; r < R; ++r) {
    std::memcpy(out + r * ldo, acc[r], sizeof(acc[r]));
  }
}

// out[j][:] += sum_{i in [i0, i1)} p[i][j] * a[i][:] for R key rows j0.. of size D.
template <int R, int D>
inline void transposed_tile(const float* p, int64_t ldp, const float* a, int64_t lda, int i0, int i1, int j0,
                            float* out) {
#if defined(MLX_DPO_SIMD_TILES)
  if constexpr (D % kSliceWidth<D> == 0) {
    for (int c = 0; c < D; c += kSliceWidth<D>) {
      rows_tile_simd<R, kSliceWidth<D>, true>(p, ldp, a + c, lda, i0, i1, j0, out + static_cast<int64_t>(j0) * D + c,
                                                D);
    }
    return;
  }
#endif
  float acc[R][D];
  std::memcpy(acc, out + static_cast<int64_t>(j0) * D, sizeof(acc));
  for (int i = i0; i < i1; ++i) {
    const float* ai = a + i * lda;
    const float* pi = p + i * ldp + j0;
    for (int r = 0; r < R; ++r) {
      float x = pi[r];
#pragma omp simd
      for (int k = 0; k < D; ++k) {
        acc[r][k] = __builtin_fmaf(x, ai[k], acc[r][k]);
      }
    }
  }
  std::memcpy(out + static_cast<int64_t>(j0) * D, acc, sizeof(acc));
}

// Rows per register tile of the products: 6 rows of a simd::kTileWidth slice (AVX-512: 24 registers of
// accumulators, AVX2: 12) or 8 of a 2-vector one (AVX-512 at head size 32: 16); in plain C++, as many
// whole rows of D as 16 registers hold.
template <int D>
constexpr int kWholeRows = 1024 / (4 * D) < 1 ? 1 : 1024 / (4 * D);
#if defined(MLX_DPO_SIMD_TILES)
template <int D>
constexpr int kProductRows = kSliceWidth<D> == simd::kTileWidth ? 6 : 8;
#else
template <int D>
constexpr int kProductRows = kWholeRows<D>;
#endif

// Which keys a query row sees: one range for a causal row; for a rejected row of a shared-prompt
// sequence [prompt | chosen | rejected] (rows from `split` on), the prompt's and then its own.
struct Range {
  int lo, hi;  // empty when lo > hi
  bool has(int j) const { return lo <= j && j <= hi; }
};

struct Mask {
  int keys, offset, prompt, split;
  const int32_t* left_pad;

  void ranges(int b, int i, Range& first, Range& second) const {
    int pad = left_pad[b];
    if (i < split) {  // causal: from the row's first real token to itself; inside the padding only itself
      int query = std::min(i + offset, keys - 1);
      first = {pad <= query ? pad : query, query};
      second = {1, 0};
    } else {  // rejected: the prompt's real tokens, never the chosen ones, then its own up to itself
      first = {pad, prompt - 1};
      second = {split, std::min(i + offset, keys - 1)};
    }
  }
};

// The key columns a block of rows needs, as at most two spans (merged where they touch).
struct Spans {
  Range span[2];
  int count = 0;
};

Spans block_spans(const Mask& m, int b, int i0, int rows) {
  Range lo_hi[2] = {{1 << 30, -1}, {1 << 30, -1}};
  for (int i = i0; i < i0 + rows; ++i) {
    Range r[2];
    m.ranges(b, i, r[0], r[1]);
    for (int k = 0; k < 2; ++k) {
      if (r[k].lo <= r[k].hi) {
        lo_hi[k] = {std::min(lo_hi[k].lo, r[k].lo), std::max(lo_hi[k].hi, r[k].hi)};
      }
    }
  }
  Spans s;
  for (auto& r : lo_hi) {
    if (r.lo > r.hi) {
      continue;
    }
    if (s.count && r.lo <= s.span[s.count - 1].hi + 1 && r.hi >= s.span[s.count - 1].lo - 1) {
      auto& last = s.span[s.count - 1];
      last = {std::min(last.lo, r.lo), std::max(last.hi, r.hi)};
    } else {
      s.span[s.count++] = r;
    }
  }
  return s;
}

// The spans' columns inside [lo, hi].
Spans clipped(const Spans& spans, int lo, int hi) {
  Spans out;
  for (int k = 0; k < spans.count; ++k) {
    Range r{std::max(spans.span[k].lo, lo), std::min(spans.span[k].hi, hi)};
    if (r.lo <= r.hi) {
      out.span[out.count++] = r;
    }
  }
  return out;
}

// exp(s - row max) on the row's visible keys and 0 on the rest of the spans, in place; the sum of
// the exps, the maximum in `top`. The visible ranges and the gaps between them go in separate
// loops, so that no element pays for a mask (about a fifth of the loop's instructions when it had them).
float exp_row(float* row, const Spans& spans, Range first, Range second, float& top) {
  const float m = std::max(row_max(row, first.lo, first.hi), row_max(row, second.lo, second.hi));
  top = m;
  float sum = 0.0f;
  for (int k = 0; k < spans.count; ++k) {
    const int lo = spans.span[k].lo, hi = spans.span[k].hi;
    int j = lo;  // columns before j are done
    for (const Range& seen : {first, second}) {  // first lies before second
      const int a = std::max(seen.lo, lo), b = std::min(seen.hi, hi);
      if (a > b) {
        continue;
      }
      std::fill(row + j, row + a, 0.0f);
      sum += exp_shifted(row, row, a, b, m);
      j = b + 1;
    }
    std::fill(row + j, row + hi + 1, 0.0f);
  }
  return sum;
}

// k (S x D) -> its transpose in panels (see `panel`), zero past S.
void transpose_keys(const float* k, int keys, int depth, float* panels) {
  for (int p = 0; p * kTileCols < keys; ++p) {
    float* out = panels + static_cast<int64_t>(p) * depth * kTileCols;
    const int columns = std::min(kTileCols, keys - p * kTileCols);
    for (int d = 0; d < depth; ++d) {
      float* row = out + d * kTileCols;
      for (int c = 0; c < columns; ++c) {
        row[c] = k[static_cast<int64_t>(p * kTileCols + c) * depth + d];
      }
      std::fill(row + columns, row + kTileCols, 0.0f);
    }
  }
}

// Floats of a head's keys in panels.
int64_t panels_size(int keys, int depth) { return static_cast<int64_t>((keys + kTileCols - 1) / kTileCols) * kTileCols * depth; }

// The row stride of the score blocks: room for every panel's whole tile, plus 16 floats so that
// consecutive rows never sit a multiple of 4 KiB apart, where the rows a tile walks would share
// one L1 cache set.
int64_t row_stride(int keys) { return (keys + kTileCols - 1) / kTileCols * kTileCols + 16; }

struct Shapes {
  int batch, heads, kv_heads, queries, keys;
  int group() const { return heads / kv_heads; }
};

// rows x D = (rows x S block of p, over the spans) @ b (S x D), each row times scale[r] (may be null);
// written, or with `accumulate` added to what out holds (then scale must be null).
template <int D>
void product_rows(const float* p, int64_t ldp, int rows, const Spans& spans, const float* b, float* out,
                  const float* scale, bool accumulate = false) {
  constexpr int R = kProductRows<D>;
  if (!accumulate) {
    std::fill(out, out + static_cast<int64_t>(rows) * D, 0.0f);
  }
  for (int k = 0; k < spans.count; ++k) {
    const int lo = spans.span[k].lo, hi = spans.span[k].hi;
    in_tiles<R>(rows, [&](auto n, int r) {
      product_tile<decltype(n)::value, D>(p + r * ldp, ldp, b, D, lo, hi + 1, out + static_cast<int64_t>(r) * D,
                                          D);
    });
  }
  if (scale) {
    for (int r = 0; r < rows; ++r) {
#pragma omp simd
      for (int d = 0; d < D; ++d) {
        out[static_cast<int64_t>(r) * D + d] *= scale[r];
      }
    }
  }
}

// acc (S x D) += (rows x S block of p)^T @ a (rows x D), over the spans' key rows.
template <int D>
void transposed_rows(const float* p, int64_t ldp, int rows, const Spans& spans, const float* a, float* acc) {
  constexpr int R = kProductRows<D>;
  for (int k = 0; k < spans.count; ++k) {
    const Range& c = spans.span[k];
    in_tiles<R>(c.hi - c.lo + 1, [&](auto n, int j) {
      transposed_tile<decltype(n)::value, D>(p, ldp, a, D, 0, rows, c.lo + j, acc);
    });
  }
}

template <int D>
void attention_forward(const Shapes& s, const Mask& m, const float* q, const float* k, const float* v, float* out,
                       float* top, float* total) {
  const int64_t ldt = row_stride(s.keys);
  std::vector<float> kt(panels_size(s.keys, D)), scores(kBlockRows * ldt);
  float inv[kBlockRows];
  for (int b = 0; b < s.batch; ++b) {
    for (int kv = 0; kv < s.kv_heads; ++kv) {
      const int64_t kv_row = static_cast<int64_t>(b) * s.kv_heads + kv;
      const float* vh = v + kv_row * s.keys * D;
      transpose_keys(k + kv_row * s.keys * D, s.keys, D, kt.data());
      for (int g = 0; g < s.group(); ++g) {
        const int64_t head = static_cast<int64_t>(b) * s.heads + kv * s.group() + g;
        for (int i0 = 0; i0 < s.queries; i0 += kBlockRows) {
          int rows = std::min(kBlockRows, s.queries - i0);
          Spans spans = block_spans(m, b, i0, rows);
          const float* q0 = q + (head * s.queries + i0) * D;
          for (int c = 0; c < spans.count; ++c) {
            score_rows(q0, D, rows, kt.data(), D, spans.span[c].lo, spans.span[c].hi + 1, scores.data(), ldt);
          }
          for (int r = 0; r < rows; ++r) {
            Range first, second;
            m.ranges(b, i0 + r, first, second);
            int64_t row = head * s.queries + i0 + r;
            total[row] = exp_row(scores.data() + r * ldt, spans, first, second, top[row]);
            inv[r] = 1.0f / total[row];
          }
          product_rows<D>(scores.data(), ldt, rows, spans, vh, out + (head * s.queries + i0) * D, inv);
        }
      }
    }
  }
}

// For the backward, per tile of (up to) kTileRows rows x kTileCols keys and in cache: the weights
// W = exp(S - row max) recomputed from the scores, masked, and dS = W (dP - rowdot) from the tile
// of dP = dO V^T, written to `weights` and `d_scores` (ld rows) at the tile's columns.
struct BackwardRows {
  const float* top;      // row max of each row
  const float* row_dot;  // rowsum(dO * O) / l of each row
  const Range* first;    // the keys each row sees
  const Range* second;
};

void backward_tiles(const float* q, const float* d_out_scaled, int depth, int rows, const float* kt,
                    const float* vt, int64_t ldt, int c0, int c1, const BackwardRows& r, float* weights,
                    float* d_scores) {
  alignas(64) float s_tile[kTileRows * kTileCols], p_tile[kTileRows * kTileCols];
  for (int r0 = 0; r0 < rows; r0 += kTileRows) {
    const int n = std::min(kTileRows, rows - r0);
    for (int c = c0 / kTileCols * kTileCols; c < c1; c += kTileCols) {  // whole panels, as score_rows
      const int width = std::min(kTileCols, c1 - c);
      score_rows(q + r0 * depth, depth, n, panel(kt, depth, c), depth, 0, kTileCols, s_tile, kTileCols);
      score_rows(d_out_scaled + r0 * depth, depth, n, panel(vt, depth, c), depth, 0, kTileCols, p_tile, kTileCols);
      for (int i = 0; i < n; ++i) {
        const int row = r0 + i;
        const float t = r.top[row], rd = r.row_dot[row];
        const int a_lo = r.first[row].lo - c, a_hi = r.first[row].hi - c;  // tile-relative: the loop vectorises
        const int b_lo = r.second[row].lo - c, b_hi = r.second[row].hi - c;
        const float* st = s_tile + i * kTileCols;
        const float* pt = p_tile + i * kTileCols;
        float* w = weights + row * ldt + c;
        float* ds = d_scores + row * ldt + c;
        if ((a_lo <= 0 && width - 1 <= a_hi) || (b_lo <= 0 && width - 1 <= b_hi)) {  // all seen: no masks
#pragma omp simd
          for (int j = 0; j < width; ++j) {
            float x = st[j] - t;
            float e = exp_nonpositive(x < 0.0f ? x : 0.0f);  // the forward's maximum, recomputed scores
            w[j] = e;
            ds[j] = e * (pt[j] - rd);
          }
          continue;
        }
#pragma omp simd
        for (int j = 0; j < width; ++j) {
          float x = st[j] - t;
          float e = exp_nonpositive(x < 0.0f ? x : 0.0f);  // masked keys may score above the maximum
          int seen = ((j >= a_lo) & (j <= a_hi)) | ((j >= b_lo) & (j <= b_hi));
          e = seen ? e : 0.0f;
          w[j] = e;
          ds[j] = e * (pt[j] - rd);
        }
      }
    }
  }
}

// Keys per pass of the backward: what a pass touches (these keys' columns of K^T and V^T, their
// rows of dK and dV, the blocks' weights and dS) stays within a core's L2 cache (~0.7 MB here). With
// all of 1846 keys at once it did not, and the backward ran no faster than its L3 traffic allowed.
constexpr int kKeyChunk = 512;

// The backward goes a block of query rows at a time for all heads that share a kv head together
// (grouped-query attention): their rows are stacked, so that the key and value gradients'
// register tiles run over group x kBlockRows rows per load and store of their accumulators. Keys
// go kKeyChunk at a time (outer loop); dQ adds up over them.
template <int D>
void attention_backward(const Shapes& s, const Mask& m, const float* q, const float* k, const float* v,
                        const float* out, const float* top, const float* total, const float* d_out, float* d_q,
                        float* d_k, float* d_v) {
  const int64_t ldt = row_stride(s.keys);
  const int group = s.group(), stacked = group * kBlockRows;
  std::vector<float> kt(panels_size(s.keys, D)), vt(panels_size(s.keys, D)), weights(stacked * ldt),
      d_scores(stacked * ldt);
  std::vector<float> q_rows(stacked * D), d_out_scaled(stacked * D), row_top(stacked), row_dot(stacked);
  std::vector<Range> first(stacked), second(stacked);
  std::fill(d_k, d_k + static_cast<int64_t>(s.batch) * s.kv_heads * s.keys * D, 0.0f);
  std::fill(d_v, d_v + static_cast<int64_t>(s.batch) * s.kv_heads * s.keys * D, 0.0f);
  std::fill(d_q, d_q + static_cast<int64_t>(s.batch) * s.heads * s.queries * D, 0.0f);
  for (int b = 0; b < s.batch; ++b) {
    for (int kv = 0; kv < s.kv_heads; ++kv) {
      const int64_t kv_row = static_cast<int64_t>(b) * s.kv_heads + kv;
      const float* kh = k + kv_row * s.keys * D;
      transpose_keys(kh, s.keys, D, kt.data());
      transpose_keys(v + kv_row * s.keys * D, s.keys, D, vt.data());
      float* dkh = d_k + kv_row * s.keys * D;
      float* dvh = d_v + kv_row * s.keys * D;
      for (int k0 = 0; k0 < s.keys; k0 += kKeyChunk) {
        for (int i0 = 0; i0 < s.queries; i0 += kBlockRows) {
          const int rows = std::min(kBlockRows, s.queries - i0);
          // the mask is the same for every head
          const Spans spans = clipped(block_spans(m, b, i0, rows), k0, std::min(k0 + kKeyChunk, s.keys) - 1);
          if (spans.count == 0) {
            continue;
          }
          for (int g = 0; g < group; ++g) {
            const int64_t row0 = (static_cast<int64_t>(b) * s.heads + kv * group + g) * s.queries + i0;
            const int at = g * rows;  // this head's rows in the stack
            std::memcpy(q_rows.data() + at * D, q + row0 * D, sizeof(float) * rows * D);
            // With P = W / l: dS = P * (dO V^T - rowsum(dO * O)); 1 / l folded into dO.
            for (int r = 0; r < rows; ++r) {
              const float scale = 1.0f / total[row0 + r];
              const float* o_r = out + (row0 + r) * D;
              const float* do_r = d_out + (row0 + r) * D;
              float* dos_r = d_out_scaled.data() + (at + r) * D;
              float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
              for (int d = 0; d < D; ++d) {
                dos_r[d] = do_r[d] * scale;
                dot += dos_r[d] * o_r[d];
              }
              row_dot[at + r] = dot;
              row_top[at + r] = top[row0 + r];
              m.ranges(b, i0 + r, first[at + r], second[at + r]);
            }
          }
          const int all = group * rows;
          const BackwardRows info{row_top.data(), row_dot.data(), first.data(), second.data()};
          for (int c = 0; c < spans.count; ++c) {  // W again from the scores (nothing kept), and dS
            backward_tiles(q_rows.data(), d_out_scaled.data(), D, all, kt.data(), vt.data(), ldt, spans.span[c].lo,
                           spans.span[c].hi + 1, info, weights.data(), d_scores.data());
          }
          for (int g = 0; g < group; ++g) {  // dQ = dS K, head by head
            const int64_t row0 = (static_cast<int64_t>(b) * s.heads + kv * group + g) * s.queries + i0;
            product_rows<D>(d_scores.data() + g * rows * ldt, ldt, rows, spans, kh, d_q + row0 * D, nullptr, true);
          }
          transposed_rows<D>(d_scores.data(), ldt, all, spans, q_rows.data(), dkh);       // dK += dS^T Q
          transposed_rows<D>(weights.data(), ldt, all, spans, d_out_scaled.data(), dvh);  // dV += P^T dO
        }
      }
    }
  }
}

template <typename F>
void by_size(int d, F&& f) {
  switch (d) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: throw std::invalid_argument("causal attention: head size must be 32, 64 or 128");
  }
}

Shapes shapes_of(const mx::array& q, const mx::array& k) {
  return Shapes{static_cast<int>(q.shape(0)), static_cast<int>(q.shape(1)), static_cast<int>(k.shape(1)),
                static_cast<int>(q.shape(2)), static_cast<int>(k.shape(2))};
}

struct MaskParams {
  int offset, prompt, split;
  bool operator==(const MaskParams& o) const {
    return offset == o.offset && prompt == o.prompt && split == o.split;
  }
};

Mask mask_of(const Shapes& s, const mx::array& left_pad, const MaskParams& p) {
  return Mask{s.keys, p.offset, p.prompt, p.split, left_pad.data<int32_t>()};
}

class AttentionPrimitive : public CpuPrimitive {
 public:
  AttentionPrimitive(mx::Stream stream, MaskParams mask) : CpuPrimitive(stream), mask_(mask) {}

 protected:
  bool same_parameters(const mx::Primitive& other) const override {
    return static_cast<const AttentionPrimitive&>(other).mask_ == mask_;
  }

  MaskParams mask_;
};

// inputs: q, k, v, left_pad; outputs: out (B, H, T, D), row max and row sum of the scores (B, H, T, 1)
class CausalAttention : public AttentionPrimitive {
 public:
  using AttentionPrimitive::AttentionPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    for (auto& o : outputs) {
      allocate(o);
    }
    const auto& q = in[0];
    Shapes s = shapes_of(q, in[1]);
    int d = static_cast<int>(q.shape(3));
    encoder_for(inputs, outputs).dispatch([s, d, m = mask_of(s, in[3], mask_), q = q.data<float>(),
                                           k = in[1].data<float>(), v = in[2].data<float>(),
                                           out = outputs[0].data<float>(), top = outputs[1].data<float>(),
                                           total = outputs[2].data<float>()]() {
      by_size(d, [&](auto size) { attention_forward<decltype(size)::value>(s, m, q, k, v, out, top, total); });
    });
  }

  const char* name() const override { return "CausalAttention"; }
};

// inputs: q, k, v, out, row max, row sum, d_out, left_pad; outputs: d_q, d_k, d_v
class CausalAttentionGrad : public AttentionPrimitive {
 public:
  using AttentionPrimitive::AttentionPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    allocate(outputs[0]);  // not d_out's buffer: every key chunk reads d_out again after writing d_q
    allocate(outputs[1]);
    allocate(outputs[2]);
    const auto& q = in[0];
    Shapes s = shapes_of(q, in[1]);
    int d = static_cast<int>(q.shape(3));
    encoder_for(inputs, outputs).dispatch(
        [s, d, m = mask_of(s, in[7], mask_), q = q.data<float>(), k = in[1].data<float>(),
         v = in[2].data<float>(), out = in[3].data<float>(), top = in[4].data<float>(),
         total = in[5].data<float>(), d_out = in[6].data<float>(), d_q = outputs[0].data<float>(),
         d_k = outputs[1].data<float>(), d_v = outputs[2].data<float>()]() {
          by_size(d, [&](auto size) {
            attention_backward<decltype(size)::value>(s, m, q, k, v, out, top, total, d_out, d_q, d_k, d_v);
          });
        });
  }

  const char* name() const override { return "CausalAttentionGrad"; }
};

void check_attention(const mx::array& q, const mx::array& k, const mx::array& v) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || k.shape(0) != q.shape(0) ||
      k.shape(3) != q.shape(3) || k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0) {
    throw std::invalid_argument(
        "causal attention: q (batch, heads, T, D), k and v (batch, kv heads, S, D), heads a multiple of kv heads");
  }
  by_size(static_cast<int>(q.shape(3)), [](auto) {});  // throws for a head size without kernels
}

MaskParams mask_params(int offset, int prompt, int split) {
  if (prompt > split) {
    throw std::invalid_argument("causal attention: prompt must not pass split");
  }
  return MaskParams{offset, prompt, split};
}

std::tuple<mx::array, mx::array, mx::array> causal_attention(const mx::array& q, const mx::array& k,
                                                             const mx::array& v, const mx::array& left_pad,
                                                             int offset, int prompt, int split) {
  check_attention(q, k, v);
  auto outs = mx::array::make_arrays(
      {q.shape(), row_shape(q), row_shape(q)}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<CausalAttention>(cpu_stream(), mask_params(offset, prompt, split)),
      {float_input(q, "q"), float_input(k, "k"), float_input(v, "v"), left_pads(left_pad, q.shape(0))});
  return {outs[0], outs[1], outs[2]};
}

std::tuple<mx::array, mx::array, mx::array> causal_attention_grad(
    const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& out, const mx::array& top,
    const mx::array& total, const mx::array& d_out, const mx::array& left_pad, int offset, int prompt, int split) {
  check_attention(q, k, v);
  auto outs = mx::array::make_arrays(
      {q.shape(), k.shape(), v.shape()}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<CausalAttentionGrad>(cpu_stream(), mask_params(offset, prompt, split)),
      {float_input(q, "q"), float_input(k, "k"), float_input(v, "v"), float_input(out, "out"), float_input(top, "top"),
       float_input(total, "total"), float_input(d_out, "d_out"), left_pads(left_pad, q.shape(0))});
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

void add_causal_attention(nb::module_& m) {
  m.def("causal_attention", &causal_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("left_pad"),
        nb::arg("offset"), nb::arg("prompt"), nb::arg("split"),
        "(softmax attention output, row max and row sum of the scores) of already-scaled q (batch, heads, T, D) "
        "against k, v (batch, kv heads, S, D). Query i sees keys left_pad[b]..i + offset (only itself inside the "
        "padding); from row `split` on (a shared prompt's rejected part) it sees the keys left_pad[b]..prompt - 1 "
        "and split..i + offset instead. split >= T: plain causal.");
  m.def("causal_attention_grad", &causal_attention_grad, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"),
        nb::arg("top"), nb::arg("total"), nb::arg("d_out"), nb::arg("left_pad"), nb::arg("offset"), nb::arg("prompt"),
        nb::arg("split"),
        "(d_q, d_k, d_v) of causal_attention, recomputing its weights from q, k and the forward's row max and sum.");
}

}  // namespace mlx_dpo
