# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""``memory_rule="yaad"``: Yaad of MIRAS (Behrouz, Razaviyayn, Zhong, Mirrokni 2025, "It's All Connected", §5.3,
eq. 26): a Huber attentional bias whose threshold is a gate of the input, with the forget gate, learned by gradient
descent.

    e_t = M_W(k_t) - v_t
    W_t = (1 - alpha_t) W_{t-1} - theta_t grad ||e_t||^2            if ||e_t||_2 <= delta_t      (the l2 branch)
    W_t = (1 - alpha_t) W_{t-1} - theta_t grad 2 delta_t ||e_t||_1  otherwise                   (the l1 branch)

with ``delta_t = softplus(x_t W_delta + b)`` per token and head (at initialisation ``yaad_threshold * sqrt(head_dim)``,
about the median error of a fresh memory), ``q`` and ``k`` l2-normalised, values as projected, no momentum (MIRAS's
models use plain gradient descent; ``memory_momentum=True`` adds it), retention towards zero. Every gradient of a
chunk is taken at the chunk's start weights (the paper's §5.4); the branch is chosen per token by the norm of its
error there (the paper's "masking based on ||M(k_t) - v_t|| <= delta_t").

Departure: the paper writes the l1 branch as ``eta_t delta_t grad l1`` next to ``eta_t grad l2``; here the l1 branch
is the gradient of ``2 delta ||e||_1`` next to that of ``||e||^2`` (eq. 12's loss): for a one-dimensional error the two
gradients, ``2 e`` and ``2 delta sign(e)``, meet at the switch (Huber's loss). Against the paper's, the l1 branch's
step is twice as large (a factor ``delta`` cannot absorb: it is also the threshold).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .memory_rule import MemoryRule, Setting


class YaadRule(MemoryRule):
    """Yaad (see the module docstring): its gate ``delta`` is the error's parameter of every token."""

    name = "yaad"
    settings = {
        "yaad_threshold": Setting(
            0.5,
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
            "a finite number > 0",
            "the Huber threshold delta at initialisation, in units of sqrt(head_dim)",
        )
    }
    # max_lr: the bound of a sweep (0.1, 0.01, 0.001) with the best language modelling and finite long evaluations.
    defaults = {"max_lr": 0.01, "momentum": False, "max_weight_rms": None, "mac_memory_input": "input"}

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, **kwargs):
        super().__init__(hidden_size, num_heads, head_dim, **kwargs)
        self.threshold_proj = nn.Linear(hidden_size, num_heads)

    @property
    def gates(self) -> int:
        return 1

    def rule_gates(self, x: torch.Tensor) -> torch.Tensor:
        """``delta_t = softplus(x W_delta + b)``, (..., heads, 1), as ``logaddexp(., 0)`` (torch 2.13's shape function
        of softplus's backward breaks ``torch.compile``)."""
        projected = self.threshold_proj(x)
        projected = projected.float() if projected.dtype in (torch.float16, torch.bfloat16) else projected
        return torch.logaddexp(projected, torch.zeros_like(projected)).unsqueeze(-1)

    def reset_parameters(self, init=nn.init) -> None:
        initial = self.yaad_threshold * math.sqrt(self.head_dim)
        init.normal_(self.threshold_proj.weight, mean=0.0, std=0.02)
        init.constant_(self.threshold_proj.bias, math.log(math.expm1(initial)))  # softplus^-1

    # ---------------------------------------------------------------------------------------------- the bias

    def error_params(self, gates: torch.Tensor | None) -> torch.Tensor | None:
        return gates

    def error(self, residual: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        """Half the gradient of the Huber loss: ``e`` where ``||e|| <= delta``, ``delta sign(e)`` beyond."""
        small = residual.norm(dim=-1, keepdim=True) <= params
        return torch.where(small, residual, params * torch.sign(residual))

    def error_backward(
        self, residual: torch.Tensor, params: torch.Tensor | None, d_delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The l2 branch passes the gradient to the residual; the l1 branch to the threshold (``sign(e)`` is flat)."""
        small = residual.norm(dim=-1, keepdim=True) <= params
        d_residual = torch.where(small, d_delta, 0.0)
        d_params = torch.where(small, 0.0, (d_delta * torch.sign(residual)).sum(-1, keepdim=True))
        return d_residual, d_params
