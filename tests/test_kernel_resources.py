"""The static resource check of the compiled kernels (.ci/check_kernels.py) on captured tool output.

tests/data/kernel_resources holds cuobjdump 13.2's output (`--dump-resource-usage`, and of `--dump-elf`
each kernel's .nv.info section cut down to four attributes) for two libraries built with nvcc 13.0 for
sm_90a: libarmor_cuda.so (resource_usage.txt, nv_info.txt, and c++filt's reading of its kernel names in
demangled.txt) and a test library (spill_*.txt) whose kernel spill<64> keeps 64 floats per thread under
__launch_bounds__(1024, 2), i.e. 32 registers: ptxas -v reported 368 bytes of spill stores for it.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "kernel_resources"

_spec = importlib.util.spec_from_file_location("check_kernels", ROOT / ".ci" / "check_kernels.py")
ck = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ck  # dataclasses look their module up there
_spec.loader.exec_module(ck)

# armor_kernel_smem's output for the same library.
SMEM_TOOL = """\
FusedLinear<bfloat16_t>::GemmKernel\t220160
FusedLinear<bfloat16_t>::Compress::Kernel\t40960
BlockDiag<bfloat16_t>::GemmKernel\t214016
FusedLinear<half_t>::GemmKernel\t220160
FusedLinear<half_t>::Compress::Kernel\t40960
BlockDiag<half_t>::GemmKernel\t214016
"""


def library():
    usage = ck.parse_resource_usage((DATA / "resource_usage.txt").read_text())
    threads = ck.parse_max_threads((DATA / "nv_info.txt").read_text())
    demangled = dict(zip(usage, (DATA / "demangled.txt").read_text().splitlines()))
    return usage, threads, demangled


def row(**kw):
    base = dict(label="k", threads=256, regs=64, local_bytes=0, static_smem=0, dynamic_smem=0)
    return ck.Row(**{**base, **kw})


def test_parsers_read_every_kernel():
    usage, threads, demangled = library()
    assert len(usage) == 14 and set(threads) == set(usage)
    fused = next(n for n in usage if "21EpilogueBlockDiagLeft" in n and "10bfloat16_t" in n)
    assert usage[fused] == ck.Usage("sm_90a", 168, 0, 1024, 0)
    assert threads[fused] == 384
    split = "_ZN5armor4sm9013decode_detail13sparse_splitkIN7cutlass6half_tELi2EEEvNS1_6ParamsIT_EE"
    assert usage[split] == ck.Usage("sm_90a", 79, 0, 5377, 0) and threads[split] == 256
    assert demangled[split] == ("void armor::sm90::decode_detail::sparse_splitk<cutlass::half_t, 2>"
                                "(armor::sm90::decode_detail::Params<cutlass::half_t>)")
    assert ck.parse_smem_tool(SMEM_TOOL)["BlockDiag<half_t>::GemmKernel"] == 214016


def test_cutlass_kernels_are_told_apart():
    usage, _, _ = library()
    labels = {ck.cutlass_label(n) for n in usage if n.startswith(ck.CUTLASS_KERNEL)}
    assert labels == set(ck.parse_smem_tool(SMEM_TOOL))
    # The bf16 block-diagonal GEMM also names half_t (its epilogue's copy atom): still bf16.
    bf16_bd = next(n for n in usage if "34MainloopSm90TmaGmmaWarpSpecialized" in n and "10bfloat16_t" in n)
    assert "6half_t" in bf16_bd and ck.cutlass_label(bf16_bd) == "BlockDiag<bfloat16_t>::GemmKernel"


def test_library_within_limits_and_table():
    rows, errors = ck.build_rows(*library(), ck.parse_smem_tool(SMEM_TOOL))
    assert errors == [] and all(r.problems() == [] for r in rows)
    by_label = {r.label: r for r in rows}
    fused = by_label["FusedLinear<bfloat16_t>::GemmKernel"]
    assert (fused.threads, fused.regs, fused.static_smem, fused.dynamic_smem) == (384, 168, 0, 220160)
    # static shared memory less the 1 KB sm_90 reserves: ptxas -v's 4353 bytes; none used, none reserved
    assert by_label["sparse_splitk<half_t, 2>"].static_smem == 4353
    assert by_label["input_transform<half_t, 2>"].static_smem == 0
    table = ck.render_table(rows)
    assert table.count("\n") == 2 + 14
    assert "| `FusedLinear<bfloat16_t>::GemmKernel` | 384 | 168 | 64512 | 0 | 0 | 220160 | 220160 |" in table


def test_spill_fails():
    usage = ck.parse_resource_usage((DATA / "spill_resource_usage.txt").read_text())
    threads = ck.parse_max_threads((DATA / "spill_nv_info.txt").read_text())
    demangled = {n: f"void {n}()" for n in usage}
    rows, errors = ck.build_rows(usage, threads, demangled, {})
    assert errors == []
    problems = {r.label: r.problems() for r in rows}
    assert problems["_Z5spillILi64EEvPfi"] == [
        "336 bytes of local memory per thread (register spills or local arrays)"]
    # the other kernels of that library have no launch bounds but nospill's, which passes
    assert problems["_Z7nospillPf"] == []
    assert problems["_Z7dynsmemPf"] == ["no __launch_bounds__ in the cubin: threads per CTA unknown"]


@pytest.mark.parametrize("kw, message", [
    (dict(regs=256, threads=128), "256 registers per thread > 255"),
    (dict(regs=176, threads=384), "176 x 384 = 67584 registers per CTA > 65536"),
    (dict(static_smem=48 * 1024 + 1), "49153 bytes of static shared memory > 49152"),
    (dict(static_smem=2048, dynamic_smem=230401), "232449 bytes of shared memory per CTA > 232448"),
    (dict(dynamic_smem=None), "not listed by armor_kernel_smem: dynamic shared memory unknown"),
    (dict(threads=None), "no __launch_bounds__ in the cubin: threads per CTA unknown"),
])
def test_each_limit_fails(kw, message):
    assert row(**kw).problems() == [message]


def test_limits_themselves_pass():
    assert row(regs=255, threads=256).problems() == []
    assert row(regs=128, threads=512, static_smem=48 * 1024, dynamic_smem=232448 - 48 * 1024).problems() == []


def test_unknown_and_missing_cutlass_kernels_are_errors():
    usage, threads, demangled = library()
    tool = ck.parse_smem_tool(SMEM_TOOL)
    del tool["FusedLinear<half_t>::Compress::Kernel"]
    _, errors = ck.build_rows(usage, threads, demangled, {**tool, "Other<half_t>::GemmKernel": 1})
    assert errors == ["armor_kernel_smem lists Other<half_t>::GemmKernel, not found in the library"]
    rows, _ = ck.build_rows(usage, threads, demangled, tool)
    assert [r.label for r in rows if r.dynamic_smem is None] == ["FusedLinear<half_t>::Compress::Kernel"]
    strange = {"_ZN7cutlass13device_kernelINS_3fooEEEvNT_6ParamsE": ck.Usage("sm_90a", 32, 0, 1024, 0)}
    _, errors = ck.build_rows(strange, {}, {}, {})
    assert len(errors) == 1 and errors[0].startswith("unknown CUTLASS kernel")


def test_readme_table_round_trip():
    readme = f"intro\n{ck.BEGIN}\nold table\n{ck.END}\nrest\n"
    new = ck.replace_table(readme, "| new |\n")
    assert new == f"intro\n{ck.BEGIN}\n| new |\n{ck.END}\nrest\n"
    assert ck.committed_table(new) == "| new |\n"
    # csrc/README.md holds a table in the script's own format (what a build gives is compared in CI)
    committed = ck.committed_table(ck.README.read_text())
    assert committed.startswith(ck.render_table([]).rstrip("\n")) and committed.count("\n| `") >= 14
