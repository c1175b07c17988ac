// armor_kernels._armor_cpu: a thin pybind11 binding of csrc/cpu (no torch, no numpy headers).
// Tensors cross as integer data pointers (tensor.data_ptr()); the callers (tile_sweep.sweep_tiles_cpu,
// ops._linear_cpu) check dtype, device, shapes and contiguity. A pointer of 0 is an absent operand.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "packed_linear.h"
#include "sweep.h"

namespace py = pybind11;

namespace {
template <typename T>
T* as_ptr(std::uintptr_t p) {
    return reinterpret_cast<T*>(p);
}
}  // namespace

PYBIND11_MODULE(_armor_cpu, m) {
    m.doc() = "ARMOR CPU kernels (C++17/OpenMP, torch-free): the S-step sweep and the packed 2:4 linear";
    m.def(
        "sweep_tiles",
        [](std::uintptr_t R, std::uintptr_t A, std::uintptr_t Bt, std::uintptr_t S, std::int64_t T,
           std::int64_t bA, std::int64_t bB, int passes, int num_threads) {
            armor_cpu::sweep_tiles(as_ptr<float>(R), as_ptr<const float>(A), as_ptr<const float>(Bt),
                                   as_ptr<float>(S), T, bA, bB, passes, num_threads);
        },
        py::arg("R_ptr"), py::arg("A_ptr"), py::arg("Bt_ptr"), py::arg("S_ptr"), py::arg("T"),
        py::arg("bA"), py::arg("bB"), py::arg("passes") = 1, py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "S-step sweep over T independent tiles, in place on R and S. Pointers: contiguous float32\n"
        "R (T,bA,bB), A (T,bA,bA), Bt (T,bB,bB), S (T,bA,bB), no overlap. num_threads <= 0: OpenMP default.");
    m.def(
        "packed_linear",
        [](std::uintptr_t x, std::uintptr_t values, std::uintptr_t idx, std::uintptr_t A, std::uintptr_t B,
           std::uintptr_t bias, std::uintptr_t y, std::int64_t tokens, std::int64_t d_in, std::int64_t d_out,
           std::int64_t block_A, std::int64_t block_B, int dtype, int num_threads, bool portable,
           std::int64_t lanes_from) {
            armor_cpu::PackedLinearArgs a;
            a.x = as_ptr<const void>(x);
            a.values = as_ptr<const void>(values);
            a.idx = as_ptr<const std::uint8_t>(idx);
            a.A = as_ptr<const void>(A);
            a.B = as_ptr<const void>(B);
            a.bias = as_ptr<const void>(bias);
            a.y = as_ptr<void>(y);
            a.tokens = tokens, a.d_in = d_in, a.d_out = d_out, a.block_A = block_A, a.block_B = block_B;
            a.dtype = static_cast<armor_cpu::Dtype>(dtype);
            a.num_threads = num_threads;
            a.portable = portable;
            a.lanes_from = lanes_from;
            armor_cpu::packed_linear(a);
        },
        py::arg("x"), py::arg("values"), py::arg("idx"), py::arg("A"), py::arg("B"), py::arg("bias"), py::arg("y"),
        py::arg("tokens"), py::arg("d_in"), py::arg("d_out"), py::arg("block_A"), py::arg("block_B"),
        py::arg("dtype"), py::arg("num_threads") = 0, py::arg("portable") = false, py::arg("lanes_from") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "y = ((x B'^T) S^T) A'^T + bias from S's kept values and 2-bit positions (csrc/cpu/packed_linear.h).\n"
        "dtype: 0 float32, 1 bfloat16, 2 float16. A, B, bias: 0 when absent. lanes_from: the token count from\n"
        "which the tokens are held along the vector lanes (0: the kernel's own, 16).");
    m.def(
        "unpack_rows",
        [](std::uintptr_t values, std::uintptr_t idx, std::int64_t row0, std::int64_t rows, std::int64_t d_in,
           int dtype, std::uintptr_t out, bool out_f32, int num_threads) {
            armor_cpu::unpack_rows(as_ptr<const void>(values), as_ptr<const std::uint8_t>(idx), row0, rows, d_in,
                                   static_cast<armor_cpu::Dtype>(dtype), as_ptr<void>(out), out_f32, num_threads);
        },
        py::arg("values"), py::arg("idx"), py::arg("row0"), py::arg("rows"), py::arg("d_in"), py::arg("dtype"),
        py::arg("out"), py::arg("out_f32") = false, py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
        "Rows [row0, row0 + rows) of packed S into the dense (rows, d_in) buffer out (the storage dtype, or\n"
        "float32 with out_f32), zeros included.");
    m.def("packed_isa", &armor_cpu::packed_isa, "the instruction set packed_linear uses here: avx2 or portable");
    m.def("build_info", &armor_cpu::build_info, "OpenMP version and SIMD clones of this build");
}
