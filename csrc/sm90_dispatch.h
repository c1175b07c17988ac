// Per-dtype entry points, one heavy translation unit each (one CUTLASS GEMM instantiation per file
// keeps a TU near 2.5 min / 5 GB of nvcc, so two compile side by side on a 2-core, 24 GB machine).
// Torch- and CUTLASS-free so that api.cpp stays a plain C++ file.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace armor::sm90 {

#define ARMOR_DECLARE_DTYPE(SUFFIX)                                                                          \
  int compressed_sizes_##SUFFIX(int64_t d_out, int64_t d_in, int64_t* values_numel, int64_t* meta_bytes);    \
  int compress_##SUFFIX(void const* S, int64_t d_out, int64_t d_in, void* values, void* meta,                \
                        cudaStream_t stream);                                                                \
  int sparse_linear_out_##SUFFIX(void const* xb, void const* values, void const* meta, void const* A_blocks, \
                                 void const* bias, void* y, int64_t tokens, int64_t d_in, int64_t d_out,     \
                                 int sm_count, cudaStream_t stream);                                         \
  int block_diag_##SUFFIX(void const* x, void const* B_blocks, void* xb, int64_t tokens, int64_t dim,        \
                          int sm_count, cudaStream_t stream);                                        \
  int decode_linear_##SUFFIX(void const* x, void const* B_blocks, void const* S_values, void const* S_idx,   \
                             void const* A_blocks, void const* bias, void* workspace, void* y, int64_t tokens, \
                             int64_t d_in, int64_t d_out, int sm_count, cudaStream_t stream);

ARMOR_DECLARE_DTYPE(bf16)
ARMOR_DECLARE_DTYPE(fp16)
#undef ARMOR_DECLARE_DTYPE

}  // namespace armor::sm90
