# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""A pretrained Llama / Mistral / Qwen2 / Qwen3 decoder as a Titans model that starts as the base.

The converted model is MAL (memory as a layer): each layer is ``h = x + M(norm(x))``, then ``h + SWA(norm(h))``,
then the MLP. The attention, its norm, the MLP, the embeddings and the head are the base's; the memory is new, with
its output projection at zero, and there are no persistent tokens. At conversion ``M(.) = 0`` exactly, so every
layer is the base's layer with sliding-window attention: on any sequence no longer than the window the converted
model computes the base's logits, and beyond it, it is the base with sliding-window attention plus a memory that
fine-tuning teaches to remember what left the window.

The other variants cannot start as the base (:data:`REFUSED_VARIANTS` says why), nor can a base whose function
Titans cannot hold: each is refused with what is missing.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import transformers
from torch import nn
from transformers.utils import logging

from .configuration_titans import ROPE_TYPES, TitansConfig

logger = logging.get_logger(__name__)

SUPPORTED_BASES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""The bases that convert exactly: ``model_type`` -> the Transformers class."""

REFUSED_VARIANTS = {
    "mag": "MAG outputs RMSNorm(attention) * sigmoid(RMSNorm(memory)) where the base adds the attention output "
    "itself; no memory output turns that gate into the identity",
    "mac": "MAC attends within segments over [persistent || memory reads || segment]: the memory reads are keys that "
    "always take some attention weight (a softmax weight is never 0), and its output is gated as in MAG",
    "lmm": "LMM has no attention: the base's attention layers would be dropped",
}
"""Why each variant other than MAL cannot start as its base."""

BASE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "attention_output_bias",
    "mlp_bias",
    "qk_norm",
    "tie_word_embeddings",
)
"""Fields read from the base that set its function: an override would not start as the base."""


def titans_config_from_base(
    base_config: Any,
    variant: str = "mal",
    sliding_window: int | None = None,
    memory_layers: list[int] | None = None,
    **config_overrides,
) -> TitansConfig:
    """The :class:`TitansConfig` of a base's conversion (see :func:`convert_base_model`)."""
    model_type = getattr(base_config, "model_type", None)
    if model_type not in SUPPORTED_BASES:
        raise ValueError(
            f"Cannot convert a {model_type!r} model: the bases that convert exactly are "
            f"{', '.join(SUPPORTED_BASES.values())}."
        )
    variant = variant.lower() if isinstance(variant, str) else variant
    if variant in REFUSED_VARIANTS:
        raise ValueError(
            f"variant={variant!r} cannot start as the base ({REFUSED_VARIANTS[variant]}). Convert with variant='mal' "
            "(memory as a layer, its output projection at zero)."
        )
    if variant != "mal":
        raise ValueError(f"variant must be 'mal' to start as the base, got {variant!r}.")
    overridden = sorted(set(config_overrides) & set(BASE_FIELDS + ("variant", "max_position_embeddings")))
    if overridden:
        raise ValueError(
            f"{overridden} are read from the base (they set its function); a converted model with other values would "
            "not start as the base. Pass memory_* fields, sliding_window or memory_layers instead."
        )
    if config_overrides.get("num_persistent_tokens", 0) != 0:
        raise ValueError(
            "num_persistent_tokens must be 0 for a converted model: persistent tokens are keys every query attends to "
            "(a softmax weight is never 0), so the model would not start as the base."
        )

    base_window, trained = _attention_span(base_config)
    window = sliding_window if sliding_window is not None else (base_window or trained)
    if base_window is not None and isinstance(window, int) and window > base_window:
        raise ValueError(
            f"sliding_window={window} exceeds the base's own sliding window ({base_window}): its sliding-window layers "
            f"never attend that far, so the converted model would differ from the base between {base_window} and "
            f"{window} tokens. Pass sliding_window <= {base_window}."
        )
    if base_window is None and isinstance(window, int) and window > trained:
        logger.warning(
            f"sliding_window={window} is longer than the base's trained context ({trained} tokens): the converted "
            "model is exact there, but the base never learned to attend that far."
        )
    # Llama's and Qwen3's `attention_bias` covers q, k, v and o; Qwen2 has biases on q, k, v only; Mistral none.
    attention_bias = model_type == "qwen2" or bool(getattr(base_config, "attention_bias", False))
    values = dict(
        variant="mal",
        vocab_size=base_config.vocab_size,
        hidden_size=base_config.hidden_size,
        intermediate_size=base_config.intermediate_size,
        num_hidden_layers=base_config.num_hidden_layers,
        num_attention_heads=base_config.num_attention_heads,
        num_key_value_heads=base_config.num_key_value_heads or base_config.num_attention_heads,
        head_dim=getattr(base_config, "head_dim", None) or base_config.hidden_size // base_config.num_attention_heads,
        hidden_act=base_config.hidden_act,
        rms_norm_eps=base_config.rms_norm_eps,
        rope_parameters=_rope_parameters(base_config, window),
        attention_bias=attention_bias,
        attention_output_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(getattr(base_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(base_config.tie_word_embeddings),
        training_context_length=trained,
        sliding_window=window,
        num_persistent_tokens=0,
        initializer_range=base_config.initializer_range,
        attention_dropout=base_config.attention_dropout,
        pad_token_id=base_config.pad_token_id,
        bos_token_id=base_config.bos_token_id,
        eos_token_id=base_config.eos_token_id,
    )
    if memory_layers is not None:
        values["memory_layers"] = memory_layers
    return TitansConfig(**{**values, **config_overrides})


def convert_base_model(
    cls: type,
    base: Any,
    variant: str = "mal",
    sliding_window: int | None = None,
    memory_layers: list[int] | None = None,
    **config_overrides,
):
    """``cls`` (a ``TitansForCausalLM``) holding the weights of ``base``, starting as the base.

    Args:
        base: a loaded ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``, or
            a folder or Hub id to load one from with ``AutoModelForCausalLM``.
        variant: ``"mal"``, the one variant that starts as the base (:data:`REFUSED_VARIANTS`).
        sliding_window: the attention window; by default the base's own sliding window, else its trained context
            (``max_position_embeddings``). Within it, the converted model's logits are the base's.
        memory_layers: the layers that get a memory (default: all).
        config_overrides: other :class:`TitansConfig` fields, for the memory (``memory_chunk_size``,
            ``memory_depth``, ...); not the base's own (:data:`BASE_FIELDS`).
    """
    if isinstance(base, (str, os.PathLike)):
        base = transformers.AutoModelForCausalLM.from_pretrained(base)
    if not isinstance(base, nn.Module) or not hasattr(base, "config"):
        raise TypeError(f"base must be a pretrained causal LM or a folder / Hub id, got {type(base).__name__}.")
    model_type = getattr(base.config, "model_type", None)
    expected = SUPPORTED_BASES.get(model_type)
    if expected is None or not isinstance(base, getattr(transformers, expected)):
        raise ValueError(
            f"Cannot convert a {type(base).__name__} (model_type {model_type!r}): the bases that convert exactly are "
            f"{', '.join(SUPPORTED_BASES.values())} (with their language-modelling head)."
        )
    config = titans_config_from_base(base.config, variant, sliding_window, memory_layers, **config_overrides)
    parameter = next(base.parameters())
    model = cls._from_config(config, dtype=parameter.dtype).to(device=parameter.device)
    _load_base_weights(model, base)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.memory is not None:
                layer.memory.o_proj.weight.zero_()  # M(.) = 0: every layer starts as the base's
    model.generation_config = type(base.generation_config).from_dict(base.generation_config.to_dict())
    return model.train(base.training)


def _attention_span(base_config: Any) -> tuple[int | None, int]:
    """The base's smallest sliding window (``None``: full attention in every layer) and its trained context."""
    trained = base_config.max_position_embeddings
    window = getattr(base_config, "sliding_window", None)
    layer_types = getattr(base_config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(
                f"Cannot convert a base with layer types {unknown}: Titans holds full and sliding-window attention "
                "layers only."
            )
        if "sliding_attention" not in layer_types:
            window = None
    return window, trained


def _rope_parameters(base_config: Any, window: int) -> dict[str, Any]:
    """The base's RoPE as a Titans ``rope_parameters`` (the same frequencies inside the window)."""
    rope = getattr(base_config, "rope_parameters", None)
    if not isinstance(rope, dict) or not rope:
        raise ValueError(f"Cannot convert a base without flat rope_parameters (got {rope!r}).")
    if "rope_type" not in rope and all(isinstance(v, dict) for v in rope.values()):
        raise ValueError(
            f"Cannot convert a base with a RoPE per layer type ({sorted(rope)}): Titans has one RoPE for all layers."
        )
    rope = {k: v for k, v in rope.items() if v is not None}
    rope_type = rope.get("rope_type", "default")
    trained = base_config.max_position_embeddings
    if rope_type == "dynamic":
        # Transformers' dynamic NTK scaling keeps the default frequencies up to max_position_embeddings.
        if window > trained:
            raise ValueError(
                f"Cannot convert a 'dynamic' RoPE with sliding_window={window} > max_position_embeddings ({trained}): "
                "beyond its trained length its frequencies change with the length of the sequence, which a window "
                f"cannot reproduce. Pass sliding_window <= {trained}."
            )
        return {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"Cannot convert the base's RoPE {rope_type!r}: Titans holds {tuple(ROPE_TYPES)} (and converts 'dynamic' "
            "as 'default' within its trained length)."
        )
    if rope_type == "yarn" and rope.get("factor") is None:  # Transformers' fallback for the factor
        rope["factor"] = trained / rope["original_max_position_embeddings"]
    if rope.get("partial_rotary_factor", 1.0) == 1.0:
        rope.pop("partial_rotary_factor", None)
    return rope


MEMORY_MODULES = ["memory"]
"""PEFT's ``modules_to_save`` for memory + LoRA: every layer's ``memory`` trains in full beside the adapters."""

BASE_LORA_TARGETS = r".*\.(attention|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
"""PEFT's ``target_modules`` (a regular expression) for LoRA on the base's projections, not the memory's (which has
an ``o_proj`` and a ``gate_proj`` too)."""


def mark_only_memory_as_trainable(model: nn.Module) -> int:
    """Freezes every parameter but the memories' (the base's stay as they were); returns how many train."""
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".memory." in f".{name}.")
        trainable += parameter.numel() if parameter.requires_grad else 0
    if not trainable:
        raise ValueError("The model has no memory parameters (memory_layers is empty): nothing would train.")
    return trainable


_ATTENTION = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(.+)$")
_INPUT_NORM = re.compile(r"^model\.layers\.(\d+)\.input_layernorm\.weight$")


def _targets(name: str, memory_layers: set[int]) -> list[str]:
    """Where a base tensor goes in the Titans model (MAL)."""
    if match := _ATTENTION.match(name):
        return [f"model.layers.{match[1]}.attention.{match[2]}"]
    if match := _INPUT_NORM.match(name):
        if int(match[1]) in memory_layers:
            # The attention's input norm; the memory's input norm starts as the same one.
            return [f"model.layers.{match[1]}.attention_layernorm.weight", name]
        return [name]
    return [name]


def _load_base_weights(model: nn.Module, base: nn.Module) -> None:
    """Copies every base tensor into ``model``; refuses, naming them, base tensors with no place or another shape and
    Titans tensors (other than the new memory's) that the base does not fill."""
    target_state = model.state_dict()
    memory_layers = set(model.config.memory_layers)
    loaded, unused, mismatched = {}, [], []
    for name, tensor in base.state_dict().items():
        for target in _targets(name, memory_layers):
            if target not in target_state:
                unused.append(name)
            elif target_state[target].shape != tensor.shape:
                mismatched.append(f"{name} {tuple(tensor.shape)} -> {target} {tuple(target_state[target].shape)}")
            else:
                loaded[target] = tensor
    missing = [k for k in target_state if k not in loaded and ".memory." not in k]
    if unused or mismatched or missing:
        problems = [
            f"{what}: {', '.join(names[:8])}" + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            for what, names in (
                ("base tensors Titans has no place for", unused),
                ("tensors of another shape", mismatched),
                ("Titans tensors the base does not fill", missing),
            )
            if names
        ]
        raise ValueError(f"Cannot convert {type(base).__name__} exactly:\n- " + "\n- ".join(problems))
    with torch.no_grad():
        for name, tensor in loaded.items():
            target_state[name].copy_(tensor)


__all__ = [
    "BASE_FIELDS",
    "BASE_LORA_TARGETS",
    "MEMORY_MODULES",
    "REFUSED_VARIANTS",
    "SUPPORTED_BASES",
    "convert_base_model",
    "mark_only_memory_as_trainable",
    "titans_config_from_base",
]
