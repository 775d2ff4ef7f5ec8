# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""The driver both scripts call: arguments checked, tokenizer, model, accelerator, data, training, publishing."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from .arguments import check_arguments
from .checkpoints import find_checkpoint
from .data import DEFAULT_TRAIN_FILE, PreparedData
from .loop import train
from .models import create_model, load_tokenizer, select_trainable
from .publishing import finish
from .run import TrainingRun, default_output_dir, make_accelerator, parameters_sharded


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
    model = select_trainable(model, args)
    data_hint = args.dataset_name or args.train_file or str(DEFAULT_TRAIN_FILE)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(model_name, data_hint)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        find_checkpoint(args.resume_from_checkpoint, output_dir)  # fail before the data is prepared
    accelerator = make_accelerator(args, output_dir)
    if hasattr(model, "merge_and_unload") and parameters_sharded(accelerator):
        raise ValueError(
            "--train memory+lora merges the adapters when saving, which sharded parameters (FSDP, ZeRO-3) "
            "do not allow here: use DDP / ZeRO-2, or --train memory / all."
        )
    data = prepare(args, accelerator, tokenizer, block_size)
    run = TrainingRun(args, accelerator, model, tokenizer, data, model_name, output_dir, block_size, kind)
    results = train(run)
    return finish(run, results)
