// Block-diagonal input transform, bf16 instantiation.
#include "sm90_block_diag.cuh"
#include "sm90_dispatch.h"

namespace armor::sm90 {

int block_diag_bf16(ArmorLinearParams const& p) { return block_diag<cutlass::bfloat16_t>(p); }

}  // namespace armor::sm90
