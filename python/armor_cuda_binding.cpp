// armor_kernels._armor_cuda: the thin pybind11 layer over csrc/armor_cuda.h.
//
// Tensors cross as integers (data_ptr()), streams as integers (torch.cuda.current_stream().cuda_stream),
// so this file needs neither torch nor CUDA headers (docs/DESIGN.md §9): torch-side checks, allocation
// and the op registration live in armor_kernels/ops.py. Every call only launches work on the given stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "armor_cuda.h"

namespace py = pybind11;

namespace {

void check(int status, char const* what) {
  if (status != ARMOR_OK) {
    throw std::runtime_error(std::string("armor_kernels._armor_cuda.") + what + ": " + armor_status_string(status));
  }
}

template <class T>
T as_pointer(uintptr_t p) {
  return reinterpret_cast<T>(p);
}

// A pointer field of ArmorLinearParams as an integer property.
template <class T>
void pointer_property(py::class_<ArmorLinearParams>& cls, char const* name, T ArmorLinearParams::* field) {
  cls.def_property(
      name, [field](ArmorLinearParams const& p) { return reinterpret_cast<uintptr_t>(p.*field); },
      [field](ArmorLinearParams& p, uintptr_t v) { p.*field = as_pointer<T>(v); });
}

template <int (*fn)(ArmorLinearParams const*, int64_t*)>
int64_t bytes_of(ArmorLinearParams const& p, char const* what) {
  int64_t bytes = 0;
  check(fn(&p, &bytes), what);
  return bytes;
}

}  // namespace

PYBIND11_MODULE(_armor_cuda, m) {
  m.doc() = "ARMOR fused Hopper (sm_90a) kernels; pointers and streams as integers, see csrc/armor_cuda.h";
  m.attr("BF16") = int(ARMOR_BF16);
  m.attr("FP16") = int(ARMOR_FP16);
  m.attr("BLOCK") = int(ARMOR_SM90_BLOCK);
  m.attr("DECODE_MAX_TOKENS") = int(ARMOR_DECODE_MAX_TOKENS);

  py::class_<ArmorLinearParams> params(m, "Params", "csrc/armor_cuda.h's ArmorLinearParams; pointers as integers");
  params.def(py::init([](int dtype, int64_t tokens, int64_t d_in, int64_t d_out, uintptr_t x, uintptr_t B_blocks,
                         uintptr_t A_blocks, uintptr_t bias, uintptr_t S_values, uintptr_t S_meta, uintptr_t workspace,
                         uintptr_t y, int sm_count, uintptr_t stream) {
               ArmorLinearParams p{};
               p.dtype = dtype, p.tokens = tokens, p.d_in = d_in, p.d_out = d_out, p.sm_count = sm_count;
               p.x = as_pointer<void const*>(x), p.B_blocks = as_pointer<void const*>(B_blocks);
               p.A_blocks = as_pointer<void const*>(A_blocks), p.bias = as_pointer<void const*>(bias);
               p.S_values = as_pointer<void const*>(S_values), p.S_meta = as_pointer<void const*>(S_meta);
               p.workspace = as_pointer<void*>(workspace), p.y = as_pointer<void*>(y);
               p.stream = as_pointer<cudaStream_t>(stream);
               return p;
             }),
             py::kw_only(), py::arg("dtype"), py::arg("tokens"), py::arg("d_in"), py::arg("d_out"), py::arg("x") = 0,
             py::arg("B_blocks") = 0, py::arg("A_blocks") = 0, py::arg("bias") = 0, py::arg("S_values") = 0,
             py::arg("S_meta") = 0, py::arg("workspace") = 0, py::arg("y") = 0, py::arg("sm_count") = 0,
             py::arg("stream") = 0);
  params.def_readwrite("dtype", &ArmorLinearParams::dtype)
      .def_readwrite("tokens", &ArmorLinearParams::tokens)
      .def_readwrite("d_in", &ArmorLinearParams::d_in)
      .def_readwrite("d_out", &ArmorLinearParams::d_out)
      .def_readwrite("sm_count", &ArmorLinearParams::sm_count);
  pointer_property(params, "x", &ArmorLinearParams::x);
  pointer_property(params, "B_blocks", &ArmorLinearParams::B_blocks);
  pointer_property(params, "A_blocks", &ArmorLinearParams::A_blocks);
  pointer_property(params, "bias", &ArmorLinearParams::bias);
  pointer_property(params, "S_values", &ArmorLinearParams::S_values);
  pointer_property(params, "S_meta", &ArmorLinearParams::S_meta);
  pointer_property(params, "workspace", &ArmorLinearParams::workspace);
  pointer_property(params, "y", &ArmorLinearParams::y);
  pointer_property(params, "stream", &ArmorLinearParams::stream);

  m.def(
      "supported", [](int dtype, int64_t d_out, int64_t d_in) { return armor_sm90_supported(dtype, d_out, d_in) != 0; },
      py::arg("dtype"), py::arg("d_out"), py::arg("d_in"),
      "whether the kernels support this dtype code and d_out x d_in");

  m.def(
      "compressed_sizes",
      [](int dtype, int64_t d_out, int64_t d_in) {
        int64_t values = 0, meta = 0;
        check(armor_sm90_compressed_sizes(dtype, d_out, d_in, &values, &meta), "compressed_sizes");
        return std::make_pair(values, meta);
      },
      py::arg("dtype"), py::arg("d_out"), py::arg("d_in"),
      "(values_numel, meta_bytes) of the sm90 compressed form of a d_out x d_in 2:4 matrix");

  m.def(
      "compress",
      [](int dtype, uintptr_t S, int64_t d_out, int64_t d_in, uintptr_t values, uintptr_t meta, uintptr_t stream) {
        check(armor_sm90_compress(dtype, as_pointer<void const*>(S), d_out, d_in, as_pointer<void*>(values),
                                  as_pointer<void*>(meta), as_pointer<cudaStream_t>(stream)),
              "compress");
      },
      py::arg("dtype"), py::arg("S"), py::arg("d_out"), py::arg("d_in"), py::arg("values"), py::arg("meta"),
      py::arg("stream"));

  m.def(
      "linear_workspace_bytes",
      [](ArmorLinearParams const& p) {
        return bytes_of<armor_sm90_linear_workspace_bytes>(p, "linear_workspace_bytes");
      },
      py::arg("params"));
  m.def(
      "linear", [](ArmorLinearParams const& p) { check(armor_sm90_linear(&p), "linear"); }, py::arg("params"),
      "y = ((x B'^T) S^T) A'^T + bias with S compressed (compress), any token count");
  m.def(
      "decode_workspace_bytes",
      [](ArmorLinearParams const& p) {
        return bytes_of<armor_sm90_decode_workspace_bytes>(p, "decode_workspace_bytes");
      },
      py::arg("params"));
  m.def(
      "decode_linear", [](ArmorLinearParams const& p) { check(armor_sm90_decode_linear(&p), "decode_linear"); },
      py::arg("params"), "decode-sized y = ((x B'^T) S^T) A'^T + bias from the portable packed S");
  m.def(
      "last_launches",
      [] {
        ArmorLaunches l{};
        armor_last_launches(&l);
        std::vector<std::tuple<int, int, int>> grids;
        for (int i = 0; i < l.count; ++i) grids.emplace_back(l.grid[i][0], l.grid[i][1], l.grid[i][2]);
        return grids;
      },
      "the grids (x, y, z) this thread's last linear / decode_linear launched, in order");
}
