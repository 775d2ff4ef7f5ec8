"""`torch.compile(fullgraph=True)`: a training step (forward and backward) and cached decoding steps of every variant
capture as one graph each and compute what eager computes; the closed form is one opaque operation (its graph does not
grow with the number of chunks) and a new sequence length does not recompile (dynamic shapes, lengths of whole
chunks); a compiled decoder layer serves every layer (regional compilation). Inductor runs with `pytest -m slow`."""

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


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_compiles_as_one_graph(variant):
    check_training_step(variant, "aot_eager", num_hidden_layers=1)


def graph_sizes(model: torch.nn.Module, lengths: list[int], **compile_kwargs) -> list[int]:
    """The node count of every graph dynamo captures while a training step runs at each of ``lengths`` (its own
    backend: capture only, no AOTAutograd)."""
    sizes = []

    def backend(gm, example_inputs):
        sizes.append(len(gm.graph.nodes))
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True, **compile_kwargs)
    for length in lengths:
        x = torch.randint(1, 64, (2, length), generator=torch.Generator().manual_seed(length))
        compiled(x, labels=x).loss.backward()
    return sizes


def test_graph_size_does_not_depend_on_the_number_of_chunks():
    """The chunk loop is one opaque operation: 4 and 16 chunks capture graphs of the same size (static shapes: one
    graph per length)."""
    torch._dynamo.reset()
    model = tiny_model("mag", dtype=torch.float32, memory_chunk_size=4).train()
    sizes = graph_sizes(model, [16, 64], dynamic=False)
    assert len(sizes) == 2 and sizes[0] == sizes[1], sizes


def test_new_lengths_do_not_recompile():
    """Lengths of whole chunks (and on one side of the window attention's block size) share one graph once dynamo
    has made the length dynamic (its default: at the first new length); a length with a partial last chunk compiles
    once more (README "torch.compile")."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("mag", dtype=torch.float32, memory_chunk_size=4).train()
    graph_sizes(model, [16, 24, 40, 60])
    assert counters["stats"]["unique_graphs"] == 2  # static at 16, then one dynamic graph for every length
    graph_sizes(model, [18])
    assert counters["stats"]["unique_graphs"] == 3


def test_one_compiled_layer_serves_every_layer():
    """Regional compilation (each decoder layer compiled, as ``accelerate.utils.compile_regions`` does): the layers
    share one graph, for training and with a cache."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("mag", dtype=torch.float32, num_hidden_layers=3).train()
    sizes = []

    def backend(gm, example_inputs):
        sizes.append(len(gm.graph.nodes))
        return gm.forward

    for layer in model.model.layers:
        layer.compile(backend=backend, fullgraph=True, dynamic=True)
    x = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x, labels=x, use_cache=False).loss.backward()
    model(x, labels=x).loss.backward()  # (with a cache: each layer gets its own states)
    assert counters["stats"]["unique_graphs"] == 2, counters["stats"]


def test_decoding_step_compiles_as_one_graph():
    check_decoding_steps("mag", "eager", steps=30)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_decodes_compiled(variant):
    check_training_step(variant, "aot_eager")
    check_decoding_steps(variant, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mag", "mal", "lmm"])
def test_inductor_cpu_equals_eager(variant):
    """With the memory's closed form opaque to inductor, the memory's gradients no longer go through inductor's CPU
    code (torch 2.13 computed them wrongly there over >= 2 chunks of a depth-2 memory). MAC still fails to compile
    with inductor on CPU (an internal error, "vr must not be None", in its masks' indexing): the scripts refuse it."""
    check_training_step(variant, "inductor")
    check_decoding_steps(variant, "inductor")


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


def test_decoding_graph_is_cuda_graph_ready():
    """What ``mode="reduce-overhead"`` (CUDA graphs) needs, checked on the captured decoding step as far as a CPU can:
    one graph, no host reads (no ``.item()`` / ``_local_scalar_dense``, no data-dependent branches: fullgraph), no
    in-place writes into its inputs (the cache's tensors are replaced, not mutated), and inputs of the same shapes at
    every step (no recompilation after the position became dynamic)."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("mag", dtype=torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(ids, cache):
        return model(ids, cache=cache, use_cache=True).logits

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    x = torch.randint(1, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(x[:, :8], use_cache=True).cache
        eager_cache = cache.copy()
        for t in range(8, 20):
            expected = step(x[:, t : t + 1], eager_cache)
            torch.testing.assert_close(compiled(x[:, t : t + 1], cache), expected, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] <= 4
    for gm in graphs:
        placeholders = {node for node in gm.graph.nodes if node.op == "placeholder"}
        for node in gm.graph.nodes:
            name = getattr(node.target, "__name__", str(node.target))
            assert name not in ("item", "tolist") and "_local_scalar_dense" not in name, name
            in_place = node.op == "call_method" and name.endswith("_") and not name.startswith("__")
            assert not (in_place and node.args and node.args[0] in placeholders), (name, node.args[0])
