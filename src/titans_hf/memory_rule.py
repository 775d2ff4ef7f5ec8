# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""The seam between the neural memory and the rule it learns by.

A memory rule (MIRAS's view, Behrouz et al. 2025: a memory is an architecture, an attentional bias, a retention gate
and an online optimiser) says, each in one place:

- **the attentional bias**: the error at the memory's output, ``delta = error(M(k) - target)``, half the gradient of
  the token's inner loss with respect to the output (``l2``: the residual itself), and its backward
  (:meth:`MemoryRule.error`, :meth:`MemoryRule.error_backward`);
- **the recurrence**: the state's matrices (fast weights, momentum, ...), what forgetting relaxes them towards, and
  the linear recurrence of a run of tokens inside a chunk as :class:`ChunkCoefficients` (momentum, retention, the
  learning-rate budget, a window of past tokens), from which both the chunked closed form and the one-token decoding
  step are computed (:meth:`MemoryRule.coefficients`);
- **the maps at chunk boundaries**: non-linear maps of the state where a chunk ends (the safeguard, ``l_q``
  normalisation), with their backward (:meth:`MemoryRule.bound`, :meth:`MemoryRule.bound_backward`).

Everything else (projections, convolution, gates, heads, padding, the chunk schedule, MAC's segment reads, the
hand-written backward of the closed form) is the driver's, in ``neural_memory.py`` and ``memory_ops.py``, and is the
same for every rule. A rule is a flat sibling module (``rule_*.py``) registered in ``rule_registry.py``.

This module also holds what the rules share: :class:`ChunkCoefficients` and :func:`linear_recurrence` (the closed
form's scalars, written once), the ``l2`` bias and the safeguard.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "ChunkCoefficients",
    "MemoryRule",
    "Run",
    "Setting",
    "check_memory_arguments",
    "linear_recurrence",
    "safeguard_factor",
    "segsum",
]


# --------------------------------------------------------------------------------------------------------------------
# The closed form's scalars
# --------------------------------------------------------------------------------------------------------------------


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums of ``x`` (..., C): ``out[..., i, j] = sum_{j < t <= i} x_t`` for ``j <= i`` and ``-inf`` above.

    Computed with a masked cumulative sum rather than a difference of cumulative sums, so that ratios of long products
    keep full precision; the upper triangle is ``-inf`` *before* any ``exp`` (``0 * inf`` would be ``nan`` in backward).
    """
    size = x.shape[-1]
    masks = _triangles.__wrapped__ if torch.compiler.is_compiling() else _triangles  # (a compiler folds them)
    above_diagonal, on_or_above_diagonal = masks(size, x.device)
    terms = x.unsqueeze(-1).expand(*x.shape, size).masked_fill(on_or_above_diagonal, 0.0)  # [.., t, j] = x_t if t > j
    return terms.cumsum(dim=-2).masked_fill(above_diagonal, -math.inf)


def _decays(log_gates: torch.Tensor) -> torch.Tensor:
    """``exp(segsum(log_gates))``: the ratios of products ``prod_{j < t <= i} gate_t`` for ``j <= i``, else 0,
    (..., C, C). A run of one token (decoding) has the single ratio 1 (an empty product), built without the masks."""
    if log_gates.shape[-1] == 1:
        return torch.ones_like(log_gates).unsqueeze(-1)
    return torch.exp(segsum(log_gates))


@functools.lru_cache(maxsize=32)
def _triangles(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the strict upper triangle and of the upper triangle with the diagonal (built once)."""
    upper = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    return upper, upper | torch.eye(size, dtype=torch.bool, device=device)


@dataclass
class ChunkCoefficients:
    """The scalars of the closed form for one run of tokens inside a chunk (leading dims: batch, heads).

    The state of a memory layer is a stack of ``s`` matrices acting like one matrix each (the rule's: e.g. ``[D; S]``,
    the fast weights' deviation from what forgetting relaxes them towards and the momentum). Every token ``j`` of the
    run has its (half) inner gradient ``u_j = abar_j^T delta_j``, taken at the chunk's start weights; a run of ``C``
    reading tokens has ``C_k >= C`` gradient tokens (``C_k = C + window - 1`` with a window of past tokens).

    - ``read`` (..., C, s): token ``i`` reads with ``anchor + sum_s read_is state_s + sum_j gain_ij u_j``;
    - ``gain`` (..., C, C_k): the chunk's own update, as above;
    - ``write`` (..., C_k, s): the weights of ``u_j`` in every matrix after the run's last token;
    - ``transition`` (..., s, s): the matrices after the run's last token as a combination of those before it.
    """

    read: torch.Tensor
    gain: torch.Tensor
    write: torch.Tensor
    transition: torch.Tensor

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.read, self.gain, self.write, self.transition

    def divided_by(self, curvature: torch.Tensor) -> ChunkCoefficients:
        """The coefficients of the same gates with each gradient token's step divided by its ``curvature``
        (..., C_k): ``gain`` and ``write`` are linear in the steps (their column / row ``j``), ``read`` and
        ``transition`` do not depend on them. So the gates' part of every whole chunk is computed at once and each
        chunk divides by its own curvature, known only when the chunk is reached (in the closed form)."""
        return ChunkCoefficients(
            self.read, self.gain / curvature.unsqueeze(-2), self.write / curvature.unsqueeze(-1), self.transition
        )


def linear_recurrence(
    steps: torch.Tensor,
    log_momentum: torch.Tensor | None,
    log_retention: torch.Tensor,
    last: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> ChunkCoefficients:
    """The closed form of ``S_t = eta_t S_{t-1} + step_t``, ``D_t = r_t D_{t-1} + S_t`` over a run of tokens (the
    momentum and retention recurrence every rule shares; ``D_t = r_t D_{t-1} + step_t`` without momentum), as
    :class:`ChunkCoefficients` on ``[D; S]`` (``[D]``), exp of segment sums of the log gates.

    Args:
        steps: each token's step as a multiple of its own half gradient, (..., C) (``step_t = steps_t u_t``); or, a
            step mixing several gradient tokens (a window of past tokens), (..., C, C_k): ``step_t = sum_j
            steps_tj u_j``.
        log_momentum, log_retention: ``log eta`` and ``log r`` per token (..., C); ``log_momentum`` ``None``: no
            momentum.
        last: (``steps.shape[:-1]``, int64) the token after which the state is carried (default: the last): tokens
            after it must not move the state (with momentum, ``D_t = r D_{t-1} + S_t`` moves ``D`` even where
            nothing is written), so a run shorter than its positions in the layout is carried from its own last token.
        scale: (..., C) a factor of every step of the run up to token ``i`` seen from token ``i`` (the
            learning-rate budget's ``1 / n_i``, see ``rule_titans_hf.py``), or ``None``.
    """
    window = steps.dim() == log_retention.dim() + 1
    if log_retention.shape[-1] == 1 and not torch.is_grad_enabled():  # a decoding step: fewer operations
        return _one_token(steps, log_momentum, log_retention, scale, window)
    retention_decay = _decays(log_retention)  # beta_i / beta_l for l <= i, else 0
    beta = torch.exp(torch.cumsum(log_retention, dim=-1))

    def at_last(x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        if last is None:
            return x[..., -1, :] if rows else x[..., -1]
        if rows:
            return x.gather(-2, last[..., None, None].expand(*last.shape, 1, x.shape[-1])).squeeze(-2)
        return x.gather(-1, last.unsqueeze(-1)).squeeze(-1)

    def mix(decay: torch.Tensor) -> torch.Tensor:
        """``decay @ diag(steps)`` (or ``decay @ steps`` with a window): the decays times each token's step."""
        return decay @ steps if window else decay * steps.unsqueeze(-2)

    def scaled(x: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
        return x if factor is None else x * factor.unsqueeze(-1)

    last_scale = None if scale is None else at_last(scale)
    if log_momentum is None:
        gain = scaled(mix(retention_decay), scale)
        read, write = beta.unsqueeze(-1), at_last(gain, rows=True).unsqueeze(-1)
        return ChunkCoefficients(read, gain, write, at_last(beta)[..., None, None])
    momentum_decay = _decays(log_momentum)  # m_i / m_j for j <= i, else 0
    m = torch.exp(torch.cumsum(log_momentum, dim=-1))
    gain = scaled(mix(retention_decay @ momentum_decay), scale)
    f = (retention_decay @ m.unsqueeze(-1)).squeeze(-1)
    read = torch.stack([beta, f], dim=-1)
    last_decay = at_last(momentum_decay, rows=True)
    write_s = scaled((last_decay.unsqueeze(-2) @ steps).squeeze(-2) if window else last_decay * steps, last_scale)
    write = torch.stack([at_last(gain, rows=True), write_s], dim=-1)
    zero = torch.zeros_like(at_last(m))
    transition = torch.stack(
        [torch.stack([at_last(beta), at_last(f)], -1), torch.stack([zero, at_last(m)], -1)], dim=-2
    )
    return ChunkCoefficients(read, gain, write, transition)


@dataclass
class Run:
    """What a rule's :meth:`MemoryRule.extend` may need of the run: the learning rates of the chunk's tokens before
    it, summed (``None``: a run from a chunk boundary), the budget's scale and the token the state is carried from."""

    lr_before: torch.Tensor | None
    scale: torch.Tensor | None
    last: torch.Tensor | None


def _one_token(
    steps: torch.Tensor,
    log_momentum: torch.Tensor | None,
    log_retention: torch.Tensor,
    scale: torch.Tensor | None,
    window: bool,
) -> ChunkCoefficients:
    """:func:`linear_recurrence` of a run of one token: every decay is an empty product (1) and every cumulative sum
    the gate itself, so ``beta = r``, ``m = f = eta`` and the gain and writes are the (scaled) steps: the values the
    general form computes for one token, bit for bit (``x * 1`` and a 1 x 1 product with 1 are exact), in fewer
    operations (a decoding step runs it once per memory layer). Without gradients only: autograd through the two
    graphs would sum a gradient's terms in another order."""
    beta = torch.exp(log_retention)
    gain = steps if window else steps.unsqueeze(-2)  # (..., 1, C_k)
    gain = gain if scale is None else gain * scale.unsqueeze(-1)
    if log_momentum is None:
        return ChunkCoefficients(beta.unsqueeze(-1), gain, gain[..., 0, :].unsqueeze(-1), beta[..., None])
    m = torch.exp(log_momentum)
    read = torch.stack([beta, m], dim=-1)
    write = torch.stack([gain[..., 0, :], gain[..., 0, :]], dim=-1)
    transition = torch.stack([torch.cat([beta, m], -1), torch.cat([torch.zeros_like(m), m], -1)], dim=-2)
    return ChunkCoefficients(read, gain, write, transition)


# --------------------------------------------------------------------------------------------------------------------
# Settings and their checks (one place for the memory's and the config's)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A rule-specific setting: a config field of that name (``TitansConfig(memory_rule=..., <name>=...)``)."""

    default: Any
    check: Callable[[Any], bool]
    allowed: str  # what is allowed, for the error message
    doc: str


def _is_int(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_memory_arguments(prefix: str = "", **arguments) -> None:
    """Raises ``ValueError`` naming the first invalid memory argument and what is allowed: the one place where the
    memory's settings are checked, for :class:`~neural_memory.NeuralMemory` and ``TitansConfig`` alike (``prefix``:
    ``"memory_"`` names the config's fields). Checks the arguments given; ``rule``'s own settings are checked by
    :meth:`MemoryRule.check_settings`."""
    checks = {
        "hidden_size": (lambda v: _is_int(v), "an integer >= 1"),
        "num_heads": (lambda v: _is_int(v), "an integer >= 1"),
        "head_dim": (lambda v: _is_int(v), "an integer >= 1"),
        "depth": (lambda v: _is_int(v), "an integer >= 1"),
        "expansion": (lambda v: _is_int(v), "an integer >= 1"),
        "chunk_size": (lambda v: _is_int(v), "an integer >= 1"),
        "conv_kernel": (lambda v: _is_int(v, 0), "an integer >= 0 (0 or 1: no convolution)"),
        "momentum": (lambda v: isinstance(v, bool), "True or False"),
        "forget": (lambda v: isinstance(v, bool), "True or False"),
        "max_lr": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        "max_weight_rms": (
            lambda v: v is None or _is_number(v) and v > 0,
            "None (off), a finite number > 0, or 'auto' (the rule's default)",
        ),
    }
    for name, value in arguments.items():
        check, allowed = checks[name]
        if not check(value):
            raise ValueError(f"{prefix}{name} must be {allowed}, got {value!r}.")


# --------------------------------------------------------------------------------------------------------------------
# The safeguard (a map at chunk boundaries any rule may use)
# --------------------------------------------------------------------------------------------------------------------


def safeguard_factor(state: torch.Tensor, max_weight_rms: float) -> torch.Tensor:
    """The ``max_weight_rms`` safeguard's factor ``min(1, cap / rms)`` for each matrix of a layer's state (batch,
    heads, s, d_in, d_out), as ``rsqrt(max(1, ms / cap^2))``: branch-free (no host synchronisation) and exactly 1
    under the bound (``rsqrt(1)`` is exact), so the normal range is unchanged bit for bit; finite everywhere."""
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


# --------------------------------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------------------------------


class MemoryRule(nn.Module):
    """A memory rule: what the neural memory's driver asks of it (see the module docstring). The base class is the
    ``l2`` attentional bias with no map at chunk boundaries but the optional safeguard; rules override what differs.

    Class attributes a rule sets:

    - ``name``: its ``memory_rule`` value; ``settings``: its own config fields (:class:`Setting`); ``defaults``: the
      values it gives to the memory's shared settings left unset (``max_lr``, ``momentum``, ``max_weight_rms``, and
      the decoder's ``mac_memory_input``).
    - ``unit_values``: the values are l2-normalised like the queries and keys (else used as projected).
    - ``anchored``: forgetting relaxes the fast weights towards their learned initial value ``W_0`` (else towards
      zero): the state's first matrix is read as ``W - W_0`` by the closed form.
    - ``budget``: the state also keeps the current chunk's own update apart (``[A; B]``), which
      :meth:`coefficients` rescales with ``lr_before`` (the chunk's learning-rate budget).
    - ``curvature``: each token's step is divided by its step curvature (computed by the driver at the chunk's
      start weights).

    An instance has ``gates`` (rule-specific gates per token and head, :meth:`rule_gates`, e.g. a window's weights),
    ``window`` (gradient tokens per step: the step of token ``t`` mixes the gradients of tokens ``t - window + 1 ..
    t``, taken at the chunk's start weights; 1 for most rules; a rule with a window has no error parameters) and the
    shared settings it was built with (``max_lr``, ``momentum``, ``max_weight_rms``).
    """

    name: ClassVar[str] = ""
    settings: ClassVar[dict[str, Setting]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    unit_values: ClassVar[bool] = False
    anchored: ClassVar[bool] = False
    budget: ClassVar[bool] = False
    curvature: ClassVar[bool] = False

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        max_lr: float,
        momentum: bool,
        max_weight_rms: float | None,
        **settings,
    ):
        super().__init__()
        self.check_settings(settings)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.max_lr = float(max_lr)
        self.momentum = momentum
        self.max_weight_rms = None if max_weight_rms is None else float(max_weight_rms)
        for name, setting in self.settings.items():
            setattr(self, name, settings.get(name, setting.default))
        self.window = 1

    def spec(self) -> list[float]:
        """What the closed form's kernels need of this rule, as numbers (the schema of an opaque operation for
        ``torch.compile`` takes no objects): the shared settings and the rule's own, in order. Inverse:
        :meth:`from_spec`."""
        cap = 0.0 if self.max_weight_rms is None else self.max_weight_rms  # (0: off; a cap is > 0)
        return [self.max_lr, float(self.momentum), cap] + [float(getattr(self, name)) for name in self.settings]

    @classmethod
    @functools.lru_cache(maxsize=64)
    def from_spec(cls, spec: tuple[float, ...]) -> MemoryRule:
        """A rule built from :meth:`spec` (its own parameters, if any, are unused by the kernels), cached."""
        max_lr, momentum, cap, *values = spec
        own = {name: type(setting.default)(v) for (name, setting), v in zip(cls.settings.items(), values)}
        return cls(1, 1, 1, max_lr=max_lr, momentum=bool(momentum), max_weight_rms=cap or None, **own)

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        """Raises ``ValueError`` for an unknown or invalid rule setting, naming what is allowed."""
        for name, value in settings.items():
            if name not in cls.settings:
                known = ", ".join(cls.settings) or "none"
                raise ValueError(f"{name} is not a setting of memory_rule={cls.name!r} (its settings: {known}).")
            setting = cls.settings[name]
            if not setting.check(value):
                raise ValueError(f"{name} ({setting.doc}) must be {setting.allowed}, got {value!r}.")

    def extra_repr(self) -> str:
        own = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.settings)
        return f"{self.name}" + (f", {own}" if own else "")

    # ---------------------------------------------------------------------------------------------- parameters

    @property
    def gates(self) -> int:
        """Rule-specific gates per token and head (0: none)."""
        return 0

    def rule_gates(self, x: torch.Tensor) -> torch.Tensor | None:
        """The rule-specific gates of every token, (..., heads, gates) from the memory's input ``x`` (..., hidden)."""
        return None

    def reset_parameters(self, init=nn.init) -> None:
        """Initialises the rule's own parameters, if any (``init``: ``torch.nn.init`` or Transformers')."""

    # ---------------------------------------------------------------------------------------------- the bias

    def error_params(self, gates: torch.Tensor | None) -> torch.Tensor | None:
        """What of the rule gates (..., C, gates) the error needs per gradient token (..., C, p), or ``None``."""
        return None

    def error(self, residual: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        """``delta``: half the gradient of the inner loss with respect to the memory's output, from the residual
        ``M(k) - target`` (..., C, d). ``l2`` (``||M(k) - v||^2``): the residual itself."""
        return residual

    def error_backward(
        self, residual: torch.Tensor, params: torch.Tensor | None, d_delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backward of :meth:`error`: the gradients of the residual and of ``params``."""
        return d_delta, None

    # ---------------------------------------------------------------------------------------------- the recurrence

    def num_matrices(self) -> int:
        """Matrices the recurrence carries per memory layer (``[D; S]``: 2 with momentum, ``[D]``: 1)."""
        return 2 if self.momentum else 1

    def matrix_names(self) -> tuple[str, ...]:
        """The names of the state's matrices between calls: the carried ones (``W`` first), then, with a budget, the
        chunk's own update of each (``A`` of ``W``, ``B`` of ``S``)."""
        carried = ("W", "S")[: self.num_matrices()]
        return carried + (("A", "B")[: len(carried)] if self.budget else ())

    def initial_state(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The state's matrices before the first token, from ``W_0`` expanded over the batch (batch, heads, d_in,
        d_out): (batch, heads, matrices, d_in, d_out), the fast weights first and zeros after; and the weights where
        the first chunk's gradients are taken (``W_0``)."""
        stack = weights.new_zeros(weights.shape[0], weights.shape[1], len(self.matrix_names()), *weights.shape[2:])
        stack[:, :, 0] = weights
        return stack, weights

    def steps(self, lr: torch.Tensor, log_momentum: torch.Tensor | None, gates: torch.Tensor | None) -> torch.Tensor:
        """Each token's step as a multiple of its half gradient (..., C), or a window's mixing (..., C, C_k).
        Gradient descent with the learning rate ``theta``: ``-2 theta``."""
        return -2.0 * lr

    def coefficients(
        self,
        lr: torch.Tensor,
        log_momentum: torch.Tensor | None,
        log_retention: torch.Tensor,
        gates: torch.Tensor | None,
        last: torch.Tensor | None = None,
        lr_before: torch.Tensor | None = None,
    ) -> ChunkCoefficients:
        """The run's :class:`ChunkCoefficients` from its per-token gates ``theta``, ``log eta``, ``log r`` (..., C)
        and rule gates (..., C, gates), on the carried matrices: :func:`linear_recurrence` of :meth:`steps`, scaled
        by :meth:`budget` and completed by :meth:`extend`. ``lr_before`` (the learning rates of the chunk's tokens
        before this run, summed) is given for a run that continues a chunk, with a budget."""
        run = Run(lr_before, self.budget_scale(lr, lr_before), last)
        c = linear_recurrence(self.steps(lr, log_momentum, gates), log_momentum, log_retention, last, run.scale)
        return self.extend(c, run)

    def budget_scale(self, lr: torch.Tensor, lr_before: torch.Tensor | None) -> torch.Tensor | None:
        """A factor of every step of the run up to token ``i``, seen from token ``i`` (..., C); ``None``: none."""
        return None

    def extend(self, c: ChunkCoefficients, run: Run) -> ChunkCoefficients:
        """The coefficients on the rule's own matrices beyond ``[D; S]`` (here none)."""
        return c

    # ---------------------------------------------------------------------------------------------- boundaries

    def bound(self, states: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The maps at a chunk boundary, applied to each layer's carried matrices (batch, heads, s, d_in, d_out):
        here the ``max_weight_rms`` safeguard (scales each matrix down to that root-mean-square if above it; ``None``:
        off). Returns the new matrices and, per layer, what :meth:`bound_backward` needs (``None``: nothing was
        done)."""
        if self.max_weight_rms is None:
            return states, None
        factors = [safeguard_factor(s, self.max_weight_rms) for s in states]
        return [s * f for s, f in zip(states, factors)], factors

    def bound_backward(self, bounded: torch.Tensor, saved: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
        """The backward of :meth:`bound` for one layer, from its output ``bounded`` and what it saved."""
        if saved is None:
            return grad
        return _backward_safeguard(bounded, saved, grad, self.max_weight_rms)
