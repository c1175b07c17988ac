// Decode-sized ARMOR linear (sm90_decode.cuh), both dtypes: no CUTLASS collectives, a light TU.
#include "sm90_decode.cuh"
#include "sm90_dispatch.h"

namespace armor::sm90 {

int decode_linear_bf16(void const* x, void const* B_blocks, void const* S_values, void const* S_idx,
                       void const* A_blocks, void const* bias, void* workspace, void* y, int64_t tokens, int64_t d_in,
                       int64_t d_out, int sm_count, cudaStream_t stream) {
  return decode_linear<cutlass::bfloat16_t>(x, B_blocks, S_values, S_idx, A_blocks, bias, workspace, y, tokens, d_in,
                                            d_out, sm_count, stream);
}
int decode_linear_fp16(void const* x, void const* B_blocks, void const* S_values, void const* S_idx,
                       void const* A_blocks, void const* bias, void* workspace, void* y, int64_t tokens, int64_t d_in,
                       int64_t d_out, int sm_count, cudaStream_t stream) {
  return decode_linear<cutlass::half_t>(x, B_blocks, S_values, S_idx, A_blocks, bias, workspace, y, tokens, d_in,
                                        d_out, sm_count, stream);
}

}  // namespace armor::sm90
