# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Neural long-term memory of Titans (Behrouz, Zhong, Mirrokni 2024, §3.1), in exact chunked parallel form.

The memory is a small MLP ``M`` per head whose weights are a recurrent state, trained while reading by an online
optimiser on an inner loss of the keys and values (paper eq. 12-14), and read with the queries, ``y_t = M_{W_t}(q_t)``
(eq. 15). How it learns is its **rule** (``memory_rule.py``: the attentional bias, the recurrence, the maps at chunk
boundaries; one flat module per rule, ``rule_*.py``): the default ``titans-hf`` is the paper's rule with the changes
that make it learn at its default settings (``docs/design.md`` §2), ``titans`` the paper's literally, and the family
that generalised it (MIRAS, ATLAS) beside them.

Inside a chunk of ``chunk_size`` tokens every gradient is taken at the chunk-start weights (mini-batch gradient
descent, paper §3.2). The outputs of a whole chunk then have a closed (dual) form that never materialises per-token
weights; see :func:`~memory_ops.chunk_forward` and ``docs/design.md`` §3. ``chunk_size=1`` is exact online learning.

This file holds the module (the driver: projections, conv, gates, heads, padding, the chunk schedule, MAC's segment
reads), its state and the schedule; the tensor operations (the MLP and its inner backward, the closed form's forward
and hand-written backward) are plain functions in ``memory_ops.py``. All are flat siblings of ``modeling_titans.py``
with relative imports only, so that they travel with saved checkpoints for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .memory_ops import CausalConvSiLU, KeySide, chunk_scan, chunk_update, fast_weights, memory_mlp
from .memory_rule import MemoryRule, check_memory_arguments
from .rule_registry import rule_class

__all__ = [
    "BatchTensors",
    "MemoryOutput",
    "NeuralMemory",
    "NeuralMemoryState",
    "SegmentReads",
    "TokenPacking",
    "compaction_order",
]


# --------------------------------------------------------------------------------------------------------------------
# Small functional pieces
# --------------------------------------------------------------------------------------------------------------------


def compaction_order(real: torch.Tensor) -> torch.Tensor:
    """Per row, the indices that move the ``real`` positions to the front in their original order (a stable sort)."""
    return torch.argsort((~real).to(torch.int8), dim=1, stable=True)


def _gather_time(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.gather(dim, index)`` with ``index`` (batch, length) broadcast over every other dimension of ``x``."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    expanded = list(x.shape)
    expanded[dim] = index.shape[1]
    return x.gather(dim, index.view(shape).expand(expanded))


@dataclass
class TokenPacking:
    """Each row's real tokens moved to the front in their order (a stable sort), and back: how the layers and the
    memory work on real tokens alone. ``order`` (batch, seq) and ``counts`` (batch,) are ``None`` when every token
    is real (then packing is the identity)."""

    order: torch.Tensor | None
    counts: torch.Tensor | None

    @classmethod
    def of(cls, real: torch.Tensor | None) -> TokenPacking:
        """From a (batch, seq) mask of real tokens (0/1 or bool; ``None``: all real). A mask of ones is read once
        (the one host synchronisation of a masked call); without a mask nothing is read."""
        if real is None or bool(real.to(torch.bool).all()):
            return cls(None, None)
        real = real.to(torch.bool)
        return cls(compaction_order(real), real.sum(dim=1))

    @property
    def identity(self) -> bool:
        return self.order is None

    def real(self, length: int) -> torch.Tensor:
        """(batch, length) ``True`` for the packed real tokens (``j < counts``)."""
        return torch.arange(length, device=self.counts.device).unsqueeze(0) < self.counts.unsqueeze(1)

    def pack(self, x: torch.Tensor, zero_pads: bool = False) -> torch.Tensor:
        """(batch, seq, ...) in input order -> real tokens first (pads after them, zeros if ``zero_pads``)."""
        if self.order is None:
            return x
        x = _gather_time(x, self.order, dim=1)
        return x.masked_fill(~self._real_like(x), 0.0) if zero_pads else x

    def unpack(self, packed: torch.Tensor, pads: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`pack`; pad positions take their value in ``pads`` (input order), or zero."""
        if self.order is None:
            return packed
        fill = torch.zeros((), dtype=packed.dtype, device=packed.device) if pads is None else self.pack(pads)
        packed = torch.where(self._real_like(packed), packed, fill)
        index = self.order.view(*self.order.shape, *([1] * (packed.dim() - 2))).expand_as(packed)
        return torch.empty_like(packed).scatter(1, index, packed)

    def _real_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.real(x.shape[1]).view(*x.shape[:2], *([1] * (x.dim() - 2)))


def _pad_time(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pads dimension 2 (time, after batch and heads) of ``x`` up to ``length``."""
    missing = length - x.shape[2]
    if missing == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 3) + (0, missing))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _select_rows(rows: torch.Tensor | bool, new: list[torch.Tensor], old: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sequence (``rows``, (batch,) bool), ``new`` where true and ``old`` where false, for lists of tensors.
    ``rows`` known on the host (a ``bool``, the same for every sequence) picks a list without touching the device."""
    if isinstance(rows, bool):
        return list(new if rows else old)
    return [_where_batch(rows, a, b) for a, b in zip(new, old)]


def _where_batch(condition: torch.Tensor | bool, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``torch.where`` with a per-sample ``condition`` (batch,) broadcast over the other dimensions (or a ``bool``)."""
    if isinstance(condition, bool):
        return new if condition else old
    return torch.where(condition.view(-1, *([1] * (new.dim() - 1))), new, old)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _any(rows: torch.Tensor | bool) -> bool:
    """Whether any sequence is selected; reads the device only when the host does not know."""
    return rows if isinstance(rows, bool) else bool(rows.any())


# --------------------------------------------------------------------------------------------------------------------
# Streaming state
# --------------------------------------------------------------------------------------------------------------------


class BatchTensors:
    """Methods of the dataclasses of batch-first tensors (the memory's state and inputs, the attention caches).

    Every tensor field has the batch as its first dimension (a field may also be a list of tensors, or ``None``), so
    the state can be detached, moved, indexed and reordered like one tensor (:meth:`apply`) and written to
    safetensors as a flat dict (:meth:`tensors`, :meth:`from_tensors`). Fields that are not tensors are settings
    (``chunk_size``) or host-side bookkeeping and pass through unchanged.
    """

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """A new state with ``fn`` applied to every tensor (lists element-wise; ``None`` stays ``None``)."""
        return self.map_fields(lambda name, t: fn(t))

    def map_fields(self, fn: Callable[[str, torch.Tensor], torch.Tensor]):
        """:meth:`apply` with a function that also sees the field's name."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                value = [fn(field.name, t) for t in value]
            elif isinstance(value, torch.Tensor):
                value = fn(field.name, value)
            values[field.name] = value
        return type(self)(**values)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(field name, tensor)`` for every tensor (each item of a list under its field's name)."""
        named = []
        for field in fields(self):
            value = getattr(self, field.name)
            items = value if isinstance(value, list) else [value]
            named.extend((field.name, t) for t in items if isinstance(t, torch.Tensor))
        return named

    def detach(self):
        return self.apply(torch.Tensor.detach)

    def index_select(self, indices: torch.Tensor):
        """Selects or reorders sequences along the batch (beam search, dropping finished rows)."""
        return self.apply(lambda t: t.index_select(0, indices.to(t.device)))

    def __getitem__(self, indices):
        if isinstance(indices, int):
            indices = slice(indices, indices + 1)
        return self.apply(lambda t: t[indices])

    def repeat_interleave(self, repeats: int):
        return self.apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as a flat ``{name: tensor}`` dict (``name.i`` for the items of a list), e.g. for safetensors."""
        out = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                out.update({f"{field.name}.{i}": t for i, t in enumerate(value)})
            elif isinstance(value, torch.Tensor):
                out[field.name] = value
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **settings):
        """Inverse of :meth:`tensors`; ``settings`` gives the fields that are not tensors."""
        values = dict(settings)
        for field in fields(cls):
            if field.name in settings:
                continue
            listed = sorted(
                (int(k.rsplit(".", 1)[1]), t) for k, t in tensors.items() if k.startswith(f"{field.name}.")
            )
            values[field.name] = [t for _, t in listed] if listed else tensors.get(field.name)
        return cls(**values)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class NeuralMemoryState(BatchTensors):
    """Everything the memory needs to continue a stream exactly, for a batch of independent sequences.

    Attributes:
        matrices: per memory layer, the rule's recurrent matrices stacked as (batch, heads, m, d_in, d_out) (float32,
            or float64 when the module runs in float64), named by :attr:`names`: the fast weights ``W_t`` first, then
            the rule's (``titans-hf``: ``[W; S; A; B]`` with momentum ``S``, and ``A`` (``B``) the part of
            ``W_t - W_0`` (``S_t``) written by the current chunk's tokens, which the chunk's learning-rate budget
            rescales as the chunk goes on; ``[W; A]`` without momentum). One stack, so that a decoding step moves all
            of them with one matmul (:meth:`NeuralMemory._step`). Read the first as :attr:`weights`.
        chunk_weights: the fast weights at the last chunk boundary, where the gradients of the current chunk are
            taken (equal to ``weights`` on a boundary).
        chunk_lr: the learning rates ``theta`` of the current chunk's tokens, summed, (batch, heads); zero on a
            boundary (used by rules with a learning-rate budget; zero for the others).
        conv: the last ``conv_kernel - 1`` projected (pre-convolution) ``q|k|v`` rows of real tokens,
            (batch, conv_kernel - 1, 3 * heads * head_dim); ``None`` without convolution.
        seen: number of real tokens written so far per sequence, (batch,) int64; ``seen % chunk_size`` of them
            are in the current chunk.
        chunk_size: the chunk size of the memory that made the state (not a tensor).
        names: what each matrix is, e.g. ``("W", "S", "A", "B")`` (not a tensor).
        window_keys, window_values: with a rule whose step mixes a window of ``window`` tokens, the keys and values
            of the last ``window - 1`` real tokens, (batch, heads, window - 1, head_dim) (zeros before the stream's
            first tokens: a zero token's gradient is zero); ``None`` otherwise.
        common_seen: ``seen`` as a host integer when every sequence has written the same number of tokens and that
            is known without reading the device (a stream of unpadded calls), else ``None``. The chunk schedule then
            follows from shapes: no host synchronisation.

    Its size does not depend on how many tokens were read.
    """

    matrices: list[torch.Tensor]
    chunk_weights: list[torch.Tensor]
    chunk_lr: torch.Tensor
    conv: torch.Tensor | None
    seen: torch.Tensor
    chunk_size: int
    names: tuple[str, ...]
    window_keys: torch.Tensor | None = None
    window_values: torch.Tensor | None = None
    common_seen: int | None = None

    @property
    def weights(self) -> list[torch.Tensor]:
        """The current fast weights ``W_t``, (batch, heads, d_in, d_out) per layer (views of :attr:`matrices`)."""
        return [m[:, :, 0] for m in self.matrices]

    @property
    def momentum(self) -> list[torch.Tensor] | None:
        """The current momentum ``S_t`` per layer (views), or ``None`` when the rule keeps none."""
        if "S" not in self.names:
            return None
        index = self.names.index("S")
        return [m[:, :, index] for m in self.matrices]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NeuralMemoryState:
        """Moves every tensor to ``device``; ``dtype`` (if given) applies to the floating-point tensors only."""
        return self.apply(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], chunk_size: int, names: tuple[str, ...]
    ) -> NeuralMemoryState:
        """Inverse of :meth:`tensors`."""
        seen = tensors["seen"]  # read once, on loading: every sequence at the same place restores the host schedule
        common_seen = int(seen[0]) if seen.numel() and bool((seen == seen[0]).all()) else None
        return super().from_tensors(tensors, chunk_size=chunk_size, names=tuple(names), common_seen=common_seen)

    @property
    def batch_size(self) -> int:
        return self.seen.shape[0]


@dataclass
class MemoryInputs(BatchTensors):
    """The per-token inputs of a block's reads and writes, heads first: unit ``queries`` and ``keys`` and the
    ``values`` (batch, heads, length, head_dim), the gates ``lr`` (``theta``), ``log_momentum`` (``log eta``,
    ``None`` without momentum) and ``log_retention`` (``log(1 - alpha)``), (batch, heads, length), and the rule's own
    gates (batch, heads, length, gates) or ``None``."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    lr: torch.Tensor
    log_momentum: torch.Tensor | None
    log_retention: torch.Tensor
    gates: torch.Tensor | None


@dataclass
class SegmentReads:
    """Every segment's tokens read, without writing, with the fast weights at the start of their segment (MAC's
    ``h = M*_{t-1}(q)``), from the queries of the same pass (:meth:`NeuralMemory.forward` with ``segment``)."""

    output: torch.Tensor  # the reads through the memory's output (norm, gate, projection): shape of hidden_states
    start_weights: list[torch.Tensor]  # per layer (batch, segments, heads, d_in, d_out)
    conv: torch.Tensor | None  # the queries' conv tail after the block (batch, conv_kernel - 1, heads * head_dim)


class MemoryOutput(NamedTuple):
    """What :meth:`NeuralMemory.forward` returns: the ``output`` (shape of the input), the ``state`` after the block,
    and the :class:`SegmentReads` when asked for (``segment``), else ``None``."""

    output: torch.Tensor
    state: NeuralMemoryState
    segments: SegmentReads | None = None


@dataclass
class _ChunkCarry:
    """The memory's state inside a call, in the form the chunks work on (per layer, batch first)."""

    running: list[torch.Tensor]  # the carried matrices, e.g. [D; S] (W - W_0 and the momentum), (batch, heads, m, ...)
    update: (
        list[torch.Tensor] | None
    )  # with a budget, [A; B]: the part of [D; S] written by the current chunk's tokens
    lr_sum: torch.Tensor  # the learning rates of the current chunk's tokens, summed, (batch, heads)
    boundary: list[torch.Tensor]  # the weights at the last chunk boundary, where the chunk's gradients are taken


@dataclass
class ChunkSchedule:
    """How a block's tokens run through the chunks, continuing each sequence from wherever it stopped.

    A sequence that stopped ``phase`` tokens into a chunk first finishes that chunk (its ``C - phase`` next tokens:
    gradients still at the chunk's start weights, reads and carry from the running state), then runs whole chunks.
    Layout: the first ``first_run`` positions hold each sequence's tokens up to its next boundary (the longest such
    run, 0 when every sequence is on a boundary; shorter runs end in identity positions), then ``chunks`` chunks of
    ``C`` positions. Identity positions (padding of the layout) have ``theta = 0`` and gates of 1 (zeros of the log gates).

    The runs are numbered: 0 the first run, ``n >= 1`` chunk ``n`` of the layout.

    Attributes:
        first_run, chunks, size: the layout (host integers).
        whole: the whole chunks that run at once (:func:`~memory_ops.chunk_scan`): every whole chunk of a schedule
            known on the host (they follow the first run, on a boundary); 0 when the schedule depends on the device.
        run_counts: real tokens of each run that is not one of the ``whole`` chunks (the first run, then the runs
            after them): host ints when every sequence is at the same place and every token is real (the schedule
            then follows from shapes, no device read; no list grows with the length), else (batch,) tensors. The
            state is carried from the last of them.
        closes: whether each of those runs reaches a boundary (``bool`` or (batch,) tensors).
        written: real tokens written per sequence, (batch,).
        token: (batch, positions) the packed token each position holds, ``real`` (batch, positions) whether it holds
            one, and ``position`` (batch, length) the position of each token; all ``None`` when the layout is the identity.
    """

    first_run: int
    chunks: int
    size: int
    length: int
    whole: int
    run_counts: list[int | torch.Tensor]
    closes: list[bool | torch.Tensor]
    written: torch.Tensor
    token: torch.Tensor | None = None
    real: torch.Tensor | None = None
    position: torch.Tensor | None = None

    @classmethod
    def plan(
        cls, state: NeuralMemoryState, counts: torch.Tensor | None, length: int, batch: int, device: torch.device
    ) -> ChunkSchedule | None:
        """The schedule of a block of ``length`` packed tokens, ``counts`` (batch,) real per sequence (``None``: all);
        ``None`` when no sequence has a real token."""
        size = state.chunk_size
        if counts is None and state.common_seen is not None:
            # Every sequence is at the same place and every token is real: the schedule follows from shapes, on the
            # host (no synchronisation), and the layout is the identity.
            phase = state.common_seen % size
            first = min(length, (size - phase) % size)  # tokens that finish the current chunk
            whole = (length - first) // size
            last = length - first - whole * size  # tokens of a last, partial chunk
            run_counts = [first] + ([last] if last else [])
            closes = [first > 0 and phase + first == size] + ([False] if last else [])
            written = torch.full((batch,), length, device=device, dtype=torch.long)
            return cls(first, whole + (1 if last else 0), size, length, whole, run_counts, closes, written)
        # Padded rows, or rows at different places: the schedule depends on the counts, read from the device.
        phase = state.seen % size  # tokens already in the current chunk
        written = counts if counts is not None else torch.full((batch,), length, device=device, dtype=torch.long)
        first = torch.minimum(written, (size - phase) % size)  # tokens that finish the current chunk
        first_run = int(first.max())
        chunks = -(-int((written - first).max()) // size)
        positions = first_run + chunks * size
        if positions == 0:
            return None
        # Token j of sequence b sits at position j up to its boundary, then at first_run + (j - first_b).
        steps = torch.arange(positions, device=device).unsqueeze(0)
        in_first = steps < first.unsqueeze(1)
        token = torch.where(in_first, steps, steps - first_run + first.unsqueeze(1))
        real = (in_first | (steps >= first_run)) & (token < written.unsqueeze(1))
        steps = torch.arange(length, device=device).unsqueeze(0)
        position = torch.where(steps < first.unsqueeze(1), steps, steps + first_run - first.unsqueeze(1))
        position = position.clamp(max=positions - 1)  # (pads beyond the real tokens read anything; dropped later)
        # A run closes its chunk on reaching a boundary: the first when phase + first = C, the others when full.
        run_counts = [first] + [(written - first - n * size).clamp(0, size) for n in range(chunks)]
        closes = [(first > 0) & (phase + first == size)] + [n_in == size for n_in in run_counts[1:]]
        token = token.clamp(0, length - 1)
        return cls(first_run, chunks, size, length, 0, run_counts, closes, written, token, real, position)

    @property
    def positions(self) -> int:
        return self.first_run + self.chunks * self.size

    def last_token(self, n: int, heads: int) -> torch.Tensor:
        """Per sequence and head (batch, heads), the run ``n``'s position after which the state is carried: its last real
        token (0 for a sequence with none)."""
        n_in, batch = self.run(n)[0], self.written.shape[0]
        if isinstance(n_in, int):
            return torch.full((batch, heads), n_in - 1, device=self.written.device, dtype=torch.long)
        return (n_in - 1).clamp(min=0).view(batch, 1).expand(batch, heads)

    def to_layout(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A per-token stream (batch, heads, length, ...) in the layout; identity positions hold zeros."""
        if t is None:
            return None
        if self.token is None:
            return _pad_time(t, self.positions)
        gathered = _gather_time(t.transpose(1, 2), self.token, dim=1).transpose(1, 2)
        mask = self.real.view(*self.real.shape[:1], 1, self.positions, *([1] * (gathered.dim() - 3)))
        return torch.where(mask, gathered, torch.zeros((), dtype=t.dtype, device=t.device))

    def run(self, n: int) -> tuple[int | torch.Tensor, bool | torch.Tensor]:
        """Run ``n``'s real tokens and whether it reaches a boundary (see :attr:`run_counts`)."""
        if n == 0 or n > self.whole:
            return self.run_counts[n - self.whole if n else 0], self.closes[n - self.whole if n else 0]
        return self.size, True

    def split(
        self, t: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
        """A stream in the layout -> the first run, the :attr:`whole` chunks stacked (chunks, batch, heads, size,
        ...), and the other chunks one by one; contiguous (chunk-major: no copy in every matmul; unbind, not slicing
        per chunk, keeps the backward of the split linear in length)."""
        if t is None:
            return None, None, [None] * (self.chunks - self.whole)
        major = self.chunk_major(t)
        return t[:, :, : self.first_run], major[: self.whole], list(major[self.whole :].unbind(0))

    def chunk_major(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The whole chunks of a stream in the layout (batch, heads, positions, ...) as one contiguous (chunks, batch,
        heads, size, ...) tensor."""
        if t is None:
            return None
        batch, heads = t.shape[:2]
        rest = t[:, :, self.first_run :].reshape(batch, heads, self.chunks, self.size, *t.shape[3:])
        return rest.permute(2, 0, 1, *range(3, rest.dim())).contiguous()

    def windows(
        self, extended: torch.Tensor | None, window: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
        """:meth:`split` for the gradient tokens of a rule whose step mixes a window of ``window`` tokens: each run's
        tokens preceded by the ``window - 1`` real tokens before its first one (``size + window - 1`` per chunk).

        ``extended`` (batch, heads, window - 1 + length, ...): the stream's last ``window - 1`` real tokens before the
        block, then the block's packed tokens. Runs overlap by ``window - 1`` tokens (their gradients flow back to
        both)."""
        if extended is None:
            return None, None, [None] * (self.chunks - self.whole)
        extra, sizes = window - 1, [self.first_run] + [self.size] * self.chunks
        starts = [0] + [self.first_run + n * self.size for n in range(self.chunks)]  # each run's first position
        if self.token is None:  # the identity layout: positions are tokens (zeros past the block)
            extended = _pad_time(extended, extra + self.positions)
            runs = [extended[:, :, a : a + n + extra] for a, n in zip(starts, sizes)]
            whole = None
            if self.whole:
                whole = extended[:, :, self.first_run : self.first_run + self.whole * self.size + extra]
                whole = whole.unfold(2, self.size + extra, self.size)  # (batch, heads, chunks, ..., size + extra)
                whole = whole.movedim(-1, 3).movedim(2, 0).contiguous()
            return runs[0], whole, runs[1 + self.whole :]
        runs = []  # padded rows or rows at different places: each row's run starts at its own token
        for a, n in zip(starts, sizes):
            first_token = self.token[:, a : a + 1] if a < self.positions else self.token[:, :1]
            index = (first_token + torch.arange(n + extra, device=self.token.device)).clamp(max=extended.shape[2] - 1)
            runs.append(_gather_time(extended.transpose(1, 2), index, dim=1).transpose(1, 2))
        return runs[0], None, runs[1:]

    def join(self, first: list[torch.Tensor], whole: torch.Tensor | None, rest: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split` for the runs' reads: the first run's (``[]`` when it has no position), the whole
        chunks' stacked (chunks, batch, heads, size, d) or ``None``, and the other chunks' one by one."""
        chunks = ([] if whole is None else [whole]) + ([torch.stack(rest)] if rest else [])
        parts = list(first)
        if chunks:
            parts.append(_cat(chunks).permute(1, 2, 0, 3, 4).flatten(2, 3))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def to_tokens(self, reads: torch.Tensor) -> torch.Tensor:
        """The layout -> the tokens' order, (batch, heads, length, d)."""
        if self.position is None:
            return reads[:, :, : self.length]
        return _gather_time(reads.transpose(1, 2), self.position, dim=1).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------------


class NeuralMemory(nn.Module):
    """Titans neural long-term memory (the LMM token mixer), streaming and exact, learning by a memory rule.

    Args:
        hidden_size: width of the inputs and outputs.
        num_heads: number of independent memories.
        head_dim: key/value width of each memory.
        depth: layers of the memory MLP; 1 is a linear matrix memory, >= 2 an MLP ``z + MLP(z)`` (GELU).
        expansion: hidden width of the memory MLP, as a multiple of ``head_dim``.
        chunk_size: tokens per inner mini-batch; every gradient in a chunk is taken at the chunk-start weights.
        conv_kernel: width of the causal depthwise convolution on q, k, v (0 or 1: none).
        momentum: use the momentum ("surprise") term ``S`` (eq. 14); ``None``: the rule's default.
        forget: use the data-dependent forgetting gate ``alpha`` (eq. 13); without it nothing is forgotten.
        max_lr: upper bound of the inner learning rate ``theta = max_lr * sigmoid(.)`` (with ``titans-hf``, also the
            chunk's learning-rate budget); ``None``: the rule's default.
        max_weight_rms: safeguard: at every chunk boundary, each head's carried matrices (``titans-hf``: ``W - W_0``
            and the momentum) are scaled down to this root-mean-square value if they exceed it (``None``: off;
            ``"auto"``: the rule's default). It only acts when the inner optimisation overshoots.
        rule: the memory rule (``rule_registry.MEMORY_RULES``): ``"titans-hf"`` (default), ``"titans"``, ...
        retention_half_lives: at initialisation, the heads' retention ``1 - alpha`` is set (through the gate bias) so
            that a write fades to half after these many tokens, spread geometrically from the first value (head 0)
            to the second (the last head): several time scales, among which the data-dependent gate chooses.
        init_momentum: momentum decay ``eta`` at initialisation.
        init_lr_fraction: ``theta / max_lr`` at initialisation.
        initializer_range: standard deviation of the gate and output projection weights at initialisation (the
            q|k|v projection uses ``1 / sqrt(hidden_size)``).
        norm_eps: epsilon of the per-head output RMSNorm.
        rule_settings: the rule's own settings (e.g. ``moneta_p=3``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        depth: int = 2,
        expansion: int = 4,
        chunk_size: int = 16,
        conv_kernel: int = 4,
        momentum: bool | None = None,
        forget: bool = True,
        max_lr: float | None = None,
        max_weight_rms: float | str | None = "auto",
        rule: str = "titans-hf",
        retention_half_lives: tuple[float, float] = (32.0, 32768.0),
        init_momentum: float = 0.9,
        init_lr_fraction: float = 0.5,
        initializer_range: float = 0.02,
        norm_eps: float = 1e-6,
        **rule_settings,
    ):
        super().__init__()
        rule_type = rule_class(rule, field="rule")
        momentum = rule_type.defaults["momentum"] if momentum is None else momentum
        max_lr = rule_type.defaults["max_lr"] if max_lr is None else max_lr
        max_weight_rms = rule_type.defaults["max_weight_rms"] if max_weight_rms == "auto" else max_weight_rms
        check_memory_arguments(
            hidden_size=hidden_size,
            num_heads=num_heads,
            head_dim=head_dim,
            depth=depth,
            expansion=expansion,
            chunk_size=chunk_size,
            conv_kernel=conv_kernel,
            momentum=momentum,
            forget=forget,
            max_lr=max_lr,
            max_weight_rms=max_weight_rms,
        )
        lives = tuple(retention_half_lives) if isinstance(retention_half_lives, (tuple, list)) else ()
        if not (
            len(lives) == 2
            and all(isinstance(h, (int, float)) and math.isfinite(h) and h > 0 for h in lives)
            and lives[0] <= lives[1]
        ):
            raise ValueError(
                "retention_half_lives must be two finite numbers 0 < first <= second (tokens), got "
                f"{retention_half_lives!r}."
            )
        for name, value in (("init_momentum", init_momentum), ("init_lr_fraction", init_lr_fraction)):
            if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}.")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.depth = depth
        self.expansion = expansion
        self.chunk_size = chunk_size
        self.conv_kernel = conv_kernel if conv_kernel > 1 else 0
        self.use_momentum = momentum
        self.use_forget = forget
        self.max_lr = float(max_lr)
        self.retention_half_lives = (float(lives[0]), float(lives[1]))
        self.init_momentum = init_momentum
        self.init_lr_fraction = init_lr_fraction
        self.initializer_range = initializer_range
        self.residual = depth >= 2

        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False)
        # Causal depthwise convolution over time of every q|k|v channel (``None`` without convolution).
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, self.conv_kernel)) if self.conv_kernel else None
        # Per-token, per-head gates (paper eq. 13-14), each a linear map of the input.
        self.lr_proj = nn.Linear(hidden_size, num_heads)
        self.momentum_proj = nn.Linear(hidden_size, num_heads) if momentum else None
        self.retention_proj = nn.Linear(hidden_size, num_heads) if forget else None
        # Learned initial state W_0 of every head's memory MLP.
        dims = [head_dim] + [expansion * head_dim] * (depth - 1) + [head_dim]
        self.initial_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_heads, d_in, d_out)) for d_in, d_out in zip(dims[:-1], dims[1:])]
        )
        self.norm_weight = nn.Parameter(torch.empty(num_heads, head_dim))  # per-head output RMSNorm
        self.norm_eps = norm_eps
        self.gate_proj = nn.Linear(hidden_size, inner, bias=False)  # output gate
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        # How the memory learns (the rule's own parameters, if any, live under `rule.`).
        self.rule: MemoryRule = rule_type(
            hidden_size,
            num_heads,
            head_dim,
            max_lr=self.max_lr,
            momentum=momentum,
            max_weight_rms=max_weight_rms,
            **rule_settings,
        )
        if self.rule.window > 1 and type(self.rule).error_params is not MemoryRule.error_params:
            raise NotImplementedError(
                f"memory_rule={rule!r}: a window of past gradient tokens with per-token error parameters (the state "
                "keeps the window's keys and values, not its parameters)."
            )
        self.reset_parameters()

    @property
    def max_weight_rms(self) -> float | None:
        """The safeguard's bound (the rule applies it at chunk boundaries), or ``None``."""
        return self.rule.max_weight_rms

    # ---------------------------------------------------------------------------------------------------- init

    def reset_parameters(self, init=nn.init) -> None:
        """Initialises every parameter. ``init`` is ``torch.nn.init`` or ``transformers.initialization``.

        The gate biases make the memory *retain* at initialisation (per head, a retention whose half-life lies in
        ``retention_half_lives``; momentum ``init_momentum``; learning rate ``init_lr_fraction * max_lr``); the gate
        weights are small, so the gates start near these values on unit-RMS inputs.
        """
        std = self.initializer_range
        for linear in (self.gate_proj, self.o_proj):
            init.normal_(linear.weight, mean=0.0, std=std)
        # q and k are l2-normalised, so only the values feel this scale: 1/sqrt(fan-in) gives values of unit-order
        # entries at any width, large enough next to the unit keys for a write to show in the read z + MLP(z).
        init.normal_(self.qkv_proj.weight, mean=0.0, std=self.hidden_size**-0.5)
        if self.conv_weight is not None and not getattr(self.conv_weight, "_is_hf_initialized", False):
            # Start close to the identity (the current token) with a little mixing of the previous ones.
            init.normal_(self.conv_weight, mean=0.0, std=std)
            with torch.no_grad():
                self.conv_weight[:, -1] += 1.0
        for proj, value in (
            (self.lr_proj, self.init_lr_fraction),
            (self.momentum_proj, self.init_momentum),
            (self.retention_proj, None),
        ):
            if proj is not None:
                init.normal_(proj.weight, mean=0.0, std=std)
                init.constant_(proj.bias, math.log(value / (1.0 - value)) if value is not None else 0.0)
        if self.retention_proj is not None:  # the logit of r = 2^(-1/h) is log(r / (1 - r)) = -log(2^(1/h) - 1)
            logits = -torch.log(torch.expm1(math.log(2.0) / self.initial_half_lives()))
            bias = self.retention_proj.bias
            if hasattr(init, "copy_"):  # transformers.initialization: leaves loaded weights alone
                init.copy_(bias, logits.to(bias.dtype))
            else:
                with torch.no_grad():
                    bias.copy_(logits)
        for w in self.initial_weights:
            init.normal_(w, mean=0.0, std=1.0 / math.sqrt(w.shape[-2]))
        init.ones_(self.norm_weight)
        self.rule.reset_parameters(init)

    def initial_half_lives(self) -> torch.Tensor:
        """The retention half-life of every head at initialisation (tokens), geometric over ``retention_half_lives``."""
        low, high = self.retention_half_lives
        steps = torch.linspace(0.0, 1.0, self.num_heads, dtype=torch.float64) if self.num_heads > 1 else torch.zeros(1)
        return (low * (high / low) ** steps).to(torch.float64)

    # ---------------------------------------------------------------------------------------------------- gates

    def lr(self, x: torch.Tensor) -> torch.Tensor:
        """Inner learning rate ``theta_t = max_lr * sigmoid(x W_theta + b)`` (eq. 14), (..., heads), bounded by max_lr."""
        return self.max_lr * torch.sigmoid(_upcast(self.lr_proj(x)))

    def log_momentum(self, x: torch.Tensor) -> torch.Tensor | None:
        """``log eta_t`` of the momentum decay ``eta_t = sigmoid(x W_eta + b)`` (eq. 14), or ``None`` if disabled."""
        if self.momentum_proj is None:
            return None
        return F.logsigmoid(_upcast(self.momentum_proj(x)))

    def log_retention(self, x: torch.Tensor) -> torch.Tensor:
        """``log(1 - alpha_t)`` of the retention ``1 - alpha_t = sigmoid(x W_alpha + b)`` (eq. 13); 0 if disabled."""
        if self.retention_proj is None:
            return x.new_zeros(*x.shape[:-1], self.num_heads, dtype=self.compute_dtype(x))
        return F.logsigmoid(_upcast(self.retention_proj(x)))

    # ---------------------------------------------------------------------------------------------------- pieces

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """Fast weights, momentum and gate products live in float32 (float64 when the inputs are float64)."""
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def initial_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> NeuralMemoryState:
        """The state before the first token: the rule's, from ``W_0`` for every sequence (``titans-hf``: ``W_0``,
        zero momentum).

        ``dtype`` is the dtype of the fast weights (float32, or float64 for exact checks); the conv tail takes the
        module's dtype.
        """
        device = device if device is not None else self.norm_weight.device
        weights = [w.to(device, dtype).unsqueeze(0).expand(batch_size, *w.shape) for w in self.initial_weights]
        conv = None
        if self.conv_weight is not None:
            conv = torch.zeros(
                batch_size,
                self.conv_kernel - 1,
                3 * self.num_heads * self.head_dim,
                device=device,
                dtype=self.qkv_proj.weight.dtype,
            )
        matrices, chunk_weights = zip(*(self.rule.initial_state(w) for w in weights))
        past = None  # the window's tokens before the stream: zeros (their gradient is zero)
        if self.rule.window > 1:
            past = torch.zeros(
                batch_size, self.num_heads, self.rule.window - 1, self.head_dim, device=device, dtype=dtype
            )
        return NeuralMemoryState(
            matrices=list(matrices),
            chunk_weights=list(chunk_weights),
            chunk_lr=torch.zeros(batch_size, self.num_heads, device=device, dtype=dtype),
            conv=conv,
            seen=torch.zeros(batch_size, dtype=torch.long, device=device),
            chunk_size=self.chunk_size,
            names=self.rule.matrix_names(),
            window_keys=past,
            window_values=past,
            common_seen=0,
        )

    def causal_conv(
        self,
        features: torch.Tensor,
        tail: torch.Tensor | None,
        weight: torch.Tensor | None,
        counts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal depthwise convolution + SiLU over compacted rows (real tokens first), continuing from ``tail``.

        ``features`` (batch, length, channels); ``weight`` (channels, kernel); ``counts`` (batch,) real rows per
        sequence (``None``: all real).
        Returns the convolved features and the new tail (the last ``kernel - 1`` real rows, tail included).
        """
        if tail is None:
            return F.silu(features), None
        padded = torch.cat([tail, features], dim=1)
        width = tail.shape[1]
        out = CausalConvSiLU.apply(padded, weight)
        if counts is None:
            new_tail = padded[:, padded.shape[1] - width :].clone()  # (a view would keep all of `padded` alive)
        else:
            index = counts.unsqueeze(1) + torch.arange(width, device=counts.device)
            new_tail = _gather_time(padded, index, dim=1)
        return out, new_tail

    def split_heads(self, features: torch.Tensor) -> torch.Tensor:
        """Splits convolved ``q|k|v`` features (batch, length, 3 * inner) into a (3, batch, heads, length, head_dim)."""
        batch, length, _ = features.shape
        return features.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def output(self, reads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o = W_o(RMSNorm_head(y) * sigmoid(x W_g))``: per-head norm, output gate, projection back to hidden."""
        batch, heads, length, dim = reads.shape
        y = F.rms_norm(reads, (dim,), eps=self.norm_eps) * self.norm_weight.to(reads.dtype).unsqueeze(1)
        y = y.transpose(1, 2).reshape(batch, length, heads * dim).to(x.dtype)
        return self.o_proj(y * torch.sigmoid(self.gate_proj(x)))

    # ---------------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: NeuralMemoryState | None = None,
        mask: torch.Tensor | None = None,
        write: bool = True,
        *,
        segment: int | None = None,
    ) -> MemoryOutput:
        """Reads and writes a block of tokens.

        Args:
            hidden_states: (batch, seq, hidden_size).
            state: where the stream stopped (``None``: a new stream, from the rule's initial state).
            mask: (batch, seq) of 0/1 or bool; a 0 token writes nothing, moves no chunk boundary and gets a zero output.
            write: ``False`` is the "memory never written" ablation: every token reads the state's current
                weights and the state is returned unchanged.
            segment: also read every ``segment`` tokens, without writing, with the fast weights at their segment's
                start (:class:`SegmentReads`): MAC's retrieval for all its segments from one pass. Needs real tokens
                only, segments of whole chunks, and a stream on a segment boundary.

        Returns:
            :class:`MemoryOutput`: the output (the shape of ``hidden_states``), the new state, and the
            :class:`SegmentReads` with ``segment`` (else ``None``).
        """
        if segment is not None and (
            mask is not None
            or segment % self.chunk_size
            or state is not None
            and (state.common_seen is None or state.common_seen % segment)
        ):
            raise ValueError(
                f"segment={segment}: the weights at segment starts need real tokens only (no mask), segments of whole "
                f"chunks (chunk_size={self.chunk_size}) and a stream on a segment boundary known on the host."
            )
        batch, length = self._check_inputs(hidden_states, mask)
        dtype = self.compute_dtype(hidden_states)
        if state is None:
            state = self.initial_state(batch, hidden_states.device, dtype)
        else:
            self.check_state(state, batch)
        packing = TokenPacking.of(mask)
        x, counts = packing.pack(hidden_states, zero_pads=True), packing.counts

        # Projections, causal conv + SiLU, l2-normalisation (eq. 11), gates (eq. 13-14).
        features, conv_tail = self.causal_conv(self.qkv_proj(x), state.conv, self.conv_weight, counts)
        q, k, v = self.split_heads(features).to(dtype).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.rule.unit_values:  # (titans-hf: the inner problem has one scale at any width, docs/design.md §2.4)
            v = F.normalize(v, dim=-1)

        # Read and write chunk by chunk, with float32 (or float64) state even under autocast.
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            starts = []
            if not write:
                reads, new_state = memory_mlp(state.weights, q, self.residual), state
                if segment is not None:  # nothing is written: every segment starts from the same weights
                    segments = -(-length // segment)
                    starts = [w.unsqueeze(1).expand(-1, segments, *w.shape[1:]) for w in state.weights]
            else:
                # Autocast is off here: the gates run in their weights' dtype (under autocast, e.g. MAC, x is bf16).
                gate_x = x.to(self.lr_proj.weight.dtype)
                gates = [self.lr(gate_x), self.log_momentum(gate_x), self.log_retention(gate_x)]
                gates.append(self.rule.rule_gates(gate_x))
                lr, log_momentum, log_retention, rule_gates = (
                    None if g is None else g.to(dtype).transpose(1, 2) for g in gates
                )
                tokens = MemoryInputs(q, k, v, lr, log_momentum, log_retention, rule_gates)
                reads, new_state, starts = self._read_write(state, tokens, counts, segment)
                new_state.conv = conv_tail
            retrieved = None if segment is None else self._read_segments(starts, q, segment)
        output = packing.unpack(self.output(reads, x))
        if segment is None:
            return MemoryOutput(output, new_state)
        # (no padding with `segment`: the packing is the identity)
        query_tail = None if conv_tail is None else conv_tail[..., : self.num_heads * self.head_dim].contiguous()
        return MemoryOutput(output, new_state, SegmentReads(self.output(retrieved, x), starts, query_tail))

    def _read_write(
        self, state: NeuralMemoryState, tokens: MemoryInputs, counts: torch.Tensor | None, segment: int | None = None
    ) -> tuple[torch.Tensor, NeuralMemoryState, list[torch.Tensor]]:
        """Reads and writes the block's tokens (heads-first, (batch, heads, length, ...)), continuing each sequence
        from wherever it stopped: lays the tokens out in runs (:class:`ChunkSchedule`), runs them in closed form
        (:meth:`_run_chunks`, :meth:`_scan`) and gathers each token's read. One real token per sequence (decoding)
        takes the recurrence, :meth:`_step`. With ``segment``, also the fast weights at the start of every
        ``segment`` tokens (see :meth:`forward`), else ``[]``."""
        q = tokens.queries
        batch, _, length, _ = q.shape
        if length == 1 and counts is None and segment is None:
            return *self._step(state, tokens), []
        schedule = ChunkSchedule.plan(state, counts, length, batch, q.device)
        if schedule is None:  # no real token in any sequence
            return q.new_zeros(q.shape), state, []
        laid_out = tokens.apply(schedule.to_layout)
        window = self.rule.window
        if window == 1:  # the gradient tokens are the reading tokens
            gradient_tokens = (laid_out.keys, self._targets(laid_out.keys, laid_out.values))
            gradient_tokens += (self.rule.error_params(laid_out.gates),)
            gradient_tokens = [schedule.split(t) for t in gradient_tokens]
        else:  # each run's tokens and the window - 1 before them
            keys = torch.cat([state.window_keys, tokens.keys], dim=2)
            values = torch.cat([state.window_values, tokens.values], dim=2)
            gradient_tokens = [schedule.windows(t, window) for t in (keys, self._targets(keys, values), None)]
        step_tokens = (laid_out.queries, laid_out.lr, laid_out.log_momentum, laid_out.log_retention, laid_out.gates)
        step_tokens = [schedule.split(t) for t in step_tokens]
        # Per stream, (first run, whole chunks, other runs): queries, keys, targets, params, gates.
        first, whole, rest = zip(*(step_tokens[:1] + gradient_tokens + step_tokens[1:]))
        anchors = self._anchors(q.dtype)
        # The weights at every chunk start, if asked: pieces of (boundaries, batch, heads, d_in, d_out) per layer,
        # joined once (one select per chunk would give the backward a full-size zero gradient per chunk).
        boundaries = None if segment is None else [[w.unsqueeze(0) for w in state.weights]]
        carry = self._carry(state, anchors)
        first_reads = self._run_chunks(carry, schedule, [first], 0, anchors, boundaries)
        whole_reads = self._scan(carry, schedule, whole, anchors, boundaries) if schedule.whole else None
        rest_reads = self._run_chunks(carry, schedule, list(zip(*rest)), 1 + schedule.whole, anchors, boundaries)
        starts = []  # the weights at every segment start, per layer (batch, segments, heads, d_in, d_out)
        if segment is not None:
            every = segment // self.chunk_size
            starts = [torch.cat(pieces)[::every].movedim(0, 1) for pieces in zip(*boundaries)]
        reads = schedule.join(first_reads, whole_reads, rest_reads)
        if self.residual:
            reads = reads + laid_out.queries
        common_seen = None if counts is not None or state.common_seen is None else state.common_seen + length
        new_state = self._new_state(state, carry, anchors, state.seen + schedule.written, common_seen)
        if window > 1:  # the last window - 1 real tokens, copied out (a view would keep the block alive)
            last = None if counts is None else counts.unsqueeze(1) + torch.arange(window - 1, device=counts.device)
            new_state.window_keys, new_state.window_values = (
                t[:, :, -(window - 1) :].clone()
                if last is None
                else _gather_time(t.transpose(1, 2), last, 1).transpose(1, 2)
                for t in (keys, values)
            )
        return schedule.to_tokens(reads), new_state, starts

    def _targets(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """What the memory's MLP must map the keys to: the values, or ``v - k`` for the residual ``M(z) = z + MLP(z)``."""
        return values - keys if self.residual else values

    def _scan(
        self,
        carry: _ChunkCarry,
        schedule: ChunkSchedule,
        whole: tuple[torch.Tensor | None, ...],
        anchors: list[torch.Tensor] | None,
        boundaries: list[list[torch.Tensor]] | None,
    ) -> torch.Tensor:
        """The schedule's :attr:`~ChunkSchedule.whole` chunks at once (:func:`~memory_ops.chunk_scan`), from the
        boundary ``carry`` is on; updates ``carry`` and ``boundaries`` as :meth:`_run_chunks` does. The reads of the
        chunks, (chunks, batch, heads, size, d)."""
        queries, keys, targets, params, lr, log_momentum, log_retention, gates = whole
        coefficients = self.rule.coefficients(lr, log_momentum, log_retention, gates)
        reads, carry.running, starts = chunk_scan(
            self.rule,
            queries,
            keys,
            targets,
            params,
            coefficients,
            carry.running,
            carry.boundary,
            anchors,
            all_starts=boundaries is not None,
        )
        # (with every start kept, copied out: a state holding a view would keep all of them alive)
        carry.boundary = [s[-1].clone() if boundaries is not None else s[-1] for s in starts]
        if boundaries is not None:  # the weights at the boundaries before the block's last token
            ends_block = schedule.first_run + schedule.whole * schedule.size == schedule.length
            boundaries.append([s[: schedule.whole - ends_block] for s in starts])
        return reads

    def _run_chunks(
        self,
        carry: _ChunkCarry,
        schedule: ChunkSchedule,
        pieces: list[tuple],
        start: int,
        anchors: list[torch.Tensor] | None,
        boundaries: list[list[torch.Tensor]] | None = None,
    ) -> list[torch.Tensor]:
        """The runs ``pieces`` of the schedule (its runs from ``start`` on) in order, each in closed form
        (:func:`~memory_ops.chunk_update`): the reads of each run; updates ``carry``.

        With a learning-rate budget, a run that continues a chunk (the first run, unless every sequence is on a
        boundary) or stops inside one also carries the chunk's own update ``[A; B]``; a run that reaches a boundary
        closes its chunk (:meth:`_close_chunk`). ``boundaries``, if given, receives the weights at every boundary a
        run closes before the block's last token (a host-known schedule only).
        """
        carried = self.rule.num_matrices()
        reads = []
        for n, (q_n, k_n, t_n, p_n, lr_n, log_mom_n, log_ret_n, g_n) in enumerate(pieces, start):
            if q_n.shape[2] == 0:
                continue
            n_in, closes = schedule.run(n)  # host ints and bools, or (batch,) tensors
            active = n_in > 0
            stops_inside = (active and not closes) if isinstance(closes, bool) else active & ~closes
            continuing = self.rule.budget and (n == 0 and schedule.first_run > 0 or _any(stops_inside))
            last = schedule.last_token(n, self.num_heads)
            if continuing:
                c_n = self.rule.coefficients(lr_n, log_mom_n, log_ret_n, g_n, last, carry.lr_sum)
                stacked = [torch.cat([r, u], dim=2) for r, u in zip(carry.running, carry.update)]
            else:
                c_n = self.rule.coefficients(lr_n, log_mom_n, log_ret_n, g_n, last)
                stacked = carry.running
            y, after = chunk_update(self.rule, stacked, carry.boundary, q_n, k_n, t_n, p_n, c_n, anchors)
            reads.append(y)
            carry.running = _select_rows(active, [x[:, :, :carried] for x in after], carry.running)
            if continuing:
                carry.update = _select_rows(active, [x[:, :, carried:] for x in after], carry.update)
                carry.lr_sum = _where_batch(active, carry.lr_sum + lr_n.sum(-1), carry.lr_sum)
            if _any(closes):
                self._close_chunk(closes, carry, anchors)
                if boundaries is not None and closes is True and n * self.chunk_size < schedule.length:
                    boundaries.append([b.unsqueeze(0) for b in carry.boundary])
        return reads

    def _carry(self, state: NeuralMemoryState, anchors: list[torch.Tensor] | None) -> _ChunkCarry:
        """The state in the form the chunks work on: the carried matrices with ``W`` read as ``D = W - anchor`` (e.g.
        ``[D; S]``) and, with a budget, the chunk's own update ``[A; B]``, per layer."""
        carried = self.rule.num_matrices()
        running = []
        for m, a in zip(state.matrices, anchors or [None] * len(state.matrices)):
            deviation = m[:, :, :1] if a is None else m[:, :, :1] - a.unsqueeze(2)
            running.append(torch.cat([deviation, m[:, :, 1:carried]], dim=2) if carried > 1 else deviation)
        update = [m[:, :, carried:] for m in state.matrices] if self.rule.budget else None
        return _ChunkCarry(running, update, state.chunk_lr, list(state.chunk_weights))

    def _close_chunk(self, rows: torch.Tensor | bool, carry: _ChunkCarry, anchors: list[torch.Tensor] | None) -> None:
        """A chunk boundary, for the sequences ``rows`` (updates ``carry``): the chunk's update joins the state, the
        rule's maps at boundaries apply (e.g. the safeguard), and the next chunk takes its gradients there."""
        bounded, _ = self.rule.bound(carry.running)
        carry.running = _select_rows(rows, bounded, carry.running)
        if carry.update is not None:
            carry.update = _select_rows(rows, [torch.zeros_like(u) for u in carry.update], carry.update)
        carry.lr_sum = _where_batch(rows, torch.zeros_like(carry.lr_sum), carry.lr_sum)
        layer_anchors = anchors or [None] * len(carry.running)
        carry.boundary = _select_rows(
            rows, [fast_weights(r, a) for r, a in zip(carry.running, layer_anchors)], carry.boundary
        )

    def _new_state(
        self,
        state: NeuralMemoryState,
        carry: _ChunkCarry,
        anchors: list[torch.Tensor] | None,
        seen: torch.Tensor,
        common_seen: int | None,
    ) -> NeuralMemoryState:
        """The state after a call, from the carry: the matrices stacked (``W`` first; contiguous, so that a live state
        and a reloaded snapshot compute alike) with the chunk's learning-rate sum and gradient weights; the conv tail
        is set by the caller."""
        matrices = []
        for layer, r in enumerate(carry.running):
            w = r[:, :, :1] if anchors is None else r[:, :, :1] + anchors[layer].unsqueeze(2)
            parts = [w, r[:, :, 1:]] + ([] if carry.update is None else [carry.update[layer]])
            matrices.append(torch.cat(parts, dim=2))
        return NeuralMemoryState(
            matrices=matrices,
            chunk_weights=carry.boundary,
            chunk_lr=carry.lr_sum,
            conv=state.conv,
            seen=seen,
            chunk_size=self.chunk_size,
            names=state.names,
            window_keys=state.window_keys,
            window_values=state.window_values,
            common_seen=common_seen,
        )

    def _anchors(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """What forgetting relaxes the fast weights towards, per layer as (1, heads, d_in, d_out): ``W_0`` for an
        anchored rule, ``None`` (zero) otherwise."""
        if not self.rule.anchored:
            return None
        return [w.to(dtype).unsqueeze(0) for w in self.initial_weights]

    def _step(self, state: NeuralMemoryState, tokens: MemoryInputs) -> tuple[torch.Tensor, NeuralMemoryState]:
        """One real token per sequence (decoding): the closed form of a run of one token, as a recurrence on the
        state's matrices. The rule's coefficients of the one-token run give the transition ``T`` (matrices x
        matrices, per head) and the write ``w``; with ``u = abar^T delta`` the token's half gradient at the chunk's
        start weights,

            [W'; ...] = T [W; ...] + w u + (1 - T_00) anchor [1; 0; ...]

        (the closed form acts on ``D = W - anchor``; every transition of :func:`~memory_rule.linear_recurrence`, and
        of the rules' extensions, leaves ``D`` out of the other matrices' rows, so only ``W`` takes the anchor's
        share): one matmul over the state's :attr:`~NeuralMemoryState.matrices`
        per memory layer, the (rank-one) write added to all of them in place. The read is ``M_W'(q)``; on a chunk
        boundary the chunk closes as in :meth:`_run_chunks`. Cached decoding is tested against the full (chunked)
        pass for every variant and rule.
        """
        q, k, v = tokens.queries, tokens.keys, tokens.values
        if self.rule.window > 1:  # the token and the window - 1 before it
            k, v = torch.cat([state.window_keys, k], dim=2), torch.cat([state.window_values, v], dim=2)
        params = self.rule.error_params(tokens.gates)
        key_side = KeySide.forward(self.rule, state.chunk_weights, k, params, targets=self._targets(k, v))
        lr_before = state.chunk_lr if self.rule.budget else None
        c = self.rule.coefficients(tokens.lr, tokens.log_momentum, tokens.log_retention, tokens.gates, None, lr_before)
        c = key_side.coefficients(c)
        anchors = self._anchors(q.dtype)
        matrices = []
        for layer, (abar, delta) in enumerate(zip(key_side.inputs, key_side.deltas)):
            old = state.matrices[layer]
            new = (c.transition.flatten(0, 1) @ old.flatten(-2).flatten(0, 1)).view_as(old)
            # + abar^T (write_s delta) in every matrix s, all at once, in place
            abar_t = abar.transpose(-1, -2).unsqueeze(2).expand(*new.shape[:-1], abar.shape[-2])
            scaled = delta.unsqueeze(2) * c.write.transpose(-1, -2).unsqueeze(-1)
            new.flatten(0, 2).baddbmm_(abar_t.flatten(0, 2), scaled.flatten(0, 2))
            if anchors is not None:
                new[:, :, 0].addcmul_(anchors[layer], (1.0 - c.transition[..., 0, 0])[..., None, None])
            matrices.append(new)
        new_state = NeuralMemoryState(
            matrices=matrices,
            chunk_weights=state.chunk_weights,
            chunk_lr=state.chunk_lr + tokens.lr[..., 0] if self.rule.budget else state.chunk_lr,
            conv=state.conv,
            seen=state.seen + 1,
            chunk_size=self.chunk_size,
            names=state.names,
            window_keys=None if state.window_keys is None else k[:, :, 1:].clone(),
            window_values=None if state.window_values is None else v[:, :, 1:].clone(),
            common_seen=None if state.common_seen is None else state.common_seen + 1,
        )
        reads = memory_mlp(new_state.weights, q, self.residual)
        seen = new_state.seen if new_state.common_seen is None else new_state.common_seen
        closes = seen % self.chunk_size == 0
        if _any(closes):
            carry = self._carry(new_state, anchors)
            self._close_chunk(closes, carry, anchors)
            new_state = self._new_state(new_state, carry, anchors, new_state.seen, new_state.common_seen)
        return reads, new_state

    def retrieve(
        self,
        hidden_states: torch.Tensor,
        weights: list[torch.Tensor],
        conv_tail: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read-only retrieval ``M_W(q)`` with fixed ``weights`` (no write), e.g. MAC's ``h = M*_{t-1}(q)``.

        The queries go through the same projection, causal conv + SiLU and l2-norm as in :meth:`forward`, with their
        own conv tail ``conv_tail`` (batch, conv_kernel - 1, heads * head_dim; ``None``: the start of a stream).
        Returns the memory output (shape of ``hidden_states``, zeros at masked tokens) and the new conv tail.
        """
        batch, length = self._check_inputs(hidden_states, mask)
        dtype = self.compute_dtype(hidden_states)
        inner = self.num_heads * self.head_dim
        packing = TokenPacking.of(mask)
        x, counts = packing.pack(hidden_states, zero_pads=True), packing.counts
        conv_weight = None
        if self.conv_weight is not None:
            conv_weight = self.conv_weight[:inner]
            if conv_tail is None:
                conv_tail = x.new_zeros(batch, self.conv_kernel - 1, inner)
        # Through the module, not its weight: adapters (PEFT's LoRA) and hooks on `qkv_proj` must see every call.
        queries, new_tail = self.causal_conv(self.qkv_proj(x)[..., :inner], conv_tail, conv_weight, counts)
        queries = queries.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2).to(dtype)
        queries = F.normalize(queries, dim=-1)
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            reads = memory_mlp([w.to(dtype) for w in weights], queries, self.residual)
        return packing.unpack(self.output(reads, x)), new_tail

    def _read_segments(self, weights: list[torch.Tensor], queries: torch.Tensor, segment: int) -> torch.Tensor:
        """``M_W(q)`` of every ``segment`` queries (batch, heads, length, d) with their segment's weights ``weights[l]``
        (batch, segments, heads, d_in, d_out), without writing."""
        length, segments = queries.shape[2], weights[0].shape[1]
        by_segment = _pad_time(queries, segments * segment).unflatten(2, (segments, segment))
        weights = [w.transpose(1, 2) for w in weights]  # (batch, heads, segments, d_in, d_out)
        return memory_mlp(weights, by_segment, self.residual).flatten(2, 3)[:, :, :length]

    # ---------------------------------------------------------------------------------------------------- checks

    def _check_inputs(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int]:
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got {type(hidden_states).__name__}.")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must have shape (batch, seq, {self.hidden_size}), got {tuple(hidden_states.shape)}."
            )
        batch, length, _ = hidden_states.shape
        if length == 0:
            raise ValueError("hidden_states has an empty sequence dimension; pass at least one token.")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must have shape (batch, seq) = {(batch, length)}, got {shape}.")
            if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must hold only 0 and 1 (or booleans).")
        return batch, length

    def check_state(self, state: NeuralMemoryState, batch_size: int) -> None:
        """Raises ``ValueError`` when ``state`` does not belong to this configuration or batch."""
        if not isinstance(state, NeuralMemoryState):
            raise ValueError(f"state must be a NeuralMemoryState, got {type(state).__name__}.")
        expected = [(batch_size, *w.shape) for w in self.initial_weights]
        names = self.rule.matrix_names()
        expected_matrices = [(b, h, len(names), i, o) for b, h, i, o in expected]
        found = [tuple(m.shape) for m in state.matrices]
        if found != expected_matrices or tuple(state.names) != names:
            raise ValueError(
                f"state does not match this memory: matrices {list(state.names)} of shapes {found}, expected "
                f"{list(names)} of shapes {expected_matrices} (batch, heads, matrices, d_in, d_out per layer; "
                f"memory_rule={self.rule.name!r}, momentum={self.use_momentum}). Was it made by a memory with another "
                "configuration or batch?"
            )
        if state.chunk_size != self.chunk_size:
            raise ValueError(
                f"state was made with chunk_size={state.chunk_size}, but this memory has chunk_size={self.chunk_size}."
            )
        if [tuple(w.shape) for w in state.chunk_weights] != expected:
            raise ValueError(f"state chunk_weights do not match this memory: expected {expected}.")
        if tuple(state.chunk_lr.shape) != (batch_size, self.num_heads):
            raise ValueError(
                f"state chunk_lr has shape {tuple(state.chunk_lr.shape)}, expected {(batch_size, self.num_heads)}."
            )
        expected_conv = (
            None
            if self.conv_weight is None
            else (batch_size, self.conv_kernel - 1, 3 * self.num_heads * self.head_dim)
        )
        found_conv = None if state.conv is None else tuple(state.conv.shape)
        if found_conv != expected_conv:
            raise ValueError(f"state conv tail has shape {found_conv}, expected {expected_conv}: another conv_kernel?")
        window = self.rule.window
        expected_window = None if window == 1 else (batch_size, self.num_heads, window - 1, self.head_dim)
        for name in ("window_keys", "window_values"):
            found = None if getattr(state, name) is None else tuple(getattr(state, name).shape)
            if found != expected_window:
                raise ValueError(f"state {name} has shape {found}, expected {expected_window}: another window?")

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, depth={self.depth}, expansion={self.expansion}, "
            f"chunk_size={self.chunk_size}, conv_kernel={self.conv_kernel}, momentum={self.use_momentum}, "
            f"forget={self.use_forget}, max_lr={self.max_lr}, max_weight_rms={self.max_weight_rms}"
        )
