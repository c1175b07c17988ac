"""The checkpoint's integrity: content digests (every reader checks them and names the damaged shard and
tensor), the single-writer lock on an output directory, and the messages of incomplete directories; on a
tiny model built from the bundled model's real config."""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import prune_interrupted

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from armor_kernels.cli import main as cli_main  # noqa: E402
from armor_kernels.integrations.hf import load_pruned_model  # noqa: E402
from armor_kernels.optim import ArmorOptions  # noqa: E402
from armor_kernels.pipeline import checkpoint as ckpt  # noqa: E402
from armor_kernels.pipeline.config import PruneConfig  # noqa: E402
from armor_kernels.pipeline.lock import LOCK_FILE, RunLocked  # noqa: E402
from armor_kernels.pipeline.prune import prune_model  # noqa: E402
from armor_kernels.pipeline.source import CheckpointSource  # noqa: E402

ARMOR_OPTS = ArmorOptions(block_size=16, iters=2)
DAMAGED = "model.layers.1.mlp.up_proj.S_values"  # the tensor the tests damage, in block 1's shard


@pytest.fixture(scope="module")
def tiny(bundled, tiny_llama):
    """(tokenizer, calibration tokens, factory of fresh 2-block tiny models)."""
    model, tok = bundled
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return tok, calib, lambda: tiny_llama(model.config)


@pytest.fixture(scope="module")
def pruned(tiny, tmp_path_factory):
    """A finished ARMOR checkpoint (not to be modified: tests copy it)."""
    tok, calib, fresh = tiny
    d = tmp_path_factory.mktemp("pruned") / "armor"
    prune_model(fresh(), tok, calib, PruneConfig("armor", options=ARMOR_OPTS), d)
    return d


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A text file long enough for `eval --seq-len 32 --eval-tokens 96` (any words: only the reading of the
    checkpoint is tested)."""
    words = "the of and to a in that it was her she not be he his as had with for you".split()
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (2000,), generator=g)))
    return path


def copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def flip_byte(path, key):
    """Flip one byte in the middle of tensor `key` of a shard (its header untouched)."""
    n, head = header(path)
    lo, hi = head[key]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[8 + n + (lo + hi) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_index_and_shards_record_the_sha256_of_each_tensors_stored_bytes(pruned):
    index = json.loads((pruned / ckpt.INDEX_FILE).read_text())
    records = index["metadata"][ckpt.SHA256_KEY]
    assert set(records) == set(index["weight_map"].values()) == {ckpt.REST_SHARD, "model-block-00000.safetensors",
                                                                  "model-block-00001.safetensors"}
    for shard, record in records.items():
        n, head = header(pruned / shard)
        raw = (pruned / shard).read_bytes()[8 + n:]
        from_file = {k: hashlib.sha256(raw[v["data_offsets"][0]:v["data_offsets"][1]]).hexdigest()
                     for k, v in head.items() if k != "__metadata__"}
        assert record == from_file, shard
        assert json.loads(head["__metadata__"][ckpt.SHA256_KEY]) == from_file, shard


def test_a_flipped_byte_is_named_by_every_reader(pruned, tmp_path, text, capsys):
    d = copy(pruned, tmp_path)
    flip_byte(ckpt.block_shard(d, 1), DAMAGED)
    named = rf"model-block-00001\.safetensors' is damaged: tensor '{DAMAGED}'"
    with pytest.raises(ValueError, match=named):
        load_pruned_model(d)
    with pytest.raises(ValueError, match=named):
        AutoModelForCausalLM.from_pretrained(d)
    code = cli_main(["eval", "--checkpoint", str(d), "--text", str(text), "--seq-len", "32", "--eval-tokens", "96"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("armor-kernels: error: checkpoint shard") and \
        DAMAGED in err[-1] and "model-block-00001.safetensors" in err[-1], err


def test_a_rewritten_shard_is_caught_by_the_index(pruned, tmp_path):
    """A shard rewritten whole, with a matching record of its own, still differs from the index's."""
    d = copy(pruned, tmp_path)
    path = ckpt.block_shard(d, 1)
    tensors = load_file(path)
    tensors[DAMAGED] = tensors[DAMAGED].clone()
    tensors[DAMAGED].view(-1)[0] += 1
    meta = {**header(path)[1]["__metadata__"]}
    ckpt.save_shard(path, tensors, {k: v for k, v in meta.items() if k != ckpt.SHA256_KEY})
    with pytest.raises(ValueError, match=rf"tensor '{DAMAGED}' has sha256 .*, {ckpt.INDEX_FILE} records"):
        load_pruned_model(d)


def test_resume_prunes_a_damaged_finished_block_again(tiny, tmp_path, caplog):
    """The damaged block is pruned again (with a warning naming shard and tensor): every block before it is
    read back as written, so the result is bit-identical to a run that was never interrupted."""
    tok, calib, fresh = tiny
    prune_model(fresh(), tok, calib, PruneConfig("armor", options=ARMOR_OPTS), tmp_path / "straight")
    assert prune_interrupted(fresh(), tok, calib, PruneConfig("armor", options=ARMOR_OPTS), tmp_path / "resumed") == [0]
    flip_byte(ckpt.block_shard(tmp_path / "resumed", 0), DAMAGED.replace("layers.1", "layers.0"))
    with caplog.at_level("WARNING", logger="armor_kernels"):
        prune_model(fresh(), tok, calib, PruneConfig("armor", options=ARMOR_OPTS), tmp_path / "resumed")
    assert any("model-block-00000.safetensors' is damaged: tensor 'model.layers.0.mlp.up_proj.S_values'" in m
               and "pruning block 0 again" in m for m in caplog.messages), caplog.messages
    for i in range(2):
        a, b = (load_file(ckpt.block_shard(tmp_path / n, i)) for n in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    load_pruned_model(tmp_path / "resumed")


def test_a_directory_without_digests_is_refused_by_name(pruned, tmp_path):
    """Neither the index nor the shards record any sha256: nothing could be verified, so nothing loads."""
    d = copy(pruned, tmp_path)
    index = json.loads((d / ckpt.INDEX_FILE).read_text())
    del index["metadata"][ckpt.SHA256_KEY]
    (d / ckpt.INDEX_FILE).write_text(json.dumps(index))
    for shard in set(index["weight_map"].values()):
        meta = {k: v for k, v in header(d / shard)[1]["__metadata__"].items() if k != ckpt.SHA256_KEY}
        save_file(load_file(d / shard), d / shard, metadata=meta)
    with pytest.raises(ValueError, match=r"model-(rest|block-\d+).safetensors' records no sha256 of its tensors"):
        load_pruned_model(d)
    src = CheckpointSource(d)  # the streamed evaluation's reader too
    with pytest.raises(ValueError, match=r"model-rest.safetensors' records no sha256 of its tensors"):
        src.load_rest(src.skeleton(), "cpu", torch.float32)


def test_index_deleted_names_the_blocks_and_the_same_command_writes_it(tiny, tmp_path, text, capsys):
    tok, calib, fresh = tiny
    prune_model(fresh(), tok, calib, "magnitude", tmp_path / "run")
    (tmp_path / "run" / ckpt.INDEX_FILE).unlink()
    message = rf"incomplete: all its blocks 0–1 are written but {ckpt.INDEX_FILE}.* is missing"
    with pytest.raises(ValueError, match=message):
        load_pruned_model(tmp_path / "run")
    code = cli_main(["eval", "--checkpoint", str(tmp_path / "run"), "--text", str(text), "--seq-len", "32",
                     "--eval-tokens", "96"])
    assert code == 2 and "all its blocks 0–1 are written" in capsys.readouterr().err
    prune_model(fresh(), tok, calib, "magnitude", tmp_path / "run")
    load_pruned_model(tmp_path / "run")


HOLD_LOCK = ("import sys; from armor_kernels.pipeline.lock import RunLock; lock = RunLock.acquire(sys.argv[1]); "
             "print('locked', flush=True); sys.stdin.read(); lock.release()")


def test_a_second_run_stops_at_once_naming_the_first_and_a_stale_lock_is_taken_over(tiny, tmp_path, caplog):
    tok, calib, fresh = tiny
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(RunLocked, match=rf"in use by another run: process {holder.pid} on host"):
            prune_model(fresh(), tok, calib, "magnitude", out)
        assert time.monotonic() - t0 < 5 and not (out / ckpt.RUN_FILE).exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, stale
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="armor_kernels"):
        prune_model(fresh(), tok, calib, "magnitude", out)
    assert any(f"took over the stale lock of process {holder.pid}" in m for m in caplog.messages)
    assert not (out / LOCK_FILE).exists() and (out / ckpt.INDEX_FILE).exists()


def test_the_lock_is_released_when_a_run_stops(tiny, tmp_path):
    tok, calib, fresh = tiny
    prune_interrupted(fresh(), tok, calib, "magnitude", tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(ValueError, match="different configuration"):
        prune_model(fresh(), tok, calib, "wanda", tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_cli_reports_a_held_lock_as_one_line(tiny, tmp_path, text, capsys):
    tok, _, fresh = tiny
    model_dir, out = tmp_path / "tiny", tmp_path / "run"
    fresh().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli_main(["prune", "--method", "magnitude", "--model", str(model_dir), "--text", str(text),
                         "--out", str(out), "--n-samples", "2", "--seq-len", "32", "--eval-tokens", "96"])
    finally:
        holder.communicate("")  # stdin closed: it exits normally and releases the lock
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("armor-kernels: error: output directory") and \
        f"process {holder.pid}" in err[-1], err
    assert holder.returncode == 0 and not out.exists()  # the holder made the directory and wrote nothing
