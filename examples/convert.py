#!/usr/bin/env python
# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Convert a pretrained Llama / Mistral / Qwen2 / Qwen3 checkpoint into a Titans model that starts as the base.

The result is MAL (memory as a layer) with the base's attention, MLP, norms, embeddings and head, a new neural memory
whose output starts at zero, and sliding-window attention: within the window its logits are the base's (the script
checks it on random tokens and writes the largest difference into the model card). Save it, fine-tune it with
examples/finetune.py (--train memory | memory+lora | all), load it anywhere with trust_remote_code=True.

    python examples/convert.py --base_model Qwen/Qwen3-0.6B --output_dir outputs/qwen3-0.6b-titans \\
        --sliding_window 4096 --memory_layers 7,15,23 --config_overrides memory_chunk_size=64

    python examples/convert.py --base_model outputs/my-llama --output_dir outputs/my-llama-titans \\
        --sliding_window 64 --push_to_hub --hub_model_id you/my-llama-titans

Run ``python examples/convert.py --help`` for every option.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from titans_training import VERIFIED_CONTEXT_LENGTH
from transformers import AutoModelForCausalLM, AutoTokenizer

from titans_hf import TitansForCausalLM
from titans_hf.conversion_titans import SUPPORTED_BASES

CARD = """---
{card_data}
---

# {repo}

A **Titans** model converted from [`{base}`]({base_link}) with `examples/convert.py` of titans-hf: the base's
weights in a MAL Titans model (memory as a layer: each layer is `h = x + M(norm(x))`, then sliding-window attention,
then the MLP) with a new neural long-term memory (Titans, Behrouz, Zhong, Mirrokni 2024) whose output starts at zero.

- **Starts as the base.** On any sequence of at most {window} tokens (the attention window) its logits are the base's:
  checked at conversion on random tokens, largest difference {verify}.
- **Beyond the window** it is the base with sliding-window attention plus the memory, in constant memory at any length.
  The memory is untrained: fine-tune it (below) to remember what leaves the window.

| | |
|---|---|
| base | `{base}` ({base_class}, {base_parameters:,} parameters) |
| attention window | {window} tokens (base's trained context: {trained}) |
| memory | layers {memory_layers}, {memory_parameters:,} new parameters (+{added:.1%}); chunk {chunk}, depth {depth}, {heads} heads |

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
```

Fine-tune the memory alone (the base frozen), with LoRA on the base, or everything:

```bash
python examples/finetune.py --model_name_or_path {repo} --train_file long_documents.jsonl \\
    --train memory --block_size {block} --learning_rate 2e-3
```

## Citation

```bibtex
@article{{behrouz2024titans,
  title   = {{Titans: Learning to Memorize at Test Time}},
  author  = {{Behrouz, Ali and Zhong, Peilin and Mirrokni, Vahab}},
  journal = {{arXiv preprint arXiv:2501.00663}},
  year    = {{2024}}
}}
```
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--base_model", required=True, help=f"A folder or Hub id of a {' / '.join(SUPPORTED_BASES.values())}."
    )
    parser.add_argument("--output_dir", required=True, help="Where the Titans model, tokenizer and card are saved.")
    parser.add_argument(
        "--variant", default="mal", help="Only 'mal' starts as the base; the others are refused with the reason."
    )
    parser.add_argument(
        "--sliding_window", type=int, help="Attention window (default: the base's own, else its trained context)."
    )
    parser.add_argument("--memory_layers", help="Comma-separated layer indices that get a memory (default: all).")
    parser.add_argument(
        "--config_overrides",
        help="Comma-separated TitansConfig fields for the memory, e.g. 'memory_chunk_size=64,memory_depth=2'.",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"], help="The weights' dtype."
    )
    parser.add_argument(
        "--verify_tokens",
        type=int,
        default=64,
        help="Check the logits against the base's on this many random tokens (at most the window; 0: skip).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the new memory's initialisation.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Run the base's own code from the Hub.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the folder to --hub_model_id.")
    parser.add_argument("--hub_model_id", help="The Hub repository to push to, e.g. you/qwen3-0.6b-titans.")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")
    parser.add_argument("--hub_token", help="Hub token (default: the one of `hf auth login`).")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    if args.verify_tokens < 0:
        parser.error(f"--verify_tokens must be >= 0, got {args.verify_tokens}.")
    return args


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``'a=1,b=null,c=input'`` -> ``{"a": 1, "b": None, "c": "input"}`` (values as JSON, else strings)."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"--config_overrides: expected name=value, got {item!r}.")
        name, value = (s.strip() for s in item.split("=", 1))
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides


@torch.no_grad()
def largest_difference(model: torch.nn.Module, base: torch.nn.Module, length: int) -> float:
    """The largest absolute logit difference between the converted model and its base on random tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (2, length), generator=generator).to(base.device)
    return (model(ids).logits.float() - base(ids).logits.float()).abs().max().item()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Converts, checks and saves; returns what the card reports (also in ``<output_dir>/conversion.json``)."""
    args = parse_args(argv)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    base = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    base.eval()
    memory_layers = [int(i) for i in args.memory_layers.split(",")] if args.memory_layers else None
    torch.manual_seed(args.seed)
    model = TitansForCausalLM.from_base_model(
        base, args.variant, args.sliding_window, memory_layers, **parse_overrides(args.config_overrides)
    ).eval()
    config = model.config
    window = config.sliding_window
    verify = None
    if args.verify_tokens:
        verify = largest_difference(model, base, min(args.verify_tokens, window))
        print(f"largest logit difference on {min(args.verify_tokens, window)} random tokens: {verify:.3g}")

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.base_model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        tokenizer = None
        print(f"No tokenizer saved: the base has none that loads ({error}).")
    if tokenizer is not None:
        tokenizer.model_max_length = VERIFIED_CONTEXT_LENGTH  # no length limit (README "Context length")
        tokenizer.save_pretrained(output_dir)

    base_parameters = sum(p.numel() for p in base.parameters())
    memory_parameters = sum(p.numel() for n, p in model.named_parameters() if ".memory." in n)
    report = {
        "base_model": args.base_model,
        "base_class": type(base).__name__,
        "base_parameters": base_parameters,
        "memory_parameters": memory_parameters,
        "sliding_window": window,
        "memory_layers": config.memory_layers,
        "largest_logit_difference": verify,
        "verify_tokens": min(args.verify_tokens, window),
        "dtype": str(next(model.parameters()).dtype),
        "transformers_version": transformers.__version__,
    }
    (output_dir / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    repo = args.hub_model_id or output_dir.name
    is_hub_id = not Path(args.base_model).exists()
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=args.base_model if is_hub_id else None,
        tags=["titans", "titans-hf", "titans-mal", "neural-memory", "long-context", "custom_code", "converted"],
    )
    card = CARD.format(
        card_data=card_data.to_yaml(),
        repo=repo,
        base=args.base_model,
        base_link=f"https://huggingface.co/{args.base_model}" if is_hub_id else args.base_model,
        base_class=type(base).__name__,
        base_parameters=base_parameters,
        window=window,
        trained=config.training_context_length,
        verify="not checked" if verify is None else f"{verify:.2g} on {min(args.verify_tokens, window)} tokens",
        memory_layers=config.memory_layers,
        memory_parameters=memory_parameters,
        added=memory_parameters / base_parameters,
        chunk=config.memory_chunk_size,
        depth=config.memory_depth,
        heads=config.memory_num_heads,
        block=4 * window,
    )
    ModelCard(card).save(output_dir / "README.md")
    print(f"Saved the Titans model{' and tokenizer' if tokenizer else ''} to {output_dir}.")
    if args.push_to_hub:
        api = transformers.utils.hub.hf_api()
        repo_id = api.create_repo(
            args.hub_model_id, private=args.hub_private_repo or None, token=args.hub_token, exist_ok=True
        ).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message=f"Titans model converted from {args.base_model}",
            token=args.hub_token,
        )
        report["hub_repo_id"] = repo_id
        print(f"Pushed {output_dir} to the Hub: {repo_id}")
    return report


if __name__ == "__main__":
    main()
