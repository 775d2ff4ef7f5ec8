# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""``memory_rule="titans"``: the paper's write rule, literally (Behrouz, Zhong, Mirrokni 2024, eq. 12-14):

    loss      l(W; k_t, v_t) = ||M_W(k_t) - v_t||^2                 (eq. 12, the gradient at the chunk's start, §3.2)
    momentum  S_t = eta_t S_{t-1} - theta_t grad l                   (eq. 14)
    retention W_t = (1 - alpha_t) W_{t-1} + S_t                      (eq. 13: forgetting relaxes towards zero)

with ``q`` and ``k`` l2-normalised (eq. 11; the values as projected), no learning-rate budget, no step curvature, no
safeguard (``memory_max_weight_rms=None``), and MAC writing its attention output ``y`` (``mac_memory_input=
"attention"``, eq. 24, normalised like every memory input).

Where the paper leaves a choice open, the same choices as every rule: the gates are ``theta_t = max_lr *
sigmoid(.)``, ``eta_t = sigmoid(.)``, ``1 - alpha_t = sigmoid(.)``, linear maps of the input per head; the memory
starts from learned weights ``W_0``; at initialisation ``theta = max_lr / 2``, ``eta = 0.9`` and the retention's
half-lives are spread over the heads (``docs/design.md`` §2.6). ``max_lr`` defaults to 0.001 (the paper gives no
value): with no budget a chunk of ``C`` tokens sums ``C`` steps taken at the same weights, so the stable learning rate
shrinks with the chunk; 0.001 is the largest bound of a sweep (0.1, 0.01, 0.003, 0.001) that trained a MAG without
diverging at chunk sizes 8 and 16 (``benchmarks/README.md``, "Memory rules").
"""

from __future__ import annotations

from .memory_rule import MemoryRule


class TitansRule(MemoryRule):
    """The paper's rule (see the module docstring): the base class's gradient descent with momentum and forgetting,
    on ``[W; S]`` (``[W]`` without momentum), ``W`` relaxing towards zero."""

    name = "titans"
    defaults = {"max_lr": 0.001, "momentum": True, "max_weight_rms": None, "mac_memory_input": "attention"}
