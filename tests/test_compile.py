"""`torch.compile(fullgraph=True)`: a training step (forward and backward) and cached decoding steps of every variant
capture as one graph each and compute what eager computes. The fast case (MAG, AOTAutograd) runs by default; the
other variants are slow (`pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch
from tiny import VARIANTS, tiny_model
from torch._dynamo.utils import counters


def training_step(
    forward: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = forward(x, labels=x).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def check_training_step(variant: str, backend: str, **overrides) -> None:
    torch._dynamo.reset()
    model = tiny_model(variant, dtype=torch.float32, **overrides).train()
    x = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(0))  # 2 chunks and a part
    loss, grads = training_step(model, model, x)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    compiled_loss, compiled_grads = training_step(compiled, model, x)
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def check_decoding_steps(variant: str, backend: str, steps: int = 7) -> None:
    """``steps`` compiled decoding steps equal eager ones; a long stream does not recompile at every step (the
    position is a host integer: dynamo makes it dynamic after the first change, then guards only on where the
    step falls: a chunk, window or segment boundary or not)."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(variant, dtype=torch.float32)
    x = torch.randint(1, 64, (2, 5 + steps), generator=torch.Generator().manual_seed(1))

    def step(ids: torch.Tensor, cache):
        out = model(ids, cache=cache, use_cache=True)
        return out.logits, out.cache

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    with torch.no_grad():
        cache, eager_cache = model(x[:, :5], use_cache=True).cache, model(x[:, :5], use_cache=True).cache
        for t in range(5, 5 + steps):  # across chunk (4), window (6) and segment (8) boundaries
            logits, cache = compiled(x[:, t : t + 1], cache)
            expected, eager_cache = step(x[:, t : t + 1], eager_cache)
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 4, counters["stats"]["unique_graphs"]


def test_training_step_compiles_as_one_graph():
    check_training_step("mag", "aot_eager", num_hidden_layers=1)


def test_decoding_step_compiles_as_one_graph():
    check_decoding_steps("mag", "eager", steps=30)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_compiles(variant):
    check_training_step(variant, "aot_eager")
    check_decoding_steps(variant, "aot_eager")


@pytest.mark.slow
def test_inductor_cpu_backward_equals_eager():
    """torch 2.13's inductor CPU code computed the memory's backward wrongly (over >= 2 chunks of a depth-2 memory: an
    inlining bug) until the chunk loop shared the step curvature's key side and computed the gates' coefficients at
    once; this keeps the graph clear of it. (MAC does not compile with inductor on CPU: the scripts refuse it.)"""
    check_training_step("mag", "inductor", num_hidden_layers=1)


@pytest.mark.slow
def test_trainer_torch_compile_trains_like_eager(tmp_path):
    """`TrainingArguments(torch_compile=True)` (AOTAutograd on CPU, README "torch.compile"): the same parameters as
    an eager run after a few steps."""
    from transformers import Trainer, TrainingArguments

    x = torch.randint(1, 64, (8, 16), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in x]
    finals = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_model("mag", dtype=torch.float32).train()
        args = TrainingArguments(
            output_dir=str(tmp_path / str(compiled)), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, data_seed=0,
            torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data).train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
