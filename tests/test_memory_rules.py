"""The memory rules other than the default: each rule's chunked closed form against its own slow twin
(``reference_rules.py``), streaming at every split, decoding steps, padding, the hand-written backward, gradients; the
config's rule fields. (``titans-hf``'s own tests are ``test_neural_memory.py``.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference_rules import moneta_reference, titans_reference, yaad_reference
from tiny import VARIANTS, random_ids, tiny_model
from torch.func import functional_call

from titans_hf import TitansCache, TitansConfig, memory_ops
from titans_hf.memory_ops import ChunkFunction, ChunkScan, chunk_forward
from titans_hf.memory_rule import ChunkCoefficients
from titans_hf.neural_memory import NeuralMemory, NeuralMemoryState
from titans_hf.rule_registry import MEMORY_RULES, rule_class


def omega_reference(memory, x):
    return titans_reference(memory, x, memory.rule.window, memory.rule.rule_gates(x))


TWINS = {"titans": titans_reference, "moneta": moneta_reference, "yaad": yaad_reference, "omega": omega_reference}
RULES = sorted(TWINS)


def make_memory(rule: str, seed: int = 0, **kwargs) -> NeuralMemory:
    """A float64 memory of ``rule`` whose gates are spread far from their initial values (so every term matters)."""
    torch.manual_seed(seed)
    config = dict(hidden_size=12, num_heads=2, head_dim=4, depth=2, expansion=2, chunk_size=4, max_lr=0.1, rule=rule)
    config.update(kwargs)
    memory = NeuralMemory(**config).double()
    with torch.no_grad():
        for proj, centre in ((memory.lr_proj, 0.0), (memory.momentum_proj, 0.0), (memory.retention_proj, 2.0)):
            if proj is not None:
                proj.weight.normal_(0.0, 0.5)
                proj.bias.normal_(centre, 1.0)
        if memory.conv_weight is not None:
            memory.conv_weight.normal_(0.0, 0.5)
        memory.qkv_proj.weight.normal_(0.0, 0.3)
        if rule == "yaad":  # thresholds around the errors' norms: both branches are taken
            memory.rule.threshold_proj.weight.normal_(0.0, 0.5)
            memory.rule.threshold_proj.bias.fill_(0.0)
        if rule == "omega" and memory.rule.window_proj is not None:
            memory.rule.window_proj.weight.normal_(0.0, 0.5)
            memory.rule.window_proj.bias.normal_(0.0, 1.0)
    return memory


def inputs(batch: int, length: int, hidden: int = 12, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, length, hidden, dtype=torch.float64)


def assert_state_equal(a: NeuralMemoryState, b: NeuralMemoryState) -> None:
    """Equal to float64 rounding (relative: Moneta's weights grow large as its accumulator fades, see its module)."""
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys() and a.names == b.names
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=1e-12, rtol=1e-11, msg=name)


# ----------------------------------------------------------------------------------------------------- twins


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("depth,chunk_size", [(1, 1), (2, 1), (1, 5), (2, 5), (3, 16)])
@pytest.mark.parametrize("momentum", [True, False])
def test_each_rule_matches_its_slow_twin(rule, depth, chunk_size, momentum):
    memory = make_memory(rule, depth=depth, chunk_size=chunk_size, momentum=momentum)
    x = inputs(batch=2, length=23)  # 23 is a multiple of none of the chunk sizes but 1
    out, _, _ = memory(x)
    for b in range(2):
        torch.testing.assert_close(out[b], TWINS[rule](memory, x[b]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_matches_its_twin_with_the_safeguard_acting(rule):
    memory = make_memory(rule, chunk_size=3, max_lr=1.0, max_weight_rms=0.15)
    x = inputs(batch=1, length=18) + 2.0  # keys that share a direction: large writes; ends on a boundary
    out, state, _ = memory(x)
    assert abs(max(m.pow(2).mean(dim=(-2, -1)).sqrt().max().item() for m in state.matrices) - 0.15) < 1e-12
    torch.testing.assert_close(out[0], TWINS[rule](memory, x[0]), atol=1e-10, rtol=0)


def test_yaad_takes_both_branches():
    memory = make_memory("yaad")
    x = inputs(batch=1, length=23)
    q, k, v = memory.split_heads(memory.causal_conv(memory.qkv_proj(x), None, memory.conv_weight, None)[0])
    delta = memory.rule.rule_gates(x)[..., 0].transpose(1, 2)  # (batch, heads, length)
    weights = [w.unsqueeze(0) for w in memory.initial_weights]
    error = memory_ops.memory_mlp(weights, torch.nn.functional.normalize(k, dim=-1), True) - v
    small = error.norm(dim=-1) <= delta
    assert small.any() and not small.all()


def test_omega_with_a_window_of_one_is_the_titans_rule():
    omega = make_memory("omega", omega_window=1)
    titans = make_memory("titans")
    x = inputs(batch=2, length=19)
    assert torch.equal(omega(x)[0], titans(x)[0])


@pytest.mark.parametrize("window", [2, 6])
def test_omega_windows_span_chunks_and_calls(window):
    """Windows longer and shorter than a chunk (4), across chunk boundaries and calls, with the twin."""
    memory = make_memory("omega", omega_window=window)
    x = inputs(batch=1, length=15)
    out, _, _ = memory(x)
    torch.testing.assert_close(out[0], omega_reference(memory, x[0]), atol=1e-10, rtol=0)
    first, state, _ = memory(x[:, :6])
    second, _, _ = memory(x[:, 6:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), out, atol=1e-12, rtol=0)


def test_moneta_with_p_2_and_q_2_is_gradient_descent_on_l2():
    """``l_2`` bias and ``l_2`` retention: Moneta is the paper's Titans rule without momentum (up to the 1e-6 of the
    smoothed absolute value)."""
    moneta = make_memory("moneta", moneta_p=2.0, moneta_q=2.0, momentum=False)
    titans = make_memory("titans", momentum=False)
    x = inputs(batch=2, length=19)
    torch.testing.assert_close(moneta(x)[0], titans(x)[0], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("momentum", [True, False])
def test_any_split_and_single_token_steps_give_the_same_outputs_and_state(rule, momentum):
    memory = make_memory(rule, chunk_size=4, momentum=momentum)
    x = inputs(batch=2, length=21)
    whole, whole_state, _ = memory(x)
    generator = torch.Generator().manual_seed(3)
    for cuts in (sorted(torch.randperm(20, generator=generator)[:6].add(1).tolist()), list(range(1, 21))):
        pieces, state, start = [], None, 0
        for end in cuts + [21]:
            out, state, _ = memory(x[:, start:end], state)
            pieces.append(out)
            start = end
        torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-12, rtol=0)
        assert_state_equal(state, whole_state)


@pytest.mark.parametrize("rule", RULES)
def test_padding_anywhere_equals_each_sequence_alone(rule):
    memory = make_memory(rule, chunk_size=3)
    x = inputs(batch=3, length=12)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1], [1] * 12, [0] * 7 + [1] * 5])
    x = x.masked_fill(~mask.bool().unsqueeze(-1), 1e3)  # large pads: any leak would show
    out, state, _ = memory(x, mask=mask)
    more = inputs(batch=3, length=5, seed=3)
    continued, _, _ = memory(more, state)
    for b in range(3):
        real = mask[b].bool()
        alone, alone_state, _ = memory(x[b : b + 1, real])
        torch.testing.assert_close(out[b, real], alone[0], atol=1e-12, rtol=0)
        assert out[b, ~real].abs().max() == 0 if (~real).any() else True
        assert_state_equal(state[b], alone_state)
        torch.testing.assert_close(continued[b : b + 1], memory(more[b : b + 1], alone_state)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("rule", RULES)
def test_state_saves_and_loads(rule):
    memory = make_memory(rule)
    x = inputs(batch=2, length=14)
    whole, _, _ = memory(x)
    _, state, _ = memory(x[:, :9])
    restored = NeuralMemoryState.from_tensors(
        {name: t.clone() for name, t in state.tensors().items()}, state.chunk_size, state.names
    )
    torch.testing.assert_close(memory(x[:, 9:], restored)[0], whole[:, 9:], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="another configuration"):
        make_memory("titans-hf" if rule != "titans-hf" else "titans")(x[:, 9:], state)


# ----------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("rule", RULES)
def test_gradients_reach_every_parameter(rule):
    memory = make_memory(rule, chunk_size=2, hidden_size=6, head_dim=3, expansion=2)
    x = inputs(batch=1, length=5, hidden=6)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in memory.named_parameters()}

    def run(*values):
        return functional_call(memory, dict(zip(params, values)), (x,))[0]

    assert torch.autograd.gradcheck(run, tuple(params.values()), eps=1e-6, atol=1e-5)
    memory.zero_grad()
    memory(x)[0].pow(2).sum().backward()
    for name, p in memory.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def fields_of(obj) -> list:
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("momentum", [True, False])
def test_hand_written_backward_equals_autograd(rule, momentum, monkeypatch):
    """ChunkFunction (one run) and ChunkScan (whole chunks, with the rule's maps at every boundary, in blocks of 2)
    against autograd through the plain ``chunk_forward`` chunk after chunk, float64: every output and every input's
    gradient, the rule's error parameters included."""
    monkeypatch.setattr(memory_ops, "SCAN_BLOCK", 2)
    memory = make_memory(rule, momentum=momentum, max_weight_rms=0.7)
    rule_ = memory.rule
    torch.manual_seed(0)
    chunks, batch, heads, size, dim, hidden = 3, 2, 2, 5, 4, 8
    shapes = [(dim, hidden), (hidden, dim)]
    slots = rule_.num_matrices()
    scale = torch.tensor([2.0, 0.1], dtype=torch.float64).view(batch, 1, 1, 1, 1)  # above and below the cap
    running = [scale * torch.randn(batch, heads, slots, a, b, dtype=torch.float64) for a, b in shapes]
    boundary = [torch.randn(batch, heads, a, b, dtype=torch.float64) for a, b in shapes]
    extra = rule_.window - 1  # the gradient tokens of a window rule: the window's earlier ones first
    q = torch.randn(chunks, batch, heads, size, dim, dtype=torch.float64)
    k, t = (torch.randn(chunks, batch, heads, size + extra, dim, dtype=torch.float64) for _ in range(2))
    gates = None if not extra else torch.rand(chunks, batch, heads, size, extra, dtype=torch.float64)
    params = None
    if rule == "yaad":
        params = 0.2 + 2.0 * torch.rand(chunks, batch, heads, size, 1, dtype=torch.float64)
    lr = torch.rand(chunks, batch, heads, size, dtype=torch.float64)
    log_momentum = -torch.rand(chunks, batch, heads, size, dtype=torch.float64) if momentum else None
    log_retention = -0.1 * torch.rand(chunks, batch, heads, size, dtype=torch.float64)
    coefficients = rule_.coefficients(lr, log_momentum, log_retention, gates)
    tensors = (q, k, t, params, *fields_of(coefficients), *running, *boundary)
    leaves = [None if x is None else x.requires_grad_(True) for x in tensors]
    depth = len(shapes)

    def unpack(values):
        q, k, t, params, read, gain, write, transition = values[:8]
        return (
            q,
            k,
            t,
            params,
            ChunkCoefficients(read, gain, write, transition),
            values[8 : 8 + depth],
            values[8 + depth :],
        )

    def per_chunk(autograd: bool):
        q, k, t, params, c, state, start = unpack(leaves)
        reads, starts = [], []
        for n in range(chunks):
            c_n = ChunkCoefficients(*(f[n] for f in c.fields()))
            p_n = None if params is None else params[n]
            if autograd:
                y, state, _ = chunk_forward(rule_, state, start, q[n], k[n], t[n], p_n, c_n, None)
            else:
                y, *state = ChunkFunction.apply(rule_, depth, q[n], k[n], t[n], p_n, *c_n.fields(), *start, *state)
            state, _ = rule_.bound(state)
            start = [x[:, :, 0].clone() for x in state]
            reads.append(y)
            starts.append(start)
        return (torch.stack(reads), *state, *(torch.stack(s) for s in zip(*starts)))

    def scan():
        return ChunkScan.apply(rule_, depth, True, *leaves)

    expected = per_chunk(autograd=True)
    upstream = [torch.randn_like(x) for x in expected]
    for candidate in (per_chunk(autograd=False), scan()):
        for a, b in zip(candidate, expected):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        used = [x for x in leaves if x is not None]
        got = torch.autograd.grad(candidate, used, upstream, allow_unused=True)
        want = torch.autograd.grad(per_chunk(autograd=True), used, upstream, allow_unused=True)
        for g, e in zip(got, want):
            if e is None:
                assert g is None or g.abs().max() == 0
            else:
                torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------- config


def test_config_rules_their_settings_and_defaults():
    assert sorted(MEMORY_RULES) == sorted({"titans-hf", *RULES})
    default = TitansConfig()
    assert (default.memory_rule, default.memory_max_lr, default.memory_max_weight_rms) == ("titans-hf", 1.0, 1.0)
    assert (default.memory_momentum, default.mac_memory_input) == (True, "input")
    paper = TitansConfig(memory_rule="titans")
    assert (paper.memory_max_lr, paper.memory_max_weight_rms, paper.mac_memory_input) == (0.001, None, "attention")
    assert TitansConfig(memory_rule="omega").memory_max_lr == 0.0003
    moneta = TitansConfig(memory_rule="Moneta", moneta_p=2.5)
    assert moneta.memory_rule_settings == {"moneta_p": 2.5, "moneta_q": 4.0} and moneta.memory_momentum is False
    # Explicit values win over the rule's defaults, and a saved config keeps them.
    mine = TitansConfig(memory_rule="yaad", memory_max_lr=0.5, memory_max_weight_rms=2.0, yaad_threshold=1.0)
    again = TitansConfig.from_dict(mine.to_dict())
    assert (again.memory_max_lr, again.memory_max_weight_rms, again.yaad_threshold) == (0.5, 2.0, 1.0)
    for kwargs, match in (
        (
            dict(memory_rule="miras"),
            r"memory_rule must be one of \['moneta', 'omega', 'titans', 'titans-hf', 'yaad'\]",
        ),
        (dict(memory_rule="omega", omega_window=0), r"omega_window \(.*\) must be an integer >= 1"),
        (dict(memory_rule="titans", moneta_p=3), "moneta_p is a setting of memory_rule='moneta'"),
        (dict(memory_rule="moneta", moneta_q=1), r"moneta_q \(.*\) must be a number > 1"),
        (dict(memory_rule="yaad", yaad_threshold=-1.0), r"yaad_threshold \(.*\) must be a finite number > 0"),
        (dict(memory_max_lr=0), "memory_max_lr must be a finite number > 0"),
        (dict(memory_max_weight_rms="big"), "memory_max_weight_rms must be None"),
    ):
        with pytest.raises(ValueError, match=match):
            TitansConfig(**kwargs)
    with pytest.raises(ValueError, match="yaad_threshold is not a setting of memory_rule='moneta'"):
        rule_class("moneta").check_settings({"yaad_threshold": 1.0})


@pytest.mark.parametrize("rule", RULES)
def test_the_memory_module_takes_the_rules_defaults(rule):
    memory = NeuralMemory(8, 2, 4, rule=rule)
    defaults = rule_class(rule).defaults
    assert (memory.max_lr, memory.use_momentum, memory.max_weight_rms) == (
        defaults["max_lr"],
        defaults["momentum"],
        defaults["max_weight_rms"],
    )


# ----------------------------------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", RULES)
def test_in_every_variant_cached_decoding_padding_and_snapshots_are_exact(rule, variant, tmp_path):
    """Each rule in each variant, float64: cached decoding (token by token, and chunked prefills across window,
    chunk and segment boundaries) equals the full forward at every position; a left-padded batch fed in pieces equals
    each sequence alone; a saved and reloaded cache continues identically. (The tiny models' stirred gates make the
    papers' rules, which have no budget, diverge within these 29 tokens: the safeguard keeps them finite, and acts.)"""
    settings = {"omega": {"omega_window": 3}}.get(rule, {})
    model = tiny_model(variant, memory_rule=rule, memory_max_weight_rms=1.0, **settings)
    x = random_ids(length=29)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        for cuts in (list(range(1, 30)), [3, 7, 8, 16, 17, 25, 29]):
            cache, pieces, start = TitansCache(model.config), [], 0
            for end in cuts:
                pieces.append(model(x[:, start:end], cache=cache).logits)
                start = end
            torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-9, rtol=0)
        # A snapshot of the cache after 16 tokens continues as the live cache does.
        cache = TitansCache(model.config)
        model(x[:, :16], cache=cache)
        cache.save(tmp_path / "cache.safetensors")
        restored = TitansCache.load(tmp_path / "cache.safetensors", model.config)
        assert torch.equal(model(x[:, 16:], cache=restored).logits, model(x[:, 16:], cache=cache).logits)
        # Left padding, in pieces, equals each sequence alone.
        mask = torch.ones_like(x)
        mask[0, :11] = 0
        padded, cache, start = [], TitansCache(model.config), 0
        for end in (5, 12, 13, 29):
            padded.append(model(x[:, start:end], attention_mask=mask[:, :end], cache=cache).logits)
            start = end
        alone = model(x[:1, 11:], use_cache=False).logits
        torch.testing.assert_close(torch.cat(padded, 1)[:1, 11:], alone, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------------- compiled


@pytest.mark.parametrize("rule", ["titans-hf", *RULES])
def test_the_opaque_operations_pass_opcheck(rule):
    """The closed form's custom operations (what ``torch.compile`` sees): schema, fake implementation (shapes and
    contiguous layouts, whatever the inputs' layouts: here permuted queries, keys and targets), autograd
    registration, with each rule's error parameters, anchors and window."""
    from titans_hf.memory_ops import _run_op, _scan_op

    memory = make_memory(rule, max_weight_rms=0.7)
    rule_ = memory.rule
    torch.manual_seed(0)
    chunks, batch, heads, size, dim, hidden = 2, 2, 2, 3, 4, 8
    extra = rule_.window - 1
    shapes = [(dim, hidden), (hidden, dim)]
    states = [torch.randn(batch, heads, rule_.num_matrices(), a, b, dtype=torch.float64) for a, b in shapes]
    boundary = [torch.randn(batch, heads, a, b, dtype=torch.float64) for a, b in shapes]
    anchors = [torch.randn(1, heads, a, b, dtype=torch.float64) for a, b in shapes] if rule_.anchored else []

    def permuted(*shape):  # a tensor whose layout is not contiguous, as split_heads' permute leaves them
        return torch.randn(*shape[:-3], shape[-2], shape[-3], shape[-1], dtype=torch.float64).transpose(-2, -3)

    q = permuted(chunks, batch, heads, size, dim)
    k, t = (permuted(chunks, batch, heads, size + extra, dim) for _ in range(2))
    params = 0.2 + 2 * torch.rand(chunks, batch, heads, size, 1, dtype=torch.float64) if rule == "yaad" else None
    gates = torch.rand(chunks, batch, heads, size, extra, dtype=torch.float64) if extra else None
    lr = torch.rand(chunks, batch, heads, size, dtype=torch.float64)
    log_momentum = -torch.rand(chunks, batch, heads, size, dtype=torch.float64) if rule_.momentum else None
    c = rule_.coefficients(lr, log_momentum, -0.1 * torch.rand(chunks, batch, heads, size, dtype=torch.float64), gates)
    leaves = [x.requires_grad_(True) for x in (q, k, t, *c.fields(), *states, *boundary, *anchors)]
    fields = leaves[3:7]
    scan = (rule_.name, rule_.spec(), True, True, q, k, t, params, *fields, states, boundary, anchors)
    torch.library.opcheck(_scan_op, scan)
    first = [f[0] for f in fields]
    run = (rule_.name, rule_.spec(), True, q[0], k[0], t[0], None if params is None else params[0], *first)
    torch.library.opcheck(_run_op, (*run, boundary, states, anchors))


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_trains_compiled(rule):
    """A training step compiled (AOTAutograd) equals eager, loss and every gradient, for each rule."""
    torch._dynamo.reset()
    settings = {"omega": {"omega_window": 3}}.get(rule, {})
    model = tiny_model("lmm", dtype=torch.float32, num_hidden_layers=1, memory_rule=rule, **settings).train()
    x = random_ids(length=11)

    def step(forward):
        model.zero_grad()
        loss = forward(x, labels=x).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, grads = step(model)
    compiled_loss, compiled_grads = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
