# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""The end of a run: ``save_pretrained`` of model and tokenizer, a generated sample, the model card, the Hub push."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate.utils import set_seed
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from .checkpoints import jsonable
from .data import pad_token_id
from .models import set_activation_checkpointing
from .run import TrainingRun, log, parameters_sharded

VERIFIED_CONTEXT_LENGTH = 1 << 20
"""The saved tokenizer's ``model_max_length``: Titans has no length limit; 1M tokens is what the tests stream."""


MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
"""The model card's Jinja template (``huggingface_hub.ModelCard.from_template``)."""
TITANS_CITATION = """@article{behrouz2024titans,
  title   = {Titans: Learning to Memorize at Test Time},
  author  = {Behrouz, Ali and Zhong, Peilin and Mirrokni, Vahab},
  journal = {arXiv preprint arXiv:2501.00663},
  year    = {2024}
}"""


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
        "what trained": getattr(args, "train", "all")
        + (f" (LoRA r={args.lora_r})" if getattr(args, "train", "all") == "memory+lora" else ""),
    }
    config_json = json.dumps(
        {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}, indent=2
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        repo=repo,
        variant=variant,
        variant_role=dict(MAC="context", MAG="a gate", MAL="a layer", LMM="the only mixer").get(variant, variant),
        kind=run.kind,
        prompt_json=json.dumps(data.sample_prompt or "Hello"),
        results=results,
        hyperparameters=hyper,
        sample=sample,
        config_json=config_json,
        citation=TITANS_CITATION,
    )
    card.save(run.output_dir / "README.md")
    return card.content


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
    if hasattr(unwrapped, "merge_and_unload"):  # --train memory+lora: a plain Titans model again
        unwrapped = unwrapped.merge_and_unload()
        state_dict = unwrapped.state_dict()
    if args.gradient_checkpointing:
        set_activation_checkpointing(unwrapped, False)
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(run.output_dir, state_dict=state_dict, save_function=accelerator.save)
        # What clients (lm-evaluation-harness, pipelines) read as the model's context: the longest verified, not the
        # training length (the config has no max_position_embeddings; README "Context length").
        run.tokenizer.model_max_length = VERIFIED_CONTEXT_LENGTH
        run.tokenizer.save_pretrained(run.output_dir)
        if parameters_sharded(accelerator):  # the wrapped copy holds a shard only: sample from the saved model
            sampler = AutoModelForCausalLM.from_pretrained(run.output_dir).to(accelerator.device)
        else:
            sampler = unwrapped
        sample = generate_sample(sampler, run.tokenizer, args.sample_prompt or run.data.sample_prompt, args)
        results["sample"] = sample
        log(accelerator, f"----- sample -----\n{sample}\n------------------")
        write_model_card(run, results, sample)
        (run.output_dir / "all_results.json").write_text(json.dumps(jsonable(results), indent=2))
        log(
            accelerator,
            f"Saved model, tokenizer and model card to {run.output_dir} (final eval: loss {results['eval_loss']:.4f}, "
            f"perplexity {results['eval_perplexity']:.2f}, bits/byte {results['eval_bits_per_byte']:.4f})",
        )
        if args.push_to_hub:
            repo_id = push_folder(run.output_dir, args, run.kind)
            results["hub_repo_id"] = repo_id
            log(accelerator, f"Pushed {run.output_dir} to the Hub: {repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
