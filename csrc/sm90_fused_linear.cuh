// Assembly of the fused ARMOR GEMM (sparse mainloop + A' epilogue + persistent scheduler) and of its
// compressor, with the host entry points each dtype's translation unit instantiates.
//
// Where fusion stops: B' (the input transform) is a separate block-diagonal GEMM (sm90_block_diag.cuh).
// Fusing it into this mainloop would make every CTA along M recompute the same B'-transformed
// activation tile, d_out / 128 times over (32x the transform's FLOPs at d_out = 4096, ~2x the sparse
// GEMM's own), or require sharing tiles across CTAs; the separate pass costs T * d_in * 256 FLOPs
// (6 % of the sparse GEMM at d_out = 4096) plus one write and one read of T x d_in activations.
#pragma once

#include "armor_cuda.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "sm90_epilogue_blockdiag.cuh"
#include "sm90_scheduler.cuh"
#include "sm90_sparse_mainloop.cuh"

namespace armor::sm90 {

template <class Element>
struct FusedLinear {
  using Epilogue = EpilogueBlockDiagLeft<Element, TileShape>;
  using CollectiveEpilogue = CollectiveEpilogueBlockDiagLeft<Element, TileShape>;
  using CollectiveMainloop =
      typename SparseMainloop<Element>::template Collective<int(sizeof(typename Epilogue::SharedStorage))>;
  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue, Scheduler>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using Compress = Compressor<CollectiveMainloop>;
};

template <class Element>
int compressed_sizes(int64_t d_out, int64_t d_in, int64_t* values_numel, int64_t* meta_bytes) {
  auto util = FusedLinear<Element>::Compress::utility(int(d_out), int(d_in));
  *values_numel = int64_t(util.get_tensorA_m_physical()) * util.get_tensorA_k_physical();
  // Metadata elements are bytes (ElementE is uint8_t for 16-bit inputs).
  *meta_bytes = int64_t(util.get_metadata_m_physical()) * util.get_metadata_k_physical() *
                int64_t(sizeof(typename FusedLinear<Element>::CollectiveMainloop::ElementE));
  return ARMOR_OK;
}

template <class Element>
int compress(void const* S, int64_t d_out, int64_t d_in, void* values, void* meta, cudaStream_t stream) {
  using C = typename FusedLinear<Element>::Compress;
  typename C::Device::Arguments args{
      ProblemShape{int(d_out), 1, int(d_in), 1}, {S, C::stride(int(d_out), int(d_in)), values, meta}, hardware_info(0)};
  typename C::Device op;
  // The compressor's "workspace" is only its shared-memory size, reported for backward compatibility.
  if (op.can_implement(args) != cutlass::Status::kSuccess ||
      op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    return ARMOR_ERROR_CUTLASS;
  }
  return op.run(stream) == cutlass::Status::kSuccess ? ARMOR_OK : ARMOR_ERROR_LAUNCH;
}

// y = (xb S^T) A'^T + bias with xb in p.workspace and S compressed (p.S_values, p.S_meta).
template <class Element>
int sparse_linear_out(ArmorLinearParams const& p) {
  using F = FusedLinear<Element>;
  using Kernel = typename F::GemmKernel;
  ProblemShape problem{int(p.d_out), int(p.tokens), int(p.d_in), 1};
  using StrideB = typename Kernel::StrideB;
  StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(int(p.tokens), int(p.d_in), 1));
  typename Kernel::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      problem,
      {static_cast<Element const*>(p.S_values), F::SparseConfig::fill_layoutA(problem),
       static_cast<Element const*>(p.workspace), stride_b,
       static_cast<typename F::CollectiveMainloop::ElementE const*>(p.S_meta), F::SparseConfig::fill_layoutE(problem)},
      {static_cast<Element const*>(p.A_blocks), static_cast<Element const*>(p.bias), static_cast<Element*>(p.y)},
      hardware_info(p.sm_count),
      scheduler_arguments<Kernel>()};
  return launch<Kernel>(args, p.stream);
}

}  // namespace armor::sm90
