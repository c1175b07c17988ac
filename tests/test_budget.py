"""armor_kernels.pipeline.budget: a model-wide byte budget for ARMOR's A and B.

The allocation on made-up curves (never over budget, the best choice when the budget allows it, refuses
what cannot fit), the candidates (blocks that divide 128), and the pipeline: the probe's curves and the
allocation reach the checkpoint's quantization_config, an interrupted probe resumes, and the preset's
combination (budget, asymmetric calibration, reconstruction) gives under torchrun the one-process
checkpoint. The module is also the torchrun workers' script (`worker`, as in test_reconstruct.py).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from architectures import VOCAB, save_sharded, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from armor_kernels.cli import _early, _prune_config, parser
from armor_kernels.factors import block_sizes
from armor_kernels.optim import ArmorOptions
from armor_kernels.pipeline import budget as budget_mod
from armor_kernels.pipeline import prune
from armor_kernels.pipeline.budget import CURVES_FILE, BudgetOptions, ab_params, allocate, candidates
from armor_kernels.pipeline.config import PRESETS, PruneConfig, run_config
from armor_kernels.pipeline.reconstruct import ReconOptions
from armor_kernels.pipeline.source import ModelSource

HERE = Path(__file__).resolve()
CALIB = torch.randint(0, VOCAB, (8, 48), generator=torch.Generator().manual_seed(0))
OPTS = ArmorOptions(block_size=64, iters=1)
BUDGET = BudgetOptions(0.3, probe_iters=2)
RECON = ReconOptions(steps=4, lr=1e-2, batch=2, holdout=2, check=2)


def spent(blocks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> float:
    return sum(ab_params(shapes[k], b) for k, b in blocks.items()) / sum(o * i for o, i in shapes.values())


def random_problem(rng: random.Random, n: int):
    shapes = {f"{k}.lin": rng.choice([(64, 64), (32, 64), (128, 64), (64, 128), (192, 576)]) for k in range(n)}
    curves = {}
    for k, shape in shapes.items():
        loss, curve = rng.uniform(0.05, 0.2), {}
        for b in candidates(shape, 128):
            curve[b] = loss
            loss *= rng.uniform(0.3, 1.05)  # mostly falling, sometimes not
        curves[k] = curve
    return curves, shapes


@pytest.mark.parametrize("seed", range(20))
def test_allocation_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    curves, shapes = random_problem(rng, 12)
    floor = spent({k: min(c) for k, c in curves.items()}, shapes)
    for fraction in (floor, floor * 1.5, rng.uniform(floor, 0.6), 0.3):
        if fraction < floor:
            continue
        blocks = allocate(curves, shapes, fraction)
        assert blocks.keys() == curves.keys() and all(b in curves[k] for k, b in blocks.items())
        assert spent(blocks, shapes) <= fraction + 1e-12


def test_an_ample_budget_buys_every_layers_lowest_loss():
    curves, shapes = random_problem(random.Random(0), 10)
    blocks = allocate(curves, shapes, 10.0)
    assert blocks == {k: min(c, key=lambda b: (c[b], b)) for k, c in curves.items()}


def test_the_budget_goes_where_the_loss_falls_most():
    """Two layers of one shape: the one whose loss falls with wider blocks gets them, the flat one keeps 4."""
    shape = (64, 64)
    steep = {4: 0.10, 8: 0.05, 16: 0.02, 32: 0.01}
    flat = {4: 0.10, 8: 0.099, 16: 0.098, 32: 0.097}
    shapes = {"0.a": shape, "0.b": shape}
    blocks = allocate({"0.a": steep, "0.b": flat}, shapes, spent({"0.a": 32, "0.b": 4}, shapes))
    assert blocks == {"0.a": 32, "0.b": 4}
    assert spent({"0.a": 16, "0.b": 16}, shapes) < spent(blocks, shapes)  # the uniform choice also fits
    loss = lambda bl: steep[bl["0.a"]] + flat[bl["0.b"]]  # noqa: E731
    assert loss(blocks) < loss({"0.a": 16, "0.b": 16})


def test_identical_layers_split_the_budget_evenly():
    shapes = {f"{k}.lin": (64, 64) for k in range(4)}
    curve = {4: 0.1, 8: 0.06, 16: 0.04, 32: 0.03, 64: 0.025}  # convex: every step gains less than the last
    blocks = allocate({k: curve for k in shapes}, shapes, spent({k: 16 for k in shapes}, shapes))
    assert set(blocks.values()) == {16}


def test_a_budget_below_the_smallest_blocks_is_refused():
    shapes = {"0.lin": (64, 64)}
    with pytest.raises(ValueError, match=r"budget: 0.01 of the linears' parameters .* raise --budget"):
        allocate({"0.lin": {4: 0.1, 8: 0.05}}, shapes, 0.01)


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 11008), (96, 40)])
def test_candidates_are_blocks_that_divide_128(shape):
    cands = candidates(shape, 128)
    blocks = [block_sizes(shape, b) for b in cands]
    assert cands and all(128 % x == 0 for bl in blocks for x in bl)
    assert len(set(blocks)) == len(blocks)
    assert all(b <= 32 for b in candidates(shape, 32))


def test_options_and_run_config():
    with pytest.raises(ValueError, match="budget fraction: expected a positive fraction"):
        BudgetOptions(0)
    with pytest.raises(ValueError, match="probe_iters: expected an int ≥ 1, got 0"):
        BudgetOptions(0.05, probe_iters=0)
    model, _ = tiny_model("llama")
    plain = run_config(PruneConfig("armor", options=OPTS), CALIB, model, None)
    assert run_config(PruneConfig("armor", options=OPTS, budget=BUDGET), CALIB, model, None) == {
        **plain, "budget": {"fraction": 0.3, "probe_iters": 2}}
    with pytest.raises(ValueError, match="without a per-layer overhead, got method 'armor', overhead 0.05"):
        run_config(PruneConfig("armor", options=ArmorOptions(overhead=0.05), budget=BUDGET), CALIB, model, None)
    with pytest.raises(ValueError, match="got method 'sparsegpt'"):
        run_config(PruneConfig("sparsegpt", budget=BUDGET), CALIB, model, None)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    model, _ = tiny_model("llama")
    out = tmp_path_factory.mktemp("budget") / "run"
    prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, budget=BUDGET), out)
    return out


def test_the_checkpoint_holds_the_allocation_within_budget(budget_run):
    curves = json.loads((budget_run / CURVES_FILE).read_text())["curves"]
    curves = {k: {int(b): v for b, v in c.items()} for k, c in curves.items()}
    model, _ = tiny_model("llama")
    shapes = {k: tuple(model.get_submodule(f"model.layers.{k}").weight.shape) for k in curves}
    blocks = allocate(curves, shapes, BUDGET.fraction)
    assert spent(blocks, shapes) <= BUDGET.fraction
    assert len(set(blocks.values())) > 1, "the tiny model's layers should not all get one block size"
    modules = json.loads((budget_run / "config.json").read_text())["quantization_config"]["modules"]
    assert {k.removeprefix("model.layers."): tuple(v["block"]) for k, v in modules.items()} == {
        k: block_sizes(shapes[k], b) for k, b in blocks.items()}
    # the stored A and B have those blocks
    for k, b in blocks.items():
        i, name = k.split(".", 1)
        shard = load_file(budget_run / f"model-block-{int(i):05d}.safetensors")
        bA, bB = block_sizes(shapes[k], b)
        assert shard[f"model.layers.{k}.A"].shape[1:] == (bA, bA)
        assert shard[f"model.layers.{k}.B"].shape[1:] == (bB, bB)


def test_an_interrupted_probe_resumes_from_its_saved_curves(budget_run, tmp_path, monkeypatch):
    """The probe of block 0 is saved; a run stopped during block 1's probe probes only block 1 again, and
    the checkpoint is the uninterrupted run's."""
    run, real, probed = tmp_path / "run", budget_mod.probe_block, []

    def stop_in_block_1(linears, stats, options, budget):
        probed.append(sorted(stats))
        if len(probed) == 2:
            raise KeyboardInterrupt
        return real(linears, stats, options, budget)

    monkeypatch.setattr(budget_mod, "probe_block", stop_in_block_1)
    model, _ = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):
        prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, budget=BUDGET), run)
    assert len(json.loads((run / CURVES_FILE).read_text())["curves"]) == 7
    monkeypatch.setattr(budget_mod, "probe_block", lambda *a: probed.append("again") or real(*a))
    model, _ = tiny_model("llama")
    prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, budget=BUDGET), run)
    assert probed.count("again") == 1
    assert (run / CURVES_FILE).read_text() == (budget_run / CURVES_FILE).read_text()
    files = sorted(budget_run.glob("model-block-*.safetensors"))
    assert len(files) == 2  # the tiny model's blocks, each compared below
    for f in files:
        a, b = load_file(f), load_file(run / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _config(argv):
    args = parser(_early(argv).preset).parse_args(argv)
    return _prune_config(args, args.method)


@pytest.mark.parametrize("spelling", [["--preset", "quality"], ["--preset=quality"]])
def test_every_accepted_spelling_of_the_preset_gives_its_config(spelling):
    assert _config(["prune", "--out", "x", *spelling]) == PRESETS["quality"]  # --method armor implied
    assert _config(["prune", *spelling, "--method", "armor", "--out", "x"]) == PRESETS["quality"]
    assert _config(["prune", "--method", "armor", "--out", "x"]) == PruneConfig("armor")  # no preset: the defaults


def test_flags_given_besides_the_preset_win():
    cfg = _config(["prune", "--out", "x", "--preset", "quality", "--recon-steps", "3", "--iters", "5"])
    assert cfg.recon.steps == 3 and cfg.options.iters == 5
    assert cfg.budget == PRESETS["quality"].budget and cfg.recon.lr == PRESETS["quality"].recon.lr
    assert PRESETS["quality"].options.overhead is None  # the budget replaces it


def test_config_flags_give_the_config_back():
    """cli.config_flags (what benchmarks/bench_frontier.py runs its PruneConfigs with) is _prune_config's
    inverse: for the presets, every method's defaults and every configuration the frontier measures."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_frontier import RUNS

    from armor_kernels.cli import config_flags
    configs = [*PRESETS.values(), *(c for c, _ in RUNS.values())]
    assert len(configs) > 20
    for config in configs:
        assert _config(["prune", "--out", "x", *config_flags(config)]) == config, config_flags(config)
    assert config_flags(PruneConfig("sparsegpt")) == ["--method", "sparsegpt"]
    with pytest.raises(ValueError, match="config_flags: batch_size 4 has no flag"):
        config_flags(PruneConfig(batch_size=4))


@pytest.mark.parametrize("argv,message", [
    (["prune", "--method", "armor", "--pre", "quality"], "unrecognized arguments: --pre quality"),  # no abbreviations
    (["prune", "--method", "armor", "--preset", "qualty"], "argument --preset: invalid choice: 'qualty'"),
    (["prune", "--method", "armor", "--preset=qualty"], "argument --preset: invalid choice: 'qualty'"),
    (["prune", "--method", "wanda", "--preset", "quality"],
     "--preset quality: is a configuration of method armor, got --method wanda"),
    (["eval", "--preset", "quality"], "unrecognized arguments: --preset quality"),  # only where it applies
    (["prune"], "--method is required (or --preset NAME)"),
])
def test_any_other_spelling_of_the_preset_fails_with_one_line(argv, message, capsys, tmp_path):
    from armor_kernels.cli import main
    out = [] if argv[0] == "eval" else ["--out", str(tmp_path / "never")]
    try:
        code = main([*argv, *out])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_streamed_architectures(arch, tmp_path):
    """Gemma 2 (per-block attention masks) and Phi-3 (fused qkv and gate_up projections), streamed, with the
    budget and asymmetric calibration: the checkpoint reloads and runs, within its budget."""
    from armor_kernels.integrations.hf import load_pruned_model
    model, _ = tiny_model(arch)
    src = save_sharded(model, tmp_path / "src")
    out = tmp_path / "out"
    prune.prune_model(ModelSource(src), tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, budget=BUDGET,
                      asymmetric=0.1), out, source=arch)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    shapes = {k: tuple(model.get_submodule(k).weight.shape) for k in modules}
    used = sum(o * bA + i * bB for k, ((o, i), (bA, bB)) in
               ((k, (shapes[k], modules[k]["block"])) for k in modules))
    assert used <= BUDGET.fraction * sum(o * i for o, i in shapes.values())
    pruned, _ = load_pruned_model(out)
    with torch.no_grad():
        assert torch.isfinite(pruned(CALIB[:2], use_cache=False).logits).all()


def test_torchrun_two_processes_give_the_one_process_checkpoint(tmp_path):
    """Budget, asymmetric calibration and reconstruction together, streamed."""
    from test_reconstruct import _launch, shards
    model, _ = tiny_model("llama")
    src = save_sharded(model, tmp_path / "src")
    for name, nproc in (("one", 1), ("two", 2)):
        proc = _launch(src, tmp_path / name, nproc, HERE)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = shards(tmp_path / "one"), shards(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 2
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert (tmp_path / "one" / CURVES_FILE).read_text() == (tmp_path / "two" / CURVES_FILE).read_text()
    one, two = (json.loads((tmp_path / n / "armor_run.json").read_text()) for n in ("one", "two"))
    assert one["reports"] == two["reports"] and one["run"]["asymmetric"] and one["run"]["budget"]


def worker(src: str, out: str) -> None:
    prune.prune_model(ModelSource(src), tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, batch_size=2,
                      recon=RECON, asymmetric=0.1, budget=BUDGET), out, source="llama")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
