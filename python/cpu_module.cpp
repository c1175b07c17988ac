// armor_kernels._armor_cpu: a thin pybind11 binding of csrc/cpu (no torch, no numpy headers).
// Tensors cross as integer data pointers (tensor.data_ptr()); the caller (tile_sweep.sweep_tiles_cpu)
// checks dtype, device, shapes and contiguity.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "sweep.h"

namespace py = pybind11;

namespace {
template <typename T>
T* as_ptr(std::uintptr_t p) {
    return reinterpret_cast<T*>(p);
}
}  // namespace

PYBIND11_MODULE(_armor_cpu, m) {
    m.doc() = "ARMOR CPU kernels (C++17/OpenMP, torch-free): the S-step sweep";
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
    m.def("build_info", &armor_cpu::build_info, "OpenMP version and SIMD clones of this build");
}
