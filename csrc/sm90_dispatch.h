// Per-dtype entry points behind the C API, one heavy translation unit each: one CUTLASS GEMM
// instantiation per file, so that two compile side by side (their compile cost: docs/DESIGN.md §9).
// Torch- and CUTLASS-free so that api.cpp stays a plain C++ file. The ArmorLinearParams they take
// are checked by api.cpp, with sm_count already resolved to a positive count.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "armor_cuda.h"

namespace armor::sm90 {

#define ARMOR_DECLARE_DTYPE(SUFFIX)                                                                                 \
  int compressed_sizes_##SUFFIX(int64_t d_out, int64_t d_in, int64_t* values_numel, int64_t* meta_bytes);           \
  int compress_##SUFFIX(void const* S, int64_t d_out, int64_t d_in, void* values, void* meta, cudaStream_t stream); \
  /* workspace = x B'^T (tokens x d_in) */                                                                          \
  int block_diag_##SUFFIX(ArmorLinearParams const& p);                                                              \
  /* y = (workspace S^T) A'^T + bias, S compressed */                                                               \
  int sparse_linear_out_##SUFFIX(ArmorLinearParams const& p);                                                       \
  /* the whole op at decode sizes, S packed */                                                                      \
  int decode_linear_##SUFFIX(ArmorLinearParams const& p);

ARMOR_DECLARE_DTYPE(bf16)
ARMOR_DECLARE_DTYPE(fp16)
#undef ARMOR_DECLARE_DTYPE

// Every kernel launch of the op records its grid here, right before launching with it (armor_last_launches).
void record_launch(dim3 const& grid);

}  // namespace armor::sm90
