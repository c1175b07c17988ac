// Mainloop of the fused ARMOR GEMM: CUTLASS's sm90 2:4 sparse collective (TMA loads, warp-specialised
// producer/consumers, sparse wgmma = HGMMA.SP in SASS), plus the compressor that writes S in the
// values + metadata layout this mainloop reads.
//
// Operands (see armor_cuda.h): A = S (d_out x d_in, row-major = K-major, 2:4 along K), B = xb = x B'^T
// (tokens x d_in, row-major = K-major, "ColumnMajor" in CUTLASS's K x N naming), fp32 accumulation.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace armor::sm90 {

using ProblemShape = cute::Shape<int, int, int, int>;  // (M, N, K, L) = (d_out, tokens, d_in, 1)

// 128 rows of the accumulator tile = one 128 x 128 block of A', which the epilogue applies. 128 along
// K is the sparse instruction's natural step (64 stored values per row), 128 tokens along N.
using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
// No clusters: multicast would share B tiles across M, but the epilogue's 64 KB of shared memory
// already limits the pipeline to a few stages; keep the launch a plain one.
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

template <class Element>
struct SparseMainloop {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA rows

  // `epilogue_smem_bytes` is carved out of shared memory before the stage count is chosen.
  // clang-format off
  template <int epilogue_smem_bytes>
  using Collective = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Element, cutlass::layout::RowMajor, kAlignment,
      Element, cutlass::layout::ColumnMajor, kAlignment,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<epilogue_smem_bytes>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  // clang-format on
};

// One-time compressor, dense S -> (values, metadata) in the layout described by the mainloop's
// SparseConfig. The compressed layout does not depend on the stage count, only on the element type and
// the MMA, so any carve-out gives the same SparseConfig.
template <class Collective>
struct Compressor {
  using Element = typename Collective::ElementA;
  using SparseConfig = typename Collective::SparseConfig;
  using StrideS = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;
  // clang-format off
  using Utility = cutlass::transform::kernel::StructuredSparseCompressorUtility<
      ProblemShape, Element, cutlass::layout::RowMajor, SparseConfig>;
  using Kernel = cutlass::transform::kernel::StructuredSparseCompressor<
      ProblemShape, Element, cutlass::layout::RowMajor, SparseConfig, cutlass::arch::Sm90>;
  // clang-format on
  using Device = cutlass::transform::device::TransformUniversalAdapter<Kernel>;

  static StrideS stride(int M, int K) { return cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(M, K, 1)); }
  static Utility utility(int M, int K) { return Utility(ProblemShape{M, 1, K, 1}, stride(M, K)); }
};

}  // namespace armor::sm90
