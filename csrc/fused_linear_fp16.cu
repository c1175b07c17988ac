// Fused sparse GEMM + A' epilogue and the compressor, fp16 instantiation.
#include "sm90_dispatch.h"
#include "sm90_fused_linear.cuh"

namespace armor::sm90 {

using Element = cutlass::half_t;

int compressed_sizes_fp16(int64_t d_out, int64_t d_in, int64_t* values_numel, int64_t* meta_bytes) {
  return compressed_sizes<Element>(d_out, d_in, values_numel, meta_bytes);
}
int compress_fp16(void const* S, int64_t d_out, int64_t d_in, void* values, void* meta, cudaStream_t stream) {
  return compress<Element>(S, d_out, d_in, values, meta, stream);
}
int sparse_linear_out_fp16(ArmorLinearParams const& p) { return sparse_linear_out<Element>(p); }

}  // namespace armor::sm90
