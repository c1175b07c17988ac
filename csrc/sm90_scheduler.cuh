// Tile scheduler of the ARMOR sm90 GEMMs and the one launch path they share.
//
// Persistent, data-parallel: sm_count CTAs (one per SM by default) walk the (M, N) output tiles. No
// split-K / stream-K, so no workspace and no reduction: every output tile, and therefore every A' block
// product in the fused epilogue, is computed by exactly one CTA, whatever sm_count is.
#pragma once

#include <cuda_runtime_api.h>

#include "armor_cuda.h"
#include "sm90_dispatch.h"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/kernel_hardware_info.h"

namespace armor::sm90 {

using Scheduler = cutlass::gemm::PersistentScheduler;

template <class GemmKernel>
typename GemmKernel::TileSchedulerArguments scheduler_arguments() {
  typename GemmKernel::TileSchedulerArguments args{};
  // CUTLASS's heuristic rasterises along the longer of M and N, so consecutive CTAs share the operand
  // tile of the shorter side in L2 (the weight panel for decode-sized N, the activations for prefill).
  args.raster_order = decltype(args.raster_order)::Heuristic;
  args.max_swizzle_size = 1;
  return args;
}

// sm_count: how many CTAs the persistent grid has (at most one per output tile). The GEMMs get it
// resolved by api.cpp (ArmorLinearParams::sm_count, 0 = the device's); 0 here lets CUTLASS query it.
inline cutlass::KernelHardwareInfo hardware_info(int sm_count) {
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = sm_count;
  return hw;
}

// can_implement, params (TMA descriptors are encoded on the host here, a few microseconds), launch.
// Nothing is allocated: the persistent data-parallel scheduler needs no workspace.
template <class GemmKernel>
int launch(typename GemmKernel::Arguments const& args, cudaStream_t stream) {
  if (!GemmKernel::can_implement(args) || GemmKernel::get_workspace_size(args) != 0) {
    return ARMOR_ERROR_CUTLASS;
  }
  typename GemmKernel::Params params = GemmKernel::to_underlying_arguments(args, nullptr);
  constexpr int smem_bytes = GemmKernel::SharedStorageSize;
  // The opt-in above 48 KB is a per-device function attribute, not a stream operation, so it is legal
  // during CUDA-graph capture; it is cheap enough to repeat instead of tracking devices.
  cudaFuncSetAttribute(cutlass::device_kernel<GemmKernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  // Cluster shape 1 x 1 x 1: a plain launch (no cluster launch attributes needed).
  dim3 const grid = GemmKernel::get_grid_shape(params);
  record_launch(grid);
  cutlass::device_kernel<GemmKernel><<<grid, GemmKernel::get_block_shape(), smem_bytes, stream>>>(params);
  return cudaGetLastError() == cudaSuccess ? ARMOR_OK : ARMOR_ERROR_LAUNCH;
}

}  // namespace armor::sm90
