# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""What ``examples/pretrain.py`` and ``examples/finetune.py`` share, one module per stage of a run:

- ``arguments.py``: the command-line arguments and their checks;
- ``models.py``: presets (``--config tiny|small|titans-170m-mac|...``), the tokenizer, the model, AdamW's groups;
- ``data.py``: Hub datasets (streamed by default) or local txt/json/jsonl/parquet/csv files, packed into
  ``--block_size`` blocks or prompt/response pairs (loss on the response only), a held-out split, and the
  deterministic, resumable per-process stream of examples;
- ``run.py``: the parts of a run (:class:`TrainingRun`), the Accelerator, and :func:`log`, the one output channel;
- ``loop.py``: the training loop (AdamW, warmup + decay, clipping, token-weighted accumulation) and evaluation;
- ``checkpoints.py``: ``save_state`` checkpoints, written atomically, resumed only by the run that wrote them;
- ``publishing.py``: ``save_pretrained``, a sample, the model card (``model_card_template.md``), the Hub push;
- ``script.py``: :func:`run_script`, the driver both scripts call.

The scripts run from the repository (``python examples/pretrain.py``); this package sits next to them.
"""

from .arguments import build_parser, check_arguments
from .checkpoints import list_checkpoints
from .data import (
    DEFAULT_TRAIN_FILE,
    TEXT_EXTENSIONS,
    ExampleStream,
    PreparedData,
    check_columns,
    collate,
    data_files,
    load_raw_datasets,
    pair_examples,
    prepare_data,
)
from .models import BUILTIN_PRESETS, available_presets, resolve_config
from .publishing import VERIFIED_CONTEXT_LENGTH
from .run import TrainingRun
from .script import run_script

__all__ = [
    "BUILTIN_PRESETS",
    "DEFAULT_TRAIN_FILE",
    "TEXT_EXTENSIONS",
    "VERIFIED_CONTEXT_LENGTH",
    "ExampleStream",
    "PreparedData",
    "TrainingRun",
    "available_presets",
    "build_parser",
    "check_arguments",
    "check_columns",
    "collate",
    "data_files",
    "list_checkpoints",
    "load_raw_datasets",
    "pair_examples",
    "prepare_data",
    "resolve_config",
    "run_script",
]
