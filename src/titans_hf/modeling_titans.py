# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""PyTorch Titans (Behrouz, Zhong, Mirrokni 2024): decoder layers holding the neural long-term memory.

Every variant of the paper is one pre-norm residual block made of the same two mixers, :class:`TitansAttention`
and :class:`~neural_memory.NeuralMemory`, plus a SwiGLU MLP:

- **LMM**  ``h = x + M(norm(x))``
- **MAL**  ``h = x + M(norm(x))``, then ``h = h + SWA(norm(h))``                        (memory as a layer)
- **MAG**  ``h = x + gate(SWA(norm(x)), M(norm(x)))``                                    (memory as a gate)
- **MAC**  per segment ``s``: ``hr = M*_{s-1}(q(norm(x)))`` read before the segment, ``y = Attn([P || hr || x])``,
  ``M`` written with ``norm(x)`` (or, ``mac_memory_input="attention"``, the paper's ``norm(y)``) and read back,
  ``h = x + gate(y, M(.))``                                                              (memory as context)

with ``gate(y, m) = RMSNorm(y) * sigmoid(RMSNorm(m))`` (paper §4.2/4.3: normalised outputs, non-linear gating) and
``P`` the persistent memory tokens. Choices the paper leaves open are documented where they are made and in the
README ("Design choices").

Pads: a block may hold padding anywhere (``attention_mask``). The layers move each row's real tokens to the front,
work on them alone, and leave pad positions unchanged, so positions, memory chunks and MAC segments are counted in
real tokens from each sequence's first one: a left-padded batch gives the same results as each prompt alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_titans import SegmentState, TitansCache, TitansCacheLayer, WindowState
from .configuration_titans import TitansConfig
from .conversion_titans import convert_base_model
from .neural_memory import NeuralMemory, NeuralMemoryState, TokenPacking, _select_rows, _where_batch

# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


class TitansRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float() if dtype in (torch.float16, torch.bfloat16) else hidden_states
        hidden_states = hidden_states * torch.rsqrt(
            hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon
        )
        return self.weight * hidden_states.to(dtype)


class TitansRotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) for the attention queries and keys, at per-sequence positions.

    Attention only sees distances inside its window or segment, so a model trained from scratch needs no scaling
    (`rope_type` "default"). A model converted from a pretrained base keeps the base's frequencies (`linear`,
    `llama3`, `yarn`: computed by Transformers' ``ROPE_INIT_FUNCTIONS``) and yarn's attention scaling, so that it
    starts as the base."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")  # what `_init_weights` recomputes with
        compute = (
            self.compute_default_rope_parameters
            if self.rope_type == "default"
            else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = compute(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: TitansConfig, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (
            base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim)
        )
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape (batch, seq, head_dim) for ``position_ids`` (batch, seq)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` (batch, heads, seq, head_dim) by ``cos, sin`` (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class TitansMLP(nn.Module):
    """Gated feed-forward block: ``down(act(gate(x)) * up(x))``, SwiGLU with the default ``hidden_act="silu"``."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TitansGate(nn.Module):
    """The paper's combination of attention and memory outputs (MAG, and MAC's ``y * M(y)``):
    ``RMSNorm(y) * sigmoid(RMSNorm(m))`` - both normalised with learnable weights, the memory through a sigmoid."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.attention_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.memory_norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, attention_output: torch.Tensor, memory_output: torch.Tensor) -> torch.Tensor:
        return self.attention_norm(attention_output) * torch.sigmoid(self.memory_norm(memory_output))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with a float mask; ``key``/``value`` may have fewer (grouped) heads."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# --------------------------------------------------------------------------------------------------------------------
# Where the real tokens are
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenLayout:
    """The real tokens of a block, packed to the front of each row for the layers.

    Attributes:
        packing: the :class:`~neural_memory.TokenPacking` of the block (identity when every token is real).
        counts: real tokens per row (batch,).
        real: (batch, seq) ``True`` for the packed real tokens (``j < counts``).
        seen: real tokens read before this block, per row (batch,).
        positions: (batch, seq) position of every packed token: ``seen + j``.
        length: the block length (``seq``).
        common_seen: ``seen`` as a host integer when it is the same for every row and known without reading the
            device (no padding so far), else ``None``: segment and window schedules then follow from shapes.
    """

    packing: TokenPacking
    counts: torch.Tensor
    real: torch.Tensor
    seen: torch.Tensor
    positions: torch.Tensor
    length: int
    common_seen: int | None = None

    @classmethod
    def build(
        cls, real: torch.Tensor | None, batch: int, length: int, seen: torch.Tensor, common_seen: int | None
    ) -> TokenLayout:
        device = seen.device
        steps = torch.arange(length, device=device)
        packing = TokenPacking.of(real)
        counts = packing.counts
        if counts is None:
            counts = torch.full((batch,), length, dtype=torch.long, device=device)
        real = steps.unsqueeze(0) < counts.unsqueeze(1)
        return cls(packing, counts, real, seen, seen.unsqueeze(1) + steps, length, common_seen)

    @property
    def all_real(self) -> bool:
        return self.packing.identity

    @property
    def memory_mask(self) -> torch.Tensor | None:
        return None if self.packing.identity else self.real


# --------------------------------------------------------------------------------------------------------------------
# Attention: sliding window (MAG, MAL) and segments (MAC), with persistent memory tokens
# --------------------------------------------------------------------------------------------------------------------


def window_mask_function(num_persistent: int, window: int, past: int, real: torch.Tensor) -> Callable:
    """Mask over keys ``[persistent || past window || block]`` for the block's queries (``q`` -> key ``past + q``).

    Persistent keys are always visible; a key is visible if it is real, not in the future and within ``window``
    of the query. Every query also sees itself, so that rows of padding stay finite.
    """

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        key = kv_idx - num_persistent
        query = q_idx + past
        holds_token = real[batch_idx, key.clamp(min=0)]
        return (kv_idx < num_persistent) | (key == query) | (holds_token & (key <= query) & (key > query - window))

    return mask


def segment_mask_function(num_persistent: int, segment: int, real: torch.Tensor) -> Callable:
    """Mask over keys ``[persistent || memory reads of the segment || segment]`` for the segment's queries.

    ``real`` (batch, 2 * segment) marks the keys that hold a token; slot ``j`` of either half is visible to the
    query in slot ``q`` when ``j <= q`` (paper §4.1: ``h_j`` and ``x_j`` visible to token ``i`` iff ``j <= i``).
    """

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        key = (kv_idx - num_persistent).clamp(min=0)
        slot = key % segment
        return (kv_idx < num_persistent) | (slot == q_idx) | (real[batch_idx, key] & (slot <= q_idx))

    return mask


def segment_step_mask_function(num_persistent: int, segment: int, slot: torch.Tensor) -> Callable:
    """:func:`segment_mask_function` for one query per row, in segment slot ``slot`` (batch,): the persistent keys
    and the slots ``<= slot`` of both halves (the earlier ones filled by previous calls) are visible."""

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx < num_persistent) | ((kv_idx - num_persistent).clamp(min=0) % segment <= slot[batch_idx])

    return mask


class TitansAttention(nn.Module):
    """Multi-head (grouped-query) attention with RoPE and persistent memory tokens, through Transformers'
    attention interface (eager / sdpa / flex) and mask helpers.

    Persistent memory (paper §3.3): ``num_persistent_tokens`` learned vectors of this layer, projected by the layer's
    key and value projections (no rotation), visible to every query and never leaving the window. Because they sit
    at the start of every sequence and causal attention lets nothing else reach them, the paper's input-level
    persistent tokens are input-independent constants at every layer; learning them per layer is that family with
    no per-sequence cost and nothing in the cache.
    """

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias)
        # Qwen3's per-head RMSNorm of the queries and keys, before RoPE (`qk_norm`).
        self.q_norm = TitansRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = TitansRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.num_persistent = config.num_persistent_tokens
        self.persistent = (
            nn.Parameter(torch.empty(self.num_persistent, config.hidden_size)) if self.num_persistent else None
        )

    # ------------------------------------------------------------------------------------------------ pieces

    def _heads(self, x: torch.Tensor, heads: int, norm: TitansRMSNorm | None = None) -> torch.Tensor:
        x = x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)
        return x if norm is None else norm(x)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(self._heads(self.q_proj(x), self.num_heads, self.q_norm), cos, sin)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = apply_rotary(self._heads(self.k_proj(x), self.num_key_value_heads, self.k_norm), cos, sin)
        return keys, self._heads(self.v_proj(x), self.num_key_value_heads)

    def persistent_key_values(
        self, batch: int, dtype: torch.dtype, state: WindowState | SegmentState | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The persistent tokens' keys and values, (batch, kv_heads, num_persistent, head_dim); ``None`` without.

        Projected once per stream and kept in the cache like the keys of past tokens: a call without gradients
        (decoding) takes them from ``state``; a call that records gradients projects them again, so that every call
        reaches the persistent tokens and the projections."""
        if self.persistent is None:
            return None
        cached = None if state is None else state.persistent_keys
        if cached is not None and not torch.is_grad_enabled() and cached.dtype == dtype and cached.shape[0] == batch:
            return cached, state.persistent_values
        p = self.persistent.to(dtype).unsqueeze(0)
        keys = self._heads(self.k_proj(p), self.num_key_value_heads, self.k_norm).expand(batch, -1, -1, -1)
        return keys, self._heads(self.v_proj(p), self.num_key_value_heads).expand(batch, -1, -1, -1)

    @staticmethod
    def with_persistent(
        keys: torch.Tensor, values: torch.Tensor, persistent: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepends the persistent keys and values (the same for every row; batch taken from ``keys``)."""
        if persistent is None:
            return keys, values
        shape = (keys.shape[0], -1, -1, -1)
        return tuple(torch.cat([p[:1].expand(shape), t], dim=2) for p, t in zip(persistent, (keys, values)))

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask_function: Callable | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs the configured attention implementation; returns (batch, q_len, heads * head_dim) and the weights.

        ``mask_function`` ``None``: every query sees every key (no mask is built)."""
        implementation = self.config._attn_implementation or "eager"
        mask = None
        if mask_function is not None:
            make_mask = ALL_MASK_ATTENTION_FUNCTIONS[
                implementation if implementation in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
            ]
            mask = make_mask(
                batch_size=query.shape[0],
                q_length=query.shape[2],
                kv_length=key.shape[2],
                mask_function=mask_function,
                attention_mask=None,
                allow_is_causal_skip=False,
                dtype=query.dtype,
                device=query.device,
            )
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, weights = interface(
            self,
            query,
            key,
            value,
            mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return out.reshape(query.shape[0], query.shape[2], -1), weights

    # ------------------------------------------------------------------------------------------------ MAG / MAL

    def forward_window(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: TokenLayout,
        state: WindowState | None,
        use_cache: bool,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, WindowState | None]:
        """Sliding-window attention of the packed block ``x`` over ``[persistent || last window || block]``.

        ``state`` holds the keys/values of the last ``sliding_window - 1`` real tokens before the block (``None``:
        the start of a stream). Long blocks are cut in query blocks that each see only their window, so the cost is
        linear in length. Returns the output, the attention weights (if asked, in packed order, of the last query
        block) and the new state (``None`` without ``use_cache`` or with a window of 1).
        """
        batch, length, _ = x.shape
        window = self.config.sliding_window
        past = window - 1
        cos, sin = position_embeddings
        queries = self.queries(x, cos, sin)
        keys, values = self.keys_values(x, cos, sin)
        persistent = self.persistent_key_values(batch, keys.dtype, state)
        if state is not None:
            past_keys, past_values = state.keys, state.values
        else:
            past_keys = keys.new_zeros(batch, self.num_key_value_heads, past, self.head_dim)
            past_values = torch.zeros_like(past_keys)
        # Past slot i holds position seen - past + i; it is real once that position is >= 0.
        past_real = torch.arange(past, device=x.device).unsqueeze(0) >= (past - layout.seen).clamp(min=0).unsqueeze(1)
        all_keys, all_values = torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2)
        all_real = torch.cat([past_real, layout.real], dim=1)

        block = length if output_attentions else max(window, 64)
        if length <= block:
            key, value = self.with_persistent(all_keys, all_values, persistent)
            # A decoding step whose window is full sees every key: no mask to build.
            if layout.common_seen is not None:
                full_window = layout.common_seen >= past
            else:
                full_window = bool((layout.seen >= past).all())
            everything_visible = length == 1 and layout.all_real and full_window
            mask = None if everything_visible else window_mask_function(self.num_persistent, window, past, all_real)
            out, weights = self.attend(queries, key, value, mask)
        else:
            # Query block b (positions [b B, (b+1) B)) sees block-local keys [b B, b B + past + B) of the extended
            # sequence; the blocks are folded into the batch.
            blocks = -(-length // block)
            pad = blocks * block - length
            span = past + block

            def fold_keys(
                t: torch.Tensor,
            ) -> torch.Tensor:  # (batch, heads, past + length, d) -> (batch * blocks, ...)
                t = F.pad(t, (0, 0, 0, pad)).unfold(2, span, block)  # (batch, heads, blocks, d, span)
                return t.permute(0, 2, 1, 4, 3).reshape(batch * blocks, t.shape[1], span, self.head_dim)

            folded_queries = F.pad(queries, (0, 0, 0, pad)).view(batch, self.num_heads, blocks, block, self.head_dim)
            folded_queries = folded_queries.transpose(1, 2).reshape(
                batch * blocks, self.num_heads, block, self.head_dim
            )
            folded_real = F.pad(all_real, (0, pad), value=False).unfold(1, span, block).reshape(batch * blocks, span)
            key, value = self.with_persistent(fold_keys(all_keys), fold_keys(all_values), persistent)
            mask = window_mask_function(self.num_persistent, window, past, folded_real)
            out, weights = self.attend(folded_queries, key, value, mask)
            out = out.view(batch, blocks * block, -1)[:, :length]

        new_state = None
        if use_cache and past > 0:
            # The last `past` real tokens: packed rows end their real tokens at past + counts.
            if layout.all_real:
                # (copies: a cache holding views would keep the whole block's keys alive)
                new_keys, new_values = all_keys[:, :, length:].clone(), all_values[:, :, length:].clone()
            else:
                index = (layout.counts.unsqueeze(1) + torch.arange(past, device=x.device)).view(batch, 1, past, 1)
                index = index.expand(batch, self.num_key_value_heads, past, self.head_dim)
                new_keys, new_values = all_keys.gather(2, index), all_values.gather(2, index)
            new_state = WindowState(new_keys, new_values, *(persistent or (None, None)))
        return self.o_proj(out), weights, new_state

    # ------------------------------------------------------------------------------------------------ MAC

    def forward_segment(
        self,
        x: torch.Tensor,
        reads: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        incoming: torch.Tensor,
        state: SegmentState | None,
        cached: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, SegmentState]:
        """MAC attention of one segment: queries from ``x`` (batch, segment, hidden) in segment slots, keys and
        values from ``[persistent || memory reads || segment]`` (paper eq. 21-22).

        ``incoming`` (batch, segment) marks the slots that hold this call's tokens; ``cached`` the earlier slots of a
        segment that a previous call started, whose keys and values are in ``state``. Returns the output, the
        weights and the segment's keys and values (a :class:`SegmentState` without memory weights).
        """
        queries, fresh = self._segment_projections(x, reads, position_embeddings, state)
        if state is not None and cached is not None:
            take_new = incoming.view(incoming.shape[0], 1, -1, 1)
            fresh = _merge_key_values(fresh, state, lambda t, old: torch.where(take_new, t, old))
        real = incoming if cached is None else incoming | cached
        halves = 1 if fresh.read_keys is None else 2  # memory reads and tokens, or tokens only
        mask = segment_mask_function(self.num_persistent, x.shape[1], real.repeat(1, halves))
        out, weights = self._attend_segment(queries, fresh, mask)
        return self.o_proj(out), weights, fresh

    def forward_segment_step(
        self,
        x: torch.Tensor,
        slot: torch.Tensor,
        reads: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        state: SegmentState | None,
    ) -> tuple[torch.Tensor, None, SegmentState]:
        """:meth:`forward_segment` for one token ``x`` per row (decoding) in segment slot ``slot`` (batch,): its keys and
        values go into that slot of the segment's ``state`` (``None``: a segment with no earlier token) and its
        query attends to the slots up to it. Returns the output (batch, 1, hidden), no weights and the segment's keys
        and values."""
        segment = self.config.segment_size
        queries, fresh = self._segment_projections(x, reads, position_embeddings, state)
        here = (torch.arange(segment, device=x.device) == slot.unsqueeze(1)).view(x.shape[0], 1, segment, 1)
        if state is None:
            empty = replace(fresh, persistent_keys=None, persistent_values=None)  # (persistent: from `fresh` below)
            state = empty.apply(lambda t: t.new_zeros(*t.shape[:2], segment, t.shape[-1]))
        updated = _merge_key_values(fresh, state, lambda t, old: torch.where(here, t, old))
        mask = segment_step_mask_function(self.num_persistent, segment, slot)
        out, _ = self._attend_segment(queries, updated, mask)
        return self.o_proj(out), None, updated

    def _segment_projections(
        self,
        x: torch.Tensor,
        reads: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        state: SegmentState | None,
    ) -> tuple[torch.Tensor, SegmentState]:
        """The queries of the segment's tokens, and the keys and values of the tokens and of their memory reads (at
        the same positions) and of the persistent tokens (from ``state`` when decoding)."""
        cos, sin = position_embeddings
        keys, values = self.keys_values(x, cos, sin)
        read_keys, read_values = (None, None) if reads is None else self.keys_values(reads, cos, sin)
        persistent = self.persistent_key_values(x.shape[0], keys.dtype, state) or (None, None)
        return self.queries(x, cos, sin), SegmentState(keys, values, read_keys, read_values, None, None, *persistent)

    def _attend_segment(
        self, queries: torch.Tensor, state: SegmentState, mask_function: Callable
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over ``[persistent || memory reads || segment]`` (paper eq. 21-22)."""
        keys = [t for t in (state.read_keys, state.keys) if t is not None]
        values = [t for t in (state.read_values, state.values) if t is not None]
        persistent = None if state.persistent_keys is None else (state.persistent_keys, state.persistent_values)
        key, value = self.with_persistent(torch.cat(keys, dim=2), torch.cat(values, dim=2), persistent)
        return self.attend(queries, key, value, mask_function)


def _merge_key_values(
    new: SegmentState, old: SegmentState, select: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> SegmentState:
    """A segment's keys and values taken from ``new`` or ``old`` by ``select(new_tensor, old_tensor)``, the persistent
    tokens' from ``new``; the other fields (memory weights, conv tail) from ``old``."""
    read_keys, read_values = (
        (None, None)
        if new.read_keys is None
        else (select(new.read_keys, old.read_keys), select(new.read_values, old.read_values))
    )
    return replace(
        old,
        keys=select(new.keys, old.keys),
        values=select(new.values, old.values),
        read_keys=read_keys,
        read_values=read_values,
        persistent_keys=new.persistent_keys,
        persistent_values=new.persistent_values,
    )


# --------------------------------------------------------------------------------------------------------------------
# Decoder layer
# --------------------------------------------------------------------------------------------------------------------


def memory_arguments(config: TitansConfig) -> dict:
    """:class:`~neural_memory.NeuralMemory`'s arguments for a layer of ``config``: every ``memory_*`` field but
    ``memory_layers``, without its prefix (``memory_chunk_size`` -> ``chunk_size``, ``memory_rule`` -> ``rule``), the
    rule's own settings, and the model's width, initialisation range and norm epsilon."""
    fields = [name for name in TitansConfig.__annotations__ if name.startswith("memory_") and name != "memory_layers"]
    arguments = {name.removeprefix("memory_"): getattr(config, name) for name in fields}
    return dict(
        arguments,
        **config.memory_rule_settings,
        hidden_size=config.hidden_size,
        initializer_range=config.initializer_range,
        norm_eps=config.rms_norm_eps,
    )


class TitansDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm residual block of the configured variant (see the module docstring)."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.variant = config.variant
        self.input_layernorm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = TitansAttention(config, layer_idx) if config.variant != "lmm" else None
        self.memory = None
        if layer_idx in config.memory_layers:
            self.memory = NeuralMemory(**memory_arguments(config))
        # MAL normalises the attention input separately from the memory input; MAG and MAC gate the two outputs.
        self.attention_layernorm = (
            TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if config.variant == "mal" and self.memory is not None
            else None
        )
        self.gate = TitansGate(config) if config.variant in ("mag", "mac") and self.memory is not None else None
        # MAC writes its memory with the segment's normed input (default) or, as in the paper's eq. 24, with the
        # attention output y, normalised like every other memory input (README, "Design choices").
        self.memory_layernorm = (
            TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if config.variant == "mac" and self.memory is not None and config.mac_memory_input == "attention"
            else None
        )
        self.post_attention_layernorm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = TitansMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: TokenLayout,
        layer_cache: TitansCacheLayer | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer on the packed block, continuing from ``layer_cache`` (this layer's states; updated in place),
        passed by the model rather than looked up by ``layer_idx``, so that a compiled layer serves every layer."""
        memory_state = None if layer_cache is None else layer_cache.memory
        attention_state = None if layer_cache is None else layer_cache.attention
        mixer = {
            "mac": self._memory_as_context,
            "mag": self._memory_as_gate,
            "mal": self._memory_as_layer,
            "lmm": self._memory_only,
        }[self.variant]
        x = layout.packing.pack(hidden_states)
        h, weights, memory_state, attention_state = mixer(
            x, position_embeddings, layout, memory_state, attention_state, layer_cache is not None, output_attentions
        )
        h = h + self.mlp(self.post_attention_layernorm(h))
        if layer_cache is not None:
            layer_cache.memory, layer_cache.attention = memory_state, attention_state
        return layout.packing.unpack(h, pads=hidden_states), weights

    # Each variant maps the packed block ``x`` and the layer's states to ``(x + mixed, attention weights, memory
    # state, attention state)``; the states are ``None`` where the layer has none or nothing was read yet.

    def _memory_only(
        self, x, position_embeddings, layout, memory_state, attention_state, use_cache, output_attentions
    ) -> tuple[torch.Tensor, None, NeuralMemoryState, None]:
        """LMM: ``h = x + M(norm(x))``."""
        memory_out, memory_state, _ = self.memory(self.input_layernorm(x), memory_state, layout.memory_mask)
        return x + memory_out, None, memory_state, None

    def _memory_as_layer(
        self, x, position_embeddings, layout, memory_state, attention_state, use_cache, output_attentions
    ) -> tuple[torch.Tensor, torch.Tensor | None, NeuralMemoryState | None, WindowState | None]:
        """MAL: ``h = x + M(norm(x))``, then ``h + SWA(norm(h))``."""
        h = x
        if self.memory is not None:
            memory_out, memory_state, _ = self.memory(self.input_layernorm(h), memory_state, layout.memory_mask)
            h = h + memory_out
        norm = self.attention_layernorm or self.input_layernorm
        attention_out, weights, attention_state = self.attention.forward_window(
            norm(h), position_embeddings, layout, attention_state, use_cache, output_attentions
        )
        return h + attention_out, weights, memory_state, attention_state

    def _memory_as_gate(
        self, x, position_embeddings, layout, memory_state, attention_state, use_cache, output_attentions
    ) -> tuple[torch.Tensor, torch.Tensor | None, NeuralMemoryState | None, WindowState | None]:
        """MAG: ``h = x + gate(SWA(norm(x)), M(norm(x)))``."""
        normed = self.input_layernorm(x)
        attention_out, weights, attention_state = self.attention.forward_window(
            normed, position_embeddings, layout, attention_state, use_cache, output_attentions
        )
        if self.memory is not None:
            memory_out, memory_state, _ = self.memory(normed, memory_state, layout.memory_mask)
            attention_out = self.gate(attention_out, memory_out)
        return x + attention_out, weights, memory_state, attention_state

    def _memory_as_context(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: TokenLayout,
        memory_state: NeuralMemoryState | None,
        segment_state: SegmentState | None,
        use_cache: bool,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, NeuralMemoryState | None, SegmentState | None]:
        """MAC, segment by segment (paper §4.1, eq. 21-25), for packed tokens at per-sequence positions.

        Each row's tokens are placed in segment slots (a row whose previous call stopped inside a segment starts at
        that slot, after the cached tokens), so that all rows run their segments together through :meth:`_segment`.
        A decoding step (one real token per row, with a cache) skips the slot frame: its token is slot
        ``seen % segment`` of its row's segment.
        """
        if use_cache and x.shape[1] == 1 and layout.all_real and not output_attentions:
            slot = layout.seen % self.config.segment_size
            # Whether the token continues a segment: on the host when every row is at the same place, so that the
            # segment's start weights are picked without a per-step select over the memory's weights.
            continuing = slot > 0 if layout.common_seen is None else layout.common_seen % self.config.segment_size > 0
            attend = functools.partial(
                self.attention.forward_segment_step,
                position_embeddings=position_embeddings,
                slot=slot,
                state=segment_state,
            )
            y, _, memory_state, segment_state = self._segment(
                self.input_layernorm(x),
                slice(None),
                attend,
                memory_state,
                segment_state,
                continuing=continuing,
                active=True,
                memory_slots=1,
                memory_mask=None,
            )
            return x + y, None, memory_state, segment_state

        frame = _SegmentFrame.build(layout, self.config.segment_size, x.shape[1])
        normed = frame.to_slots(self.input_layernorm(x))
        cos, sin = (frame.to_slots(t) for t in position_embeddings)
        if self._segments_at_once(frame, memory_state, segment_state, output_attentions):
            out, memory_state, segment_state = self._all_segments(normed, (cos, sin), frame)
            return x + frame.from_slots(out), None, memory_state, segment_state if use_cache else None
        outputs, all_weights = [], []
        for r in range(frame.rounds):
            part = frame.part(r)
            incoming = frame.incoming[:, part]
            memory_slots, memory_mask = frame.memory_slots(r)
            attend = functools.partial(
                self.attention.forward_segment,
                position_embeddings=(cos[:, part], sin[:, part]),
                incoming=incoming,
                state=segment_state,
                cached=frame.cached if r == 0 else None,
            )
            continuing = frame.phase > 0 if r == 0 else None
            y, weights, memory_state, segment_state = self._segment(
                normed,
                part,
                attend,
                memory_state,
                segment_state,
                continuing=continuing,
                active=incoming.any(dim=1),
                memory_slots=memory_slots,
                memory_mask=memory_mask,
            )
            outputs.append(y)
            if output_attentions:
                all_weights.append(weights)
        out = frame.from_slots(torch.cat(outputs, dim=1))
        weights = torch.cat(all_weights, dim=2) if output_attentions else None
        return x + out, weights, memory_state, segment_state if use_cache else None

    def _segments_at_once(
        self,
        frame: _SegmentFrame,
        memory_state: NeuralMemoryState | None,
        segment_state: SegmentState | None,
        output_attentions: bool,
    ) -> bool:
        """Whether every segment of the block can run at once (:meth:`_all_segments`): the memory is written with the
        segments' input (so its writes do not wait for attention, and its queries are the retrieval's), the block
        starts a stream (no memory or segment state), all its tokens are real, and segments are whole memory
        chunks."""
        return (
            self.memory is not None
            and self.memory_layernorm is None
            and frame.aligned
            and segment_state is None
            and not output_attentions
            and self.config.segment_size % self.config.memory_chunk_size == 0
            and memory_state is None
        )

    def _all_segments(
        self,
        slots: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        frame: _SegmentFrame,
    ) -> tuple[torch.Tensor, NeuralMemoryState, SegmentState]:
        """:meth:`_segment` for every segment of an aligned block that starts a stream, in one pass each: the memory
        reads and writes the whole block once and, from the same queries, reads every segment with its weights at the
        segment's start (its retrieval; ``NeuralMemory(..., segment=)``); attention runs over the segments folded
        into the batch. The same numbers as the segment loop (tested against it: the full forward against cached
        decoding)."""
        batch, slots_total, hidden = slots.shape
        segment, rounds, length = self.config.segment_size, frame.rounds, frame.length
        real = slots[:, :length]
        memory_out, memory_state, retrieval = self.memory(real, None, segment=segment)
        reads = retrieval.output

        def fold(t: torch.Tensor) -> torch.Tensor:  # (batch, rounds * segment, ...) -> (batch * rounds, segment, ...)
            return _pad_slots(t, slots_total).reshape(batch * rounds, segment, *t.shape[2:])

        y, _, key_values = self.attention.forward_segment(
            fold(slots),
            fold(reads),
            tuple(fold(t) for t in position_embeddings),
            incoming=fold(frame.incoming),
            state=None,
            cached=None,
        )
        y = self.gate(y, fold(memory_out)).reshape(batch, slots_total, hidden)
        # The segment a cache continues, copied out (views would keep every segment's keys and weights alive).
        last = key_values.apply(lambda t: t.unflatten(0, (batch, rounds))[:, -1].clone())
        return (
            y,
            memory_state,
            replace(last, start_weights=[w[:, -1].clone() for w in retrieval.start_weights], read_conv=retrieval.conv),
        )

    def _segment(
        self,
        slots: torch.Tensor,
        part: slice,
        attend: Callable[..., tuple[torch.Tensor, torch.Tensor | None, SegmentState]],
        memory_state: NeuralMemoryState | None,
        segment_state: SegmentState | None,
        *,
        continuing: torch.Tensor | bool | None,
        active: torch.Tensor | bool,
        memory_slots: int,
        memory_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, NeuralMemoryState | None, SegmentState]:
        """One MAC segment (eq. 21-25): the normed tokens in segment slots ``slots[:, part]`` (batch, segment, hidden).

        ``h = M*(q(x))`` with the weights from the start of the segment (read-only; rows ``continuing`` a segment
        started by an earlier call read with the cached start weights), ``y = attend(x, h)`` over ``[persistent || h
        || x]``, the memory written with ``x`` (or ``norm(y)``, see ``mac_memory_input``) and read back,
        ``o = gate(y, M(.))``. The memory sees the first ``memory_slots`` slots under ``memory_mask`` (``None``: all real);
        rows not ``active`` (no token in the segment) keep their segment state.
        """
        # (Sliced at each use: the backward then adds the three gradients of the segment in one fixed order.)
        segment = slots[:, part].shape[1]
        reads = start_weights = None
        fresh = []  # the start weights as views of the memory state's matrices (a segment start)
        read_conv = None if segment_state is None else segment_state.read_conv
        if self.memory is not None:
            if memory_state is None:
                memory_state = self.memory.initial_state(
                    slots.shape[0], slots.device, self.memory.compute_dtype(slots)
                )
            start_weights = fresh = memory_state.weights
            cached_weights = None if segment_state is None else segment_state.start_weights
            if continuing is not None and cached_weights is not None:
                start_weights = [_where_batch(continuing, s, w) for s, w in zip(cached_weights, start_weights)]
            reads, read_conv = self.memory.retrieve(
                slots[:, part][:, :memory_slots], start_weights, read_conv, memory_mask
            )
            reads = _pad_slots(reads, segment)
            if segment_state is not None and segment_state.start_weights is not None:
                start_weights = _select_rows(active, start_weights, segment_state.start_weights)
        y, weights, key_values = attend(slots[:, part], reads=reads)
        if segment_state is not None:
            key_values = _merge_key_values(key_values, segment_state, lambda t, old: _where_batch(active, t, old))
        # Copied where they are views of the memory state's matrices, which the cache must not keep alive (`contiguous`
        # would not do: with one head and one row a slot is a contiguous view); cached or selected ones are owned.
        if start_weights is not None:
            start_weights = [w.clone() if any(w is f for f in fresh) else w for w in start_weights]
        segment_state = replace(key_values, start_weights=start_weights, read_conv=read_conv)
        if self.memory is not None:
            written = slots[:, part] if self.memory_layernorm is None else self.memory_layernorm(y)
            memory_out, memory_state, _ = self.memory(written[:, :memory_slots], memory_state, memory_mask)
            y = self.gate(y, _pad_slots(memory_out, segment))
        return y, weights, memory_state, segment_state


def _pad_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
    """Zero rows after the real ones, up to ``slots`` (dimension 1)."""
    return F.pad(x, (0, 0, 0, slots - x.shape[1]))


@dataclass
class _SegmentFrame:
    """Where each packed token of a MAC block sits in segment slots: row ``b``'s token ``j`` in slot ``phase_b + j``
    (``phase``: slots of the row's current segment filled by earlier calls), over ``rounds`` segments.

    ``aligned`` (every row at a segment start, every token real; known on the host) makes the frame the identity
    padded to whole segments, and lets the memory see just the real slots without a mask.
    """

    phase: torch.Tensor
    token: torch.Tensor
    incoming: torch.Tensor
    cached: torch.Tensor
    rounds: int
    segment: int
    length: int
    aligned: bool

    @classmethod
    def build(cls, layout: TokenLayout, segment: int, length: int) -> _SegmentFrame:
        phase = layout.seen % segment
        if layout.common_seen is not None and layout.all_real:  # from shapes, on the host
            span = layout.common_seen % segment + length
            aligned = layout.common_seen % segment == 0
        else:
            span = int((phase + layout.counts).max())
            aligned = bool((phase == 0).all()) and layout.all_real
        rounds = max(1, -(-span // segment))
        slots = torch.arange(rounds * segment, device=phase.device)
        token = slots.unsqueeze(0) - phase.unsqueeze(1)  # packed token held by each slot
        incoming = (token >= 0) & (token < layout.counts.unsqueeze(1))
        cached = torch.arange(segment, device=phase.device).unsqueeze(0) < phase.unsqueeze(1)
        return cls(phase, token, incoming, cached, rounds, segment, length, aligned)

    def part(self, r: int) -> slice:
        return slice(r * self.segment, (r + 1) * self.segment)

    def memory_slots(self, r: int) -> tuple[int, torch.Tensor | None]:
        """The slots of segment ``r`` the memory reads and writes, and their mask: aligned rows are real up to a
        host-known slot (no mask, nothing to read from the device); otherwise the mask of new tokens."""
        if self.aligned:
            return min(self.segment, self.length - r * self.segment), None
        return self.segment, self.incoming[:, self.part(r)]

    def to_slots(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, length, ...) packed tokens -> (batch, rounds * segment, ...) slots."""
        if self.aligned:
            return F.pad(t, (0, 0, 0, self.rounds * self.segment - self.length))
        index = self.token.clamp(0, self.length - 1).view(t.shape[0], -1, 1).expand(-1, -1, t.shape[-1])
        return t.gather(1, index)

    def from_slots(self, out: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_slots`."""
        if self.aligned:
            return out[:, : self.length]
        # Pads (packed after the real tokens) may point past the last segment: any slot does (restored later).
        steps = torch.arange(self.length, device=out.device).unsqueeze(0)
        index = (steps + self.phase.unsqueeze(1)).clamp(max=out.shape[1] - 1)
        return out.gather(1, index.view(out.shape[0], self.length, 1).expand(-1, -1, out.shape[-1]))


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class TitansPreTrainedModel(PreTrainedModel):
    config: TitansConfig
    config_class = TitansConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TitansDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False  # the masks (persistent tokens, segments, per-row windows) are not flash patterns
    _supports_attention_backend = True
    _is_stateful = True  # the memory cannot be rolled back: no assisted generation, no cache cropping
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "hidden_states": OutputRecorder(TitansDecoderLayer, index=0),
        "attentions": OutputRecorder(TitansDecoderLayer, index=1),
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As in Transformers, plus an ``auto_map`` for every Auto class (``AutoConfig``, ``AutoModel``, the causal LM
        and the task heads), so that the folder loads with ``trust_remote_code=True`` without the package, as any of
        them (a language model's checkpoint can start a classifier)."""
        self.config.auto_map = {
            "AutoConfig": "configuration_titans.TitansConfig",
            "AutoModel": "modeling_titans.TitansModel",
            "AutoModelForCausalLM": "modeling_titans.TitansForCausalLM",
            "AutoModelForSequenceClassification": "modeling_titans.TitansForSequenceClassification",
            "AutoModelForTokenClassification": "modeling_titans.TitansForTokenClassification",
            "AutoModelForQuestionAnswering": "modeling_titans.TitansForQuestionAnswering",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As in Transformers, with two safety rules.

        - Weights load from safetensors only: no pickle (``pytorch_model.bin``) is ever read.
        - The weights must match the configuration: tensors of another shape, tensors the model needs that the
          checkpoint lacks, and tensors of the checkpoint the model has no place for raise a ``ValueError`` naming
          them (Transformers would re-initialise or drop them with a warning). ``ignore_mismatched_sizes=True``
          re-initialises tensors of another shape as in Transformers. Task heads are not the base model: a head
          the checkpoint lacks (e.g. ``score`` when a language model's checkpoint starts a classifier) is
          initialised as usual, and another task's head in the checkpoint (its ``lm_head``) is left out; but a
          checkpoint saved by the same class must hold its head (e.g. a language model's untied ``lm_head``).

        A truncated or corrupt weights file raises a ``ValueError`` naming the checkpoint.
        """
        import os

        from safetensors import SafetensorError

        source = str(pretrained_model_name_or_path)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("Titans checkpoints load from safetensors only; use_safetensors=False is not supported.")
        if os.path.isdir(source):
            files = os.listdir(source)
            if not any(f.endswith(".safetensors") for f in files):
                pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
                if pickled:
                    raise ValueError(
                        f"{source} holds pickled weights ({', '.join(pickled)}) but no safetensors file. Titans loads "
                        "safetensors only (unpickling can run arbitrary code): convert them with a trusted copy, "
                        "e.g. model.load_state_dict(torch.load(path, weights_only=True)); model.save_pretrained(dir)."
                    )
        kwargs["use_safetensors"] = True
        ignore_mismatched_sizes = bool(kwargs.pop("ignore_mismatched_sizes", False))
        output_loading_info = bool(kwargs.pop("output_loading_info", False))
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
        except SafetensorError as error:
            raise ValueError(
                f"Could not read the weights of {source}: {error}. The safetensors file is truncated or corrupt (an "
                "interrupted download or copy?): download or save it again."
            ) from error

        base_names = {name for name, _ in model.base_model.named_children()}

        def base(key: str) -> bool:  # a tensor of the base model, with or without its prefix (not of a task head)
            return key.removeprefix(f"{cls.base_model_prefix}.").split(".")[0] in base_names

        def listing(keys: list[str]) -> str:
            keys = sorted(keys)
            return ", ".join(keys[:12]) + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")

        mismatched = [] if ignore_mismatched_sizes else sorted(info["mismatched_keys"])
        # A checkpoint of this very class (not a head started from another task's checkpoint) must hold its head too,
        # e.g. a causal LM's untied lm_head.
        own_checkpoint = cls.__name__ in (model.config.architectures or ())
        missing = [k for k in info["missing_keys"] if base(k) or own_checkpoint]
        unexpected = [k for k in info["unexpected_keys"] if base(k)]  # another task's head (lm_head, score) is dropped
        if mismatched or missing or unexpected:
            problems = []
            if mismatched:
                shapes = [f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in mismatched]
                problems.append(f"tensors of another shape: {listing(shapes)}")
            if missing:
                problems.append(f"tensors the model needs but the checkpoint lacks: {listing(missing)}")
            if unexpected:
                problems.append(f"tensors of the checkpoint the model has no place for: {listing(unexpected)}")
            raise ValueError(
                f"The weights of {source} do not match its configuration:\n- " + "\n- ".join(problems) + "\nWas the "
                "configuration edited, or the weights saved by a model of another configuration?"
            )
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TitansAttention) and module.persistent is not None:
            init.normal_(module.persistent, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, NeuralMemory):
            module.reset_parameters(init=init)


class TitansModel(TitansPreTrainedModel):
    """The bare Titans decoder: embeddings, :class:`TitansDecoderLayer` stack, final norm."""

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TitansDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = TitansRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache", raise_if_both_names=True)
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids / inputs_embeds: the new tokens, (batch, seq) or (batch, seq, hidden_size).
        attention_mask: (batch, seq) or (batch, cached positions + seq), 1 for real tokens and 0 for padding, which
            may sit anywhere; padding never enters the memory.
        position_ids: optional; Titans counts positions in real tokens from each sequence's first one (as
            `generate` does). Other positions (e.g. packed sequences) raise a `ValueError`: the memory reads a
            stream in order.
        cache: a [`TitansCache`] to continue from (an empty `DynamicCache`, as `generate` passes, is replaced).
        """
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        batch, length = inputs_embeds.shape[:2]
        output_attentions = kwargs.get("output_attentions", False)
        if output_attentions and self.config._attn_implementation not in (None, "eager"):
            raise ValueError("output_attentions=True needs attn_implementation='eager'.")

        if use_cache or cache is not None:
            cache = self._titans_cache(cache, batch, self._activation_dtype(inputs_embeds))
        seen = (
            cache.seen
            if cache is not None and cache.seen is not None
            else torch.zeros(batch, dtype=torch.long, device=inputs_embeds.device)
        )
        real = self._real_tokens(attention_mask, batch, length, cache)
        common_seen = 0 if cache is None or cache.seen is None else cache.common_seen
        layout = TokenLayout.build(real, batch, length, seen.to(inputs_embeds.device), common_seen)
        if position_ids is not None:
            self._check_positions(position_ids, layout)

        position_embeddings = self.rotary_emb(inputs_embeds, layout.positions)
        hidden_states = inputs_embeds
        for i, layer in enumerate(self.layers):
            hidden_states, _ = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                layout=layout,
                layer_cache=None if cache is None else cache.layers[i],
                output_attentions=output_attentions,
            )
        hidden_states = self.norm(hidden_states)
        if cache is not None:
            cache.seen = seen + layout.counts
            cache.common_seen = common_seen + length if common_seen is not None and layout.all_real else None
            cache.positions_read += length
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)

    # ------------------------------------------------------------------------------------------------ input checks

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is not None:
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise TypeError("inputs_embeds must be a floating-point tensor (batch, seq, hidden_size).")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, seq, {self.config.hidden_size}), got "
                    f"{tuple(inputs_embeds.shape)}."
                )
            if inputs_embeds.numel() == 0:
                raise ValueError(
                    f"inputs_embeds is empty (shape {tuple(inputs_embeds.shape)}): pass at least one sequence of at "
                    "least one token."
                )
            return inputs_embeds
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}.")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}.")
        if input_ids.numel() == 0:
            raise ValueError(
                f"input_ids is empty (shape {tuple(input_ids.shape)}): pass at least one sequence of at least one token."
            )
        # Checked on the device, without a host synchronisation: on CPU it raises here, on a GPU at the next
        # synchronisation (as an out-of-range index would in the embedding, with a less clear message).
        in_vocabulary = ((input_ids >= 0) & (input_ids < self.config.vocab_size)).all()
        torch._assert_async(in_vocabulary, f"input_ids must lie in [0, {self.config.vocab_size}) (the vocabulary).")
        return self.embed_tokens(input_ids)

    @staticmethod
    def _activation_dtype(inputs_embeds: torch.Tensor) -> torch.dtype | None:
        """The dtype of the layers' attention tensors, which a cache must hold; ``None`` (not checked) under
        autocast, which picks a dtype per op (e.g. rotated keys stay float32)."""
        if torch.is_autocast_enabled(inputs_embeds.device.type):
            return None
        return inputs_embeds.dtype

    def _titans_cache(self, cache: Cache | None, batch: int, dtype: torch.dtype | None) -> TitansCache:
        if cache is None:
            return TitansCache(self.config)
        if not isinstance(cache, TitansCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                return TitansCache(self.config)  # generate() passes an empty DynamicCache
            raise ValueError(
                f"Titans needs a TitansCache (or an empty cache to replace), got a non-empty {type(cache).__name__}."
            )
        cache.check(self.config, batch, dtype)
        return cache

    @staticmethod
    def _real_tokens(
        attention_mask: torch.Tensor | None, batch: int, length: int, cache: TitansCache | None
    ) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(
                f"attention_mask must be a 2D (batch, seq) tensor of 0/1 (Titans builds its own attention masks), got "
                f"{shape}."
            )
        past = 0 if cache is None else cache.positions_read
        if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (length, past + length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, {length}) for the new "
                f"tokens" + (f" or ({batch}, {past + length}) for the cached and new ones." if past else ".")
            )
        mask = attention_mask[:, -length:]
        if mask.dtype != torch.bool:  # checked on the device (no host synchronisation), like input_ids
            torch._assert_async(((mask == 0) | (mask == 1)).all(), "attention_mask must hold only 0 and 1.")
        return mask.to(torch.bool)

    @staticmethod
    def _check_positions(position_ids: torch.Tensor, layout: TokenLayout) -> None:
        position_ids = position_ids.to(layout.positions.device)
        if position_ids.dim() != 2 or position_ids.shape[-1] != layout.length:
            raise ValueError(
                f"position_ids must have shape (batch, {layout.length}), got {tuple(position_ids.shape)}."
            )
        expected = layout.positions
        got = layout.packing.pack(position_ids.expand(layout.real.shape[0], -1))
        torch._assert_async(  # on the device, like the token ids: generate() passes positions at every step
            ((got == expected) | ~layout.real).all(),
            "position_ids disagree with the positions Titans counts (real tokens since each sequence's first one, "
            "continuing the cache). Titans reads a stream in order: drop position_ids, or pass cumsum(mask) - 1.",
        )


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    """Titans with a language-modelling head (tied to the input embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # unless tie_word_embeddings=False

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_base_model(
        cls,
        base: PreTrainedModel | str,
        variant: str = "mal",
        sliding_window: int | None = None,
        memory_layers: list[int] | None = None,
        **config_overrides,
    ) -> TitansForCausalLM:
        r"""
        A pretrained `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM` (loaded, or a
        folder / Hub id) as a Titans model that starts as the base: MAL with the base's attention, MLP, norms,
        embeddings and head, and a new memory in `memory_layers` whose output starts at zero. On any sequence no
        longer than `sliding_window` (default: the base's own window, else its trained context) the logits are the
        base's; beyond it, it is the base with sliding-window attention plus a memory to fine-tune. The other variants,
        persistent tokens and bases Titans cannot hold exactly are refused with the reason. `config_overrides` set the
        memory (`memory_chunk_size`, `memory_depth`, ...). See `conversion_titans.py`.

        ```python
        >>> model = TitansForCausalLM.from_base_model("Qwen/Qwen3-0.6B", sliding_window=4096, memory_chunk_size=64)
        ```
        """
        return convert_base_model(cls, base, variant, sliding_window, memory_layers, **config_overrides)

    # The task's arguments are named here; the model's (cache, inputs_embeds, use_cache, ...) pass through **kwargs.
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels: (batch, seq) token ids, -100 to ignore; shifted inside (the model predicts the next token).
        logits_to_keep: compute logits for the last `logits_to_keep` positions only (0: all).
        The other arguments (`cache`, `inputs_embeds`, `use_cache`, `position_ids`, ...) are [`TitansModel`]'s.

        ```python
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/titans", trust_remote_code=True)
        >>> out = model(input_ids, labels=input_ids)
        >>> out.loss.backward()
        ```
        """
        outputs: BaseModelOutputWithPast = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# --------------------------------------------------------------------------------------------------------------------
# Task heads
# --------------------------------------------------------------------------------------------------------------------


def last_real_token(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: int | None,
    batch_size: int,
    seq_len: int,
) -> torch.Tensor:
    """Index of each row's last real token among the ``seq_len`` new positions (left or right padding).

    From ``attention_mask`` when given (its last ``seq_len`` columns: with a cache it may cover the past tokens too),
    else from the tokens that differ from ``pad_token_id``, else the last position (one row only: with several rows
    and neither, padding cannot be told apart). A row with no real token gives 0."""
    if attention_mask is not None:
        real = attention_mask[:, -seq_len:].bool()
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids != pad_token_id
    elif batch_size == 1:
        return torch.full((1,), seq_len - 1, dtype=torch.long)
    else:
        raise ValueError(
            f"Cannot find the last real token of {batch_size} rows without an attention_mask (or input_ids and a "
            "config.pad_token_id): pass the tokenizer's attention_mask."
        )
    positions = torch.arange(seq_len, device=real.device)
    return (positions * real).argmax(-1)


class _TitansWithScoreHead(TitansPreTrainedModel):
    """A [`TitansModel`] with a linear ``score`` head of ``config.num_labels`` outputs: the classifiers below. Their
    ``forward`` takes ``input_ids``, ``attention_mask`` and ``labels``; the other arguments (``position_ids``,
    ``cache``, ``inputs_embeds``, ``use_cache``, ...) are [`TitansModel`]'s."""

    score_bias = True

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = TitansModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=self.score_bias)
        self.post_init()

    def classify(
        self, outputs: BaseModelOutputWithPast, labels: torch.Tensor | None, **inputs
    ) -> SequenceClassifierOutputWithPast | TokenClassifierOutput:
        """The head: the base model's outputs (and ``input_ids`` / ``attention_mask``) to the task's outputs."""
        raise NotImplementedError

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | TokenClassifierOutput:
        outputs: BaseModelOutputWithPast = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.classify(outputs, labels, input_ids=input_ids, attention_mask=attention_mask)


class TitansForSequenceClassification(_TitansWithScoreHead):
    """Titans with a linear head on each row's last real token (the usual decoder classifier, as in Llama).

    ``labels``: (batch,) class ids (cross-entropy), or floats for ``config.problem_type="regression"`` /
    ``"multi_label_classification"``, as in Transformers' other sequence classifiers.
    """

    score_bias = False

    def classify(
        self,
        outputs: BaseModelOutputWithPast,
        labels: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> SequenceClassifierOutputWithPast:
        logits = self.score(outputs.last_hidden_state)
        batch_size, seq_len = logits.shape[:2]
        last = last_real_token(input_ids, attention_mask, self.config.pad_token_id, batch_size, seq_len)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last.to(logits.device)]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class TitansForTokenClassification(_TitansWithScoreHead):
    """Titans with a linear head on every token (dropout ``config.classifier_dropout``, 0.1 if unset).

    ``labels``: (batch, seq) class ids, -100 to ignore (e.g. padding).
    """

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)

    def classify(
        self, outputs: BaseModelOutputWithPast, labels: torch.Tensor | None, **inputs
    ) -> TokenClassifierOutput:
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class TitansForQuestionAnswering(TitansPreTrainedModel):
    """Titans with a span head (start and end logits per token), for extractive question answering."""

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput:
        r"""
        start_positions, end_positions: (batch,) token indices of the answer span.
        The other arguments (`position_ids`, `cache`, `inputs_embeds`, `use_cache`, ...) are [`TitansModel`]'s.
        """
        outputs: BaseModelOutputWithPast = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(-1)
        start_logits, end_logits = start_logits.contiguous(), end_logits.contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "TitansForCausalLM",
    "TitansForQuestionAnswering",
    "TitansForSequenceClassification",
    "TitansForTokenClassification",
    "TitansModel",
    "TitansPreTrainedModel",
]
