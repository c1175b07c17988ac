// Prints the dynamic shared memory each CUTLASS kernel of libarmor_cuda is launched with: the cubin
// holds only static shared memory, while these kernels (cutlass::device_kernel<K>) take
// K::SharedStorageSize bytes at launch (sm90_scheduler.cuh's launch for the GEMMs, CUTLASS's
// TransformUniversalAdapter for the compressor). Compiled with the library's headers and flags, so the
// sizes are those of the library's kernels; only types are named, so no kernel is compiled (~25 s).
// One line per kernel, "label<TAB>bytes", read by .ci/check_kernels.py, which finds each label's kernel
// in the cubin by its mangled name.
#include <cstdio>

#include "sm90_block_diag.cuh"
#include "sm90_fused_linear.cuh"

namespace {

template <class Element>
void print(char const* element) {
  using namespace armor::sm90;
  std::printf("FusedLinear<%s>::GemmKernel\t%d\n", element, int(FusedLinear<Element>::GemmKernel::SharedStorageSize));
  std::printf("FusedLinear<%s>::Compress::Kernel\t%d\n", element,
              int(FusedLinear<Element>::Compress::Kernel::SharedStorageSize));
  std::printf("BlockDiag<%s>::GemmKernel\t%d\n", element, int(BlockDiag<Element>::GemmKernel::SharedStorageSize));
}

}  // namespace

int main() {
  print<cutlass::bfloat16_t>("bfloat16_t");
  print<cutlass::half_t>("half_t");
  return 0;
}
