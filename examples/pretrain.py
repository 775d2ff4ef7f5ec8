#!/usr/bin/env python
# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Pretrain a Titans language model with Accelerate (explicit loop, in the style of Transformers' run_clm_no_trainer).

With no arguments it trains the small CPU preset on the shipped Tiny Shakespeare slice (examples/data) with the
offline byte-level tokenizer for 200 steps (a few minutes on 2 CPU cores), prints the held-out bits per byte as they
fall, saves model + tokenizer + model card to ./outputs/titans-small-tinyshakespeare and prints a generated sample:

    python examples/pretrain.py
    accelerate launch examples/pretrain.py                       # same, through Accelerate

The paper's setting (FineWeb-Edu, Llama-2 32K tokenizer, 4K context, AdamW 4e-4, wd 0.1, ~0.5M-token batches):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/pretrain.py \\
        --dataset_name HuggingFaceFW/fineweb-edu --dataset_config sample-10BT \\
        --config titans-170m-mac --block_size 4096 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \\
        --learning_rate 4e-4 --num_warmup_steps 2000 --max_train_steps 30000 --eval_steps 1000 \\
        --checkpointing_steps 1000 --report_to tensorboard --push_to_hub --hub_model_id you/titans-170m-mac

Resume a stopped run exactly where it was (data stream, optimizer, schedule, random state):

    python examples/pretrain.py <same arguments> --resume_from_checkpoint latest

Run ``python examples/pretrain.py --help`` for every option.
"""

from __future__ import annotations

import argparse
from typing import Any

from accelerate import Accelerator
from titans_training import PreparedData, build_parser, prepare_data, run_script
from transformers import PreTrainedTokenizerBase


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0], finetune=False)
    return parser.parse_args(argv)


def prepare(
    args: argparse.Namespace, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> PreparedData:
    """Documents tokenised, joined with EOS and packed into ``block_size`` blocks."""
    return prepare_data(args, tokenizer, block_size, accelerator, pairs=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the pretraining; returns the final metrics (also in ``<output_dir>/all_results.json``)."""
    return run_script(parse_args(argv), "pretrain", prepare)


if __name__ == "__main__":
    main()
