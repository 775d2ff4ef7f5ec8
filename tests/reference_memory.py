"""The slow twin of ``NeuralMemory``: one token at a time, inner gradients by autograd.

Written independently of the chunked closed form: it shares only the module's parameters (projections, gates,
``W_0``, output path) and follows the write rule literally, per head, with every gradient of a chunk taken at the
chunk-start weights (paper §3.2) and the chunk's learning-rate budget (README, "the write rule"):

    u_t   = grad_W ||M_{W_chunk_start}(k_t) - v_t||^2             (torch.autograd.grad)
    k_t   = max(1, |u_t|^2 / (4 |M_{W_chunk_start}(k_t) - v_t|^2))  (the step curvature, |.| over all layers)
    n_t   = max(1, (theta_{c+1} + ... + theta_t) / max_lr)         (c: the last chunk boundary)
    own:   Sh_t = eta_t Sh_{t-1} - (1 - eta_t) theta_t u_t / k_t    Dh_t = r_t Dh_{t-1} + Sh_t       (zero at c)
    rest:  So_t = eta_t So_{t-1}                                    Do_t = r_t Do_{t-1} + So_t       (the state at c)
    S_t   = So_t + Sh_t / n_t       W_t = W_0 + Do_t + Dh_t / n_t    y_t = M_{W_t}(q_t)

At a chunk boundary ``(Do, So) <- (W - W_0, S)``, bounded by the safeguard, and ``(Dh, Sh)`` restart at zero. Without
momentum ``eta = 0``. ``r = 1 - alpha`` pulls ``W`` back towards ``W_0`` (not towards zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mlp(weights: list[torch.Tensor], z: torch.Tensor, residual: bool) -> torch.Tensor:
    """``M_W(z)`` for one token, every head at once: ``z`` (heads, d), ``weights[l]`` (heads, d_in, d_out)."""
    a = z
    for i, w in enumerate(weights):
        a = torch.einsum("hi,hio->ho", a, w)
        if i < len(weights) - 1:
            a = F.gelu(a)
    return a + z if residual else a


def conv_silu(pre: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise convolution + SiLU, token by token: ``pre`` (length, channels), ``weight`` (channels, K)."""
    if weight is None:
        return F.silu(pre)
    kernel = weight.shape[-1]
    out = []
    for t in range(pre.shape[0]):
        acc = torch.zeros_like(pre[0])
        for i in range(kernel):
            source = t - (kernel - 1) + i
            if source >= 0:
                acc = acc + weight[:, i] * pre[source]
        out.append(acc)
    return F.silu(torch.stack(out))


def bounded(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The safeguard: each head's tensor scaled down to root-mean-square ``cap`` if above it."""
    if cap is None:
        return x
    rms = x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    return x * torch.clamp(cap / rms, max=1.0)


@torch.no_grad()
def reference_forward(memory, x: torch.Tensor, write: bool = True) -> torch.Tensor:
    """Outputs of ``memory`` on one sequence ``x`` (length, hidden), token by token."""
    heads, dim = memory.num_heads, memory.head_dim
    length = x.shape[0]
    features = conv_silu(memory.qkv_proj(x), memory.conv_weight).view(length, 3, heads, dim)
    q = F.normalize(features[:, 0], dim=-1)
    k = F.normalize(features[:, 1], dim=-1)
    v = F.normalize(features[:, 2], dim=-1)
    theta = memory.lr(x)
    eta = torch.exp(memory.log_momentum(x)) if memory.use_momentum else torch.zeros_like(theta)
    retain = torch.exp(memory.log_retention(x))

    initial = [w.detach().clone() for w in memory.initial_weights]
    rest_d = [torch.zeros_like(w) for w in initial]  # Do: W - W_0 at the chunk start, decayed
    rest_s = [torch.zeros_like(w) for w in initial]  # So
    own_d = [torch.zeros_like(w) for w in initial]  # Dh: the chunk's own update, unscaled
    own_s = [torch.zeros_like(w) for w in initial]  # Sh
    lr_sum = torch.zeros(heads, dtype=x.dtype)
    chunk_start = [w.clone() for w in initial]
    reads = []
    for t in range(length):
        h = (slice(None), None, None)
        n = torch.ones(heads, dtype=x.dtype)
        if write:
            with torch.enable_grad():
                leaves = [w.clone().requires_grad_(True) for w in chunk_start]
                error = mlp(leaves, k[t], memory.residual) - v[t]  # (heads, dim)
                grads = torch.autograd.grad(error.pow(2).sum(), leaves)
            squared = sum(g.pow(2).flatten(1).sum(-1) for g in grads)  # per head, over every layer
            curvature = torch.clamp(squared / (4 * error.pow(2).sum(-1)), min=1.0)
            lr_sum = lr_sum + theta[t]
            n = torch.clamp(lr_sum / memory.max_lr, min=1.0)
            for i, g in enumerate(grads):
                own_s[i] = eta[t][h] * own_s[i] - ((1 - eta[t]) * theta[t] / curvature)[h] * g
                own_d[i] = retain[t][h] * own_d[i] + own_s[i]
                rest_s[i] = eta[t][h] * rest_s[i]
                rest_d[i] = retain[t][h] * rest_d[i] + rest_s[i]
        weights = [w0 + d + a / n[h] for w0, d, a in zip(initial, rest_d, own_d)]
        reads.append(mlp(weights, q[t], memory.residual))
        if (t + 1) % memory.chunk_size == 0:
            # A chunk boundary: the chunk's update joins the state, the safeguard bounds it, the next chunk starts.
            for i in range(len(initial)):
                rest_d[i] = bounded(rest_d[i] + own_d[i] / n[h], memory.max_weight_rms)
                rest_s[i] = bounded(rest_s[i] + own_s[i] / n[h], memory.max_weight_rms)
                own_d[i], own_s[i] = torch.zeros_like(own_d[i]), torch.zeros_like(own_s[i])
            lr_sum = torch.zeros_like(lr_sum)
            chunk_start = [w0 + d for w0, d in zip(initial, rest_d)]
    reads = torch.stack(reads, dim=1)  # (heads, length, dim)
    return memory.output(reads.unsqueeze(0), x.unsqueeze(0))[0]
