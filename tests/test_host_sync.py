"""No host synchronisation on the hot paths: an unpadded training step (forward and backward) and cached decoding
steps never copy a device value to the host (on a GPU each copy would drain the stream). Counted on CPU with a
dispatch mode that sees every op reaching the kernels."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from tiny import VARIANTS, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a device value on the host, or whose output shape depends on values (a synchronisation on a GPU).
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Counts host reads, with the line of `titans_hf` that made each."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            frames = [f for f in traceback.extract_stack() if "titans_hf" in f.filename]
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "outside titans_hf"
            self.calls[f"{func} at {where}"] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_host_reads():
    with HostReads() as reads:
        x = torch.arange(5)
        bool(x.any()), int(x.max()), x.nonzero()  # noqa: B018
    assert sum(reads.calls.values()) == 3, reads.calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_unpadded_training_step_reads_nothing_on_the_host(variant):
    model = tiny_model(variant, dtype=torch.float32).train()
    x = torch.randint(1, 64, (2, 23), generator=torch.Generator().manual_seed(0))  # ends inside a chunk and segment
    with HostReads() as reads:
        loss = model(x, labels=x).loss
        loss.backward()
    assert not reads.calls, dict(reads.calls)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_steps_read_nothing_on_the_host(variant):
    model = tiny_model(variant, dtype=torch.float32)
    x = torch.randint(1, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x[:, :7], use_cache=True)  # the prefill stops inside a chunk, a window and a segment
        cache = out.cache
        logits = [out.logits]
        with HostReads() as reads:
            for t in range(7, 14):  # steps across chunk and segment boundaries
                step = model(x[:, t : t + 1], cache=cache, use_cache=True)
                cache = step.cache
                logits.append(step.logits)
        assert not reads.calls, dict(reads.calls)
        # The host-scheduled steps compute what the full pass computes.
        full = model(x, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=0, atol=1e-5)


def test_padding_falls_back_to_the_device_schedule():
    """A padded call reads the counts (where it must) and leaves the stream on the device schedule; a mask of ones
    costs one read per call and keeps the host schedule."""
    model = tiny_model("mag", dtype=torch.float32)
    x = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    with torch.no_grad(), HostReads() as reads:
        cache = model(x, attention_mask=mask, use_cache=True).cache
    assert sum(reads.calls.values()) == 1 and cache.common_seen == 9
    mask[0, :3] = 0
    with torch.no_grad():
        cache = model(x, attention_mask=mask, use_cache=True).cache
    assert cache.common_seen is None
    assert all(layer.memory.common_seen is None for layer in cache.layers if layer.memory is not None)


def test_generate_reads_the_device_only_for_a_given_mask():
    """generate() without an attention mask (Transformers >= 5.2x makes none for unpadded inputs) reads nothing inside
    the model, prefill and steps alike; with the tokenizer's mask of ones, one read per call (whether the new tokens
    are all real: it decides the schedule). generate's own stopping checks read on their own, outside the model."""
    model = tiny_model("mac", dtype=torch.float32)
    x = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    forward, inside = model.forward, []

    def counted(*args, **kwargs):
        before = sum(reads.calls.values())
        out = forward(*args, **kwargs)
        inside.append(sum(reads.calls.values()) - before)
        return out

    model.forward = counted
    for mask, expected in ((None, 0), (torch.ones_like(x), 1)):
        inside.clear()
        with HostReads() as reads:
            model.generate(x, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert inside == [expected] * 6, (mask is None, inside)
