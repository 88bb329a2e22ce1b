// The Python module of mlx-dpo's CPU kernels (mlx_dpo/native.py builds it on first use).
#include "common.h"
#include "simd.h"

NB_MODULE(_native, m) {
  m.doc() = "mlx-dpo's fused CPU kernels (built on first use by mlx_dpo.native)";
#if defined(MLX_DPO_SIMD_TILES)
  m.attr("vector_tiles") = mlx_dpo::simd::kName;
#else
  m.attr("vector_tiles") = "plain C++";
#endif
  mlx_dpo::add_attention_kernels(m);
  mlx_dpo::add_causal_attention(m);
  mlx_dpo::add_layer_kernels(m);
  mlx_dpo::add_lora_kernels(m);
  mlx_dpo::add_frozen_gemm(m);
  mlx_dpo::add_optimizer_kernels(m);
}
