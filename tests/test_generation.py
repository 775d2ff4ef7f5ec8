"""TitansCache and generation: exact incremental decoding, generate() modes, padding, pipelines, unbounded
streaming, snapshots and errors."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import BLOCK_TITANS_HF, VARIANTS, random_ids, tiny_config, tiny_model
from transformers import ByT5Tokenizer, DynamicCache, pipeline

from titans_hf import TitansCache, TitansForCausalLM

ids = functools.partial(random_ids, length=37)


def run_in_pieces(model, x: torch.Tensor, cuts: list[int], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``x`` fed through one cache in pieces ending at ``cuts`` (the full mask of the positions so far is
    passed, as generate does)."""
    cache, logits, start = TitansCache(model.config), [], 0
    for end in cuts:
        mask = None if attention_mask is None else attention_mask[:, :end]
        logits.append(model(x[:, start:end], attention_mask=mask, cache=cache).logits)
        start = end
    return torch.cat(logits, dim=1)


# ----------------------------------------------------------------------------------------------------- exactness


# Window 6, chunk 4, segment 8: these cuts cross every kind of boundary, in and out of alignment.
SCHEDULES = {
    "one token at a time": list(range(1, 38)),
    "prefill then steps": [13] + list(range(14, 38)),
    "chunked prefill": [3, 7, 8, 16, 17, 25, 30, 37],
    "long pieces": [20, 37],
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cached_decoding_equals_the_full_forward_float64(variant, schedule):
    model = tiny_model(variant)
    x = ids()
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        pieces = run_in_pieces(model, x, SCHEDULES[schedule])
    torch.testing.assert_close(pieces, full, atol=1e-9, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_the_full_forward_float32(variant):
    model = tiny_model(variant, dtype=torch.float32)
    x = ids()
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        pieces = run_in_pieces(model, x, SCHEDULES["chunked prefill"])
    torch.testing.assert_close(pieces, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batches_in_pieces_equal_each_sequence_alone(variant):
    model = tiny_model(variant)
    lengths = [30, 17, 9]
    width = max(lengths)
    x = ids(batch=3, length=width, seed=4)
    mask = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = 1
        x[b, : width - n] = 0  # the pad token, whose embedding is not zero
    with torch.no_grad():
        batched = run_in_pieces(model, x, [5, 11, 12, 24, 30], attention_mask=mask)
        for b, n in enumerate(lengths):
            alone = model(x[b : b + 1, width - n :], use_cache=False).logits
            torch.testing.assert_close(batched[b : b + 1, width - n :], alone, atol=1e-9, rtol=0)
    assert torch.isfinite(batched).all()


# ----------------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_greedy_and_beam_with_and_without_cache(variant):
    model = tiny_model(variant)
    prompt = ids(batch=2, length=11)
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        cached = model.generate(prompt, max_new_tokens=14, min_new_tokens=14, **kwargs)
        uncached = model.generate(prompt, max_new_tokens=14, min_new_tokens=14, use_cache=False, **kwargs)
        assert cached.shape == (2, 25)
        assert torch.equal(cached, uncached), kwargs


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_generate_sampling_num_return_sequences_and_continuation(variant):
    model = tiny_model(variant)
    prompt = ids(batch=2, length=9)
    torch.manual_seed(0)
    sampled = model.generate(prompt, do_sample=True, max_new_tokens=6, num_return_sequences=3, top_k=10)
    assert sampled.shape == (6, 15)
    assert torch.equal(sampled[::3, :9], prompt)
    beams = model.generate(prompt, num_beams=3, num_return_sequences=2, max_new_tokens=6, min_new_tokens=6)
    assert beams.shape == (4, 15)
    # Continue from the cache returned by a first call: the same tokens as one longer call.
    first = model.generate(prompt, max_new_tokens=7, min_new_tokens=7, return_dict_in_generate=True)
    assert isinstance(first.cache, TitansCache)
    # (the mask is passed: generate would otherwise take generated pad-id tokens for padding)
    mask = torch.ones_like(first.sequences)
    second = model.generate(
        first.sequences, attention_mask=mask, cache=first.cache, max_new_tokens=6, min_new_tokens=6
    )
    whole = model.generate(prompt, max_new_tokens=13, min_new_tokens=13)
    assert torch.equal(second, whole)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_generation_equals_each_prompt_alone(variant):
    model = tiny_model(variant)
    lengths = [13, 5, 9]
    width = max(lengths)
    prompts = [ids(batch=1, length=n, seed=10 + n)[0] for n in lengths]
    batch = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    for kwargs in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        together = model.generate(batch, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, **kwargs)
        for b, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=12, min_new_tokens=12, **kwargs)
            assert torch.equal(together[b, width:], alone[0, len(p) :]), (variant, kwargs, b)


def test_generate_replaces_an_empty_dynamic_cache_and_refuses_a_full_one():
    model = tiny_model("mal")
    x = ids(length=5)
    out = model(x, cache=DynamicCache(config=model.config))
    assert isinstance(out.cache, TitansCache)
    full = DynamicCache(config=model.config)
    full.update(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="needs a TitansCache"):
        model(x, cache=full)


# ----------------------------------------------------------------------------------------------------- pipeline


def byte_model(variant: str = "mag") -> tuple[TitansForCausalLM, ByT5Tokenizer]:
    tokenizer = ByT5Tokenizer()
    config = tiny_config(
        variant,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return TitansForCausalLM(config).eval(), tokenizer


def test_text_generation_pipeline_from_a_model_object():
    model, tokenizer = byte_model()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("Titans remember", max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith("Titans remember")
    batched = generator(["a", "longer prompt"], max_new_tokens=4, do_sample=False, batch_size=2)
    assert len(batched) == 2


def test_text_generation_pipeline_from_a_saved_folder_as_remote_code(tmp_path):
    model, tokenizer = byte_model("mac")
    folder = tmp_path / "titans"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    expected = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        "memory", max_new_tokens=8, do_sample=False
    )[0]["generated_text"]
    script = BLOCK_TITANS_HF + textwrap.dedent(
        f"""
        from transformers import pipeline
        generator = pipeline("text-generation", model={str(folder)!r}, trust_remote_code=True)
        assert "titans_hf" not in sys.modules
        print("OUT:" + generator("memory", max_new_tokens=8, do_sample=False)[0]["generated_text"])
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("OUT:", 1)[1].rstrip("\n") == expected


# ----------------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("variant", ["mag", "lmm"])
def test_streaming_memory_does_not_grow(variant):
    model = tiny_model(variant, dtype=torch.float32, memory_chunk_size=64, sliding_window=64, segment_size=64)
    cache = TitansCache(model.config)
    generator = torch.Generator().manual_seed(0)
    sizes = {}
    with torch.no_grad():
        for read in range(0, 100_000, 10_000):
            block = torch.randint(1, 64, (1, 10_000), generator=generator)
            logits = model(block, cache=cache, logits_to_keep=1).logits
            sizes[read + 10_000] = cache.nbytes
    assert cache.get_seq_length() == 100_000 and int(cache.seen) == 100_000
    assert sizes[20_000] == sizes[100_000] > 0
    assert torch.isfinite(logits).all()


def assert_cache_holds_what_it_shows(cache: TitansCache) -> None:
    storages, shown = {}, 0
    for layer in cache.layers:
        for state in (layer.memory, layer.attention):
            for _, t in [] if state is None else state.named_tensors():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                shown += t.numel() * t.element_size()
    assert sum(storages.values()) <= shown


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_tensors_hold_no_more_memory_than_they_show(variant):
    """The cache keeps alive only what it shows (``cache.nbytes``): no cache tensor is a view into a larger block-sized tensor
    (the convolved block, the block's keys, every segment's start weights, the memory's slot stack), after a long
    prompt, a padded call and a decoding step; and token by token across a segment start with one memory head and
    one row (where a slot of the stack is a contiguous view)."""
    model = tiny_model(variant, dtype=torch.float32)
    x = ids(batch=2, length=48)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    cache = TitansCache(model.config)
    with torch.no_grad():
        for block, block_mask in ((x[:, :40], None), (x[:, 40:47], mask[:, 40:47]), (x[:, 47:], None)):
            model(block, attention_mask=block_mask, cache=cache)
            assert_cache_holds_what_it_shows(cache)
    model = tiny_model(variant, dtype=torch.float32, memory_num_heads=1, memory_head_dim=8)
    cache = TitansCache(model.config)
    with torch.no_grad():
        model(x[:1, :38], cache=cache)
        for i in range(38, 42):  # a segment (and chunk) starts at 40
            model(x[:1, i : i + 1], cache=cache)
            assert_cache_holds_what_it_shows(cache)


def read_19_tokens(variant: str) -> tuple[TitansForCausalLM, torch.Tensor, TitansCache]:
    """A tiny model, 30 tokens, and a cache that has read the first 19 (mid-chunk, mid-window, mid-segment)."""
    model = tiny_model(variant)
    x = ids(length=30)
    cache = TitansCache(model.config)
    with torch.no_grad():
        model(x[:, :19], cache=cache)
    return model, x, cache


@pytest.mark.parametrize("variant", VARIANTS)
def test_snapshot_round_trip_gives_identical_continuations(variant, tmp_path):
    model, x, cache = read_19_tokens(variant)
    cache.save(tmp_path / "memory.safetensors")
    restored = TitansCache.load(tmp_path / "memory.safetensors", model.config)
    assert restored.state_dict().keys() == cache.state_dict().keys()
    with torch.no_grad():
        a = model(x[:, 19:], cache=cache).logits
        b = model(x[:, 19:], cache=restored).logits
    assert torch.equal(a, b)
    continued = model.generate(x[:, :19], max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True)
    copy = continued.cache.copy()
    mask = torch.ones_like(continued.sequences)
    one = model.generate(
        continued.sequences, attention_mask=mask, cache=continued.cache, max_new_tokens=4, min_new_tokens=4
    )
    two = model.generate(continued.sequences, attention_mask=mask, cache=copy, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(one, two)


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_persistent_keys_are_projected_once_per_stream_unless_gradients_are_recorded(variant):
    """Decoding takes the persistent tokens' keys and values from the cache (one key projection per layer and step:
    the token's); a call that records gradients projects them again, so that its loss reaches them."""
    model = tiny_model(variant)
    x = ids(length=20)
    rows = []
    hooks = [
        layer.attention.k_proj.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
        for layer in model.model.layers
    ]
    cache = TitansCache(model.config)
    with torch.no_grad():
        model(x[:, :19], cache=cache)
        rows.clear()
        model(x[:, 19:], cache=cache)
    assert rows and all(n == 1 for n in rows)  # the token only: the persistent keys came from the cache
    for hook in hooks:
        hook.remove()
    model.train()
    model.zero_grad()
    model(x[:, 19:], cache=cache).logits.sum().backward()  # a call with gradients, on a cache made without
    for layer in model.model.layers:
        assert layer.attention.persistent.grad is not None and layer.attention.persistent.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------- errors


def test_past_key_values_is_the_deprecated_name_of_cache():
    model = tiny_model("mal")
    x = ids(length=12)
    with torch.no_grad():
        reference = run_in_pieces(model, x, [7, 12])
        cache = TitansCache(model.config)
        old = [model(x[:, :7], past_key_values=cache).logits, model(x[:, 7:], past_key_values=cache).logits]
        assert torch.equal(torch.cat(old, dim=1), reference)
        with pytest.raises(ValueError, match="past_key_values"):
            model(x, cache=TitansCache(model.config), past_key_values=TitansCache(model.config))


def test_cache_errors(tmp_path):
    model = tiny_model("mac")
    x = ids(length=6)
    cache = TitansCache(model.config)
    model(x, cache=cache)
    with pytest.raises(ValueError, match="another configuration"):
        tiny_model("mag")(x, cache=cache)
    with pytest.raises(ValueError, match="another configuration"):
        tiny_model("mac", segment_size=4)(x, cache=cache)
    with pytest.raises(ValueError, match="batch size 3"):
        model(ids(batch=3, length=2), cache=cache)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(3)
    cache.save(tmp_path / "mac.safetensors")
    with pytest.raises(ValueError, match="another configuration"):
        TitansCache.load(tmp_path / "mac.safetensors", tiny_config("mal"))
    from safetensors.torch import load_file, save_file

    foreign = load_file(tmp_path / "mac.safetensors") | {"layers.0.lora.A": torch.zeros(1)}
    metadata = {"signature": json.dumps(cache.signature), "positions_read": "6", "memory_matrices": '["W", "S"]'}
    save_file(foreign, tmp_path / "foreign.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="Unknown entry 'lora.A'"):
        TitansCache.load(tmp_path / "foreign.safetensors", model.config)
    # A snapshot of titans-hf 0.1.0 (before memory rules: no memory_rule in its signature) is refused by name.
    older = {"signature": json.dumps({k: v for k, v in cache.signature.items() if k != "memory_rule"})}
    save_file(load_file(tmp_path / "mac.safetensors"), tmp_path / "older.safetensors", metadata=older)
    with pytest.raises(ValueError, match="saved by titans-hf 0.1.0"):
        TitansCache.load(tmp_path / "older.safetensors", model.config)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\)"):
        model(x[:, :2], attention_mask=torch.ones(2, 3, dtype=torch.long), cache=cache)
    # The mask may cover the new tokens only, or the cached ones too.
    model(x[:, :2], attention_mask=torch.ones(2, 8, dtype=torch.long), cache=cache)
    model(x[:, :2], attention_mask=torch.ones(2, 2, dtype=torch.long), cache=cache)


def test_cache_batch_operations_follow_beam_search():
    model = tiny_model("mac")
    x = ids(batch=3, length=10)
    whole = model(x, use_cache=False).logits
    cache = TitansCache(model.config)
    model(x[:, :6], cache=cache)
    order = torch.tensor([2, 0, 1])
    reordered = cache.copy()
    reordered.reorder_cache(order)
    torch.testing.assert_close(model(x[order, 6:], cache=reordered).logits, whole[order, 6:], atol=1e-12, rtol=0)
    repeated = cache.copy()
    repeated.batch_repeat_interleave(2)
    out = model(x[:, 6:].repeat_interleave(2, dim=0), cache=repeated).logits
    torch.testing.assert_close(out, whole[:, 6:].repeat_interleave(2, dim=0), atol=1e-12, rtol=0)
    selected = cache.copy()
    selected.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(model(x[1:2, 6:], cache=selected).logits, whole[1:2, 6:], atol=1e-12, rtol=0)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
