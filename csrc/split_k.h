// The split-K heuristic of the decode kernels (csrc/sm90_decode.cuh) and the workspace it implies.
// CUDA-free: api.cpp sizes the workspace with it and tests/csrc/decode_emulation.cpp runs it on the host.
//
// The split is a first guess, to be set from benchmarks/bench_linear.py's decode rows: enough CTAs for
// ~4 per SM when d_out alone gives fewer, each with at least 4 steps of K, so that a CTA streams enough
// bytes to hide its start and its partial-sum write.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ARMOR_HD __host__ __device__ __forceinline__
#else
#define ARMOR_HD inline
#endif

namespace armor::decode {

constexpr int kStep = 64;  // columns of K per step: the unit of the split and of the kernels' K loop

struct Split {
  int splits;           // CTAs along K per 128-row block
  int steps_per_split;  // steps of kStep columns per CTA (the last one may have fewer)
};
ARMOR_HD Split split_k(int64_t d_out, int64_t d_in, int sm_count) {
  int const row_blocks = int(d_out / 128), steps = int(d_in / kStep);
  int want = (4 * sm_count + row_blocks - 1) / row_blocks;
  int const most = steps / 4 > 1 ? steps / 4 : 1;
  want = want < 1 ? 1 : (want > most ? most : want);
  int const per = (steps + want - 1) / want;
  return {(steps + per - 1) / per, per};  // no empty split
}

// Token tile of the decode kernels: one or two n8 tiles of the mma.
ARMOR_HD int token_tile(int64_t tokens) { return tokens <= 8 ? 8 : 16; }

// The decode workspace, one buffer: xb = x B'^T (tokens x d_in, the input dtype), the fp32 partial sums
// of S xb^T per K split (splits x d_out x token_tile), one arrival counter per 128-row block.
struct Workspace {
  int64_t partials, counters, bytes;  // byte offsets of the parts after xb, total size
};
ARMOR_HD Workspace workspace_layout(int64_t d_out, int64_t d_in, int64_t tokens, int element_bytes, int sm_count) {
  auto align = [](int64_t n) { return (n + 255) / 256 * 256; };
  int64_t const partials = align(tokens * d_in * element_bytes);
  int64_t const counters = partials + align(int64_t(split_k(d_out, d_in, sm_count).splits) * d_out *
                                            token_tile(tokens) * int64_t(sizeof(float)));
  return {partials, counters, counters + align(d_out / 128 * int64_t(sizeof(int)))};
}

}  // namespace armor::decode
