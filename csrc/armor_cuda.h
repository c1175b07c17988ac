// Public, torch-free C API of the ARMOR Hopper kernels (sm_90a).
//
// ARMOR's inference op is y = ((x B'^T) S^T) A'^T + bias with A' (d_out x d_out) and B' (d_in x d_in)
// block-diagonal with 128 x 128 blocks and S (d_out x d_in) 2:4 sparse along d_in. The kernels compute
// the transposed form y^T = A' . S . (B' x^T): M = d_out, N = tokens, K = d_in, so that S is the first
// (sparse) operand of the Hopper sparse tensor-core instruction.
//
// Conventions: all matrices row-major and contiguous, on the current CUDA device; block tensors are
// (n_blocks, 128, 128); y is (tokens, d_out). Every function returns an ArmorStatus; nothing allocates,
// nothing synchronises, every launch goes to `stream` (so calls can be captured in a CUDA graph).
// C linkage so that the library can be used without the Python binding (ctypes, other runtimes).
#pragma once

#include <stdint.h>

// cudaStream_t without the CUDA headers (the same typedef as driver_types.h), so that the binding
// compiles with a plain C++ compiler on a machine that has only the prebuilt library.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

#ifdef __cplusplus
extern "C" {
#endif

enum ArmorStatus {
  ARMOR_OK = 0,
  ARMOR_ERROR_DTYPE = 1,      // dtype code not one of ArmorDtype
  ARMOR_ERROR_SHAPE = 2,      // sizes the kernels do not support (see armor_sm90_supported)
  ARMOR_ERROR_ALIGNMENT = 3,  // a pointer is not 16-byte aligned
  ARMOR_ERROR_CUTLASS = 4,    // CUTLASS can_implement refused the problem
  ARMOR_ERROR_LAUNCH = 5,     // the CUDA launch failed (cudaGetLastError after the launch)
  ARMOR_ERROR_ARGUMENT = 6,   // sm_count not positive, or tokens above ARMOR_DECODE_MAX_TOKENS (decode)
};

enum ArmorDtype { ARMOR_BF16 = 0, ARMOR_FP16 = 1 };

// The only block size of A' and B' the fused kernels support; the most tokens of the decode kernels.
enum { ARMOR_SM90_BLOCK = 128, ARMOR_DECODE_MAX_TOKENS = 16 };

const char* armor_status_string(int status);

// ARMOR_OK when d_out and d_in are positive multiples of 128 and fit the 32-bit GEMM extents.
int armor_sm90_supported(int64_t d_out, int64_t d_in);

// Sizes of the CUTLASS sm90 compressed form of S: `values_numel` elements of S's dtype and
// `meta_bytes` bytes of metadata. Both depend only on (d_out, d_in) and the dtype.
int armor_sm90_compressed_sizes(int dtype, int64_t d_out, int64_t d_in, int64_t* values_numel,
                                int64_t* meta_bytes);

// One-time compression of a dense 2:4 matrix S (d_out x d_in, at most 2 nonzeros in every group of
// 4 along d_in) into the values + metadata layout the sparse mainloop reads.
int armor_sm90_compress(int dtype, const void* S, int64_t d_out, int64_t d_in, void* values, void* meta,
                        cudaStream_t stream);

// xb = x B'^T block by block: xb[:, J] = x[:, J] . B'_J^T for every 128-column block J. x, xb: (tokens, dim).
int armor_sm90_block_diag(int dtype, const void* x, const void* B_blocks, void* xb, int64_t tokens,
                          int64_t dim, int sm_count, cudaStream_t stream);

// y = ((xb S^T) A'^T) + bias with A' applied in the epilogue of the sparse GEMM. bias may be null.
int armor_sm90_sparse_linear_out(int dtype, const void* xb, const void* values, const void* meta,
                                 const void* A_blocks, const void* bias, void* y, int64_t tokens,
                                 int64_t d_in, int64_t d_out, int sm_count, cudaStream_t stream);

// The whole op: block_diag into `workspace` (tokens x d_in elements), then sparse_linear_out.
int armor_sm90_linear(int dtype, const void* x, const void* B_blocks, const void* values, const void* meta,
                      const void* A_blocks, const void* bias, void* workspace, void* y, int64_t tokens,
                      int64_t d_in, int64_t d_out, int sm_count, cudaStream_t stream);

// Decode sizes (1 <= tokens <= ARMOR_DECODE_MAX_TOKENS): the whole op in two memory-bound launches that
// read S in the portable packed 2:4 form of armor_kernels/sparse24.py (S_values (d_out, d_in / 2) in
// the dtype, S_idx (d_out, d_in / 8) uint8), so no compressed copy is needed (csrc/sm90_decode.cuh).
// `workspace` holds armor_sm90_decode_workspace_bytes(...) bytes, uninitialised, with the same tokens
// and sm_count (the split of K depends on it; pass the device's SM count).
int armor_sm90_decode_workspace_bytes(int dtype, int64_t d_out, int64_t d_in, int64_t tokens, int sm_count,
                                      int64_t* bytes);
int armor_sm90_decode_linear(int dtype, const void* x, const void* B_blocks, const void* S_values,
                             const void* S_idx, const void* A_blocks, const void* bias, void* workspace, void* y,
                             int64_t tokens, int64_t d_in, int64_t d_out, int sm_count, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
