"""TitansForCausalLM as a Transformers model: every variant, causality, the memory's effect, attention backends,
gradient checkpointing, save/load (also as remote code), presets, learning, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import partialmethod
from pathlib import Path

import pytest
import torch
import transformers
from tiny import BLOCK_TITANS_HF, VARIANTS, random_ids, tiny_config, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.testing_utils import CaptureLogger

from titans_hf import NeuralMemory, TitansConfig, TitansForCausalLM, TitansModel

REPO = Path(__file__).resolve().parents[1]


ids = random_ids


# ----------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_loss_backward_and_tuples(variant):
    model = tiny_model(variant, dtype=torch.float32).train()
    x = ids()
    out = model(x, labels=x, output_hidden_states=True)
    assert out.logits.shape == (2, 21, 64)
    assert torch.isfinite(out.loss)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 21, 32) for h in out.hidden_states)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    as_tuple = model(x, labels=x, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)
    last = model(x, logits_to_keep=1, use_cache=False)
    torch.testing.assert_close(last.logits, out.logits[:, -1:])


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_attention_weights(variant):
    model = tiny_model(variant, dtype=torch.float32, attn_implementation="eager")
    out = model(ids(length=13), output_attentions=True, use_cache=False)
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape[:2] == (2, model.config.num_attention_heads)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality_bit_exact(variant):
    model = tiny_model(variant)
    x = ids(length=19)
    with torch.no_grad():
        base = model(x, use_cache=False).logits
        for t in (0, 5, 8, 12, 18):
            changed = x.clone()
            changed[:, t] = (changed[:, t] % 63) + 1
            out = model(changed, use_cache=False).logits
            assert torch.equal(out[:, :t], base[:, :t]), (variant, t)
            assert not torch.equal(out[:, t:], base[:, t:]), (variant, t)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_memory_matters(variant, monkeypatch):
    model = tiny_model(variant)
    x = ids(length=24)
    with torch.no_grad():
        written = model(x, use_cache=False).logits
        monkeypatch.setattr(NeuralMemory, "forward", partialmethod(NeuralMemory.forward, write=False))
        frozen = model(x, use_cache=False).logits
    assert (written - frozen).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_eager_equals_sdpa(variant):
    eager = tiny_model(variant, dtype=torch.float32, attn_implementation="eager")
    sdpa = tiny_model(variant, dtype=torch.float32, attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    x = ids(length=40)  # long enough for the blocked sliding-window path
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    with torch.no_grad():
        a = eager(x, attention_mask=mask, use_cache=False).logits
        b = sdpa(x, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_same_loss_and_gradients(variant):
    model = tiny_model(variant).train()
    x = ids(length=17)
    loss = model(x, labels=x, use_cache=False).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt = model(x, labels=x, use_cache=False).loss
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-12, rtol=0)
    for g, h in zip(grads, grads_ckpt):
        torch.testing.assert_close(h, g, atol=1e-10, rtol=1e-9)


# ----------------------------------------------------------------------------------------------------- save / load


def test_auto_classes_and_round_trip(tmp_path):
    config = tiny_config("mac")
    model = AutoModelForCausalLM.from_config(config).eval()
    assert isinstance(model, TitansForCausalLM)
    assert isinstance(AutoModel.from_config(config), TitansModel)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_titans.TitansConfig",
        "AutoModel": "modeling_titans.TitansModel",
        "AutoModelForCausalLM": "modeling_titans.TitansForCausalLM",
        "AutoModelForSequenceClassification": "modeling_titans.TitansForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_titans.TitansForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_titans.TitansForQuestionAnswering",
    }
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "model.safetensors",
        "modeling_titans.py",
        "configuration_titans.py",
        "neural_memory.py",
        "memory_ops.py",
        "cache_titans.py",
    } <= files
    assert not any(name.endswith(".bin") for name in files)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TitansConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_init_weights_sets_every_parameter_and_buffer():
    """from_pretrained-style init (no __init__ values kept) gives the documented values, RoPE included."""
    config = tiny_config("mag")
    reference = TitansForCausalLM(config)
    model = TitansForCausalLM(config)  # then overwrite everything with garbage and re-initialise:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        for b in model.buffers():
            b.fill_(float("nan"))
    for module in model.modules():
        module._is_hf_initialized = False
    model.initialize_weights()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.isfinite(p).all(), name
        assert p.shape == q.shape
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, c, msg=name)  # inv_freq
    memory = model.model.layers[0].memory
    half_lives = torch.tensor(memory.retention_half_lives, dtype=torch.float64)  # 2 heads: the two ends
    retention = torch.sigmoid(memory.retention_proj.bias.double())
    torch.testing.assert_close(retention**half_lives, torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(torch.sigmoid(memory.momentum_proj.bias), torch.full((2,), 0.9))


def test_loads_as_remote_code_without_the_package(tmp_path):
    model = tiny_model("mac", dtype=torch.float32)
    folder = tmp_path / "titans"
    model.save_pretrained(folder)
    x = ids(length=12)
    with torch.no_grad():
        expected = model(x, use_cache=False).logits
    torch.save({"ids": x, "logits": expected}, tmp_path / "expected.pt")
    script = BLOCK_TITANS_HF + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "titans_hf" not in sys.modules
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(data["ids"], use_cache=False).logits
        assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
        # The language model's checkpoint starts a classifier, also as remote code.
        from transformers import AutoModelForSequenceClassification
        classifier = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True, num_labels=3)
        assert type(classifier).__name__ == "TitansForSequenceClassification"
        assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
        assert torch.equal(classifier.model.embed_tokens.weight, model.model.embed_tokens.weight)
        with torch.no_grad():
            assert classifier(data["ids"]).logits.shape == (data["ids"].shape[0], 3)
        assert "titans_hf" not in sys.modules
        print("remote-ok")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "remote-ok" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------- presets


PRESET_PARAMETERS = json.loads((REPO / "examples" / "configs" / "parameters.json").read_text())


@pytest.mark.parametrize("name", sorted(PRESET_PARAMETERS))
def test_example_configs_instantiate_on_meta_with_documented_sizes(name):
    config = TitansConfig.from_json_file(str(REPO / "examples" / "configs" / f"{name}.json"))
    with torch.device("meta"):
        model = TitansForCausalLM(config)
    assert model.num_parameters() == PRESET_PARAMETERS[name]
    readme = (REPO / "README.md").read_text()
    assert f"{PRESET_PARAMETERS[name] / 1e6:.1f}M" in readme, f"README does not document {name}"


# ----------------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_tiny_model_learns(variant):
    torch.manual_seed(0)
    model = TitansForCausalLM(tiny_config(variant)).float().train()
    x = ids(batch=2, length=16, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(50):
        loss = model(x, labels=x, use_cache=False).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(variant="mat"), "variant must be one of"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(segment_size=6), "multiple of memory_chunk_size"),
        (dict(memory_chunk_size=0), "memory_chunk_size"),
        (dict(num_key_value_heads=3), "must divide num_attention_heads"),
        (dict(memory_layers=[0, 7]), "memory_layers"),
        (dict(variant="lmm", memory_layers=[0]), "every layer"),
        (dict(variant="lmm", num_persistent_tokens=2), "num_persistent_tokens"),
        (dict(num_persistent_tokens=-1), "num_persistent_tokens"),
        (dict(memory_max_lr=0.0), "memory_max_lr"),
        (dict(attention_dropout=1.5), "attention_dropout"),
        (dict(training_context_length=0), "training_context_length must be an integer >= 1"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), r"need \['factor', 'original_max_position_"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0}), "change with the length of the sequence"),
        (dict(rope_parameters={"rope_type": "su"}), "rope_type'\\] must be one of"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "beta": 1}), r"unknown \['beta'\]"),
        (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "rotates whole heads"),
        (dict(hidden_act="swishy"), "hidden_act must be an activation"),
        (dict(qk_norm=1), "qk_norm must be True or False"),
    ],
)
def test_invalid_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_no_length_limit_is_advertised(tmp_path):
    """The config has no max_position_embeddings (what generate() and harnesses cap to); the legacy field of older
    checkpoints is read as the training length, and generate() runs past it without a length warning."""
    config = tiny_config(max_position_embeddings=24)
    assert config.training_context_length == 24 and not hasattr(config, "max_position_embeddings")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["training_context_length"] == 24 and "max_position_embeddings" not in saved
    model = TitansForCausalLM(config).eval()
    logger = transformers.logging.get_logger("transformers.generation.stopping_criteria")
    with CaptureLogger(logger) as captured:
        out = model.generate(ids(batch=1, length=20), max_new_tokens=12, do_sample=False)
    assert out.shape[1] == 32 and "maximum length" not in captured.out


def test_invalid_inputs():
    model = tiny_model("mac", dtype=torch.float32)
    x = ids()
    with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, 64\)"):
        model(x + 64)
    negative = x.clone()
    negative[0, 3] = -1
    with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, 64\)"):
        model(negative)
    with pytest.raises(TypeError, match="integer token ids"):
        model(x.float())
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="2D"):
        model(x, attention_mask=torch.ones(2, 1, 21, 21))
    with pytest.raises(RuntimeError, match="only 0 and 1"):
        model(x, attention_mask=torch.full_like(x, 3))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, seq, 32\)"):
        model(inputs_embeds=torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="empty"):
        model(x[:, :0])
    with pytest.raises(RuntimeError, match="position_ids disagree"):
        model(x, position_ids=torch.zeros_like(x))
    model(x, position_ids=torch.arange(21).expand(2, -1))  # the positions Titans counts are accepted
