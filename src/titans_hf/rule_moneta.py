# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""``memory_rule="moneta"``: Moneta of MIRAS (Behrouz, Razaviyayn, Zhong, Mirrokni 2025, "It's All Connected", §5.3,
eq. 24-25): an ``l_p`` attentional bias with ``l_q`` retention, learned by gradient descent.

    loss      l(W; k_t, v_t) = ||M_W(k_t) - v_t||_p^p   (|x| smoothed as sqrt(x^2 + 1e-6), as the paper does)
    A_t = (1 - alpha_t) A_{t-1} - theta_t grad l(W; k_t, v_t)                                         (eq. 24)
    W_t = A_t / ||A_t||_q^(q - 2)                     (per head and layer, the entrywise q-norm of the matrix)

with ``p = moneta_p = 3`` and ``q = moneta_q = 4`` (the paper's choice), ``q`` and ``k`` l2-normalised, values as
projected, no momentum (``memory_momentum=False``: MIRAS's models use plain gradient descent; with momentum the
accumulator takes the momentum's steps).

**The chunked form** (what the paper trains with, §5.4: "we do not apply this non-linearity inside each chunk and
instead use it at the end of each chunk"): every gradient of a chunk is taken at the weights of the chunk's start; the
accumulator ``A`` is carried linearly across chunks; the normalisation ``W = A / ||A||_q^(q-2)`` is applied at chunk
boundaries only, and inside a chunk the weights move linearly from there with the same steps as ``A``
(``W_i = r W_{i-1} - theta_i grad_i``). So the state is ``[W; Acc]`` (``[W; S; Acc]`` with momentum; ``Acc`` is
``A``), ``A`` starts at the learned ``W_0`` and ``W`` at its normalisation. With ``memory_chunk_size=1`` the normalisation applies after every
token, but a token reads the weights before it (``r W_{t-1} - theta grad``), one token behind eq. 24's
``W_t = A_t / ||A_t||``.

Note on ``q = 4``: the paper derives the normalisation for ``q <= 2`` and uses it with ``q = 4``, where ``||W||_q =
||A||_q^(3 - q)``: the weights shrink as the accumulator grows and grow as it fades. Implemented as written.
"""

from __future__ import annotations

import math

import torch

from .memory_rule import ChunkCoefficients, MemoryRule, Run, Setting

#: The smoothing of |x| in the l_p loss (the paper's epsilon).
EPSILON = 1e-6


class MonetaRule(MemoryRule):
    """Moneta (see the module docstring): the ``l_p`` error and the ``l_q`` normalisation at chunk boundaries, on
    ``[W; Acc]`` (``[W; S; Acc]`` with momentum; ``Acc`` is the accumulator ``A``)."""

    name = "moneta"
    settings = {
        "moneta_p": Setting(3.0, lambda v: _number(v) and v >= 1, "a number >= 1", "the exponent of the l_p loss"),
        "moneta_q": Setting(4.0, lambda v: _number(v) and v > 1, "a number > 1", "the l_q retention's exponent"),
    }
    # max_lr: the bound of a sweep (0.1, 0.01, 0.001) with the best language modelling and finite long evaluations.
    defaults = {"max_lr": 0.1, "momentum": False, "max_weight_rms": None, "mac_memory_input": "input"}

    # ---------------------------------------------------------------------------------------------- the bias

    def error(self, residual: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        """Half the gradient of ``sum_i (e_i^2 + eps)^(p/2)``: ``(p/2) (e^2 + eps)^((p-2)/2) e``."""
        p = self.moneta_p
        return (0.5 * p) * (residual.square() + EPSILON).pow(0.5 * p - 1.0) * residual

    def error_backward(
        self, residual: torch.Tensor, params: torch.Tensor | None, d_delta: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """Elementwise: ``(p/2) (e^2 + eps)^((p-4)/2) ((p - 1) e^2 + eps)``."""
        p, square = self.moneta_p, residual.square()
        slope = (0.5 * p) * (square + EPSILON).pow(0.5 * p - 2.0) * ((p - 1.0) * square + EPSILON)
        return d_delta * slope, None

    # ---------------------------------------------------------------------------------------------- the recurrence

    def num_matrices(self) -> int:
        return super().num_matrices() + 1  # ..., and the accumulator A

    def matrix_names(self) -> tuple[str, ...]:
        return ("W", "S", "Acc") if self.momentum else ("W", "Acc")

    def initial_state(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` starts at ``W_0`` and ``W`` at its normalisation."""
        stack = weights.new_zeros(weights.shape[0], weights.shape[1], self.num_matrices(), *weights.shape[2:])
        stack[:, :, -1] = weights
        normalised = weights * self._scale(weights.unsqueeze(2)).squeeze(2)
        stack[:, :, 0] = normalised
        return stack, normalised

    def extend(self, c: ChunkCoefficients, run: Run) -> ChunkCoefficients:
        """Gradient descent's coefficients on ``[W; S]``, with ``A`` moving like ``W`` and never read."""
        read = torch.cat([c.read, torch.zeros_like(c.read[..., :1])], dim=-1)
        write = torch.cat([c.write, c.write[..., :1]], dim=-1)
        top = torch.cat([c.transition, torch.zeros_like(c.transition[..., :1])], dim=-1)
        # A's row: W's, with W's own weight moved to A's column.
        row = torch.cat([torch.zeros_like(c.transition[..., :1, :1]), c.transition[..., :1, 1:]], dim=-1)
        row = torch.cat([row, c.transition[..., :1, :1]], dim=-1)
        return ChunkCoefficients(read, c.gain, write, torch.cat([top, row], dim=-2))

    # ---------------------------------------------------------------------------------------------- boundaries

    def _scale(self, accumulator: torch.Tensor) -> torch.Tensor:
        """``||A||_q^-(q-2)`` per head (..., 1, d_in, d_out) -> (..., 1, 1, 1), from ``N = sum |A|^q`` (floored)."""
        q = self.moneta_q
        total = accumulator.abs().pow(q).sum(dim=(-2, -1), keepdim=True)
        return total.clamp(min=torch.finfo(total.dtype).tiny).pow(-(q - 2.0) / q)

    def bound(self, states: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``W = A / ||A||_q^(q-2)``, then the safeguard if set. Saves the scale (and the safeguard's factors)."""
        mapped, scales = [], []
        for x in states:
            scale = self._scale(x[:, :, -1:])
            mapped.append(torch.cat([x[:, :, -1:] * scale, x[:, :, 1:]], dim=2))
            scales.append(scale)
        bounded, factors = super().bound(mapped)
        if factors is None:
            return bounded, scales
        return bounded, [torch.cat([s, f], dim=2) for s, f in zip(scales, factors)]

    def bound_backward(self, bounded: torch.Tensor, saved: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Through the safeguard, then ``W = A s(A)``: ``dA += s dW - (q - 2) (s / N) <dW, A> |A|^(q-2) A``."""
        scale, factors = saved[:, :, :1], saved[:, :, 1:] if saved.shape[2] > 1 else None
        if factors is not None:
            grad = super().bound_backward(bounded, factors, grad)
            bounded = bounded / factors
        q, accumulator, d_weights = self.moneta_q, bounded[:, :, -1:], grad[:, :, :1]
        total = accumulator.abs().pow(q).sum(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(scale.dtype).tiny)
        inner = (d_weights * accumulator).sum(dim=(-2, -1), keepdim=True)
        d_accumulator = (
            scale * d_weights - (q - 2.0) * scale / total * inner * accumulator.abs().pow(q - 2.0) * accumulator
        )
        return torch.cat([torch.zeros_like(d_weights), grad[:, :, 1:-1], grad[:, :, -1:] + d_accumulator], dim=2)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
