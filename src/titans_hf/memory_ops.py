# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""The neural memory's tensor operations, as plain functions, the same for every memory rule (the module, its gates,
its state and the schedule are in ``neural_memory.py``; what differs between rules is asked of the rule,
``memory_rule.py``).

- :func:`memory_mlp`: the memory ``M_W(z)``; :class:`KeySide`: the keys' forward through it and the inner backward
  by hand (eq. 12), with the rule's error at the output; :func:`step_curvature`: the normalised step of a token.
- :func:`chunk_forward`: a run of tokens of one chunk in closed form (reads, carried state), plain differentiable
  torch and the reference for :func:`chunk_backward`, the hand-written backward, which :class:`ChunkFunction` runs;
  :func:`chunk_update` picks between them. :class:`ChunkScan` runs whole chunks in a row as one function.
- :class:`CausalConvSiLU`: the causal depthwise convolution of q, k, v.

The math is in ``docs/design.md`` §2-3. A flat sibling of ``modeling_titans.py`` with relative imports only, so that
it travels with saved checkpoints for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .memory_rule import ChunkCoefficients, MemoryRule

__all__ = [
    "CausalConvSiLU",
    "ChunkFunction",
    "ChunkScan",
    "KeySide",
    "chunk_backward",
    "chunk_forward",
    "chunk_scan",
    "chunk_update",
    "fast_weights",
    "memory_mlp",
    "step_curvature",
]


def memory_mlp(weights: list[torch.Tensor], z: torch.Tensor, residual: bool) -> torch.Tensor:
    """Plain forward of the memory ``M_W(z)``: ``z W_1 -> GELU -> ... -> W_L`` (+ ``z`` when ``residual``).

    ``weights[l]`` is (batch, heads, d_in, d_out) and ``z`` (batch, heads, length, d).
    """
    a = z
    for layer, w in enumerate(weights):
        a = a @ w
        if layer < len(weights) - 1:
            a = F.gelu(a)
    return a + z if residual else a


# --------------------------------------------------------------------------------------------------------------------
# The keys' side: the inner gradient at the chunk's start weights
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class KeySide:
    """The keys' forward through the memory at fixed weights ``W`` and its inner backward, written by hand (eq. 12).

    With ``abar_0 = k``, ``pbar_l = abar_l W_l``, ``abar_{l+1} = GELU(pbar_l)``, the residual ``M_W(k) - target``
    at the last layer (``target``: what the MLP part must produce, ``v`` or ``v - k`` for the residual memory
    ``M(k) = k + MLP(k)``) and the rule's error ``delta_L = error(residual)`` (half the inner loss's gradient with
    respect to the output), the per-token gradient of layer ``l`` is the rank-one ``2 abar_l^T delta_l``.
    """

    inputs: list[torch.Tensor]  # abar_l, the input of every layer
    pre_activations: list[torch.Tensor]  # pbar_l, every layer but the last
    errors: list[torch.Tensor]  # e_l = delta_{l+1} W_{l+1}^T, every layer but the last
    deltas: list[torch.Tensor]  # delta_l, with delta_{l} = GELU'(pbar_l) * e_l
    residual: torch.Tensor  # M_W(k) - target
    params: torch.Tensor | None  # the error's per-token parameters (the rule's), or None
    input_norms: list[torch.Tensor] | None = None  # |abar_l|^2 (with the step curvature)
    delta_norms: list[torch.Tensor] | None = None  # |delta_l|^2
    curvature: torch.Tensor | None = None  # kappa (see step_curvature)

    @classmethod
    def forward(
        cls,
        rule: MemoryRule,
        weights: list[torch.Tensor],
        keys: torch.Tensor,
        params: torch.Tensor | None,
        targets: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> KeySide:
        """From the ``targets``, or from a ``residual`` computed before (the backward recomputes the rest)."""
        inputs, pre_activations = [keys], []
        for w in weights[:-1]:
            pre_activations.append(inputs[-1] @ w)
            inputs.append(F.gelu(pre_activations[-1]))
        if residual is None:
            residual = inputs[-1] @ weights[-1] - targets
        deltas, errors = [rule.error(residual, params)], []
        for layer in range(len(weights) - 2, -1, -1):
            errors.append(deltas[0] @ weights[layer + 1].transpose(-1, -2))
            deltas.insert(0, torch.ops.aten.gelu_backward(errors[-1], pre_activations[layer]))
        side = cls(inputs, pre_activations, errors[::-1], deltas, residual, params)
        if rule.curvature:
            side.input_norms, side.delta_norms = _squared_norms(inputs, deltas)
            side.curvature = _curvature(side.input_norms, side.delta_norms)
        return side

    def chunk(self, n: int, chunks: int) -> KeySide:
        """Chunk ``n`` of a key side computed with ``chunks`` chunks folded into the batch (chunk-major)."""

        def part(x):
            if x is None:
                return None
            return [_chunk(t, n, chunks) for t in x] if isinstance(x, list) else _chunk(x, n, chunks)

        return KeySide(
            *(part(getattr(self, name)) for name in self.__dataclass_fields__)  # every field, in order
        )

    def coefficients(self, c: ChunkCoefficients) -> ChunkCoefficients:
        """The run's coefficients with each token's step divided by its curvature, where the rule has one."""
        return c if self.curvature is None else c.divided_by(self.curvature)


def step_curvature(inputs: list[torch.Tensor], deltas: list[torch.Tensor]) -> torch.Tensor:
    """How far a token's own gradient step moves its own read along its error, per unit of learning rate (the
    normalised-LMS denominator, for any depth): with ``u = delta_last`` the error of the read,

        kappa = max(1, sum_l |abar_l|^2 |delta_l|^2 / |u|^2)

    (``sum_l |abar_l|^2 |delta_l|^2`` is the squared norm of the token's gradient over all layers, over 4). A step
    ``theta / kappa`` changes ``M(k)`` along ``u`` by at most ``2 theta |u|`` (linearised) however large the memory's
    weights have grown; for a depth-1 memory with unit keys ``kappa = 1``. Differentiable (the outer gradient is
    exact); it depends on the error's direction only. Used by rules with ``curvature`` (``titans-hf``). Shape: the
    tokens' (..., C)."""
    return _curvature(*_squared_norms(inputs, deltas))


def _squared_norms(inputs: list[torch.Tensor], deltas: list[torch.Tensor]) -> tuple[list, list]:
    """``|abar_l|^2`` and ``|delta_l|^2`` of every token, per layer: the terms of :func:`step_curvature`."""
    return [a.pow(2).sum(-1) for a in inputs], [d.pow(2).sum(-1) for d in deltas]


def _curvature(input_norms: list[torch.Tensor], delta_norms: list[torch.Tensor]) -> torch.Tensor:
    """:func:`step_curvature` from :func:`_squared_norms`."""
    total = input_norms[0] * delta_norms[0]
    for a2, d2 in zip(input_norms[1:], delta_norms[1:]):
        total = torch.addcmul(total, a2, d2)
    error = delta_norms[-1]
    return (total / error.clamp(min=torch.finfo(error.dtype).tiny)).clamp(min=1.0)


def _backward_curvature(
    key_side: KeySide,
    d_curvature: torch.Tensor,
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> None:
    """The backward of :func:`step_curvature` by hand, added into ``d_abars`` and ``d_deltas``. Where ``kappa > 1``
    (its gradient is zero on the clamp's flat side), ``kappa = total / error`` with ``total = sum_l |abar_l|^2
    |delta_l|^2`` and ``error = |delta_last|^2`` (clamped away from zero), so ``d total = d kappa / error`` and
    ``d error = -kappa d total``."""
    kappa, error = key_side.curvature, key_side.delta_norms[-1]
    tiny = torch.finfo(error.dtype).tiny
    d_total = torch.where(kappa > 1.0, 2.0 * d_curvature, 0.0) / error.clamp(min=tiny)  # twice d total
    depth = len(key_side.inputs)
    for layer, (a, d) in enumerate(zip(key_side.inputs, key_side.deltas)):
        a2, d2 = key_side.input_norms[layer], key_side.delta_norms[layer]
        d_abars[layer] = _add_scaled(d_abars[layer], a, d_total * d2)
        if layer == depth - 1:  # the error's own term; the clamp passes no gradient below ``tiny``
            a2 = a2 - torch.where(error >= tiny, kappa, 0.0)
        d_deltas[layer] = _add_scaled(d_deltas[layer], d, d_total * a2)


def _backward_divided_by(
    key_side: KeySide,
    c: ChunkCoefficients,
    d_gain: torch.Tensor | None,
    d_write: torch.Tensor | None,
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of ``c = coefficients.divided_by(kappa)`` (``gain_ij = gain0_ij / kappa_j``, ``write_js =
    write0_js / kappa_j``): returns the gradients of ``gain0`` and ``write0``; kappa's goes on through
    :func:`_backward_curvature` into ``d_abars`` and ``d_deltas``. Linear in ``d_gain`` and ``d_write``, so their parts
    may come in separate calls. Without a curvature (the rule has none) the gradients pass unchanged."""
    if key_side.curvature is None:
        return d_gain, d_write
    kappa, d_kappa = key_side.curvature, None
    if d_gain is not None:
        d_kappa = -(d_gain * c.gain).sum(-2)
        d_gain = d_gain / kappa.unsqueeze(-2)
    if d_write is not None:
        d_kappa = _accumulate(d_kappa, -(d_write * c.write).sum(-1))
        d_write = d_write / kappa.unsqueeze(-1)
    if d_kappa is not None:
        _backward_curvature(key_side, d_kappa / kappa, d_abars, d_deltas)
    return d_gain, d_write


def _add_scaled(total: torch.Tensor | None, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``total + x * scale`` with one scale per token (``scale``: ``x``'s shape without the last dimension)."""
    scale = scale.unsqueeze(-1)
    return x * scale if total is None else torch.addcmul(total, x, scale)


# --------------------------------------------------------------------------------------------------------------------
# One run of a chunk in closed form
# --------------------------------------------------------------------------------------------------------------------


def chunk_forward(
    rule: MemoryRule,
    states: list[torch.Tensor],
    gradient_weights: list[torch.Tensor],
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    params: torch.Tensor | None,
    coefficients: ChunkCoefficients,
    anchors: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
    """A run of tokens of one chunk in closed form (docs/design.md §3): read every token, carry the state past the last.

    Args:
        rule: the memory rule (its error at the output and whether steps are divided by the curvature).
        states: the state before the run, per memory layer a stack of matrices (batch, heads, s, d_in, d_out), the
            rule's (e.g. ``[D; S]``: the fast weights' deviation from the anchor and the momentum).
        gradient_weights: the weights at the chunk's start, where every gradient of the chunk is taken,
            (batch, heads, d_in, d_out) per layer.
        queries: (batch, heads, C, head_dim); keys, targets: (batch, heads, C_k, head_dim), the gradient tokens
            (``C_k = C + window - 1``); ``targets`` is what the memory MLP must map the keys to (see
            :class:`KeySide`); ``params``: the error's per-token parameters (batch, heads, C_k, p) or ``None``.
        coefficients: the run's :class:`~memory_rule.ChunkCoefficients` from the gates (divided here by each token's
            curvature at the chunk's start weights, where the rule has one).
        anchors: what forgetting relaxes the weights towards (``W_0``) per layer, (1, heads, d_in, d_out), or
            ``None`` (zero).

    Each layer's per-token gradient is rank one, so the pre-activation of layer ``l`` for query ``i`` is
    ``a_i W_0 + sum_s read_is a_i state_s + sum_j gain_ij (a_i . abar_j) delta_j`` (``a``: query-side input of the
    layer, ``abar, delta``: key-side input and error at the chunk's start weights), and no per-token weight is ever
    formed.

    Plain differentiable torch: autograd through it is the reference for :class:`ChunkFunction`'s hand-written
    backward. Returns the MLP part of the reads (batch, heads, C, head_dim), the state after the run's last
    token, and the intermediates that backward needs (the residual, the queries' pre-activations).
    """
    key_side = KeySide.forward(rule, gradient_weights, keys, params, targets=targets)
    c = key_side.coefficients(coefficients)
    reads, query_pre = _chunk_reads(states, key_side.inputs, key_side.deltas, c, queries, anchors)
    return reads, _chunk_carry(states, key_side.inputs, key_side.deltas, c), (key_side.residual, query_pre)


def _chunk_reads(
    states: list[torch.Tensor],
    inputs: list[torch.Tensor],
    deltas: list[torch.Tensor],
    c: ChunkCoefficients,
    queries: torch.Tensor,
    anchors: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reads of a run (:func:`chunk_forward`), given the keys' side and the coefficients divided by the
    curvature; also the queries' pre-activations of every layer but the last."""
    a, query_pre = queries, []
    for layer, (state, abar, delta) in enumerate(zip(states, inputs, deltas)):
        scores = (a @ abar.transpose(-1, -2)) * c.gain
        scaled = (a.unsqueeze(-2) * c.read.unsqueeze(-1)).flatten(-2)  # [read_1 a | read_2 a | ...]
        p = _baddbmm(scores @ delta, scaled, state.flatten(-3, -2))
        if anchors is not None:
            p = p + a @ anchors[layer]
        if layer < len(states) - 1:
            query_pre.append(p)
            a = F.gelu(p)
        else:
            a = p
    return a, query_pre


def _chunk_carry(
    states: list[torch.Tensor], inputs: list[torch.Tensor], deltas: list[torch.Tensor], c: ChunkCoefficients
) -> list[torch.Tensor]:
    """The state after a run's last token (:func:`chunk_forward`)."""
    new_states = []
    for state, abar, delta in zip(states, inputs, deltas):
        matrices, d_in, d_out = state.shape[-3:]
        carried = (c.transition @ state.flatten(-2)).view_as(state)
        # Every matrix += abar^T (write_s * delta), all in one matmul: (d_in, C_k) @ (C_k, s * d_out).
        scaled_errors = (delta.unsqueeze(-2) * c.write.unsqueeze(-1)).flatten(-2)
        written = (abar.transpose(-1, -2) @ scaled_errors).unflatten(-1, (matrices, d_out)).transpose(-2, -3)
        new_states.append(carried + written)
    return new_states


def _gelu_second_derivative(x: torch.Tensor) -> torch.Tensor:
    """``GELU''(x) = phi(x) (2 - x^2)`` with ``phi`` the standard normal density."""
    return torch.exp(-0.5 * x * x) * (2.0 - x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def _accumulate(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    """``total + value``, either of them possibly ``None`` (no gradient)."""
    if value is None:
        return total
    return value if total is None else total + value


# --------------------------------------------------------------------------------------------------------------------
# Saving tensors for a backward by name
# --------------------------------------------------------------------------------------------------------------------


def _save_run(ctx, rule: MemoryRule, queries, keys, params, coefficients: list, residual, **more) -> None:
    """What both closed-form functions keep for their backward: the rule, the run's inputs and residuals, and
    ``more`` (named tensors or lists of them, read back by name with :func:`_saved`). The gradients of outputs that
    are not used arrive as ``None``."""
    ctx.rule = rule
    ctx.set_materialize_grads(False)
    _save(ctx, queries=queries, keys=keys, params=params, coefficients=coefficients, residual=residual, **more)


def _save(ctx, **groups: torch.Tensor | list[torch.Tensor] | None) -> None:
    """Saves named tensors and lists of tensors for the backward (read back with :func:`_saved`)."""
    flat, layout = [], []
    for name, value in groups.items():
        is_list = isinstance(value, (list, tuple))
        items = list(value) if is_list else [value]
        layout.append((name, is_list, len(items)))
        flat.extend(items)
    ctx.layout = layout
    ctx.save_for_backward(*flat)


def _saved(ctx) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
    """The tensors :func:`_save` saved, by name."""
    tensors, out, at = ctx.saved_tensors, {}, 0
    for name, is_list, count in ctx.layout:
        items = list(tensors[at : at + count])
        out[name] = items if is_list else items[0]
        at += count
    return out


def _split(tensors: tuple, depth: int) -> tuple[list[torch.Tensor], ...]:
    """Per-layer groups of ``depth`` tensors each (the last group may be empty: no anchors)."""
    return tuple(list(tensors[i : i + depth]) for i in range(0, len(tensors), depth)) + ([],) * (
        len(tensors) == 2 * depth
    )


class ChunkFunction(torch.autograd.Function):
    """:func:`chunk_forward` with a hand-written backward (:func:`chunk_backward`).

    It saves only the chunk's inputs and the queries' pre-activations (recomputing the keys' side, errors and
    similarities in backward), and fuses what autograd would spread over many small ops: it is equal to autograd through
    :func:`chunk_forward` (``tests/test_neural_memory.py`` checks it in float64) with about a third of the memory.

    Inputs: ``rule``, ``depth``, ``queries, keys, targets, params`` (``params`` may be ``None``), the coefficients'
    four fields, then per layer the gradient weights, the states and the anchors (``depth`` each; no anchors: none).
    """

    @staticmethod
    def forward(ctx, rule, depth, queries, keys, targets, params, read, gain, write, transition, *tensors):
        gradient_weights, states, anchors = _split(tensors, depth)
        coefficients = ChunkCoefficients(read, gain, write, transition)
        reads, new_states, (residual, query_pre) = chunk_forward(
            rule, states, gradient_weights, queries, keys, targets, params, coefficients, anchors or None
        )
        coefficients = [read, gain, write, transition]
        more = dict(weights=gradient_weights, states=states, anchors=anchors, query_pre=query_pre)
        _save_run(ctx, rule, queries, keys, params, coefficients, residual, **more)
        return (reads, *new_states)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_reads, *grad_states):
        # The forward ran with autocast off (float32 state); so does the backward, even if called inside autocast.
        device = next((g.device.type for g in (grad_reads, *grad_states) if g is not None), "cpu")
        s = _saved(ctx)
        with torch.autocast(device_type=device, enabled=False):
            grads = chunk_backward(
                ctx.rule,
                ChunkCoefficients(*s["coefficients"]),
                s["weights"],
                s["states"],
                s["anchors"] or None,
                s["queries"],
                s["keys"],
                s["residual"],
                s["params"],
                s["query_pre"],
                grad_reads,
                list(grad_states),
            )
        d_coefficients, d_weights, d_states, d_anchors, d_queries, d_keys, d_targets, d_params = grads
        d_anchors = d_anchors or []
        return (None, None, d_queries, d_keys, d_targets, d_params, *d_coefficients, *d_weights, *d_states, *d_anchors)


def chunk_backward(
    rule: MemoryRule,
    coefficients: ChunkCoefficients,
    weights: list[torch.Tensor],
    states: list[torch.Tensor],
    anchors: list[torch.Tensor] | None,
    queries: torch.Tensor,
    keys: torch.Tensor,
    residual: torch.Tensor,
    params: torch.Tensor | None,
    query_pre: list[torch.Tensor],
    grad_reads: torch.Tensor | None,
    grad_states: list[torch.Tensor | None],
) -> tuple:
    """The backward of :func:`chunk_forward` by hand, in four phases: the reads (:func:`_backward_reads`), the carried
    state (:func:`_backward_carry`), the step curvature the coefficients were divided by (:func:`_backward_curvature`,
    where the rule has one) and the keys' side (:func:`_backward_key_side`, through the errors and the keys' forward
    into the gradient weights, keys, targets and the error's parameters). Gradients that do not flow are ``None``.

    Returns ``(d_coefficients as (read, gain, write, transition), d_weights, d_states, d_anchors, d_queries, d_keys,
    d_targets, d_params)``.
    """
    depth = len(weights)
    key_side = KeySide.forward(rule, weights, keys, params, residual=residual)
    c = key_side.coefficients(coefficients)
    # Gradients with respect to the keys' side, accumulated over the phases.
    d_abars: list[torch.Tensor | None] = [None] * depth
    d_deltas: list[torch.Tensor | None] = [None] * depth
    d_read, d_gain, d_states, d_anchors, d_queries = _backward_reads(
        c, states, anchors, queries, query_pre, key_side, grad_reads, d_abars, d_deltas
    )
    d_write, d_transition = _backward_carry(c, states, key_side, grad_states, d_states, d_abars, d_deltas)
    d_gain, d_write = _backward_divided_by(key_side, c, d_gain, d_write, d_abars, d_deltas)
    d_weights, d_keys, d_targets, d_params = _backward_key_side(rule, weights, key_side, d_abars, d_deltas)
    d_coefficients = (d_read, d_gain, d_write, d_transition)
    return d_coefficients, d_weights, d_states, d_anchors, d_queries, d_keys, d_targets, d_params


def _backward_reads(
    c: ChunkCoefficients,
    states: list[torch.Tensor],
    anchors: list[torch.Tensor] | None,
    queries: torch.Tensor,
    query_pre: list[torch.Tensor],
    key_side: KeySide,
    grad_reads: torch.Tensor | None,
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> tuple:
    """Reads: ``p_l = [read * a_l] @ state_l + (similarity_l * gain) @ delta_l + a_l @ W_0,l``, ``a_{l+1} = GELU(p_l)``.

    Adds into ``d_abars`` and ``d_deltas``; returns ``(d_read, d_gain, d_states, d_anchors, d_queries)``
    (``d_anchors`` ``None`` without anchors).
    """
    depth = len(states)
    d_states: list[torch.Tensor | None] = [None] * depth
    d_anchors: list[torch.Tensor | None] | None = None if anchors is None else [None] * depth
    d_read = d_gain = d_queries = None
    query_inputs = [queries] + [F.gelu(p) for p in query_pre]
    d_p = grad_reads
    for layer in reversed(range(depth)):
        if d_p is None:
            break
        state, a, abar = states[layer], query_inputs[layer], key_side.inputs[layer]
        matrices, d_in, d_out = state.shape[-3:]
        scaled = (a.unsqueeze(-2) * c.read.unsqueeze(-1)).flatten(-2)
        d_states[layer] = (scaled.transpose(-1, -2) @ d_p).view_as(state)
        d_scaled = (d_p @ state.flatten(-3, -2).transpose(-1, -2)).unflatten(-1, (matrices, d_in))
        d_read = _accumulate(d_read, (d_scaled * a.unsqueeze(-2)).sum(-1))
        similarity = a @ abar.transpose(-1, -2)
        d_scores = d_p @ key_side.deltas[layer].transpose(-1, -2)
        d_gain = _accumulate(d_gain, d_scores * similarity)
        d_similarity = d_scores * c.gain
        d_deltas[layer] = (similarity * c.gain).transpose(-1, -2) @ d_p
        d_abars[layer] = d_similarity.transpose(-1, -2) @ a
        d_a = _baddbmm((d_scaled * c.read.unsqueeze(-1)).sum(-2), d_similarity, abar)
        if anchors is not None:
            d_a = d_a + d_p @ anchors[layer].transpose(-1, -2)
            d_anchors[layer] = (a.transpose(-1, -2) @ d_p).sum(0, keepdim=True)  # W_0 is shared by the batch
        if layer > 0:
            d_p = torch.ops.aten.gelu_backward(d_a, query_pre[layer - 1])
        else:
            d_queries = d_a
    return d_read, d_gain, d_states, d_anchors, d_queries


def _backward_carry(
    c: ChunkCoefficients,
    states: list[torch.Tensor],
    key_side: KeySide,
    grad_states: list[torch.Tensor | None],
    d_states: list[torch.Tensor | None],
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Carry: ``new_state = transition @ state + abar^T (write_s * delta)``.

    Adds into ``d_states``, ``d_abars`` and ``d_deltas``; returns ``(d_write, d_transition)``.
    """
    d_write = d_transition = None
    matrix_writes = c.write.unsqueeze(-1)  # (..., C_k, s, 1)
    for layer, (state, grad) in enumerate(zip(states, grad_states)):
        if grad is None:
            continue
        matrices, d_in, d_out = state.shape[-3:]
        abar, delta = key_side.inputs[layer], key_side.deltas[layer]
        d_states[layer] = _accumulate(
            d_states[layer], (c.transition.transpose(-1, -2) @ grad.flatten(-2)).view_as(state)
        )
        d_transition = _accumulate(d_transition, grad.flatten(-2) @ state.flatten(-2).transpose(-1, -2))
        grad_written = grad.transpose(-2, -3).flatten(-2)  # (..., d_in, s * d_out)
        scaled_errors = (delta.unsqueeze(-2) * matrix_writes).flatten(-2)
        d_abars[layer] = _accumulate(d_abars[layer], scaled_errors @ grad_written.transpose(-1, -2))
        d_scaled = (abar @ grad_written).unflatten(-1, (matrices, d_out))
        d_deltas[layer] = _accumulate(d_deltas[layer], (d_scaled * matrix_writes).sum(-2))
        d_write = _accumulate(d_write, (d_scaled * delta.unsqueeze(-2)).sum(-1))
    return d_write, d_transition


def _backward_key_side(
    rule: MemoryRule,
    weights: list[torch.Tensor],
    key_side: KeySide,
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> tuple[list[torch.Tensor | None], torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The keys' side: through the errors ``delta_l = GELU'(pbar_l) * e_l``, ``e_l = delta_{l+1} W_{l+1}^T``, the
    rule's error ``delta_{L-1} = error(pbar_{L-1} - targets)`` and the keys' forward ``pbar_l = abar_l W_l``,
    ``abar_{l+1} = GELU(pbar_l)``.

    Returns ``(d_weights, d_keys, d_targets, d_params)``: ``d_weights[l]`` is the gradient of the gradient weights
    ``W_l``, ``d_params`` that of the error's parameters.
    """
    depth = len(weights)
    gelu_backward = torch.ops.aten.gelu_backward
    key_pre, abars = key_side.pre_activations, key_side.inputs
    d_weights: list[torch.Tensor | None] = [None] * depth
    d_key_pre: list[torch.Tensor | None] = [None] * (depth - 1)
    for layer in range(depth - 1):
        if d_deltas[layer] is None:
            continue
        d_error = gelu_backward(d_deltas[layer], key_pre[layer])
        d_key_pre[layer] = d_deltas[layer] * key_side.errors[layer] * _gelu_second_derivative(key_pre[layer])
        d_deltas[layer + 1] = _accumulate(d_deltas[layer + 1], d_error @ weights[layer + 1])
        d_weights[layer + 1] = d_error.transpose(-1, -2) @ key_side.deltas[layer + 1]
    d_residual = d_params = None
    if d_deltas[-1] is not None:
        d_residual, d_params = rule.error_backward(key_side.residual, key_side.params, d_deltas[-1])
    d_targets = None if d_residual is None else -d_residual
    d_pbar = d_residual
    for layer in reversed(range(depth)):
        if layer < depth - 1:
            d_pbar = d_key_pre[layer]
            if d_abars[layer + 1] is not None:
                d_pbar = _accumulate(d_pbar, gelu_backward(d_abars[layer + 1], key_pre[layer]))
        if d_pbar is None:
            continue
        d_weights[layer] = _accumulate(d_weights[layer], abars[layer].transpose(-1, -2) @ d_pbar)
        d_abars[layer] = _accumulate(d_abars[layer], d_pbar @ weights[layer].transpose(-1, -2))
    return d_weights, d_abars[0], d_targets, d_params


class CausalConvSiLU(torch.autograd.Function):
    """``SiLU(depthwise causal conv)`` of ``padded`` (batch, kernel - 1 + length, channels) with ``weight``
    (channels, kernel): ``out_t = SiLU(sum_i weight[:, i] * padded[t + i])``.

    A sum of shifted copies (faster than ``conv1d`` on CPU here); the backward recomputes the convolution instead of
    saving it and avoids the full-size zero gradients that slicing would create, one per tap.
    """

    @staticmethod
    def _conv(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        length = padded.shape[1] - weight.shape[1] + 1
        out = padded[:, :length] * weight[:, 0]
        for i in range(1, weight.shape[1]):
            out.addcmul_(padded[:, i : i + length], weight[:, i])
        return out

    @staticmethod
    def forward(ctx, padded, weight):
        ctx.save_for_backward(padded, weight)
        return F.silu(CausalConvSiLU._conv(padded, weight))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        padded, weight = ctx.saved_tensors
        grad = torch.ops.aten.silu_backward(grad, CausalConvSiLU._conv(padded, weight))
        length = grad.shape[1]
        d_padded = torch.zeros_like(padded)
        d_weight = torch.empty_like(weight)
        for i in range(weight.shape[1]):
            d_padded[:, i : i + length].addcmul_(grad, weight[:, i])
            d_weight[:, i] = (grad * padded[:, i : i + length]).sum(dim=(0, 1))
        return d_padded, d_weight


def chunk_update(*inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`chunk_forward` (same arguments) without its intermediates, through :class:`ChunkFunction` when gradients
    are needed."""
    rule, states, gradient_weights, queries, keys, targets, params, c, anchors = inputs
    flat = (queries, keys, targets, params, *c.fields(), *gradient_weights, *states, *(anchors or ()))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in flat)
    if torch.compiler.is_compiling():  # one opaque operation in the graph (see "Opaque operations" below)
        out = _run_op(rule.name, rule.spec(), grad, queries, keys, targets, params, *c.fields(), *_lists(inputs))
        return out[0], out[1 : 1 + len(states)]
    if grad:
        reads, *new_states = ChunkFunction.apply(rule, len(states), *flat)
        return reads, new_states
    reads, new_states, _ = chunk_forward(*inputs)
    return reads, new_states


# --------------------------------------------------------------------------------------------------------------------
# Whole chunks in a row
# --------------------------------------------------------------------------------------------------------------------


def _chunk(x: torch.Tensor, n: int, chunks: int) -> torch.Tensor:
    """Chunk ``n`` of a tensor whose batch dimension folds ``chunks`` chunks (chunk-major)."""
    return x.unflatten(0, (chunks, -1))[n]


#: Chunks whose reads (forward) and whose state-independent backward run at once, in :class:`ChunkScan`: enough to
#: make large matmuls, few enough to bound the extra memory of doing them at once.
SCAN_BLOCK = 8


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def fast_weights(state: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
    """The fast weights a carried state's first matrix stands for (..., s, d_in, d_out) -> (..., d_in, d_out):
    ``anchor + D``, or ``D`` itself (copied: a view would keep the whole state alive) without an anchor."""
    return state[..., 0, :, :].clone() if anchor is None else state[..., 0, :, :] + anchor


def _scan_forward(
    rule: MemoryRule,
    all_starts: bool,
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    params: torch.Tensor | None,
    coefficients: ChunkCoefficients,
    running: list[torch.Tensor],
    boundary: list[torch.Tensor],
    anchors: list[torch.Tensor] | None,
    for_backward: bool = True,
) -> tuple:
    """:class:`ChunkScan`'s computation: the state chunk by chunk, and the reads of every :data:`SCAN_BLOCK` chunks
    at once (folded into the batch) once the state has passed them.

    Returns the reads (chunks, batch, heads, C, d), the state after the last chunk, the weights at every later chunk
    start (per layer (chunks, batch, heads, d_in, d_out); only the last, (1, ...), unless ``all_starts``) and, for the
    backward, the states entering every chunk and the last (per layer (chunks + 1, ...)), what the rule's maps at the
    boundaries saved (per layer (chunks, ...), or ``None``), the queries' pre-activations and the residuals
    (chunk-major). Without ``for_backward`` the states are kept for one block at a time only (the returned ones are
    then the last block's)."""
    chunks, depth = queries.shape[0], len(running)
    # The states entering every chunk and after the last, written in place into one tensor per layer: the block's
    # reads take a view of it, and the backward keeps it (no list to stack, no second copy). Without a backward,
    # one block's worth, reused by every block (slot 0: the state entering the block).
    states = [r.new_empty((chunks if for_backward else SCAN_BLOCK) + 1, *r.shape) for r in running]
    bounds, starts = [[] for _ in running], [[] for _ in running]
    reads, query_pre, residuals = [], [[] for _ in range(depth - 1)], []
    layer_anchors = anchors or [None] * depth
    for lo in range(0, chunks, SCAN_BLOCK):
        block = range(lo, min(lo + SCAN_BLOCK, chunks))
        base = 0 if for_backward else lo  # chunk n's entering state is states[n - base]
        if lo == base:  # the first block, or any block without a backward: the state entering it into slot 0
            for at_layer, r in zip(states, running):
                at_layer[0] = r
        inputs_block, deltas_block, kappas, residual_block = [[] for _ in running], [[] for _ in running], [], []
        for n in block:
            key_side = KeySide.forward(rule, boundary, keys[n], None if params is None else params[n], targets[n])
            kappas.append(key_side.curvature)
            c = key_side.coefficients(ChunkCoefficients(*(f[n] for f in coefficients.fields())))
            running, saved = rule.bound(_chunk_carry(running, key_side.inputs, key_side.deltas, c))
            if saved is not None:
                for at_layer, x in zip(bounds, saved):
                    at_layer.append(x)
            boundary = [fast_weights(r, a) for r, a in zip(running, layer_anchors)]
            for layer, x in enumerate(running):
                states[layer][n + 1 - base] = x
                if all_starts or n == chunks - 1:
                    starts[layer].append(boundary[layer])
                inputs_block[layer].append(key_side.inputs[layer])
                deltas_block[layer].append(key_side.deltas[layer])
            residual_block.append(key_side.residual)
        # The block's reads at once: its chunks folded into the batch.
        size, fold = len(block), slice(block.start, block.stop)
        c = ChunkCoefficients(*(f[fold].flatten(0, 1) for f in coefficients.fields()))
        if rule.curvature:
            c = c.divided_by(torch.stack(kappas).flatten(0, 1))
        y, pre = _chunk_reads(
            [x[lo - base : lo - base + size].flatten(0, 1) for x in states],
            [torch.stack(x).flatten(0, 1) for x in inputs_block],
            [torch.stack(x).flatten(0, 1) for x in deltas_block],
            c,
            queries[fold].flatten(0, 1),
            anchors,
        )
        reads.append(y.unflatten(0, (size, -1)))
        for at_layer, p in zip(query_pre, pre):
            at_layer.append(p.unflatten(0, (size, -1)))
        residuals.append(torch.stack(residual_block))
    saved = (states, [torch.stack(f) if f else None for f in bounds])
    saved += ([_cat(p) for p in query_pre], _cat(residuals))
    starts = [torch.stack(x) for x in starts]  # every chunk's (all_starts), else the last one only
    return _cat(reads), running, starts, *saved


class ChunkScan(torch.autograd.Function):
    """Whole chunks in a row from a chunk boundary, each closed by the rule's maps at boundaries
    (:meth:`~memory_rule.MemoryRule.bound`): the training path's loop over chunks as one function, equal to
    :class:`ChunkFunction` chunk after chunk (``tests/test_neural_memory.py`` checks values and gradients in float64).

    The forward carries the state chunk by chunk (the keys' side, the curvature and the carry need it) and reads every
    :data:`SCAN_BLOCK` chunks at once once it has passed them (a chunk's reads need only its starting state). The
    backward, block by block from the last, does at once for the block what does not wait for a later chunk's gradient
    (the keys' side, the reads, the curvature's part through the gains, the keys' side backward of those), and chunk
    by chunk, last to first, only the rest (the maps at boundaries, the carry, the curvature's part through the
    writes, the keys' side backward of those): far fewer operations run one chunk after another than in
    :class:`ChunkFunction`.

    Inputs: ``rule``, ``depth``, ``all_starts``; ``queries`` (chunks, batch, heads, C, d), ``keys, targets``
    (chunks, batch, heads, C_k, d), ``params`` (or ``None``); the coefficients stacked over the chunks (from the
    gates; divided here by the curvature where the rule has one); per layer the state before the first chunk, the
    weights at its start and the anchors (``depth`` each; none without anchors). Outputs: the reads, the state after
    the last chunk (``depth``), the weights at every later chunk start (``depth``, (chunks, batch, heads, d_in,
    d_out); with ``all_starts=False`` only the last, (1, ...): the others are not kept).
    """

    @staticmethod
    def forward(ctx, rule, depth, all_starts, queries, keys, targets, params, read, gain, write, transition, *tensors):
        running, boundary, anchors = _split(tensors, depth)
        coefficients = ChunkCoefficients(read, gain, write, transition)
        reads, running, starts, states, bounds, query_pre, residual = _scan_forward(
            rule, all_starts, queries, keys, targets, params, coefficients, running, boundary, anchors or None
        )
        coefficients = [read, gain, write, transition]
        more = dict(boundary=boundary, anchors=anchors, states=states, query_pre=query_pre, bounds=bounds)
        _save_run(ctx, rule, queries, keys, params, coefficients, residual, **more)
        return (reads, *running, *starts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_reads, *grads):
        device = next((g.device.type for g in (grad_reads, *grads) if g is not None), "cpu")
        s = _saved(ctx)
        depth = len(s["states"])
        saved = _ScanSaved(
            ctx.rule,
            ChunkCoefficients(*s["coefficients"]),
            s["queries"],
            s["keys"],
            s["params"],
            s["residual"],
            s["boundary"],
            s["anchors"] or None,
            s["states"],
            s["query_pre"],
            s["bounds"],
        )
        with torch.autocast(device_type=device, enabled=False):
            return (None, None, None) + _scan_backward(saved, grad_reads, list(grads[:depth]), list(grads[depth:]))


@dataclass
class _ScanSaved:
    """What :class:`ChunkScan`'s forward keeps for its backward (chunk-major tensors: chunks first)."""

    rule: MemoryRule
    coefficients: ChunkCoefficients  # from the gates, undivided
    queries: torch.Tensor
    keys: torch.Tensor
    params: torch.Tensor | None  # the error's per-token parameters
    residual: torch.Tensor  # the last layer's residuals at every chunk's start weights
    boundary: list[torch.Tensor]  # the weights at the first chunk's start
    anchors: list[torch.Tensor] | None  # W_0, or None
    states: list[torch.Tensor]  # the state entering every chunk, then after the last (chunks + 1)
    query_pre: list[torch.Tensor]  # the queries' pre-activations, every layer but the last
    bounds: list[torch.Tensor | None]  # what the maps at every boundary saved (None: nothing)


def _scan_backward(
    saved: _ScanSaved,
    grad_reads: torch.Tensor | None,
    grad_running: list[torch.Tensor | None],
    grad_starts: list[torch.Tensor | None],
) -> tuple:
    """:class:`ChunkScan`'s backward (see there), block by block of :data:`SCAN_BLOCK` chunks, last to first
    (:func:`_scan_block_backward`)."""
    depth, chunks = len(saved.states), saved.queries.shape[0]
    d_after, d_boundary = list(grad_running), None
    d_anchors = None if saved.anchors is None else [None] * depth
    blocks = []  # per block, last first: d_queries, d_keys, d_targets, d_params, d_read, d_gain, d_write, d_transition
    sizes = []  # chunks per block, first block first
    for lo in reversed(range(0, chunks, SCAN_BLOCK)):
        block = range(lo, min(lo + SCAN_BLOCK, chunks))
        grads, d_after, d_anchors, d_start = _scan_block_backward(
            block, saved, grad_reads, grad_starts, d_after, d_anchors
        )
        blocks.append(grads)
        sizes.insert(0, len(block))
        d_boundary = d_start if lo == 0 else d_boundary
    if d_anchors is not None:
        for layer, grad in enumerate(grad_starts):  # W_0 is in every output start weight too
            if grad is not None:
                d_anchors[layer] = _accumulate(d_anchors[layer], grad.sum(dim=(0, 1)).unsqueeze(0))
    d_queries, d_keys, d_targets, d_params, *d_coefficients = (
        _cat_optional(parts[::-1], sizes) for parts in zip(*blocks)
    )
    return (d_queries, d_keys, d_targets, d_params, *d_coefficients, *d_after, *d_boundary, *(d_anchors or []))


def _scan_block_backward(
    block: range,
    saved: _ScanSaved,
    grad_reads: torch.Tensor | None,
    grad_starts: list[torch.Tensor | None],
    d_after: list[torch.Tensor | None],
    d_anchors: list[torch.Tensor | None] | None,
) -> tuple:
    """The chunks ``block`` of :func:`_scan_backward`, given ``d_after``, the gradient of the state after the block's
    last chunk: first at once for the block (the keys' side, the reads, the curvature's part through the gains and
    the keys' side backward of those), then chunk by chunk, last to first (the maps at boundaries, the carry, the
    curvature's part through the writes and their keys' side backward). Returns the block's gradients of the
    chunk-major inputs, the gradient of the state before its first chunk, ``d_anchors`` and the gradient of the
    weights at its first chunk's start (the input ``boundary`` when the block starts at chunk 0, else already sent into
    the state)."""
    rule, states, anchors, bounds = saved.rule, saved.states, saved.anchors, saved.bounds
    depth, chunks, lo, size = len(states), saved.queries.shape[0], block.start, len(block)
    rows = slice(block.start, block.stop)
    layer_anchors = anchors or [None] * depth

    def fold(x: torch.Tensor | None) -> torch.Tensor | None:
        """The block's chunks of a chunk-major tensor, folded into the batch."""
        return None if x is None else x[rows].flatten(0, 1)

    def at(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Chunk ``n`` of a tensor of the block's chunks folded into the batch."""
        return None if x is None else _chunk(x, n - lo, size)

    def unfold(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.unflatten(0, (size, -1))

    # At once for the block: the weights at every chunk start, the keys' side there, the reads.
    weights = [
        torch.cat([b.unsqueeze(0), fast_weights(x[1 : block.stop], a)]) if lo == 0 else fast_weights(x[rows], a)
        for b, x, a in zip(saved.boundary, states, layer_anchors)
    ]
    weights = [w.flatten(0, 1) for w in weights]
    key_side = KeySide.forward(rule, weights, fold(saved.keys), fold(saved.params), residual=fold(saved.residual))
    c = key_side.coefficients(ChunkCoefficients(*(fold(f) for f in saved.coefficients.fields())))
    d_abars: list[torch.Tensor | None] = [None] * depth
    d_deltas: list[torch.Tensor | None] = [None] * depth
    d_read, d_gain, d_states_read, d_anchors_read, d_queries = _backward_reads(
        c,
        [fold(x) for x in states],
        anchors,
        fold(saved.queries),
        [fold(p) for p in saved.query_pre],
        key_side,
        fold(grad_reads),
        d_abars,
        d_deltas,
    )
    if d_anchors is not None:
        d_anchors = [_accumulate(a, d) for a, d in zip(d_anchors, d_anchors_read)]
    d_gain, _ = _backward_divided_by(key_side, c, d_gain, None, d_abars, d_deltas)  # the gains' part
    d_weights, d_keys, d_targets, d_params = _backward_key_side(rule, weights, key_side, d_abars, d_deltas)

    # Chunk by chunk, last to first: the gradient of the state after chunk n is what chunk n + 1 sent back.
    d_write, d_transition, d_keys_carry, d_targets_carry, d_params_carry, d_start = [], [], [], [], [], None
    for n in reversed(block):
        for layer in range(depth):
            grad_start = grad_starts[layer]  # of the weights at the start of chunk n + 1, an output too
            if grad_start is not None and n >= chunks - grad_start.shape[0]:  # (only the last unless all_starts)
                d_after[layer] = _add_to_slot(
                    d_after[layer], grad_start[n - chunks + grad_start.shape[0]], states[layer][n + 1]
                )
            if d_after[layer] is not None:
                bound = None if bounds[layer] is None else bounds[layer][n]
                d_after[layer] = rule.bound_backward(states[layer][n + 1], bound, d_after[layer])
        key_side_n = key_side.chunk(n - lo, size)
        c_n = ChunkCoefficients(*(at(f, n) for f in c.fields()))
        d_states = [at(x, n) for x in d_states_read]
        d_abars_n: list[torch.Tensor | None] = [None] * depth
        d_deltas_n: list[torch.Tensor | None] = [None] * depth
        d_write_n, d_transition_n = _backward_carry(
            c_n, [x[n] for x in states], key_side_n, d_after, d_states, d_abars_n, d_deltas_n
        )
        d_weights_n, d_keys_n, d_targets_n, d_params_n = [None] * depth, None, None, None
        if d_write_n is not None:  # the writes' part
            _, d_write_n = _backward_divided_by(key_side_n, c_n, None, d_write_n, d_abars_n, d_deltas_n)
            weights_n = [at(w, n) for w in weights]
            d_weights_n, d_keys_n, d_targets_n, d_params_n = _backward_key_side(
                rule, weights_n, key_side_n, d_abars_n, d_deltas_n
            )
        d_write.append(d_write_n)
        d_transition.append(d_transition_n)
        d_keys_carry.append(d_keys_n)
        d_targets_carry.append(d_targets_n)
        d_params_carry.append(d_params_n)
        # The weights at chunk n's start: the anchor plus matrix 0 of the state after chunk n - 1 (n > 0), or the
        # input.
        d_start = [_accumulate(at(d, n), d_n) for d, d_n in zip(d_weights, d_weights_n)]
        if n > 0:
            if d_anchors is not None:
                d_anchors = [
                    _accumulate(a, None if d is None else d.sum(0, keepdim=True)) for a, d in zip(d_anchors, d_start)
                ]
            d_states = [
                x if d is None else _add_to_slot(x, d, states[layer][n])
                for layer, (x, d) in enumerate(zip(d_states, d_start))
            ]
        d_after = d_states
    grads = (
        unfold(d_queries),
        _accumulate(unfold(d_keys), _restack(d_keys_carry)),
        _accumulate(unfold(d_targets), _restack(d_targets_carry)),
        _accumulate(unfold(d_params), _restack(d_params_carry)),
        unfold(d_read),
        unfold(d_gain),
        _restack(d_write),
        _restack(d_transition),
    )
    return grads, d_after, d_anchors, d_start


def _restack(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Per-chunk gradients (last chunk first, some ``None``) as one chunk-major tensor; ``None`` if all are."""
    if all(p is None for p in parts):
        return None
    template = next(p for p in parts if p is not None)
    return torch.stack([torch.zeros_like(template) if p is None else p for p in reversed(parts)])


def _cat_optional(parts: tuple[torch.Tensor | None, ...], sizes: list[int]) -> torch.Tensor | None:
    """The blocks' gradients (first block first, ``sizes`` chunks each) joined along the chunks, zeros for a block
    without one; ``None`` if no block has one."""
    if all(p is None for p in parts):
        return None
    template = next(p for p in parts if p is not None)
    return _cat([template.new_zeros(n, *template.shape[1:]) if p is None else p for p, n in zip(parts, sizes)])


def _add_to_slot(total: torch.Tensor | None, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``total`` (zeros like ``like`` if ``None``; batch, heads, s, d_in, d_out) plus ``grad`` (batch, heads, d_in,
    d_out) on matrix 0 (``D``), as a new tensor."""
    total = torch.zeros_like(like) if total is None else total.clone()
    total[:, :, 0] += grad
    return total


def chunk_scan(
    rule: MemoryRule,
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    params: torch.Tensor | None,
    coefficients: ChunkCoefficients,
    running: list[torch.Tensor],
    boundary: list[torch.Tensor],
    anchors: list[torch.Tensor] | None,
    all_starts: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Whole chunks in a row (:class:`ChunkScan`, same arguments): the reads, the state after the last chunk and the
    weights at every later chunk start (only the last unless ``all_starts``); through the autograd function when
    gradients are needed."""
    flat = (queries, keys, targets, params, *coefficients.fields(), *running, *boundary, *(anchors or ()))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in flat)
    depth = len(running)
    if torch.compiler.is_compiling():  # one opaque operation in the graph, whatever the number of chunks
        lists = (list(running), list(boundary), list(anchors or ()))
        out = _scan_op(
            rule.name, rule.spec(), all_starts, grad, queries, keys, targets, params, *coefficients.fields(), *lists
        )
        return out[0], out[1 : 1 + depth], out[1 + depth : 1 + 2 * depth]
    if grad:
        reads, *rest = ChunkScan.apply(rule, depth, all_starts, *flat)
        return reads, rest[:depth], rest[depth:]
    reads, running, starts, *_ = _scan_forward(
        rule, all_starts, queries, keys, targets, params, coefficients, running, boundary, anchors, False
    )
    return reads, running, starts


def _baddbmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in one call, for (batch, heads, ...) operands."""
    batch, heads = acc.shape[:2]
    return torch.baddbmm(acc.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1)).view(batch, heads, *acc.shape[2:])


# --------------------------------------------------------------------------------------------------------------------
# Opaque operations for torch.compile
# --------------------------------------------------------------------------------------------------------------------
#
# Under ``torch.compile`` the closed form runs as custom operations (``torch.library.custom_op``) with a fake
# (shape-only) implementation and a registered backward, itself one operation: the compiler sees one node per run and
# one per scan of whole chunks, whatever their number, instead of tracing the loops over chunks (compile time in
# proportion to length x depth). They compute with the same functions as :class:`ChunkFunction` and
# :class:`ChunkScan` (eager runs those). The rule travels as its name and :meth:`~memory_rule.MemoryRule.spec`.

#: One namespace per copy of this module (a checkpoint's remote code is another copy, registering its own).
_NAMESPACE = __name__.replace(".", "_")


def _kernel_rule(name: str, spec: list[float]) -> MemoryRule:
    from .rule_registry import rule_class

    return rule_class(name).from_spec(tuple(spec))


def _lists(inputs: tuple) -> tuple[list, list, list]:
    """The per-layer lists of :func:`chunk_update`'s arguments: gradient weights, states, anchors (``[]``: none)."""
    _, states, gradient_weights, *_, anchors = inputs
    return list(gradient_weights), list(states), list(anchors or ())


def _zeros_for(grads: list, templates: list) -> list[torch.Tensor]:
    """The gradients, zeros where none flowed (an operation returns tensors only), all contiguous (as the fake
    implementations say: the layouts of a compiled graph are fixed when it is traced)."""
    return _contiguous([t.new_zeros(t.shape) if g is None else g for g, t in zip(grads, templates)])


def _contiguous(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """An operation's outputs in the layout its fake implementation gives (contiguous, whatever the inputs')."""
    return [t.contiguous() for t in tensors]


def _empty(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``t``'s shape and dtype (``empty_like`` would copy a permuted input's layout)."""
    return t.new_empty(t.shape)


@torch.library.custom_op(f"{_NAMESPACE}::chunk_run", mutates_args=())
def _run_op(
    rule: str,
    spec: list[float],
    for_backward: bool,
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    params: torch.Tensor | None,
    read: torch.Tensor,
    gain: torch.Tensor,
    write: torch.Tensor,
    transition: torch.Tensor,
    weights: list[torch.Tensor],
    states: list[torch.Tensor],
    anchors: list[torch.Tensor],
) -> list[torch.Tensor]:
    """:func:`chunk_forward` as one operation: ``[reads, *states after]`` and, ``for_backward``, the residual and the
    queries' pre-activations."""
    c = ChunkCoefficients(read, gain, write, transition)
    kernel = _kernel_rule(rule, spec)
    reads, new_states, (residual, query_pre) = chunk_forward(
        kernel, states, weights, queries, keys, targets, params, c, anchors or None
    )
    return _contiguous([reads, *new_states, *([residual, *query_pre] if for_backward else [])])


@_run_op.register_fake
def _run_op_fake(
    rule, spec, for_backward, queries, keys, targets, params, read, gain, write, transition, weights, states, anchors
):
    out = [_empty(queries), *(_empty(s) for s in states)]
    if for_backward:
        out += [
            _empty(targets),
            *(queries.new_empty(*queries.shape[:-1], w.shape[-1]) for w in weights[:-1]),
        ]
    return out


def _run_op_setup(ctx, inputs, output) -> None:
    rule, spec, _, queries, keys, _, params, read, gain, write, transition, weights, states, anchors = inputs
    depth = len(states)
    ctx.rule, ctx.spec, ctx.depth = rule, spec, depth
    ctx.save_for_backward(
        queries,
        keys,
        params,
        read,
        gain,
        write,
        transition,
        output[1 + depth],
        *weights,
        *states,
        *anchors,
        *output[2 + depth :],
    )
    ctx.layout = (depth, len(anchors))


def _run_op_backward(ctx, grads):
    depth, anchored = ctx.layout
    queries, keys, params, read, gain, write, transition, residual, *rest = ctx.saved_tensors
    weights, states, anchors = rest[:depth], rest[depth : 2 * depth], rest[2 * depth : 2 * depth + anchored]
    query_pre = rest[2 * depth + anchored :]
    inputs = (queries, keys, params, read, gain, write, transition, residual, weights, states, anchors, query_pre)
    out = _run_backward_op(ctx.rule, ctx.spec, *inputs, grads[0], list(grads[1 : 1 + depth]))
    d_queries, d_keys, d_targets, d_params, *d_coefficients = out[:8]
    rest = out[8:]
    d_weights, d_states, d_anchors = rest[:depth], rest[depth : 2 * depth], rest[2 * depth :]
    return (
        None,
        None,
        None,
        d_queries,
        d_keys,
        d_targets,
        None if params is None else d_params,
        *d_coefficients,
        d_weights,
        d_states,
        d_anchors,
    )


@torch.library.custom_op(f"{_NAMESPACE}::chunk_run_backward", mutates_args=())
def _run_backward_op(
    rule: str,
    spec: list[float],
    queries: torch.Tensor,
    keys: torch.Tensor,
    params: torch.Tensor | None,
    read: torch.Tensor,
    gain: torch.Tensor,
    write: torch.Tensor,
    transition: torch.Tensor,
    residual: torch.Tensor,
    weights: list[torch.Tensor],
    states: list[torch.Tensor],
    anchors: list[torch.Tensor],
    query_pre: list[torch.Tensor],
    grad_reads: torch.Tensor | None,
    grad_states: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    """:func:`chunk_backward` as one operation: the gradients of queries, keys, targets, the error's parameters (zeros
    without), the coefficients, then per layer the gradient weights, the states and the anchors."""
    coefficients = ChunkCoefficients(read, gain, write, transition)
    grads = chunk_backward(
        _kernel_rule(rule, spec), coefficients, weights, states, anchors or None, queries, keys, residual, params,
        query_pre, grad_reads, list(grad_states),
    )  # fmt: skip
    d_coefficients, d_weights, d_states, d_anchors, d_queries, d_keys, d_targets, d_params = grads
    flat = [d_queries, d_keys, d_targets, d_params, *d_coefficients, *d_weights, *d_states, *(d_anchors or [])]
    return _zeros_for(flat, _run_templates(queries, keys, params, coefficients, weights, states, anchors))


def _run_templates(queries, keys, params, coefficients, weights, states, anchors) -> list[torch.Tensor]:
    """Tensors shaped like the gradients of :func:`_run_backward_op` (targets like keys; a scalar for no params)."""
    missing = keys.new_zeros(())
    return [
        queries,
        keys,
        keys,
        missing if params is None else params,
        *coefficients.fields(),
        *weights,
        *states,
        *anchors,
    ]


@_run_backward_op.register_fake
def _run_backward_op_fake(
    rule,
    spec,
    queries,
    keys,
    params,
    read,
    gain,
    write,
    transition,
    residual,
    weights,
    states,
    anchors,
    query_pre,
    grad_reads,
    grad_states,
):
    coefficients = ChunkCoefficients(read, gain, write, transition)
    return [_empty(t) for t in _run_templates(queries, keys, params, coefficients, weights, states, anchors)]


_run_op.register_autograd(_run_op_backward, setup_context=_run_op_setup)


@torch.library.custom_op(f"{_NAMESPACE}::chunk_scan", mutates_args=())
def _scan_op(
    rule: str,
    spec: list[float],
    all_starts: bool,
    for_backward: bool,
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    params: torch.Tensor | None,
    read: torch.Tensor,
    gain: torch.Tensor,
    write: torch.Tensor,
    transition: torch.Tensor,
    running: list[torch.Tensor],
    boundary: list[torch.Tensor],
    anchors: list[torch.Tensor],
) -> list[torch.Tensor]:
    """:class:`ChunkScan`'s forward as one operation: ``[reads, *state after, *start weights]`` and, ``for_backward``,
    the states entering every chunk, what the maps at the boundaries saved, the queries' pre-activations and the
    residuals."""
    c = ChunkCoefficients(read, gain, write, transition)
    kernel = _kernel_rule(rule, spec)
    out = _scan_forward(
        kernel, all_starts, queries, keys, targets, params, c, list(running), list(boundary), anchors or None,
        for_backward,
    )  # fmt: skip
    reads, new_running, starts, states, bounds, query_pre, residual = out
    if not for_backward:
        return _contiguous([reads, *new_running, *starts])
    saved = [*states, *(b for b in bounds if b is not None), *query_pre, residual]
    return _contiguous([reads, *new_running, *starts, *saved])


@_scan_op.register_fake
def _scan_op_fake(
    rule,
    spec,
    all_starts,
    for_backward,
    queries,
    keys,
    targets,
    params,
    read,
    gain,
    write,
    transition,
    running,
    boundary,
    anchors,
):
    chunks = queries.shape[0]
    out = [_empty(queries), *(_empty(r) for r in running)]
    out += [b.new_empty(chunks if all_starts else 1, *b.shape) for b in boundary]
    if not for_backward:
        return out
    out += [r.new_empty(chunks + 1, *r.shape) for r in running]
    _, saved = _kernel_rule(rule, spec).bound(list(running))  # shapes only
    out += [] if saved is None else [x.new_empty(chunks, *x.shape) for x in saved]
    out += [queries.new_empty(*queries.shape[:-1], r.shape[-1]) for r in running[:-1]]
    return out + [_empty(targets)]


def _scan_op_setup(ctx, inputs, output) -> None:
    rule, spec, _, _, queries, keys, _, params, read, gain, write, transition, running, boundary, anchors = inputs
    depth = len(running)
    bounded = (len(output) - 4 * depth - 1) // depth  # 1 when the rule's maps saved something per layer, else 0
    states = output[1 + 2 * depth : 1 + 3 * depth]
    bounds = output[1 + 3 * depth : 1 + (3 + bounded) * depth]
    query_pre, residual = output[1 + (3 + bounded) * depth : -1], output[-1]
    ctx.rule, ctx.spec, ctx.layout = rule, spec, (depth, len(anchors), bounded)
    ctx.save_for_backward(
        queries,
        keys,
        params,
        read,
        gain,
        write,
        transition,
        residual,
        *boundary,
        *anchors,
        *states,
        *query_pre,
        *bounds,
    )


def _scan_op_backward(ctx, grads):
    depth, anchored, bounded = ctx.layout
    queries, keys, params, read, gain, write, transition, residual, *rest = ctx.saved_tensors
    boundary, rest = rest[:depth], rest[depth:]
    anchors, rest = rest[:anchored], rest[anchored:]
    states, query_pre, bounds = rest[:depth], rest[depth : 2 * depth - 1], rest[2 * depth - 1 :]
    inputs = (
        queries,
        keys,
        params,
        read,
        gain,
        write,
        transition,
        residual,
        boundary,
        anchors,
        states,
        query_pre,
        bounds,
    )
    grad_running, grad_starts = list(grads[1 : 1 + depth]), list(grads[1 + depth : 1 + 2 * depth])
    out = _scan_backward_op(ctx.rule, ctx.spec, *inputs, grads[0], grad_running, grad_starts)
    d_queries, d_keys, d_targets, d_params, *d_coefficients = out[:8]
    rest = out[8:]
    d_running, d_boundary, d_anchors = rest[:depth], rest[depth : 2 * depth], rest[2 * depth :]
    d_params = None if params is None else d_params
    return (
        None,
        None,
        None,
        None,
        d_queries,
        d_keys,
        d_targets,
        d_params,
        *d_coefficients,
        d_running,
        d_boundary,
        d_anchors,
    )


@torch.library.custom_op(f"{_NAMESPACE}::chunk_scan_backward", mutates_args=())
def _scan_backward_op(
    rule: str,
    spec: list[float],
    queries: torch.Tensor,
    keys: torch.Tensor,
    params: torch.Tensor | None,
    read: torch.Tensor,
    gain: torch.Tensor,
    write: torch.Tensor,
    transition: torch.Tensor,
    residual: torch.Tensor,
    boundary: list[torch.Tensor],
    anchors: list[torch.Tensor],
    states: list[torch.Tensor],
    query_pre: list[torch.Tensor],
    bounds: list[torch.Tensor],
    grad_reads: torch.Tensor | None,
    grad_running: list[torch.Tensor | None],
    grad_starts: list[torch.Tensor | None],
) -> list[torch.Tensor]:
    """:func:`_scan_backward` as one operation: the gradients of queries, keys, targets, the error's parameters (zeros
    without), the coefficients, then per layer the state before the first chunk, the weights at its start and the
    anchors."""
    coefficients = ChunkCoefficients(read, gain, write, transition)
    saved = _ScanSaved(
        _kernel_rule(rule, spec), coefficients, queries, keys, params, residual, list(boundary), anchors or None,
        list(states), list(query_pre), list(bounds) or [None] * len(states),
    )  # fmt: skip
    grads = _scan_backward(saved, grad_reads, list(grad_running), list(grad_starts))
    templates = _scan_templates(queries, keys, params, coefficients, states, boundary, anchors)
    return _zeros_for(list(grads), templates)


def _scan_templates(queries, keys, params, coefficients, states, boundary, anchors) -> list[torch.Tensor]:
    """Tensors shaped like the gradients of :func:`_scan_backward_op`."""
    missing = keys.new_zeros(())
    running = [s[0] for s in states]
    return [
        queries,
        keys,
        keys,
        missing if params is None else params,
        *coefficients.fields(),
        *running,
        *boundary,
        *anchors,
    ]


@_scan_backward_op.register_fake
def _scan_backward_op_fake(
    rule,
    spec,
    queries,
    keys,
    params,
    read,
    gain,
    write,
    transition,
    residual,
    boundary,
    anchors,
    states,
    query_pre,
    bounds,
    grad_reads,
    grad_running,
    grad_starts,
):
    coefficients = ChunkCoefficients(read, gain, write, transition)
    return [_empty(t) for t in _scan_templates(queries, keys, params, coefficients, states, boundary, anchors)]


_scan_op.register_autograd(_scan_op_backward, setup_context=_scan_op_setup)
