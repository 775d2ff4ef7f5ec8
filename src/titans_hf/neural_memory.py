# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Neural long-term memory of Titans (Behrouz, Zhong, Mirrokni 2024, §3.1), in exact chunked parallel form.

The memory is a small MLP ``M`` per head whose weights are a recurrent state, trained while reading by gradient
descent with momentum and forgetting on the associative loss ``||M(k) - v||^2`` (paper eq. 12-14), and read with
the queries, ``y_t = M_{W_t}(q_t)`` (eq. 15). The write rule (``docs/design.md`` §2) is the paper's with four
changes that make it learn with its default settings:

    g_t = (1 - eta_t) theta_t                               momentum as an average
    n_t = max(1, (theta over the chunk so far) / max_lr)    the chunk's learning-rate budget
    S_t = eta_t S_{t-1} - g_t grad_t                        (every step of the current chunk divided by n_t at token t)
    W_t - W_0 = (1 - alpha_t) (W_{t-1} - W_0) + S_t         forgetting relaxes towards the learned initial weights W_0

with ``q``, ``k`` and ``v`` l2-normalised per head. Inside a chunk of ``chunk_size`` tokens every gradient is taken
at the chunk-start weights (mini-batch gradient descent, paper §3.2). The outputs of a whole chunk then have a closed
(dual) form that never materialises per-token weights; see :func:`chunk_forward` and ``docs/design.md`` §3.
``chunk_size=1`` is exact online gradient descent.

This file is a flat sibling of ``modeling_titans.py`` and imports nothing from the package, so that it travels with
saved checkpoints for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchState",
    "ChunkCoefficients",
    "ChunkFunction",
    "NeuralMemory",
    "NeuralMemoryState",
    "chunk_forward",
    "chunk_update",
    "compaction_order",
    "segsum",
]


# --------------------------------------------------------------------------------------------------------------------
# Small functional pieces
# --------------------------------------------------------------------------------------------------------------------


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums of ``x`` (..., C): ``out[..., i, j] = sum_{j < t <= i} x_t`` for ``j <= i`` and ``-inf`` above.

    Computed with a masked cumulative sum rather than a difference of cumulative sums, so that ratios of long products
    keep full precision; the upper triangle is ``-inf`` *before* any ``exp`` (``0 * inf`` would be ``nan`` in backward).
    """
    size = x.shape[-1]
    above_diagonal, on_or_above_diagonal = _triangles(size, x.device)
    terms = x.unsqueeze(-1).expand(*x.shape, size).masked_fill(on_or_above_diagonal, 0.0)  # [.., t, j] = x_t if t > j
    return terms.cumsum(dim=-2).masked_fill(above_diagonal, -math.inf)


@functools.lru_cache(maxsize=32)
def _triangles(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the strict upper triangle and of the upper triangle with the diagonal (built once)."""
    upper = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    return upper, upper | torch.eye(size, dtype=torch.bool, device=device)


def compaction_order(valid: torch.Tensor) -> torch.Tensor:
    """Per row, the indices that move the ``valid`` positions to the front in their original order (a stable sort)."""
    return torch.argsort((~valid).to(torch.int8), dim=1, stable=True)


def _gather_time(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.gather(dim, index)`` with ``index`` (batch, length) broadcast over every other dimension of ``x``."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    expanded = list(x.shape)
    expanded[dim] = index.shape[1]
    return x.gather(dim, index.view(shape).expand(expanded))


def _compact(
    hidden_states: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Moves each sequence's real tokens to the front (pads become zero rows at the end).

    Returns ``(x, counts, order)``; ``counts`` and ``order`` are ``None`` when every token is real.
    """
    if mask is None or bool(mask.to(torch.bool).all()):
        return hidden_states, None, None
    valid = mask.to(torch.bool)
    order = compaction_order(valid)
    counts = valid.sum(dim=1)
    x = _gather_time(hidden_states, order, dim=1)
    return x.masked_fill(~_real_rows(counts, x.shape[1]).unsqueeze(-1), 0.0), counts, order


def _restore(out: torch.Tensor, counts: torch.Tensor | None, order: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`_compact`: rows back to their original positions, zeros at pads."""
    if order is None:
        return out
    out = out.masked_fill(~_real_rows(counts, out.shape[1]).unsqueeze(-1), 0.0)
    return torch.zeros_like(out).scatter(1, order.unsqueeze(-1).expand_as(out), out)


def _real_rows(counts: torch.Tensor, length: int) -> torch.Tensor:
    return torch.arange(length, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)


def _pad_time(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pads dimension 2 (time, after batch and heads) of ``x`` up to ``length``."""
    missing = length - x.shape[2]
    if missing == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 3) + (0, missing))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _select_rows(rows: torch.Tensor | bool, new: list[torch.Tensor], old: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sequence (``rows``, (batch,) bool), ``new`` where true and ``old`` where false, for lists of tensors.
    ``rows`` known on the host (a ``bool``, the same for every sequence) picks a list without touching the device."""
    if isinstance(rows, bool):
        return list(new if rows else old)
    return [_where_batch(rows, a, b) for a, b in zip(new, old)]


def _where_batch(condition: torch.Tensor | bool, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``torch.where`` with a per-sample ``condition`` (batch,) broadcast over the other dimensions (or a ``bool``)."""
    if isinstance(condition, bool):
        return new if condition else old
    return torch.where(condition.view(-1, *([1] * (new.dim() - 1))), new, old)


def _any(rows: torch.Tensor | bool) -> bool:
    """Whether any sequence is selected; reads the device only when the host does not know."""
    return rows if isinstance(rows, bool) else bool(rows.any())


# --------------------------------------------------------------------------------------------------------------------
# The memory MLP: forward, hand-written inner backward, and the chunked closed form
# --------------------------------------------------------------------------------------------------------------------


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


def memory_errors(
    weights: list[torch.Tensor], keys: torch.Tensor, targets: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Inner backward of ``l = ||M_W(k) - v||^2`` (eq. 12) at fixed ``W``, written by hand.

    ``targets`` is what the MLP part of the memory must produce: ``v``, or ``v - k`` for the residual memory
    ``M(k) = k + MLP(k)``. With ``abar_0 = k``, ``pbar_l = abar_l W_l`` and ``abar_{l+1} = GELU(pbar_l)``, returns:

    - ``inputs``: ``abar_l``, the input of every layer;
    - ``pre_activations``: ``pbar_l`` of every layer but the last;
    - ``errors``: ``e_l = delta_{l+1} W_{l+1}^T`` of every layer but the last;
    - ``deltas``: ``delta_l`` (half the loss gradient with respect to ``pbar_l``), so that the per-token gradient of
      layer ``l`` is the rank-one ``2 abar_l^T delta_l``.
    """
    inputs, pre_activations = [keys], []
    a = keys
    for layer, w in enumerate(weights):
        p = a @ w
        if layer < len(weights) - 1:
            pre_activations.append(p)
            a = F.gelu(p)
            inputs.append(a)
    delta = p - targets
    deltas, errors = [delta], []
    for layer in range(len(weights) - 1, 0, -1):
        error = delta @ weights[layer].transpose(-1, -2)
        delta = torch.ops.aten.gelu_backward(error, pre_activations[layer - 1])
        errors.append(error)
        deltas.append(delta)
    return inputs, pre_activations, errors[::-1], deltas[::-1]


def step_curvature(inputs: list[torch.Tensor], deltas: list[torch.Tensor]) -> torch.Tensor:
    """How far a token's own gradient step moves its own read along its error, per unit of learning rate (the
    normalised-LMS denominator, for any depth): with ``u = delta_last`` the error of the read,

        kappa = max(1, sum_l |abar_l|^2 |delta_l|^2 / |u|^2)

    (``sum_l |abar_l|^2 |delta_l|^2`` is the squared norm of the token's gradient over all layers, over 4). A step
    ``theta / kappa`` changes ``M(k)`` along ``u`` by at most ``2 theta |u|`` (linearised) however large the memory's
    weights have grown; for a depth-1 memory with unit keys ``kappa = 1``. Differentiable (the outer gradient is
    exact); it depends on the error's direction only. Shape: the tokens' (..., C)."""
    error = deltas[-1].pow(2).sum(-1)
    total = sum(a.pow(2).sum(-1) * d.pow(2).sum(-1) for a, d in zip(inputs, deltas))
    return (total / error.clamp(min=torch.finfo(error.dtype).tiny)).clamp(min=1.0)


@dataclass
class ChunkCoefficients:
    """The scalars of the closed form for one run of tokens inside a chunk (leading dims: batch, heads).

    Notation (per head, local to the run): ``r = 1 - alpha``, ``beta_i = prod_{l<=i} r_l``, ``m_i = prod_{l<=i} eta_l``,
    ``f_i = sum_{l<=i} (beta_i/beta_l) m_l``, the write step ``g_j = (1 - eta_j) theta_j / kappa_j`` and the budget scale
    ``n_i = max(1, (lr_before + sum_{l<=i} theta_l) / max_lr)``. With ``u_j = abar_j^T delta_j`` (half the loss gradient
    of token ``j`` at the chunk's start weights), the chunk's own update at token ``i`` is
    ``-(2 / n_i) sum_j G_ij u_j`` with ``G_ij = g_j sum_{l=j..i} (beta_i/beta_l)(m_l/m_j)`` (``j <= i``).

    The state of a memory layer is a stack of slots acting like one matrix each. A run from a chunk boundary acts on
    ``[D; S]`` (deviation of the fast weights from ``W_0`` and momentum; ``[D]`` without momentum). A run that
    continues a chunk also carries ``[A; B]``, the part of ``D`` and ``S`` written by the chunk's earlier tokens
    (kept apart because the budget scale of a later token rescales it: ``A`` is multiplied by ``n_p / n_i``).

    - ``read`` (..., C, s): the weights of the slots in ``D_i`` (token ``i`` reads ``W_0 + D_i``);
    - ``gain`` (..., C, C): ``-2 G_ij / n_i``;
    - ``write`` (..., C, s): the weights of ``u_j`` in every slot after the run's last token;
    - ``transition`` (..., s, s): the slots after the run's last token as a combination of the slots before it.
    """

    read: torch.Tensor
    gain: torch.Tensor
    write: torch.Tensor
    transition: torch.Tensor

    @classmethod
    def from_gates(
        cls,
        lr: torch.Tensor,
        log_momentum: torch.Tensor | None,
        log_retention: torch.Tensor,
        max_lr: float,
        last: torch.Tensor | None = None,
        lr_before: torch.Tensor | None = None,
        curvature: torch.Tensor | None = None,
    ) -> ChunkCoefficients:
        """From per-token gates ``theta``, ``log eta``, ``log r`` (..., C), as exp of segment sums of logs.

        ``curvature`` (..., C): each token's :func:`step_curvature` ``kappa``; its step is ``theta / kappa`` (default
        1), while the budget ``n`` counts ``theta``.

        ``last`` (shape ``lr.shape[:-1]``, int64) is the token after which the state is carried (default: the last
        slot): slots after it must not move the state (with momentum, ``D_t = r D_{t-1} + S_t`` moves ``D`` even
        where nothing is written), so a run shorter than its slots is carried from its own last token.
        ``lr_before`` (shape ``lr.shape[:-1]``): the learning rates of the chunk's tokens before this run, summed; given,
        the coefficients act on ``[D; S; A; B]`` (a run that continues a chunk, or may stop inside one), else on
        ``[D; S]`` (a whole chunk from its boundary).
        """
        retention_decay = torch.exp(segsum(log_retention))  # beta_i / beta_l for l <= i, else 0
        beta = torch.exp(torch.cumsum(log_retention, dim=-1))
        before = 0.0 if lr_before is None else lr_before.unsqueeze(-1)
        scale = 1.0 / torch.clamp((before + torch.cumsum(lr, dim=-1)) / max_lr, min=1.0)  # 1 / n_i
        theta = lr if curvature is None else lr / curvature  # the write step of each token

        def at_last(x: torch.Tensor, rows: bool = False) -> torch.Tensor:
            if last is None:
                return x[..., -1, :] if rows else x[..., -1]
            if rows:
                return x.gather(-2, last[..., None, None].expand(*last.shape, 1, x.shape[-1])).squeeze(-2)
            return x.gather(-1, last.unsqueeze(-1)).squeeze(-1)

        if log_momentum is None:
            gain = retention_decay * (-2.0 * theta).unsqueeze(-2) * scale.unsqueeze(-1)
            read, write = beta.unsqueeze(-1), at_last(gain, rows=True).unsqueeze(-1)
            transition = at_last(beta)[..., None, None]
        else:
            step = 2.0 * theta * torch.expm1(log_momentum)  # -2 g_j = -2 (1 - eta_j) theta_j / kappa_j
            momentum_decay = torch.exp(segsum(log_momentum))  # m_i / m_j for j <= i, else 0
            m = torch.exp(torch.cumsum(log_momentum, dim=-1))
            gain = (retention_decay @ momentum_decay) * step.unsqueeze(-2) * scale.unsqueeze(-1)
            f = (retention_decay @ m.unsqueeze(-1)).squeeze(-1)
            read = torch.stack([beta, f], dim=-1)
            write_s = at_last(momentum_decay, rows=True) * step * at_last(scale).unsqueeze(-1)
            write = torch.stack([at_last(gain, rows=True), write_s], dim=-1)
            zero = torch.zeros_like(at_last(m))
            transition = torch.stack(
                [torch.stack([at_last(beta), at_last(f)], -1), torch.stack([zero, at_last(m)], -1)], dim=-2
            )
        if lr_before is None:
            return cls(read, gain, write, transition)
        # The chunk's earlier update [A; B] evolves like [D; S] and shrinks by n_p / n_i as the budget fills: on
        # [D; S; A; B], read [r, (rho - 1) r], transition [[T, (rho_L - 1) T], [0, rho_L T]], write [w, w].
        rho = torch.clamp(lr_before / max_lr, min=1.0).unsqueeze(-1) * scale  # n_p / n_i
        rho_last = at_last(rho)[..., None, None]
        read = torch.cat([read, (rho - 1).unsqueeze(-1) * read], dim=-1)
        top = torch.cat([transition, (rho_last - 1) * transition], dim=-1)
        bottom = torch.cat([torch.zeros_like(transition), rho_last * transition], dim=-1)
        return cls(read, gain, torch.cat([write, write], dim=-1), torch.cat([top, bottom], dim=-2))


def chunk_forward(
    states: list[torch.Tensor],
    gradient_weights: list[torch.Tensor],
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    coefficients: ChunkCoefficients,
    anchors: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
    """A run of tokens of one chunk in closed form (docs/design.md §3): read every token, carry the state past the last.

    Args:
        states: the state before the run, per memory layer a stack of slots (batch, heads, s, d_in, d_out): ``[D; S]``
            (the fast weights' deviation from ``W_0`` and the momentum; ``[D]`` without momentum), followed, for a run
            that continues a chunk, by the chunk's own update ``[A; B]`` (see :class:`ChunkCoefficients`).
        gradient_weights: the weights at the chunk's start, where every gradient of the chunk is taken,
            (batch, heads, d_in, d_out) per layer.
        queries, keys: (batch, heads, chunk, head_dim).
        targets: what the memory MLP must map the keys to (see :func:`memory_errors`), (batch, heads, chunk, head_dim).
        coefficients: the run's :class:`ChunkCoefficients`.
        anchors: ``W_0`` per layer, (1, heads, d_in, d_out).

    Each layer's per-token gradient is rank one, so the pre-activation of layer ``l`` for query ``i`` is
    ``a_i W_0 + sum_s read_is a_i state_s + sum_j gain_ij (a_i . abar_j) delta_j`` (``a``: query-side input of the
    layer, ``abar, delta``: key-side input and error at the chunk's start weights), and no per-token weight is ever
    formed.

    Plain differentiable torch: autograd through it is the reference for :class:`ChunkFunction`'s hand-written
    backward. Returns the MLP part of the reads (batch, heads, chunk, head_dim), the state after the run's last
    token, and the intermediates that backward needs.
    """
    c = coefficients
    inputs, key_pre, errors, deltas = memory_errors(gradient_weights, keys, targets)

    a, query_pre = queries, []
    for layer, (state, abar, delta) in enumerate(zip(states, inputs, deltas)):
        scores = (a @ abar.transpose(-1, -2)) * c.gain
        scaled = (a.unsqueeze(-2) * c.read.unsqueeze(-1)).flatten(-2)  # [read_1 a | read_2 a | ...]
        p = _baddbmm(scores @ delta, scaled, state.flatten(-3, -2)) + a @ anchors[layer]
        if layer < len(states) - 1:
            query_pre.append(p)
            a = F.gelu(p)
        else:
            a = p

    new_states = []
    for state, abar, delta in zip(states, inputs, deltas):
        slots, d_in, d_out = state.shape[-3:]
        carried = (c.transition @ state.flatten(-2)).view_as(state)
        # [W_C; S_C] += abar^T (write_s * delta), all slots in one matmul: (d_in, C) @ (C, s * d_out).
        scaled_errors = (delta.unsqueeze(-2) * c.write.unsqueeze(-1)).flatten(-2)
        written = (abar.transpose(-1, -2) @ scaled_errors).unflatten(-1, (slots, d_out)).transpose(-2, -3)
        new_states.append(carried + written)
    return a, new_states, (key_pre, deltas[-1], query_pre)


def _gelu_second_derivative(x: torch.Tensor) -> torch.Tensor:
    """``GELU''(x) = phi(x) (2 - x^2)`` with ``phi`` the standard normal density."""
    return torch.exp(-0.5 * x * x) * (2.0 - x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def _accumulate(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


class ChunkFunction(torch.autograd.Function):
    """:func:`chunk_forward` with a hand-written backward.

    It saves only the chunk's inputs and the queries' pre-activations (recomputing the keys' side, errors and
    similarities in backward), and fuses what autograd would spread over many small ops: it is equal to autograd through
    :func:`chunk_forward` (``tests/test_neural_memory.py`` checks it in float64) with about a third of the memory.
    """

    @staticmethod
    def forward(ctx, queries, keys, targets, read, gain, write, transition, *weights_and_states):
        depth = len(weights_and_states) // 3
        gradient_weights, states = weights_and_states[:depth], weights_and_states[depth : 2 * depth]
        anchors = weights_and_states[2 * depth :]
        coefficients = ChunkCoefficients(read, gain, write, transition)
        reads, new_states, (_, last_delta, query_pre) = chunk_forward(
            list(states), list(gradient_weights), queries, keys, targets, coefficients, list(anchors)
        )
        ctx.depth = depth
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            queries, keys, read, gain, write, transition, last_delta, *weights_and_states, *query_pre
        )
        return (reads, *new_states)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_reads, *grad_states):
        # The forward ran with autocast off (float32 state); so does the backward, even if called inside autocast.
        device = next((g.device.type for g in (grad_reads, *grad_states) if g is not None), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return ChunkFunction._backward(ctx, grad_reads, *grad_states)

    @staticmethod
    def _backward(ctx, grad_reads, *grad_states):
        depth = ctx.depth
        queries, keys, read, gain, write, transition, last_delta, *rest = ctx.saved_tensors
        weights, states = rest[:depth], rest[depth : 2 * depth]
        anchors, query_pre = rest[2 * depth : 3 * depth], rest[3 * depth :]
        gelu_backward = torch.ops.aten.gelu_backward

        # Recompute the cheap intermediates of the forward pass: the keys' side, errors and similarities.
        abars, key_pre = [keys], []
        for w in weights[:-1]:
            key_pre.append(abars[-1] @ w)
            abars.append(F.gelu(key_pre[-1]))
        deltas, errors = [last_delta], []
        for layer in range(depth - 2, -1, -1):
            errors.append(deltas[0] @ weights[layer + 1].transpose(-1, -2))
            deltas.insert(0, gelu_backward(errors[-1], key_pre[layer]))
        errors = errors[::-1]
        query_inputs = [queries] + [F.gelu(p) for p in query_pre]
        slot_writes = write.unsqueeze(-1)  # (..., C, s, 1)

        d_states: list[torch.Tensor | None] = [None] * depth
        d_abars: list[torch.Tensor | None] = [None] * depth
        d_deltas: list[torch.Tensor | None] = [None] * depth
        d_anchors: list[torch.Tensor | None] = [None] * depth
        d_read = d_gain = d_write = d_transition = d_queries = None

        # Reads: p_l = [read * a_l] @ state_l + (similarity_l * gain) @ delta_l + a_l @ W_0,l, a_{l+1} = GELU(p_l).
        d_p = grad_reads
        for layer in reversed(range(depth)):
            if d_p is None:
                break
            state, a = states[layer], query_inputs[layer]
            slots, d_in, d_out = state.shape[-3:]
            scaled = (a.unsqueeze(-2) * read.unsqueeze(-1)).flatten(-2)
            d_states[layer] = (scaled.transpose(-1, -2) @ d_p).view_as(state)
            d_scaled = (d_p @ state.flatten(-3, -2).transpose(-1, -2)).unflatten(-1, (slots, d_in))
            d_read = _accumulate(d_read, (d_scaled * a.unsqueeze(-2)).sum(-1))
            similarity = a @ abars[layer].transpose(-1, -2)
            d_scores = d_p @ deltas[layer].transpose(-1, -2)
            d_gain = _accumulate(d_gain, d_scores * similarity)
            d_similarity = d_scores * gain
            d_deltas[layer] = (similarity * gain).transpose(-1, -2) @ d_p
            d_abars[layer] = d_similarity.transpose(-1, -2) @ a
            d_a = _baddbmm((d_scaled * read.unsqueeze(-1)).sum(-2), d_similarity, abars[layer])
            d_a = d_a + d_p @ anchors[layer].transpose(-1, -2)
            d_anchors[layer] = (a.transpose(-1, -2) @ d_p).sum(0, keepdim=True)  # W_0 is shared by the batch
            if layer > 0:
                d_p = gelu_backward(d_a, query_pre[layer - 1])
            else:
                d_queries = d_a

        # Carry: new_state = transition @ state + abar^T (write_s * delta).
        for layer, (state, grad) in enumerate(zip(states, grad_states)):
            if grad is None:
                continue
            slots, d_in, d_out = state.shape[-3:]
            d_states[layer] = _accumulate(
                d_states[layer], (transition.transpose(-1, -2) @ grad.flatten(-2)).view_as(state)
            )
            d_transition = _accumulate(d_transition, grad.flatten(-2) @ state.flatten(-2).transpose(-1, -2))
            grad_written = grad.transpose(-2, -3).flatten(-2)  # (..., d_in, s * d_out)
            scaled_errors = (deltas[layer].unsqueeze(-2) * slot_writes).flatten(-2)
            d_abars[layer] = _accumulate(d_abars[layer], scaled_errors @ grad_written.transpose(-1, -2))
            d_scaled = (abars[layer] @ grad_written).unflatten(-1, (slots, d_out))
            d_deltas[layer] = _accumulate(d_deltas[layer], (d_scaled * slot_writes).sum(-2))
            d_write = _accumulate(d_write, (d_scaled * deltas[layer].unsqueeze(-2)).sum(-1))

        # Key side: d_weights[l] is the gradient of the gradient weights W_l through the keys' forward and errors.
        d_weights: list[torch.Tensor | None] = [None] * depth
        # Errors: delta_l = GELU'(pbar_l) * e_l with e_l = delta_{l+1} W_{l+1}^T.
        d_key_pre: list[torch.Tensor | None] = [None] * (depth - 1)
        for layer in range(depth - 1):
            if d_deltas[layer] is None:
                continue
            d_error = gelu_backward(d_deltas[layer], key_pre[layer])
            d_key_pre[layer] = d_deltas[layer] * errors[layer] * _gelu_second_derivative(key_pre[layer])
            d_deltas[layer + 1] = _accumulate(d_deltas[layer + 1], d_error @ weights[layer + 1])
            d_weights[layer + 1] = d_error.transpose(-1, -2) @ deltas[layer + 1]
        # Forward: delta_{L-1} = pbar_{L-1} - targets, pbar_l = abar_l W_l, abar_{l+1} = GELU(pbar_l).
        d_targets = None if d_deltas[-1] is None else -d_deltas[-1]
        d_pbar = d_deltas[-1]
        for layer in reversed(range(depth)):
            if layer < depth - 1:
                d_pbar = d_key_pre[layer]
                if d_abars[layer + 1] is not None:
                    d_pbar = _accumulate(d_pbar, gelu_backward(d_abars[layer + 1], key_pre[layer]))
            if d_pbar is None:
                continue
            d_weights[layer] = _accumulate(d_weights[layer], abars[layer].transpose(-1, -2) @ d_pbar)
            d_abars[layer] = _accumulate(d_abars[layer], d_pbar @ weights[layer].transpose(-1, -2))
        return (
            d_queries,
            d_abars[0],
            d_targets,
            d_read,
            d_gain,
            d_write,
            d_transition,
            *d_weights,
            *d_states,
            *d_anchors,
        )


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


def chunk_update(
    states: list[torch.Tensor],
    gradient_weights: list[torch.Tensor],
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    coefficients: ChunkCoefficients,
    anchors: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`chunk_forward` without its intermediates, through :class:`ChunkFunction` when gradients are needed."""
    c = coefficients
    inputs = (queries, keys, targets, c.read, c.gain, c.write, c.transition, *gradient_weights, *states, *anchors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        reads, *new_states = ChunkFunction.apply(*inputs)
        return reads, new_states
    reads, new_states, _ = chunk_forward(states, gradient_weights, queries, keys, targets, c, anchors)
    return reads, new_states


def _baddbmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in one call, for (batch, heads, ...) operands."""
    batch, heads = acc.shape[:2]
    return torch.baddbmm(acc.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1)).view(batch, heads, *acc.shape[2:])


# --------------------------------------------------------------------------------------------------------------------
# Streaming state
# --------------------------------------------------------------------------------------------------------------------


class BatchState:
    """Methods of the dataclasses that hold per-sequence state (the memory's, the attention caches').

    Every tensor field has the batch as its first dimension (a field may also be a list of tensors, or ``None``), so
    the state can be detached, moved, indexed and reordered like one tensor (:meth:`apply`) and written to
    safetensors as a flat dict (:meth:`tensors`, :meth:`from_tensors`). Fields that are not tensors are settings
    (``chunk_size``) or host-side bookkeeping and pass through unchanged.
    """

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """A new state with ``fn`` applied to every tensor (lists element-wise; ``None`` stays ``None``)."""
        return self.map_fields(lambda name, t: fn(t))

    def map_fields(self, fn: Callable[[str, torch.Tensor], torch.Tensor]):
        """:meth:`apply` with a function that also sees the field's name."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                value = [fn(field.name, t) for t in value]
            elif isinstance(value, torch.Tensor):
                value = fn(field.name, value)
            values[field.name] = value
        return type(self)(**values)

    def detach(self):
        return self.apply(torch.Tensor.detach)

    def index_select(self, indices: torch.Tensor):
        """Selects or reorders sequences along the batch (beam search, dropping finished rows)."""
        return self.apply(lambda t: t.index_select(0, indices.to(t.device)))

    def __getitem__(self, indices):
        if isinstance(indices, int):
            indices = slice(indices, indices + 1)
        return self.apply(lambda t: t[indices])

    def repeat_interleave(self, repeats: int):
        return self.apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as a flat ``{name: tensor}`` dict (``name.i`` for the items of a list), e.g. for safetensors."""
        out = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                out.update({f"{field.name}.{i}": t for i, t in enumerate(value)})
            elif isinstance(value, torch.Tensor):
                out[field.name] = value
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **settings):
        """Inverse of :meth:`tensors`; ``settings`` gives the fields that are not tensors."""
        values = dict(settings)
        for field in fields(cls):
            if field.name in settings:
                continue
            listed = sorted(
                (int(k.rsplit(".", 1)[1]), t) for k, t in tensors.items() if k.startswith(f"{field.name}.")
            )
            values[field.name] = [t for _, t in listed] if listed else tensors.get(field.name)
        return cls(**values)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class NeuralMemoryState(BatchState):
    """Everything the memory needs to continue a stream exactly, for a batch of independent sequences.

    Attributes:
        weights: the current fast weights ``W_t``, one (batch, heads, d_in, d_out) tensor per memory layer
            (float32, or float64 when the module runs in float64).
        momentum: the current momentum ``S_t`` (same shapes), or ``None`` when momentum is disabled.
        chunk_weights: the fast weights at the last chunk boundary, where the gradients of the current chunk are
            taken (equal to ``weights`` on a boundary).
        chunk_update: the part of ``W_t - W_0`` and ``S_t`` written by the current chunk's tokens, stacked per layer
            as (batch, heads, 2, d_in, d_out) (1 slot without momentum); zero on a boundary. The chunk's learning-rate
            budget rescales it as the chunk goes on, so it is kept apart.
        chunk_lr: the learning rates ``theta`` of the current chunk's tokens, summed, (batch, heads); zero on a
            boundary.
        conv: the last ``conv_kernel - 1`` projected (pre-convolution) ``q|k|v`` rows of real tokens,
            (batch, conv_kernel - 1, 3 * heads * head_dim); ``None`` without convolution.
        seen: number of real tokens written so far per sequence, (batch,) int64; ``seen % chunk_size`` of them
            are in the current chunk.
        chunk_size: the chunk size of the memory that made the state (not a tensor).
        common_seen: ``seen`` as a host integer when every sequence has written the same number of tokens and that
            is known without reading the device (a stream of unpadded calls), else ``None``. The chunk schedule then
            follows from shapes: no host synchronisation.

    Its size does not depend on how many tokens were read.
    """

    weights: list[torch.Tensor]
    momentum: list[torch.Tensor] | None
    chunk_weights: list[torch.Tensor]
    chunk_update: list[torch.Tensor]
    chunk_lr: torch.Tensor
    conv: torch.Tensor | None
    seen: torch.Tensor
    chunk_size: int
    common_seen: int | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NeuralMemoryState:
        """Moves every tensor to ``device``; ``dtype`` (if given) applies to the floating-point tensors only."""
        return self.apply(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], chunk_size: int) -> NeuralMemoryState:
        """Inverse of :meth:`tensors`."""
        seen = tensors["seen"]  # read once, on loading: every sequence at the same place restores the host schedule
        common_seen = int(seen[0]) if seen.numel() and bool((seen == seen[0]).all()) else None
        return super().from_tensors(tensors, chunk_size=chunk_size, common_seen=common_seen)

    @property
    def batch_size(self) -> int:
        return self.seen.shape[0]


# --------------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------------


class NeuralMemory(nn.Module):
    """Titans neural long-term memory (the LMM token mixer), streaming and exact.

    Args:
        hidden_size: width of the inputs and outputs.
        num_heads: number of independent memories.
        head_dim: key/value width of each memory.
        depth: layers of the memory MLP; 1 is a linear matrix memory, >= 2 an MLP ``z + MLP(z)`` (GELU).
        expansion: hidden width of the memory MLP, as a multiple of ``head_dim``.
        chunk_size: tokens per inner mini-batch; every gradient in a chunk is taken at the chunk-start weights.
        conv_kernel: width of the causal depthwise convolution on q, k, v (0 or 1: none).
        momentum: use the momentum ("surprise") term ``S`` (eq. 14); without it ``S_t = -theta_t grad``.
        forget: use the data-dependent forgetting gate ``alpha`` (eq. 13); without it nothing is forgotten.
        max_lr: upper bound of the inner learning rate ``theta = max_lr * sigmoid(.)`` and the chunk's budget: the
            learning rates of a chunk's tokens so far are scaled down to sum to at most ``max_lr``; each token's step
            is further divided by its :func:`step_curvature` (README, "The write rule").
        max_weight_rms: safeguard: at every chunk boundary, each head's deviation of the fast weights from ``W_0``
            and its momentum, per memory layer, are scaled down to this root-mean-square value if they exceed it
            (``None``: off). Far above the normal range, it only acts when the inner optimisation overshoots (a
            budget far above the stable one, adversarial input), keeping the memory finite and bounded.
        retention_half_lives: at initialisation, the heads' retention ``1 - alpha`` is set (through the gate bias) so
            that a write fades to half after these many tokens, spread geometrically from the first value (head 0)
            to the second (the last head): several time scales, among which the data-dependent gate chooses.
        init_momentum: momentum decay ``eta`` at initialisation.
        init_lr_fraction: ``theta / max_lr`` at initialisation.
        initializer_range: standard deviation of the gate and output projection weights at initialisation (the
            q|k|v projection uses ``1 / sqrt(hidden_size)``).
        norm_eps: epsilon of the per-head output RMSNorm.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        depth: int = 2,
        expansion: int = 4,
        chunk_size: int = 16,
        conv_kernel: int = 4,
        momentum: bool = True,
        forget: bool = True,
        max_lr: float = 1.0,
        max_weight_rms: float | None = 1.0,
        retention_half_lives: tuple[float, float] = (32.0, 32768.0),
        init_momentum: float = 0.9,
        init_lr_fraction: float = 0.5,
        initializer_range: float = 0.02,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("num_heads", num_heads)
        _check_positive_int("head_dim", head_dim)
        _check_positive_int("depth", depth)
        _check_positive_int("expansion", expansion)
        _check_positive_int("chunk_size", chunk_size)
        if not isinstance(conv_kernel, int) or isinstance(conv_kernel, bool) or conv_kernel < 0:
            raise ValueError(f"conv_kernel must be an int >= 0 (0 or 1: no convolution), got {conv_kernel!r}.")
        for name, value in (("momentum", momentum), ("forget", forget)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        if not (isinstance(max_lr, (int, float)) and math.isfinite(max_lr) and max_lr > 0):
            raise ValueError(f"max_lr must be a finite number > 0, got {max_lr!r}.")
        if max_weight_rms is not None and not (
            isinstance(max_weight_rms, (int, float)) and math.isfinite(max_weight_rms) and max_weight_rms > 0
        ):
            raise ValueError(f"max_weight_rms must be None (off) or a finite number > 0, got {max_weight_rms!r}.")
        lives = tuple(retention_half_lives) if isinstance(retention_half_lives, (tuple, list)) else ()
        if not (
            len(lives) == 2
            and all(isinstance(h, (int, float)) and math.isfinite(h) and h > 0 for h in lives)
            and lives[0] <= lives[1]
        ):
            raise ValueError(
                "retention_half_lives must be two finite numbers 0 < first <= second (tokens), got "
                f"{retention_half_lives!r}."
            )
        for name, value in (
            ("init_momentum", init_momentum),
            ("init_lr_fraction", init_lr_fraction),
        ):
            if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}.")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.depth = depth
        self.expansion = expansion
        self.chunk_size = chunk_size
        self.conv_kernel = conv_kernel if conv_kernel > 1 else 0
        self.use_momentum = momentum
        self.use_forget = forget
        self.max_lr = float(max_lr)
        self.max_weight_rms = None if max_weight_rms is None else float(max_weight_rms)
        self.retention_half_lives = (float(lives[0]), float(lives[1]))
        self.init_momentum = init_momentum
        self.init_lr_fraction = init_lr_fraction
        self.initializer_range = initializer_range
        self.residual = depth >= 2

        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False)
        # Causal depthwise convolution over time of every q|k|v channel (``None`` without convolution).
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, self.conv_kernel)) if self.conv_kernel else None
        # Per-token, per-head gates (paper eq. 13-14), each a linear map of the input.
        self.lr_proj = nn.Linear(hidden_size, num_heads)
        self.momentum_proj = nn.Linear(hidden_size, num_heads) if momentum else None
        self.retention_proj = nn.Linear(hidden_size, num_heads) if forget else None
        # Learned initial state W_0 of every head's memory MLP.
        dims = [head_dim] + [expansion * head_dim] * (depth - 1) + [head_dim]
        self.initial_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_heads, d_in, d_out)) for d_in, d_out in zip(dims[:-1], dims[1:])]
        )
        self.norm_weight = nn.Parameter(torch.empty(num_heads, head_dim))  # per-head output RMSNorm
        self.norm_eps = norm_eps
        self.gate_proj = nn.Linear(hidden_size, inner, bias=False)  # output gate
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------------------- init

    def reset_parameters(self, init=nn.init) -> None:
        """Initialises every parameter. ``init`` is ``torch.nn.init`` or ``transformers.initialization``.

        The gate biases make the memory *retain* at initialisation (per head, a retention whose half-life lies in
        ``retention_half_lives``; momentum ``init_momentum``; learning rate ``init_lr_fraction * max_lr``); the gate
        weights are small, so the gates start near these values on unit-RMS inputs.
        """
        std = self.initializer_range
        for linear in (self.gate_proj, self.o_proj):
            init.normal_(linear.weight, mean=0.0, std=std)
        # q and k are l2-normalised, so only the values feel this scale: 1/sqrt(fan-in) gives values of unit-order
        # entries at any width, large enough next to the unit keys for a write to show in the read z + MLP(z).
        init.normal_(self.qkv_proj.weight, mean=0.0, std=self.hidden_size**-0.5)
        if self.conv_weight is not None and not getattr(self.conv_weight, "_is_hf_initialized", False):
            # Start close to the identity (the current token) with a little mixing of the previous ones.
            init.normal_(self.conv_weight, mean=0.0, std=std)
            with torch.no_grad():
                self.conv_weight[:, -1] += 1.0
        for proj, value in (
            (self.lr_proj, self.init_lr_fraction),
            (self.momentum_proj, self.init_momentum),
            (self.retention_proj, None),
        ):
            if proj is not None:
                init.normal_(proj.weight, mean=0.0, std=std)
                init.constant_(proj.bias, math.log(value / (1.0 - value)) if value is not None else 0.0)
        if self.retention_proj is not None:  # the logit of r = 2^(-1/h) is log(r / (1 - r)) = -log(2^(1/h) - 1)
            logits = -torch.log(torch.expm1(math.log(2.0) / self.initial_half_lives()))
            bias = self.retention_proj.bias
            if hasattr(init, "copy_"):  # transformers.initialization: leaves loaded weights alone
                init.copy_(bias, logits.to(bias.dtype))
            else:
                with torch.no_grad():
                    bias.copy_(logits)
        for w in self.initial_weights:
            init.normal_(w, mean=0.0, std=1.0 / math.sqrt(w.shape[-2]))
        init.ones_(self.norm_weight)

    def initial_half_lives(self) -> torch.Tensor:
        """The retention half-life of every head at initialisation (tokens), geometric over ``retention_half_lives``."""
        low, high = self.retention_half_lives
        steps = torch.linspace(0.0, 1.0, self.num_heads, dtype=torch.float64) if self.num_heads > 1 else torch.zeros(1)
        return (low * (high / low) ** steps).to(torch.float64)

    # ---------------------------------------------------------------------------------------------------- gates

    def lr(self, x: torch.Tensor) -> torch.Tensor:
        """Inner learning rate ``theta_t = max_lr * sigmoid(x W_theta + b)`` (eq. 14), (..., heads), bounded by max_lr."""
        return self.max_lr * torch.sigmoid(_upcast(self.lr_proj(x)))

    def log_momentum(self, x: torch.Tensor) -> torch.Tensor | None:
        """``log eta_t`` of the momentum decay ``eta_t = sigmoid(x W_eta + b)`` (eq. 14), or ``None`` if disabled."""
        if self.momentum_proj is None:
            return None
        return F.logsigmoid(_upcast(self.momentum_proj(x)))

    def log_retention(self, x: torch.Tensor) -> torch.Tensor:
        """``log(1 - alpha_t)`` of the retention ``1 - alpha_t = sigmoid(x W_alpha + b)`` (eq. 13); 0 if disabled."""
        if self.retention_proj is None:
            return x.new_zeros(*x.shape[:-1], self.num_heads, dtype=self.compute_dtype(x))
        return F.logsigmoid(_upcast(self.retention_proj(x)))

    # ---------------------------------------------------------------------------------------------------- pieces

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """Fast weights, momentum and gate products live in float32 (float64 when the inputs are float64)."""
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def initial_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> NeuralMemoryState:
        """The state before the first token: ``W_0`` for every sequence, zero momentum.

        ``dtype`` is the dtype of the fast weights (float32, or float64 for exact checks); the conv tail takes the
        module's dtype.
        """
        device = device if device is not None else self.norm_weight.device
        weights = [w.to(dtype).unsqueeze(0).expand(batch_size, *w.shape) for w in self.initial_weights]
        conv = None
        if self.conv_weight is not None:
            conv = torch.zeros(
                batch_size,
                self.conv_kernel - 1,
                3 * self.num_heads * self.head_dim,
                device=device,
                dtype=self.qkv_proj.weight.dtype,
            )
        slots = 2 if self.use_momentum else 1
        return NeuralMemoryState(
            weights=weights,
            momentum=[torch.zeros_like(w) for w in weights] if self.use_momentum else None,
            chunk_weights=weights,
            chunk_update=[w.new_zeros(batch_size, w.shape[1], slots, *w.shape[2:]) for w in weights],
            chunk_lr=torch.zeros(batch_size, self.num_heads, device=device, dtype=dtype),
            conv=conv,
            seen=torch.zeros(batch_size, dtype=torch.long, device=device),
            chunk_size=self.chunk_size,
            common_seen=0,
        )

    def causal_conv(
        self,
        features: torch.Tensor,
        tail: torch.Tensor | None,
        weight: torch.Tensor | None,
        counts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal depthwise convolution + SiLU over compacted rows (real tokens first), continuing from ``tail``.

        ``features`` (batch, length, channels); ``weight`` (channels, kernel); ``counts`` (batch,) real rows per
        sequence (``None``: all real).
        Returns the convolved features and the new tail (the last ``kernel - 1`` real rows, tail included).
        """
        if tail is None:
            return F.silu(features), None
        padded = torch.cat([tail, features], dim=1)
        width = tail.shape[1]
        out = CausalConvSiLU.apply(padded, weight)
        if counts is None:
            new_tail = padded[:, padded.shape[1] - width :]
        else:
            index = counts.unsqueeze(1) + torch.arange(width, device=counts.device)
            new_tail = _gather_time(padded, index, dim=1)
        return out, new_tail

    def split_heads(self, features: torch.Tensor) -> torch.Tensor:
        """Splits convolved ``q|k|v`` features (batch, length, 3 * inner) into a (3, batch, heads, length, head_dim)."""
        batch, length, _ = features.shape
        return features.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def output(self, reads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o = W_o(RMSNorm_head(y) * sigmoid(x W_g))``: per-head norm, output gate, projection back to hidden."""
        batch, heads, length, dim = reads.shape
        y = F.rms_norm(reads, (dim,), eps=self.norm_eps) * self.norm_weight.to(reads.dtype).unsqueeze(1)
        y = y.transpose(1, 2).reshape(batch, length, heads * dim).to(x.dtype)
        return self.o_proj(y * torch.sigmoid(self.gate_proj(x)))

    # ---------------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: NeuralMemoryState | None = None,
        mask: torch.Tensor | None = None,
        write: bool = True,
    ) -> tuple[torch.Tensor, NeuralMemoryState]:
        """Reads and writes a block of tokens.

        Args:
            hidden_states: (batch, seq, hidden_size).
            state: where the stream stopped (``None``: a new stream, starting from ``W_0``).
            mask: (batch, seq) of 0/1 or bool; a 0 token writes nothing, moves no chunk boundary and gets a zero output.
            write: ``False`` is the "memory never written" ablation: every token reads the state's current
                weights and the state is returned unchanged.

        Returns:
            ``(output, new_state)``; ``output`` has the shape of ``hidden_states``.
        """
        batch, length = self._check_inputs(hidden_states, mask)
        dtype = self.compute_dtype(hidden_states)
        if state is None:
            state = self.initial_state(batch, hidden_states.device, dtype)
        else:
            self.check_state(state, batch)
        x, counts, order = _compact(hidden_states, mask)

        # Projections, causal conv + SiLU, l2-normalisation (eq. 11), gates (eq. 13-14).
        features, conv_tail = self.causal_conv(self.qkv_proj(x), state.conv, self.conv_weight, counts)
        q, k, v = self.split_heads(features).to(dtype).unbind(0)
        # Unit queries and keys (eq. 11), and unit values: the inner problem has one scale at any width, the one for
        # which the chunk's learning-rate budget is stable (README, "the write rule").
        q, k, v = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(v, dim=-1)

        # Read and write chunk by chunk, with float32 (or float64) state even under autocast.
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            if not write:
                reads, new_state = memory_mlp(state.weights, q, self.residual), state
            else:
                # Autocast is off here: the gates run in their weights' dtype (under autocast, e.g. MAC, x is bf16).
                gate_x = x.to(self.lr_proj.weight.dtype)
                lr = self.lr(gate_x).to(dtype).transpose(1, 2)
                log_momentum = self.log_momentum(gate_x)
                log_momentum = None if log_momentum is None else log_momentum.to(dtype).transpose(1, 2)
                log_retention = self.log_retention(gate_x).to(dtype).transpose(1, 2)
                reads, new_state = self._read_write(state, q, k, v, lr, log_momentum, log_retention, counts, length)
                new_state.conv = conv_tail
        return _restore(self.output(reads, x), counts, order), new_state

    def _read_write(
        self,
        state: NeuralMemoryState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lr: torch.Tensor,
        log_momentum: torch.Tensor | None,
        log_retention: torch.Tensor,
        counts: torch.Tensor | None,
        length: int,
    ) -> tuple[torch.Tensor, NeuralMemoryState]:
        """The chunk loop, continuing each sequence from wherever it stopped.

        A sequence that stopped ``phase`` tokens into a chunk first finishes that chunk (its ``C - phase`` next
        tokens: gradients still at the chunk's start weights, reads and carry from the running state), then runs
        whole chunks. Slot layout: the first ``head`` slots hold each sequence's tokens up to its next boundary
        (``head`` = the longest such run, 0 when every sequence is on a boundary; shorter runs end in identity
        slots), then chunks of ``C`` slots. Identity slots (padding of the layout) have ``theta = 0`` and gates of 1.
        """
        if length == 1 and counts is None:  # decoding: one token per sequence, all real
            return self._step(state, q, k, v, lr, log_momentum, log_retention)
        size = self.chunk_size
        batch = q.shape[0]
        device = q.device
        streams = (q, k, v, lr, log_retention, log_momentum)
        token_slot = None
        if counts is None and state.common_seen is not None:
            # Every sequence is at the same place and every token is real: the schedule follows from shapes, on the
            # host (no synchronisation), and the layout is the identity.
            phase = state.common_seen % size
            first = min(length, (size - phase) % size)  # tokens that finish the current chunk
            head, chunks = first, -(-(length - first) // size)
            slots = head + chunks * size
            aligned = [None if t is None else _pad_time(t, slots) for t in streams]
            counts_in = [first] + [min(size, length - first - n * size) for n in range(chunks)]
            completed = [first > 0 and phase + first == size] + [n_in == size for n_in in counts_in[1:]]
            new = torch.full((batch,), length, device=device, dtype=torch.long)
        else:
            # Padded rows, or rows at different places: the schedule depends on the counts, read from the device.
            phase = state.seen % size  # tokens already in the current chunk
            new = counts if counts is not None else torch.full((batch,), length, device=device, dtype=torch.long)
            first = torch.minimum(new, (size - phase) % size)  # tokens that finish the current chunk
            head = int(first.max())
            chunks = -(-int((new - first).max()) // size)
            slots = head + chunks * size
            if slots == 0:  # no real token in any sequence
                return q.new_zeros(q.shape), state
            # Token j of sequence b sits in slot j up to its boundary, then in slot head + (j - first_b).
            steps = torch.arange(slots, device=device).unsqueeze(0)
            in_head = steps < first.unsqueeze(1)
            token = torch.where(in_head, steps, steps - head + first.unsqueeze(1))
            real = (in_head | (steps >= head)) & (token < new.unsqueeze(1))
            index = token.clamp(0, length - 1)
            aligned = []
            for t in streams:
                if t is None:
                    aligned.append(None)
                    continue
                gathered = _gather_time(t.transpose(1, 2), index, dim=1).transpose(1, 2)
                mask = real.view(batch, 1, slots, *([1] * (gathered.dim() - 3)))
                aligned.append(torch.where(mask, gathered, torch.zeros((), dtype=t.dtype, device=device)))
            steps = torch.arange(length, device=device).unsqueeze(0)
            token_slot = torch.where(steps < first.unsqueeze(1), steps, steps + head - first.unsqueeze(1))
            token_slot = token_slot.clamp(max=slots - 1)  # (pads beyond the real tokens read anything; dropped later)
            # Real tokens of each sequence in each piece; the state is carried from the last of them. A piece
            # completes its chunk on reaching a boundary: the head when phase + first = C, the others when full.
            counts_in = [first] + [(new - first - n * size).clamp(0, size) for n in range(chunks)]
            completed = [(first > 0) & (phase + first == size)] + [n_in == size for n_in in counts_in[1:]]
        queries, keys, values, lrs, log_ret, log_mom = aligned
        targets = values - keys if self.residual else values  # the residual memory is M(z) = z + MLP(z)

        # The head, then the chunks, each contiguous (chunk-major: no copy in every matmul; unbind, not slicing,
        # keeps the backward of the split linear in length).
        def split(t: torch.Tensor | None) -> list[torch.Tensor | None]:
            if t is None:
                return [None] * (1 + chunks)
            rest = t[:, :, head:].reshape(batch, self.num_heads, chunks, size, *t.shape[3:])
            return [t[:, :, :head], *rest.permute(2, 0, 1, *range(3, rest.dim())).contiguous().unbind(0)]

        anchors = self._anchors(q.dtype)
        num_slots = 1 if state.momentum is None else 2
        deviations = [w - a for w, a in zip(state.weights, anchors)]
        if state.momentum is None:
            running = [d.unsqueeze(2) for d in deviations]
        else:
            running = [torch.stack([d, s], dim=2) for d, s in zip(deviations, state.momentum)]
        update, lr_sum = list(state.chunk_update), state.chunk_lr
        boundary = list(state.chunk_weights)
        reads = []
        pieces = zip(split(queries), split(keys), split(targets), *(split(t) for t in (lrs, log_mom, log_ret)))
        for n, (q_n, k_n, t_n, lr_n, log_mom_n, log_ret_n) in enumerate(pieces):
            if q_n.shape[2] == 0:
                continue
            n_in, done = counts_in[n], completed[n]  # host ints and bools, or (batch,) tensors
            active = n_in > 0
            if isinstance(n_in, int):
                last = torch.full((batch, self.num_heads), n_in - 1, device=device, dtype=torch.long)
            else:
                last = (n_in - 1).clamp(min=0).view(batch, 1).expand(batch, self.num_heads)
            # A piece that continues a chunk (the head) or stops inside one also carries the chunk's own update.
            stops_inside = (active and not done) if isinstance(done, bool) else active & ~done
            continuing = n == 0 and head > 0 or _any(stops_inside)
            kappa = step_curvature(*memory_errors(boundary, k_n, t_n)[::3])
            if continuing:
                c_n = ChunkCoefficients.from_gates(lr_n, log_mom_n, log_ret_n, self.max_lr, last, lr_sum, kappa)
                stacked = [torch.cat([r, u], dim=2) for r, u in zip(running, update)]
            else:
                c_n = ChunkCoefficients.from_gates(lr_n, log_mom_n, log_ret_n, self.max_lr, last, curvature=kappa)
                stacked = running
            y, carried = chunk_update(stacked, boundary, q_n, k_n, t_n, c_n, anchors)
            reads.append(y)
            running = _select_rows(active, [x[:, :, :num_slots] for x in carried], running)
            if continuing:
                update = _select_rows(active, [x[:, :, num_slots:] for x in carried], update)
                lr_sum = _where_batch(active, lr_sum + lr_n.sum(-1), lr_sum)
            # On a boundary the chunk's update joins the state, the safeguard bounds it, and the next chunk takes its
            # gradients there.
            if _any(done):
                running = _select_rows(done, self.bound(running), running)
                update = _select_rows(done, [torch.zeros_like(u) for u in update], update)
                lr_sum = _where_batch(done, torch.zeros_like(lr_sum), lr_sum)
                boundary = _select_rows(done, [r[:, :, 0] + a for r, a in zip(running, anchors)], boundary)
        head_reads, chunk_reads = (reads[0], reads[1:]) if head else (None, reads)
        parts = [] if head_reads is None else [head_reads]
        if chunk_reads:
            parts.append(torch.stack(chunk_reads).permute(1, 2, 0, 3, 4).flatten(2, 3))
        reads = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        if self.residual:
            reads = reads + queries
        if token_slot is None:
            reads = reads[:, :, :length]
        else:
            reads = _gather_time(reads.transpose(1, 2), token_slot, dim=1).transpose(1, 2)

        new_state = NeuralMemoryState(  # contiguous, so that a live state and a reloaded snapshot compute alike
            weights=[x[:, :, 0] + a for x, a in zip(running, anchors)],
            momentum=None if state.momentum is None else [x[:, :, 1].contiguous() for x in running],
            chunk_weights=boundary,
            chunk_update=[u.contiguous() for u in update],
            chunk_lr=lr_sum,
            conv=state.conv,
            seen=state.seen + new,
            chunk_size=size,
            common_seen=None if counts is not None or state.common_seen is None else state.common_seen + length,
        )
        return reads, new_state

    def _anchors(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """``W_0`` per layer as (1, heads, d_in, d_out): what forgetting relaxes the fast weights towards."""
        return [w.to(dtype).unsqueeze(0) for w in self.initial_weights]

    def _step(
        self,
        state: NeuralMemoryState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lr: torch.Tensor,
        log_momentum: torch.Tensor | None,
        log_retention: torch.Tensor,
    ) -> tuple[torch.Tensor, NeuralMemoryState]:
        """One real token per sequence (decoding) as the plain recurrence the closed form sums: the gradient at the
        chunk's start weights, its step curvature ``kappa``, the budget scale ``n`` of the chunk so far, then the read
        ``M_W(q)``; on a chunk boundary the chunk's update joins the state, the safeguard bounds ``[D; S]`` and the
        next chunk takes its gradients there. With ``D = W - W_0`` split into the chunk's own update ``A`` (and ``B`` of ``S``) and the
        rest, and ``rho = n_before / n``:

            B = rho eta B - 2 (1 - eta) theta u / (kappa n)       S = eta (S - B_before) + B
            A = rho r A + B                                       D = r (D - A_before) + eta (S - B_before) + A

        The same arithmetic as :func:`chunk_forward` on a run of one token; cached decoding is tested against the
        full (chunked) pass for every variant.
        """
        targets = v - k if self.residual else v  # the residual memory is M(z) = z + MLP(z)
        inputs, _, _, deltas = memory_errors(state.chunk_weights, k, targets)
        theta = lr[..., 0]  # (batch, heads)
        lr_sum = state.chunk_lr + theta
        scale = 1.0 / torch.clamp(lr_sum / self.max_lr, min=1.0)  # 1 / n
        rho = (torch.clamp(state.chunk_lr / self.max_lr, min=1.0) * scale)[..., None, None]
        retention = torch.exp(log_retention)[..., None]  # (batch, heads, 1, 1)
        momentum = None if log_momentum is None else torch.exp(log_momentum)[..., None]
        step = -2.0 * theta * scale / step_curvature(inputs, deltas)[..., 0]
        if momentum is not None:
            step = step * (1.0 - momentum[..., 0, 0])
        anchors = self._anchors(q.dtype)
        deviations, momenta, updates = [], None if momentum is None else [], []
        for layer, (abar, delta) in enumerate(zip(inputs, deltas)):
            written = abar.transpose(-1, -2) @ (delta * step[..., None, None])  # the scaled rank-one step
            own = state.chunk_update[layer]
            rest = state.weights[layer] - anchors[layer] - own[:, :, 0]  # D without the chunk's own update
            if momentum is None:
                own_d = torch.addcmul(written, own[:, :, 0], rho * retention)
                updates.append(own_d.unsqueeze(2))
                deviations.append(torch.addcmul(own_d, rest, retention))
                continue
            rest_s = (state.momentum[layer] - own[:, :, 1]) * momentum
            own_s = torch.addcmul(written, own[:, :, 1], rho * momentum)
            own_d = torch.addcmul(own_s, own[:, :, 0], rho * retention)
            updates.append(torch.stack([own_d, own_s], dim=2))
            momenta.append(rest_s + own_s)
            deviations.append(torch.addcmul(rest_s + own_d, rest, retention))
        weights = [d + a for d, a in zip(deviations, anchors)]
        reads = memory_mlp(weights, q, self.residual)
        seen = state.seen + 1
        common_seen = None if state.common_seen is None else state.common_seen + 1
        boundary = seen % self.chunk_size == 0 if common_seen is None else common_seen % self.chunk_size == 0
        chunk_weights = list(state.chunk_weights)
        if _any(boundary):
            if momenta is None:
                stacked = [d.unsqueeze(2) for d in deviations]
            else:
                stacked = [torch.stack([d, s], dim=2) for d, s in zip(deviations, momenta)]
            stacked = _select_rows(boundary, self.bound(stacked), stacked)
            deviations = [x[:, :, 0] for x in stacked]
            momenta = None if momenta is None else [x[:, :, 1] for x in stacked]
            updates = _select_rows(boundary, [torch.zeros_like(u) for u in updates], updates)
            lr_sum = _where_batch(boundary, torch.zeros_like(lr_sum), lr_sum)
            weights = [d + a for d, a in zip(deviations, anchors)]
            chunk_weights = _select_rows(boundary, weights, chunk_weights)
        new_state = NeuralMemoryState(
            weights=weights,
            momentum=momenta,
            chunk_weights=chunk_weights,
            chunk_update=updates,
            chunk_lr=lr_sum,
            conv=state.conv,
            seen=seen,
            chunk_size=self.chunk_size,
            common_seen=common_seen,
        )
        return reads, new_state

    def bound(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ``max_weight_rms`` safeguard, applied to each layer's ``[W - W_0; S]`` (batch, heads, s, d_in, d_out)."""
        if self.max_weight_rms is None:
            return states
        cap = self.max_weight_rms
        bounded = []
        for state in states:
            mean_square = state.pow(2).mean(dim=(-2, -1), keepdim=True)
            over = mean_square > cap * cap
            # Branch-free (no host synchronisation): a factor of exactly 1 under the bound, so the normal range is
            # unchanged bit for bit; both branches finite (no 0 * inf in backward at a zero state).
            safe = torch.where(over, mean_square, torch.full_like(mean_square, cap * cap))
            bounded.append(state * torch.where(over, cap * safe.rsqrt(), torch.ones_like(safe)))
        return bounded

    def retrieve(
        self,
        hidden_states: torch.Tensor,
        weights: list[torch.Tensor],
        conv_tail: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read-only retrieval ``M_W(q)`` with fixed ``weights`` (no write), e.g. MAC's ``h = M*_{t-1}(q)``.

        The queries go through the same projection, causal conv + SiLU and l2-norm as in :meth:`forward`, with their
        own conv tail ``conv_tail`` (batch, conv_kernel - 1, heads * head_dim; ``None``: the start of a stream).
        Returns the memory output (shape of ``hidden_states``, zeros at masked tokens) and the new conv tail.
        """
        batch, length = self._check_inputs(hidden_states, mask)
        dtype = self.compute_dtype(hidden_states)
        inner = self.num_heads * self.head_dim
        x, counts, order = _compact(hidden_states, mask)
        conv_weight = None
        if self.conv_weight is not None:
            conv_weight = self.conv_weight[:inner]
            if conv_tail is None:
                conv_tail = x.new_zeros(batch, self.conv_kernel - 1, inner)
        # Through the module, not its weight: adapters (PEFT's LoRA) and hooks on `qkv_proj` must see every call.
        queries, new_tail = self.causal_conv(self.qkv_proj(x)[..., :inner], conv_tail, conv_weight, counts)
        queries = queries.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2).to(dtype)
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            reads = memory_mlp([w.to(dtype) for w in weights], F.normalize(queries, dim=-1), self.residual)
        return _restore(self.output(reads, x), counts, order), new_tail

    # ---------------------------------------------------------------------------------------------------- checks

    def _check_inputs(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int]:
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got {type(hidden_states).__name__}.")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must have shape (batch, seq, {self.hidden_size}), got {tuple(hidden_states.shape)}."
            )
        batch, length, _ = hidden_states.shape
        if length == 0:
            raise ValueError("hidden_states has an empty sequence dimension; pass at least one token.")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must have shape (batch, seq) = {(batch, length)}, got {shape}.")
            if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must hold only 0 and 1 (or booleans).")
        return batch, length

    def check_state(self, state: NeuralMemoryState, batch_size: int) -> None:
        """Raises ``ValueError`` when ``state`` does not belong to this configuration or batch."""
        if not isinstance(state, NeuralMemoryState):
            raise ValueError(f"state must be a NeuralMemoryState, got {type(state).__name__}.")
        expected = [(batch_size, *w.shape) for w in self.initial_weights]
        found = [tuple(w.shape) for w in state.weights]
        if found != expected:
            raise ValueError(
                f"state does not match this memory: fast weights {found}, expected {expected} "
                "(batch, heads, d_in, d_out per layer). Was it made by a memory with another configuration or batch?"
            )
        if (state.momentum is None) == self.use_momentum:
            raise ValueError(
                f"state {'lacks' if state.momentum is None else 'has'} momentum but momentum={self.use_momentum}."
            )
        if state.chunk_size != self.chunk_size:
            raise ValueError(
                f"state was made with chunk_size={state.chunk_size}, but this memory has chunk_size={self.chunk_size}."
            )
        if [tuple(w.shape) for w in state.chunk_weights] != expected:
            raise ValueError(f"state chunk_weights do not match this memory: expected {expected}.")
        slots = 2 if self.use_momentum else 1
        expected_update = [(b, h, slots, i, o) for b, h, i, o in expected]
        found_update = None if state.chunk_update is None else [tuple(u.shape) for u in state.chunk_update]
        if found_update != expected_update or state.chunk_lr is None:
            raise ValueError(
                f"state chunk_update has shapes {found_update}, expected {expected_update} (and a chunk_lr): was it "
                "made by an older version of titans-hf? Start a new stream."
            )
        if tuple(state.chunk_lr.shape) != (batch_size, self.num_heads):
            raise ValueError(
                f"state chunk_lr has shape {tuple(state.chunk_lr.shape)}, expected {(batch_size, self.num_heads)}."
            )
        expected_conv = (
            None
            if self.conv_weight is None
            else (batch_size, self.conv_kernel - 1, 3 * self.num_heads * self.head_dim)
        )
        found_conv = None if state.conv is None else tuple(state.conv.shape)
        if found_conv != expected_conv:
            raise ValueError(f"state conv tail has shape {found_conv}, expected {expected_conv}: another conv_kernel?")

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, depth={self.depth}, expansion={self.expansion}, "
            f"chunk_size={self.chunk_size}, conv_kernel={self.conv_kernel}, momentum={self.use_momentum}, "
            f"forget={self.use_forget}, max_lr={self.max_lr}, max_weight_rms={self.max_weight_rms}"
        )


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
