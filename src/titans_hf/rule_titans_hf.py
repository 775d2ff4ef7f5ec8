# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""``memory_rule="titans-hf"`` (the default): the paper's write rule (eq. 13-14) with the changes that make it learn at
its default settings, each measured (``docs/design.md`` §2, ``benchmarks/README.md``, "The write rule"):

    g_t = (1 - eta_t) theta_t / kappa_t                          momentum as an average, the step curvature kappa
    n_t = max(1, (theta over the chunk so far) / max_lr)         the chunk's learning-rate budget
    S_t = eta_t S_{t-1} - 2 g_t u_t                              (every step of the current chunk divided by n_t at t)
    W_t - W_0 = (1 - alpha_t) (W_{t-1} - W_0) + S_t              forgetting relaxes towards the learned W_0

with ``u_t`` half the gradient of ``||M(k_t) - v_t||^2`` at the chunk's start weights, unit values (``v``
l2-normalised like ``q`` and ``k``), and the safeguard at every chunk boundary (``memory_max_weight_rms``, 1.0).
Against the paper: retention towards ``W_0`` (not zero), the budget, momentum as an average, unit values, the step
curvature; under MAC it writes the segment's input (``mac_memory_input="input"``), not ``y``.
"""

from __future__ import annotations

import torch

from .memory_rule import ChunkCoefficients, MemoryRule, Run


class TitansHFRule(MemoryRule):
    """The default rule (see the module docstring). The state is ``[W; S; A; B]`` (``[W; A]`` without momentum):
    ``A`` (``B``) is the part of ``W - W_0`` (``S``) the current chunk's tokens wrote, kept apart because the budget
    of a later token of the chunk rescales it (``n_p / n_i``)."""

    name = "titans-hf"
    defaults = {"max_lr": 1.0, "momentum": True, "max_weight_rms": 1.0, "mac_memory_input": "input"}
    unit_values = True
    anchored = True
    budget = True
    curvature = True

    def steps(self, lr: torch.Tensor, log_momentum: torch.Tensor | None, gates: torch.Tensor | None) -> torch.Tensor:
        """``-2 g_t`` before the curvature: ``-2 (1 - eta_t) theta_t`` (momentum as an average), ``-2 theta_t``
        without momentum."""
        return -2.0 * lr if log_momentum is None else 2.0 * lr * torch.expm1(log_momentum)

    def budget_scale(self, lr: torch.Tensor, lr_before: torch.Tensor | None) -> torch.Tensor:
        """``1 / n_i``: the steps of the chunk up to token ``i`` share a learning rate of at most ``max_lr``."""
        before = 0.0 if lr_before is None else lr_before.unsqueeze(-1)
        so_far = lr if lr.shape[-1] == 1 else torch.cumsum(lr, dim=-1)  # (one token: the same value)
        return 1.0 / torch.clamp((before + so_far) / self.max_lr, min=1.0)

    def extend(self, c: ChunkCoefficients, run: Run) -> ChunkCoefficients:
        """On ``[D; S]`` for a run from a chunk boundary (``run.lr_before`` ``None``), on ``[D; S; A; B]`` for a run that
        continues a chunk or may stop inside one: the chunk's earlier update ``[A; B]`` evolves like ``[D; S]`` and
        shrinks by ``rho_i = n_p / n_i`` as the budget fills: read ``[r, (rho - 1) r]``, transition ``[[T, (rho_L -
        1) T], [0, rho_L T]]``, write ``[w, w]``."""
        if run.lr_before is None:
            return c
        rho = torch.clamp(run.lr_before / self.max_lr, min=1.0).unsqueeze(-1) * run.scale  # n_p / n_i
        last = rho[..., -1] if run.last is None else rho.gather(-1, run.last.unsqueeze(-1)).squeeze(-1)
        rho_last = last[..., None, None]
        read = torch.cat([c.read, (rho - 1).unsqueeze(-1) * c.read], dim=-1)
        top = torch.cat([c.transition, (rho_last - 1) * c.transition], dim=-1)
        bottom = torch.cat([torch.zeros_like(c.transition), rho_last * c.transition], dim=-1)
        return ChunkCoefficients(read, c.gain, torch.cat([c.write, c.write], dim=-1), torch.cat([top, bottom], dim=-2))
