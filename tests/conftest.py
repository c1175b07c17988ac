"""Shared fixtures: the real text, the bundled model and tiny models, each built once per session.

Only torch and pytest are needed to collect the tests (the GPU image has neither transformers nor
rdata): the fixtures import the model and data modules when a test asks for them, and skip that
test when they are missing.

Markers (registered in pyproject.toml):
- `gpu`: needs the fused kernels (an sm_90 GPU and the built armor_kernels._armor_cuda). Such a test
  is skipped, with ops.fused_unavailable_reason(), where they cannot run. With ARMOR_REQUIRE_FUSED=1
  (.ci/gpu_check.sh sets it) nothing passes by skipping: a `gpu` test that skips, for that or any other
  reason, fails instead, and a session in which no `gpu` test passed fails.
- `cuda`: needs a CUDA GPU with 2:4 sparse tensor cores (sm_80 or later) and nothing built by this package
  (torch's semi-structured path); skipped elsewhere, and ARMOR_REQUIRE_CUDA=1 (.ci/gpu_check.sh) makes a
  skip of one a failure, as ARMOR_REQUIRE_FUSED does for `gpu`.
- `multigpu`: needs two CUDA devices (and what its other markers say); ARMOR_REQUIRE_MULTIGPU=1
  (`.ci/gpu_check.sh multigpu`, on a machine with two) makes a skip of one a failure.
- `llmcompressor`: the llm-compressor integration; such a test skips without llm-compressor (as in .venv,
  whose transformers 5.24 llm-compressor 0.14 does not allow) and runs in .venv-llmc
  (scripts/setup_llmcompressor.sh). ARMOR_REQUIRE_LLMCOMPRESSOR=1 (.ci/run sets it there) makes a skip of
  one a failure, and a session in which none passed fails, as ARMOR_REQUIRE_FUSED does for `gpu`.
- ARMOR_REQUIRE_EXTRAS=1 (.ci/run sets it): the optional components CI installs (transformers, rdata, lm-eval,
  triton) must import, so no test of them passes by skipping.
- ARMOR_REQUIRE_BINDING=1 (.ci/run sets it, after .ci/bind_csrc.sh): the CUDA library's binding must load,
  so that its host-side tests run instead of skipping, GPU or not.
- `sanitize(*tools)`: a case .ci/gpu_check.sh runs under compute-sanitizer; `--sanitizer TOOL` keeps
  only the cases marked for TOOL (memcheck, racecheck) and deselects everything else.
"""
import copy
import os

import pytest
import torch

if os.environ.get("ARMOR_REQUIRE_EXTRAS") == "1":  # a missing or broken extra fails the session at once
    import lm_eval.models.huggingface  # noqa: F401
    import rdata  # noqa: F401
    import transformers  # noqa: F401
    import triton  # noqa: F401
if os.environ.get("ARMOR_REQUIRE_BINDING") == "1":
    from armor_kernels import ops
    if ops.NATIVE_IMPORT_ERROR is not None:
        raise RuntimeError(f"ARMOR_REQUIRE_BINDING=1: {ops.NATIVE_IMPORT_ERROR}")


@pytest.fixture(scope="session")
def austen(tmp_path_factory):
    """Title -> text of the six novels, really fetched and extracted into a fresh cache."""
    pytest.importorskip("rdata", reason="needs rdata (pip install '.[models]')")
    from armor_kernels.pipeline import data  # an error of ours fails, never skips
    return data.austen_novels(tmp_path_factory.mktemp("armor_cache"))


@pytest.fixture(scope="session")
def bundled():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct; loading takes ~40 s on 2 cores."""
    pytest.importorskip("transformers", reason="needs transformers (pip install '.[models]')")
    from armor_kernels.pipeline import model  # an error of ours fails, never skips
    return model.load_model()


@pytest.fixture(scope="session")
def tiny_llama():
    """config -> a randomly initialised (seed 0) 2-layer Llama with that config, shrunk.

    Weights are drawn 5x wider than the config's initializer_range (0.02): at 0.02 a 64-wide random
    model predicts an almost uniform distribution, and pruning moves its perplexity by ~1e-7
    relative, below what a float32 sum resolves."""
    transformers = pytest.importorskip("transformers")

    def make(config):
        config = copy.deepcopy(config)
        config.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, initializer_range=0.1))
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()
    return make


# --- The `gpu` and `sanitize` markers (see the module docstring) ---------------------------------

# marker -> the variable that, set, forbids its tests to pass by skipping
REQUIRING = {"gpu": "ARMOR_REQUIRE_FUSED", "cuda": "ARMOR_REQUIRE_CUDA", "multigpu": "ARMOR_REQUIRE_MULTIGPU",
             "llmcompressor": "ARMOR_REQUIRE_LLMCOMPRESSOR"}
REQUIRED = {marker: var for marker, var in REQUIRING.items() if os.environ.get(var, "") not in ("", "0")}
SANITIZERS = ("memcheck", "racecheck")
_PASSED = pytest.StashKey[dict]()  # marker -> how many of its tests passed


def pytest_addoption(parser):
    parser.addoption("--sanitizer", choices=SANITIZERS, default=None,
                     help="run only the tests marked sanitize(...) for this compute-sanitizer tool")


def pytest_configure(config):
    config.stash[_PASSED] = dict.fromkeys(REQUIRED, 0)


def pytest_report_header(config):
    return [f"{var}=1: every {marker}-marked test must run; a skip is a failure" for marker, var in REQUIRED.items()]


def pytest_collection_modifyitems(config, items):
    tool = config.getoption("--sanitizer")
    if tool is None:
        return
    marked = [(item, item.get_closest_marker("sanitize")) for item in items]
    keep = [item for item, m in marked if m is not None and (not m.args or tool in m.args)]
    drop = [item for item, m in marked if item not in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
        from armor_kernels import ops
        reason = ops.fused_unavailable_reason("cuda")
        if reason is not None:
            pytest.skip(f"needs the fused kernels: {reason}")
    if item.get_closest_marker("multigpu") is not None and torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, found {torch.cuda.device_count()}")
    if item.get_closest_marker("cuda") is not None:
        from armor_kernels import semi_structured
        reason = semi_structured.unavailable_reason("cuda", torch.bfloat16)
        if reason is not None:
            pytest.skip(f"needs a CUDA GPU with 2:4 tensor cores: {reason}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    for marker, var in REQUIRED.items():
        if item.get_closest_marker(marker) is None:
            continue
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            report.outcome = "failed"
            report.longrepr = f"{var}=1: a {marker}-marked test may not skip ({reason})"
        elif report.when == "call" and report.passed:
            item.config.stash[_PASSED][marker] += 1
    return report


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.OK and not all(session.config.stash[_PASSED].values()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for marker, passed in config.stash[_PASSED].items():
        terminalreporter.write_line(f"{REQUIRED[marker]}=1: {passed} {marker}-marked tests passed"
                                    + ("" if passed else ": none, so the session fails"), red=not passed)
