# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""A training run: its parts (:class:`TrainingRun`), the Accelerator, and the one output channel (:func:`log`)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, TorchDynamoPlugin, gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import PreparedData


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
    if args.torch_compile:  # regional: one compiled decoder layer serves every layer (README "torch.compile")
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(
            backend=args.torch_compile_backend.upper(), use_regional_compilation=True
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        **kwargs,
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


def log(accelerator: Accelerator, message: str) -> None:
    """Prints on the main process without breaking its progress bar."""
    if accelerator.is_main_process:
        tqdm.write(message, file=sys.stdout)


def parameters_sharded(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the parameters (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


def parameter_digests(accelerator: Accelerator, model: torch.nn.Module) -> list[str] | None:
    """A SHA-256 of every process's parameters (replicated strategies only), to check that the processes agree."""
    if parameters_sharded(accelerator):
        return None
    digest = hashlib.sha256()
    for name, param in sorted(accelerator.unwrap_model(model).named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return gather_object([digest.hexdigest()])
