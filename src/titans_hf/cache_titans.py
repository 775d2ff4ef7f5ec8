# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""``TitansCache``: the exact, constant-size decoding state of a Titans model.

Per layer it holds what the layer needs to continue a stream at any token, exactly:

- the neural memory's :class:`~neural_memory.NeuralMemoryState` (current fast weights and momentum per sequence
  and head, the weights at the last chunk boundary where the current chunk's gradients are taken, the conv tail);
- MAG / MAL: the keys and values of the last ``sliding_window - 1`` tokens;
- MAC: the keys and values of the current segment's tokens and of their memory reads, the memory weights at the
  segment start (the reads of a segment all use them) and the conv tail of the read queries.

Its size does not depend on how many tokens were read. Every tensor has the batch first, so beam search
(``reorder_cache``), ``num_return_sequences`` (``batch_repeat_interleave``) and batch pruning
(``batch_select_indices``) act on all of them alike. ``save`` / ``load`` snapshot a cache to safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import Cache, CacheLayerMixin

from .neural_memory import BatchTensors, NeuralMemoryState

# Fields of a config that fix the shapes and the meaning of a cache.
_SIGNATURE_FIELDS = (
    "variant",
    "num_hidden_layers",
    "hidden_size",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "segment_size",
    "mac_memory_input",
    "memory_layers",
    "memory_depth",
    "memory_expansion",
    "memory_num_heads",
    "memory_head_dim",
    "memory_chunk_size",
    "memory_conv_kernel",
    "memory_momentum",
    "memory_rule",
)


def config_signature(config) -> dict:
    """The fields of ``config`` that fix the shapes and the meaning of a cache (the memory rule's own settings
    included)."""
    return dict({name: getattr(config, name) for name in _SIGNATURE_FIELDS}, **config.memory_rule_settings)


@dataclass
class WindowState(BatchTensors):
    """MAG / MAL attention: keys and values of the last ``sliding_window - 1`` real tokens before the next block,
    right-aligned (slot ``i`` holds position ``seen - (sliding_window - 1) + i``), (batch, kv_heads, window - 1, head_dim),
    and those of the persistent tokens, (batch, kv_heads, num_persistent_tokens, head_dim) (``None`` without; projected
    once per stream, see ``TitansAttention.persistent_key_values``)."""

    keys: torch.Tensor
    values: torch.Tensor
    persistent_keys: torch.Tensor | None = None
    persistent_values: torch.Tensor | None = None


@dataclass
class SegmentState(BatchTensors):
    """MAC: the current segment, slot ``j`` holding its ``j``-th token (slots of tokens not read yet hold anything).

    Attributes:
        keys, values: of the segment's tokens, (batch, kv_heads, segment_size, head_dim).
        read_keys, read_values: of their memory reads ``h`` (same shapes; ``None`` in a layer without memory).
        start_weights: the memory's fast weights at the segment's start, with which all its tokens read the memory
            (per memory layer, (batch, heads, d_in, d_out), kept in the memory's dtype); ``None`` without memory.
        read_conv: the conv tail of the read queries (batch, conv_kernel - 1, heads * head_dim), or ``None``.
        persistent_keys, persistent_values: of the persistent tokens, as in :class:`WindowState`.
    """

    keys: torch.Tensor
    values: torch.Tensor
    read_keys: torch.Tensor | None = None
    read_values: torch.Tensor | None = None
    start_weights: list[torch.Tensor] | None = None
    read_conv: torch.Tensor | None = None
    persistent_keys: torch.Tensor | None = None
    persistent_values: torch.Tensor | None = None


# Fields of the attention states that hold memory weights: they keep the memory's dtype (float32 under bf16).
_MEMORY_FIELDS = ("start_weights",)

# Attention states by the name under which a snapshot stores them.
_ATTENTION_STATES = {"window": WindowState, "segment": SegmentState}


class TitansCacheLayer(CacheLayerMixin):
    """One layer's state: ``memory`` (:class:`NeuralMemoryState`) and ``attention`` (:class:`WindowState` for MAG /
    MAL, :class:`SegmentState` for MAC), each ``None`` where the layer has none or has read nothing yet."""

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.memory: NeuralMemoryState | None = None
        self.attention: WindowState | SegmentState | None = None

    # The attention state is not a growing key/value list, so the generic CacheLayerMixin hooks do not apply.
    def lazy_initialization(self, key_states, value_states) -> None:
        raise NotImplementedError("TitansCacheLayer is filled by the Titans layers themselves.")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("TitansCacheLayer is filled by the Titans layers themselves.")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError("Use TitansCache.get_seq_length().")

    def get_max_length(self) -> int:
        return -1

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Applies ``fn`` to every tensor, in place (the batch operations of :class:`TitansCache` go through it)."""
        self.memory = None if self.memory is None else self.memory.apply(fn)
        self.attention = None if self.attention is None else self.attention.apply(fn)

    def reset(self) -> None:
        self.memory = None
        self.attention = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "A TitansCache cannot be cropped: the neural memory has folded every token into its weights. Keep a copy "
            "(TitansCache.copy() or save()) of the state you want to return to."
        )

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, state in (("memory", self.memory), (_attention_name(self.attention), self.attention)):
            if state is not None:
                out.update({f"{prefix}{name}.{key}": t for key, t in state.tensors().items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], chunk_size: int, names: tuple[str, ...]) -> None:
        """Inverse of :meth:`state_dict` (without its prefix); ``chunk_size`` and ``names`` (the memory state's
        matrices) are the settings of the memory state."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            group, _, key = name.partition(".")
            if group != "memory" and group not in _ATTENTION_STATES or not key:
                raise ValueError(f"Unknown entry {name!r} in a TitansCache snapshot layer: not written by titans-hf.")
            groups.setdefault(group, {})[key] = t
        if "memory" in groups:
            self.memory = NeuralMemoryState.from_tensors(groups.pop("memory"), chunk_size, names)
        for group, state in groups.items():
            self.attention = _ATTENTION_STATES[group].from_tensors(state)


def _attention_name(state: WindowState | SegmentState | None) -> str:
    return next((name for name, cls in _ATTENTION_STATES.items() if isinstance(state, cls)), "")


class TitansCache(Cache):
    """Decoding state of a :class:`TitansForCausalLM`, one :class:`TitansCacheLayer` per decoder layer.

    ``get_seq_length()`` is the number of token positions read so far (padding included, as ``generate`` counts
    them); ``seen`` holds the number of real tokens per sequence, from which positions and chunk/segment
    boundaries are counted.

    ```python
    >>> cache = TitansCache(model.config)
    >>> for block in document_ids.split(4096, dim=1):          # stream a long document, in constant memory
    ...     model(input_ids=block, cache=cache, logits_to_keep=1)
    >>> cache.save("memory.safetensors")                        # what the model memorised, for later
    ```
    """

    is_compileable = False

    def __init__(self, config, **kwargs):
        super().__init__(layers=[TitansCacheLayer() for _ in range(config.num_hidden_layers)])
        self.signature = config_signature(config)
        self.seen: torch.Tensor | None = None  # (batch,) real tokens read per sequence
        # `seen` as a host integer while every sequence has read the same (no padding so far): the layers then
        # schedule windows, segments and chunks from shapes, without reading the device.
        self.common_seen: int | None = None
        self.positions_read = 0  # token positions read, padding included

    # ------------------------------------------------------------------------------------------------ queries

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.positions_read

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.seen is None else self.seen.shape[0]

    @property
    def is_initialized(self) -> bool:
        return self.seen is not None

    @property
    def nbytes(self) -> int:
        """Bytes held in tensors (constant once the first block has been read)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def check(self, config, batch_size: int, dtype: torch.dtype | None = None) -> None:
        """Raises ``ValueError`` if this cache belongs to another configuration, batch size or (if given) activation
        dtype (that of its attention tensors; the memory state is float32 for half-precision models)."""
        signature = config_signature(config)
        if signature != self.signature:
            different = {k: (self.signature.get(k), v) for k, v in signature.items() if self.signature.get(k) != v}
            raise ValueError(
                f"This TitansCache was made for another configuration: {different} (cache value, model value). "
                "Use a new TitansCache(model.config)."
            )
        if self.seen is not None and self.seen.shape[0] != batch_size:
            raise ValueError(
                f"The cache holds {self.seen.shape[0]} sequences but the inputs have batch size {batch_size}. Pass the "
                "same batch, or select/repeat the cache rows (batch_select_indices, batch_repeat_interleave)."
            )
        if dtype is not None:
            memory_dtype = _memory_dtype(dtype)
            activations, memory = set(), set()
            for layer in self.layers:
                if layer.attention is not None:
                    for name, t in layer.attention.named_tensors():
                        (memory if name in _MEMORY_FIELDS else activations).add(t.dtype)
                if layer.memory is not None:
                    memory.update(t.dtype for t in layer.memory.weights)
                    if layer.memory.conv is not None:
                        activations.add(layer.memory.conv.dtype)
            if activations - {dtype} or memory - {memory_dtype}:
                raise ValueError(
                    f"This TitansCache holds {_names(activations)} activations and a {_names(memory)} memory state, "
                    f"but the model now runs in {dtype} (memory state {memory_dtype}). Convert it with "
                    f"cache.to(dtype={dtype}) or start a new TitansCache."
                )

    # ------------------------------------------------------------------------------------------------ batch ops

    # The base class runs each operation on every layer; the cache adds its per-sequence token counts.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.seen = None if self.seen is None else self.seen.index_select(0, beam_idx.to(self.seen.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.seen = None if self.seen is None else self.seen.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.seen = None if self.seen is None else self.seen[indices]

    def reset(self) -> None:
        super().reset()
        self.seen = None
        self.common_seen = None
        self.positions_read = 0

    def crop(self, max_length: int) -> None:
        self.layers[0].crop(max_length)

    def to(self, device=None, dtype: torch.dtype | None = None) -> TitansCache:
        """Moves every tensor to ``device``, in place. ``dtype``, if given, is the model's new activation dtype: the
        attention tensors take it, the memory state takes float32 if it is a half-precision type (as the model keeps
        it), else ``dtype``."""
        memory_dtype = None if dtype is None else _memory_dtype(dtype)
        for layer in self.layers:
            if layer.memory is not None:
                conv = layer.memory.conv
                layer.memory = layer.memory.to(device=device, dtype=memory_dtype)
                if conv is not None:  # the conv tail holds activations
                    layer.memory.conv = conv.to(device=device, dtype=dtype)
            if layer.attention is not None:
                layer.attention = layer.attention.map_fields(
                    lambda name, t: t.to(
                        device=device,
                        dtype=None if not t.is_floating_point() else memory_dtype if name in _MEMORY_FIELDS else dtype,
                    )
                )
        if self.seen is not None:
            self.seen = self.seen.to(device=device)
        return self

    def detach(self) -> TitansCache:
        """Cuts the autograd history in place (for truncated back-propagation through a stream)."""
        for layer in self.layers:
            layer.apply(torch.Tensor.detach)
        return self

    def copy(self) -> TitansCache:
        """An independent copy (tensors cloned)."""
        new = TitansCache.__new__(TitansCache)
        Cache.__init__(new, layers=[TitansCacheLayer() for _ in self.layers])
        new.signature = dict(self.signature)
        new.positions_read = self.positions_read
        new.seen = None if self.seen is None else self.seen.clone()
        new.common_seen = self.common_seen
        for mine, theirs in zip(self.layers, new.layers):
            theirs.memory = None if mine.memory is None else mine.memory.apply(torch.clone)
            theirs.attention = None if mine.attention is None else mine.attention.apply(torch.clone)
        return new

    # ------------------------------------------------------------------------------------------------ snapshots

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {} if self.seen is None else {"seen": self.seen}
        for i, layer in enumerate(self.layers):
            out.update(layer.state_dict(f"layers.{i}."))
        return out

    def save(self, path: str | Path) -> None:
        """Writes the cache to a safetensors file (tensors plus the configuration signature as metadata)."""
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        metadata = {"signature": json.dumps(self.signature), "positions_read": str(self.positions_read)}
        names = next((layer.memory.names for layer in self.layers if layer.memory is not None), None)
        if names is not None:
            metadata["memory_matrices"] = json.dumps(list(names))
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, config, device=None) -> TitansCache:
        """Reads a cache written by :meth:`save`; raises ``ValueError`` if it was made for another configuration."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except SafetensorError as error:
            raise ValueError(
                f"Could not read the cache snapshot {path}: {error}. The file is truncated or corrupt, or not a "
                "safetensors file."
            ) from error
        if "signature" not in metadata:
            raise ValueError(f"{path} is not a TitansCache snapshot (no signature in its metadata).")
        cache = cls(config)
        saved = json.loads(metadata["signature"])
        if "memory_rule" not in saved:
            raise ValueError(
                f"{path} was saved by titans-hf 0.1.0 (before memory rules), whose snapshots this version does not read: "
                "start a new stream."
            )
        if saved != cache.signature:
            different = {k: (saved.get(k), v) for k, v in cache.signature.items() if saved.get(k) != v}
            raise ValueError(f"{path} was saved for another configuration: {different} (snapshot value, model value).")
        # Fresh (aligned) copies: tensors read from the file may sit at any byte offset of its buffer, where vectorised
        # kernels round differently, and a reloaded snapshot must continue bit-identically.
        tensors = {
            name: t.clone()
            for name, t in load_file(str(path), device=str(device) if device is not None else "cpu").items()
        }
        cache.positions_read = int(metadata.get("positions_read", 0))
        cache.seen = tensors.pop("seen", None)
        if cache.seen is not None and cache.seen.numel() and bool((cache.seen == cache.seen[0]).all()):
            cache.common_seen = int(cache.seen[0])  # read once, on loading
        names = tuple(json.loads(metadata.get("memory_matrices", "[]")))
        if not names and any(".memory." in name for name in tensors):
            raise ValueError(f"{path} holds a memory state but does not say what its matrices are: not a TitansCache.")
        for i, layer in enumerate(cache.layers):
            prefix = f"layers.{i}."
            mine = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            layer.load_state_dict(mine, config.memory_chunk_size, names)
        return cache


__all__ = ["SegmentState", "TitansCache", "TitansCacheLayer", "WindowState"]


def _memory_dtype(dtype: torch.dtype) -> torch.dtype:
    """The memory state's dtype for a model running in ``dtype``: float32 for half-precision types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _names(dtypes: set[torch.dtype]) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "no"
