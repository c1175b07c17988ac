"""Every Python block of README.md and docs/ runs as pasted.

Blocks run in a fresh directory holding `runs/demo/quality` (what the demo writes, here from a tiny
model); what would take minutes stands in small: the bundled model is a tiny one of its configuration, the
novels four parts of another real text, the "quality" preset a small configuration of the same shape."""
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
# The llm-compressor page's blocks need its own environment and a dataset: its integration tests run the
# same calls (tests/test_integrations_llmcompressor.py).
ELSEWHERE = {"docs/llm-compressor.md"}


def python_blocks() -> list[tuple[str, str]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        rel = str(path.relative_to(ROOT))
        for k, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            if rel not in ELSEWHERE:
                found.append((f"{rel}#{k}", block))
    return found


BLOCKS = python_blocks()


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
    monkeypatch.setitem(PRESETS, "quality", PruneConfig(
        options=ArmorOptions(block_size=16, iters=2), budget=BudgetOptions(0.3, probe_iters=1),
        recon=ReconOptions(steps=2, batch=2, holdout=1, check=1)))
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})
