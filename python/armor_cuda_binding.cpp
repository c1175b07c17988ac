// armor_kernels._armor_cuda: the thin pybind11 layer over csrc/armor_cuda.h.
//
// Tensors cross as integers (data_ptr()), streams as integers (torch.cuda.current_stream().cuda_stream),
// so this file needs neither torch nor CUDA headers (DESIGN 9): torch-side checks, allocation and the
// op registration live in armor_kernels/ops.py. Every call only launches work on the given stream.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "armor_cuda.h"

namespace py = pybind11;

namespace {

template <class T>
T const* ptr(uintptr_t p) {
  return reinterpret_cast<T const*>(p);
}
cudaStream_t stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(int status, char const* what) {
  if (status != ARMOR_OK) {
    throw std::runtime_error(std::string("armor_kernels._armor_cuda.") + what + ": " + armor_status_string(status));
  }
}

}  // namespace

PYBIND11_MODULE(_armor_cuda, m) {
  m.doc() = "ARMOR fused Hopper (sm_90a) kernels; pointers and streams as integers, see csrc/armor_cuda.h";
  m.attr("BF16") = int(ARMOR_BF16);
  m.attr("FP16") = int(ARMOR_FP16);
  m.attr("BLOCK") = int(ARMOR_SM90_BLOCK);
  m.attr("DECODE_MAX_TOKENS") = int(ARMOR_DECODE_MAX_TOKENS);

  m.def("supported", [](int64_t d_out, int64_t d_in) { return armor_sm90_supported(d_out, d_in) == ARMOR_OK; },
        py::arg("d_out"), py::arg("d_in"));

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
      [](int dtype, uintptr_t S, int64_t d_out, int64_t d_in, uintptr_t values, uintptr_t meta, uintptr_t s) {
        check(armor_sm90_compress(dtype, ptr<void>(S), d_out, d_in, reinterpret_cast<void*>(values),
                                  reinterpret_cast<void*>(meta), stream(s)),
              "compress");
      },
      py::arg("dtype"), py::arg("S"), py::arg("d_out"), py::arg("d_in"), py::arg("values"), py::arg("meta"),
      py::arg("stream"));

  m.def(
      "block_diag",
      [](int dtype, uintptr_t x, uintptr_t B, uintptr_t xb, int64_t tokens, int64_t dim, int sm_count, uintptr_t s) {
        check(armor_sm90_block_diag(dtype, ptr<void>(x), ptr<void>(B), reinterpret_cast<void*>(xb), tokens, dim,
                                    sm_count, stream(s)),
              "block_diag");
      },
      py::arg("dtype"), py::arg("x"), py::arg("B"), py::arg("xb"), py::arg("tokens"), py::arg("dim"),
      py::arg("sm_count"), py::arg("stream"));

  m.def(
      "linear",
      [](int dtype, uintptr_t x, uintptr_t B, uintptr_t values, uintptr_t meta, uintptr_t A, uintptr_t bias,
         uintptr_t workspace, uintptr_t y, int64_t tokens, int64_t d_in, int64_t d_out, int sm_count, uintptr_t s) {
        check(armor_sm90_linear(dtype, ptr<void>(x), ptr<void>(B), ptr<void>(values), ptr<void>(meta), ptr<void>(A),
                                ptr<void>(bias), reinterpret_cast<void*>(workspace), reinterpret_cast<void*>(y),
                                tokens, d_in, d_out, sm_count, stream(s)),
              "linear");
      },
      py::arg("dtype"), py::arg("x"), py::arg("B"), py::arg("values"), py::arg("meta"), py::arg("A"),
      py::arg("bias"), py::arg("workspace"), py::arg("y"), py::arg("tokens"), py::arg("d_in"), py::arg("d_out"),
      py::arg("sm_count"), py::arg("stream"),
      "y = ((x B'^T) S^T) A'^T + bias; bias = 0 for none; workspace holds tokens x d_in elements");

  m.def(
      "decode_workspace_bytes",
      [](int dtype, int64_t d_out, int64_t d_in, int64_t tokens, int sm_count) {
        int64_t bytes = 0;
        check(armor_sm90_decode_workspace_bytes(dtype, d_out, d_in, tokens, sm_count, &bytes),
              "decode_workspace_bytes");
        return bytes;
      },
      py::arg("dtype"), py::arg("d_out"), py::arg("d_in"), py::arg("tokens"), py::arg("sm_count"));

  m.def(
      "decode_linear",
      [](int dtype, uintptr_t x, uintptr_t B, uintptr_t S_values, uintptr_t S_idx, uintptr_t A, uintptr_t bias,
         uintptr_t workspace, uintptr_t y, int64_t tokens, int64_t d_in, int64_t d_out, int sm_count, uintptr_t s) {
        check(armor_sm90_decode_linear(dtype, ptr<void>(x), ptr<void>(B), ptr<void>(S_values), ptr<void>(S_idx),
                                       ptr<void>(A), ptr<void>(bias), reinterpret_cast<void*>(workspace),
                                       reinterpret_cast<void*>(y), tokens, d_in, d_out, sm_count, stream(s)),
              "decode_linear");
      },
      py::arg("dtype"), py::arg("x"), py::arg("B"), py::arg("S_values"), py::arg("S_idx"), py::arg("A"),
      py::arg("bias"), py::arg("workspace"), py::arg("y"), py::arg("tokens"), py::arg("d_in"), py::arg("d_out"),
      py::arg("sm_count"), py::arg("stream"),
      "decode-sized y = ((x B'^T) S^T) A'^T + bias from the portable packed S; bias = 0 for none");
}
