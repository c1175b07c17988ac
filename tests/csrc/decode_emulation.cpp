// Host emulation of the decode kernels of csrc/sm90_decode.cuh, for tests/test_ops.py (decode_emulator).
//
// Runs the kernels' per-lane code (csrc/decode_fragments.h: which bytes each lane loads, how they become
// mma fragments, where each accumulator lands; csrc/split_k.h: the K split and the workspace) for every lane of
// every warp of every CTA, with warp-wide mma.m16n8k16 emulated from its documented thread-value layout
// (PTX ISA, CuTe's SM80_16x8x16 MMA_Traits). What it cannot check is the device itself: loads, the
// instruction, memory ordering of the split-K reduction. bf16 data as raw 16-bit patterns.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "decode_fragments.h"
#include "split_k.h"

using namespace armor::decode;

namespace {

constexpr int kBlock = 128, kWarps = 8, kZPad = 8;

float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float f) {  // round to nearest even, as the device's conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float half_of(uint32_t w, int h) { return bf16_to_float(uint16_t(h ? w >> 16 : w & 0xffffu)); }

// One warp-wide mma.m16n8k16 (fp32 accumulate) on the 32 lanes' fragments.
void mma_warp(float (&d)[32][4], uint32_t const (&a)[32][4], uint32_t const (&b)[32][2]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    int const g = lane_g(lane), c = lane_c(lane);
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) A[g + 8 * (r & 1)][2 * c + h + 8 * (r >> 1)] = half_of(a[lane][r], h);
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * c + h + 8 * r][g] = half_of(b[lane][r], h);
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      float s = d[lane][i];
      for (int k = 0; k < 16; ++k) s += A[c_row(lane, i)][k] * B[k][c_col(lane, i)];
      d[lane][i] = s;
    }
}

template <int NT>
using Acc = float[NT][32][4];

// One step's mmas: mma t of n-tile q on every lane's fragments.
template <int NT>
void step_mmas(Acc<NT>& acc, uint32_t const (&a)[32][kMmas][4], uint32_t const (&b)[32][NT][kMmas][2]) {
  for (int t = 0; t < kMmas; ++t)
    for (int q = 0; q < NT; ++q) {
      uint32_t at[32][4], bt[32][2];
      for (int lane = 0; lane < 32; ++lane) {
        std::memcpy(at[lane], a[lane][t], sizeof at[lane]);
        std::memcpy(bt[lane], b[lane][q][t], sizeof bt[lane]);
      }
      mma_warp(acc[q], at, bt);
    }
}

// load_tokens of the kernel: B fragments from rows (tokens) of X.
template <int NT>
void load_tokens(uint16_t const* X, int64_t ld, int64_t k0, int tokens, uint32_t (&b)[32][NT][kMmas][2]) {
  for (int lane = 0; lane < 32; ++lane)
    for (int q = 0; q < NT; ++q) {
      uint32_t w[8] = {};
      int const n = 8 * q + lane_g(lane);
      if (n < tokens) std::memcpy(w, X + dense_run(n, ld, k0, lane_c(lane)), 32);
      b_from_dense(w, b[lane][q]);
    }
}

// block_times_tokens of the kernel, for one warp.
template <int NT>
void block_times_tokens(uint16_t const* block, uint16_t const* X, int64_t ld, int tokens, int warp, Acc<NT>& acc) {
  for (int k0 = 0; k0 < kBlock; k0 += kStep) {
    uint32_t a[32][kMmas][4], b[32][NT][kMmas][2];
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t w_g[8], w_g8[8];
      uint16_t const* p = block + dense_run(16 * warp + lane_g(lane), kBlock, k0, lane_c(lane));
      std::memcpy(w_g, p, 32);
      std::memcpy(w_g8, p + 8 * kBlock, 32);
      a_from_dense(w_g, w_g8, a[lane]);
    }
    load_tokens<NT>(X, ld, k0, tokens, b);
    step_mmas<NT>(acc, a, b);
  }
}

template <int NT>
void emulate(uint16_t const* x, uint16_t const* Bb, uint16_t const* Sv, uint8_t const* Si, uint16_t const* Ab,
             uint16_t const* bias, uint16_t* y, int tokens, int d_in, int d_out, int sm_count) {
  constexpr int kTok = 8 * NT;
  Workspace const ws = workspace_layout(d_out, d_in, tokens, 2, sm_count);
  Split const split = split_k(d_out, d_in, sm_count);
  std::vector<char> workspace(ws.bytes, char(0x5a));  // garbage, like an uninitialised device buffer
  auto* xb = reinterpret_cast<uint16_t*>(workspace.data());
  auto* partials = reinterpret_cast<float*>(workspace.data() + ws.partials);
  auto* counters = reinterpret_cast<int*>(workspace.data() + ws.counters);

  // Kernel 1: input_transform.
  for (int J = 0; J < d_in / kBlock; ++J) {
    if (J == 0)
      for (int i = 0; i < d_out / kBlock; ++i) counters[i] = 0;
    for (int warp = 0; warp < kWarps; ++warp) {
      Acc<NT> acc = {};
      block_times_tokens<NT>(Bb + int64_t(J) * kBlock * kBlock, x + int64_t(J) * kBlock, d_in, tokens, warp, acc);
      for (int lane = 0; lane < 32; ++lane)
        for (int q = 0; q < NT; ++q)
          for (int i = 0; i < 4; ++i) {
            int const n = 8 * q + c_col(lane, i);
            if (n < tokens)
              xb[int64_t(n) * d_in + J * kBlock + 16 * warp + c_row(lane, i)] = float_to_bf16(acc[q][lane][i]);
          }
    }
  }

  // Kernel 2: sparse_splitk, CTAs in reverse order (any arrival order must give the same result).
  int const steps = d_in / kStep;
  for (int blk = d_out / kBlock - 1; blk >= 0; --blk)
    for (int sp = split.splits - 1; sp >= 0; --sp) {
      int const s_end = std::min(steps, (sp + 1) * split.steps_per_split);
      for (int warp = 0; warp < kWarps; ++warp) {
        Acc<NT> acc = {};
        for (int s = sp * split.steps_per_split; s < s_end; ++s) {
          int64_t const k0 = int64_t(s) * kStep;
          uint32_t a[32][kMmas][4], b[32][NT][kMmas][2];
          for (int lane = 0; lane < 32; ++lane) {
            int const c = lane_c(lane);
            int64_t const row = int64_t(blk) * kBlock + 16 * warp + lane_g(lane);
            uint32_t v_g[4], v_g8[4];
            uint16_t i_g, i_g8;
            std::memcpy(v_g, Sv + sparse_values_run(row, d_in, k0, c), 16);
            std::memcpy(v_g8, Sv + sparse_values_run(row + 8, d_in, k0, c), 16);
            std::memcpy(&i_g, Si + sparse_idx_run(row, d_in, k0, c), 2);
            std::memcpy(&i_g8, Si + sparse_idx_run(row + 8, d_in, k0, c), 2);
            a_from_sparse(v_g, i_g, v_g8, i_g8, a[lane]);
          }
          load_tokens<NT>(xb, d_in, k0, tokens, b);
          step_mmas<NT>(acc, a, b);
        }
        float* part = partials + int64_t(sp) * d_out * kTok;
        for (int lane = 0; lane < 32; ++lane)
          for (int q = 0; q < NT; ++q)
            for (int i = 0; i < 4; ++i)
              part[(int64_t(blk) * kBlock + 16 * warp + c_row(lane, i)) * kTok + 8 * q + c_col(lane, i)] =
                  acc[q][lane][i];
      }
      if (++counters[blk] != split.splits) continue;  // not the last CTA of this row block

      uint16_t z[kTok][kBlock + kZPad];
      for (int r = 0; r < kBlock; ++r)
        for (int n = 0; n < kTok; ++n) {
          float sum = 0.f;
          for (int s2 = 0; s2 < split.splits; ++s2)
            sum += partials[(int64_t(s2) * d_out + int64_t(blk) * kBlock + r) * kTok + n];
          z[n][r] = float_to_bf16(sum);
        }
      for (int warp = 0; warp < kWarps; ++warp) {
        Acc<NT> out = {};
        block_times_tokens<NT>(Ab + int64_t(blk) * kBlock * kBlock, &z[0][0], kBlock + kZPad, kTok, warp, out);
        for (int lane = 0; lane < 32; ++lane)
          for (int q = 0; q < NT; ++q)
            for (int i = 0; i < 4; ++i) {
              int const n = 8 * q + c_col(lane, i);
              int64_t const r = int64_t(blk) * kBlock + 16 * warp + c_row(lane, i);
              if (n < tokens)
                y[int64_t(n) * d_out + r] = float_to_bf16(out[q][lane][i] + (bias ? bf16_to_float(bias[r]) : 0.f));
            }
      }
    }
}

}  // namespace

extern "C" {

// y (tokens, d_out) from bf16 x (tokens, d_in), B blocks, packed S (values, idx), A blocks, bias (or
// null), as the device would compute it with `sm_count` SMs. Returns the number of K splits used.
int armor_emulate_decode_linear(uint16_t const* x, uint16_t const* B, uint16_t const* S_values, uint8_t const* S_idx,
                                uint16_t const* A, uint16_t const* bias, uint16_t* y, int tokens, int d_in, int d_out,
                                int sm_count) {
  if (token_tile(tokens) == 8)
    emulate<1>(x, B, S_values, S_idx, A, bias, y, tokens, d_in, d_out, sm_count);
  else
    emulate<2>(x, B, S_values, S_idx, A, bias, y, tokens, d_in, d_out, sm_count);
  return split_k(d_out, d_in, sm_count).splits;
}

}  // extern "C"
