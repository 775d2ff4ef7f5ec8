# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""The training loop and the held-out evaluation."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import get_scheduler

from .checkpoints import check_same_run, find_checkpoint, run_fingerprint, save_checkpoint
from .data import ExampleStream, collate, pad_token_id
from .models import parameter_groups, set_activation_checkpointing
from .run import TrainingRun, log, parameter_digests


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


def train(run: TrainingRun) -> dict[str, Any]:
    """The training loop: returns the final metrics (also written to ``all_results.json``)."""
    args, accelerator = run.args, run.accelerator
    stream = ExampleStream(run.data.train, accelerator.process_index, accelerator.num_processes, args.seed)
    max_train_steps = count_steps(run, stream)
    optimizer, lr_scheduler = prepare_optimization(run, max_train_steps)
    fingerprint = run_fingerprint(run, max_train_steps)
    completed_steps, position = resume(run, fingerprint)
    report = Report(run, stream, max_train_steps, completed_steps)
    if completed_steps == 0:
        report.evaluate(0)
    examples = stream.iterate(position, show_skip=accelerator.is_local_main_process)
    batch_size, grad_accum = args.per_device_train_batch_size, accelerator.gradient_accumulation_steps
    pad_id = pad_token_id(run.tokenizer)
    run.model.train()
    while completed_steps < max_train_steps:
        micro = [collate([next(examples) for _ in range(batch_size)], pad_id) for _ in range(grad_accum)]
        position += grad_accum * batch_size
        loss, num_items, grad_norm = optimizer_step(run, optimizer, lr_scheduler, micro)
        completed_steps += 1
        report.step(completed_steps, loss, num_items, grad_norm, lr_scheduler.get_last_lr()[0], position)
        if args.eval_steps and completed_steps % args.eval_steps == 0 and completed_steps != max_train_steps:
            report.evaluate(completed_steps)
        if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
            path = save_checkpoint(run, completed_steps, position, fingerprint)
            log(accelerator, f"Saved checkpoint {path}")
    return report.finish(completed_steps)


def optimizer_step(
    run: TrainingRun, optimizer: torch.optim.Optimizer, lr_scheduler: Any, micro: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimizer step over the micro-batches ``micro`` (gradient accumulation). Returns the summed token loss,
    the scored tokens of the step on all processes, and the gradient norm before clipping (if clipped)."""
    accelerator, model, args = run.accelerator, run.model, run.args
    world, grad_accum = accelerator.num_processes, accelerator.gradient_accumulation_steps
    local_items = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    num_items = accelerator.reduce(torch.tensor(local_items, device=accelerator.device), reduction="sum")
    summed = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    grad_norm = None
    for batch in micro:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            # Sum of the token losses / all the scored tokens of the step on all processes; x world x accumulation
            # undoes the gradient averaging of DDP and the division by the accumulation steps in backward.
            loss = model(**batch, use_cache=False, num_items_in_batch=num_items).loss
            accelerator.backward(loss * world * grad_accum)
            summed += loss.detach().double() * num_items
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
    return summed, num_items, grad_norm


def count_steps(run: TrainingRun, stream: ExampleStream) -> int:
    """``--max_train_steps``, or the steps of ``--num_train_epochs`` (prepared data), or 200."""
    args = run.args
    max_train_steps = args.max_train_steps
    if max_train_steps is None and args.num_train_epochs is not None:
        if not stream.prepared:
            raise ValueError("--num_train_epochs needs prepared data; with --streaming give --max_train_steps.")
        per_step = args.per_device_train_batch_size * run.accelerator.gradient_accumulation_steps
        max_train_steps = math.ceil(args.num_train_epochs * stream.per_epoch / per_step)
    return max_train_steps or 200


def prepare_optimization(run: TrainingRun, max_train_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and the learning-rate schedule, prepared with the model by Accelerate (``run.model`` becomes the
    wrapped model)."""
    args, accelerator = run.args, run.accelerator
    world = accelerator.num_processes
    if args.gradient_checkpointing:
        set_activation_checkpointing(run.model, True)
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
    compiles = args.torch_compile and args.torch_compile_backend == "inductor" and accelerator.device.type == "cpu"
    if compiles and getattr(run.model.config, "variant", None) == "mac":
        raise ValueError(
            "--torch_compile_backend inductor on CPU with variant='mac': torch 2.13's inductor fails to compile MAC on "
            "CPU (an internal error in its attention masks' indexing; README, 'torch.compile and GPUs'). Use "
            "--torch_compile_backend aot_eager on CPU (MAG, MAL and LMM compile with inductor on CPU too)."
        )
    run.model, optimizer, lr_scheduler = accelerator.prepare(run.model, optimizer, lr_scheduler)
    return optimizer, lr_scheduler


def resume(run: TrainingRun, fingerprint: dict[str, Any]) -> tuple[int, int]:
    """``--resume_from_checkpoint``: loads the state of a checkpoint of this run; returns (steps, stream position)."""
    if not run.args.resume_from_checkpoint:
        return 0, 0
    checkpoint = find_checkpoint(run.args.resume_from_checkpoint, run.output_dir)
    state = check_same_run(checkpoint, fingerprint)
    log(run.accelerator, f"Resuming from {checkpoint} (step {state['step']})")
    run.accelerator.load_state(str(checkpoint))
    return int(state["step"]), int(state["position"])


class Report:
    """What the loop reports: a progress bar, the training loss over each ``--logging_steps`` window, the held-out
    evaluations, to the trackers and the output channel; and the final results."""

    def __init__(self, run: TrainingRun, stream: ExampleStream, max_train_steps: int, completed_steps: int):
        self.run, self.stream, self.max_train_steps = run, stream, max_train_steps
        accelerator, args = run.accelerator, run.args
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}
        accelerator.init_trackers(args.run_name or run.output_dir.name, config=hparams)
        self.num_parameters = sum(p.numel() for p in accelerator.unwrap_model(run.model).parameters())
        self.num_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        log(accelerator, self.describe())
        self.history: list[dict[str, Any]] = []
        self.progress = tqdm(
            total=max_train_steps,
            initial=completed_steps,
            desc="Training",
            disable=not accelerator.is_local_main_process,
        )
        self.window_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        self.window_tokens = 0
        self.start, self.tokens_seen, self.last_loss = time.time(), 0, float("nan")

    def describe(self) -> str:
        run, args, accelerator = self.run, self.run.args, self.run.accelerator
        world, grad_accum = accelerator.num_processes, accelerator.gradient_accumulation_steps
        tokens_per_step = args.per_device_train_batch_size * grad_accum * world * run.block_size
        epochs = ""
        if self.stream.prepared:
            epochs = f" (~{self.max_train_steps * args.per_device_train_batch_size * grad_accum / self.stream.per_epoch:.2f} epochs)"
        return (
            f"***** {run.kind}: {run.model_name} ({self.num_parameters / 1e6:.2f}M parameters, "
            f"{self.num_trainable / 1e6:.2f}M trained) on {run.data.source} "
            f"*****\n  processes {world} ({accelerator.distributed_type.value}, {accelerator.device}), mixed "
            f"precision {accelerator.mixed_precision}\n  batch {args.per_device_train_batch_size} x {grad_accum} "
            f"accumulation x {world} processes of <= {run.block_size} tokens (<= {tokens_per_step} tokens per step)\n"
            f"  steps {self.max_train_steps}"
            + epochs
            + f", held-out: {len(run.data.eval)} examples\n  output: {run.output_dir}"
        )

    def step(
        self,
        step: int,
        loss: torch.Tensor,
        num_items: torch.Tensor,
        grad_norm: torch.Tensor | None,
        learning_rate: float,
        position: int,
    ) -> None:
        accelerator, args = self.run.accelerator, self.run.args
        self.window_loss += loss
        self.window_tokens += int(num_items)
        self.tokens_seen += int(num_items)
        self.progress.update(1)
        if step % max(args.logging_steps, 1) != 0 and step != self.max_train_steps:
            return
        self.last_loss = accelerator.reduce(self.window_loss.clone(), reduction="sum").item() / max(
            self.window_tokens, 1
        )
        if not math.isfinite(self.last_loss):
            raise RuntimeError(
                f"The training loss is {self.last_loss} at step {step}: training diverged. Lower --learning_rate (now "
                f"{args.learning_rate}) or raise --num_warmup_steps (keep --max_grad_norm clipping on) and start again."
            )
        logs = {"train_loss": self.last_loss, "learning_rate": learning_rate, "epoch": self.stream.epoch_of(position)}
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        logs["tokens_per_second"] = self.tokens_seen / max(time.time() - self.start, 1e-9)
        self.progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{learning_rate:.2e}")
        accelerator.log(logs, step=step)
        self.window_loss.zero_()
        self.window_tokens = 0

    def evaluate(self, step: int) -> dict[str, float]:
        metrics = evaluate(self.run)
        metrics["step"] = step
        self.history.append(metrics)
        log(
            self.run.accelerator,
            f"step {step:>6} | eval loss {metrics['eval_loss']:.4f} | ppl {metrics['eval_perplexity']:.2f} | "
            f"bits/byte {metrics['eval_bits_per_byte']:.4f}",
        )
        self.run.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        return metrics

    def finish(self, completed_steps: int) -> dict[str, Any]:
        """The final evaluation and the run's results."""
        self.progress.close()
        runtime = time.time() - self.start
        final = self.evaluate(completed_steps)
        accelerator = self.run.accelerator
        return {
            **{k: v for k, v in final.items() if k != "step"},
            "train_loss": self.last_loss,
            "train_steps": completed_steps,
            "train_tokens_this_session": self.tokens_seen,
            "train_runtime_s": runtime,
            "num_parameters": self.num_parameters,
            "num_processes": accelerator.num_processes,
            "eval_history": self.history,
            "parameter_sha256_per_process": parameter_digests(accelerator, self.run.model),
        }
