// Decode-sized ARMOR linear (tokens <= ARMOR_DECODE_MAX_TOKENS): y = ((x B'^T) S^T) A'^T + bias as two
// memory-bound launches on the warp-level tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// At 1-16 tokens the op is a stream over the weights: the 128 x 128 token tile of the CUTLASS path
// would do 8-128x the needed math and, with one CTA per 128 rows, leave most SMs idle (32 CTAs at
// d_out = 4096 on 132 SMs). Here every byte of S is read once, in the portable packed form that
// ArmorLinear already keeps (no second compressed copy), by a grid split along K over the SMs (split_k.h):
//   1. input_transform: xb = x B'^T, one CTA per 128-column block of x; also zeroes the counters.
//   2. sparse_splitk: CTA (i, s) multiplies rows [128 i, 128 i + 128) of S, K split s, by xb^T into fp32
//      partial sums; the last CTA of row block i to arrive sums the splits in split order (the same
//      result on every run), rounds to the input dtype like the reference, applies A'_i and the bias.
// S's 2:4 values are densified in registers into the mma's A fragments (decode_fragments.h): at these
// sizes the tensor cores have ~50x headroom, the bytes are what counts.
#pragma once

#include <cuda_runtime_api.h>

#include "armor_cuda.h"
#include "cute/arch/mma_sm80.hpp"
#include "cutlass/numeric_types.h"
#include "decode_fragments.h"
#include "sm90_dispatch.h"
#include "split_k.h"

namespace armor::sm90 {

namespace decode_detail {

using namespace armor::decode;

constexpr int kThreads = 256;  // 8 warps x 16 rows = one 128-row block
constexpr int kBlock = 128;    // rows of S per CTA of kernel 2 = one block of A'
constexpr int kZPad = 8;       // z rows padded by 16 bytes: the warp's 16-byte reads hit distinct banks

template <class Element>
struct Params {
  Element const* x;         // (tokens, d_in)
  Element const* B_blocks;  // (d_in / 128, 128, 128)
  Element const* S_values;  // (d_out, d_in / 2)
  uint8_t const* S_idx;     // (d_out, d_in / 8)
  Element const* A_blocks;  // (d_out / 128, 128, 128)
  Element const* bias;      // (d_out) or null
  Element* xb;              // workspace: (tokens, d_in)
  float* partials;          // workspace: (splits, d_out, token_tile)
  int* counters;            // workspace: (d_out / 128)
  Element* y;               // (tokens, d_out)
  int tokens, d_in, d_out, steps, steps_per_split;
};

template <class Element>
struct Mma;
template <>
struct Mma<cutlass::bfloat16_t> : cute::SM80_16x8x16_F32BF16BF16F32_TN {};
template <>
struct Mma<cutlass::half_t> : cute::SM80_16x8x16_F32F16F16F32_TN {};

template <class Element>
__device__ __forceinline__ void mma(float (&d)[4], uint32_t const (&a)[4], uint32_t const (&b)[2]) {
  Mma<Element>::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0], b[1], d[0], d[1], d[2], d[3]);
}

__device__ __forceinline__ void load16(void const* p, uint32_t* w) {
  uint4 const v = *reinterpret_cast<uint4 const*>(p);
  w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
}

// S is read exactly once: streaming loads, so it does not evict xb, A' and the partial sums from L2.
__device__ __forceinline__ void load16_stream(void const* p, uint32_t (&w)[4]) {
  uint4 const v = __ldcs(reinterpret_cast<uint4 const*>(p));
  w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
}

// B fragments of one step: token n = 8 q + g of n-tile q is row n of X (leading dimension ld, global or
// shared memory); rows at or past `tokens` are zeros. Loads of a clamped row, then selects: no branch,
// so the unrolled K loop stays one basic block and the S loads of several steps are issued together.
template <int NT, class Element>
__device__ __forceinline__ void load_tokens(Element const* X, int64_t ld, int64_t k0, int lane, int tokens,
                                            uint32_t (&b)[NT][kMmas][2]) {
  for (int q = 0; q < NT; ++q) {
    uint32_t w[8];
    int const n = 8 * q + lane_g(lane);
    Element const* p = X + dense_run(min(n, tokens - 1), ld, k0, lane_c(lane));
    load16(p, w);
    load16(p + 8, w + 4);
    for (int i = 0; i < 8; ++i) w[i] = n < tokens ? w[i] : 0u;
    b_from_dense(w, b[q]);
  }
}

// acc += rows [16 warp, 16 warp + 16) of one 128 x 128 block (row-major) times X^T, X's rows the tokens
// (128 columns from X): the B' transform of kernel 1 and the A' transform of kernel 2.
template <class Element, int NT>
__device__ __forceinline__ void block_times_tokens(Element const* block, Element const* X, int64_t ld, int tokens,
                                                   int warp, int lane, float (&acc)[NT][4]) {
  int const row = 16 * warp + lane_g(lane);
  for (int k0 = 0; k0 < kBlock; k0 += kStep) {
    uint32_t w_g[8], w_g8[8], a[kMmas][4], b[NT][kMmas][2];
    Element const* p = block + dense_run(row, kBlock, k0, lane_c(lane));
    load16(p, w_g);
    load16(p + 8, w_g + 4);
    load16(p + 8 * kBlock, w_g8);
    load16(p + 8 * kBlock + 8, w_g8 + 4);
    a_from_dense(w_g, w_g8, a);
    load_tokens<NT>(X, ld, k0, lane, tokens, b);
    for (int t = 0; t < kMmas; ++t)
      for (int q = 0; q < NT; ++q) mma<Element>(acc[q], a[t], b[q][t]);
  }
}

// Kernel 1, CTA J: xb[:, 128 J + j] = sum_k B'_J[j, k] x[:, 128 J + k], computed as xb_J^T = B'_J x_J^T.
template <class Element, int NT>
__global__ void __launch_bounds__(kThreads) input_transform(Params<Element> p) {
  int const J = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (J == 0) {
    for (int i = threadIdx.x; i < p.d_out / kBlock; i += kThreads) p.counters[i] = 0;
  }
  float acc[NT][4] = {};
  block_times_tokens<Element, NT>(p.B_blocks + int64_t(J) * kBlock * kBlock, p.x + int64_t(J) * kBlock, p.d_in,
                                  p.tokens, warp, lane, acc);
  for (int q = 0; q < NT; ++q)
    for (int i = 0; i < 4; ++i) {
      int const n = 8 * q + c_col(lane, i);
      if (n < p.tokens) p.xb[int64_t(n) * p.d_in + J * kBlock + 16 * warp + c_row(lane, i)] = Element(acc[q][i]);
    }
}

// Kernel 2, CTA (i, s): see the file comment.
template <class Element, int NT>
__global__ void __launch_bounds__(kThreads) sparse_splitk(Params<Element> p) {
  constexpr int kTok = 8 * NT;
  __shared__ alignas(16) Element z[kTok][kBlock + kZPad];  // the block's S xb^T, token-major: A' reads rows
  __shared__ bool last;
  int const blk = blockIdx.x, split = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int const c = lane_c(lane);
  int64_t const row = int64_t(blk) * kBlock + 16 * warp + lane_g(lane);  // and row + 8
  int const s_end = min(p.steps, (split + 1) * p.steps_per_split);

  // Steps in batches: all the batch's S loads are issued before its first mma (clamped to the last step,
  // so without branches), which keeps kBatch x 1.1 KB per warp in flight to cover DRAM latency.
  constexpr int kBatch = 4;
  float acc[NT][4] = {};
  for (int s0 = split * p.steps_per_split; s0 < s_end; s0 += kBatch) {
    uint32_t v_g[kBatch][4], v_g8[kBatch][4], i_g[kBatch], i_g8[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      int64_t const k0 = int64_t(min(s0 + u, s_end - 1)) * kStep;
      load16_stream(p.S_values + sparse_values_run(row, p.d_in, k0, c), v_g[u]);
      load16_stream(p.S_values + sparse_values_run(row + 8, p.d_in, k0, c), v_g8[u]);
      i_g[u] = __ldcs(reinterpret_cast<uint16_t const*>(p.S_idx + sparse_idx_run(row, p.d_in, k0, c)));
      i_g8[u] = __ldcs(reinterpret_cast<uint16_t const*>(p.S_idx + sparse_idx_run(row + 8, p.d_in, k0, c)));
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (s0 + u >= s_end) break;  // warp-uniform
      uint32_t a[kMmas][4], b[NT][kMmas][2];
      a_from_sparse(v_g[u], i_g[u], v_g8[u], i_g8[u], a);
      load_tokens<NT>(p.xb, p.d_in, int64_t(s0 + u) * kStep, lane, p.tokens, b);
      for (int t = 0; t < kMmas; ++t)
        for (int q = 0; q < NT; ++q) mma<Element>(acc[q], a[t], b[q][t]);
    }
  }

  // Partial sums (row, token) of this split; c[0], c[1] are two adjacent tokens of one row.
  float* part = p.partials + int64_t(split) * p.d_out * kTok;
  for (int q = 0; q < NT; ++q)
    for (int h = 0; h < 2; ++h) {
      int64_t const r = row + 8 * h;
      *reinterpret_cast<float2*>(part + r * kTok + 8 * q + 2 * c) = make_float2(acc[q][2 * h], acc[q][2 * h + 1]);
    }
  // The last CTA of this row block to arrive reduces: release our partials, count, acquire the others'.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(p.counters + blk, 1) == int(gridDim.y) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();

  // z = sum of the splits (fixed order), rounded to the dtype as the reference rounds S xb^T.
  for (int e = threadIdx.x; e < kBlock * kTok / 4; e += kThreads) {
    int const r = e / (kTok / 4), n = e % (kTok / 4) * 4;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int sp = 0; sp < int(gridDim.y); ++sp) {
      float4 const v = __ldcg(
          reinterpret_cast<float4 const*>(p.partials + (int64_t(sp) * p.d_out + int64_t(blk) * kBlock + r) * kTok + n));
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    z[n][r] = Element(sum.x), z[n + 1][r] = Element(sum.y), z[n + 2][r] = Element(sum.z), z[n + 3][r] = Element(sum.w);
  }
  __syncthreads();

  // y rows of this block = A'_blk z + bias.
  float out[NT][4] = {};
  block_times_tokens<Element, NT>(p.A_blocks + int64_t(blk) * kBlock * kBlock, &z[0][0], kBlock + kZPad, kTok, warp,
                                  lane, out);
  for (int q = 0; q < NT; ++q)
    for (int i = 0; i < 4; ++i) {
      int const n = 8 * q + c_col(lane, i);
      int64_t const r = int64_t(blk) * kBlock + 16 * warp + c_row(lane, i);
      if (n < p.tokens) {
        p.y[int64_t(n) * p.d_out + r] = Element(out[q][i] + (p.bias ? float(p.bias[r]) : 0.f));
      }
    }
}

template <class Element, int NT>
int launch(Params<Element> const& p, int splits, cudaStream_t stream) {
  dim3 const transform_grid(p.d_in / kBlock), splitk_grid(p.d_out / kBlock, splits);
  sm90::record_launch(transform_grid);
  sm90::record_launch(splitk_grid);
  input_transform<Element, NT><<<transform_grid, kThreads, 0, stream>>>(p);
  sparse_splitk<Element, NT><<<splitk_grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? ARMOR_OK : ARMOR_ERROR_LAUNCH;
}

}  // namespace decode_detail

template <class Element>
int decode_linear(ArmorLinearParams const& a) {
  using namespace decode_detail;
  auto const ws = workspace_layout(a.d_out, a.d_in, a.tokens, int(sizeof(Element)), a.sm_count);
  auto const split = split_k(a.d_out, a.d_in, a.sm_count);
  char* base = static_cast<char*>(a.workspace);
  Params<Element> p{.x = static_cast<Element const*>(a.x),
                    .B_blocks = static_cast<Element const*>(a.B_blocks),
                    .S_values = static_cast<Element const*>(a.S_values),
                    .S_idx = static_cast<uint8_t const*>(a.S_meta),
                    .A_blocks = static_cast<Element const*>(a.A_blocks),
                    .bias = static_cast<Element const*>(a.bias),
                    .xb = reinterpret_cast<Element*>(base),
                    .partials = reinterpret_cast<float*>(base + ws.partials),
                    .counters = reinterpret_cast<int*>(base + ws.counters),
                    .y = static_cast<Element*>(a.y),
                    .tokens = int(a.tokens),
                    .d_in = int(a.d_in),
                    .d_out = int(a.d_out),
                    .steps = int(a.d_in / kStep),
                    .steps_per_split = split.steps_per_split};
  return token_tile(a.tokens) == 8 ? launch<Element, 1>(p, split.splits, a.stream)
                                   : launch<Element, 2>(p, split.splits, a.stream);
}

}  // namespace armor::sm90
