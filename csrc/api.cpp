// The C API of armor_cuda.h: argument checks, the sm_count default and dtype dispatch. Plain C++ (no
// CUTLASS, no torch); the kernels behind it are in the per-dtype translation units (sm90_dispatch.h).
#include <cstdint>
#include <cuda_runtime_api.h>

#include "armor_cuda.h"
#include "sm90_dispatch.h"
#include "split_k.h"

namespace {

thread_local ArmorLaunches last_launches{};  // the calling thread's last op call (armor_last_launches)

bool aligned16(void const* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// GEMM extents are 32-bit in the kernels; tokens * d_in and friends are 64-bit pointer offsets.
bool fits_int(int64_t v) { return v > 0 && v <= INT32_MAX; }

bool known_dtype(int dtype) { return dtype == ARMOR_BF16 || dtype == ARMOR_FP16; }

constexpr int kElementBytes = 2;  // both dtypes are 16-bit

int problem_status(int dtype, int64_t d_out, int64_t d_in) {
  if (!known_dtype(dtype)) return ARMOR_ERROR_DTYPE;
  return armor_sm90_supported(dtype, d_out, d_in) ? ARMOR_OK : ARMOR_ERROR_SHAPE;
}

// The checks every entry point of the op shares. On success `out` is *p with sm_count resolved (0: the
// current device's SM count), which is what the kernels and the workspace sizes are planned with.
int resolve(ArmorLinearParams const* p, ArmorLinearParams* out) {
  if (p == nullptr) return ARMOR_ERROR_ARGUMENT;
  if (int s = problem_status(p->dtype, p->d_out, p->d_in)) return s;
  if (!fits_int(p->tokens)) return ARMOR_ERROR_SHAPE;
  if (p->sm_count < 0) return ARMOR_ERROR_ARGUMENT;
  *out = *p;
  if (out->sm_count == 0) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&out->sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        out->sm_count <= 0) {
      (void)cudaGetLastError();  // leave no error behind for the next launch check
      return ARMOR_ERROR_DEVICE;
    }
  }
  return ARMOR_OK;
}

// The tensors the op reads or writes: present (bias may be null) and 16-byte aligned.
int pointer_status(ArmorLinearParams const& p) {
  void const* const used[] = {p.x, p.B_blocks, p.A_blocks, p.S_values, p.S_meta, p.workspace, p.y};
  for (void const* q : used) {
    if (q == nullptr) return ARMOR_ERROR_ARGUMENT;
  }
  for (void const* q : used) {
    if (!aligned16(q)) return ARMOR_ERROR_ALIGNMENT;
  }
  return ARMOR_OK;
}

int decode_status(ArmorLinearParams const* params, ArmorLinearParams* p) {
  if (int s = resolve(params, p)) return s;
  return p->tokens <= ARMOR_DECODE_MAX_TOKENS ? ARMOR_OK : ARMOR_ERROR_ARGUMENT;
}

}  // namespace

extern "C" {

const char* armor_status_string(int status) {
  switch (status) {
    case ARMOR_OK: return "ok";
    case ARMOR_ERROR_DTYPE: return "unsupported dtype (expected bf16 or fp16)";
    case ARMOR_ERROR_SHAPE:
      return "unsupported shape (d_out and d_in must be positive multiples of 128 below 2^31, tokens >= 1)";
    case ARMOR_ERROR_ALIGNMENT: return "a tensor's data pointer is not 16-byte aligned";
    case ARMOR_ERROR_CUTLASS: return "CUTLASS refused the problem (can_implement)";
    case ARMOR_ERROR_LAUNCH: return "CUDA kernel launch failed";
    case ARMOR_ERROR_ARGUMENT:
      return "invalid argument (a required pointer is null, sm_count is negative, or decode tokens exceed 16)";
    case ARMOR_ERROR_DEVICE: return "sm_count = 0 and the current CUDA device's SM count could not be queried";
    default: return "unknown armor status";
  }
}

int armor_sm90_supported(int dtype, int64_t d_out, int64_t d_in) {
  return known_dtype(dtype) && fits_int(d_out) && fits_int(d_in) && d_out % ARMOR_SM90_BLOCK == 0 &&
         d_in % ARMOR_SM90_BLOCK == 0;
}

int armor_sm90_compressed_sizes(int dtype, int64_t d_out, int64_t d_in, int64_t* values_numel, int64_t* meta_bytes) {
  if (int s = problem_status(dtype, d_out, d_in)) return s;
  if (values_numel == nullptr || meta_bytes == nullptr) return ARMOR_ERROR_ARGUMENT;
  auto sizes = dtype == ARMOR_BF16 ? armor::sm90::compressed_sizes_bf16 : armor::sm90::compressed_sizes_fp16;
  return sizes(d_out, d_in, values_numel, meta_bytes);
}

int armor_sm90_compress(int dtype, const void* S, int64_t d_out, int64_t d_in, void* values, void* meta,
                        cudaStream_t stream) {
  if (int s = problem_status(dtype, d_out, d_in)) return s;
  if (S == nullptr || values == nullptr || meta == nullptr) return ARMOR_ERROR_ARGUMENT;
  if (!aligned16(S) || !aligned16(values) || !aligned16(meta)) return ARMOR_ERROR_ALIGNMENT;
  auto compress = dtype == ARMOR_BF16 ? armor::sm90::compress_bf16 : armor::sm90::compress_fp16;
  return compress(S, d_out, d_in, values, meta, stream);
}

int armor_sm90_linear_workspace_bytes(const ArmorLinearParams* params, int64_t* bytes) {
  ArmorLinearParams p;
  if (int s = resolve(params, &p)) return s;
  if (bytes == nullptr) return ARMOR_ERROR_ARGUMENT;
  *bytes = p.tokens * p.d_in * kElementBytes;  // xb = x B'^T
  return ARMOR_OK;
}

int armor_sm90_linear(const ArmorLinearParams* params) {
  last_launches = ArmorLaunches{};
  ArmorLinearParams p;
  if (int s = resolve(params, &p)) return s;
  if (int s = pointer_status(p)) return s;
  bool const bf16 = p.dtype == ARMOR_BF16;
  if (int s = (bf16 ? armor::sm90::block_diag_bf16 : armor::sm90::block_diag_fp16)(p)) return s;
  return (bf16 ? armor::sm90::sparse_linear_out_bf16 : armor::sm90::sparse_linear_out_fp16)(p);
}

int armor_sm90_decode_workspace_bytes(const ArmorLinearParams* params, int64_t* bytes) {
  ArmorLinearParams p;
  if (int s = decode_status(params, &p)) return s;
  if (bytes == nullptr) return ARMOR_ERROR_ARGUMENT;
  *bytes = armor::decode::workspace_layout(p.d_out, p.d_in, p.tokens, kElementBytes, p.sm_count).bytes;
  return ARMOR_OK;
}

int armor_sm90_decode_linear(const ArmorLinearParams* params) {
  last_launches = ArmorLaunches{};
  ArmorLinearParams p;
  if (int s = decode_status(params, &p)) return s;
  if (int s = pointer_status(p)) return s;
  return (p.dtype == ARMOR_BF16 ? armor::sm90::decode_linear_bf16 : armor::sm90::decode_linear_fp16)(p);
}

void armor_last_launches(ArmorLaunches* out) {
  if (out != nullptr) *out = last_launches;
}

}  // extern "C"

void armor::sm90::record_launch(dim3 const& grid) {
  if (last_launches.count < ARMOR_MAX_LAUNCHES) {
    int* g = last_launches.grid[last_launches.count++];
    g[0] = int(grid.x), g[1] = int(grid.y), g[2] = int(grid.z);
  }
}
