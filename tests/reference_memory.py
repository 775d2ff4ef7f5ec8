"""The slow twin of ``NeuralMemory``: one token at a time, inner gradients by autograd.

Written independently of the chunked closed form: it shares only the module's parameters (projections, gates,
``W_0``, output path) and follows the paper's recurrence literally, with every gradient of a chunk taken at the
chunk-start weights (paper §3.2):

    u_t = grad_W ||M_{W_chunk_start}(k_t) - v_t||^2      (torch.autograd.grad)
    S_t = eta_t S_{t-1} - theta_t u_t
    W_t = (1 - alpha_t) W_{t-1} + S_t
    y_t = M_{W_t}(q_t)
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


@torch.no_grad()
def reference_forward(memory, x: torch.Tensor, write: bool = True) -> torch.Tensor:
    """Outputs of ``memory`` on one sequence ``x`` (length, hidden), token by token."""
    heads, dim = memory.num_heads, memory.head_dim
    length = x.shape[0]
    conv_weight = memory.conv_weight
    features = conv_silu(memory.qkv_proj(x), conv_weight).view(length, 3, heads, dim)
    q = F.normalize(features[:, 0], dim=-1)
    k = F.normalize(features[:, 1], dim=-1)
    v = features[:, 2]
    theta = memory.lr(x)
    eta = torch.exp(memory.log_momentum(x)) if memory.use_momentum else torch.zeros_like(theta)
    retain = torch.exp(memory.log_retention(x))

    weights = [w.detach().clone() for w in memory.initial_weights]
    surprise = [torch.zeros_like(w) for w in weights]
    chunk_start = [w.clone() for w in weights]
    reads = []
    for t in range(length):
        if t % memory.chunk_size == 0:
            chunk_start = [w.clone() for w in weights]
        if write:
            with torch.enable_grad():
                leaves = [w.clone().requires_grad_(True) for w in chunk_start]
                loss = (mlp(leaves, k[t], memory.residual) - v[t]).pow(2).sum()
                grads = torch.autograd.grad(loss, leaves)
            for i, g in enumerate(grads):
                h = (slice(None), None, None)
                surprise[i] = eta[t][h] * surprise[i] - theta[t][h] * g
                weights[i] = retain[t][h] * weights[i] + surprise[i]
        reads.append(mlp(weights, q[t], memory.residual))
        if (t + 1) % memory.chunk_size == 0 and memory.max_weight_rms is not None:
            # Safeguard at chunk boundaries: scale each head's weights and momentum down to max_weight_rms.
            for i in range(len(weights)):
                for tensor in (weights, surprise):
                    rms = tensor[i].pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
                    tensor[i] = tensor[i] * torch.clamp(memory.max_weight_rms / rms, max=1.0)
    reads = torch.stack(reads, dim=1)  # (heads, length, dim)
    return memory.output(reads.unsqueeze(0), x.unsqueeze(0))[0]
