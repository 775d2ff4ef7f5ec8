"""Converting a pretrained Llama / Mistral / Qwen2 / Qwen3 into Titans (issue #25): the converted model starts as the
base (logits and greedy tokens), bases and variants that cannot start as it are refused with the reason, the folder
reloads as remote code, and memory-only or memory + LoRA fine-tuning trains only what it should."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny import BLOCK_TITANS_HF

from titans_hf import BASE_LORA_TARGETS, MEMORY_MODULES, TitansForCausalLM, mark_only_memory_as_trainable

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=24,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Each base exercises what its family brings: biases (all four attention projections, the MLP; Qwen2's on q/k/v only),
# q/k norms, untied and tied embeddings, scaled RoPE (llama3, yarn with its attention scaling, linear), another
# activation, and sliding windows (Mistral's everywhere, Qwen2's in some layers).
BASES = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **COMMON,
            attention_bias=True,
            mlp_bias=True,
            hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        )
    ),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=8)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            **COMMON,
            use_sliding_window=True,
            sliding_window=12,
            max_window_layers=1,  # layer 0 full attention, layer 1 sliding
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        )
    ),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            **COMMON,
            head_dim=16,  # heads x head_dim != hidden_size
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
        )
    ),
}
WINDOWS = {"llama": 24, "mistral": 8, "qwen2": 12, "qwen3": 24}  # the default: the base's window, else its context


def make_base(name: str) -> transformers.PreTrainedModel:
    """A tiny random base whose norms and biases are spread away from 1 and 0, so that each one matters."""
    torch.manual_seed(0)
    base = BASES[name]().float().eval()
    with torch.no_grad():
        for parameter_name, parameter in base.named_parameters():
            if parameter.dim() == 1:
                parameter.normal_(1.0 if "norm" in parameter_name else 0.0, 0.3)
    return base


def tokens(length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", BASES)
def test_converted_model_starts_as_the_base(name):
    base = make_base(name)
    model = TitansForCausalLM.from_base_model(base, memory_chunk_size=4).eval()
    config = model.config
    assert config.variant == "mal" and config.num_persistent_tokens == 0
    assert config.sliding_window == WINDOWS[name] and config.training_context_length == 24
    assert config.memory_layers == [0, 1] and config.num_key_value_heads == 2
    assert all(layer.memory.o_proj.weight.abs().max() == 0 for layer in model.model.layers)
    assert model.lm_head.weight is model.model.embed_tokens.weight or name != "qwen3"
    if name == "llama":  # untied: its own head
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    x = tokens(WINDOWS[name])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-5, rtol=0)
        # The memory reads every token, yet adds nothing: over a longer stream the model is the base with a window.
        longer = tokens(3 * WINDOWS[name])
        if name == "mistral":  # sliding-window attention in every layer: the base itself at any length
            torch.testing.assert_close(model(longer).logits, base(longer).logits, atol=1e-5, rtol=0)
    # Cached greedy decoding gives the base's tokens (within the window; Mistral's beyond it too).
    new = (3 * WINDOWS[name] if name == "mistral" else WINDOWS[name]) - 5
    expected = base.generate(x[:1, :5], max_new_tokens=new, do_sample=False, min_new_tokens=new)
    assert torch.equal(model.generate(x[:1, :5], max_new_tokens=new, do_sample=False, min_new_tokens=new), expected)


def test_bases_fields_are_read():
    llama, qwen2, qwen3 = (TitansForCausalLM.from_base_model(make_base(n)).config for n in ("llama", "qwen2", "qwen3"))
    assert (llama.attention_bias, llama.attention_output_bias, llama.mlp_bias, llama.qk_norm) == (True,) * 3 + (False,)
    assert (qwen2.attention_bias, qwen2.attention_output_bias, qwen2.qk_norm) == (True, False, False)
    assert (qwen3.attention_bias, qwen3.qk_norm, qwen3.head_dim, qwen3.tie_word_embeddings) == (False, True, 16, True)
    assert llama.hidden_act == "gelu_pytorch_tanh" and not llama.tie_word_embeddings
    assert qwen2.rope_parameters["rope_type"] == "yarn" and llama.rope_parameters["rope_type"] == "llama3"


def test_dynamic_rope_converts_as_default_within_its_trained_length():
    """Transformers' dynamic NTK RoPE has the default frequencies up to max_position_embeddings."""
    torch.manual_seed(0)
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, rope_parameters=rope)).eval()
    model = TitansForCausalLM.from_base_model(base, sliding_window=16).eval()
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    x = tokens(16)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-5, rtol=0)


def test_shorter_window_and_some_memory_layers():
    """A window below the base's context and a memory in one layer: exact within the window; the layer without a
    memory keeps the base's input norm as its attention norm."""
    base = make_base("llama")
    model = TitansForCausalLM.from_base_model(base, sliding_window=10, memory_layers=[1], memory_chunk_size=4).eval()
    assert model.model.layers[0].memory is None and model.model.layers[1].memory is not None
    x = tokens(10)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(model(tokens(24)).logits[:, -1], base(tokens(24)).logits[:, -1], atol=1e-3)


# ----------------------------------------------------------------------------------------------------- refusals


def _with_rope(rope: dict) -> transformers.PreTrainedModel:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, rope_parameters=rope))


class _LlamaWithAnExtraScale(transformers.LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model.layers[0].self_attn.scale = torch.nn.Parameter(torch.ones(1))


REFUSALS = {
    "another class": (
        lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64)),
        {},
        r"Cannot convert a GPT2LMHeadModel .*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
    ),
    "no head": (lambda: make_base("llama").model, {}, "with their language-modelling head"),
    "mag": (lambda: make_base("llama"), dict(variant="mag"), "MAG outputs RMSNorm.*variant='mal'"),
    "mac": (lambda: make_base("llama"), dict(variant="mac"), "memory reads are keys"),
    "lmm": (lambda: make_base("llama"), dict(variant="lmm"), "LMM has no attention"),
    "persistent tokens": (
        lambda: make_base("llama"),
        dict(num_persistent_tokens=2),
        "num_persistent_tokens must be 0",
    ),
    "a base field": (lambda: make_base("llama"), dict(hidden_size=64), r"\['hidden_size'\] are read from the base"),
    "window past the base's": (lambda: make_base("mistral"), dict(sliding_window=9), "exceeds the base's own"),
    "longrope": (
        lambda: _with_rope(
            {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0] * 4,
                "long_factor": [2.0] * 4,
                "original_max_position_embeddings": 8,
            }
        ),
        {},
        "Cannot convert the base's RoPE 'longrope'",
    ),
    "dynamic past its length": (
        lambda: _with_rope({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
        dict(sliding_window=32),
        "'dynamic' RoPE with sliding_window=32 > max_position_embeddings",
    ),
    "an unknown tensor": (
        lambda: _LlamaWithAnExtraScale(transformers.LlamaConfig(**COMMON)),
        {},
        r"base tensors Titans has no place for: model\.layers\.0\.self_attn\.scale",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_base_that_cannot_start_identical_is_refused(case):
    make, arguments, match = REFUSALS[case]
    with pytest.raises(ValueError, match=match):
        TitansForCausalLM.from_base_model(make(), **arguments)


# ----------------------------------------------------------------------------------------------------- save / load


def test_converted_folder_reloads_as_remote_code_without_the_package(tmp_path):
    base = make_base("qwen2")  # biases on q/k/v only, yarn, a sliding layer, untied embeddings
    model = TitansForCausalLM.from_base_model(base, memory_chunk_size=4).eval()
    model.save_pretrained(tmp_path / "converted")
    x = tokens(12, batch=1)
    with torch.no_grad():
        expected = base(x).logits
    torch.save(x, tmp_path / "x.pt")
    script = BLOCK_TITANS_HF + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "converted")!r}, trust_remote_code=True).eval()
        assert "titans_hf" not in sys.modules and type(model).__name__ == "TitansForCausalLM"
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)


def test_untied_head_is_required_in_a_checkpoint(tmp_path):
    model = TitansForCausalLM.from_base_model(make_base("llama"))
    model.save_pretrained(tmp_path)
    reloaded = TitansForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks: lm_head.weight"):
        TitansForCausalLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------- fine-tuning


def _trained(model: torch.nn.Module, steps: int = 2) -> set[str]:
    """Names of the parameters that ``steps`` AdamW steps on a stream longer than the window changed."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(40)
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


def test_memory_only_fine_tuning_with_the_trainer_trains_the_memory_alone(tmp_path):
    model = TitansForCausalLM.from_base_model(make_base("qwen3"), sliding_window=8, memory_chunk_size=4)
    trainable = mark_only_memory_as_trainable(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".memory." in n)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [{"input_ids": ids, "labels": ids} for ids in tokens(40, batch=4).tolist()]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, report_to="none"
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".memory." in name for name in changed)
    assert any(name.endswith("memory.o_proj.weight") for name in changed)  # the memory's output leaves zero


def test_memory_and_lora_fine_tuning_trains_adapters_and_memory_and_merges(tmp_path):
    peft = pytest.importorskip("peft", reason="the `peft` extra is part of the dev install")
    model = TitansForCausalLM.from_base_model(make_base("llama"), sliding_window=8, memory_chunk_size=4)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=BASE_LORA_TARGETS, modules_to_save=MEMORY_MODULES, task_type="CAUSAL_LM"
    )
    wrapped = peft.get_peft_model(model, config)
    adapted = {name.rsplit(".", 2)[0] for name, _ in wrapped.named_parameters() if ".lora_A." in name}
    assert len(adapted) == 2 * 7 and not any(".memory." in name for name in adapted)  # q k v o gate up down
    changed = _trained(wrapped)
    assert changed and all(".lora_" in name or ".memory.modules_to_save." in name for name in changed)
    merged = wrapped.merge_and_unload()
    assert type(merged) is TitansForCausalLM and not any("lora_" in n for n, _ in merged.named_parameters())
    assert merged.model.layers[0].memory.o_proj.weight.abs().max() > 0
    merged.save_pretrained(tmp_path)
    reloaded = TitansForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(20)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, merged.eval()(x).logits, atol=1e-6, rtol=0)


def test_full_fine_tuning_trains_everything():
    """No parameter is frozen: after two steps every one has moved (the memory's inner parameters start receiving
    gradients once its output projection has left zero, in the first step)."""
    model = TitansForCausalLM.from_base_model(make_base("mistral"), memory_chunk_size=4)
    assert _trained(model) == {name for name, _ in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------- the scripts


def test_convert_then_finetune_scripts(tmp_path):
    """examples/convert.py turns a saved Llama folder into a Titans folder (checked, with a card); examples/finetune.py
    then trains the memory alone, or the memory and LoRA adapters (merged when saved)."""
    sys.path.insert(0, str(EXAMPLES))
    import convert
    import finetune

    torch.manual_seed(0)
    tokenizer = transformers.ByT5Tokenizer()
    base = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "eos_token_id": 1, "bos_token_id": None})
    )
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    report = convert.main(
        [
            "--base_model", str(tmp_path / "base"), "--output_dir", str(tmp_path / "converted"),
            "--sliding_window", "8", "--memory_layers", "1", "--config_overrides", "memory_chunk_size=4",
        ]
    )  # fmt: skip
    assert report["largest_logit_difference"] < 1e-5 and report["verify_tokens"] == 8
    assert report["memory_layers"] == [1] and report["memory_parameters"] > 0
    card = (tmp_path / "converted" / "README.md").read_text()
    assert "converted from" in card and str(tmp_path / "base") in card
    assert (tmp_path / "converted" / "tokenizer_config.json").is_file()

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"Document {i}: the key is {i * 7919 % 100}. " * 6 for i in range(40)))
    converted = load_file(tmp_path / "converted" / "model.safetensors")
    for train in ("memory", "memory+lora"):
        finetune.main(
            [
                "--model_name_or_path", str(tmp_path / "converted"), "--train_file", str(text), "--train", train,
                "--output_dir", str(tmp_path / train), "--block_size", "32", "--per_device_train_batch_size", "2",
                "--max_train_steps", "2", "--eval_steps", "0", "--checkpointing_steps", "0", "--max_eval_samples", "2",
                "--learning_rate", "1e-2", "--lora_r", "2", "--sample_max_new_tokens", "4",
            ]
        )  # fmt: skip
        tuned = load_file(tmp_path / train / "model.safetensors")
        assert tuned.keys() == converted.keys()  # a plain Titans checkpoint (adapters merged)
        changed = {name for name in tuned if not torch.equal(tuned[name], converted[name])}
        assert "model.layers.1.memory.o_proj.weight" in changed
        if train == "memory":
            assert all(".memory." in name for name in changed), changed
        else:  # merged adapters changed the projections; embeddings, norms and head stay the base's
            assert (
                "model.layers.0.attention.q_proj.weight" in changed and "model.layers.0.mlp.up_proj.weight" in changed
            )
            assert all(".memory." in name or name.endswith("_proj.weight") for name in changed), changed


def test_a_bfloat16_base_converts_in_bfloat16():
    base = make_base("qwen3").to(torch.bfloat16)
    model = TitansForCausalLM.from_base_model(base, memory_chunk_size=4).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = tokens(24)
    with torch.no_grad():
        assert torch.equal(model(x).logits.argmax(-1), base(x).logits.argmax(-1))
