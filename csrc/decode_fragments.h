// Per-lane operand plumbing of the decode kernels (sm90_decode.cuh): which bytes a lane loads and how
// they become mma.m16n8k16 fragments. Free of CUDA headers and of loads, so that the host test
// (tests/csrc/decode_emulation.cpp) runs this same code for the 32 lanes of an emulated warp.
//
// mma.m16n8k16.row.col thread-value layout (PTX ISA; CuTe's SM80_16x8x16 MMA_Traits), lane = 4 g + c:
//   A (16 x 16):  a[0] = (row g,   k 2c, 2c+1)   a[1] = (row g+8, k 2c, 2c+1)
//                 a[2] = (row g,   k 2c+8, 2c+9) a[3] = (row g+8, k 2c+8, 2c+9)
//   B (16 x 8):   b[0] = (k 2c, 2c+1; col g)     b[1] = (k 2c+8, 2c+9; col g)
//   C (16 x 8):   c[0], c[1] = (row g, cols 2c, 2c+1)   c[2], c[3] = (row g+8, cols 2c, 2c+1)
// The order of k inside one mma is free as long as A and B agree on it. The decode kernels walk K in
// steps of 64 and give mma t (0..3) of a step the columns 16c + 4t + {0, 1} (k slots 2c, 2c+1) and
// 16c + 4t + {2, 3} (k slots 2c+8, 2c+9). Lane c thus owns the 16 columns [16c, 16c + 16) of every step
// for all four mmas: one contiguous run per row, i.e. 32 bytes of a dense row, or 16 bytes of 2:4
// values + 2 bytes of positions of a packed row, each one or two vector loads.
#pragma once

#include <cstdint>

#include "split_k.h"  // kStep, ARMOR_HD

namespace armor::decode {

constexpr int kMmas = 4;  // m16n8k16 per step
constexpr int kRun = 16;  // columns of a step owned by one lane

ARMOR_HD int lane_g(int lane) { return lane >> 2; }
ARMOR_HD int lane_c(int lane) { return lane & 3; }

// Element offsets of a lane's run in a row-major matrix with leading dimension ld (dense rows: A', B'
// blocks, x, xb, z), and in the portable packed 2:4 form of armor_kernels/sparse24.py: values
// (rows, d_in / 2) in column order, positions (rows, d_in / 8) uint8, 2 bits per kept value, low first.
ARMOR_HD int64_t dense_run(int64_t row, int64_t ld, int64_t k0, int c) { return row * ld + k0 + kRun * c; }
ARMOR_HD int64_t sparse_values_run(int64_t row, int64_t d_in, int64_t k0, int c) {
  return row * (d_in / 2) + (k0 + kRun * c) / 2;  // 8 values = 16 bytes
}
ARMOR_HD int64_t sparse_idx_run(int64_t row, int64_t d_in, int64_t k0, int c) {
  return row * (d_in / 8) + (k0 + kRun * c) / 8;  // 2 bytes
}

// One group of 4 columns from its two kept values (packed in a 32-bit word, first value low) and their
// 4 bits of positions (first position low): the dense 4 values as (columns 0-1, columns 2-3).
ARMOR_HD void densify_group(uint32_t values, uint32_t pos, uint32_t& lo, uint32_t& hi) {
  uint64_t const dense =
      (uint64_t(values & 0xffffu) << (16 * (pos & 3u))) | (uint64_t(values >> 16) << (16 * ((pos >> 2) & 3u)));
  lo = uint32_t(dense);
  hi = uint32_t(dense >> 32);
}

// A fragments of one step from the packed runs of rows g and g+8 (4 words of values + 16 bits of
// positions each): group t of the run is mma t's 4 columns.
ARMOR_HD void a_from_sparse(uint32_t const (&v_g)[4], uint32_t idx_g, uint32_t const (&v_g8)[4], uint32_t idx_g8,
                            uint32_t (&a)[kMmas][4]) {
  for (int t = 0; t < kMmas; ++t) {
    densify_group(v_g[t], idx_g >> (4 * t), a[t][0], a[t][2]);
    densify_group(v_g8[t], idx_g8 >> (4 * t), a[t][1], a[t][3]);
  }
}

// A fragments of one step from the dense runs (16 values = 8 words) of rows g and g+8.
ARMOR_HD void a_from_dense(uint32_t const (&w_g)[8], uint32_t const (&w_g8)[8], uint32_t (&a)[kMmas][4]) {
  for (int t = 0; t < kMmas; ++t) {
    a[t][0] = w_g[2 * t];
    a[t][1] = w_g8[2 * t];
    a[t][2] = w_g[2 * t + 1];
    a[t][3] = w_g8[2 * t + 1];
  }
}

// B fragments of one step from the dense run of column g of B (a token's row of x, xb or z).
ARMOR_HD void b_from_dense(uint32_t const (&w)[8], uint32_t (&b)[kMmas][2]) {
  for (int t = 0; t < kMmas; ++t) {
    b[t][0] = w[2 * t];
    b[t][1] = w[2 * t + 1];
  }
}

// Coordinates of accumulator value i (0..3) of a lane inside the 16 x 8 C tile.
ARMOR_HD int c_row(int lane, int i) { return lane_g(lane) + 8 * (i >> 1); }
ARMOR_HD int c_col(int lane, int i) { return 2 * lane_c(lane) + (i & 1); }

}  // namespace armor::decode
