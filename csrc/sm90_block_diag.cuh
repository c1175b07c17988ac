// The input transform xb = x B'^T of the ARMOR op as one batched dense GEMM on the tensor cores
// (TMA + warp-specialised wgmma from CUTLASS's builders), batched over the 128-column blocks J of x:
//   M = tokens, N = K = 128, L = d_in / 128;  xb[:, J] = x[:, J] . B'_J^T.
// x and xb are addressed in place through strides (row stride d_in, batch stride 128): no copies.
#pragma once

#include "armor_cuda.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "sm90_scheduler.cuh"
#include "sm90_sparse_mainloop.cuh"

namespace armor::sm90 {

template <class Element>
struct BlockDiag {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;  // N = one whole block
  // clang-format off
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlign,  // no C operand
      Element, cutlass::layout::RowMajor, kAlign,
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlign,     // x_J: (tokens, 128), K-major
      Element, cutlass::layout::ColumnMajor, kAlign,  // B'_J as (N, K) row-major, K-major
      float, Tile, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          int(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  // clang-format on
  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue, Scheduler>;
};

// p.workspace = p.x B'^T (tokens x d_in).
template <class Element>
int block_diag(ArmorLinearParams const& p) {
  using Kernel = typename BlockDiag<Element>::GemmKernel;
  constexpr int64_t b = ARMOR_SM90_BLOCK;
  // (row, col, batch) strides; batch J starts b columns further along the same rows.
  auto stride_x = cute::make_stride(int64_t(p.d_in), cute::Int<1>{}, b);
  typename Kernel::StrideB stride_blocks = cute::make_stride(b, cute::Int<1>{}, b * b);
  // clang-format off
  typename Kernel::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      ProblemShape{int(p.tokens), int(b), int(b), int(p.d_in / b)},
      {static_cast<Element const*>(p.x), typename Kernel::StrideA(stride_x), static_cast<Element const*>(p.B_blocks),
       stride_blocks},
      {{}, nullptr, typename Kernel::StrideC(stride_x), static_cast<Element*>(p.workspace),
       typename Kernel::StrideD(stride_x)},
      hardware_info(p.sm_count),
      scheduler_arguments<Kernel>()};
  // clang-format on
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return launch<Kernel>(args, p.stream);
}

}  // namespace armor::sm90
