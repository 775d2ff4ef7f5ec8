"""NeuralMemory: the chunked closed form against its slow twin, streaming, padding, causality, gradients, errors."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from reference_memory import reference_forward
from torch.func import functional_call

from titans_hf import memory_ops
from titans_hf.memory_ops import CausalConvSiLU, ChunkFunction, ChunkScan, chunk_forward, chunk_scan
from titans_hf.memory_rule import ChunkCoefficients, safeguard_factor
from titans_hf.neural_memory import NeuralMemory, NeuralMemoryState
from titans_hf.rule_titans_hf import TitansHFRule


def default_rule(max_lr: float, momentum: bool = True, max_weight_rms: float | None = None) -> TitansHFRule:
    """The default rule, alone (as the memory builds it), for the tests of the closed form's pieces."""
    return TitansHFRule(4, 2, 3, max_lr=max_lr, momentum=momentum, max_weight_rms=max_weight_rms)


def fields_of(obj) -> list:
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]


def make_memory(seed: int = 0, stir: bool = True, **kwargs) -> NeuralMemory:
    """A float64 memory whose gates are spread far from their initial values, so every term of the update matters."""
    torch.manual_seed(seed)
    config = dict(hidden_size=12, num_heads=2, head_dim=4, depth=2, expansion=2, chunk_size=4, max_lr=0.1)
    config.update(kwargs)
    memory = NeuralMemory(**config).double()
    if stir:
        with torch.no_grad():
            for proj, centre in ((memory.lr_proj, 0.0), (memory.momentum_proj, 0.0), (memory.retention_proj, 2.0)):
                if proj is not None:
                    proj.weight.normal_(0.0, 0.5)
                    proj.bias.normal_(centre, 1.0)
            if memory.conv_weight is not None:
                memory.conv_weight.normal_(0.0, 0.5)
            memory.qkv_proj.weight.normal_(0.0, 0.3)
    return memory


def inputs(batch: int, length: int, hidden: int = 12, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, length, hidden, dtype=torch.float64)


def assert_state_equal(a: NeuralMemoryState, b: NeuralMemoryState, atol: float = 1e-12) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=atol, rtol=0, msg=name)


# ----------------------------------------------------------------------------------------------------- slow twin


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 16])
@pytest.mark.parametrize("momentum,forget", list(itertools.product([True, False], repeat=2)))
def test_matches_per_token_autograd_reference(depth, chunk_size, momentum, forget):
    memory = make_memory(depth=depth, chunk_size=chunk_size, momentum=momentum, forget=forget)
    x = inputs(batch=2, length=23)  # 23 is a multiple of none of the chunk sizes but 1
    out, state, _ = memory(x)
    assert state.seen.tolist() == [23, 23]
    for b in range(2):
        expected = reference_forward(memory, x[b])
        torch.testing.assert_close(out[b], expected, atol=1e-10, rtol=0)


def test_reference_agrees_without_conv():
    memory = make_memory(conv_kernel=0, chunk_size=3)
    x = inputs(batch=1, length=10)
    torch.testing.assert_close(memory(x)[0][0], reference_forward(memory, x[0]), atol=1e-10, rtol=0)


def test_chunk_size_one_is_online_gradient_descent_and_chunks_change_the_function():
    x = inputs(batch=1, length=12)
    online = make_memory(chunk_size=1)(x)[0]
    chunked = make_memory(chunk_size=4)(x)[0]
    # Identical parameters (same seed); only the chunking differs, and it must matter after the first chunk.
    torch.testing.assert_close(online[:, :1], chunked[:, :1], atol=1e-12, rtol=0)
    assert (online[:, 4:] - chunked[:, 4:]).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("chunk_size,momentum", [(1, True), (4, True), (5, False), (16, True)])
def test_any_split_gives_the_same_outputs_and_state(chunk_size, momentum):
    memory = make_memory(chunk_size=chunk_size, momentum=momentum)
    x = inputs(batch=2, length=37)
    whole, whole_state, _ = memory(x)
    generator = torch.Generator().manual_seed(chunk_size)
    for _ in range(3):
        cuts = sorted(torch.randperm(36, generator=generator)[:8].add(1).tolist())
        pieces, state, start = [], None, 0
        for end in cuts + [37]:
            out, state, _ = memory(x[:, start:end], state)
            pieces.append(out)
            start = end
        torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-12, rtol=0)
        assert_state_equal(state, whole_state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": False},
        {"depth": 1},
        {"forget": False, "conv_kernel": 0},
        {"max_lr": 1.0, "max_weight_rms": 0.2},
    ],
    ids=["default", "no-momentum", "linear", "no-forget-no-conv", "safeguard-acts"],
)
def test_single_token_steps_equal_one_call(kwargs):
    """Decoding's one-token recurrence (``NeuralMemory._step``) against the chunked closed form, across chunk
    boundaries (chunk 5) and, in the last case, with the weight safeguard acting at boundaries."""
    memory = make_memory(chunk_size=5, **kwargs)
    x = inputs(batch=2, length=13) if "max_weight_rms" not in kwargs else correlated_inputs(13, 12).repeat(2, 1, 1)
    whole, whole_state, _ = memory(x)
    if "max_weight_rms" in kwargs:
        assert abs(boundary_rms(whole_state, memory) - kwargs["max_weight_rms"]) < 1e-12  # the bound acted
    state, pieces = None, []
    for t in range(13):
        out, state, _ = memory(x[:, t : t + 1], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-12, rtol=0)
    assert_state_equal(state, whole_state)


def test_single_token_steps_from_different_chunk_phases():
    """Sequences of a batch that stopped at different points of their chunks step on together exactly."""
    memory = make_memory(chunk_size=4)
    x = inputs(batch=2, length=12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # sequence 0 has 3 fewer tokens in the prefix
    out, state, _ = memory(x[:, :6], mask=mask[:, :6])
    steps = [out]
    for t in range(6, 12):
        out, state, _ = memory(x[:, t : t + 1], state)
        steps.append(out)
    batched = torch.cat(steps, dim=1)
    for b, start in ((0, 3), (1, 0)):
        alone, alone_state, _ = memory(x[b : b + 1, start:])
        torch.testing.assert_close(batched[b : b + 1, start:], alone, atol=1e-12, rtol=0)
        assert_state_equal(state[b : b + 1], alone_state)


def test_state_size_does_not_grow():
    memory = make_memory(chunk_size=4)
    _, short, _ = memory(inputs(batch=2, length=5))
    _, long, _ = memory(inputs(batch=2, length=50))
    assert short.nbytes == long.nbytes


def test_state_can_be_detached_moved_indexed_and_reordered():
    memory = make_memory(chunk_size=4)
    x = inputs(batch=3, length=14)
    whole, _, _ = memory(x)
    _, state, _ = memory(x[:, :6])
    assert all(not t.requires_grad for t in state.detach().tensors().values())
    assert state.to("cpu").nbytes == state.nbytes
    assert state.to(dtype=torch.float32).seen.dtype == torch.long
    order = torch.tensor([2, 0, 1])
    out, _, _ = memory(x[order, 6:], state.index_select(order))
    torch.testing.assert_close(out, whole[order, 6:], atol=1e-12, rtol=0)
    out, _, _ = memory(x[1:2, 6:], state[1])
    torch.testing.assert_close(out, whole[1:2, 6:], atol=1e-12, rtol=0)
    out, _, _ = memory(x[:, 6:].repeat_interleave(2, dim=0), state.repeat_interleave(2))
    torch.testing.assert_close(out, whole[:, 6:].repeat_interleave(2, dim=0), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------- padding


def test_left_padding_equals_each_sample_alone():
    memory = make_memory(chunk_size=4)
    lengths = [11, 6, 1]
    width = max(lengths)
    x = inputs(batch=3, length=width)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = 1
    x = x + 5.0 * (1 - mask).unsqueeze(-1)  # pad embeddings are non-zero
    out, state, _ = memory(x, mask=mask)
    assert state.seen.tolist() == lengths
    for b, n in enumerate(lengths):
        alone, alone_state, _ = memory(x[b : b + 1, width - n :])
        torch.testing.assert_close(out[b : b + 1, width - n :], alone, atol=1e-12, rtol=0)
        assert_state_equal(state[b], alone_state)
        assert out[b, : width - n].abs().max() == 0 if n < width else True
    # Continuing the padded batch continues every sample exactly.
    more = inputs(batch=3, length=5, seed=3)
    out2, _, _ = memory(more, state)
    for b, n in enumerate(lengths):
        _, alone_state, _ = memory(x[b : b + 1, width - n :])
        torch.testing.assert_close(out2[b : b + 1], memory(more[b : b + 1], alone_state)[0], atol=1e-12, rtol=0)


def test_masked_tokens_anywhere_write_nothing():
    memory = make_memory(chunk_size=3)
    x = inputs(batch=2, length=12)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    x = x.masked_fill(~mask.bool().unsqueeze(-1), 1e6)  # huge pads: any leak would show
    out, state, _ = memory(x, mask=mask)
    assert torch.isfinite(out).all()
    real = mask[0].bool()
    alone, alone_state, _ = memory(x[:1, real])
    torch.testing.assert_close(out[0, real], alone[0], atol=1e-12, rtol=0)
    assert_state_equal(state[0], alone_state)
    # The all-padding row is untouched: its state is the initial one and its outputs are zeros.
    assert_state_equal(state[1], memory.initial_state(1, dtype=torch.float64))
    assert out[1].abs().max() == 0


# ----------------------------------------------------------------------------------------------------- behaviour


def test_causality_is_bit_exact():
    memory = make_memory(chunk_size=4)
    x = inputs(batch=2, length=19)
    base, _, _ = memory(x)
    for t in (0, 3, 4, 10, 18):
        changed = x.clone()
        changed[:, t] += 1.0
        out, _, _ = memory(changed)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.equal(out[:, t:], base[:, t:]), t


def test_the_memory_matters():
    memory = make_memory(chunk_size=4, stir=False)  # at initialisation
    x = inputs(batch=2, length=24)
    with_writes, _, _ = memory(x)
    without_writes, state, _ = memory(x, write=False)
    assert (with_writes - without_writes)[:, 1:].abs().max() > 1e-4
    assert_state_equal(state, memory.initial_state(2, dtype=torch.float64))


def test_retrieve_reads_without_writing():
    memory = make_memory(chunk_size=4)
    x = inputs(batch=2, length=9)
    without_writes, _, _ = memory(x, write=False)
    weights = [w.unsqueeze(0).expand(2, *w.shape) for w in memory.initial_weights]
    out, tail = memory.retrieve(x, weights)
    torch.testing.assert_close(out, without_writes, atol=1e-12, rtol=0)
    # In pieces, carrying the query conv tail, and with padding.
    first, tail = memory.retrieve(x[:, :4], weights)
    second, _ = memory.retrieve(x[:, 4:], weights, tail)
    torch.testing.assert_close(torch.cat([first, second], 1), out, atol=1e-12, rtol=0)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    padded, _ = memory.retrieve(x, weights, mask=mask)
    alone, _ = memory.retrieve(x[1:, 3:], [w[1:] for w in weights])
    torch.testing.assert_close(padded[1:, 3:], alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("write", [True, False])
def test_weights_at_segment_starts_equal_the_states_segment_by_segment(write):
    """``forward(..., segment=S)`` (MAC's all-segments-at-once path) returns the fast weights at every segment start
    (those of the state after each segment read alone) and every segment read with its own (``retrieve`` segment by
    segment, its query conv running on), with the queries' conv tail after the block."""
    memory = make_memory(chunk_size=4)
    x = inputs(batch=2, length=19)  # segments of 8 (two chunks): 8, 8 and a partial 3
    out, state, segments = memory(x, write=write, segment=8)
    starts = segments.start_weights
    assert [tuple(w.shape) for w in starts] == [(2, 3, *w.shape) for w in memory.initial_weights]
    running, pieces, reads, tail = None, [], [], None
    for begin in range(0, 19, 8):
        weights = memory.initial_state(2, dtype=torch.float64).weights if running is None else running.weights
        for w, start in zip(weights, starts):
            torch.testing.assert_close(start[:, begin // 8], w, atol=1e-12, rtol=0)
        read, tail = memory.retrieve(x[:, begin : begin + 8], weights, tail)
        reads.append(read)
        if write:
            piece, running, _ = memory(x[:, begin : begin + 8], running)
            pieces.append(piece)
    if write:
        torch.testing.assert_close(out, torch.cat(pieces, 1), atol=1e-12, rtol=0)
        assert_state_equal(state, running)
    else:
        torch.testing.assert_close(out, memory(x, write=False)[0], atol=0, rtol=0)
    torch.testing.assert_close(segments.output, torch.cat(reads, 1), atol=1e-12, rtol=0)
    torch.testing.assert_close(segments.conv, tail, atol=0, rtol=0)
    with pytest.raises(ValueError, match="segment=6"):
        memory(x, segment=6)  # not whole chunks
    with pytest.raises(ValueError, match="segment=8"):
        memory(x[:, 3:], memory(x[:, :3])[1], segment=8)  # the stream stands mid-segment
    padded = torch.ones(2, 8, dtype=torch.long)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="segment=8"):  # after padding the position is not known on the host
        memory(x[:, 8:16], memory(x[:, :8], mask=padded)[1], segment=8)


def test_gradients_reach_every_parameter():
    memory = make_memory(chunk_size=2, hidden_size=6, head_dim=3, expansion=2)
    x = inputs(batch=1, length=5, hidden=6)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in memory.named_parameters()}

    def run(*values):
        return functional_call(memory, dict(zip(params, values)), (x,))[0]

    assert torch.autograd.gradcheck(run, tuple(params.values()), eps=1e-6, atol=1e-5)
    memory.zero_grad()
    memory(x)[0].pow(2).sum().backward()
    for name, p in memory.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_initialisation_retains():
    torch.manual_seed(0)
    memory = NeuralMemory(hidden_size=256, num_heads=4, head_dim=64)
    x = torch.randn(4, 512, 256)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))  # unit RMS
    retention = memory.log_retention(x).exp()
    momentum = memory.log_momentum(x).exp()
    lr = memory.lr(x)
    assert retention.median() >= 0.95
    assert abs(momentum.median().item() - 0.9) < 0.02
    assert (lr <= memory.max_lr).all() and (lr > 0).all()


def test_half_precision_keeps_float32_state():
    memory = make_memory(chunk_size=4).to(torch.bfloat16)
    x = inputs(batch=2, length=10).to(torch.bfloat16)
    out, state, _ = memory(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(w.dtype == torch.float32 for w in state.weights + state.momentum + state.chunk_weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state, _ = make_memory(chunk_size=4).float()(x.float())
    assert all(w.dtype == torch.float32 for w in state.weights + state.momentum)


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=0), "num_heads"),
        (dict(depth=0), "depth"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(conv_kernel=-1), "conv_kernel"),
        (dict(max_lr=0.0), "max_lr"),
        (dict(max_lr=math.inf), "max_lr"),
        (dict(momentum="yes"), "momentum"),
        (dict(init_momentum=1.0), "init_momentum"),
        (dict(retention_half_lives=(100.0, 10.0)), "retention_half_lives"),
        (dict(retention_half_lives=(0.0, 10.0)), "retention_half_lives"),
        (dict(retention_half_lives=64.0), "retention_half_lives"),
    ],
)
def test_invalid_constructor_arguments(kwargs, match):
    config = dict(hidden_size=8, num_heads=2, head_dim=4)
    config.update(kwargs)
    with pytest.raises(ValueError, match=match):
        NeuralMemory(**config)


def test_bad_inputs_are_named():
    memory = make_memory()
    x = inputs(batch=2, length=5)
    with pytest.raises(ValueError, match=r"\(batch, seq, 12\)"):
        memory(x[..., :7])
    with pytest.raises(ValueError, match="empty"):
        memory(x[:, :0])
    with pytest.raises(ValueError, match="mask must have shape"):
        memory(x, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        memory(x, mask=torch.full((2, 5), 2))
    with pytest.raises(TypeError, match="floating-point"):
        memory(torch.ones(2, 5, 12, dtype=torch.long))
    _, state, _ = memory(x)
    with pytest.raises(ValueError, match="another configuration or batch"):
        make_memory(depth=3)(x, state)
    with pytest.raises(ValueError, match="another configuration or batch"):
        memory(x[:1], state)
    with pytest.raises(ValueError, match="chunk_size"):
        make_memory(chunk_size=5)(x, state)
    with pytest.raises(ValueError, match="momentum"):
        make_memory(momentum=False)(x, state)
    with pytest.raises(ValueError, match="NeuralMemoryState"):
        memory(x, {"weights": []})


@pytest.mark.parametrize("momentum", [True, False])
def test_whole_chunks_coefficients_at_once_equal_each_chunk_with_its_curvature(momentum):
    """The training path computes the gates' part of every whole chunk's coefficients at once (equal to each chunk's
    own), and each chunk divides its steps by its curvature when it is reached: the gain and the written weights
    equal a per-token sum of the closed form's definition, float64."""
    torch.manual_seed(0)
    chunks, batch, heads, size, max_lr = 3, 2, 2, 5, 0.4
    lr = torch.rand(chunks, batch, heads, size, dtype=torch.float64) * 0.3
    log_momentum = -torch.rand(chunks, batch, heads, size, dtype=torch.float64) if momentum else None
    log_retention = -torch.rand(chunks, batch, heads, size, dtype=torch.float64)
    kappa = 1.0 + 3.0 * torch.rand(chunks, batch, heads, size, dtype=torch.float64)
    rule = default_rule(max_lr, momentum)
    at_once = rule.coefficients(lr, log_momentum, log_retention, None)
    for n in range(chunks):
        pieces = (lr[n], None if log_momentum is None else log_momentum[n], log_retention[n])
        own = rule.coefficients(*pieces, None)
        got = ChunkCoefficients(*(f[n] for f in fields_of(at_once)))
        for g, e in zip(fields_of(got), fields_of(own)):
            torch.testing.assert_close(g, e, atol=1e-14, rtol=1e-13)
        # G_ij = g_j sum_{l=j..i} (beta_i / beta_l)(m_l / m_j), g_j = (1 - eta_j) theta_j / kappa_j; gain = -2 G / n_i.
        got = got.divided_by(kappa[n])
        r = log_retention[n].exp()
        eta = torch.zeros_like(r) if log_momentum is None else log_momentum[n].exp()
        g = (1 - eta) * lr[n] / kappa[n]
        n_i = torch.clamp(lr[n].cumsum(-1) / max_lr, min=1.0)
        expected = torch.zeros(batch, heads, size, size, dtype=torch.float64)
        for i in range(size):
            for j in range(i + 1):
                for t in range(j, i + 1):
                    expected[..., i, j] += (
                        g[..., j] * r[..., t + 1 : i + 1].prod(-1) * eta[..., j + 1 : t + 1].prod(-1)
                    )
        torch.testing.assert_close(got.gain, -2.0 * expected / n_i.unsqueeze(-1), atol=1e-14, rtol=1e-12)
        torch.testing.assert_close(got.write[..., 0], got.gain[..., -1, :], atol=0, rtol=0)
        if momentum:  # the momentum slot: S gains -2 g_j (m_C / m_j) / n_C from token j
            to_end = torch.stack([eta[..., j + 1 :].prod(-1) for j in range(size)], -1)
            expected_s = -2.0 * g * to_end / n_i[..., -1:]
            torch.testing.assert_close(got.write[..., 1], expected_s, atol=1e-14, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------- hand backward


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("continuing", [False, True], ids=["from-boundary", "continuing"])
def test_hand_written_chunk_backward_equals_autograd(depth, momentum, continuing):
    """ChunkFunction's backward against autograd through the plain chunk_forward, float64, every input (the step
    curvature's gradient included): a run from a chunk boundary on ``[D; S]`` and a run that continues a chunk on
    ``[D; S; A; B]`` (with the budget acting)."""
    torch.manual_seed(depth)
    batch, heads, chunk, dim, hidden = 2, 2, 5, 3, 4
    dims = [dim] + [hidden] * (depth - 1) + [dim]
    slots = (2 if momentum else 1) * (2 if continuing else 1)
    states = [torch.randn(batch, heads, slots, a, b, dtype=torch.float64) for a, b in zip(dims[:-1], dims[1:])]
    gradient_weights = [torch.randn(batch, heads, a, b, dtype=torch.float64) for a, b in zip(dims[:-1], dims[1:])]
    anchors = [torch.randn(1, heads, a, b, dtype=torch.float64) for a, b in zip(dims[:-1], dims[1:])]
    q, k, t = (torch.randn(batch, heads, chunk, dim, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(batch, heads, chunk, dtype=torch.float64) * 0.3
    log_momentum = -torch.rand(batch, heads, chunk, dtype=torch.float64) if momentum else None
    last = torch.tensor([[chunk - 1, 2], [1, chunk - 1]])  # runs carried from inside the chunk, too
    lr_before = torch.rand(batch, heads, dtype=torch.float64) if continuing else None
    rule = default_rule(0.4, momentum)
    coefficients = rule.coefficients(
        lr, log_momentum, -torch.rand(batch, heads, chunk, dtype=torch.float64), None, last, lr_before
    )
    inputs = [
        x.requires_grad_(True) for x in (q, k, t, *fields_of(coefficients), *gradient_weights, *states, *anchors)
    ]

    def slow_path():
        weights = inputs[7 : 7 + depth]
        reads, new_states, _ = chunk_forward(
            rule,
            inputs[7 + depth : 7 + 2 * depth],
            weights,
            *inputs[:3],
            None,
            ChunkCoefficients(*inputs[3:7]),
            inputs[7 + 2 * depth :],
        )
        return (reads, *new_states)

    def fast_path():
        return ChunkFunction.apply(rule, depth, *inputs[:3], None, *inputs[3:])

    fast = fast_path()
    slow = slow_path()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    upstream = [torch.randn_like(x) for x in fast]
    for used in (len(fast), 1):  # all outputs, then only the reads (the state gradients arrive as None)
        fast = fast_path()
        slow = slow_path()
        got = torch.autograd.grad(fast[:used], inputs, upstream[:used], allow_unused=True)
        expected = torch.autograd.grad(slow[:used], inputs, upstream[:used], allow_unused=True)
        for g, e in zip(got, expected):
            if e is None:
                assert g is None or g.abs().max() == 0
            else:
                torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("cap", [None, 0.7], ids=["no-safeguard", "safeguard"])
@pytest.mark.parametrize("block", [3, 16], ids=["blocks-of-3", "one-block"])
def test_chunk_scan_equals_chunk_function_chunk_after_chunk(depth, momentum, cap, block, monkeypatch):
    """ChunkScan (the state chunk by chunk, the reads at once, a backward split in an at-once and a sequential part)
    against ChunkFunction run chunk after chunk with the safeguard at every boundary, autograd through both, float64:
    the reads, the last state, the weights at every later chunk start, and the gradients of every input. The
    safeguard's cap is low enough that it acts on some chunks and not on others. Four chunks, in one block or in
    blocks of 3 and 1 (the at-once parts run per block); the values also without gradients (``chunk_scan``'s path
    that keeps one block's states at a time)."""
    monkeypatch.setattr(memory_ops, "SCAN_BLOCK", block)
    torch.manual_seed(depth)
    chunks, batch, heads, size, dim, hidden = 4, 2, 2, 5, 3, 4
    dims = [dim] + [hidden] * (depth - 1) + [dim]
    slots = 2 if momentum else 1
    shapes = list(zip(dims[:-1], dims[1:]))
    scale = torch.tensor([2.0, 0.1], dtype=torch.float64).view(batch, 1, 1, 1, 1)  # above and below the cap
    running = [scale * torch.randn(batch, heads, slots, a, b, dtype=torch.float64) for a, b in shapes]
    anchors = [torch.randn(1, heads, a, b, dtype=torch.float64) for a, b in shapes]
    boundary = [(r[:, :, 0] + w).clone() for r, w in zip(running, anchors)]
    q, k, t = (torch.randn(chunks, batch, heads, size, dim, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(chunks, batch, heads, size, dtype=torch.float64)
    log_momentum = -torch.rand(chunks, batch, heads, size, dtype=torch.float64) if momentum else None
    log_retention = -0.1 * torch.rand(chunks, batch, heads, size, dtype=torch.float64)
    rule = default_rule(0.4, momentum, max_weight_rms=cap)
    coefficients = rule.coefficients(lr, log_momentum, log_retention, None)
    inputs = [x.requires_grad_(True) for x in (q, k, t, *fields_of(coefficients), *running, *boundary, *anchors)]

    def per_chunk():
        q, k, t, read, gain, write, transition = inputs[:7]
        state, start = inputs[7 : 7 + depth], inputs[7 + depth : 7 + 2 * depth]
        w0 = inputs[7 + 2 * depth :]
        reads, starts, acted = [], [], []
        for n in range(chunks):
            flat = (q[n], k[n], t[n], read[n], gain[n], write[n], transition[n], *start, *state, *w0)
            y, *state = ChunkFunction.apply(rule, depth, *flat[:3], None, *flat[3:])
            if cap is not None:
                factors = [safeguard_factor(x, cap) for x in state]
                acted += [(f < 1).flatten().tolist() for f in factors]
                state = [x * f for x, f in zip(state, factors)]
            start = [x[:, :, 0] + w for x, w in zip(state, w0)]
            reads.append(y)
            starts.append(start)
        return (torch.stack(reads), *state, *(torch.stack(s) for s in zip(*starts))), acted

    def at_once(all_starts=True):
        return ChunkScan.apply(rule, depth, all_starts, *inputs[:3], None, *inputs[3:])

    slow, acted = per_chunk()
    fast = at_once()
    if cap is not None:
        acted = sum(acted, [])
        assert any(acted) and not all(acted)  # the safeguard acts on some states, not all
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with torch.no_grad():  # the path without a backward (one block's states kept at a time)
        reads, state, starts = chunk_scan(
            rule, q, k, t, None, coefficients, running, boundary, anchors, all_starts=True
        )
    for a, b in zip((reads, *state, *starts), slow):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    upstream = [torch.randn_like(x) for x in fast]
    # Every output; the reads only (the state gradients arrive as None); the reads and the start weights.
    for used in (list(range(len(fast))), [0], [0, *range(1 + depth, 1 + 2 * depth)]):
        fast, slow = at_once(), per_chunk()[0]
        outputs = [fast[i] for i in used], [slow[i] for i in used]
        grads = [upstream[i] for i in used]
        got = torch.autograd.grad(outputs[0], inputs, grads, allow_unused=True)
        expected = torch.autograd.grad(outputs[1], inputs, grads, allow_unused=True)
        for g, e in zip(got, expected):
            if e is None:
                assert g is None or g.abs().max() == 0
            else:
                torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)
    # Keeping only the last start weights: the same outputs and gradients for it.
    fast, slow = at_once(all_starts=False), per_chunk()[0]
    slow = (*slow[: 1 + depth], *(s[-1:] for s in slow[1 + depth :]))
    grads = [*upstream[: 1 + depth], *(u[-1:] for u in upstream[1 + depth :])]
    got = torch.autograd.grad(fast, inputs, grads, allow_unused=True)
    expected = torch.autograd.grad(slow, inputs, grads, allow_unused=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


def test_causal_conv_silu_matches_conv1d_and_gradcheck():
    torch.manual_seed(0)
    padded = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    expected = F.silu(F.conv1d(padded.transpose(1, 2), weight.unsqueeze(1), groups=5).transpose(1, 2))
    torch.testing.assert_close(CausalConvSiLU.apply(padded, weight), expected, atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(CausalConvSiLU.apply, (padded, weight))


# ----------------------------------------------------------------------------------------------------- safeguard


def weight_rms(state: NeuralMemoryState, memory: NeuralMemory) -> torch.Tensor:
    """The largest per-head RMS of what the safeguard bounds: ``W - W_0`` and the momentum."""
    initial = [w.to(state.weights[0].dtype) for w in memory.initial_weights]
    tensors = [w - w0 for w, w0 in zip(state.weights, initial)] + (state.momentum or [])
    return torch.stack([t.pow(2).mean(dim=(-2, -1)).sqrt().max() for t in tensors]).max()


def correlated_inputs(length: int, hidden: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Tokens that share most of their direction: the hard case for summed chunk gradients with momentum."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(1, 1, hidden, generator=generator, dtype=dtype)
    return common + 0.3 * torch.randn(1, length, hidden, generator=generator, dtype=dtype)


def boundary_rms(state: NeuralMemoryState, memory: NeuralMemory) -> float:
    """The largest per-head RMS of ``W - W_0`` at the last chunk boundary."""
    return max(
        (w - w0).pow(2).mean(dim=(-2, -1)).sqrt().max().item()
        for w, w0 in zip(state.chunk_weights, memory.initial_weights)
    )


def test_weight_safeguard_matches_the_twin_when_it_acts():
    memory = make_memory(chunk_size=4, max_lr=1.0, max_weight_rms=0.2)
    x = correlated_inputs(30, 12)
    out, state, _ = memory(x)
    assert abs(boundary_rms(state, memory) - 0.2) < 1e-12  # the bound acted (on the last chunk boundary)
    torch.testing.assert_close(out[0], reference_forward(memory, x[0]), atol=1e-10, rtol=0)


def test_weight_safeguard_keeps_a_diverging_memory_finite_and_bounded():
    torch.manual_seed(0)
    # A budget of 8 lets a chunk of keys that share their direction overshoot (stable needs max_lr <= 1); the step
    # curvature keeps the overshoot from growing exponentially, but it leaves the safeguard's range.
    kwargs = dict(hidden_size=64, num_heads=2, head_dim=32, chunk_size=64, max_lr=8.0, init_lr_fraction=0.9)
    x = correlated_inputs(2048, 64, dtype=torch.float32)
    free = NeuralMemory(**kwargs, max_weight_rms=None)
    guarded = NeuralMemory(**kwargs)
    guarded.load_state_dict(free.state_dict())
    with torch.no_grad():
        _, free_state, _ = free(x)
        out, state, _ = guarded(x)
    free_rms = weight_rms(free_state, free)
    assert not torch.isfinite(free_rms) or free_rms > 2.0  # out of range without it
    assert torch.isfinite(out).all()
    assert weight_rms(state, guarded) <= 1.0 + 1e-6


def test_weight_safeguard_does_not_change_the_normal_range():
    torch.manual_seed(0)
    memory = NeuralMemory(hidden_size=64, num_heads=2, head_dim=32, chunk_size=16)
    x = torch.randn(2, 512, 64)
    with torch.no_grad():
        guarded, state, _ = memory(x)
        memory.rule.max_weight_rms = None
        free, _, _ = memory(x)
    assert weight_rms(state, memory) < 1.0
    assert torch.equal(guarded, free)


def test_weight_safeguard_has_finite_gradients_at_a_zero_state():
    """A zero momentum (the start of every stream) must not give 0 * inf in the backward of the bound."""
    memory = NeuralMemory(hidden_size=8, num_heads=2, head_dim=4, chunk_size=2)
    states = [torch.zeros(1, 2, 2, 4, 16), 10 * torch.randn(1, 2, 2, 16, 4)]  # under and over the bound
    states = [s.requires_grad_(True) for s in states]
    sum(s.sum() for s in memory.rule.bound(states)[0]).backward()
    assert all(torch.isfinite(s.grad).all() for s in states)
    x = torch.randn(1, 9, 8, requires_grad=True)
    memory(x)[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in memory.parameters())


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("budget", [True, False])
def test_one_token_coefficients_are_the_general_forms_bit_for_bit(momentum, budget):
    """A run of one token (a decoding step) takes a shortcut in ``linear_recurrence``; it must give what the general
    form gives for that token: here, the first token of a two-token run carried from it (``last = 0``)."""
    from titans_hf.memory_rule import linear_recurrence

    torch.manual_seed(0)
    lr = torch.rand(2, 3, 2, dtype=torch.float64)
    log_momentum = -torch.rand(2, 3, 2, dtype=torch.float64) if momentum else None
    log_retention = -torch.rand(2, 3, 2, dtype=torch.float64)
    steps = 2.0 * lr * torch.expm1(log_momentum) if momentum else -2.0 * lr
    scale = 1.0 / (1.0 + torch.rand(2, 3, 2, dtype=torch.float64)) if budget else None
    first = torch.zeros(2, 3, dtype=torch.long)
    general = linear_recurrence(steps, log_momentum, log_retention, first, scale)
    with torch.no_grad():  # (the shortcut: a decoding step)
        one = linear_recurrence(
            steps[..., :1],
            None if log_momentum is None else log_momentum[..., :1],
            log_retention[..., :1],
            None,
            None if scale is None else scale[..., :1],
        )
    assert torch.equal(one.read, general.read[..., :1, :])
    assert torch.equal(one.gain, general.gain[..., :1, :1])
    assert torch.equal(one.write, general.write[..., :1, :])
    assert torch.equal(one.transition, general.transition)
