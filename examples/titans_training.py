# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Shared machinery of ``examples/pretrain.py`` and ``examples/finetune.py``.

Both scripts are Accelerate programs with an explicit training loop (in the spirit of Transformers'
``run_clm_no_trainer.py``); this module holds everything they have in common:

- command-line arguments (data, tokenizer, model, optimisation, evaluation, checkpoints, Hub);
- model presets (``--config tiny|small|titans-170m-mac|...``: built-in CPU presets and the JSON files of ``examples/configs``);
- data: Hub datasets (streamed by default) or local txt/json/jsonl/parquet/csv files, tokenised, joined with EOS and
  packed into ``--block_size`` blocks, or prompt/response pairs with the loss on the response only; a held-out split
  when none is given;
- a deterministic, resumable per-process stream of training examples (each process reads its own share; resuming
  continues the stream exactly where the checkpoint left it);
- the loop itself: AdamW, warmup + cosine decay, clipping, accumulation with token-weighted losses
  (``num_items_in_batch``), evaluation (loss, perplexity, bits per byte), trackers, ``save_state`` checkpoints;
- the end of a run: ``save_pretrained`` of model + tokenizer, a model card, a generated sample, the Hub push.

The scripts run from the repository (``python examples/pretrain.py``); this file sits next to them and is imported
as a plain module.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, TorchDynamoPlugin, gather_object, set_seed
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from titans_hf import TitansConfig, TitansForCausalLM  # importing titans_hf registers the Auto classes

logger = get_logger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = EXAMPLES_DIR / "configs"
DEFAULT_TRAIN_FILE = EXAMPLES_DIR / "data" / "tinyshakespeare.txt"

BYTE_TOKENIZER = "byte"
"""``--tokenizer_name byte``: the byte-level tokenizer (ByT5's: 256 bytes + pad/eos/unk), needs no download."""
VERIFIED_CONTEXT_LENGTH = 1 << 20
"""The saved tokenizer's ``model_max_length``: Titans has no length limit; 1M tokens is what the tests stream."""
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

TRACKERS = ("all", "tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")
TEXT_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
TITANS_CITATION = """@article{behrouz2024titans,
  title   = {Titans: Learning to Memorize at Test Time},
  author  = {Behrouz, Ali and Zhong, Peilin and Mirrokni, Vahab},
  journal = {arXiv preprint arXiv:2501.00663},
  year    = {2024}
}"""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def build_parser(description: str, *, finetune: bool) -> argparse.ArgumentParser:
    """The arguments both scripts share; ``finetune`` switches the defaults and adds the prompt/response options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="A dataset on the Hub, e.g. HuggingFaceFW/fineweb-edu.")
    data.add_argument("--dataset_config", help="The dataset's configuration, e.g. sample-10BT.")
    data.add_argument("--dataset_split", default="train", help="The split to train on.")
    data.add_argument(
        "--validation_split", help="The held-out split of --dataset_name (default: 'validation' if any)."
    )
    data.add_argument(
        "--train_file",
        help="Local training data: .txt, .json/.jsonl, .parquet or .csv (glob patterns allowed)"
        + (
            ""
            if finetune
            else f". Default when no --dataset_name: {DEFAULT_TRAIN_FILE.relative_to(EXAMPLES_DIR.parent)}"
        ),
    )
    data.add_argument("--validation_file", help="Local held-out data, same format as --train_file.")
    data.add_argument("--text_column", default="text", help="The column holding the documents.")
    data.add_argument(
        "--txt_sample_by",
        default="paragraph",
        choices=["line", "paragraph", "document"],
        help="How a .txt file splits into documents (each document ends with EOS).",
    )
    data.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Stream the data instead of downloading and preparing it (default: on for --dataset_name, off for files).",
    )
    data.add_argument(
        "--validation_split_percentage",
        type=float,
        default=5.0,
        help="Without a held-out split: the percentage of documents held out (prepared datasets).",
    )
    data.add_argument(
        "--validation_documents",
        type=int,
        default=2000,
        help="Without a held-out split: the number of documents held out at the head of a streamed dataset.",
    )
    data.add_argument(
        "--max_eval_samples", type=int, default=64, help="Evaluate on at most this many blocks/examples."
    )
    data.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer of streamed documents.")
    data.add_argument(
        "--block_size",
        type=int,
        help="Tokens per training block (default: the model's training_context_length; the saved config records the "
        "block size used). Any length works: Titans has no length limit.",
    )
    data.add_argument("--preprocessing_num_workers", type=int, help="Processes for tokenisation (prepared datasets).")
    data.add_argument("--cache_dir", help="Where datasets, tokenizers and models from the Hub are cached.")
    if finetune:
        data.add_argument(
            "--prompt_column", help="Prompt/response mode: the prompt column (loss on the response only)."
        )
        data.add_argument("--response_column", help="Prompt/response mode: the response column.")
        data.add_argument(
            "--prompt_template",
            default="{prompt}\n",
            help="How a prompt is written before its response ({prompt} is replaced).",
        )

    model = parser.add_argument_group("model and tokenizer")
    if finetune:
        model.add_argument(
            "--model_name_or_path",
            required=True,
            help="The Titans checkpoint to continue: a local folder or a Hub id.",
        )
    else:
        model.add_argument(
            "--config",
            default="small",
            help=f"A preset name ({', '.join(available_presets())}) or a JSON config file; ignored with "
            "--model_name_or_path.",
        )
        model.add_argument("--model_name_or_path", help="Continue pretraining from a Titans checkpoint instead.")
    model.add_argument(
        "--config_overrides",
        help="Comma-separated config overrides, e.g. 'variant=mac,memory_depth=3,memory_chunk_size=32'.",
    )
    model.add_argument(
        "--tokenizer_name",
        help=f"A tokenizer on the Hub or a folder, or '{BYTE_TOKENIZER}' (offline byte-level). Default: the "
        f"checkpoint's with --model_name_or_path, {HUB_TOKENIZER} (Llama-2 32K) with --dataset_name, else "
        f"'{BYTE_TOKENIZER}'.",
    )
    model.add_argument("--trust_remote_code", action="store_true", help="Run the checkpoint's own code from the Hub.")
    model.add_argument(
        "--gradient_checkpointing",
        "--activation_checkpointing",
        dest="gradient_checkpointing",
        action="store_true",
        help="Recompute each layer's activations in backward (less memory, ~30%% more compute).",
    )
    model.add_argument(
        "--attn_implementation", default="sdpa", choices=["eager", "sdpa", "flex_attention"], help="Attention kernel."
    )

    train = parser.add_argument_group("optimisation")
    train.add_argument("--per_device_train_batch_size", type=int, default=8 if not finetune else 4)
    train.add_argument("--per_device_eval_batch_size", type=int, default=8 if not finetune else 4)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument(
        "--learning_rate", type=float, default=2e-3 if not finetune else 1e-4, help="Peak learning rate."
    )
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.95)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0: none).")
    train.add_argument(
        "--lr_scheduler_type",
        default="cosine",
        choices=["cosine", "linear", "constant", "constant_with_warmup", "warmup_stable_decay"],
        help="Schedule after warmup; 'cosine' decays to --min_lr_ratio x the peak.",
    )
    train.add_argument("--num_warmup_steps", type=int, default=20 if not finetune else 10)
    train.add_argument("--min_lr_ratio", type=float, default=0.1, help="Cosine floor, as a fraction of the peak.")
    train.add_argument(
        "--max_train_steps",
        type=int,
        help="Optimizer steps (default: --num_train_epochs over prepared data, else 200 steps"
        + (")." if not finetune else ")."),
    )
    train.add_argument("--num_train_epochs", type=float, help="Epochs over prepared (not streamed) data.")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16", "fp8"],
        help="Overrides the Accelerate config (`accelerate config` / `accelerate launch --mixed_precision`).",
    )
    train.add_argument("--cpu", action="store_true", help="Train on CPU even if an accelerator is available.")
    train.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the model with torch.compile (through Accelerate; overrides the Accelerate config's dynamo "
        "settings). An unpadded step is one graph; padded batches add graph breaks where the model reads the mask.",
    )
    train.add_argument(
        "--torch_compile_backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="torch.compile backend for --torch_compile (default: inductor, for GPUs; on CPU: aot_eager, README 'torch.compile').",
    )

    log = parser.add_argument_group("evaluation, logging and checkpoints")
    log.add_argument(
        "--eval_steps", type=int, default=25, help="Evaluate every N optimizer steps (0: only at the end)."
    )
    log.add_argument("--logging_steps", type=int, default=10, help="Log the training loss every N steps.")
    log.add_argument(
        "--report_to",
        default="none",
        help=f"Trackers through Accelerate: 'none' or a comma-separated list of {', '.join(TRACKERS)}.",
    )
    log.add_argument("--run_name", help="Tracker run name (default: the output folder's name).")
    log.add_argument(
        "--checkpointing_steps", type=int, default=100, help="accelerator.save_state every N steps (0: never)."
    )
    log.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep only the newest N checkpoints.")
    log.add_argument(
        "--resume_from_checkpoint",
        help="A checkpoint folder of this run (output_dir/checkpoints/step_N) or 'latest'.",
    )

    out = parser.add_argument_group("output and Hub")
    out.add_argument("--output_dir", help="Where the model is saved (default: outputs/<model>-<data>).")
    out.add_argument("--sample_prompt", help="Prompt of the generated sample (default: from the held-out data).")
    out.add_argument("--sample_max_new_tokens", type=int, default=200)
    out.add_argument("--sample_temperature", type=float, default=0.8)
    out.add_argument("--sample_top_k", type=int, default=50)
    out.add_argument("--push_to_hub", action="store_true", help="Push the final folder to --hub_model_id.")
    out.add_argument("--hub_model_id", help="The Hub repository to push to, e.g. user/titans-mag-170m.")
    out.add_argument("--hub_token", help="Hub token (default: the one of `hf auth login`).")
    out.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")
    out.add_argument("--license", default="apache-2.0", help="License written into the model card.")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Rejects inconsistent arguments early, each with what was wrong and what is allowed."""
    if args.dataset_name and args.train_file:
        raise ValueError("Pass either --dataset_name (a Hub dataset) or --train_file (local files), not both.")
    if args.validation_file and not args.train_file:
        raise ValueError("--validation_file needs --train_file (with --dataset_name use --validation_split).")
    if args.dataset_config and not args.dataset_name:
        raise ValueError("--dataset_config needs --dataset_name.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "block_size", "max_eval_samples", "validation_documents"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}.")
    for name in ("eval_steps", "logging_steps", "checkpointing_steps", "num_warmup_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.num_train_epochs is not None and args.num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs must be > 0, got {args.num_train_epochs}.")
    if not 0 < args.validation_split_percentage < 100:
        raise ValueError(
            f"--validation_split_percentage must lie in (0, 100), got {args.validation_split_percentage}."
        )
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio must lie in [0, 1], got {args.min_lr_ratio}.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/titans-mag-170m).")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    trackers = [t.strip() for t in args.report_to.split(",") if t.strip()]
    if trackers != ["none"]:
        unknown = [t for t in trackers if t not in TRACKERS]
        if unknown or not trackers:
            raise ValueError(
                f"--report_to must be 'none' or a comma-separated list of {TRACKERS}, got {args.report_to!r}."
            )
    prompt, response = getattr(args, "prompt_column", None), getattr(args, "response_column", None)
    if (prompt is None) != (response is None):
        raise ValueError("Prompt/response mode needs both --prompt_column and --response_column.")
    if prompt is not None and "{prompt}" not in args.prompt_template:
        raise ValueError(f"--prompt_template must contain '{{prompt}}', got {args.prompt_template!r}.")


# ----------------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedData:
    """The processed data of a run.

    ``train``: examples (``input_ids`` and, in prompt/response mode, ``labels``) as a ``datasets.Dataset`` or, when
    streaming, a ``datasets.IterableDataset``; ``eval``: the held-out examples, materialised, each with ``num_bytes``
    (UTF-8 bytes of the tokens it is scored on, for bits per byte); ``sample_prompt``: the start of a held-out
    document; ``source``: a description for logs and the model card; ``hub_dataset``: the Hub id, if any.
    """

    train: datasets.Dataset | datasets.IterableDataset
    eval: list[dict[str, Any]]
    streaming: bool
    sample_prompt: str
    source: str
    hub_dataset: str | None
    fingerprint: dict[str, Any]


def _data_files(pattern: str, flag: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise ValueError(f"{flag} {pattern}: no such file.")
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(TEXT_EXTENSIONS)
    if unknown or len({TEXT_EXTENSIONS[s] for s in suffixes}) != 1:
        raise ValueError(
            f"{flag} {pattern}: files must share one of the formats {sorted(TEXT_EXTENSIONS)}, got {sorted(suffixes)}."
        )
    return files


def load_raw_datasets(args: argparse.Namespace) -> tuple[Any, Any, bool, str]:
    """The raw train and held-out documents (``Dataset`` or ``IterableDataset``), whether they stream, and a
    description. Without a held-out split, one is carved out of the training documents (a seeded random
    ``--validation_split_percentage`` of a prepared dataset, or the first ``--validation_documents`` of a stream)."""
    if args.dataset_name:
        streaming = True if args.streaming is None else args.streaming
        try:
            raw = datasets.load_dataset(
                args.dataset_name, args.dataset_config, streaming=streaming, cache_dir=args.cache_dir
            )
        except Exception as error:  # datasets raises many types (DatasetNotFoundError, ValueError, ConnectionError)
            raise ValueError(
                f"Cannot load --dataset_name {args.dataset_name!r}"
                + (f" --dataset_config {args.dataset_config!r}" if args.dataset_config else "")
                + f": {error}"
            ) from error
        source = args.dataset_name + (f" ({args.dataset_config})" if args.dataset_config else "")
    else:
        train_pattern = args.train_file or str(DEFAULT_TRAIN_FILE)
        files = {"train": _data_files(train_pattern, "--train_file")}
        if args.validation_file:
            files["validation"] = _data_files(args.validation_file, "--validation_file")
        builders = {TEXT_EXTENSIONS[Path(f).suffix.lower()] for split in files.values() for f in split}
        if len(builders) != 1:
            raise ValueError("--train_file and --validation_file must have the same format.")
        builder = builders.pop()
        kwargs = {"sample_by": args.txt_sample_by} if builder == "text" else {}
        streaming = False if args.streaming is None else args.streaming
        raw = datasets.load_dataset(builder, data_files=files, streaming=streaming, cache_dir=args.cache_dir, **kwargs)
        source = ", ".join(os.path.basename(f) for f in files["train"])
    if args.dataset_split not in raw:
        raise ValueError(f"The dataset has no split {args.dataset_split!r}; its splits: {sorted(raw)}.")
    train = raw[args.dataset_split]
    held_out = args.validation_split or ("validation" if "validation" in raw else None)
    if args.validation_split and args.validation_split not in raw:
        raise ValueError(f"The dataset has no split {args.validation_split!r}; its splits: {sorted(raw)}.")
    if held_out is not None:
        return train, raw[held_out], streaming, source
    if streaming:
        return train.skip(args.validation_documents), train.take(args.validation_documents), streaming, source
    split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
    return split["train"], split["test"], streaming, source


def _columns(dataset: Any) -> list[str]:
    """Column names, peeking at the first example of a stream whose features are unknown."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return [] if first is None else list(first)


def check_columns(dataset: Any, columns: list[str], flags: list[str]) -> list[str]:
    """Raises if a requested column is missing (naming the flag and the columns there are); returns all columns."""
    present = _columns(dataset)
    for column, flag in zip(columns, flags):
        if column not in present:
            raise ValueError(
                f"{flag} {column!r} is not a column of the dataset; its columns are {present}. "
                f"Pass {flag} with one of them."
            )
    return present


def _document_ids(tokenizer: PreTrainedTokenizerBase, texts: list[Any], column: str) -> list[list[int]]:
    """Token ids of documents: ``[BOS] text EOS`` (BOS only if the tokenizer has one); empty documents dropped."""
    for text in texts:
        if text is not None and not isinstance(text, str):
            raise ValueError(f"Column {column!r} must hold text, found a {type(text).__name__}: {str(text)[:80]!r}.")
    encoded = tokenizer([t or "" for t in texts], add_special_tokens=False)["input_ids"]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [bos + ids + [tokenizer.eos_token_id] for ids in encoded if ids]


def pack_documents(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    block_size: int,
    args: argparse.Namespace,
    desc: str,
) -> Any:
    """Documents tokenised, joined with EOS and cut into ``block_size`` blocks (a batch of 1,000 documents at a
    time; its last partial block is dropped)."""
    columns = _columns(dataset)

    def pack(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        stream = [token for ids in _document_ids(tokenizer, batch[text_column], text_column) for token in ids]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    kwargs: dict[str, Any] = dict(batched=True, batch_size=1000, remove_columns=columns)
    if isinstance(dataset, datasets.Dataset):
        kwargs.update(num_proc=args.preprocessing_num_workers, desc=desc)
    return dataset.map(pack, **kwargs)


def pair_examples(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    max_length: int,
    desc: str,
) -> Any:
    """Prompt/response pairs as ``[BOS] prompt_template(prompt) response EOS`` with labels -100 on the prompt
    (loss on the response only), truncated to ``max_length``; pairs whose response is cut entirely are dropped."""
    columns = _columns(dataset)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]

    def encode(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        prompts = [args.prompt_template.replace("{prompt}", p or "") for p in batch[args.prompt_column]]
        responses = [r or "" for r in batch[args.response_column]]
        for value, column in ((prompts, args.prompt_column), (responses, args.response_column)):
            bad = next((v for v in value if not isinstance(v, str)), None)
            if bad is not None:
                raise ValueError(f"Column {column!r} must hold text, found a {type(bad).__name__}.")
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for p, r in zip(p_ids, r_ids):
            if not r:
                continue
            prompt = bos + p
            ids = (prompt + r + [tokenizer.eos_token_id])[:max_length]
            labels = ([-100] * len(prompt) + r + [tokenizer.eos_token_id])[:max_length]
            if all(label == -100 for label in labels[1:]):
                continue
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out

    kwargs: dict[str, Any] = dict(batched=True, batch_size=1000, remove_columns=columns)
    if isinstance(dataset, datasets.Dataset):
        kwargs.update(num_proc=args.preprocessing_num_workers, desc=desc)
    return dataset.map(encode, **kwargs)


def _scored_bytes(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]) -> int:
    """UTF-8 bytes of the tokens an example is scored on (the shifted labels that are not -100)."""
    labels = example.get("labels", example["input_ids"])[1:]
    ids = [t for t in labels if t != -100]
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))


def _token_count(
    dataset: Any, tokenizer: PreTrainedTokenizerBase, column: str, limit: int = 10_000
) -> tuple[int, int]:
    """(documents, tokens) of the first ``limit`` documents: for error messages only."""
    documents = tokens = 0
    for example in dataset.take(limit) if hasattr(dataset, "take") else dataset:
        documents += 1
        text = example.get(column)
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) if isinstance(text, str) and text else 0
    return documents, tokens


def prepare_data(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    accelerator: Accelerator,
    pairs: bool = False,
) -> PreparedData:
    """Loads, checks, tokenises and packs (or pairs) the data; materialises the held-out examples."""
    with accelerator.main_process_first():  # the main process downloads and prepares; the others reuse its cache
        train_raw, eval_raw, streaming, source = load_raw_datasets(args)
    if pairs:
        columns, flags = [args.prompt_column, args.response_column], ["--prompt_column", "--response_column"]
    else:
        columns, flags = [args.text_column], ["--text_column"]
    check_columns(train_raw, columns, flags)
    check_columns(eval_raw, columns, flags)
    if streaming:
        train_raw = train_raw.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        train_raw = split_dataset_by_node(
            train_raw, rank=accelerator.process_index, world_size=accelerator.num_processes
        )

    first_eval = next(iter(eval_raw.take(1) if streaming else eval_raw.select(range(min(1, len(eval_raw))))), None)
    prompt_text = "" if first_eval is None else str(first_eval.get(columns[0]) or "")
    if pairs:
        sample_prompt = args.prompt_template.replace("{prompt}", prompt_text)
    else:
        sample_prompt = next((line for line in prompt_text.splitlines() if line.strip()), "")[:64]
        sample_prompt += "\n" if sample_prompt and prompt_text.startswith(sample_prompt + "\n") else ""

    with accelerator.main_process_first():
        if pairs:
            train = pair_examples(train_raw, tokenizer, args, block_size, "Tokenising training pairs")
            held_out = pair_examples(eval_raw, tokenizer, args, block_size, "Tokenising held-out pairs")
        else:
            train = pack_documents(train_raw, tokenizer, args.text_column, block_size, args, "Packing training data")
            held_out = pack_documents(eval_raw, tokenizer, args.text_column, block_size, args, "Packing held-out data")

    empty = len(train) == 0 if isinstance(train, datasets.Dataset) else next(iter(train), None) is None
    if empty:
        what = "prompt/response pair with a non-empty response" if pairs else f"block of --block_size {block_size}"
        documents, tokens = _token_count(train_raw, tokenizer, columns[-1])
        raise ValueError(
            f"The training data ({source}) yields no {what}: its {documents} documents"
            + (" (first 10,000)" if documents == 10_000 else "")
            + f" hold {tokens} tokens in column {columns[-1]!r}"
            + ("." if tokens == 0 else ", fewer than one block; lower --block_size or add data.")
        )
    eval_examples = (
        list(held_out.take(args.max_eval_samples))
        if streaming
        else held_out.select(range(min(args.max_eval_samples, len(held_out)))).to_list()
    )
    if not eval_examples:
        raise ValueError(
            f"The held-out data ({source}) yields no {'pair' if pairs else f'block of {block_size} tokens'}: give "
            "more held-out documents (--validation_split_percentage / --validation_documents / --validation_file) "
            "or lower --block_size."
        )
    for example in eval_examples:
        example["num_bytes"] = _scored_bytes(tokenizer, example)

    fingerprint = {
        "data": args.dataset_name or os.path.abspath(args.train_file or DEFAULT_TRAIN_FILE),
        "dataset_config": args.dataset_config,
        "columns": columns,
        "block_size": block_size,
        "streaming": streaming,
    }
    if isinstance(train, datasets.Dataset):
        fingerprint["train_examples"] = len(train)
    return PreparedData(
        train=train,
        eval=eval_examples,
        streaming=streaming,
        sample_prompt=sample_prompt,
        source=source,
        hub_dataset=args.dataset_name,
        fingerprint=fingerprint,
    )


class ExampleStream:
    """This process's endless, deterministic stream of training examples, resumable at any position.

    A prepared dataset is reshuffled every epoch (permutation seeded by ``seed + epoch``) and dealt round-robin to the
    processes (each gets ``len // world_size`` examples per epoch), so position ``n`` of a process is found by index
    arithmetic. A streamed dataset (already split between processes by ``split_dataset_by_node`` and shuffled with a
    seeded buffer) is re-iterated with ``set_epoch``; resuming skips the examples already read.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int, seed: int):
        self.dataset, self.rank, self.world_size, self.seed = dataset, rank, world_size, seed
        self.prepared = isinstance(dataset, datasets.Dataset)
        if self.prepared:
            self.per_epoch = len(dataset) // world_size
            if self.per_epoch == 0:
                raise ValueError(
                    f"The training data has {len(dataset)} examples, fewer than the {world_size} processes: add data "
                    "or lower --block_size."
                )

    def epoch_of(self, position: int) -> float:
        """Epochs completed at a position (prepared data only, else NaN)."""
        return position / self.per_epoch if self.prepared else float("nan")

    def iterate(self, start: int = 0, show_skip: bool = False) -> Iterator[dict[str, Any]]:
        """Examples from position ``start`` on."""
        if self.prepared:
            position = start
            while True:
                epoch, offset = divmod(position, self.per_epoch)
                order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
                mine = order[self.rank :: self.world_size][: self.per_epoch]
                for index in mine[offset:].tolist():
                    yield self.dataset[index]
                position = (epoch + 1) * self.per_epoch
        else:
            skip = tqdm(total=start, desc="Skipping examples already trained on", disable=not (show_skip and start))
            seen, epoch = 0, 0
            while True:
                self.dataset.set_epoch(epoch)
                produced = 0
                for example in self.dataset:
                    produced += 1
                    if seen < start:
                        seen += 1
                        skip.update()
                        if seen == start:
                            skip.close()
                        continue
                    yield example
                if produced == 0:
                    raise ValueError(f"Process {self.rank} received no training examples from the stream.")
                epoch += 1


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch: ``input_ids``, ``labels`` (the inputs where none are given; -100 on padding) and, only when some
    example is shorter, a right-padding ``attention_mask``."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example.get("labels", example["input_ids"]))
        mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------

STATE_FILE = "training_state.json"
CHECKPOINT_PREFIX = "step_"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """``--resume_from_checkpoint``: a folder, or ``latest`` (the newest checkpoint under ``output_dir``)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint under {output_dir / 'checkpoints'}.")
        return found[-1]
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {spec}: no such folder.")
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {spec} is not a checkpoint of these scripts (no {STATE_FILE}); pass a folder "
            f"<output_dir>/checkpoints/{CHECKPOINT_PREFIX}N or 'latest'."
        )
    return path


def check_same_run(checkpoint: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Reads a checkpoint's state and raises if it was written by a run with other settings (model, data, batch,
    schedule, processes): resuming it would not continue this run."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    theirs = state.get("fingerprint", {})
    differences = [
        f"{key}: checkpoint {theirs.get(key)!r}, now {fingerprint.get(key)!r}"
        for key in sorted(set(theirs) | set(fingerprint))
        if theirs.get(key) != fingerprint.get(key)
    ]
    if differences:
        shown = "; ".join(d if len(d) < 300 else d[:300] + "..." for d in differences[:6])
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} comes from another run; these settings differ: {shown}"
            + (f" (and {len(differences) - 6} more)" if len(differences) > 6 else "")
            + ". Resume with the same arguments, or start a new run in another --output_dir."
        )
    return state


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingRun:
    """Everything the loop needs, built by a script."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    model_name: str
    output_dir: Path
    block_size: int
    kind: str  # "pretrain" or "finetune"


def default_output_dir(model_name: str, data_source: str) -> Path:
    data_name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data_source.split(" ")[0].split(",")[0]).stem).strip("-")
    return Path("outputs") / f"{model_name}-{data_name}"


def make_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    """The Accelerator: mixed precision, accumulation, CPU and trackers from the arguments and the Accelerate config."""
    trackers = [t.strip() for t in args.report_to.split(",") if t.strip() and t.strip() != "none"]
    kwargs: dict[str, Any] = {}
    if args.mixed_precision is not None:
        kwargs["mixed_precision"] = args.mixed_precision
    if args.cpu:
        kwargs["cpu"] = True
    if args.torch_compile:
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend=args.torch_compile_backend.upper())
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        **kwargs,
    )
    if args.torch_compile and args.torch_compile_backend == "inductor" and accelerator.device.type == "cpu":
        raise ValueError(
            "--torch_compile_backend inductor on CPU: torch's inductor CPU code computes the neural memory's gradients "
            "wrongly (measured with torch 2.13; tests/test_compile.py::test_inductor_cpu_backward_equals_eager). Use "
            "--torch_compile_backend aot_eager on CPU; inductor is meant for GPUs."
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"This process was launched as one of {launched} (WORLD_SIZE={launched}) but Accelerate runs "
            f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.value}): each would train alone. "
            "On CPU, set ACCELERATE_USE_CPU=true or pass --cpu; with GPUs, check that every process sees one."
        )
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        and accelerator.distributed_type != DistributedType.FSDP
    ):
        raise RuntimeError(
            f"The Accelerate config asks for FSDP but Accelerate runs {accelerator.distributed_type.value} (it enables "
            "FSDP on GPUs and other accelerators only; CPU processes would silently train unsharded, as DDP). Use "
            "examples/accelerate_configs/multi_cpu.yaml on CPU; tests/test_fsdp.py checks FSDP2 itself on CPU."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger(__name__).setLevel(logging.INFO)
    # Tied embeddings: Accelerate warns at every checkpoint that it stored lm_head.weight once (as it should).
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    return accelerator


@torch.no_grad()
def evaluate(run: TrainingRun) -> dict[str, float]:
    """Held-out loss (nats per scored token), perplexity and bits per byte, summed over all processes.

    Every process runs the same number of batches (padding its share with weight-0 repeats), as wrapped models may
    synchronise buffers in forward."""
    accelerator, model, args = run.accelerator, run.model, run.args
    examples = run.data.eval
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    per_process = math.ceil(len(examples) / accelerator.num_processes)
    batches = math.ceil(per_process / args.per_device_eval_batch_size)
    pad_id = pad_token_id(run.tokenizer)
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nll, tokens, bytes
    model.eval()
    for b in range(batches):
        chunk = mine[b * args.per_device_eval_batch_size : (b + 1) * args.per_device_eval_batch_size]
        weight = 1.0 if chunk else 0.0
        chunk = chunk or examples[:1]
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_id).items()}
        tokens = (batch["labels"][:, 1:] != -100).sum()
        # num_items_in_batch=1: the loss comes back as the summed negative log-likelihood.
        nll = model(**batch, use_cache=False, num_items_in_batch=torch.ones((), device=accelerator.device)).loss
        totals += weight * torch.stack(
            [
                nll.double(),
                tokens.double(),
                torch.tensor(sum(e["num_bytes"] for e in chunk), dtype=torch.float64, device=accelerator.device),
            ]
        )
    model.train()
    nll, tokens, num_bytes = accelerator.reduce(totals, reduction="sum").tolist()
    loss = nll / max(tokens, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_bits_per_byte": nll / math.log(2) / max(num_bytes, 1.0),
        "eval_tokens": int(tokens),
    }


def say(accelerator: Accelerator, message: str) -> None:
    """Prints on the main process without breaking its progress bar."""
    if accelerator.is_main_process:
        tqdm.write(message, file=sys.stdout)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _fingerprint(run: TrainingRun, max_train_steps: int) -> dict[str, Any]:
    args = run.args
    config = run.accelerator.unwrap_model(run.model).config.to_dict()
    for key in ("transformers_version", "_name_or_path", "auto_map", "architectures", "dtype", "use_cache"):
        config.pop(key, None)
    return _jsonable(
        {
            "kind": run.kind,
            "model_config": config,
            "init": args.model_name_or_path or getattr(args, "config", None),
            "tokenizer": [run.args.tokenizer_name or "default", len(run.tokenizer)],
            **run.data.fingerprint,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": run.accelerator.gradient_accumulation_steps,
            "num_processes": run.accelerator.num_processes,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "adam": [args.adam_beta1, args.adam_beta2, args.adam_epsilon],
            "max_grad_norm": args.max_grad_norm,
            "schedule": [args.lr_scheduler_type, args.num_warmup_steps, args.min_lr_ratio, max_train_steps],
            "seed": args.seed,
        }
    )


def _save_checkpoint(run: TrainingRun, step: int, position: int, fingerprint: dict[str, Any]) -> Path:
    """``accelerator.save_state`` into a temporary folder renamed when complete, so that a run killed while saving
    never leaves a half-written checkpoint; older checkpoints beyond ``--checkpoints_total_limit`` are removed."""
    accelerator = run.accelerator
    folder = run.output_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    partial = folder / f".partial-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        state = {"step": step, "position": position, "fingerprint": fingerprint}
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        limit = run.args.checkpoints_total_limit
        for old in list_checkpoints(run.output_dir)[: -limit if limit else None] if limit else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def train(run: TrainingRun) -> dict[str, Any]:
    """The training loop: returns the final metrics (also written to ``all_results.json``)."""
    args, accelerator, tokenizer = run.args, run.accelerator, run.tokenizer
    world = accelerator.num_processes
    stream = ExampleStream(run.data.train, accelerator.process_index, world, args.seed)

    if args.gradient_checkpointing:
        set_activation_checkpointing(run.model, True)
    grad_accum = accelerator.gradient_accumulation_steps
    max_train_steps = args.max_train_steps
    if max_train_steps is None and args.num_train_epochs is not None:
        if not stream.prepared:
            raise ValueError("--num_train_epochs needs prepared data; with --streaming give --max_train_steps.")
        max_train_steps = math.ceil(
            args.num_train_epochs * stream.per_epoch / (args.per_device_train_batch_size * grad_accum)
        )
    max_train_steps = max_train_steps or 200

    optimizer = torch.optim.AdamW(
        parameter_groups(run.model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    # Accelerate steps a prepared scheduler once per process at every optimizer step: count in those units.
    scheduler_kwargs: dict[str, Any] = {}
    scheduler_type = args.lr_scheduler_type
    if scheduler_type == "cosine" and args.min_lr_ratio > 0:
        scheduler_type, scheduler_kwargs = "cosine_with_min_lr", {"min_lr_rate": args.min_lr_ratio}
    elif scheduler_type == "warmup_stable_decay":
        scheduler_kwargs = {"num_decay_steps": max(1, max_train_steps // 5) * world, "min_lr_ratio": args.min_lr_ratio}
    lr_scheduler = get_scheduler(
        scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * world,
        num_training_steps=max_train_steps * world,
        scheduler_specific_kwargs=scheduler_kwargs,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    model, optimizer, lr_scheduler = accelerator.prepare(run.model, optimizer, lr_scheduler)
    run.model = model
    grad_accum = accelerator.gradient_accumulation_steps  # DeepSpeed may impose its own
    fingerprint = _fingerprint(run, max_train_steps)

    completed_steps, position = 0, 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args.resume_from_checkpoint, run.output_dir)
        state = check_same_run(checkpoint, fingerprint)
        accelerator.print(f"Resuming from {checkpoint} (step {state['step']})")
        accelerator.load_state(str(checkpoint))
        completed_steps, position = int(state["step"]), int(state["position"])

    hparams = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}
    accelerator.init_trackers(args.run_name or run.output_dir.name, config=hparams)
    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    tokens_per_step = args.per_device_train_batch_size * grad_accum * world * run.block_size
    accelerator.print(
        f"***** {run.kind}: {run.model_name} ({n_params / 1e6:.2f}M parameters) on {run.data.source} *****\n"
        f"  processes {world} ({accelerator.distributed_type.value}, {accelerator.device}), mixed precision "
        f"{accelerator.mixed_precision}\n  batch {args.per_device_train_batch_size} x {grad_accum} accumulation x "
        f"{world} processes of <= {run.block_size} tokens (<= {tokens_per_step} tokens per step)\n"
        f"  steps {max_train_steps}"
        + (
            f" (~{max_train_steps * args.per_device_train_batch_size * grad_accum / stream.per_epoch:.2f} epochs)"
            if stream.prepared
            else ""
        )
        + f", held-out: {len(run.data.eval)} examples\n  output: {run.output_dir}"
    )

    history: list[dict[str, Any]] = []

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(run)
        metrics["step"] = step
        history.append(metrics)
        say(
            accelerator,
            f"step {step:>6} | eval loss {metrics['eval_loss']:.4f} | ppl {metrics['eval_perplexity']:.2f} | "
            f"bits/byte {metrics['eval_bits_per_byte']:.4f}",
        )
        accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        return metrics

    if completed_steps == 0:
        run_eval(0)
    examples = stream.iterate(position, show_skip=accelerator.is_local_main_process)
    pad_id = pad_token_id(tokenizer)
    progress = tqdm(
        total=max_train_steps, initial=completed_steps, desc="Training", disable=not accelerator.is_local_main_process
    )
    model.train()
    window_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    window_tokens = 0
    start, tokens_seen, last_loss = time.time(), 0, float("nan")
    while completed_steps < max_train_steps:
        micro = [
            collate([next(examples) for _ in range(args.per_device_train_batch_size)], pad_id)
            for _ in range(grad_accum)
        ]
        position += grad_accum * args.per_device_train_batch_size
        local_items = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        num_items = accelerator.reduce(torch.tensor(local_items, device=accelerator.device), reduction="sum")
        grad_norm = None
        for batch in micro:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                # Sum of the token losses / all the scored tokens of the step on all processes; x world x accumulation
                # undoes the gradient averaging of DDP and the division by the accumulation steps in backward.
                loss = model(**batch, use_cache=False, num_items_in_batch=num_items).loss
                accelerator.backward(loss * world * grad_accum)
                window_loss += loss.detach().double() * num_items
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        window_tokens += int(num_items)
        tokens_seen += int(num_items)
        completed_steps += 1
        progress.update(1)

        if completed_steps % max(args.logging_steps, 1) == 0 or completed_steps == max_train_steps:
            last_loss = accelerator.reduce(window_loss.clone(), reduction="sum").item() / max(window_tokens, 1)
            if not math.isfinite(last_loss):
                raise RuntimeError(
                    f"The training loss is {last_loss} at step {completed_steps}: training diverged. Lower "
                    f"--learning_rate (now {args.learning_rate}) or raise --num_warmup_steps (keep --max_grad_norm clipping "
                    "on) and start again."
                )
            logs = {
                "train_loss": last_loss,
                "learning_rate": lr_scheduler.get_last_lr()[0],
                "epoch": stream.epoch_of(position),
            }
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            logs["tokens_per_second"] = tokens_seen / max(time.time() - start, 1e-9)
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['learning_rate']:.2e}")
            accelerator.log(logs, step=completed_steps)
            window_loss.zero_()
            window_tokens = 0
        if args.eval_steps and completed_steps % args.eval_steps == 0 and completed_steps != max_train_steps:
            run_eval(completed_steps)
        if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
            path = _save_checkpoint(run, completed_steps, position, fingerprint)
            logger.info(f"Saved checkpoint {path}", main_process_only=True)
    progress.close()
    runtime = time.time() - start

    final = run_eval(completed_steps)
    results = {
        **{k: v for k, v in final.items() if k != "step"},
        "train_loss": last_loss,
        "train_steps": completed_steps,
        "train_tokens_this_session": tokens_seen,
        "train_runtime_s": runtime,
        "num_parameters": n_params,
        "num_processes": world,
        "eval_history": history,
        "parameter_sha256_per_process": _parameter_digests(accelerator, model),
    }
    return results


def _parameters_sharded(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the parameters (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


def _parameter_digests(accelerator: Accelerator, model: torch.nn.Module) -> list[str] | None:
    """A SHA-256 of every process's parameters (replicated strategies only), to check that the processes agree."""
    if _parameters_sharded(accelerator):
        return None
    digest = hashlib.sha256()
    for name, param in sorted(accelerator.unwrap_model(model).named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return gather_object([digest.hexdigest()])


# ----------------------------------------------------------------------------------------------------------------------
# End of a run: save, model card, sample, Hub
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_sample(model: Any, tokenizer: PreTrainedTokenizerBase, prompt: str, args: argparse.Namespace) -> str:
    """A sampled continuation of ``prompt`` (documents start after BOS, or after the EOS of the previous one)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [start] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    set_seed(args.seed)
    model.eval()
    out = model.generate(
        torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=args.sample_max_new_tokens,
        do_sample=True,
        temperature=args.sample_temperature,
        top_k=args.sample_top_k,
        pad_token_id=pad_token_id(tokenizer),
    )
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)


def write_model_card(run: TrainingRun, results: dict[str, Any], sample: str) -> str:
    """``README.md`` with Hub metadata (library, tags, datasets, base model, eval results), the config, the final
    evaluation, the hyperparameters and the sample."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    args, data = run.args, run.data
    config = run.accelerator.unwrap_model(run.model).config
    repo = args.hub_model_id or run.output_dir.name
    variant = config.variant.upper()
    dataset_name = data.hub_dataset or data.source
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=data.hub_dataset or "text",
            dataset_name=f"{dataset_name} (held-out)",
            metric_type=metric,
            metric_name=name,
            metric_value=round(float(results[key]), 4),
        )
        for metric, name, key in (
            ("perplexity", "Perplexity", "eval_perplexity"),
            ("bits_per_byte", "Bits per byte", "eval_bits_per_byte"),
            ("loss", "Loss (nats/token)", "eval_loss"),
        )
    ]
    card_data = ModelCardData(
        language=None,
        license=args.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[
            "titans",
            "titans-hf",
            f"titans-{config.variant}",
            "neural-memory",
            "test-time-memorization",
            "long-context",
            "custom_code",
        ],
        datasets=[data.hub_dataset] if data.hub_dataset else None,
        base_model=args.model_name_or_path if run.kind == "finetune" and args.model_name_or_path else None,
        model_name=repo,
        eval_results=eval_results,
    )
    mode = (
        "prompt/response pairs (loss on the response only)" if getattr(args, "prompt_column", None) else "packed text"
    )
    grad_accum = run.accelerator.gradient_accumulation_steps
    hyper = {
        "training": "fine-tuning" if run.kind == "finetune" else "pretraining",
        "data": f"{data.source}, {mode}, blocks of {run.block_size} tokens",
        "tokenizer": f"{args.tokenizer_name or 'default'} ({len(run.tokenizer)} tokens)",
        "optimizer steps": results["train_steps"],
        "batch": f"{args.per_device_train_batch_size} x {grad_accum} accumulation x {run.accelerator.num_processes} processes",
        "optimizer": f"AdamW (lr {args.learning_rate}, betas ({args.adam_beta1}, {args.adam_beta2}), weight decay "
        f"{args.weight_decay}), clipping {args.max_grad_norm}",
        "schedule": f"{args.lr_scheduler_type}, {args.num_warmup_steps} warmup steps, floor {args.min_lr_ratio} x peak",
        "mixed precision": run.accelerator.mixed_precision,
        "parameters": f"{results['num_parameters'] / 1e6:.2f}M",
    }
    config_json = json.dumps(
        {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}, indent=2
    )
    history = "\n".join(
        f"| {h['step']} | {h['eval_loss']:.4f} | {h['eval_perplexity']:.2f} | {h['eval_bits_per_byte']:.4f} |"
        for h in results["eval_history"]
    )
    content = (
        f"""---
{card_data.to_yaml()}
---

# {repo}

A **Titans** language model ({variant}: memory as {dict(MAC="context", MAG="a gate", MAL="a layer", LMM="the only mixer").get(variant, variant)})
{"fine-tuned" if run.kind == "finetune" else "pretrained"} with the `examples/{run.kind}.py` script of titans-hf.
Titans (Behrouz, Zhong, Mirrokni, 2024) adds a neural long-term memory, an MLP whose weights are trained by gradient
descent with momentum and forgetting while the model reads, to attention.

## Usage

The architecture's code ships with the weights (`trust_remote_code=True`; or `pip install titans-hf` and `import titans_hf`).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
inputs = tokenizer({json.dumps(data.sample_prompt or "Hello")}, return_tensors="pt", add_special_tokens=False)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=100, do_sample=True)[0]))
```

## Evaluation (held-out data)

| loss (nats/token) | perplexity | bits per byte | tokens |
|---|---|---|---|
| {results["eval_loss"]:.4f} | {results["eval_perplexity"]:.2f} | {results["eval_bits_per_byte"]:.4f} | {results["eval_tokens"]} |

During training:

| step | loss | perplexity | bits per byte |
|---|---|---|---|
{history}

## Training

| | |
|---|---|
"""
        + "\n".join(f"| {k} | {v} |" for k, v in hyper.items())
        + f"""

## Sample

```text
{sample}
```

## Configuration

```json
{config_json}
```

## Citation

```bibtex
{TITANS_CITATION}
```
"""
    )
    ModelCard(content).save(run.output_dir / "README.md")
    return content


def push_folder(folder: Path, args: argparse.Namespace, kind: str) -> str:
    """Uploads the final folder (not the checkpoints or tracker logs) to ``--hub_model_id``; returns the repo id.

    Goes through ``transformers.utils.hub.hf_api()``, the client Transformers' own ``push_to_hub`` uses."""
    api = transformers.utils.hub.hf_api()
    repo_id = api.create_repo(
        args.hub_model_id, private=args.hub_private_repo or None, token=args.hub_token, exist_ok=True
    ).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=f"Titans model from examples/{kind}.py",
        ignore_patterns=["checkpoints/*", "checkpoints/**", "runs/*", "runs/**", "*.partial*"],
        token=args.hub_token,
    )
    return repo_id


def finish(run: TrainingRun, results: dict[str, Any]) -> dict[str, Any]:
    """Saves model + tokenizer (loadable with ``trust_remote_code=True``), the results, a model card with a generated
    sample, and pushes to the Hub if asked."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(run.model)
    unwrapped = accelerator.unwrap_model(run.model)
    if args.gradient_checkpointing:
        set_activation_checkpointing(unwrapped, False)
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(run.output_dir, state_dict=state_dict, save_function=accelerator.save)
        # What clients (lm-evaluation-harness, pipelines) read as the model's context: the longest verified, not the
        # training length (the config has no max_position_embeddings; README "Context length").
        run.tokenizer.model_max_length = VERIFIED_CONTEXT_LENGTH
        run.tokenizer.save_pretrained(run.output_dir)
        if _parameters_sharded(accelerator):  # the wrapped copy holds a shard only: sample from the saved model
            sampler = AutoModelForCausalLM.from_pretrained(run.output_dir).to(accelerator.device)
        else:
            sampler = unwrapped
        sample = generate_sample(sampler, run.tokenizer, args.sample_prompt or run.data.sample_prompt, args)
        results["sample"] = sample
        accelerator.print(f"----- sample -----\n{sample}\n------------------")
        write_model_card(run, results, sample)
        (run.output_dir / "all_results.json").write_text(json.dumps(_jsonable(results), indent=2))
        accelerator.print(
            f"Saved model, tokenizer and model card to {run.output_dir} (final eval: loss {results['eval_loss']:.4f}, "
            f"perplexity {results['eval_perplexity']:.2f}, bits/byte {results['eval_bits_per_byte']:.4f})"
        )
        if args.push_to_hub:
            repo_id = push_folder(run.output_dir, args, run.kind)
            results["hub_repo_id"] = repo_id
            accelerator.print(f"Pushed {run.output_dir} to the Hub: {repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def run_script(
    args: argparse.Namespace,
    kind: str,
    prepare: Callable[[argparse.Namespace, Accelerator, PreTrainedTokenizerBase, int], PreparedData],
) -> dict[str, Any]:
    """Common driver: tokenizer, model, output folder, accelerator, data (``prepare``), training, saving."""
    check_arguments(args)
    tokenizer, tokenizer_name = load_tokenizer(args)
    args.tokenizer_name = args.tokenizer_name or tokenizer_name
    set_seed(args.seed)
    model, model_name = create_model(args, tokenizer)
    block_size = args.block_size or model.config.training_context_length
    model.config.training_context_length = block_size  # the record of what the weights were trained at
    data_hint = args.dataset_name or args.train_file or str(DEFAULT_TRAIN_FILE)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(model_name, data_hint)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        find_checkpoint(args.resume_from_checkpoint, output_dir)  # fail before the data is prepared
    accelerator = make_accelerator(args, output_dir)
    data = prepare(args, accelerator, tokenizer, block_size)
    run = TrainingRun(args, accelerator, model, tokenizer, data, model_name, output_dir, block_size, kind)
    results = train(run)
    return finish(run, results)


__all__ = [
    "BUILTIN_PRESETS",
    "ExampleStream",
    "PreparedData",
    "TrainingRun",
    "available_presets",
    "build_parser",
    "collate",
    "prepare_data",
    "resolve_config",
    "run_script",
]
