// Public, torch-free C API of the ARMOR Hopper kernels (sm_90a).
//
// ARMOR's inference op is y = ((x B'^T) S^T) A'^T + bias with A' (d_out x d_out) and B' (d_in x d_in)
// block-diagonal with 128 x 128 blocks and S (d_out x d_in) 2:4 sparse along d_in. The kernels compute
// the transposed form y^T = A' . S . (B' x^T): M = d_out, N = tokens, K = d_in, so that S is the first
// (sparse) operand of the Hopper sparse tensor-core instruction.
//
// Conventions: all matrices row-major and contiguous, on the current CUDA device; block tensors are
// (n_blocks, 128, 128); y is (tokens, d_out). Every function returns an ArmorStatus; nothing allocates,
// nothing synchronises, every launch goes to the given stream (so calls can be captured in a CUDA graph).
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
  ARMOR_ERROR_SHAPE = 2,      // sizes the kernels do not support (see armor_sm90_supported), tokens < 1
  ARMOR_ERROR_ALIGNMENT = 3,  // a pointer is not 16-byte aligned
  ARMOR_ERROR_CUTLASS = 4,    // CUTLASS can_implement refused the problem
  ARMOR_ERROR_LAUNCH = 5,     // the CUDA launch failed (cudaGetLastError after the launch)
  ARMOR_ERROR_ARGUMENT = 6,   // a required pointer is null, sm_count < 0, or decode tokens > ARMOR_DECODE_MAX_TOKENS
  ARMOR_ERROR_DEVICE = 7,     // sm_count = 0 and the current device's SM count could not be queried
};

enum ArmorDtype { ARMOR_BF16 = 0, ARMOR_FP16 = 1 };

// The only block size of A' and B' the fused kernels support; the most tokens of the decode kernels.
enum { ARMOR_SM90_BLOCK = 128, ARMOR_DECODE_MAX_TOKENS = 16 };

// One call of the op, as one struct (the model is FlashAttention-3's Flash_fwd_params): zero-initialise
// it, fill what the function reads, pass its address. Pointers are device pointers.
typedef struct ArmorLinearParams {
  int dtype;  // ArmorDtype of x, A', B', S, bias and y
  int64_t tokens, d_in, d_out;
  void const* x;         // (tokens, d_in)
  void const* B_blocks;  // B': (d_in / 128, 128, 128)
  void const* A_blocks;  // A': (d_out / 128, 128, 128)
  void const* bias;      // (d_out), or null for none
  // S in the form the function reads:
  //   armor_sm90_linear:        the values and metadata armor_sm90_compress wrote;
  //   armor_sm90_decode_linear: the portable packed form of armor_kernels/sparse24.py, values (d_out, d_in / 2)
  //                             in the dtype and 2-bit positions (d_out, d_in / 8) uint8.
  void const* S_values;
  void const* S_meta;
  void* workspace;      // the function's *_workspace_bytes(...) bytes, uninitialised
  void* y;              // (tokens, d_out)
  int sm_count;         // CTAs the persistent and split-K grids plan for; 0: the device's SM count
  cudaStream_t stream;  // every launch goes here
} ArmorLinearParams;

const char* armor_status_string(int status);

// 1 when the kernels support this dtype and shape (d_out and d_in positive multiples of
// ARMOR_SM90_BLOCK that fit the 32-bit GEMM extents), else 0.
int armor_sm90_supported(int dtype, int64_t d_out, int64_t d_in);

// Sizes of the CUTLASS sm90 compressed form of S: `values_numel` elements of S's dtype and
// `meta_bytes` bytes of metadata. Both depend only on (d_out, d_in) and the dtype.
int armor_sm90_compressed_sizes(int dtype, int64_t d_out, int64_t d_in, int64_t* values_numel, int64_t* meta_bytes);

// One-time compression of a dense 2:4 matrix S (d_out x d_in, at most 2 nonzeros in every group of
// 4 along d_in) into the values + metadata layout the sparse mainloop reads.
int armor_sm90_compress(int dtype, const void* S, int64_t d_out, int64_t d_in, void* values, void* meta,
                        cudaStream_t stream);

// The whole op for any token count: xb = x B'^T as a block-diagonal GEMM into the workspace, then the
// 2:4 sparse GEMM y = xb S^T with A' and bias in its epilogue. Both GEMMs are persistent: sm_count CTAs
// walk their output tiles. Workspace: armor_sm90_linear_workspace_bytes (tokens x d_in elements).
int armor_sm90_linear_workspace_bytes(const ArmorLinearParams* params, int64_t* bytes);
int armor_sm90_linear(const ArmorLinearParams* params);

// Decode sizes (1 <= tokens <= ARMOR_DECODE_MAX_TOKENS): the whole op in two memory-bound launches that
// stream S once in the portable packed form, split along K over sm_count SMs (csrc/sm90_decode.cuh), so
// no compressed copy is needed. The workspace size depends on tokens and sm_count (the split of K).
int armor_sm90_decode_workspace_bytes(const ArmorLinearParams* params, int64_t* bytes);
int armor_sm90_decode_linear(const ArmorLinearParams* params);

// The grids the calling thread's last armor_sm90_linear or armor_sm90_decode_linear launched, in launch
// order, as passed to the launches: the plan its tests assert (the GEMMs' persistent CTAs, the decode
// kernels' K splits), since a result alone cannot tell a planned grid from a full one. Host-side only.
#define ARMOR_MAX_LAUNCHES 2
typedef struct ArmorLaunches {
  int count;
  int grid[ARMOR_MAX_LAUNCHES][3];  // x, y, z
} ArmorLaunches;
void armor_last_launches(ArmorLaunches* out);

#ifdef __cplusplus
}
#endif
