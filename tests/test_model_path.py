"""--model: a local path, a Hub id (fetched, or found in the Hub's cache offline), or a clear refusal."""
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub", reason="needs huggingface_hub (pip install '.[models]')")
from armor_kernels.pipeline import model as model_mod  # noqa: E402


def test_a_hub_id_is_fetched_into_the_cache_without_pickles(monkeypatch, tmp_path):
    import huggingface_hub
    asked = {}

    def fake(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert model_mod.resolve_model("Qwen/Qwen3-0.6B") == tmp_path
    assert asked["repo_id"] == "Qwen/Qwen3-0.6B" and "*.safetensors" in asked["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in asked["allow_patterns"])


def test_offline_an_uncached_hub_id_fails_with_one_line_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"model 'nobody/no-such-model' is not a local path and could not be "
                                         r"fetched from the Hugging Face Hub .*hf download nobody/no-such-model"):
        model_mod.resolve_model("nobody/no-such-model")


def test_local_paths_and_the_bundled_model(tmp_path):
    assert model_mod.resolve_model(tmp_path) == tmp_path
    assert model_mod.resolve_model(None) == model_mod.bundled_model_path()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_mod.resolve_model(Path(tmp_path) / "missing" / "dir")
