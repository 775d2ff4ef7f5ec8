"""Safe loading (issue #7): checkpoints are safetensors only, weights that do not match the configuration raise an
error naming the tensors, a truncated weights file raises a clear error, and the legitimate loads still work."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny import tiny_config

from titans_hf import TitansConfig, TitansForCausalLM, TitansModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def config(**overrides) -> TitansConfig:
    return tiny_config("mac", **overrides)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, TitansForCausalLM]:
    torch.manual_seed(0)
    model = TitansForCausalLM(config()).eval()
    folder = tmp_path_factory.mktemp("titans")
    model.save_pretrained(folder)
    return folder, model


def copy_with_config(folder: Path, tmp_path: Path, **changes) -> Path:
    target = tmp_path / "edited"
    shutil.copytree(folder, target)
    values = json.loads((target / "config.json").read_text())
    values.update(changes)
    (target / "config.json").write_text(json.dumps(values))
    return target


def test_checkpoints_are_safetensors_only(saved, tmp_path):
    folder, model = saved
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith(PICKLE_SUFFIXES)]

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled weights \(pytorch_model.bin\) but no safetensors file"):
        TitansForCausalLM.from_pretrained(pickled)
    with pytest.raises(ValueError, match="safetensors only; use_safetensors=False is not supported"):
        TitansForCausalLM.from_pretrained(folder, use_safetensors=False)


@pytest.mark.parametrize(
    "changes,expected",
    [
        (  # a deeper memory: one tensor of another shape per layer, and one missing
            dict(memory_depth=3),
            [
                r"tensors of another shape: model\.layers\.0\.memory\.initial_weights\.1 "
                r"\(checkpoint \(2, 64, 16\), model \(2, 64, 64\)\)",
                r"the checkpoint lacks: model\.layers\.0\.memory\.initial_weights\.2, "
                r"model\.layers\.1\.memory\.initial_weights\.2",
            ],
        ),
        (  # a wider model
            dict(hidden_size=48, head_dim=None, memory_head_dim=None),
            [r"model\.embed_tokens\.weight \(checkpoint \(64, 32\), model \(64, 48\)\)", r"and \d+ more"],
        ),
        (dict(num_hidden_layers=3, memory_layers=[0, 1, 2]), [r"the checkpoint lacks: model\.layers\.2\."]),
        (dict(num_persistent_tokens=0), [r"no place for: model\.layers\.0\.attention\.persistent"]),
        (dict(memory_layers=[0]), [r"no place for: model\.layers\.1\.gate\.attention_norm\.weight"]),
        (dict(memory_conv_kernel=0), [r"no place for: model\.layers\.0\.memory\.conv_weight"]),
        (dict(vocab_size=80), [r"model\.embed_tokens\.weight \(checkpoint \(64, 32\), model \(80, 32\)\)"]),
    ],
)
def test_weights_that_do_not_match_the_config_are_named(saved, tmp_path, changes, expected):
    folder, _ = saved
    edited = copy_with_config(folder, tmp_path, **changes)
    with pytest.raises(ValueError, match="do not match its configuration") as error:
        TitansForCausalLM.from_pretrained(edited)
    for pattern in expected:
        assert re.search(pattern, str(error.value)), (pattern, str(error.value))


def test_truncated_weights_give_a_clear_error(saved, tmp_path):
    folder, _ = saved
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    weights = damaged / "model.safetensors"
    data = weights.read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        weights.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="Could not read the weights of .*damaged.*truncated or corrupt"):
            TitansForCausalLM.from_pretrained(damaged)


def test_legitimate_loads_still_work(saved, tmp_path):
    folder, model = saved
    ids = torch.randint(0, 64, (2, 11))
    loaded, info = TitansForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        # The base model from a causal-LM checkpoint (the head is dropped) ...
        base = TitansModel.from_pretrained(folder)
        assert torch.equal(base(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state)
    # ... a causal LM from a base-model checkpoint (an untied head is a new head), and the Transformers opt-in that
    # re-initialises tensors of another shape.
    base_folder = tmp_path / "base"
    base.save_pretrained(base_folder)
    TitansForCausalLM.from_pretrained(copy_with_config(base_folder, tmp_path, tie_word_embeddings=False))
    wider = TitansForCausalLM.from_pretrained(
        copy_with_config(folder, tmp_path / "x", vocab_size=80), ignore_mismatched_sizes=True
    )
    assert wider.model.embed_tokens.weight.shape == (80, 32)
