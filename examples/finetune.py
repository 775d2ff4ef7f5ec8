#!/usr/bin/env python
# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Fine-tune a pretrained Titans model with Accelerate, on text or on prompt/response pairs (loss on the response).

The checkpoint is a local folder (e.g. the output of examples/pretrain.py) or a Hub id; the data a Hub dataset or
local files. Text is packed as in pretraining; with --prompt_column/--response_column each pair becomes one padded
example ``[BOS] prompt_template(prompt) response EOS`` whose prompt tokens carry no loss.

    python examples/finetune.py --model_name_or_path outputs/titans-small-tinyshakespeare \\
        --train_file pairs.jsonl --prompt_column prompt --response_column response --max_train_steps 100

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/finetune.py \\
        --model_name_or_path you/titans-170m-mac --dataset_name tatsu-lab/alpaca \\
        --prompt_column instruction --response_column output --block_size 1024 \\
        --num_train_epochs 2 --push_to_hub --hub_model_id you/titans-170m-mac-alpaca

Run ``python examples/finetune.py --help`` for every option.
"""

from __future__ import annotations

import argparse
from typing import Any

from accelerate import Accelerator
from titans_training import PreparedData, build_parser, prepare_data, run_script
from transformers import PreTrainedTokenizerBase


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__.splitlines()[0], finetune=True)
    args = parser.parse_args(argv)
    if not args.dataset_name and not args.train_file:
        parser.error(
            "fine-tuning needs data: --dataset_name (Hub) or --train_file (local txt/json/jsonl/parquet/csv)."
        )
    return args


def prepare(
    args: argparse.Namespace, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> PreparedData:
    """Prompt/response pairs when --prompt_column is given, else packed text."""
    return prepare_data(args, tokenizer, block_size, accelerator, pairs=args.prompt_column is not None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the fine-tuning; returns the final metrics (also in ``<output_dir>/all_results.json``)."""
    return run_script(parse_args(argv), "finetune", prepare)


if __name__ == "__main__":
    main()
