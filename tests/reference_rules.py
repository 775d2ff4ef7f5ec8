"""Slow twins of the memory rules other than ``titans-hf`` (whose twin is ``reference_memory.py``): one token at a
time, inner gradients by autograd, each rule's update written literally from its paper's equations (and its module's
docstring for the chunked form). They share only the module's parameters (projections, gates, ``W_0``, output path)
with the code under test, and nothing with each other but the MLP, the convolution and the safeguard.

Every gradient of a chunk is taken at the weights of the chunk's start (paper §3.2); at a chunk boundary the rule's
maps apply (Moneta's normalisation; the safeguard when ``max_weight_rms`` is set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reference_memory import bounded, conv_silu, mlp


def _inputs(memory, x: torch.Tensor, unit_values: bool = False):
    """q, k, v (length, heads, dim), theta, eta (zeros without momentum), retention (length, heads), rule gates."""
    heads, dim, length = memory.num_heads, memory.head_dim, x.shape[0]
    features = conv_silu(memory.qkv_proj(x), memory.conv_weight).view(length, 3, heads, dim)
    q, k, v = F.normalize(features[:, 0], dim=-1), F.normalize(features[:, 1], dim=-1), features[:, 2]
    if unit_values:
        v = F.normalize(v, dim=-1)
    theta = memory.lr(x)
    eta = torch.exp(memory.log_momentum(x)) if memory.use_momentum else torch.zeros_like(theta)
    retain = torch.exp(memory.log_retention(x))
    return q, k, v, theta, eta, retain, memory.rule.rule_gates(x)


def _gradient(weights: list[torch.Tensor], loss) -> list[torch.Tensor]:
    """The gradient of ``loss(leaves)`` (summed over heads: every head has its own weights) by autograd."""
    with torch.enable_grad():
        leaves = [w.clone().requires_grad_(True) for w in weights]
        return list(torch.autograd.grad(loss(leaves), leaves))


def _output(memory, reads: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return memory.output(torch.stack(reads, dim=1).unsqueeze(0), x.unsqueeze(0))[0]


H = (slice(None), None, None)  # a per-head scalar broadcast over a (heads, d_in, d_out) matrix


@torch.no_grad()
def titans_reference(
    memory, x: torch.Tensor, window: int = 1, window_gates: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's rule (eq. 12-14): ``S_t = eta_t S_{t-1} - theta_t grad``, ``W_t = r_t W_{t-1} + S_t``, the
    gradient of ``||M_W(k) - v||^2`` at the chunk's start weights.

    With ``window > 1``, ATLAS's Omega rule: the loss of step ``t`` is ``sum_{o < window} gamma_o^(t) ||M_W(k_{t-o})
    - v_{t-o}||^2`` over the tokens of the stream so far, ``gamma_0 = 1`` and ``gamma_o^(t) = window_gates[t, :, o -
    1]`` (length, heads, window - 1)."""
    q, k, v, theta, eta, retain, _ = _inputs(memory, x)
    weights = [w.detach().clone() for w in memory.initial_weights]
    momentum = [torch.zeros_like(w) for w in weights]
    start, reads = weights, []
    for t in range(x.shape[0]):
        if t % memory.chunk_size == 0:
            start = [w.clone() for w in weights]

        def loss(leaves, t=t):
            total = (mlp(leaves, k[t], memory.residual) - v[t]).pow(2).sum()
            for o in range(1, min(window, t + 1)):
                error = (mlp(leaves, k[t - o], memory.residual) - v[t - o]).pow(2).sum(-1)
                total = total + (window_gates[t, :, o - 1] * error).sum()
            return total

        grads = _gradient(start, loss)
        momentum = [eta[t][H] * s - theta[t][H] * g for s, g in zip(momentum, grads)]
        weights = [retain[t][H] * w + s for w, s in zip(weights, momentum)]
        reads.append(mlp(weights, q[t], memory.residual))
        if (t + 1) % memory.chunk_size == 0:
            weights = [bounded(w, memory.max_weight_rms) for w in weights]
            momentum = [bounded(s, memory.max_weight_rms) for s in momentum]
    return _output(memory, reads, x)


def _moneta_normalised(accumulator: torch.Tensor, q: float) -> torch.Tensor:
    """``A / ||A||_q^(q - 2)`` per head, the q-norm over the whole matrix."""
    norm = accumulator.abs().pow(q).sum(dim=(1, 2), keepdim=True).pow(1.0 / q)
    return accumulator / norm.pow(q - 2.0)


@torch.no_grad()
def moneta_reference(memory, x: torch.Tensor) -> torch.Tensor:
    """MIRAS's Moneta (eq. 24-25), chunked as the paper trains it: the l_p loss ``sum (e^2 + 1e-6)^(p/2)``, the
    accumulator ``A_t = r_t A_{t-1} - theta_t grad`` (with momentum, ``+ S_t``), the weights moving with the same
    steps inside a chunk and set to ``A / ||A||_q^(q-2)`` at every chunk boundary (and at the start, ``A = W_0``)."""
    p, qn = memory.rule.moneta_p, memory.rule.moneta_q
    q, k, v, theta, eta, retain, _ = _inputs(memory, x)
    accumulator = [w.detach().clone() for w in memory.initial_weights]
    weights = [_moneta_normalised(a, qn) for a in accumulator]
    momentum = [torch.zeros_like(w) for w in weights]
    start, reads = weights, []
    for t in range(x.shape[0]):
        if t % memory.chunk_size == 0:
            start = [w.clone() for w in weights]
        grads = _gradient(
            start, lambda leaves, t=t: ((mlp(leaves, k[t], memory.residual) - v[t]).pow(2) + 1e-6).pow(p / 2).sum()
        )
        momentum = [eta[t][H] * s - theta[t][H] * g for s, g in zip(momentum, grads)]
        weights = [retain[t][H] * w + s for w, s in zip(weights, momentum)]
        accumulator = [retain[t][H] * a + s for a, s in zip(accumulator, momentum)]
        reads.append(mlp(weights, q[t], memory.residual))
        if (t + 1) % memory.chunk_size == 0:
            weights = [bounded(_moneta_normalised(a, qn), memory.max_weight_rms) for a in accumulator]
            momentum = [bounded(s, memory.max_weight_rms) for s in momentum]
            accumulator = [bounded(a, memory.max_weight_rms) for a in accumulator]
    return _output(memory, reads, x)


@torch.no_grad()
def yaad_reference(memory, x: torch.Tensor) -> torch.Tensor:
    """MIRAS's Yaad (eq. 26): per token and head, the loss ``||e||^2`` where ``||e||_2 <= delta_t`` and
    ``2 delta_t ||e||_1`` beyond, ``e = M_W(k) - v`` at the chunk's start weights; gradient descent (with momentum if
    the memory has it) and forgetting towards zero."""
    q, k, v, theta, eta, retain, gates = _inputs(memory, x)
    delta = gates[..., 0]  # (length, heads)
    weights = [w.detach().clone() for w in memory.initial_weights]
    momentum = [torch.zeros_like(w) for w in weights]
    start, reads = weights, []
    for t in range(x.shape[0]):
        if t % memory.chunk_size == 0:
            start = [w.clone() for w in weights]

        def loss(leaves, t=t):
            error = mlp(leaves, k[t], memory.residual) - v[t]  # (heads, dim)
            small = error.norm(dim=-1) <= delta[t]
            return torch.where(small, error.pow(2).sum(-1), 2.0 * delta[t] * error.abs().sum(-1)).sum()

        grads = _gradient(start, loss)
        momentum = [eta[t][H] * s - theta[t][H] * g for s, g in zip(momentum, grads)]
        weights = [retain[t][H] * w + s for w, s in zip(weights, momentum)]
        reads.append(mlp(weights, q[t], memory.residual))
        if (t + 1) % memory.chunk_size == 0:
            weights = [bounded(w, memory.max_weight_rms) for w in weights]
            momentum = [bounded(s, memory.max_weight_rms) for s in momentum]
    return _output(memory, reads, x)
