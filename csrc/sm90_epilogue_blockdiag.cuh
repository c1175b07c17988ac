// Epilogue of the fused ARMOR GEMM: the output transform A' applied to the accumulator tile.
//
// A CTA tile of the sparse GEMM is rows [128 i, 128 i + 128) of y^T = S . xb^T, i.e. exactly the rows
// that block A'_i of the block-diagonal A' mixes. So the epilogue is a second, dense GEMM local to the
// CTA:  out (128 x N_tile) = A'_i (128 x 128) . acc (128 x N_tile), run on the tensor cores (wgmma) from
// shared memory, then + bias and a coalesced store into y (tokens x d_out, row-major).
//
// Precision: acc is rounded to the input dtype before the second GEMM (fp32 accumulation in both), the
// same rounding as the unfused reference, which materialises xb S^T in the input dtype.
//
// Interface: the "sm70-style" collective epilogue (Arguments/Params/operator()) that CUTLASS's
// Sm90TmaWarpSpecializedAdapter plugs into the sm90 warp-specialised kernels. The cooperative kernel calls
// it from its two consumer warpgroups (256 threads) with the accumulator still in registers; producer
// warps keep loading the next tile's operands into the mainloop's (separate) shared memory meanwhile.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"

namespace armor::sm90 {

template <class Element_, class TileShape_>
class EpilogueBlockDiagLeft {
 public:
  using Element = Element_;
  static constexpr int kBlock = cute::size<0>(TileShape_{});  // accumulator rows = one A' block
  static constexpr int kTileN = cute::size<1>(TileShape_{});
  static_assert(kBlock == 128, "one CTA tile row-range must be exactly one 128 x 128 block of A'");
  static constexpr int kThreads = 256;                      // two consumer warpgroups (cooperative)
  static constexpr int kChunk = 16 / int(sizeof(Element));  // elements per 16-byte access
  static constexpr uint32_t kBarrier = 0;                   // first user named barrier (after CUTLASS's)

  // Names the CUTLASS kernel and adapter read off a collective epilogue. There is no C operand.
  using ElementC = void;
  using ElementD = Element;
  using StrideC = cute::Stride<int64_t, cute::_1, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  using ThreadEpilogueOp = void;

  // A'_i as the K-major A operand (m_out, m) and the rounded accumulator as the K-major B operand
  // (n, m) of the second GEMM, both in the 128-byte-swizzled layouts wgmma reads.
  using SmemLayoutA = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                   cute::Shape<cute::Int<kBlock>, cute::Int<kBlock>>{}));
  using SmemLayoutT = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                   cute::Shape<cute::Int<kTileN>, cute::Int<kBlock>>{}));
  // The same buffer seen as (m, n), the accumulator's coordinates: (m, n) -> SmemLayoutT(n, m).
  using SmemLayoutMN =
      decltype(cute::composition(SmemLayoutT{}, cute::make_layout(cute::Shape<cute::Int<kBlock>, cute::Int<kTileN>>{},
                                                                  cute::Stride<cute::Int<kTileN>, cute::_1>{})));

  // Two warpgroups stacked along M, 64 x N_tile x 16 wgmma each.
  using TiledMma = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlock>, cute::Int<kTileN>, cute::Int<kBlock>>>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));

  struct SharedStorage {
    // 1 KB alignment: the stores below apply CuTe's swizzle to offsets from the buffer start, wgmma
    // applies it to absolute addresses; the two agree when the 1 KB swizzle period starts at the buffer.
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutA>, 1024> a_block;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutT>, 1024> tile;
  };
  using TensorStorage = SharedStorage;

  struct Arguments {
    Element const* ptr_A_blocks = nullptr;  // (d_out / 128, 128, 128), row-major blocks
    Element const* ptr_bias = nullptr;      // (d_out), or null
    Element* ptr_D = nullptr;               // y: (tokens, d_out), row-major
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto aligned = [](void const* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    return cute::get<0>(problem_shape) % kBlock == 0 && args.ptr_A_blocks && args.ptr_D && aligned(args.ptr_A_blocks) &&
           aligned(args.ptr_D);
  }

  CUTLASS_HOST_DEVICE EpilogueBlockDiagLeft(Params const& params) : params_(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class AccEngine, class AccLayout,
            class MainTiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK, BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<AccEngine, AccLayout> const& accumulators, MainTiledMma main_mma,
                                 ResidueMNK, int thread_idx, char* smem) {
    using namespace cute;
    using cutlass::arch::NamedBarrier;
    SharedStorage& storage = *reinterpret_cast<SharedStorage*>(smem);
    int const M = get<0>(problem_shape_mnkl);
    int const N = get<1>(problem_shape_mnkl);
    int const m_blk = get<0>(blk_coord_mnkl);
    int const n_blk = get<1>(blk_coord_mnkl);

    Tensor sA = make_tensor(make_smem_ptr(storage.a_block.data()), SmemLayoutA{});  // (m_out, m)
    Tensor sT = make_tensor(make_smem_ptr(storage.tile.data()), SmemLayoutT{});     // (n, m)
    Tensor sMN = make_tensor(make_smem_ptr(storage.tile.data()), SmemLayoutMN{});   // (m, n)

    // The persistent kernel runs this once per tile: wait until every thread has finished the previous
    // tile's copy-out before the buffers are overwritten.
    NamedBarrier::sync(kThreads, kBarrier);

    // 1. A'_i -> shared memory in 16-byte chunks (the 128-byte swizzle moves whole 16-byte chunks).
    Element const* gA = params_.ptr_A_blocks + int64_t(m_blk) * kBlock * kBlock;
    constexpr int kChunksPerRow = kBlock / kChunk;
    CUTLASS_PRAGMA_UNROLL
    for (int c = thread_idx; c < kBlock * kChunksPerRow; c += kThreads) {
      int const r = c / kChunksPerRow, k = (c % kChunksPerRow) * kChunk;
      *reinterpret_cast<uint4*>(&sA(r, k)) = *reinterpret_cast<uint4 const*>(gA + r * kBlock + k);
    }

    // 2. Accumulator (registers, fp32) -> shared memory in the input dtype, as the B operand.
    auto main_thr = main_mma.get_thread_slice(thread_idx);
    Tensor tCsMN = main_thr.partition_C(sMN);
    CUTE_STATIC_ASSERT_V(size(tCsMN) == size(accumulators));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accumulators); ++i) {
      tCsMN(i) = Element(accumulators(i));
    }
    // Generic-proxy stores read next by wgmma (async proxy): fence, then barrier.
    cutlass::arch::fence_view_async_shared();
    NamedBarrier::sync(kThreads, kBarrier);

    // 3. out = A'_i . acc on the tensor cores.
    TiledMma mma;
    auto thr = mma.get_thread_slice(thread_idx);
    Tensor tOrA = thr.make_fragment_A(thr.partition_A(sA));  // (MMA, MMA_M, MMA_K) descriptors
    Tensor tOrT = thr.make_fragment_B(thr.partition_B(sT));  // (MMA, MMA_N, MMA_K) descriptors
    Tensor out = partition_fragment_C(mma, Shape<Int<kBlock>, Int<kTileN>>{});
    warpgroup_fence_operand(out);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::Zero;
    CUTLASS_PRAGMA_UNROLL
    for (int k = 0; k < size<2>(tOrA); ++k) {
      cute::gemm(mma, tOrA(_, _, k), tOrT(_, _, k), out);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(out);
    // Both warpgroups have read the tile before it is overwritten with the result.
    NamedBarrier::sync(kThreads, kBarrier);

    // 4. + bias, round, stage the result in the (m, n) tile so that each token's 128 outputs are
    //    contiguous for the store.
    Tensor tOsMN = thr.partition_C(sMN);
    Tensor tOcMN = thr.partition_C(make_identity_tensor(Shape<Int<kBlock>, Int<kTileN>>{}));
    Element const* bias = params_.ptr_bias ? params_.ptr_bias + int64_t(m_blk) * kBlock : nullptr;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(out); ++i) {
      float v = out(i);
      if (bias) v += float(bias[get<0>(tOcMN(i))]);
      tOsMN(i) = Element(v);
    }
    NamedBarrier::sync(kThreads, kBarrier);

    // 5. Coalesced 16-byte stores: token n's outputs [128 i, 128 i + 128) are 256 contiguous bytes of y.
    int const n_valid = min(kTileN, N - n_blk * kTileN);  // ragged last token tile
    Element* gD = params_.ptr_D + int64_t(n_blk) * kTileN * M + int64_t(m_blk) * kBlock;
    CUTLASS_PRAGMA_UNROLL
    for (int c = thread_idx; c < kTileN * kChunksPerRow; c += kThreads) {
      int const n = c / kChunksPerRow, m = (c % kChunksPerRow) * kChunk;
      if (n < n_valid) {
        *reinterpret_cast<uint4*>(gD + int64_t(n) * M + m) = *reinterpret_cast<uint4 const*>(&sT(n, m));
      }
    }
  }

 private:
  Params params_;
};

template <class Element, class TileShape>
using CollectiveEpilogueBlockDiagLeft =
    cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<EpilogueBlockDiagLeft<Element, TileShape>>;

}  // namespace armor::sm90
