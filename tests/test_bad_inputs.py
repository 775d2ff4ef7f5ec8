"""Bad input (issue #7): each mistake raises a ValueError/TypeError that says what is wrong, before any work is done,
or is handled exactly (padding-only rows) - never a wrong answer or a crash deep inside."""

from __future__ import annotations

import pytest
import torch
from tiny import VARIANTS, tiny_config
from transformers import DynamicCache

from titans_hf import TitansCache, TitansConfig, TitansForCausalLM


def config(variant: str = "mag", **overrides) -> TitansConfig:
    return tiny_config(variant, **overrides)


def model(variant: str = "mag", **overrides) -> TitansForCausalLM:
    """A float64 model with gates away from their initial values and a non-zero pad embedding (a leak would show)."""
    torch.manual_seed(0)
    m = TitansForCausalLM(config(variant, **overrides)).double().eval()
    with torch.no_grad():
        for layer in m.model.layers:
            for proj in (layer.memory.lr_proj, layer.memory.momentum_proj, layer.memory.retention_proj):
                proj.bias.add_(torch.randn_like(proj.bias))
        m.model.embed_tokens.weight[0].normal_()
    return m


IDS = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        # empty
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, r"input_ids is empty \(shape \(2, 0\)\)"),
        (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), ValueError, r"input_ids is empty \(shape \(0, 5\)\)"),
        (dict(inputs_embeds=torch.zeros(2, 0, 32, dtype=torch.float64)), ValueError, "inputs_embeds is empty"),
        (dict(inputs_embeds=torch.zeros(0, 3, 32, dtype=torch.float64)), ValueError, "inputs_embeds is empty"),
        (dict(), ValueError, "exactly one of input_ids or inputs_embeds"),
        # ids out of the vocabulary, or not ids
        (
            dict(input_ids=torch.tensor([[1, -1, 3]])),
            RuntimeError,
            r"input_ids must lie in \[0, 64\) \(the vocabulary\)",
        ),
        (dict(input_ids=torch.tensor([[1, 64]])), RuntimeError, r"input_ids must lie in \[0, 64\) \(the vocabulary\)"),
        (dict(input_ids=IDS.float()), TypeError, "integer token ids, got dtype torch.float32"),
        (dict(input_ids=IDS.bool()), TypeError, "integer token ids, got dtype torch.bool"),
        (dict(input_ids=IDS.tolist()), TypeError, "input_ids must be a tensor of token ids, got list"),
        (dict(input_ids=IDS.unsqueeze(-1)), ValueError, r"input_ids must have shape \(batch, seq\), got \(2, 5, 1\)"),
        # attention masks that do not fit
        (dict(input_ids=IDS, attention_mask=torch.ones(2, 4)), ValueError, r"attention_mask has shape \(2, 4\)"),
        (dict(input_ids=IDS, attention_mask=torch.ones(3, 5)), ValueError, r"attention_mask has shape \(3, 5\)"),
        (dict(input_ids=IDS, attention_mask=torch.ones(2, 1, 5)), ValueError, "2D"),
        (dict(input_ids=IDS, attention_mask=torch.full((2, 5), 2)), RuntimeError, "only 0 and 1"),
        (dict(input_ids=IDS, attention_mask=torch.full((2, 5), 0.5)), RuntimeError, "only 0 and 1"),
        # embeddings of the wrong width or kind
        (
            dict(inputs_embeds=torch.zeros(2, 5, 31, dtype=torch.float64)),
            ValueError,
            r"\(batch, seq, 32\), got \(2, 5, 31\)",
        ),
        (
            dict(inputs_embeds=torch.zeros(5, 32, dtype=torch.float64)),
            ValueError,
            r"\(batch, seq, 32\), got \(5, 32\)",
        ),
        (dict(inputs_embeds=torch.zeros(2, 5, 32, dtype=torch.long)), TypeError, "floating-point"),
        # positions Titans cannot honour (it reads a stream in order)
        (dict(input_ids=IDS, position_ids=torch.arange(5).view(1, 5) + 3), RuntimeError, "position_ids disagree"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        model()(**kwargs)


def test_a_cache_from_another_model_or_batch_is_refused(tmp_path):
    m = model("mag")
    other = TitansCache(config("mag", memory_depth=1))
    with pytest.raises(ValueError, match=r"another configuration: \{'memory_depth': \(1, 2\)\}"):
        m(input_ids=IDS, cache=other)
    with pytest.raises(ValueError, match=r"another configuration: \{'variant': \('mac', 'mag'\)\}"):
        m(input_ids=IDS, cache=TitansCache(config("mac")))

    cache = TitansCache(m.config)
    m(input_ids=IDS, cache=cache)
    with pytest.raises(ValueError, match="holds 2 sequences but the inputs have batch size 3"):
        m(input_ids=torch.ones(3, 2, dtype=torch.long), cache=cache)

    used = DynamicCache()
    used.update(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8), 0)
    with pytest.raises(ValueError, match="Titans needs a TitansCache.*DynamicCache"):
        m(input_ids=IDS, cache=used)

    path = tmp_path / "cache.safetensors"
    cache.save(path)
    with pytest.raises(ValueError, match=r"saved for another configuration: \{'sliding_window': \(6, 7\)\}"):
        TitansCache.load(path, config("mag", sliding_window=7))
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cache snapshot .*cache.safetensors.*truncated or corrupt"):
            TitansCache.load(path, m.config)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_only_rows_are_handled_exactly(variant):
    """A row that is all padding in a block reads nothing and writes nothing: its outputs are finite, the other rows
    are unchanged by it, and its later tokens equal a fresh start. Heavy left padding (more pads than a segment) of a
    single prompt works too."""
    m = model(variant)
    generator = torch.Generator().manual_seed(1)
    first = torch.randint(1, 64, (3, 10), generator=generator)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1] = 0
    first[1] = 0
    second = torch.randint(1, 64, (3, 7), generator=generator)
    with torch.no_grad():
        cache = TitansCache(m.config)
        out = m(input_ids=first, attention_mask=mask, cache=cache).logits
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[[0, 2]], m(input_ids=first[[0, 2]]).logits, atol=1e-12, rtol=0)
        assert cache.seen.tolist() == [10, 0, 10]
        later = m(input_ids=second, cache=cache).logits
        torch.testing.assert_close(later[1], m(input_ids=second[1:2]).logits[0], atol=1e-12, rtol=0)

        # One prompt, left-padded by more than a segment / window / chunk.
        prompt = torch.randint(1, 64, (1, 5), generator=generator)
        padded = torch.cat([torch.zeros(1, 11, dtype=torch.long), prompt], dim=1)
        padded_mask = (padded != 0).long()
        out = m(input_ids=padded, attention_mask=padded_mask).logits
        torch.testing.assert_close(out[:, 11:], m(input_ids=prompt).logits, atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_from_another_dtype_is_named_and_convertible(variant):
    """A cache filled in float32 and continued by the same model in bfloat16: a clear error, then `cache.to(dtype=)`
    converts the attention tensors and keeps the memory state in float32, and the stream continues."""
    m = model(variant).float()
    cache = TitansCache(m.config)
    ids = torch.randint(1, 64, (2, 11))
    with torch.no_grad():
        m(input_ids=ids, cache=cache)
        m.to(torch.bfloat16)
        with pytest.raises(
            ValueError,
            match=r"holds float32 activations and a float32 memory state, but the model now runs in torch.bfloat16",
        ):
            m(input_ids=ids[:, :1], cache=cache)
        cache.to(dtype=torch.bfloat16)
        out = m(input_ids=ids[:, :1], cache=cache)
    assert torch.isfinite(out.logits).all()
    for layer in cache.layers:
        if layer.memory is not None:
            assert {w.dtype for w in layer.memory.weights} == {torch.float32}
