// The C API of armor_cuda.h: argument checks and dtype dispatch. Plain C++ (no CUTLASS, no torch).
#include <cstdint>

#include "armor_cuda.h"
#include "decode_fragments.h"
#include "sm90_dispatch.h"

namespace {

bool aligned16(void const* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// GEMM extents are 32-bit in the kernels; tokens * d_in and friends are 64-bit pointer offsets.
bool fits_int(int64_t v) { return v > 0 && v <= INT32_MAX; }

}  // namespace

extern "C" {

const char* armor_status_string(int status) {
  switch (status) {
    case ARMOR_OK: return "ok";
    case ARMOR_ERROR_DTYPE: return "unsupported dtype (expected bf16 or fp16)";
    case ARMOR_ERROR_SHAPE: return "unsupported shape (d_out and d_in must be positive multiples of 128, tokens > 0)";
    case ARMOR_ERROR_ALIGNMENT: return "a tensor's data pointer is not 16-byte aligned";
    case ARMOR_ERROR_CUTLASS: return "CUTLASS refused the problem (can_implement)";
    case ARMOR_ERROR_LAUNCH: return "CUDA kernel launch failed";
    case ARMOR_ERROR_ARGUMENT: return "invalid argument (sm_count must be positive, decode tokens at most 16)";
    default: return "unknown armor status";
  }
}

int armor_sm90_supported(int64_t d_out, int64_t d_in) {
  return fits_int(d_out) && fits_int(d_in) && d_out % ARMOR_SM90_BLOCK == 0 && d_in % ARMOR_SM90_BLOCK == 0
             ? ARMOR_OK
             : ARMOR_ERROR_SHAPE;
}

int armor_sm90_compressed_sizes(int dtype, int64_t d_out, int64_t d_in, int64_t* values_numel, int64_t* meta_bytes) {
  if (int s = armor_sm90_supported(d_out, d_in)) return s;
  switch (dtype) {
    case ARMOR_BF16: return armor::sm90::compressed_sizes_bf16(d_out, d_in, values_numel, meta_bytes);
    case ARMOR_FP16: return armor::sm90::compressed_sizes_fp16(d_out, d_in, values_numel, meta_bytes);
    default: return ARMOR_ERROR_DTYPE;
  }
}

int armor_sm90_compress(int dtype, const void* S, int64_t d_out, int64_t d_in, void* values, void* meta,
                        cudaStream_t stream) {
  if (int s = armor_sm90_supported(d_out, d_in)) return s;
  if (!aligned16(S) || !aligned16(values) || !aligned16(meta)) return ARMOR_ERROR_ALIGNMENT;
  switch (dtype) {
    case ARMOR_BF16: return armor::sm90::compress_bf16(S, d_out, d_in, values, meta, stream);
    case ARMOR_FP16: return armor::sm90::compress_fp16(S, d_out, d_in, values, meta, stream);
    default: return ARMOR_ERROR_DTYPE;
  }
}

int armor_sm90_block_diag(int dtype, const void* x, const void* B_blocks, void* xb, int64_t tokens, int64_t dim,
                          int sm_count, cudaStream_t stream) {
  if (!fits_int(tokens) || armor_sm90_supported(dim, dim) != ARMOR_OK) return ARMOR_ERROR_SHAPE;
  if (!aligned16(x) || !aligned16(B_blocks) || !aligned16(xb)) return ARMOR_ERROR_ALIGNMENT;
  switch (dtype) {
    case ARMOR_BF16: return armor::sm90::block_diag_bf16(x, B_blocks, xb, tokens, dim, sm_count, stream);
    case ARMOR_FP16: return armor::sm90::block_diag_fp16(x, B_blocks, xb, tokens, dim, sm_count, stream);
    default: return ARMOR_ERROR_DTYPE;
  }
}

int armor_sm90_sparse_linear_out(int dtype, const void* xb, const void* values, const void* meta,
                                 const void* A_blocks, const void* bias, void* y, int64_t tokens, int64_t d_in,
                                 int64_t d_out, int sm_count, cudaStream_t stream) {
  if (!fits_int(tokens) || armor_sm90_supported(d_out, d_in) != ARMOR_OK) return ARMOR_ERROR_SHAPE;
  if (!aligned16(xb) || !aligned16(values) || !aligned16(meta) || !aligned16(A_blocks) || !aligned16(y)) {
    return ARMOR_ERROR_ALIGNMENT;
  }
  switch (dtype) {
    case ARMOR_BF16:
      return armor::sm90::sparse_linear_out_bf16(xb, values, meta, A_blocks, bias, y, tokens, d_in, d_out, sm_count,
                                                 stream);
    case ARMOR_FP16:
      return armor::sm90::sparse_linear_out_fp16(xb, values, meta, A_blocks, bias, y, tokens, d_in, d_out, sm_count,
                                                 stream);
    default: return ARMOR_ERROR_DTYPE;
  }
}

int armor_sm90_linear(int dtype, const void* x, const void* B_blocks, const void* values, const void* meta,
                      const void* A_blocks, const void* bias, void* workspace, void* y, int64_t tokens, int64_t d_in,
                      int64_t d_out, int sm_count, cudaStream_t stream) {
  if (int s = armor_sm90_block_diag(dtype, x, B_blocks, workspace, tokens, d_in, sm_count, stream)) return s;
  return armor_sm90_sparse_linear_out(dtype, workspace, values, meta, A_blocks, bias, y, tokens, d_in, d_out, sm_count,
                                      stream);
}

int armor_sm90_decode_workspace_bytes(int dtype, int64_t d_out, int64_t d_in, int64_t tokens, int sm_count,
                                      int64_t* bytes) {
  if (dtype != ARMOR_BF16 && dtype != ARMOR_FP16) return ARMOR_ERROR_DTYPE;
  if (!fits_int(tokens) || armor_sm90_supported(d_out, d_in) != ARMOR_OK) return ARMOR_ERROR_SHAPE;
  if (sm_count <= 0 || tokens > ARMOR_DECODE_MAX_TOKENS) return ARMOR_ERROR_ARGUMENT;
  *bytes = armor::decode::workspace_layout(d_out, d_in, tokens, 2, sm_count).bytes;
  return ARMOR_OK;
}

int armor_sm90_decode_linear(int dtype, const void* x, const void* B_blocks, const void* S_values, const void* S_idx,
                             const void* A_blocks, const void* bias, void* workspace, void* y, int64_t tokens,
                             int64_t d_in, int64_t d_out, int sm_count, cudaStream_t stream) {
  int64_t bytes = 0;
  if (int s = armor_sm90_decode_workspace_bytes(dtype, d_out, d_in, tokens, sm_count, &bytes)) return s;
  if (!aligned16(x) || !aligned16(B_blocks) || !aligned16(S_values) || !aligned16(S_idx) || !aligned16(A_blocks) ||
      !aligned16(workspace) || !aligned16(y)) {
    return ARMOR_ERROR_ALIGNMENT;
  }
  auto run = dtype == ARMOR_BF16 ? armor::sm90::decode_linear_bf16 : armor::sm90::decode_linear_fp16;
  return run(x, B_blocks, S_values, S_idx, A_blocks, bias, workspace, y, tokens, d_in, d_out, sm_count, stream);
}

}  // extern "C"
