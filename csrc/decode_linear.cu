// Decode-sized ARMOR linear (sm90_decode.cuh), both dtypes: no CUTLASS collectives, a light TU.
#include "sm90_decode.cuh"
#include "sm90_dispatch.h"

namespace armor::sm90 {

int decode_linear_bf16(ArmorLinearParams const& p) { return decode_linear<cutlass::bfloat16_t>(p); }
int decode_linear_fp16(ArmorLinearParams const& p) { return decode_linear<cutlass::half_t>(p); }

}  // namespace armor::sm90
