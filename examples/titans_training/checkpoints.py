# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Checkpoints: ``accelerator.save_state`` folders written atomically, found again, and checked to belong to the run
that resumes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .run import TrainingRun

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


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run_fingerprint(run: TrainingRun, max_train_steps: int) -> dict[str, Any]:
    args = run.args
    config = run.accelerator.unwrap_model(run.model).config.to_dict()
    for key in ("transformers_version", "_name_or_path", "auto_map", "architectures", "dtype", "use_cache"):
        config.pop(key, None)
    return jsonable(
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
            "train": [getattr(args, "train", "all"), getattr(args, "lora_r", None), getattr(args, "lora_alpha", None)],
        }
    )


def save_checkpoint(run: TrainingRun, step: int, position: int, fingerprint: dict[str, Any]) -> Path:
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
