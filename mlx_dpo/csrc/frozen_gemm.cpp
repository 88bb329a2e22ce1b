// LoRA's frozen products, y = c + x W^T and dx = c + dy W, on weights packed once per run.
//
// OpenBLAS packs both operands of every product it is given. In a LoRA step the operand it packs
// per call that never changes is the frozen weight: at seq 256 that packing (its `itcopy` and
// `incopy`) held 9-11% of the step's CPU samples (docs/benchmarks.md, sessions 20-21). Here the
// weight is packed once, by OpenBLAS's own copy routine, into the panels its micro-kernel reads,
// and each product packs only x and calls that micro-kernel, which adds alpha A B into C.
//
// Distributions build OpenBLAS with DYNAMIC_ARCH, which exports every core's kernels by name
// (sgemm_kernel_SKYLAKEX, sgemm_incopy_HASWELL, ...); a single-target build exports them without
// the suffix. They are looked up at run time in the OpenBLAS that mlx-dpo loaded for MLX
// (hardware.py); where any is missing, or OpenBLAS runs more than one thread per call (it then
// splits each product itself), or the panels were made from another buffer than the weight given,
// a product is plain `cblas_sgemm` (beta = 1), as MLX's addmm would run it.
//
// Panels: a header of kHeader floats (the source buffer's address, rows, depth, the layout), then
// blocks of (kDepthBlock deep x kRowBlock rows), depth-major, each as OpenBLAS's level-3 driver
// packs op(A): `incopy` for the forward (op(A) = W, OpenBLAS's TN case), `itcopy` for the input
// gradient (op(A) = W^T, its NN case). Block sizes: scripts/probe_openblas_prepacked.cpp.
#include <dlfcn.h>

#include <atomic>
#include <cctype>
#include <limits>
#include <memory>

#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include "common.h"

namespace mlx_dpo {

namespace {

using blaslong = long;
using KernelFn = int (*)(blaslong m, blaslong n, blaslong k, float alpha, float* a, float* b, float* c, blaslong ldc);
using CopyFn = int (*)(blaslong m, blaslong n, const float* a, blaslong lda, float* b);
using GemmFn = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                        const float* b, int ldb, float beta, float* c, int ldc);
using ThreadsFn = int (*)();
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

constexpr int kDepthBlock = 384, kRowBlock = 192, kColBlock = 768;
constexpr int kHeader = 16;  // floats before the first block (64 bytes: the blocks stay aligned)

struct OpenBlas {
  KernelFn kernel = nullptr;
  CopyFn incopy = nullptr, itcopy = nullptr, oncopy = nullptr;
  GemmFn gemm = nullptr;
  ThreadsFn threads = nullptr;
  std::string core;
};

void* symbol(void* library, const std::string& name) { return dlsym(library, name.c_str()); }

// OpenBLAS's entry points, from the library that exports `openblas_get_corename` (null members
// where it is not there or lacks them).
const OpenBlas& openblas() {
  static const OpenBlas found = [] {
    OpenBlas o;
    void* corename = dlsym(RTLD_DEFAULT, "openblas_get_corename");
    Dl_info info;
    if (corename == nullptr || dladdr(corename, &info) == 0) {
      return o;
    }
    void* library = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);  // already loaded: a handle, no load
    if (library == nullptr) {
      return o;
    }
    o.core = reinterpret_cast<const char* (*)()>(corename)();
    std::string suffix = "_" + o.core;
    for (auto& ch : suffix) {
      ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    }
    for (const std::string& s : {suffix, std::string()}) {
      o.kernel = reinterpret_cast<KernelFn>(symbol(library, "sgemm_kernel" + s));
      o.incopy = reinterpret_cast<CopyFn>(symbol(library, "sgemm_incopy" + s));
      o.itcopy = reinterpret_cast<CopyFn>(symbol(library, "sgemm_itcopy" + s));
      o.oncopy = reinterpret_cast<CopyFn>(symbol(library, "sgemm_oncopy" + s));
      if (o.kernel && o.incopy && o.itcopy && o.oncopy) {
        break;
      }
      o.kernel = nullptr;
    }
    o.gemm = reinterpret_cast<GemmFn>(symbol(library, "cblas_sgemm"));
    o.threads = reinterpret_cast<ThreadsFn>(symbol(library, "openblas_get_num_threads"));
    return o;
  }();
  return found;
}

// Products run on panels and products that fell back to cblas_sgemm (the tests read them: a
// fallback costs speed, never correctness).
std::atomic<int64_t> panel_products{0}, fallback_products{0};

bool packs() {
  const auto& o = openblas();
  return o.kernel != nullptr && o.gemm != nullptr && o.threads != nullptr;
}

// Where each block starts (after the header), for op(A) of `rows` x `depth`; the last entry is the size.
std::vector<int64_t> block_offsets(int64_t rows, int64_t depth) {
  std::vector<int64_t> offsets;
  int64_t at = kHeader;
  for (int64_t l = 0; l < depth; l += kDepthBlock) {
    for (int64_t i = 0; i < rows; i += kRowBlock) {
      offsets.push_back(at);
      at += std::min<int64_t>(kDepthBlock, depth - l) * ((std::min<int64_t>(kRowBlock, rows - i) + 15) / 16 * 16);
    }
  }
  offsets.push_back(at);
  return offsets;
}

// op(A)'s shape for W (out x in, row-major): W itself for the forward (rows out, depth in), W^T for
// the input gradient (rows in, depth out).
struct Shape {
  int64_t rows, depth;
};
Shape op_shape(int64_t out, int64_t in, bool forward) { return forward ? Shape{out, in} : Shape{in, out}; }

struct Header {
  uint64_t source;  // the weight buffer's address: panels are only used with that buffer
  int64_t rows, depth, forward;
};
static_assert(sizeof(Header) <= kHeader * sizeof(float));

// W (out x in, row-major) packed as op(A) (op_shape).
void pack_panels(const float* w, int64_t out, int64_t in, bool forward, float* panels) {
  const auto& o = openblas();
  auto [rows, depth] = op_shape(out, in, forward);
  Header header{reinterpret_cast<uint64_t>(w), rows, depth, forward};
  std::memset(panels, 0, kHeader * sizeof(float));
  std::memcpy(panels, &header, sizeof(header));
  auto offsets = block_offsets(rows, depth);
  size_t b = 0;
  for (int64_t l = 0; l < depth; l += kDepthBlock) {
    for (int64_t i = 0; i < rows; i += kRowBlock, ++b) {
      int64_t ml = std::min<int64_t>(kDepthBlock, depth - l), mi = std::min<int64_t>(kRowBlock, rows - i);
      if (forward) {
        o.incopy(ml, mi, w + l + i * in, in, panels + offsets[b]);
      } else {
        o.itcopy(ml, mi, w + i + l * in, in, panels + offsets[b]);
      }
    }
  }
}

// out (tokens x rows, row-major, holding c) += x (tokens x depth) op(A)^T, op(A) from the panels.
void panel_product(const float* panels, const float* x, int64_t tokens, float* out) {
  const auto& o = openblas();
  Header h;
  std::memcpy(&h, panels, sizeof(h));
  auto offsets = block_offsets(h.rows, h.depth);
  thread_local std::vector<float> x_panel;  // x's packed block, per CPU stream
  x_panel.resize(static_cast<size_t>(kDepthBlock) * (kColBlock + 4));
  for (int64_t j = 0; j < tokens; j += kColBlock) {
    int64_t nj = std::min<int64_t>(kColBlock, tokens - j);
    size_t b = 0;
    for (int64_t l = 0; l < h.depth; l += kDepthBlock) {
      int64_t ml = std::min<int64_t>(kDepthBlock, h.depth - l);
      o.oncopy(ml, nj, x + l + j * h.depth, h.depth, x_panel.data());
      for (int64_t i = 0; i < h.rows; i += kRowBlock, ++b) {
        int64_t mi = std::min<int64_t>(kRowBlock, h.rows - i);
        o.kernel(mi, nj, ml, 1.0f, const_cast<float*>(panels + offsets[b]), x_panel.data(), out + i + j * h.rows,
                 h.rows);
      }
    }
  }
}

// A primitive for one of the two products, the forward's or the input gradient's: equal (for
// mx.compile) to another of its kind for the same product.
class ProductPrimitive : public CpuPrimitive {
 public:
  ProductPrimitive(mx::Stream stream, bool forward) : CpuPrimitive(stream), forward_(forward) {}

 protected:
  bool same_parameters(const mx::Primitive& other) const override {
    return static_cast<const ProductPrimitive&>(other).forward_ == forward_;  // same type: is_equivalent checked
  }

  bool forward_;
};

// inputs: w (out x in); output: its panels for one product's layout
class PackFrozen : public ProductPrimitive {
 public:
  using ProductPrimitive::ProductPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    allocate(outputs[0]);
    encoder_for(inputs, outputs).dispatch([w = in[0].data<float>(), out = in[0].shape(0), in_ = in[0].shape(1),
                                           forward = forward_, panels = outputs[0].data<float>()]() {
      pack_panels(w, out, in_, forward, panels);
    });
  }

  const char* name() const override { return "PackFrozen"; }
};

// inputs: c (tokens x rows), x (tokens x depth), w (out x in), panels; output: c + x op(A)^T
class FrozenAddmm : public ProductPrimitive {
 public:
  using ProductPrimitive::ProductPrimitive;

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto in = readable(inputs, outputs);
    auto& out = outputs[0];
    reuse_or_allocate(out, in[0]);
    int64_t tokens = in[1].shape(0), in_dim = in[2].shape(1);
    auto [rows, depth] = op_shape(in[2].shape(0), in_dim, forward_);
    // The panels' header is read in the kernel: until then the packing may still be queued.
    encoder_for(inputs, outputs).dispatch([c = in[0].data<float>(), x = in[1].data<float>(), w = in[2].data<float>(),
                                           panels = in[3].data<float>(), y = out.data<float>(), tokens, rows, depth,
                                           in_dim, forward = forward_]() {
      if (y != c) {
        std::memcpy(y, c, static_cast<size_t>(tokens * rows) * sizeof(float));
      }
      if (tokens == 0) {
        return;
      }
      Header h;
      std::memcpy(&h, panels, sizeof(h));
      const auto& o = openblas();
      if (packs() && o.threads() == 1 && h.source == reinterpret_cast<uint64_t>(w) && (h.forward != 0) == forward) {
        panel_product(panels, x, tokens, y);
        panel_products.fetch_add(1, std::memory_order_relaxed);
      } else {
        fallback_products.fetch_add(1, std::memory_order_relaxed);
        o.gemm(kRowMajor, kNoTrans, forward ? kTrans : kNoTrans, static_cast<int>(tokens), static_cast<int>(rows),
               static_cast<int>(depth), 1.0f, x, static_cast<int>(depth), w, static_cast<int>(in_dim), 1.0f, y,
               static_cast<int>(rows));
      }
    });
  }

  const char* name() const override { return "FrozenAddmm"; }
};

void check_weight(const mx::array& w) {
  if (w.ndim() != 2) {
    throw std::invalid_argument("frozen weight: (out, in)");
  }
  if (!packs()) {
    throw std::runtime_error("frozen panels: OpenBLAS's kernels for this CPU are not loaded");
  }
}

mx::array pack_frozen(const mx::array& w, bool forward) {
  check_weight(w);
  auto [rows, depth] = op_shape(w.shape(0), w.shape(1), forward);
  int64_t size = block_offsets(rows, depth).back();
  if (size > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("frozen panels: weight too large");
  }
  return mx::array({static_cast<int>(size)}, mx::float32, std::make_shared<PackFrozen>(cpu_stream(), forward),
                   {float_input(w, "w")});
}

mx::array frozen_addmm(const mx::array& c, const mx::array& x, const mx::array& w, const mx::array& panels,
                       bool forward) {
  check_weight(w);
  auto [rows, depth] = op_shape(w.shape(0), w.shape(1), forward);
  if (x.ndim() != 2 || x.shape(1) != depth || c.ndim() != 2 || c.shape(0) != x.shape(0) || c.shape(1) != rows) {
    throw std::invalid_argument("frozen_addmm: c (tokens, rows) and x (tokens, depth) for w's product");
  }
  if (panels.ndim() != 1 || panels.size() != static_cast<size_t>(block_offsets(rows, depth).back())) {
    throw std::invalid_argument("frozen_addmm: panels made for another weight shape or product");
  }
  return mx::array(c.shape(), mx::float32, std::make_shared<FrozenAddmm>(cpu_stream(), forward),
                   {float_input(c, "c"), float_input(x, "x"), float_input(w, "w"), float_input(panels, "panels")});
}

std::string kernels_found() {
  const auto& o = openblas();
  if (o.gemm == nullptr) {
    return "";
  }
  return o.kernel ? o.core : "";
}

}  // namespace

void add_frozen_gemm(nb::module_& m) {
  m.def("frozen_kernels", &kernels_found,
        "The OpenBLAS core whose micro-kernel and copy routines frozen_addmm calls ('' where they are not found).");
  m.def("frozen_counts", [] { return std::make_tuple(panel_products.load(), fallback_products.load()); },
        "(products run on panels, products that fell back to cblas_sgemm) since the module loaded.");
  m.def("pack_frozen", &pack_frozen, nb::arg("w"), nb::arg("forward"),
        "w (out, in) packed for frozen_addmm: forward=True for x @ w.T, False for dy @ w.");
  m.def("frozen_addmm", &frozen_addmm, nb::arg("c"), nb::arg("x"), nb::arg("w"), nb::arg("panels"), nb::arg("forward"),
        "c + x @ w.T (forward) or c + x @ w, on panels = pack_frozen(w, forward); plain cblas_sgemm where the "
        "panels are not w's or OpenBLAS runs more than one thread.");
}

}  // namespace mlx_dpo
