// The ARMOR op on the CPU from the portable packed 2:4 form: y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias.
//
// Torch-free, Python-free C++17 (bound by python/cpu_module.cpp; the PyTorch reference is
// armor_kernels.ops.reference). Layouts, all dense row-major:
//   x       (T, d_in)              storage dtype
//   values  (d_out, d_in/2)        storage dtype: the kept values of S, two per group of 4, column order
//   idx     (d_out, d_in/8) uint8  their 2-bit positions in the group, four to a byte, low bits first
//   A       (d_out/bA, bA, bA)     storage dtype, or null (no output wrapper: a plain 2:4 layer)
//   B       (d_in/bB, bB, bB)      storage dtype, or null (no input wrapper)
//   bias    (d_out)                storage dtype, or null
//   y       (T, d_out)             storage dtype, written
// Storage dtype: float32, bfloat16 or float16 (Dtype). Every product is accumulated in float32 and
// rounded to the storage dtype once, at the end.
//
// Work is split over output rows (and over the wrappers' rows); each output element is computed by
// one thread in an order fixed by the shapes alone, so the result does not depend on the thread count.
#pragma once

#include <cstdint>

namespace armor_cpu {

enum class Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };

struct PackedLinearArgs {
    const void* x = nullptr;
    const void* values = nullptr;
    const std::uint8_t* idx = nullptr;
    const void* A = nullptr;
    const void* B = nullptr;
    const void* bias = nullptr;
    void* y = nullptr;
    std::int64_t tokens = 0, d_in = 0, d_out = 0, block_A = 0, block_B = 0;
    Dtype dtype = Dtype::F32;
    int num_threads = 0;    // <= 0: the OpenMP default
    bool portable = false;  // the portable code even where the CPU has AVX2 (tests compare both)
    std::int64_t lanes_from = 0;  // tokens from which the AVX2 code holds them along the lanes; <= 0: 16
};

// The sparse kernel, any token count: S read from its packed form once per group of up to 4 tokens (each
// kept value's input selected from its 2-bit position in vector registers) or, from 16 tokens on, once per
// 64 tokens held along the vector lanes. Throws std::invalid_argument on bad sizes.
void packed_linear(const PackedLinearArgs& a);

// Rows [row0, row0 + rows) of S unpacked into out (rows, d_in), zeros included, in the storage dtype
// or (out_f32) in float32: the tile the tiled path hands to a dense GEMM.
void unpack_rows(const void* values, const std::uint8_t* idx, std::int64_t row0, std::int64_t rows,
                 std::int64_t d_in, Dtype dtype, void* out, bool out_f32, int num_threads = 0);

// The instruction set packed_linear runs with on this CPU (unless told portable): "avx2" or "portable".
const char* packed_isa();

}  // namespace armor_cpu
