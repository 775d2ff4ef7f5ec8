# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Model presets (built-in CPU presets and ``examples/configs``), the tokenizer, the model, its optimiser groups."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from titans_hf import (  # importing titans_hf registers the Auto classes
    BASE_LORA_TARGETS,
    MEMORY_MODULES,
    TitansConfig,
    TitansForCausalLM,
    mark_only_memory_as_trainable,
)

from .data import EXAMPLES_DIR

CONFIGS_DIR = EXAMPLES_DIR / "configs"


BYTE_TOKENIZER = "byte"
"""``--tokenizer_name byte``: the byte-level tokenizer (ByT5's: 256 bytes + pad/eos/unk), needs no download."""


HUB_TOKENIZER = "hf-internal-testing/llama-tokenizer"
"""Default tokenizer for Hub datasets: Llama-2's 32K SentencePiece vocabulary (the paper's), from an ungated repo."""


BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    # A few-second model for tests and smoke runs.
    "tiny": dict(
        variant="mag",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        sliding_window=16,
        segment_size=16,
        memory_chunk_size=8,
        memory_num_heads=2,
        training_context_length=64,
    ),
    # The offline default: ~1.4M parameters, a few minutes on 2 CPU cores at 256 bytes of context.
    "small": dict(
        variant="mag",
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        sliding_window=64,
        segment_size=64,
        memory_chunk_size=32,
        training_context_length=256,
    ),
}


def _preset_files() -> dict[str, Path]:
    """The model configs of ``examples/configs`` (JSON objects with ``"model_type": "titans"``), by file stem."""
    found = {}
    for path in sorted(CONFIGS_DIR.glob("*.json")) if CONFIGS_DIR.is_dir() else []:
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(values, dict) and values.get("model_type") == "titans":
            found[path.stem] = path
    return found


def available_presets() -> dict[str, str]:
    """Preset names and where they come from: the built-in CPU presets and the configs of ``examples/configs``."""
    return {**{name: "built-in" for name in BUILTIN_PRESETS}, **{k: str(v) for k, v in _preset_files().items()}}


def _config_from_json(path: Path) -> TitansConfig:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path}: cannot read a JSON config ({error}).") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of TitansConfig fields.")
    if values.get("model_type", "titans") != "titans":
        raise ValueError(f"--config {path}: model_type is {values['model_type']!r}, expected 'titans'.")
    meta = {"model_type", "architectures", "transformers_version", "auto_map", "torch_dtype"}
    fields = {k: v for k, v in values.items() if k not in meta and not k.startswith("_")}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(TitansConfig)})
    if unknown:
        raise ValueError(f"--config {path}: {unknown} are not TitansConfig fields.")
    return TitansConfig(**fields)


def resolve_config(spec: str) -> tuple[TitansConfig, str]:
    """A ``--config`` value as a config and a short name: a JSON path, a built-in preset or a file of
    ``examples/configs`` (matched by its name, case-insensitively, in full or by a unique dash-separated part:
    ``titans-170m-mac``, ``170m-mac``)."""
    path = Path(spec).expanduser()
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"--config {spec}: no such file.")
        return _config_from_json(path), path.stem
    key = spec.lower()
    if key in BUILTIN_PRESETS:
        return TitansConfig(**BUILTIN_PRESETS[key]), key
    files = {stem.lower(): path for stem, path in _preset_files().items()}
    pattern = re.compile(rf"(^|[-_]){re.escape(key)}($|[-_])")
    matches = [files[key]] if key in files else [p for stem, p in files.items() if pattern.search(stem)]
    if len(matches) == 1:
        return _config_from_json(matches[0]), matches[0].stem
    if len(matches) > 1:
        raise ValueError(
            f"--config {spec!r} matches several presets ({', '.join(p.stem for p in matches)}); name one."
        )
    names = ", ".join(available_presets())
    raise ValueError(f"--config {spec!r} is neither a JSON file nor a preset. Presets: {names}.")


def apply_overrides(config: TitansConfig, overrides: str | None) -> TitansConfig:
    """``--config_overrides 'a=1,b=x'``, validated by rebuilding the config."""
    if not overrides:
        return config
    try:
        config.update_from_string(overrides)
        return type(config).from_dict(config.to_dict())
    except ValueError as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}") from error


def load_tokenizer(args: argparse.Namespace) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer of the run and its name (see ``--tokenizer_name``)."""
    name = args.tokenizer_name
    if name is None:
        name = args.model_name_or_path or (HUB_TOKENIZER if args.dataset_name else BYTE_TOKENIZER)
    if name == BYTE_TOKENIZER:
        return transformers.ByT5Tokenizer(), name
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code
        )
    except OSError as error:
        raise ValueError(
            f"Cannot load the tokenizer {name!r} ({error}). Pass --tokenizer_name with a Hub id or folder, or "
            f"'{BYTE_TOKENIZER}' for the offline byte-level tokenizer."
        ) from error
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer {name!r} has no EOS token: documents are joined with EOS.")
    return tokenizer, name


def create_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> tuple[TitansForCausalLM, str]:
    """A fresh model from ``--config`` (vocabulary and special tokens from the tokenizer) or a checkpoint from
    ``--model_name_or_path``; ``--config_overrides`` applies to both. Returns the model and a short name."""
    if args.model_name_or_path:
        try:
            config = AutoConfig.from_pretrained(
                args.model_name_or_path, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot load a config from --model_name_or_path {args.model_name_or_path!r}: {error}"
            ) from error
        if config.model_type != "titans":
            raise ValueError(
                f"--model_name_or_path {args.model_name_or_path!r} is a {config.model_type!r} model; these scripts "
                "train Titans models."
            )
        config = apply_overrides(config, args.config_overrides)
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path,
            config=config,
            cache_dir=args.cache_dir,
            trust_remote_code=args.trust_remote_code,
            attn_implementation=args.attn_implementation,
        )
        if model.config.vocab_size < len(tokenizer):
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {model.config.vocab_size}: "
                "use the checkpoint's own tokenizer (omit --tokenizer_name)."
            )
        return model, Path(args.model_name_or_path.rstrip("/")).name
    config, name = resolve_config(args.config)
    config.vocab_size = len(tokenizer)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id
    # Never make EOS/BOS the padding index: nn.Embedding would freeze their rows.
    config.pad_token_id = (
        pad if pad is not None and pad not in (tokenizer.eos_token_id, tokenizer.bos_token_id) else None
    )
    config = apply_overrides(config, args.config_overrides)
    model = TitansForCausalLM._from_config(config, attn_implementation=args.attn_implementation)
    return model, name if name.startswith("titans") else f"titans-{name}"


def select_trainable(model: TitansForCausalLM, args: argparse.Namespace) -> torch.nn.Module:
    """``--train``: every parameter (the model itself), the memory alone (the rest frozen), or the memory in full and
    LoRA adapters on the attention and MLP projections (a ``peft.PeftModel``, merged back when saved)."""
    train = getattr(args, "train", "all")
    if train == "memory":
        mark_only_memory_as_trainable(model)
    elif train == "memory+lora":
        try:
            import peft
        except ImportError as error:
            raise ValueError("--train memory+lora needs peft: pip install -e '.[peft]'.") from error
        if not any(layer.memory is not None for layer in model.model.layers):
            raise ValueError("--train memory+lora: the model has no memory (memory_layers is empty).")
        config = peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha or 2 * args.lora_r,
            lora_dropout=args.lora_dropout,
            target_modules=BASE_LORA_TARGETS,
            modules_to_save=MEMORY_MODULES,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
    return model


def set_activation_checkpointing(model: Any, enable: bool) -> None:
    """Activation (gradient) checkpointing on or off, under its Transformers >= 5.24 name when there is one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable() if enable else model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on the projection matrices only; not on biases, norms, gates' biases, persistent
    tokens or the memories' learned initial states (states, not maps)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "norm" in name or "persistent" in name or "initial_weights" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
