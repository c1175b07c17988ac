// ARMOR S-step on the CPU: exact 6-pattern group solves swept over every group of every tile.
//
// Torch-free, Python-free C++17. Same semantics as
// armor_kernels.kernels.tile_sweep.sweep_tiles_reference (docs/DESIGN.md §4):
//   R  (T, bA, bB)  weighted residual of each tile, updated in place
//   A  (T, bA, bA)  A_I of each tile (row k of the core sees a = A[:, k])
//   Bt (T, bB, bB)  B_J D_J^1/2 of each tile (group g = rows 4g..4g+3)
//   S  (T, bA, bB)  the tile of the sparse core, updated in place
// All arrays are dense, row-major, float32, and must not overlap. Tiles are independent and are
// processed in parallel (OpenMP); inside a tile the sweep is sequential over rows k and groups g.
#pragma once

#include <cstdint>

namespace armor_cpu {

// Runs `passes` sweeps over every tile. num_threads <= 0: the OpenMP default.
// Throws std::invalid_argument on bad sizes or null pointers.
void sweep_tiles(float* R, const float* A, const float* Bt, float* S,
                 std::int64_t T, std::int64_t bA, std::int64_t bB, int passes,
                 int num_threads = 0);

// One tile, on the calling thread (what sweep_tiles runs per tile). ws: workspace of at least
// sweep_workspace_floats(bA, bB) floats.
void sweep_one_tile(float* R, const float* A, const float* Bt, float* S,
                    std::int64_t bA, std::int64_t bB, int passes, float* ws);

std::int64_t sweep_workspace_floats(std::int64_t bA, std::int64_t bB);

// "openmp=<version or off> simd=<clones>": what this build runs with.
const char* build_info();

}  // namespace armor_cpu
