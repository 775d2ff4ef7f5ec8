# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""The neural memory's tensor operations, as plain functions (the module, its gates and its state are in
``neural_memory.py``).

- :func:`memory_mlp`: the memory ``M_W(z)``; :func:`memory_errors`: its inner backward by hand (eq. 12);
  :func:`step_curvature`: the normalised step of a token.
- :class:`ChunkCoefficients`: the scalars of the chunked closed form, from the gates (``segsum`` of log gates).
- :func:`chunk_forward`: a run of tokens of one chunk in closed form (reads, carried state), plain differentiable
  torch and the reference for :func:`chunk_backward`, the hand-written backward in three phases, which
  :class:`ChunkFunction` runs; :func:`chunk_update` picks between them.
- :class:`CausalConvSiLU`: the causal depthwise convolution of q, k, v.

The math is in ``docs/design.md`` §2-3. A flat sibling of ``modeling_titans.py`` that imports nothing from the package,
so that it travels with saved checkpoints for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "CausalConvSiLU",
    "ChunkCoefficients",
    "ChunkFunction",
    "ChunkScan",
    "chunk_backward",
    "chunk_forward",
    "chunk_scan",
    "chunk_update",
    "memory_errors",
    "memory_mlp",
    "safeguard_factor",
    "segsum",
    "step_curvature",
]


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
    key_side: _KeySide,
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
    key_side: _KeySide,
    c: ChunkCoefficients,
    d_gain: torch.Tensor | None,
    d_write: torch.Tensor | None,
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of ``c = coefficients.divided_by(kappa)`` (``gain_ij = gain0_ij / kappa_j``, ``write_js =
    write0_js / kappa_j``): returns the gradients of ``gain0`` and ``write0``; kappa's goes on through
    :func:`_backward_curvature` into ``d_abars`` and ``d_deltas``. Linear in ``d_gain`` and ``d_write``, so their parts
    may come in separate calls."""
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
    ) -> ChunkCoefficients:
        """From per-token gates ``theta``, ``log eta``, ``log r`` (..., C), as exp of segment sums of logs, with every
        step curvature ``kappa = 1``: :func:`chunk_forward` divides by the chunk's own (:meth:`divided_by`).

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

        def at_last(x: torch.Tensor, rows: bool = False) -> torch.Tensor:
            if last is None:
                return x[..., -1, :] if rows else x[..., -1]
            if rows:
                return x.gather(-2, last[..., None, None].expand(*last.shape, 1, x.shape[-1])).squeeze(-2)
            return x.gather(-1, last.unsqueeze(-1)).squeeze(-1)

        if log_momentum is None:
            gain = retention_decay * (-2.0 * lr).unsqueeze(-2) * scale.unsqueeze(-1)
            read, write = beta.unsqueeze(-1), at_last(gain, rows=True).unsqueeze(-1)
            transition = at_last(beta)[..., None, None]
        else:
            step = 2.0 * lr * torch.expm1(log_momentum)  # -2 g_j = -2 (1 - eta_j) theta_j (kappa_j = 1)
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

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.read, self.gain, self.write, self.transition

    def divided_by(self, curvature: torch.Tensor) -> ChunkCoefficients:
        """The coefficients of the same gates with each token's write step divided by its ``curvature`` (..., C),
        while the budget ``n`` still counts ``theta``: ``gain`` and ``write`` are linear in the steps (their column /
        row ``j``), ``read`` and ``transition`` do not depend on them. So the gates' part of a whole chunk is computed
        for all chunks at once (chunks folded into the leading dimensions), and each chunk divides by its own
        ``kappa``, known only when the chunk is reached (in :func:`chunk_forward`)."""
        return ChunkCoefficients(
            self.read, self.gain / curvature.unsqueeze(-2), self.write / curvature.unsqueeze(-1), self.transition
        )


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
        coefficients: the run's :class:`ChunkCoefficients` from the gates, divided here by each token's
            :func:`step_curvature` at the chunk's start weights.
        anchors: ``W_0`` per layer, (1, heads, d_in, d_out).

    Each layer's per-token gradient is rank one, so the pre-activation of layer ``l`` for query ``i`` is
    ``a_i W_0 + sum_s read_is a_i state_s + sum_j gain_ij (a_i . abar_j) delta_j`` (``a``: query-side input of the
    layer, ``abar, delta``: key-side input and error at the chunk's start weights), and no per-token weight is ever
    formed.

    Plain differentiable torch: autograd through it is the reference for :class:`ChunkFunction`'s hand-written
    backward. Returns the MLP part of the reads (batch, heads, chunk, head_dim), the state after the run's last
    token, and the intermediates that backward needs.
    """
    inputs, key_pre, errors, deltas = memory_errors(gradient_weights, keys, targets)
    c = coefficients.divided_by(step_curvature(inputs, deltas))
    reads, query_pre = _chunk_reads(states, inputs, deltas, c, queries, anchors)
    return reads, _chunk_carry(states, inputs, deltas, c), (key_pre, deltas[-1], query_pre)


def _chunk_reads(
    states: list[torch.Tensor],
    inputs: list[torch.Tensor],
    deltas: list[torch.Tensor],
    c: ChunkCoefficients,
    queries: torch.Tensor,
    anchors: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reads of a run (:func:`chunk_forward`), given the keys' side and the coefficients divided by the
    curvature; also the queries' pre-activations of every layer but the last."""
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
    return a, query_pre


def _chunk_carry(
    states: list[torch.Tensor], inputs: list[torch.Tensor], deltas: list[torch.Tensor], c: ChunkCoefficients
) -> list[torch.Tensor]:
    """The state after a run's last token (:func:`chunk_forward`)."""
    new_states = []
    for state, abar, delta in zip(states, inputs, deltas):
        slots, d_in, d_out = state.shape[-3:]
        carried = (c.transition @ state.flatten(-2)).view_as(state)
        # [W_C; S_C] += abar^T (write_s * delta), all slots in one matmul: (d_in, C) @ (C, s * d_out).
        scaled_errors = (delta.unsqueeze(-2) * c.write.unsqueeze(-1)).flatten(-2)
        written = (abar.transpose(-1, -2) @ scaled_errors).unflatten(-1, (slots, d_out)).transpose(-2, -3)
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


class ChunkFunction(torch.autograd.Function):
    """:func:`chunk_forward` with a hand-written backward (:func:`chunk_backward`).

    It saves only the chunk's inputs and the queries' pre-activations (recomputing the keys' side, errors and
    similarities in backward), and fuses what autograd would spread over many small ops: it is equal to autograd through
    :func:`chunk_forward` (``tests/test_neural_memory.py`` checks it in float64) with about a third of the memory.
    """

    @staticmethod
    def forward(ctx, depth, queries, keys, targets, read, gain, write, transition, *weights_and_states):
        """``weights_and_states``: the gradient weights, states and anchors, ``depth`` each."""
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
        depth = ctx.depth
        queries, keys, read, gain, write, transition, last_delta, *rest = ctx.saved_tensors
        weights, states = list(rest[:depth]), list(rest[depth : 2 * depth])
        anchors, query_pre = list(rest[2 * depth : 3 * depth]), list(rest[3 * depth :])
        with torch.autocast(device_type=device, enabled=False):
            grads = chunk_backward(
                ChunkCoefficients(read, gain, write, transition),
                weights,
                states,
                anchors,
                queries,
                keys,
                last_delta,
                query_pre,
                grad_reads,
                list(grad_states),
            )
        d_coefficients, d_weights, d_states, d_anchors, d_queries, d_keys, d_targets = grads
        return (None, d_queries, d_keys, d_targets, *d_coefficients, *d_weights, *d_states, *d_anchors)


@dataclass
class _KeySide:
    """The keys' forward and errors at the chunk's start weights (:func:`memory_errors`) and the step curvature,
    recomputed in backward."""

    inputs: list[torch.Tensor]  # abar_l
    pre_activations: list[torch.Tensor]  # pbar_l, every layer but the last
    errors: list[torch.Tensor]  # e_l, every layer but the last
    deltas: list[torch.Tensor]  # delta_l
    input_norms: list[torch.Tensor]  # |abar_l|^2
    delta_norms: list[torch.Tensor]  # |delta_l|^2
    curvature: torch.Tensor  # kappa

    def chunk(self, n: int, chunks: int) -> _KeySide:
        """Chunk ``n`` of a key side computed with ``chunks`` chunks folded into the batch (chunk-major)."""
        lists = (self.inputs, self.pre_activations, self.errors, self.deltas, self.input_norms, self.delta_norms)
        return _KeySide(*([_chunk(x, n, chunks) for x in field] for field in lists), _chunk(self.curvature, n, chunks))

    @classmethod
    def recompute(cls, weights: list[torch.Tensor], keys: torch.Tensor, last_delta: torch.Tensor) -> _KeySide:
        inputs, pre_activations = [keys], []
        for w in weights[:-1]:
            pre_activations.append(inputs[-1] @ w)
            inputs.append(F.gelu(pre_activations[-1]))
        deltas, errors = [last_delta], []
        for layer in range(len(weights) - 2, -1, -1):
            errors.append(deltas[0] @ weights[layer + 1].transpose(-1, -2))
            deltas.insert(0, torch.ops.aten.gelu_backward(errors[-1], pre_activations[layer]))
        norms = _squared_norms(inputs, deltas)
        return cls(inputs, pre_activations, errors[::-1], deltas, *norms, _curvature(*norms))


def chunk_backward(
    coefficients: ChunkCoefficients,
    weights: list[torch.Tensor],
    states: list[torch.Tensor],
    anchors: list[torch.Tensor],
    queries: torch.Tensor,
    keys: torch.Tensor,
    last_delta: torch.Tensor,
    query_pre: list[torch.Tensor],
    grad_reads: torch.Tensor | None,
    grad_states: list[torch.Tensor | None],
) -> tuple:
    """The backward of :func:`chunk_forward` by hand, in four phases: the reads (:func:`_backward_reads`), the carried
    state (:func:`_backward_carry`), the step curvature the coefficients were divided by (:func:`_backward_curvature`)
    and the keys' side (:func:`_backward_key_side`, through the errors and the keys' forward into the gradient
    weights, keys and targets). Gradients that do not flow are ``None``.

    Returns ``(d_coefficients as (read, gain, write, transition), d_weights, d_states, d_anchors, d_queries, d_keys,
    d_targets)``.
    """
    depth = len(weights)
    key_side = _KeySide.recompute(weights, keys, last_delta)
    c = coefficients.divided_by(key_side.curvature)
    # Gradients with respect to the keys' side, accumulated over the phases.
    d_abars: list[torch.Tensor | None] = [None] * depth
    d_deltas: list[torch.Tensor | None] = [None] * depth
    d_read, d_gain, d_states, d_anchors, d_queries = _backward_reads(
        c, states, anchors, queries, query_pre, key_side, grad_reads, d_abars, d_deltas
    )
    d_write, d_transition = _backward_carry(c, states, key_side, grad_states, d_states, d_abars, d_deltas)
    d_gain, d_write = _backward_divided_by(key_side, c, d_gain, d_write, d_abars, d_deltas)
    d_weights, d_keys, d_targets = _backward_key_side(weights, key_side, d_abars, d_deltas)
    d_coefficients = (d_read, d_gain, d_write, d_transition)
    return d_coefficients, d_weights, d_states, d_anchors, d_queries, d_keys, d_targets


def _backward_reads(
    c: ChunkCoefficients,
    states: list[torch.Tensor],
    anchors: list[torch.Tensor],
    queries: torch.Tensor,
    query_pre: list[torch.Tensor],
    key_side: _KeySide,
    grad_reads: torch.Tensor | None,
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> tuple:
    """Reads: ``p_l = [read * a_l] @ state_l + (similarity_l * gain) @ delta_l + a_l @ W_0,l``, ``a_{l+1} = GELU(p_l)``.

    Adds into ``d_abars`` and ``d_deltas``; returns ``(d_read, d_gain, d_states, d_anchors, d_queries)``.
    """
    depth = len(states)
    d_states: list[torch.Tensor | None] = [None] * depth
    d_anchors: list[torch.Tensor | None] = [None] * depth
    d_read = d_gain = d_queries = None
    query_inputs = [queries] + [F.gelu(p) for p in query_pre]
    d_p = grad_reads
    for layer in reversed(range(depth)):
        if d_p is None:
            break
        state, a, abar = states[layer], query_inputs[layer], key_side.inputs[layer]
        slots, d_in, d_out = state.shape[-3:]
        scaled = (a.unsqueeze(-2) * c.read.unsqueeze(-1)).flatten(-2)
        d_states[layer] = (scaled.transpose(-1, -2) @ d_p).view_as(state)
        d_scaled = (d_p @ state.flatten(-3, -2).transpose(-1, -2)).unflatten(-1, (slots, d_in))
        d_read = _accumulate(d_read, (d_scaled * a.unsqueeze(-2)).sum(-1))
        similarity = a @ abar.transpose(-1, -2)
        d_scores = d_p @ key_side.deltas[layer].transpose(-1, -2)
        d_gain = _accumulate(d_gain, d_scores * similarity)
        d_similarity = d_scores * c.gain
        d_deltas[layer] = (similarity * c.gain).transpose(-1, -2) @ d_p
        d_abars[layer] = d_similarity.transpose(-1, -2) @ a
        d_a = _baddbmm((d_scaled * c.read.unsqueeze(-1)).sum(-2), d_similarity, abar)
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
    key_side: _KeySide,
    grad_states: list[torch.Tensor | None],
    d_states: list[torch.Tensor | None],
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Carry: ``new_state = transition @ state + abar^T (write_s * delta)``.

    Adds into ``d_states``, ``d_abars`` and ``d_deltas``; returns ``(d_write, d_transition)``.
    """
    d_write = d_transition = None
    slot_writes = c.write.unsqueeze(-1)  # (..., C, s, 1)
    for layer, (state, grad) in enumerate(zip(states, grad_states)):
        if grad is None:
            continue
        slots, d_in, d_out = state.shape[-3:]
        abar, delta = key_side.inputs[layer], key_side.deltas[layer]
        d_states[layer] = _accumulate(
            d_states[layer], (c.transition.transpose(-1, -2) @ grad.flatten(-2)).view_as(state)
        )
        d_transition = _accumulate(d_transition, grad.flatten(-2) @ state.flatten(-2).transpose(-1, -2))
        grad_written = grad.transpose(-2, -3).flatten(-2)  # (..., d_in, s * d_out)
        scaled_errors = (delta.unsqueeze(-2) * slot_writes).flatten(-2)
        d_abars[layer] = _accumulate(d_abars[layer], scaled_errors @ grad_written.transpose(-1, -2))
        d_scaled = (abar @ grad_written).unflatten(-1, (slots, d_out))
        d_deltas[layer] = _accumulate(d_deltas[layer], (d_scaled * slot_writes).sum(-2))
        d_write = _accumulate(d_write, (d_scaled * delta.unsqueeze(-2)).sum(-1))
    return d_write, d_transition


def _backward_key_side(
    weights: list[torch.Tensor],
    key_side: _KeySide,
    d_abars: list[torch.Tensor | None],
    d_deltas: list[torch.Tensor | None],
) -> tuple[list[torch.Tensor | None], torch.Tensor | None, torch.Tensor | None]:
    """The keys' side: through the errors ``delta_l = GELU'(pbar_l) * e_l``, ``e_l = delta_{l+1} W_{l+1}^T``, and
    the keys' forward ``delta_{L-1} = pbar_{L-1} - targets``, ``pbar_l = abar_l W_l``, ``abar_{l+1} = GELU(pbar_l)``.

    Returns ``(d_weights, d_keys, d_targets)``: ``d_weights[l]`` is the gradient of the gradient weights ``W_l``.
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
    return d_weights, d_abars[0], d_targets


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
    states, gradient_weights, queries, keys, targets, c, anchors = inputs
    flat = (queries, keys, targets, c.read, c.gain, c.write, c.transition, *gradient_weights, *states, *anchors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
        reads, *new_states = ChunkFunction.apply(len(states), *flat)
        return reads, new_states
    reads, new_states, _ = chunk_forward(*inputs)
    return reads, new_states


def safeguard_factor(state: torch.Tensor, max_weight_rms: float) -> torch.Tensor:
    """The ``max_weight_rms`` safeguard's factor ``min(1, cap / rms)`` for each slot of a layer's state (batch, heads,
    s, d_in, d_out), as ``rsqrt(max(1, ms / cap^2))``: branch-free (no host synchronisation) and exactly 1 under the
    bound (``rsqrt(1)`` is exact), so the normal range is unchanged bit for bit; finite everywhere."""
    return (state.pow(2).mean(dim=(-2, -1), keepdim=True) * (1.0 / max_weight_rms**2)).clamp(min=1.0).rsqrt()


def _backward_safeguard(
    bounded: torch.Tensor, factor: torch.Tensor, grad: torch.Tensor, max_weight_rms: float
) -> torch.Tensor:
    """The backward of ``bounded = state * safeguard_factor(state)``, from the output and the factor (``state =
    bounded / factor``): where the factor is below 1, ``factor = (ms / cap^2)^(-1/2)`` and ``d ms = 2 state / n``."""
    state = bounded / factor
    d_factor = (grad * state).sum(dim=(-2, -1), keepdim=True)
    size = state.shape[-2] * state.shape[-1]
    coefficient = torch.where(factor < 1.0, d_factor * factor.pow(3) * (-1.0 / (size * max_weight_rms**2)), 0.0)
    return torch.addcmul(grad * factor, state, coefficient)


def _chunk(x: torch.Tensor, n: int, chunks: int) -> torch.Tensor:
    """Chunk ``n`` of a tensor whose batch dimension folds ``chunks`` chunks (chunk-major)."""
    return x.unflatten(0, (chunks, -1))[n]


#: Chunks whose reads (forward) and whose state-independent backward run at once, in :class:`ChunkScan`: enough to
#: make large matmuls, few enough to bound the extra memory of doing them at once.
SCAN_BLOCK = 8


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scan_forward(
    max_weight_rms: float | None,
    all_starts: bool,
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    coefficients: ChunkCoefficients,
    running: list[torch.Tensor],
    boundary: list[torch.Tensor],
    anchors: list[torch.Tensor],
    for_backward: bool = True,
) -> tuple:
    """:class:`ChunkScan`'s computation: the state chunk by chunk, and the reads of every :data:`SCAN_BLOCK` chunks
    at once (folded into the batch) once the state has passed them.

    Returns the reads (chunks, batch, heads, C, d), the state after the last chunk, the weights at every later chunk
    start (per layer (chunks, batch, heads, d_in, d_out); only the last, (1, ...), unless ``all_starts``) and, for the
    backward, the states entering every chunk and
    the last (per layer (chunks + 1, ...)), the safeguard's factors (per layer (chunks, ...) or ``None``), the
    queries' pre-activations and the last layer's errors (chunk-major). Without ``for_backward`` the states are
    kept for one block at a time only (the returned ones are then the last block's)."""
    chunks, depth = queries.shape[0], len(running)
    # The states entering every chunk and after the last, written in place into one tensor per layer: the block's
    # reads take a view of it, and the backward keeps it (no list to stack, no second copy). Without a backward,
    # one block's worth, reused by every block (slot 0: the state entering the block).
    states = [r.new_empty((chunks if for_backward else SCAN_BLOCK) + 1, *r.shape) for r in running]
    factors, starts = [[] for _ in running], [[] for _ in running]
    reads, query_pre, last_delta = [], [[] for _ in range(depth - 1)], []
    for lo in range(0, chunks, SCAN_BLOCK):
        block = range(lo, min(lo + SCAN_BLOCK, chunks))
        base = 0 if for_backward else lo  # chunk n's entering state is states[n - base]
        if lo == base:  # the first block, or any block without a backward: the state entering it into slot 0
            for at_layer, r in zip(states, running):
                at_layer[0] = r
        inputs_block, deltas_block, kappas = [[] for _ in running], [[] for _ in running], []
        for n in block:
            inputs, _, _, deltas = memory_errors(boundary, keys[n], targets[n])
            kappas.append(step_curvature(inputs, deltas))
            c = ChunkCoefficients(*(f[n] for f in coefficients.fields())).divided_by(kappas[-1])
            running = _chunk_carry(running, inputs, deltas, c)
            if max_weight_rms is not None:
                bounds = [safeguard_factor(x, max_weight_rms) for x in running]
                running = [x * f for x, f in zip(running, bounds)]
                for at_layer, f in zip(factors, bounds):
                    at_layer.append(f)
            boundary = [r[:, :, 0] + a for r, a in zip(running, anchors)]
            for layer, x in enumerate(running):
                states[layer][n + 1 - base] = x
                if all_starts or n == chunks - 1:
                    starts[layer].append(boundary[layer])
                inputs_block[layer].append(inputs[layer])
                deltas_block[layer].append(deltas[layer])
        # The block's reads at once: its chunks folded into the batch.
        size, fold = len(block), slice(block.start, block.stop)
        c = ChunkCoefficients(*(f[fold].flatten(0, 1) for f in coefficients.fields()))
        y, pre = _chunk_reads(
            [x[lo - base : lo - base + size].flatten(0, 1) for x in states],
            [torch.stack(x).flatten(0, 1) for x in inputs_block],
            [torch.stack(x).flatten(0, 1) for x in deltas_block],
            c.divided_by(torch.stack(kappas).flatten(0, 1)),
            queries[fold].flatten(0, 1),
            anchors,
        )
        reads.append(y.unflatten(0, (size, -1)))
        for at_layer, p in zip(query_pre, pre):
            at_layer.append(p.unflatten(0, (size, -1)))
        last_delta.append(torch.stack(deltas_block[-1]))
    saved = (states, [torch.stack(f) if f else None for f in factors])
    saved += ([_cat(p) for p in query_pre], _cat(last_delta))
    starts = [torch.stack(x) for x in starts]  # every chunk's (all_starts), else the last one only
    return _cat(reads), running, starts, *saved


class ChunkScan(torch.autograd.Function):
    """Whole chunks in a row from a chunk boundary, each closed by the safeguard (``max_weight_rms``; ``None``: off):
    the training path's loop over chunks as one function, equal to :class:`ChunkFunction` chunk after chunk
    (``tests/test_neural_memory.py`` checks values and gradients in float64).

    The forward carries the state chunk by chunk (the keys' side, the curvature and the carry need it) and reads every
    :data:`SCAN_BLOCK` chunks at once once it has passed them (a chunk's reads need only its starting state). The
    backward, block by block from the last, does at once for the block what does not wait for a later chunk's gradient
    (the keys' side, the reads, the curvature's part through the gains, the keys' side backward of those), and chunk
    by chunk, last to first, only the rest (the safeguard, the carry, the curvature's part through the writes, the
    keys' side backward of those): far fewer operations run one chunk after another than in :class:`ChunkFunction`.

    Inputs: ``queries, keys, targets`` (chunks, batch, heads, C, d); the coefficients of :class:`ChunkCoefficients`
    stacked over the chunks (from the gates; divided here by the curvature); per layer the state ``[D; S]`` before the
    first chunk, the weights at its start and ``W_0`` (``depth`` each). Outputs: the reads, the state after the last
    chunk (``depth``), the weights at every later chunk start (``depth``, (chunks, batch, heads, d_in, d_out); with
    ``all_starts=False`` only the last, (1, ...): the others are not kept).
    """

    @staticmethod
    def forward(
        ctx, depth, max_weight_rms, all_starts, queries, keys, targets, read, gain, write, transition, *tensors
    ):
        running, boundary, anchors = tensors[:depth], tensors[depth : 2 * depth], tensors[2 * depth :]
        coefficients = ChunkCoefficients(read, gain, write, transition)
        reads, running, starts, states, factors, query_pre, last_delta = _scan_forward(
            max_weight_rms,
            all_starts,
            queries,
            keys,
            targets,
            coefficients,
            list(running),
            list(boundary),
            list(anchors),
        )
        ctx.depth, ctx.max_weight_rms = depth, max_weight_rms
        ctx.has_factors = factors[0] is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            queries,
            keys,
            read,
            gain,
            write,
            transition,
            last_delta,
            *boundary,
            *anchors,
            *states,
            *query_pre,
            *(factors if ctx.has_factors else ()),
        )
        return (reads, *running, *starts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_reads, *grads):
        device = next((g.device.type for g in (grad_reads, *grads) if g is not None), "cpu")
        depth = ctx.depth
        queries, keys, read, gain, write, transition, last_delta, *rest = ctx.saved_tensors
        boundary, anchors = rest[:depth], rest[depth : 2 * depth]
        states, query_pre = rest[2 * depth : 3 * depth], rest[3 * depth : 4 * depth - 1]
        factors = rest[4 * depth - 1 :] if ctx.has_factors else None
        saved = _ScanSaved(
            ctx.max_weight_rms,
            ChunkCoefficients(read, gain, write, transition),
            queries,
            keys,
            last_delta,
            list(boundary),
            list(anchors),
            list(states),
            list(query_pre),
            None if factors is None else list(factors),
        )
        with torch.autocast(device_type=device, enabled=False):
            return (None, None, None) + _scan_backward(saved, grad_reads, list(grads[:depth]), list(grads[depth:]))


@dataclass
class _ScanSaved:
    """What :class:`ChunkScan`'s forward keeps for its backward (chunk-major tensors: chunks first)."""

    max_weight_rms: float | None
    coefficients: ChunkCoefficients  # from the gates, undivided
    queries: torch.Tensor
    keys: torch.Tensor
    last_delta: torch.Tensor  # the last layer's errors at every chunk's start weights
    boundary: list[torch.Tensor]  # the weights at the first chunk's start
    anchors: list[torch.Tensor]  # W_0
    states: list[torch.Tensor]  # [D; S] entering every chunk, then after the last (chunks + 1)
    query_pre: list[torch.Tensor]  # the queries' pre-activations, every layer but the last
    factors: list[torch.Tensor] | None  # the safeguard's factor after every chunk (None: no safeguard)


def _scan_backward(
    saved: _ScanSaved,
    grad_reads: torch.Tensor | None,
    grad_running: list[torch.Tensor | None],
    grad_starts: list[torch.Tensor | None],
) -> tuple:
    """:class:`ChunkScan`'s backward (see there), block by block of :data:`SCAN_BLOCK` chunks, last to first
    (:func:`_scan_block_backward`)."""
    depth, chunks = len(saved.states), saved.queries.shape[0]
    d_after, d_anchors, d_boundary = list(grad_running), [None] * depth, None
    blocks = []  # per block, last first: d_queries, d_keys, d_targets, d_read, d_gain, d_write, d_transition
    sizes = []  # chunks per block, first block first
    for lo in reversed(range(0, chunks, SCAN_BLOCK)):
        block = range(lo, min(lo + SCAN_BLOCK, chunks))
        grads, d_after, d_anchors, d_start = _scan_block_backward(
            block, saved, grad_reads, grad_starts, d_after, d_anchors
        )
        blocks.append(grads)
        sizes.insert(0, len(block))
        d_boundary = d_start if lo == 0 else d_boundary
    for layer, grad in enumerate(grad_starts):  # W_0 is in every output start weight too
        if grad is not None:
            d_anchors[layer] = _accumulate(d_anchors[layer], grad.sum(dim=(0, 1)).unsqueeze(0))
    d_queries, d_keys, d_targets, *d_coefficients = (_cat_optional(parts[::-1], sizes) for parts in zip(*blocks))
    return (d_queries, d_keys, d_targets, *d_coefficients, *d_after, *d_boundary, *d_anchors)


def _scan_block_backward(
    block: range,
    saved: _ScanSaved,
    grad_reads: torch.Tensor | None,
    grad_starts: list[torch.Tensor | None],
    d_after: list[torch.Tensor | None],
    d_anchors: list[torch.Tensor | None],
) -> tuple:
    """The chunks ``block`` of :func:`_scan_backward`, given ``d_after``, the gradient of the state after the block's
    last chunk: first at once for the block (the keys' side, the reads, the curvature's part through the gains and
    the keys' side backward of those), then chunk by chunk, last to first (the safeguard, the carry, the curvature's
    part through the writes and their keys' side backward). Returns the block's gradients of the chunk-major inputs,
    the gradient of the state before its first chunk, ``d_anchors`` and the gradient of the weights at its first
    chunk's start (the input ``boundary`` when the block starts at chunk 0, else already sent into the state)."""
    states, anchors, factors, max_weight_rms = saved.states, saved.anchors, saved.factors, saved.max_weight_rms
    depth, chunks, lo, size = len(states), saved.queries.shape[0], block.start, len(block)
    rows = slice(block.start, block.stop)

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
        torch.cat([b.unsqueeze(0), x[1 : block.stop, :, :, 0] + a]) if lo == 0 else x[rows, :, :, 0] + a
        for b, x, a in zip(saved.boundary, states, anchors)
    ]
    weights = [w.flatten(0, 1) for w in weights]
    key_side = _KeySide.recompute(weights, fold(saved.keys), fold(saved.last_delta))
    c = ChunkCoefficients(*(fold(f) for f in saved.coefficients.fields())).divided_by(key_side.curvature)
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
    d_anchors = [_accumulate(a, d) for a, d in zip(d_anchors, d_anchors_read)]
    d_gain, _ = _backward_divided_by(key_side, c, d_gain, None, d_abars, d_deltas)  # the gains' part
    d_weights, d_keys, d_targets = _backward_key_side(weights, key_side, d_abars, d_deltas)

    # Chunk by chunk, last to first: the gradient of the state after chunk n is what chunk n + 1 sent back.
    d_write, d_transition, d_keys_carry, d_targets_carry, d_start = [], [], [], [], None
    for n in reversed(block):
        for layer in range(depth):
            grad_start = grad_starts[layer]  # of the weights at the start of chunk n + 1, an output too
            if grad_start is not None and n >= chunks - grad_start.shape[0]:  # (only the last unless all_starts)
                d_after[layer] = _add_to_slot(
                    d_after[layer], grad_start[n - chunks + grad_start.shape[0]], states[layer][n + 1]
                )
            if factors is not None and d_after[layer] is not None:
                d_after[layer] = _backward_safeguard(
                    states[layer][n + 1], factors[layer][n], d_after[layer], max_weight_rms
                )
        key_side_n = key_side.chunk(n - lo, size)
        c_n = ChunkCoefficients(*(at(f, n) for f in c.fields()))
        d_states = [at(x, n) for x in d_states_read]
        d_abars_n: list[torch.Tensor | None] = [None] * depth
        d_deltas_n: list[torch.Tensor | None] = [None] * depth
        d_write_n, d_transition_n = _backward_carry(
            c_n, [x[n] for x in states], key_side_n, d_after, d_states, d_abars_n, d_deltas_n
        )
        d_weights_n, d_keys_n, d_targets_n = [None] * depth, None, None
        if d_write_n is not None:  # the writes' part
            _, d_write_n = _backward_divided_by(key_side_n, c_n, None, d_write_n, d_abars_n, d_deltas_n)
            weights_n = [at(w, n) for w in weights]
            d_weights_n, d_keys_n, d_targets_n = _backward_key_side(weights_n, key_side_n, d_abars_n, d_deltas_n)
        d_write.append(d_write_n)
        d_transition.append(d_transition_n)
        d_keys_carry.append(d_keys_n)
        d_targets_carry.append(d_targets_n)
        # The weights at chunk n's start: W_0 + slot 0 of the state after chunk n - 1 (n > 0), or the input.
        d_start = [_accumulate(at(d, n), d_n) for d, d_n in zip(d_weights, d_weights_n)]
        if n > 0:
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
    d_out) on slot 0 (``D``), as a new tensor."""
    total = torch.zeros_like(like) if total is None else total.clone()
    total[:, :, 0] += grad
    return total


def chunk_scan(
    max_weight_rms: float | None,
    queries: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    coefficients: ChunkCoefficients,
    running: list[torch.Tensor],
    boundary: list[torch.Tensor],
    anchors: list[torch.Tensor],
    all_starts: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Whole chunks in a row (:class:`ChunkScan`, same arguments): the reads, the state after the last chunk and the
    weights at every later chunk start (only the last unless ``all_starts``); through the autograd function when
    gradients are needed."""
    flat = (queries, keys, targets, *coefficients.fields(), *running, *boundary, *anchors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
        depth = len(running)
        reads, *rest = ChunkScan.apply(depth, max_weight_rms, all_starts, *flat)
        return reads, rest[:depth], rest[depth:]
    reads, running, starts, *_ = _scan_forward(
        max_weight_rms, all_starts, queries, keys, targets, coefficients, running, boundary, anchors, False
    )
    return reads, running, starts


def _baddbmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in one call, for (batch, heads, ...) operands."""
    batch, heads = acc.shape[:2]
    return torch.baddbmm(acc.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1)).view(batch, heads, *acc.shape[2:])
