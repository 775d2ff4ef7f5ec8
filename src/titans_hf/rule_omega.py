# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""``memory_rule="omega"``: the Omega rule of ATLAS (Behrouz et al. 2025, "ATLAS: Learning to Optimally Memorize the
Context at Test Time", §3.2, eq. 9-10) on the paper's Titans rule: the loss of step ``t`` is that of the last
``c = omega_window`` tokens, weighted by gates of the input,

    S_t = eta_t S_{t-1} - theta_t grad sum_{o=0}^{c-1} gamma_o^(t) ||M_W(k_{t-o}) - v_{t-o}||^2,    gamma_0^(t) = 1
    W_t = (1 - alpha_t) W_{t-1} + S_t

with ``gamma_o^(t) = sigmoid(x_t W_gamma + b)`` (``c - 1`` gates per token and head, 1/2 at initialisation) and
everything else as ``memory_rule="titans"`` (``c = 1`` is that rule exactly). The window spans chunk and call
boundaries (the state keeps the last ``c - 1`` keys and values). Chunked form: every gradient of a chunk, those of the
window's earlier tokens included, is taken at the chunk's start weights (``chunk_size=1``: at ``W_{t-1}``, eq. 10).

Departures: the current token's weight is fixed at 1 (its learning rate is ``theta_t``, as in Titans; the paper
gates it too, which folds into ``theta``); ATLAS's polynomial feature maps and its Muon optimiser (Atlas) are not
implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .memory_rule import Setting
from .rule_titans import TitansRule


class OmegaRule(TitansRule):
    """The Omega rule (see the module docstring): a step mixes the gradients of a window of tokens."""

    name = "omega"
    settings = {
        "omega_window": Setting(
            4, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1", "the tokens whose losses a step sums"
        )
    }

    # The largest bound of a sweep that trained without diverging (a step mixes up to c gradients; titans: 0.001).
    defaults = dict(TitansRule.defaults, max_lr=0.0003)

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, **kwargs):
        super().__init__(hidden_size, num_heads, head_dim, **kwargs)
        self.window = self.omega_window
        self.window_proj = nn.Linear(hidden_size, num_heads * (self.window - 1)) if self.window > 1 else None

    @property
    def gates(self) -> int:
        return self.window - 1

    def rule_gates(self, x: torch.Tensor) -> torch.Tensor | None:
        """``gamma_o^(t)`` for ``o = 1 .. c - 1``, (..., heads, c - 1)."""
        if self.window_proj is None:
            return None
        projected = self.window_proj(x)
        projected = projected.float() if projected.dtype in (torch.float16, torch.bfloat16) else projected
        return torch.sigmoid(projected).view(*x.shape[:-1], self.num_heads, self.window - 1)

    def reset_parameters(self, init=nn.init) -> None:
        if self.window_proj is not None:
            init.normal_(self.window_proj.weight, mean=0.0, std=0.02)
            init.zeros_(self.window_proj.bias)

    def steps(self, lr: torch.Tensor, log_momentum: torch.Tensor | None, gates: torch.Tensor | None) -> torch.Tensor:
        """Step ``t`` mixes gradient tokens ``t .. t + c - 1`` of the run's window (the ``c - 1`` before the run
        first): ``-2 theta_t gamma_o^(t)`` for the token ``o`` before it, (..., C, C + c - 1)."""
        if self.window == 1:
            return -2.0 * lr
        size, last = lr.shape[-1], self.window - 1
        weights = torch.cat([torch.ones_like(lr).unsqueeze(-1), gates], dim=-1) * (-2.0 * lr).unsqueeze(-1)
        return sum(
            F.pad(torch.diag_embed(weights[..., o], offset=last - o)[..., :size, :], (0, o))
            for o in range(self.window)
        )
