// Block-diagonal input transform, fp16 instantiation.
#include "sm90_block_diag.cuh"
#include "sm90_dispatch.h"

namespace armor::sm90 {

int block_diag_fp16(ArmorLinearParams const& p) { return block_diag<cutlass::half_t>(p); }

}  // namespace armor::sm90
