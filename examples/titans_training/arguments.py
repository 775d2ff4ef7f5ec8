# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""The command-line arguments both scripts share, and their checks."""

from __future__ import annotations

import argparse

from .data import DEFAULT_TRAIN_FILE, EXAMPLES_DIR
from .models import BYTE_TOKENIZER, HUB_TOKENIZER, available_presets

TRACKERS = ("all", "tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")


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

    if finetune:
        model.add_argument(
            "--train",
            default="all",
            choices=["all", "memory", "memory+lora"],
            help="What trains: every parameter; the memory alone (the rest frozen, e.g. a model converted from a "
            "pretrained base with examples/convert.py keeps its base); or the memory and LoRA adapters on the "
            "attention and MLP projections (merged into the saved model; needs peft).",
        )
        model.add_argument("--lora_r", type=int, default=16, help="--train memory+lora: the adapters' rank.")
        model.add_argument("--lora_alpha", type=float, help="--train memory+lora: LoRA's alpha (default: 2 x r).")
        model.add_argument("--lora_dropout", type=float, default=0.0, help="--train memory+lora: LoRA's dropout.")

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
        help="torch.compile backend for --torch_compile (default: inductor; on CPU, MAC needs aot_eager, README 'torch.compile').",
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
    if getattr(args, "lora_r", 1) < 1:
        raise ValueError(f"--lora_r must be >= 1, got {args.lora_r}.")
    if not 0 <= getattr(args, "lora_dropout", 0.0) < 1:
        raise ValueError(f"--lora_dropout must lie in [0, 1), got {args.lora_dropout}.")
    prompt, response = getattr(args, "prompt_column", None), getattr(args, "response_column", None)
    if (prompt is None) != (response is None):
        raise ValueError("Prompt/response mode needs both --prompt_column and --response_column.")
    if prompt is not None and "{prompt}" not in args.prompt_template:
        raise ValueError(f"--prompt_template must contain '{{prompt}}', got {args.prompt_template!r}.")
