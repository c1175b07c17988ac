// Block-diagonal input transform, fp16 instantiation.
#include "sm90_block_diag.cuh"
#include "sm90_dispatch.h"

namespace armor::sm90 {

int block_diag_fp16(void const* x, void const* B_blocks, void* xb, int64_t tokens, int64_t dim, int sm_count,
                cudaStream_t stream) {
  return block_diag<cutlass::half_t>(x, B_blocks, xb, tokens, dim, sm_count, stream);
}

}  // namespace armor::sm90
