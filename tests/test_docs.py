"""Every Python block of README.md and docs/ runs as pasted.

Blocks run in a fresh directory holding `runs/demo/quality` (what the demo writes, here from a tiny
model); what would take minutes stands in small: the bundled model is a tiny one of its configuration, the
novels four parts of another real text, the "quality" preset a small configuration of the same shape.
The llm-compressor page's blocks run in order as one script (each uses the names of those before it), in
llm-compressor's environment only."""
import re
from pathlib import Path

import pytest
import torch

from armor_kernels.optim import ArmorOptions
from armor_kernels.pipeline import data as data_mod
from armor_kernels.pipeline import model as model_mod
from armor_kernels.pipeline.budget import BudgetOptions
from armor_kernels.pipeline.config import PRESETS, PruneConfig
from armor_kernels.pipeline.prune import prune_model
from armor_kernels.pipeline.reconstruct import ReconOptions

ROOT = Path(__file__).resolve().parent.parent
LLMC_PAGE = ROOT / "docs" / "llm-compressor.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


BLOCKS = [(f"{path.relative_to(ROOT)}#{k}", block)
          for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if path != LLMC_PAGE
          for k, block in enumerate(python_blocks(path))]
SMALL_QUALITY = PruneConfig(options=ArmorOptions(block_size=16, iters=2), budget=BudgetOptions(0.3, probe_iters=1),
                            recon=ReconOptions(steps=2, batch=2, holdout=1, check=1))


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def stand_ins(bundled, tiny_llama):
    model, tok = bundled
    text = data_mod.python_reference()
    titles = ["Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Emma"]
    novels = {t: text[k * len(text) // 4:(k + 1) * len(text) // 4] for k, t in enumerate(titles)}
    return tok, novels, lambda: tiny_llama(model.config)


@pytest.mark.parametrize("name,code", BLOCKS, ids=[n for n, _ in BLOCKS])
def test_block_runs_as_pasted(name, code, stand_ins, tmp_path, monkeypatch):
    tok, novels, fresh = stand_ins
    monkeypatch.chdir(tmp_path)
    calib = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_model(fresh(), tok, calib, "magnitude", Path("runs/demo/quality"))
    monkeypatch.setattr(model_mod, "load_model", lambda *a, **k: (fresh(), tok))
    monkeypatch.setattr(data_mod, "austen_novels", lambda *a, **k: novels)
    monkeypatch.setitem(PRESETS, "quality", SMALL_QUALITY)
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})


@pytest.mark.llmcompressor
def test_llm_compressor_page_runs_as_pasted(tmp_path, monkeypatch):
    """The bundled model stands in as a tiny Llama, `prune`'s windows as 16 of 48 tokens of a random-word
    text, the preset as a small configuration of its shape; every directory the page saves loads back."""
    pytest.importorskip("llmcompressor", reason="needs llm-compressor (scripts/setup_llmcompressor.sh)")
    from architectures import save_sharded, tiny_model
    from transformers import AutoModelForCausalLM

    from armor_kernels.nn import ArmorLinear
    from armor_kernels.pipeline import source as source_mod
    model_dir = save_sharded(tiny_model("llama")[0], tmp_path / "tiny_llama")
    text = tmp_path / "words.txt"
    g = torch.Generator().manual_seed(1)
    text.write_text(" ".join(f"t{i}" for i in torch.randint(3, 512, (4000,), generator=g).tolist()))
    model_source, token_splits = source_mod.model_source, data_mod.token_splits
    monkeypatch.setattr(source_mod, "model_source", lambda path: model_source(model_dir if path is None else path))
    monkeypatch.setattr(data_mod, "token_splits",
                        lambda tok: token_splits(tok, text, n_samples=16, seq_len=48, eval_tokens=200))
    monkeypatch.setitem(PRESETS, "quality", SMALL_QUALITY)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(LLMC_PAGE)
    assert len(blocks) == 3
    exec(compile("\n".join(blocks), str(LLMC_PAGE.relative_to(ROOT)), "exec"), {"__name__": "__docs__"})
    for run in ("llmc-armor", "llmc-quality", "llmc-armor-output"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / run)
        assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == 14, run  # 2 blocks x 7 linears
