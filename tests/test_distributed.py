"""armor_kernels.pipeline.distributed: 2 gloo processes under torchrun, as users launch them.

The module is also the workers' script: `python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py SCENARIO OUT` runs `worker(SCENARIO, OUT)` in each process, which saves what
it saw in OUT/rank{R}.pt; the tests compare that with one process's results. Each torchrun takes ~10 s
on 2 cores (start-up, imports); the happy path runs once for several tests.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from armor_kernels.nn import ArmorLinear, Sparse24Linear
from armor_kernels.pipeline import distributed as D
from armor_kernels.pipeline import recorder as R
from armor_kernels.pipeline import scheduling
from armor_kernels.stats import ActivationStats

HERE = Path(__file__).resolve()
ROWS = (3, 5, 2, 4, 6)  # tokens per calibration batch: 5 batches, split 3 / 2 over 2 ranks
N_BATCHES = len(ROWS)
PEER_STOPPED = re.compile(r"armor-kernels: rank 0: a peer process stopped \(.+\); finished blocks are saved, "
                          r"the same torchrun command resumes")
# pruned modules to share: name -> (d_out, d_in, kind, bias)
SHARED = {"self_attn.q_proj": (16, 32, "armor", False), "self_attn.o_proj": (16, 16, "sparse24", False),
          "mlp.up_proj": (32, 16, "armor", True), "mlp.down_proj": (16, 32, "sparse24", True)}


class TinyBlock(nn.Module):
    """Three linears; `a` runs twice per batch (two terms per batch in its statistics)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.c(torch.tanh(self.b(self.a(torch.tanh(self.a(x))))))


def make_block() -> TinyBlock:
    torch.manual_seed(0)
    return TinyBlock().eval()


def batches() -> list[torch.Tensor]:
    """Rows of widely different magnitudes: float64 sums then depend on their order."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, r, 8, generator=g) * 10.0 ** torch.randint(-4, 5, (1, r, 1), generator=g).float()
            for r in ROWS]


def linears_of(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def one_process_stats(full: bool, which=range(N_BATCHES)) -> dict[str, ActivationStats]:
    """What prune.collect_stats forms: ActivationStats.update on every call, batches in order."""
    block = make_block()
    stats = {n: ActivationStats(lin.in_features, full=full) for n, lin in linears_of(block).items()}
    hooks = [lin.register_forward_pre_hook(lambda m, a, s=stats[n]: s.update(a[0]))
             for n, lin in linears_of(block).items()]
    xs = batches()
    with torch.no_grad():
        for b in which:
            block(xs[b])
    for h in hooks:
        h.remove()
    return stats


def owned_module(name: str) -> tuple[nn.Module, dict]:
    """A pruned module only its owner can make (seeded by its name), in the pipeline's stored form."""
    from helpers import random_24

    d_out, d_in, kind, bias = SHARED[name]
    g = torch.Generator().manual_seed(sorted(SHARED).index(name) + 10)
    S = random_24(d_out, d_in, dtype=torch.bfloat16, generator=g)
    b = torch.randn(d_out, generator=g).bfloat16() if bias else None
    if kind == "armor":
        A = torch.randn(d_out // 8, 8, 8, generator=g).bfloat16()
        B = torch.randn(d_in // 8, 8, 8, generator=g).bfloat16()
        mod = ArmorLinear(A, S, B, b).pack()
    else:
        mod = Sparse24Linear.from_weight(S, b)
    return mod, {"loss": float(torch.rand((), generator=g)), "name": name}


def snapshot(stats: dict[str, ActivationStats]) -> dict:
    return {n: {"sq": s.sq, "xx": s.xx, "n_tokens": s.n_tokens, "h": s.h(), "H": None if s.xx is None else s.H()}
            for n, s in stats.items()}


# ---------------------------------------------------------------------------------------------
# The workers (run by torchrun)
# ---------------------------------------------------------------------------------------------

def record(dist: D.Dist, full: bool, store_device=None) -> R.StatsRecorder:
    block, xs = make_block(), batches()
    with torch.no_grad(), R.StatsRecorder(linears_of(block), full, dist, store_device) as rec:
        for b in dist.my_batches(N_BATCHES):
            with rec.batch(b):
                block(xs[b])
    return rec


def worker(scenario: str, out: Path) -> None:
    dist = D.Dist.from_env("cpu")
    res = {"rank": dist.rank, "world_size": dist.world_size, "is_writer": dist.is_writer}
    if scenario == "ok":
        res["mine"] = dist.my_batches(N_BATCHES)
        for full in (False, True):
            res[f"stats_full={full}"] = snapshot(R.combine_stats(dist, record(dist, full), N_BATCHES))
        sizes = {n: lin.weight.numel() for n, lin in linears_of(make_block()).items()}
        owners = scheduling.assign(sizes, dist.world_size)
        res["owners"] = owners
        res["owned"] = snapshot(R.combine_stats(dist, record(dist, True, "cpu"), N_BATCHES, owners=owners))

        assignment = scheduling.assign({n: d_out * d_in for n, (d_out, d_in, _, _) in SHARED.items()}, dist.world_size)
        made = {n: owned_module(n) for n, r in assignment.items() if r == dist.rank}
        modules, reports = D.share_modules(dist, {n: m for n, (m, _) in made.items()}, assignment,
                                           {n: r for n, (_, r) in made.items()})
        res["assignment"], res["reports"] = assignment, reports
        res["shared"] = {n: (type(m).__name__, m.state_dict()) for n, m in modules.items()}

        path = out / "written.txt"

        def slow_write(p):
            time.sleep(0.5)
            p.write_text("done")
            return "written"

        res["write_returned"] = dist.write(slow_write, path)
        res["read_after_write"] = path.read_text()
        res["agreed"] = dist.agree(f"rank {dist.rank}'s view")

        def failing_write():
            raise OSError("disk full")

        try:
            dist.write(failing_write)
        except Exception as e:  # noqa: BLE001 - the test looks at what each rank raised
            res["write_error"] = (type(e).__name__, str(e))
        dist.barrier()
        save_nested(res, out / f"rank{dist.rank}.safetensors")
        dist.close()
    elif scenario in ("die", "hang"):
        dist.barrier()  # everyone is up and connected; now rank 1 stops
        if dist.rank == 1:
            if scenario == "die":
                os._exit(0)  # exit 0: torchrun leaves rank 0 alone, as an agent on another node would
            time.sleep(120)
            os._exit(0)
        t0 = time.monotonic()
        try:
            R.combine_stats(dist, record(dist, True), N_BATCHES)
        except D.PeerStopped as e:
            (out / "failure.json").write_text(json.dumps({"message": str(e), "seconds": time.monotonic() - t0}))
            raise
    else:
        raise ValueError(scenario)


def save_nested(obj, path: Path) -> None:
    """A rank's results (dicts, lists, tuples, tensors, JSON scalars) as one safetensors file: the tensors
    under their path in the structure, the structure itself as JSON in the metadata."""
    tensors = {}

    def encode(x, key):
        if isinstance(x, torch.Tensor):
            tensors[key] = x.detach().clone()
            return {"__tensor__": key}
        if isinstance(x, dict):
            return {"__dict__": [[k, encode(v, f"{key}/{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            kind = "__tuple__" if isinstance(x, tuple) else "__list__"
            return {kind: [encode(v, f"{key}/{i}") for i, v in enumerate(x)]}
        return x

    save_file(tensors, str(path), metadata={"structure": json.dumps(encode(obj, ""))})


def load_nested(path: Path):
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        structure = json.loads(f.metadata()["structure"])

    def decode(x):
        if isinstance(x, dict) and "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if isinstance(x, dict) and "__dict__" in x:
            return {k: decode(v) for k, v in x["__dict__"]}
        if isinstance(x, dict) and ("__tuple__" in x or "__list__" in x):
            items = [decode(v) for v in x.get("__tuple__", x.get("__list__"))]
            return tuple(items) if "__tuple__" in x else items
        return x

    return decode(structure)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(scenario: str, out: Path, timeout_s: float = 20) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(ARMOR_DIST_TIMEOUT=str(timeout_s), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), str(HERE.parent), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--monitor_interval", "0.2", str(HERE), scenario, str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def ok_run(tmp_path_factory):
    """The happy path once: [rank 0's results, rank 1's]."""
    out = tmp_path_factory.mktemp("dist_ok")
    proc, seconds = torchrun("ok", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert seconds < 30, f"torchrun took {seconds:.1f} s"
    return [load_nested(out / f"rank{r}.safetensors") for r in range(2)]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def assert_same_stats(got: dict, want: dict[str, ActivationStats], names) -> None:
    assert sorted(got) == sorted(names)
    for n in names:
        g, w = got[n], want[n]
        assert g["n_tokens"] == w.n_tokens, n
        assert g["sq"].dtype == torch.float64 and torch.equal(g["sq"], w.sq), n
        assert torch.equal(g["h"], w.h()), n
        if w.xx is None:
            assert g["xx"] is None, n
        else:
            assert g["xx"].dtype == torch.float64 and torch.equal(g["xx"], w.xx), n
            assert torch.equal(g["H"], w.H()), n


@pytest.mark.parametrize("full", [False, True])
def test_combined_stats_bit_identical_to_one_process(ok_run, full):
    want = one_process_stats(full)
    for res in ok_run:
        assert_same_stats(res[f"stats_full={full}"], want, list(want))
    assert want["a"].n_tokens == 2 * sum(ROWS)  # `a` runs twice per batch


def test_naive_all_reduce_would_not_be_bit_identical():
    """The test above is sharp: adding the two ranks' partial sums (what an all-reduce does) differs."""
    want, p0, p1 = one_process_stats(True), one_process_stats(True, range(3)), one_process_stats(True, range(3, 5))
    assert any(not torch.equal(p0[n].sq + p1[n].sq, want[n].sq) or not torch.equal(p0[n].xx + p1[n].xx, want[n].xx)
               for n in want)


def test_combined_stats_only_on_owners(ok_run):
    want = one_process_stats(True)
    owners = ok_run[0]["owners"]
    assert ok_run[1]["owners"] == owners and set(owners.values()) == {0, 1}
    for res in ok_run:
        assert_same_stats(res["owned"], want, [n for n, r in owners.items() if r == res["rank"]])


def test_my_batches_contiguous_and_balanced(ok_run):
    assert [res["mine"] for res in ok_run] == [[0, 1, 2], [3, 4]]
    assert [(r["rank"], r["world_size"], r["is_writer"]) for r in ok_run] == [(0, 2, True), (1, 2, False)]
    for n in range(0, 12):
        for world in range(1, 5):
            chunks = [D.Dist(rank, world).my_batches(n) for rank in range(world)]
            assert [b for c in chunks for b in c] == list(range(n))
            assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
            assert sorted(map(len, chunks), reverse=True) == list(map(len, chunks))


def test_share_modules_identical_tensors_on_all_ranks(ok_run):
    assignment = ok_run[0]["assignment"]
    assert ok_run[1]["assignment"] == assignment and set(assignment.values()) == {0, 1}
    for res in ok_run:
        assert list(res["shared"]) == list(SHARED)
        for n, (kind, state) in res["shared"].items():
            want, report = owned_module(n)
            assert kind == type(want).__name__
            assert list(state) == list(want.state_dict())
            for k, v in want.state_dict().items():
                assert state[k].dtype == v.dtype and torch.equal(state[k], v), (res["rank"], n, k)
            assert res["reports"][n] == report


def test_writer_writes_and_everyone_waits(ok_run):
    assert [r["write_returned"] for r in ok_run] == ["written", None]
    assert [r["read_after_write"] for r in ok_run] == ["done", "done"]
    assert [r["agreed"] for r in ok_run] == ["rank 0's view"] * 2
    assert ok_run[0]["write_error"] == ("OSError", "disk full")
    kind, message = ok_run[1]["write_error"]
    assert kind == "RuntimeError" and "writer (rank 0) failed in failing_write: OSError: disk full" in message


def test_assign_balanced_and_deterministic():
    h, kv, inter = 4096, 1024, 11008  # a Llama-3-8B block
    sizes = {"self_attn.q_proj": h * h, "self_attn.k_proj": kv * h, "self_attn.v_proj": kv * h,
             "self_attn.o_proj": h * h, "mlp.gate_proj": inter * h, "mlp.up_proj": inter * h,
             "mlp.down_proj": h * inter}
    for world in (1, 2, 3, 4, 8):
        got = scheduling.assign(sizes, world)
        assert list(got) == list(sizes) and set(got.values()) <= set(range(world))
        for seed in range(5):
            names = list(sizes)
            random.Random(seed).shuffle(names)
            assert scheduling.assign({n: sizes[n] for n in names}, world) == got
        load = [sum(s for n, s in sizes.items() if got[n] == r) for r in range(world)]
        assert max(load) - min(load) <= max(sizes.values())
    assert scheduling.assign(sizes, 1) == dict.fromkeys(sizes, 0)
    # by hand: a=5 -> 0, b=4 -> 1, then the tie c=3, d=3 in name order: c -> 1 (4 < 5), d -> 0 (5 < 7), e -> 1
    assert scheduling.assign({"a": 5, "b": 4, "d": 3, "c": 3, "e": 1}, 2) == {"a": 0, "b": 1, "d": 0, "c": 1, "e": 1}
    with pytest.raises(ValueError, match="world_size"):
        scheduling.assign(sizes, 0)


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", D.TIMEOUT_ENV):
        monkeypatch.delenv(k, raising=False)


def test_single_process_needs_no_process_group(no_torchrun_env, tmp_path):
    dist = D.Dist.from_env("cpu")
    assert (dist.rank, dist.world_size, dist.is_writer, dist.timeout_s) == (0, 1, True, 600.0)
    assert not tdist.is_initialized()
    assert dist.my_batches(N_BATCHES) == list(range(N_BATCHES))
    for full in (False, True):
        got = snapshot(R.combine_stats(dist, record(dist, full), N_BATCHES))
        assert_same_stats(got, one_process_stats(full), ["a", "b", "c"])
    made = {n: owned_module(n) for n in SHARED}
    modules, reports = D.share_modules(dist, {n: m for n, (m, _) in made.items()}, dict.fromkeys(SHARED, 0),
                                       {n: r for n, (_, r) in made.items()})
    assert all(modules[n] is made[n][0] and reports[n] == made[n][1] for n in SHARED)
    dist.barrier()
    assert dist.agree(7) == 7
    assert dist.write(lambda: (tmp_path / "f").write_text("x")) == 1
    with pytest.raises(OSError, match="disk full"):
        dist.write(lambda: (_ for _ in ()).throw(OSError("disk full")))
    dist.close()
    assert not tdist.is_initialized()


def test_timeout_from_environment(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.dist_timeout() == 600.0
    monkeypatch.setenv(D.TIMEOUT_ENV, "2.5")
    assert D.dist_timeout() == 2.5
    for bad in ("abc", "0", "-3", "inf", "nan"):
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
            D.dist_timeout()


def test_recorder_checks_its_use(no_torchrun_env):
    dist = D.Dist.from_env("cpu")
    block = make_block()
    with torch.no_grad(), R.StatsRecorder(linears_of(block), False, dist) as rec:
        with pytest.raises(RuntimeError, match="outside"):
            block(batches()[0])
        with rec.batch(2):
            pass
        with pytest.raises(ValueError, match="increasing"), rec.batch(1):
            pass
    assert all(not lin._forward_pre_hooks for lin in linears_of(block).values())


@pytest.mark.parametrize("scenario, timeout_s, slowest", [("die", 20, 10), ("hang", 3, 15)])
def test_stopped_peer_gives_clear_error_in_bounded_time(tmp_path, scenario, timeout_s, slowest):
    """A peer that exits is noticed at once (gloo: connection reset); one that hangs after the timeout."""
    proc, seconds = torchrun(scenario, tmp_path, timeout_s)
    assert proc.returncode != 0
    assert seconds < 30, f"torchrun took {seconds:.1f} s"
    assert PEER_STOPPED.search(proc.stderr), proc.stderr[-5000:]
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert PEER_STOPPED.fullmatch(failure["message"]), failure["message"]
    assert failure["seconds"] < slowest
    if scenario == "hang":
        assert failure["seconds"] >= timeout_s * 0.9 and f"{D.TIMEOUT_ENV}=3 s" in failure["message"]


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))


# ---------------------------------------------------------------------------------------------
# The whole pipeline under torchrun, as users run it: `torchrun --nproc_per_node 2 -m armor_kernels prune …`
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run_args(bundled, tiny_llama, austen, tmp_path_factory):
    """A 4-block tiny model from the bundled model's config saved as a directory, a text, and the prune
    arguments every run below shares (ARMOR, 3 calibration batches of 8 windows: 2 + 1 over 2 ranks)."""
    model, tok = bundled
    d = tmp_path_factory.mktemp("torchrun_model")
    tiny = tiny_llama(model.config)
    tiny.config.num_hidden_layers = 4
    tiny = type(tiny)(tiny.config).eval()
    tiny.save_pretrained(d)
    tok.save_pretrained(d)
    text = d / "emma.txt"
    text.write_text(austen["Emma"][:30_000])
    return ["prune", "--method", "armor", "--model", str(d), "--text", str(text), "--n-samples", "24",
            "--seq-len", "32", "--eval-tokens", "96", "--block-size", "16", "--iters", "3"]


def _cli(args, nproc: int, tag: str = ""):
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", ARMOR_DIST_TIMEOUT="30", HF_HUB_OFFLINE="1", ARMOR_TEST_TAG=tag)
    launch = [sys.executable, "-m", "armor_kernels"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
        "127.0.0.1", "--master_port", str(free_port()), "-m", "armor_kernels"]
    return subprocess.Popen(launch + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _process_with(*env_items: str) -> int:
    """The pid of the process whose environment holds all of `env_items` ("KEY=value")."""
    for p in Path("/proc").iterdir():
        try:
            env = set((p / "environ").read_bytes().decode(errors="replace").split("\0"))
        except (OSError, ValueError):
            continue
        if set(env_items) <= env:
            return int(p.name)
    raise LookupError(f"no process with {env_items}")


def _block_tensors(d: Path) -> dict:
    from safetensors.torch import load_file
    return {f.name: load_file(f) for f in sorted(d.glob("model-block-*.safetensors"))}


@pytest.fixture(scope="module")
def two_process_run(tiny_run_args, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of tiny_run_args."""
    out = tmp_path_factory.mktemp("torchrun") / "two"
    two = _cli(tiny_run_args + ["--out", str(out)], 2)
    _, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    return out


def _same_blocks(a: Path, b: Path) -> bool:
    ta, tb = _block_tensors(a), _block_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) == 4, (sorted(ta), sorted(tb))  # the tiny model's 4 blocks
    return all(torch.equal(ta[f][k], tb[f][k]) for f in ta for k in ta[f])


def test_torchrun_two_processes_give_the_one_process_checkpoint(tiny_run_args, two_process_run, tmp_path):
    one = _cli(tiny_run_args + ["--out", str(tmp_path / "one")], 1)
    out1, err1 = one.communicate(timeout=300)
    assert one.returncode == 0, err1[-3000:]
    assert _same_blocks(tmp_path / "one", two_process_run)
    run1, run2 = (json.loads((d / "armor_run.json").read_text()) for d in (tmp_path / "one", two_process_run))
    assert run2["world_size"] == 2 and run1["world_size"] == 1
    assert run1["config_hash"] == run2["config_hash"] and run1["reports"] == run2["reports"]
    assert json.loads((two_process_run / "result.json").read_text())["perplexity"] == \
        json.loads((tmp_path / "one" / "result.json").read_text())["perplexity"]


def test_torchrun_killed_rank_fails_cleanly_and_the_same_command_resumes(tiny_run_args, two_process_run, tmp_path):
    import signal
    args = tiny_run_args + ["--out", str(tmp_path / "run")]
    tag = f"kill-{os.getpid()}-{time.monotonic_ns()}"
    proc = _cli(args, 2, tag)
    t0 = time.monotonic()
    while not (tmp_path / "run" / "model-block-00000.safetensors").exists():
        assert proc.poll() is None and time.monotonic() - t0 < 240, "no block was ever written"
        time.sleep(0.05)
    os.kill(_process_with(f"ARMOR_TEST_TAG={tag}", "RANK=1"), signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - killed < 60, err[-3000:]
    assert not (tmp_path / "run" / "model.safetensors.index.json").exists()  # never loads as a model
    again = _cli(args, 2)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "run" / "armor_run.json").read_text())["world_size"] == 2
    assert _same_blocks(tmp_path / "run", two_process_run)  # the resumed checkpoint is the uninterrupted one


def test_torchrun_on_a_directory_another_run_holds_stops_every_rank(tiny_run_args, tmp_path):
    """The writer takes the output directory's lock; every rank of a second job learns it could not, and
    stops with the same one-line error naming the holder (so two jobs never both run on one --out)."""
    out = tmp_path / "run"
    hold = ("import sys; from armor_kernels.pipeline.lock import RunLock; lock = RunLock.acquire(sys.argv[1]); "
            "print('locked', flush=True); sys.stdin.read(); lock.release()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        job = _cli(tiny_run_args + ["--out", str(out)], 2)
        _, err = job.communicate(timeout=120)
    finally:
        holder.communicate("")
    lines = [line for line in err.splitlines() if line.startswith("armor-kernels: error: output directory")]
    assert job.returncode != 0 and len(lines) == 2, err[-3000:]  # one per rank
    assert all(f"in use by another run: process {holder.pid}" in line for line in lines)
    assert not (out / "armor_run.json").exists()
